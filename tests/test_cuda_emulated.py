"""The CUDA extension (csrc/: kernels, launchers and torch glue) executed on the CPU by the emulator of
tests/cuda_emu/ (fibers for threads, real barriers and warp shuffles; see tests/cuda_emu/cuda_emu.h).

This is how the CUDA backend is checked on a machine without a GPU: the very sources the GPU build compiles,
every op against the float64 reference in fp32, fp16 and bf16 (bf16 works here: the host has bf16 conversions),
awkward shapes (M = 0, 1, 7 and >= 64, which switches the launchers to their multi-token paths; odd K/N;
ranks 1..40 and mixed; rows that break 16-byte alignment; column-major views), seeded dropout bit for bit,
merge and the exact merge's two-pass repair protocol, and opcheck of every op. Buffers the kernels must fill
are NaN-poisoned by the emulated glue (glue::kernel_output).

Not shown here (GPU only, tests/test_cuda_ext.py): speed, CUDA graphs, races between concurrently running
blocks, the device compiler. Loading the emulated extension registers the cuda_* ops for CPU tensors in this
process (test_cuda_ext.test_cuda_ops_have_no_cpu_kernel accounts for that).

The build takes ~2 minutes on 2 cores the first time (cached in the temp dir by a hash of the sources).
Set LORA_KERNELS_SKIP_EMULATOR=1 to skip this module.
"""

import pytest
import torch
import cuda_ext_cases as cases
from conftest import TOL, assert_close_rel
from test_multi_lora_triton import make_ids

from lora_kernels import reference as ref
from lora_kernels.cuda import merge as cuda_merge
from lora_kernels.cuda import multi_lora as cuda_multi_lora
from lora_kernels.ops.merge import BITS_DTYPE


ops = torch.ops.lora_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _emulated_extension(emu):
    """Every test here runs against the emulated extension (conftest.emu)."""


# ------------------------------------------------------------------------------------------------
# Multi-adapter shrink / expand / add_lora (bodies in cuda_ext_cases.py, shared with the GPU tests)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 70])
@pytest.mark.parametrize("K,r_max", [(33, 1), (64, 16), (200, 40)])
@pytest.mark.parametrize("layout", ["contiguous", "padded8", "padded3", "colmajor"])
def test_shrink(dtype, M, K, r_max, layout):
    cases.check_shrink(dtype, M, K, r_max, layout, "cpu")


@pytest.mark.parametrize("x_dtype,a_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16)])
def test_shrink_mixed_dtypes_and_out_of_range_ids(x_dtype, a_dtype):
    cases.check_shrink_mixed_dtypes_and_out_of_range_ids(x_dtype, a_dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 70])
@pytest.mark.parametrize("N,r_max", [(1, 1), (37, 8), (130, 40), (64, 13)])
@pytest.mark.parametrize("y_layout", ["contiguous", "colmajor"])
def test_expand(dtype, M, N, r_max, y_layout):
    cases.check_expand(dtype, M, N, r_max, y_layout, "cpu")


