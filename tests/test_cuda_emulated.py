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

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOL, assert_close_rel
from test_cuda_ext import _expand_ref, _rows, _shrink_ref

from lora_kernels import reference as ref
from lora_kernels.ops import cuda_impl, cuda_merge
from lora_kernels.ops._operands import BITS_DTYPE

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import build as emu_build  # noqa: E402

ops = torch.ops.lora_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def emu():
    if os.environ.get("LORA_KERNELS_SKIP_EMULATOR") == "1":
        pytest.skip("LORA_KERNELS_SKIP_EMULATOR=1")
    try:
        return emu_build.load()
    except emu_build.EmulatorUnavailable as e:
        pytest.skip(f"CUDA emulator unavailable: {e}")


def _ids(M, L, kind, dtype):
    if kind == "distinct":
        ids = torch.arange(M) % L
    elif kind == "same":
        ids = torch.full((M,), L - 1)
    else:  # mixed, with -1 (no adapter)
        ids = torch.randint(-1, L, (M,))
    return ids.to(dtype)


def _cpu_rows(M, K, dtype, layout):
    return _rows(M, K, dtype, layout, device="cpu")


# ------------------------------------------------------------------------------------------------
# Multi-adapter shrink / expand / add_lora
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 70])
@pytest.mark.parametrize("K,r_max", [(33, 1), (64, 16), (200, 40)])
@pytest.mark.parametrize("layout", ["contiguous", "padded8", "padded3", "colmajor"])
def test_shrink(dtype, M, K, r_max, layout):
    torch.manual_seed(M * 7 + K + r_max)
    L = 4
    x = _cpu_rows(M, K, dtype, layout)
    a = torch.randn(L, r_max, K, dtype=dtype)
    for ids_dtype, kind, ranks in [
        (torch.int64, "distinct", None),
        (torch.int32, "mixed", torch.tensor([r_max, max(r_max // 2, 1), 0, 1], dtype=torch.int32)),
        (torch.int64, "same", torch.tensor([1, 2, 3, r_max])),
    ]:
        ids = _ids(M, L, kind, ids_dtype)
        xa = ops.cuda_multi_lora_shrink(x, a, ids, ranks)
        assert xa.dtype == torch.float32 and xa.shape == (M, r_max)
        expected = _shrink_ref(x, a, ids, ranks)
        assert_close_rel(xa, expected, TOL[torch.float32], f"shrink {dtype} {kind}")
        assert torch.all(xa[expected == 0] == 0), "entries past the rank / for id -1 must be exactly 0"


@pytest.mark.parametrize("x_dtype,a_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16)])
def test_shrink_mixed_dtypes_and_out_of_range_ids(x_dtype, a_dtype):
    torch.manual_seed(0)
    M, K, L, r_max = 37, 72, 3, 24
    x = torch.randn(M, K, dtype=x_dtype)
    a = torch.randn(L, r_max, K, dtype=a_dtype)
    ids = torch.randint(-3, L + 3, (M,))  # ids outside [0, L) give zero rows, never out-of-bounds reads
    ranks = torch.tensor([r_max, 5, 9])
    xa = ops.cuda_multi_lora_shrink(x, a, ids, ranks)
    assert_close_rel(xa, _shrink_ref(x, a, ids, ranks), TOL[torch.float32], "mixed-dtype shrink")
    assert torch.all(xa[(ids < 0) | (ids >= L)] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 70])
@pytest.mark.parametrize("N,r_max", [(1, 1), (37, 8), (130, 40), (64, 13)])
@pytest.mark.parametrize("y_layout", ["contiguous", "colmajor"])
def test_expand(dtype, M, N, r_max, y_layout):
    torch.manual_seed(M + N * 3 + r_max)
    L, col = 5, 3
    y = _cpu_rows(M, N + 7, dtype, y_layout)
    xa = torch.randn(M, r_max)
    b = torch.randn(L, N, r_max, dtype=dtype)
    scales = torch.tensor([0.5, -1.25, 2.0, 0.0, 1.0])
    ranks = torch.tensor([r_max, 1, max(r_max - 3, 0), r_max, 0], dtype=torch.int32)
    for ids, rk in [(_ids(M, L, "mixed", torch.int64), ranks), (_ids(M, L, "distinct", torch.int32), None)]:
        y0 = y.clone()
        ops.cuda_multi_lora_expand_(y, xa, b, ids, scales, rk, col)
        expected = _expand_ref(y0, xa, b, ids, scales, rk, col)
        assert_close_rel(y, expected, TOL[dtype], f"expand {dtype}")
        assert torch.equal(y[ids < 0], y0[ids < 0]), "rows with id -1 must be bit-identical"
        assert torch.equal(y[:, :col], y0[:, :col]) and torch.equal(y[:, col + N :], y0[:, col + N :]), "columns outside the slice changed"
        y = y0


def test_expand_strided_b_and_out_of_range_ids():
    torch.manual_seed(1)
    M, N, L, r_max = 50, 70, 3, 12
    y = torch.randn(M, N, dtype=torch.bfloat16)
    xa = torch.randn(M, r_max)
    b = torch.randn(L, r_max, N, dtype=torch.float32).transpose(1, 2)  # rank dim not contiguous
    ids = torch.randint(-2, L + 2, (M,))
    scales = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)  # converted by the glue
    y0 = y.clone()
    ops.cuda_multi_lora_expand_(y, xa, b, ids, scales, None, 0)
    assert_close_rel(y, _expand_ref(y0, xa, b, ids, scales, None, 0), TOL[torch.bfloat16], "strided B")
    bad = (ids < 0) | (ids >= L)
    assert torch.equal(y[bad], y0[bad])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 70])
@pytest.mark.parametrize("widths,r_max", [([64], 16), ([40, 24, 24], 8), ([33, 5], 40)])
def test_add_lora_packed_slices(dtype, M, widths, r_max):
    torch.manual_seed(M + r_max)
    L, K = 6, 72
    x = torch.randn(M, K, dtype=dtype)
    y = torch.randn(M, sum(widths), dtype=dtype)
    A = [torch.randn(L, r_max, K, dtype=dtype) / K**0.5 for _ in widths]
    B = [torch.randn(L, w, r_max, dtype=dtype) for w in widths]
    ids = torch.randint(-1, L, (M,), dtype=torch.int32)
    scales = torch.rand(L) + 0.5
    ranks = torch.randint(0, r_max + 1, (L,))
    expected = ref.add_lora_ref(y.double().clone(), x.double(), [a.double() for a in A], [b.double() for b in B], ids,
                                scales.double(), ranks)
    y0 = y.clone()
    cuda_impl.add_lora_cuda(y, x, A, B, ids, scales, ranks)
    assert_close_rel(y, expected, TOL[dtype], f"add_lora cuda {dtype}")
    assert torch.equal(y[ids < 0], y0[ids < 0])


def _zipf_ids(M, L, gen):
    """Token→adapter ids with a Zipf-like popularity (adapter i has weight 1/(i+1)), some tokens without (-1)."""
    w = 1.0 / torch.arange(1, L + 1, dtype=torch.float64)
    ids = torch.multinomial(w, M, replacement=True, generator=gen)
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
    elif pattern == "one":
        ids = torch.zeros(M, dtype=torch.int64)
    elif pattern == "distinct":
        ids = torch.arange(M) % L
    else:  # no token has an adapter
        ids = torch.full((M,), -1)
    ids = ids.to(torch.int32)
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
    cuda_impl.add_lora_cuda(y_tok, x, A, B, ids, scales, ranks)
    cuda_impl.add_lora_cuda(y_grp, x, A, B, ids, scales, ranks, meta=meta)
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
    meta = LoRABatchMeta(_zipf_ids(M, L, gen).to(torch.int32), L, block_m=32, max_tokens=128)
    for _ in range(3):
        ids = _zipf_ids(M, L, gen).to(torch.int32)
        meta.update_(ids)
        x, y = torch.randn(M, K, generator=gen), torch.randn(M, N, generator=gen)
        expected = ref.add_lora_ref(y.double().clone(), x.double(), [A.double()], [B.double()], ids, scales.double())
        cuda_impl.add_lora_cuda(y, x, [A], [B], ids, scales, None, meta=meta)
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


def _linear_inputs(M, K, N, r, dtype, bias, layout="contiguous"):
    x = _cpu_rows(M, K, dtype, layout)
    w = torch.randn(N, K, dtype=dtype) / K**0.5
    a = torch.randn(r, K, dtype=dtype) / K**0.5
    b = torch.randn(N, r, dtype=dtype) / r**0.5
    bb = torch.randn(N, dtype=dtype) if bias else None
    return x, w, a, b, bb


SHAPES = [(33, 17, 1), (64, 96, 16), (72, 40, 24)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 70])
@pytest.mark.parametrize("K,N,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_fwd(dtype, M, K, N, r, p):
    torch.manual_seed(M + K + N + r)
    for bias, layout in [(True, "contiguous"), (False, "padded3"), (True, "colmajor")]:
        x, w, a, b, bb = _linear_inputs(M, K, N, r, dtype, bias, layout)
        y, xa = cuda_impl.lora_linear_fwd_cuda(x, w, a, b, 0.75, bb, p, 1234)
        y_ref, xa_ref = ref.lora_linear_fwd_ref(x.double(), w.double(), a.double(), b.double(), 0.75,
                                                None if bb is None else bb.double(), p, 1234)
        assert y.dtype == dtype and xa.dtype == torch.float32
        assert_close_rel(xa, xa_ref, TOL[torch.float32], f"xa {dtype} {layout}")
        assert_close_rel(y, y_ref, TOL[dtype], f"y {dtype} {layout}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 70])
@pytest.mark.parametrize("K,N,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_linear_bwd(dtype, M, K, N, r, p):
    torch.manual_seed(M * 3 + K + r)
    x, w, a, b, _ = _linear_inputs(M, K, N, r, dtype, False, "padded3" if M % 2 else "contiguous")
    _, xa = cuda_impl.lora_linear_fwd_cuda(x, w, a, b, 0.5, None, p, 99)
    dy = torch.randn(M, N, dtype=dtype)
    expected = ref.lora_linear_bwd_ref(dy.double(), x.double(), xa.double(), w.double(), a.double(), b.double(), 0.5, p,
                                       99, (True, True, True, True))
    for mask in [(True, True, True, True), (True, False, True, False), (False, True, False, False)]:
        got = cuda_impl.lora_linear_bwd_cuda(dy, x, xa, w, a, b, 0.5, p, 99, mask)
        for name, g, e, want, like in zip(("dx", "dA", "dB", "dW"), got, expected, mask, (dy, a, b, w)):
            if not want:
                assert g is None, name
                continue
            assert g.dtype == like.dtype, name
            assert_close_rel(g, e, TOL[dtype], f"{name} {dtype} mask={mask}")
    # LoRA-FA: x not saved, only dx and dB asked for
    dx, da, db, dw = cuda_impl.lora_linear_bwd_cuda(dy, None, xa, w, a, b, 0.5, p, 99, (True, False, True, False))
    assert da is None and dw is None
    assert_close_rel(dx, expected[0], TOL[dtype], "dx without x")
    assert_close_rel(db, expected[2], TOL[dtype], "dB without x")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 2**31 - 1, 2**40 + 3, -5])
@pytest.mark.parametrize("M,K", [(1, 1), (7, 33), (70, 40)])
def test_dropout_mask_bit_exact(p, seed, M, K):
    x = torch.ones(M, K, dtype=torch.bfloat16)
    d = ops.cuda_lora_dropout(x, p, seed)
    keep = ref.dropout_keep_mask(seed, M, K, p)
    assert torch.equal(d != 0, keep)
    assert torch.all(d[keep] == torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))
    # the same mask inside the fused forward's shrink: with A = I, xa is drop(x) itself
    xr = torch.randn(M, K)
    _, xa = cuda_impl.lora_linear_fwd_cuda(xr, torch.zeros(3, K), torch.eye(K), torch.zeros(3, K), 1.0, None, p, seed)
    assert torch.equal(xa != 0, keep & (xr != 0))
    assert torch.equal(xa, ref.lora_dropout(xr, p, seed)), "kept values must be x / (1 - p) exactly (fp32)"


