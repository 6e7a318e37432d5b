"""Byte-traffic ceilings of the Triton kernels, counted exactly under the interpreter with the GPU launch configs
(tests/traffic.py). req = every byte requested, uniq = distinct bytes per kernel launch, floor = each operand
read and/or written once. These are memory-traffic facts, not timings: they hold on any GPU the configs run on.

Shapes: decode K = N = 4096 (the serving case the ceiling is about); the other cases use K = N = 1024 to keep the
interpreter's run time small (their ratios depend on the tile counts, not on K and N beyond that)."""

import itertools

import pytest
import torch

pytest.importorskip("triton")
import traffic as T  # noqa: E402

from lora_kernels.triton import lora_linear as tll  # noqa: E402
from lora_kernels.triton import merge as tm  # noqa: E402
from lora_kernels.triton import multi_lora as tml  # noqa: E402

pytestmark = pytest.mark.skipif(not T.interpreting(), reason="counts bytes under TRITON_INTERPRET=1 (CPU only)")


def _pairs(shrink, expand, every=False):
    if every:
        return list(itertools.product(shrink.gpu, expand.gpu))
    return [(shrink.gpu[0], expand.gpu[0])]


@pytest.mark.parametrize("M", [1, 4, 16])
def test_decode_one_adapter_reads_weights_once(M):
    """Decode, one adapter, r = 16, K = N = 4096: req/floor <= 2 (the fused kernel this replaced: 8.3 / 26 / 58)."""
    c = T.add_lora_case(M, 1, 16, 4096, 4096, ids=torch.zeros(M, dtype=torch.int32))
    worst = 0.0
    # M = 16 (the most tokens per tile) over every config pair the autotuner can pick; the others on the first
    for cs, ce in _pairs(tml._BGMV_SHRINK_CONFIGS, tml._BGMV_EXPAND_CONFIGS, every=(M == 16)):
        tr = T.measure_add_lora(c, "bgmv", {tml._bgmv_shrink_kernel: cs, tml._bgmv_expand_kernel: ce})
        req, uniq = tr.ratios()
        assert uniq <= 1.05, f"M={M} {cs.kwargs} {ce.kwargs}: uniq/floor {uniq:.2f}\n{tr.table()}"
        for name in ("A", "B", "x"):
            assert tr.stats[name].req == tr.stats[name].nbytes, f"{name} read more than once\n{tr.table()}"
        worst = max(worst, req)
    assert worst <= 2.0, f"M={M}: req/floor {worst:.2f}"


def test_decode_distinct_adapters_read_each_once():
    """16 tokens, 16 adapters (one each): every adapter's A and B read exactly once."""
    c = T.add_lora_case(16, 16, 16, 1024, 1024, ids=torch.randperm(16, generator=torch.Generator().manual_seed(0)))
    tr = T.measure_add_lora(c, "bgmv", {tml._bgmv_shrink_kernel: tml._BGMV_SHRINK_CONFIGS.gpu[0],
                                        tml._bgmv_expand_kernel: tml._BGMV_EXPAND_CONFIGS.gpu[0]})
    assert tr.stats["A"].req == tr.stats["A"].nbytes and tr.stats["B"].req == tr.stats["B"].nbytes, tr.table()
    assert tr.ratios()[0] <= 1.3, tr.table()


@pytest.mark.parametrize("L", [8, 32])
def test_prefill_many_adapters(L):
    """128 tokens over L adapters (every adapter used), grouped (sgmv): req/floor <= 1.3."""
    g = torch.Generator().manual_seed(L)
    ids = torch.cat([torch.arange(L), torch.randint(0, L, (128 - L,), generator=g)]).to(torch.int32)
    c = T.add_lora_case(128, L, 16, 1024, 1024, ids=ids)
    cs, ce = _pairs(tml._SHRINK_CONFIGS, tml._EXPAND_CONFIGS)[0]
    tr = T.measure_add_lora(c, "sgmv", {tml._sgmv_shrink_kernel: cs, tml._sgmv_expand_kernel: ce})
    req, uniq = tr.ratios()
    assert req <= 1.3 and uniq <= 1.1, tr.table()


