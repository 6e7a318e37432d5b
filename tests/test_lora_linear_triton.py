"""Triton fused LoRA linear (lora_kernels/triton/lora_linear.py) against the float64 reference.

Runs on the CPU interpreter (fp32, fp16; small shapes) and, when a GPU is present, also in bf16 and on
larger shapes. Launchers are called directly (outputs poisoned with NaN before the kernels write them)
and through ``lora_kernels.lora_linear(..., backend="triton")`` with autograd.
"""

import os

import pytest
import torch

from conftest import HAS_CUDA, TOL, assert_close_rel, assert_fa_rule, lora_linear_lowp, poison_
import lora_kernels
from lora_kernels import reference as ref
from lora_kernels.triton import lora_linear as tll

DEV = "cuda" if HAS_CUDA else "cpu"
ALL_GRADS = (True, True, True, True)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every output buffer a launcher allocates starts as NaN, so an unwritten element fails the test."""
    monkeypatch.setattr(tll, "_alloc", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype, device=device)))
    monkeypatch.delenv(tll.ENV_FP32_PRECISION, raising=False)


def _tol(dtype):
    if dtype != torch.float32:
        return TOL[dtype]
    if os.environ.get(tll.ENV_FP32_PRECISION) == "ieee":
        return TOL[torch.float32]
    # Triton's tf32 drops the 13 low mantissa bits without rounding: ~7.7e-4 relative on random data
    # (~3e-4 with rounding, which TOL["tf32"] assumes). The interpreter computes fp32 exactly.
    return 2 * TOL["tf32"]


_KERNELS = ("_lora_shrink_kernel", "_lora_gemm_kernel", "_lora_dy_kernel", "_lora_da_kernel")


@pytest.fixture
def few_configs(monkeypatch):
    """On a GPU, autotune over two configs per kernel (the first, and the narrowest row tile) to keep the
    parametrized tests' compile time small; test_every_config_gpu covers every config."""
    for name in _KERNELS:
        kernel = getattr(tll, name)
        first = kernel.configs[0]
        small = min(kernel.configs, key=lambda c: c.kwargs["BLOCK_M"])
        monkeypatch.setattr(kernel, "configs", [first] if small is first else [first, small])


def _make(M, K, N, r, dtype, bias=True, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * scale).to(dtype=dtype).to(DEV)

    x = rnd(M, K)
    w = rnd(N, K, scale=K**-0.5)
    a = rnd(r, K, scale=K**-0.5)
    b = rnd(N, r, scale=0.5)
    bs = rnd(N) if bias else None
    return x, w, a, b, bs


def _d(t):
    return None if t is None else t.detach().to(torch.float64)


def _check_fwd_bwd(x, w, a, b, bias, scale, p, seed, dtype, dy=None, mask=ALL_GRADS):
    M, N = x.shape[0], w.shape[0]
    y, xa = tll.lora_linear_fwd_triton(x, w, a, b, scale, bias, p, seed)
    y_ref, xa_ref = ref.lora_linear_fwd_ref(_d(x), _d(w), _d(a), _d(b), scale, _d(bias), p, seed)
    assert y.dtype == dtype and xa.dtype == torch.float32
    assert_close_rel(y, y_ref, _tol(dtype), "y")
    assert_close_rel(xa, xa_ref, _tol(dtype), "xa")
    if dy is None:
        g = torch.Generator().manual_seed(99)
        dy = torch.randn(M, N, generator=g).to(dtype=dtype).to(DEV)
    grads = tll.lora_linear_bwd_triton(dy, x, xa, w, a, b, scale, p, seed, mask)
    grads_ref = ref.lora_linear_bwd_ref(_d(dy), _d(x), xa_ref, _d(w), _d(a), _d(b), scale, p, seed, mask)
    lowp = lora_linear_lowp(x, w, a, b, bias, scale, p, seed, dy) if dtype != torch.float32 else None
    if lowp is not None:
        assert_fa_rule(y, y_ref, lowp[0], "y")
    dtypes = (dy.dtype, a.dtype, b.dtype, w.dtype)
    for i, (name, want, got, exp, dt) in enumerate(zip(("dx", "dA", "dB", "dW0"), mask, grads, grads_ref, dtypes)):
        if not want:
            assert got is None, name
            continue
        assert got.dtype == dt, name
        assert_close_rel(got, exp, _tol(dtype), name)
        if lowp is not None:
            assert_fa_rule(got, exp, lowp[1][i], name)
    return y, xa, grads