def test_opcheck_cuda_ops():
    torch.manual_seed(0)
    M, K, N, L, r = 9, 40, 24, 3, 8
    x = torch.randn(M, K, dtype=torch.float16)
    a3 = torch.randn(L, r, K, dtype=torch.float16)
    b3 = torch.randn(L, N, r, dtype=torch.float16)
    ids = torch.randint(-1, L, (M,))
    scales = torch.rand(L)
    ranks = torch.tensor([r, 3, 1])
    xa = ops.cuda_multi_lora_shrink(x, a3, ids, ranks)
    y = torch.randn(M, N + 2, dtype=torch.float16)
    w = torch.randn(N, K, dtype=torch.float16)
    a, b = a3[0].clone(), b3[0].clone()
    bias = torch.randn(N, dtype=torch.float16)
    _, xa1 = ops.cuda_lora_linear_fwd(x, w, a, b, 0.5, bias, 0.1, 3)
    dy = torch.randn(M, N, dtype=torch.float16)
    wm = torch.randn(N, K, dtype=torch.bfloat16)
    from lora_kernels.serving import LoRABatchMeta

    meta = LoRABatchMeta(ids, L, block_m=16)
    grp = (meta.sorted_token_ids, meta.tiles, meta.block_m)
    cases = [
        (ops.cuda_multi_lora_shrink.default, (x, a3, ids, ranks, *grp)),
        (ops.cuda_multi_lora_expand_.default, (y, xa, b3, ids, scales, ranks, 1, *grp)),
        (ops.cuda_multi_lora_shrink.default, (x, a3, ids, ranks)),
        (ops.cuda_multi_lora_shrink.default, (x, a3, ids, None)),
        (ops.cuda_multi_lora_expand_.default, (y, xa, b3, ids, scales, ranks, 2)),
        (ops.cuda_lora_linear_fwd.default, (x, w, a, b, 0.5, bias, 0.1, 3)),
        (ops.cuda_lora_linear_bwd.default, (dy, x, xa1, w, a, b, 0.5, 0.1, 3, [True, True, True, False])),
        (ops.cuda_lora_linear_bwd.default, (dy, None, xa1, w, a, b, 0.5, 0.0, 3, [True, False, True, False])),
        (ops.cuda_lora_dropout.default, (x, 0.3, 11)),
        (ops.cuda_merge_.default, (wm, a.bfloat16(), b.bfloat16(), torch.tensor([0, r], dtype=torch.int32),
                                   torch.tensor([0.5]))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_glue_errors_name_the_tensor():
    x = torch.randn(4, 8)
    a = torch.randn(2, 3, 8, dtype=torch.float64)
    ids = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="lora_a must be float16, bfloat16 or float32"):
        ops.cuda_multi_lora_shrink(x, a, ids, None)
    with pytest.raises(RuntimeError, match="adapter_ids must be int32 or int64"):
        ops.cuda_multi_lora_shrink(x, a.float(), ids.float(), None)
    with pytest.raises(RuntimeError, match="lora_a must be \\[L, r_max, K=8\\]"):
        ops.cuda_multi_lora_shrink(x, torch.randn(2, 3, 9), ids, None)
    y = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="do not fit in y"):
        ops.cuda_multi_lora_expand_(y, torch.randn(4, 3), torch.randn(2, 4, 3), ids, torch.ones(2), None, 2)
    with pytest.raises(RuntimeError, match="xa must be float32"):
        ops.cuda_multi_lora_expand_(y, torch.randn(4, 3).half(), torch.randn(2, 4, 3), ids, torch.ones(2), None, 0)
    with pytest.raises(RuntimeError, match="x is required for dA"):
        ops.cuda_lora_linear_bwd(torch.randn(4, 6), None, torch.randn(4, 2), torch.randn(6, 8), torch.randn(2, 8),
                                 torch.randn(6, 2), 1.0, 0.0, 0, [True, True, True, False])


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