def test_prefill_long_segments():
    """1024 tokens over 4 adapters: A and B once per 64-token tile, fp32 xa once per N-block: req/floor <= 1.3."""
    ids = (torch.arange(1024) * 4 // 1024).to(torch.int32)
    c = T.add_lora_case(1024, 4, 16, 1024, 1024, ids=ids)
    cs, ce = tml._SHRINK_CONFIGS.gpu[0], tml._EXPAND_CONFIGS.gpu[1]
    tr = T.measure_add_lora(c, "sgmv", {tml._sgmv_shrink_kernel: cs, tml._sgmv_expand_kernel: ce})
    req, uniq = tr.ratios()
    assert req <= 1.3 and uniq <= 1.1, tr.table()


@pytest.mark.parametrize("which", [0, 2])  # the default tile and the narrowest (most B·A re-reads)
def test_merge(which):
    W, A, B = T._rand(1024, 1024), T._rand(16, 1024, seed=2), T._rand(1024, 16, seed=3)
    tr = T.measure_merge(W, A, B, tm.MERGE_CONFIGS[which])
    req, uniq = tr.ratios()
    assert req <= 1.3 and uniq <= 1.01, tr.table()


def _linear_configs():
    return {tll._lora_gemm_kernel: tll.GEMM_CONFIGS.gpu[0], tll._lora_shrink_kernel: tll.SHRINK_CONFIGS.gpu[0],
            tll._lora_dy_kernel: tll.DY_CONFIGS.gpu[0], tll._lora_da_kernel: tll.DA_CONFIGS.gpu[0]}


def test_lora_linear_forward_reads_x_once():
    """No dropout, r <= 32: the shrink runs inside the GEMM's K loop, so x is read once (uniq/floor 1.25 before)."""
    tr = T.measure_lora_linear(T.linear_case(512, 1024, 1024, 16), _linear_configs())
    assert tr.ratios()[1] <= 1.01, tr.table()
    assert tr.stats["x"].uniq == tr.stats["x"].nbytes, tr.table()


def test_lora_linear_backward_reads_dy_once():
    """No dropout, r <= 32: the dx GEMM also forms dxa and dB from the dy tiles it loads (uniq/floor 1.27 before;
    what is left above 1 is the fp32 dxa / dA / dB accumulators)."""
    tr = T.measure_lora_linear(T.linear_case(512, 1024, 1024, 16), _linear_configs(), backward=True)
    assert tr.ratios()[1] <= 1.10, tr.table()
    assert tr.stats["dy"].uniq == tr.stats["dy"].nbytes, tr.table()


def test_lora_linear_with_dropout():
    """Measured, not at the floor: with dropout the forward keeps a separate shrink (x read twice: 1.24) and the
    backward the dy kernel (dy read twice: 1.27) -- fusing them would recompute the mask hash in every column tile
    (forward) or hold a second full fp32 tile in the dx epilogue (backward). These ceilings keep them from growing."""
    c = T.linear_case(512, 1024, 1024, 16)
    fwd = T.measure_lora_linear(c, _linear_configs(), dropout_p=0.1)
    assert fwd.ratios()[1] <= 1.25, fwd.table()
    bwd = T.measure_lora_linear(c, _linear_configs(), dropout_p=0.1, backward=True)
    assert bwd.ratios()[1] <= 1.28, bwd.table()


def test_harness_counts_a_known_kernel_exactly():
    """The harness itself: a copy kernel moves exactly its operands, once, at the right byte sizes."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    src, dst = torch.randn(1000, dtype=torch.float16), torch.empty(1000, dtype=torch.float16)
    with T.Traffic(src=src, dst=dst) as tr:
        copy[(8,)](src, dst, 1000, BLOCK=128)
        copy[(8,)](src, dst, 1000, BLOCK=128)
    assert tr.stats["src"].req == 2 * 2000 and tr.stats["src"].uniq == 2 * 2000  # two launches
    assert tr.stats["dst"].store == 2 * 2000 and tr.floor == 4000
    assert torch.equal(dst, src)