def test_expand_strided_b_and_out_of_range_ids():
    cases.check_expand_strided_b_and_out_of_range_ids("cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 70])
@pytest.mark.parametrize("widths,r_max", [([64], 16), ([40, 24, 24], 8), ([33, 5], 40)])
def test_add_lora_packed_slices(dtype, M, widths, r_max):
    def run(y, x, A, B, ids, scales, ranks, widths):  # the launcher (the public API refuses CPU tensors for "cuda")
        cuda_multi_lora.add_lora_cuda(y, x, A, B, ids, scales, ranks)

    cases.check_add_lora_packed_slices(dtype, M, widths, r_max, "cpu", run)


def _zipf_ids(M, L, gen):
    """Zipf-like token→adapter ids (make_ids) with about 10% of the tokens without an adapter (-1)."""
    ids = make_ids("zipf", M, L, gen)
    ids[torch.rand(M, generator=gen) < 0.1] = -1
    return ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,L,pattern", [(64, 4, "zipf"), (150, 7, "zipf"), (100, 1, "one"), (90, 5, "distinct"), (64, 3, "none")])
@pytest.mark.parametrize("block_m", [16, 64])
def test_grouped_launch_equals_per_token_launch(dtype, M, L, pattern, block_m):
    """The grouped (tile-table) shrink/expand visit the same (token, adapter) pairs as the per-token launch and do
    the same fp32 arithmetic in the same order: bit-identical xa and y, and both match the reference."""
    from lora_kernels.serving import LoRABatchMeta

    gen = torch.Generator().manual_seed(M * 31 + L + block_m)
    K, r_max, widths = 72, 16, [40, 24]
    if pattern == "zipf":
        ids = _zipf_ids(M, L, gen)
    elif pattern == "none":  # no token has an adapter
        ids = torch.full((M,), -1, dtype=torch.int32)
    else:
        ids = make_ids(pattern, M, L, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    A = [(torch.randn(L, r_max, K, generator=gen) / K**0.5).to(dtype) for _ in widths]
    B = [torch.randn(L, w, r_max, generator=gen).to(dtype) for w in widths]
    scales = torch.rand(L, generator=gen) + 0.5
    ranks = torch.randint(1, r_max + 1, (L,), generator=gen)
    meta = LoRABatchMeta(ids, L, block_m=block_m, max_tokens=M + 5)
    tiles = (meta.sorted_token_ids, meta.tiles, meta.block_m)

    xa_tok = ops.cuda_multi_lora_shrink(x, A[0], ids, ranks)
    xa_grp = ops.cuda_multi_lora_shrink(x, A[0], ids, ranks, *tiles)
    assert torch.equal(xa_grp, xa_tok), "grouped shrink differs from the per-token shrink"

    y0 = torch.randn(M, sum(widths), generator=gen).to(dtype)
    y_tok, y_grp = y0.clone(), y0.clone()
    cuda_multi_lora.add_lora_cuda(y_tok, x, A, B, ids, scales, ranks)
    cuda_multi_lora.add_lora_cuda(y_grp, x, A, B, ids, scales, ranks, groups=meta.groups)
    assert torch.equal(y_grp, y_tok), "grouped add_lora differs from the per-token add_lora"
    expected = ref.add_lora_ref(y0.double(), x.double(), [a.double() for a in A], [b.double() for b in B], ids,
                                scales.double(), ranks)
    assert_close_rel(y_grp, expected, TOL[dtype], f"grouped add_lora {dtype}")
    assert torch.equal(y_grp[ids < 0], y0[ids < 0])


def test_grouped_launch_follows_meta_updates():
    """One meta (fixed capacity), updated in place for a new batch: the grouped launch follows the new ids."""
    from lora_kernels.serving import LoRABatchMeta

    gen = torch.Generator().manual_seed(5)
    M, L, K, N, r = 96, 6, 40, 24, 8
    A, B = torch.randn(L, r, K, generator=gen), torch.randn(L, N, r, generator=gen)
    scales = torch.rand(L, generator=gen)
    meta = LoRABatchMeta(_zipf_ids(M, L, gen), L, block_m=32, max_tokens=128)
    for _ in range(3):
        ids = _zipf_ids(M, L, gen)
        meta.update_(ids)
        x, y = torch.randn(M, K, generator=gen), torch.randn(M, N, generator=gen)
        expected = ref.add_lora_ref(y.double().clone(), x.double(), [A.double()], [B.double()], ids, scales.double())
        cuda_multi_lora.add_lora_cuda(y, x, [A], [B], ids, scales, None, groups=meta.groups)
        assert_close_rel(y, expected, TOL[torch.float32], "grouped add_lora after meta.update_")


def test_grouped_args_are_checked():
    from lora_kernels.serving import LoRABatchMeta

    x, a, ids = torch.randn(70, 8), torch.randn(2, 4, 8), torch.zeros(70, dtype=torch.int32)
    meta = LoRABatchMeta(ids, 2, block_m=16)
    with pytest.raises(RuntimeError, match="must be given together"):
        ops.cuda_multi_lora_shrink(x, a, ids, None, meta.sorted_token_ids, None, 16)
    with pytest.raises(RuntimeError, match="must be int32"):
        ops.cuda_multi_lora_shrink(x, a, ids, None, meta.sorted_token_ids.long(), meta.tiles, 16)
    with pytest.raises(RuntimeError, match=r"tiles must be \[3, T\]"):
        ops.cuda_multi_lora_shrink(x, a, ids, None, meta.sorted_token_ids, meta.tiles[:2], 16)
    with pytest.raises(RuntimeError, match="sorted_token_ids must be \\[C >= M=70\\]"):
        ops.cuda_multi_lora_shrink(x, a, ids, None, meta.sorted_token_ids[:50], meta.tiles, 16)


# ------------------------------------------------------------------------------------------------
# LoRA linear: forward, backward, dropout
# ------------------------------------------------------------------------------------------------


SHAPES = [(33, 17, 1), (64, 96, 16), (72, 40, 24)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 70])
@pytest.mark.parametrize("K,N,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_fwd(dtype, M, K, N, r, p):
    cases.check_lora_linear_fwd(dtype, M, K, N, r, p, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 70])
@pytest.mark.parametrize("K,N,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_linear_bwd(dtype, M, K, N, r, p):
    cases.check_lora_linear_bwd(dtype, M, K, N, r, p, "cpu")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 2**31 - 1, 2**40 + 3, -5])