# ----------------------------------------------------------------------------------------------
# Launchers vs the reference
# ----------------------------------------------------------------------------------------------

SHAPES = [  # (M, K, N, r): odd sizes, not multiples of the 32-wide interpreter tiles
    (1, 33, 17, 1),
    (37, 45, 50, 8),
    (64, 70, 96, 16),
    (29, 40, 24, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_launchers_match_reference(dtype, M, K, N, r, with_bias, p):
    x, w, a, b, bias = _make(M, K, N, r, dtype, bias=with_bias, gen_seed=M * 1000 + r)
    _check_fwd_bwd(x, w, a, b, bias, 0.75, p, 1234, dtype)


def test_rank_128():
    x, w, a, b, bias = _make(20, 48, 40, 128, torch.float32)
    _check_fwd_bwd(x, w, a, b, bias, 0.125, 0.1, 7, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, "float32-ieee"])
@pytest.mark.parametrize("M,K,N,r", [(300, 512, 384, 16), (1, 4096, 1000, 64), (257, 1000, 333, 200), (513, 256, 640, 128)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_launchers_match_reference_gpu(dtype, M, K, N, r, p, few_configs, monkeypatch):
    if dtype == "float32-ieee":
        monkeypatch.setenv(tll.ENV_FP32_PRECISION, "ieee")
        dtype = torch.float32
    x, w, a, b, bias = _make(M, K, N, r, dtype, gen_seed=M + r)
    _check_fwd_bwd(x, w, a, b, bias, 2.0, p, 2**40 + 5, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", _KERNELS)
def test_every_config_gpu(name, few_configs, monkeypatch):
    """Each autotune config of each kernel, forced one at a time, on an uneven bf16 shape with dropout."""
    kernel = getattr(tll, name)
    all_configs = list(tll.SHRINK_CONFIGS if name == "_lora_shrink_kernel" else tll.GEMM_CONFIGS if name == "_lora_gemm_kernel"
                       else tll.DY_CONFIGS if name == "_lora_dy_kernel" else tll.DA_CONFIGS)
    x, w, a, b, bias = _make(300, 520, 392, 24, torch.bfloat16, gen_seed=1)
    for cfg in all_configs:
        monkeypatch.setattr(kernel, "configs", [cfg])
        _check_fwd_bwd(x, w, a, b, bias, 1.5, 0.1, 99, torch.bfloat16)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fp32_ieee_mode(monkeypatch, p):
    monkeypatch.setenv(tll.ENV_FP32_PRECISION, "ieee")
    x, w, a, b, bias = _make(33, 50, 41, 8, torch.float32)
    y, xa = tll.lora_linear_fwd_triton(x, w, a, b, 0.5, bias, p, 3)
    y_ref, xa_ref = ref.lora_linear_fwd_ref(_d(x), _d(w), _d(a), _d(b), 0.5, _d(bias), p, 3)
    assert_close_rel(y, y_ref, TOL[torch.float32], "y")
    assert_close_rel(xa, xa_ref, TOL[torch.float32], "xa")
    dy = torch.randn(33, 41, device=DEV)
    got = tll.lora_linear_bwd_triton(dy, x, xa, w, a, b, 0.5, p, 3, ALL_GRADS)
    exp = ref.lora_linear_bwd_ref(_d(dy), _d(x), xa_ref, _d(w), _d(a), _d(b), 0.5, p, 3, ALL_GRADS)
    for name, g, e in zip(("dx", "dA", "dB", "dW0"), got, exp):
        assert_close_rel(g, e, TOL[torch.float32], name)


def test_bad_precision_env_raises(monkeypatch):
    monkeypatch.setenv(tll.ENV_FP32_PRECISION, "fp64")
    x, w, a, b, _ = _make(4, 16, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="LORA_KERNELS_FP32_PRECISION"):
        tll.lora_linear_fwd_triton(x, w, a, b, 1.0, None, 0.0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(dtype):
    M, K, N, r = 23, 40, 36, 8
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype).to(DEV)

    x = rnd(K, M).t()  # column-major x
    w = (rnd(K, N) * K**-0.5).t()  # column-major weight: [N, K] view with strides (1, N)
    a = (rnd(r, 2 * K) * K**-0.5)[:, ::2]  # strided columns
    b = rnd(r, N).t()
    bias = rnd(2 * N)[::2]
    dy = rnd(N, M).t()
    assert not (x.is_contiguous() or w.is_contiguous() or a.is_contiguous() or b.is_contiguous() or dy.is_contiguous())
    _check_fwd_bwd(x, w, a, b, bias, 1.5, 0.3, 11, dtype, dy=dy)
    # row slice of a bigger batch: dropout rows are rows of the 2-D view
    xs = rnd(2 * M, K)[1::2]
    _check_fwd_bwd(xs, w, a, b, None, 1.5, 0.3, 11, dtype)


def test_m_zero():
    x, w, a, b, bias = _make(0, 24, 20, 4, torch.float32)
    y, xa = tll.lora_linear_fwd_triton(x, w, a, b, 1.0, bias, 0.1, 0)
    assert y.shape == (0, 20) and xa.shape == (0, 4) and xa.dtype == torch.float32
    dy = torch.empty(0, 20, device=DEV)
    dx, da, db, dw = tll.lora_linear_bwd_triton(dy, x, xa, w, a, b, 1.0, 0.1, 0, ALL_GRADS)
    assert dx.shape == (0, 24)
    for g, shape in ((da, (4, 24)), (db, (20, 4)), (dw, (20, 24))):
        assert g.shape == shape and bool((g == 0).all())


@pytest.mark.parametrize(
    "mask",
    [(True, False, False, False), (False, True, False, False), (False, False, True, False), (True, True, True, False), (False, False, False, True)],
)
def test_output_mask(mask):
    x, w, a, b, bias = _make(19, 34, 22, 8, torch.float32)
    _check_fwd_bwd(x, w, a, b, bias, 0.5, 0.2, 5, torch.float32, mask=mask)


def test_lora_fa_launcher_without_x():
    x, w, a, b, _ = _make(21, 36, 30, 8, torch.float16)
    y, xa = tll.lora_linear_fwd_triton(x, w, a, b, 0.5, None, 0.2, 9)
    dy = torch.randn(21, 30).to(torch.float16).to(DEV)
    dx, da, db, dw = tll.lora_linear_bwd_triton(dy, None, xa, w, a, b, 0.5, 0.2, 9, (True, False, True, False))
    assert da is None and dw is None
    _, xa_ref = ref.lora_linear_fwd_ref(_d(x), _d(w), _d(a), _d(b), 0.5, None, 0.2, 9)
    edx, _, edb, _ = ref.lora_linear_bwd_ref(_d(dy), None, xa_ref, _d(w), _d(a), _d(b), 0.5, 0.2, 9, (True, False, True, False))
    assert_close_rel(dx, edx, TOL[torch.float16], "dx")
    assert_close_rel(db, edb, TOL[torch.float16], "dB")
    with pytest.raises(ValueError, match="x was not saved"):
        tll.lora_linear_bwd_triton(dy, None, xa, w, a, b, 0.5, 0.2, 9, (True, True, True, False))


# ----------------------------------------------------------------------------------------------
# Seeded dropout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 12345, 2**31 + 7, 2**40 + 99])
def test_dropout_mask_equals_reference(seed):
    """Recover the kernels' keep-masks exactly: from xa with A = I (forward shrink) and from dx with
    W0 = 0 and a rank-1 dxa·A of ones (backward epilogue)."""
    M, K, p = 45, 48, 0.3
    x = (torch.rand(M, K) + 0.5).to(DEV)  # strictly positive
    keep_ref = ref.dropout_keep_mask(seed, M, K, p).to(DEV)
    # forward: xa = drop(x)·I  ->  xa[m, k] = keep[m, k]·x[m, k]/(1-p)
    eye = torch.eye(K, device=DEV)
    w = torch.zeros(8, K, device=DEV)
    _, xa = tll.lora_linear_fwd_triton(x, w, eye, torch.zeros(8, K, device=DEV), 1.0, None, p, seed)
    assert torch.equal(xa != 0, keep_ref)
    assert_close_rel(xa[keep_ref], x[keep_ref] / (1 - p), TOL["tf32"], "kept values")
    # backward: dx = drop'(1·ones[1, K]) = keep/(1-p)
    N = 8
    dy = torch.full((M, N), 1.0 / N, device=DEV)
    ones_b = torch.ones(N, 1, device=DEV)
    ones_a = torch.ones(1, K, device=DEV)
    xa1 = torch.zeros(M, 1, device=DEV)
    dx, _, _, _ = tll.lora_linear_bwd_triton(dy, None, xa1, w, ones_a, ones_b, 1.0, p, seed, (True, False, False, False))
    assert torch.equal(dx != 0, keep_ref)


def test_dropout_kept_fraction_and_seeds():
    M, K, N, r, p = 160, 96, 16, 4, 0.3
    x = (torch.rand(M, K) + 0.5).to(DEV)
    eye = torch.eye(K, device=DEV)
    _, xa = tll.lora_linear_fwd_triton(x, torch.zeros(N, K, device=DEV), eye, torch.zeros(N, K, device=DEV), 1.0, None, p, 2024)
    kept = (xa != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.02, kept  # n = 15360 draws: std ≈ 0.0037
    x, w, a, b, bias = _make(40, 50, 30, r, torch.float32)
    y1, xa1 = tll.lora_linear_fwd_triton(x, w, a, b, 1.0, bias, p, 77)
    y2, xa2 = tll.lora_linear_fwd_triton(x, w, a, b, 1.0, bias, p, 77)
    y3, xa3 = tll.lora_linear_fwd_triton(x, w, a, b, 1.0, bias, p, 78)
    assert torch.equal(y1, y2) and torch.equal(xa1, xa2)
    assert not torch.equal(xa1, xa3) and not torch.equal(y1, y3)


# ----------------------------------------------------------------------------------------------
# Through the public API with autograd
# ----------------------------------------------------------------------------------------------


def _autograd_case(dtype, p, with_bias, train_weight, shape=(2, 9, 40), N=28, r=8, seed=31):
    K = shape[-1]
    x, w, a, b, bias = _make(shape[0] * shape[1], K, N, r, dtype, bias=with_bias, gen_seed=3)
    x = x.reshape(*shape)
    leaves = dict(x=x, weight=w, lora_a=a, lora_b=b, bias=bias)
    for name, t in leaves.items():
        if t is not None and (name != "weight" or train_weight):
            t.requires_grad_(True)
    y = lora_kernels.lora_linear(x, w, a, b, 0.6, bias, dropout_p=p, seed=seed, backend="triton")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(dtype=dtype).to(DEV)
    y.backward(dy)
    ref_leaves = {n: (None if t is None else _d(t).requires_grad_(t.requires_grad)) for n, t in leaves.items()}
    y_ref = ref.lora_linear_ref(
        ref_leaves["x"], ref_leaves["weight"], ref_leaves["lora_a"], ref_leaves["lora_b"], 0.6, ref_leaves["bias"], p, seed
    )
    y_ref.backward(_d(dy))
    assert y.shape == (*shape[:-1], N) and y.dtype == dtype
    assert_close_rel(y, y_ref, _tol(dtype), "y")
    for name, t in leaves.items():
        if t is None or not t.requires_grad:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        assert_close_rel(t.grad, ref_leaves[name].grad, _tol(dtype), f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_autograd_matches_reference(dtype, p):
    _autograd_case(dtype, p, with_bias=True, train_weight=False)


def test_autograd_trains_weight_without_bias():
    _autograd_case(torch.float32, 0.1, with_bias=False, train_weight=True)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_autograd_bf16_gpu(p, few_configs):
    _autograd_case(torch.bfloat16, p, with_bias=True, train_weight=False, shape=(3, 100, 256), N=384, r=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_fa_does_not_save_x(dtype):
    """Frozen A and W0: x is not saved; dx and dB are still right."""
    M, K, N, r, p, seed = 17, 40, 26, 8, 0.2, 5
    x, w, a, b, _ = _make(M, K, N, r, dtype)
    x.requires_grad_(True)
    b.requires_grad_(True)
    saved_ptrs = []

    def pack(t):
        saved_ptrs.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_kernels.lora_linear(x, w, a, b, 0.5, dropout_p=p, seed=seed, backend="triton")
    assert x.data_ptr() not in saved_ptrs
    dy = torch.randn(M, N).to(dtype=dtype).to(DEV)
    y.backward(dy)
    assert a.grad is None and w.grad is None
    _, xa_ref = ref.lora_linear_fwd_ref(_d(x), _d(w), _d(a), _d(b), 0.5, None, p, seed)
    edx, _, edb, _ = ref.lora_linear_bwd_ref(_d(dy), _d(x), xa_ref, _d(w), _d(a), _d(b), 0.5, p, seed, (True, False, True, False))
    assert_close_rel(x.grad, edx, _tol(dtype), "dx")
    assert_close_rel(b.grad, edb, _tol(dtype), "dB")


def test_autograd_m_zero():
    x, w, a, b, bias = _make(0, 24, 20, 4, torch.float32)
    for t in (x, a, b, bias):
        t.requires_grad_(True)
    y = lora_kernels.lora_linear(x, w, a, b, 1.0, bias, backend="triton")
    assert y.shape == (0, 20)
    y.sum().backward()
    assert x.grad.shape == (0, 24)
    for t in (a, b, bias):
        assert t.grad is not None and bool((t.grad == 0).all())


# ----------------------------------------------------------------------------------------------
# GPU only: 64-bit offsets
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
def test_large_mk_int64_offsets(few_configs):
    """M·K > 2^31 elements: row offsets must be computed in int64. Check the last rows against the reference."""
    K, N, r = 4096, 64, 16
    M = (1 << 31) // K + 300
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    a = torch.randn(r, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    b = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
    y, xa = tll.lora_linear_fwd_triton(x, w, a, b, 0.5, None, 0.1, 3)
    tail = slice(M - 300, M)
    # keep-mask of the tail rows only (the full [M, K] int64 hash would need tens of GB)
    seed_h = ref._mix32(torch.tensor(3, dtype=torch.int64, device="cuda"))
    rows = torch.arange(M - 300, M, dtype=torch.int64, device="cuda")
    cols = torch.arange(K, dtype=torch.int64, device="cuda")
    keep = (ref._mix32(ref._mix32(rows + seed_h)[:, None] + cols[None, :]) >> 8) >= ref.dropout_threshold(0.1)
    xt = _d(x[tail])
    xa_ref = (xt * keep / 0.9) @ _d(a).t()
    y_ref = xt @ _d(w).t() + 0.5 * xa_ref @ _d(b).t()
    assert_close_rel(xa[tail], xa_ref, TOL[torch.bfloat16], "xa tail")
    assert_close_rel(y[tail], y_ref, TOL[torch.bfloat16], "y tail")
    del y, xa
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    xa_unused = torch.zeros(M, r, device="cuda")  # dx does not read xa
    dx, _, _, _ = tll.lora_linear_bwd_triton(dy, None, xa_unused, w, a, b, 0.5, 0.1, 3, (True, False, False, False))
    dxa_t = 0.5 * _d(dy[tail]) @ _d(b)
    dx_ref = _d(dy[tail]) @ _d(w) + (dxa_t @ _d(a)) * keep / 0.9
    assert_close_rel(dx[tail], dx_ref, TOL[torch.bfloat16], "dx tail")