@pytest.mark.parametrize("M,K", [(1, 1), (7, 33), (70, 40)])
def test_dropout_mask_bit_exact(p, seed, M, K):
    cases.check_dropout_mask_bit_exact(p, seed, M, K, "cpu")


def test_opcheck_cuda_ops():
    cases.check_opcheck_cuda_ops("cpu")


def test_glue_errors_name_the_tensor():
    cases.check_glue_errors_name_the_tensor("cpu")


# ------------------------------------------------------------------------------------------------
# Merge and the exact merge
# ------------------------------------------------------------------------------------------------


def _adapters(N, K, ranks, dtype):
    A = [torch.randn(r, K, dtype=dtype) / K**0.5 for r in ranks]
    B = [torch.randn(N, r, dtype=dtype) * 0.05 for r in ranks]
    return A, B


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("N,K", [(1, 1), (37, 129), (64, 256), (33, 300)])
@pytest.mark.parametrize("ranks", [[1], [16], [40, 3]])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_merge(w_dtype, N, K, ranks, layout):
    torch.manual_seed(N + K + sum(ranks))
    w = torch.randn(N, K, dtype=w_dtype) if layout == "contiguous" else torch.randn(K, N, dtype=w_dtype).t()
    A, B = _adapters(N, K, ranks, torch.float32 if len(ranks) > 1 else w_dtype)
    scales = [0.75, -1.5][: len(ranks)]
    expected = ref.merge_ref(w.clone(), A, B, scales)
    cuda_merge.merge_cuda(w, A, B, scales)
    # one fp32 accumulation order differs from the reference's: at most one ulp of W on a few elements
    assert_close_rel(w, expected, TOL[torch.float32] if w_dtype == torch.float32 else 4e-3, f"merge {w_dtype}")
    ulp_off = (w.float() - expected.float()).abs() > (expected.float().abs() * 2 ** -7 + 1e-30)
    assert not ulp_off.any(), "merge differs from the reference by more than one ulp"


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("N,K", [(37, 129), (64, 256)])
@pytest.mark.parametrize("capacity", [None, 3])
def test_exact_merge_round_trip(w_dtype, N, K, capacity):
    torch.manual_seed(N * K)
    w = torch.randn(N, K, dtype=w_dtype) * 0.02
    # values at binade edges, subnormals, ±0 and a large update on a few elements
    flat = w.view(-1)
    flat[:6] = torch.tensor([2.0**-14, -(2.0**-24), 0.0, -0.0, 1.0, -2.0], dtype=torch.float32).to(w_dtype)
    A, B = _adapters(N, K, [16, 4], torch.float32)
    scales = [1.0, 3.0]
    w0 = w.clone()
    idx, bits, n_nonfinite, _ = cuda_merge.merge_exact_cuda(w, A, B, scales, capacity=capacity)
    assert n_nonfinite == 0
    merged = ref.merge_ref(w0.clone(), A, B, scales)
    assert_close_rel(w, merged, TOL[torch.float32] if w_dtype == torch.float32 else 4e-3, "merged W")
    if w_dtype != torch.float32:
        assert idx.numel() > 0, "a bf16/fp16 merge of this size always has elements that need a repair"
    # the repair list holds exactly the elements whose plain unmerge would not restore W
    back = w.clone()
    cuda_merge.merge_cuda(back, A, B, [-s for s in scales])
    ib = BITS_DTYPE[w_dtype]
    bad = (back.view(ib) != w0.view(ib)).view(-1).nonzero().view(-1)
    assert torch.equal(torch.sort(idx.long()).values, bad)
    back.view(ib).view(-1)[idx.long()] = bits
    assert torch.equal(back.view(ib), w0.view(ib)), "merge + unmerge + repair is not bit-exact"
