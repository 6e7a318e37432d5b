"""DoRA with dropout on the Triton backend (public op ``dora_linear_dropout``; launchers in triton/dora.py) on the CPU
interpreter (fp32/fp16), launcher outputs poisoned with NaN before the kernels write them.

Oracles: autograd through ``reference.dora_linear_ref`` in float64 (y and every gradient: x, A, B, m, bias, W0), the
torch backend (same seed ⇒ same mask: outputs and gradients close, and with identity weights bit for bit), and
``reference.dropout_keep_mask`` (the mask the kernels regenerate, read back exactly through identity weights)."""

import warnings

import pytest
import torch

from conftest import TOL, assert_close_rel, assert_fa_rule, poison_
import lora_kernels
from lora_kernels import reference as ref
from test_dora import SCALE as _DORA_SCALE, _make  # x, W0, A, B, m (g ≠ 1), bias, dy


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    from lora_kernels.triton import lora_linear as tll

    monkeypatch.setattr(tll, "_alloc", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype, device=device)))
    monkeypatch.delenv(tll.ENV_FP32_PRECISION, raising=False)


SCALE = 1.5
assert SCALE == _DORA_SCALE  # _make draws m from the norm at this scale


def _run(x, w, a, b, m, bias, dy, p, seed, backend, *, train_m=True, train_w=False, train_x=True, train_ab=True,
         x_view=None, dtype=None):
    """y and the gradients [x, A, B, m, bias, W0] (None where not trained) of one lora_linear(..., magnitude=m) step;
    ``dtype``: run the float64 reference (autograd through dora_linear_ref) in that dtype instead of the API."""
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach().clone())
    xl, al, bl_, ml, wl = (cast(t) for t in (x, a, b, m, w))
    xl.requires_grad_(train_x)
    al.requires_grad_(train_ab)
    bl_.requires_grad_(train_ab)
    ml.requires_grad_(train_m)
    wl.requires_grad_(train_w)
    biasl = cast(bias).requires_grad_(True) if bias is not None else None
    xin = x_view(xl) if x_view is not None else xl
    if dtype is not None:
        y = ref.dora_linear_ref(xin, wl, al, bl_, SCALE, ml, biasl, p, seed)
    else:
        y = lora_kernels.lora_linear(xin, wl, al, bl_, SCALE, biasl, dropout_p=p, seed=seed, backend=backend,
                                     magnitude=ml)
    y.backward(dy.to(y.dtype).reshape(y.shape))
    leaves = (xl, al, bl_, ml, biasl, wl)
    return y.detach(), [t.grad if (t is not None and t.requires_grad) else None for t in leaves]


NAMES = ("dx", "dA", "dB", "dm", "dbias", "dW0")

# (M, K, N, r, bias, train_m): odd K/N; ranks 1, 8, 16 take the fused shrink (r <= 32), 40 the shrink kernel and two
# rank chunks of the dx epilogue (the interpreter's rank tile is 32)
CASES = [
    (0, 37, 29, 8, True, True),
    (1, 37, 29, 1, False, True),
    (7, 37, 29, 16, True, False),
    (33, 37, 29, 8, True, True),
    (33, 37, 29, 16, False, True),
    (20, 24, 19, 40, True, True),
]


def _case_id(c):
    return f"M{c[0]}-K{c[1]}-N{c[2]}-r{c[3]}-{'bias' if c[4] else 'nobias'}-{'m' if c[5] else 'mfrozen'}"


def _check_vs_oracles(dtype, case, p, seed=11, **kw):
    M, K, N, r, has_bias, train_m = case
    x, w, a, b, m, bias, dy = _make(M, K, N, r, dtype, seed=M + K + N + r, bias=has_bias)
    y, gr = _run(x, w, a, b, m, bias, dy, p, seed, "triton", train_m=train_m, **kw)
    y64, gr64 = _run(x, w, a, b, m, bias, dy, p, seed, None, train_m=train_m, dtype=torch.float64, **kw)
    yt, grt = _run(x, w, a, b, m, bias, dy, p, seed, "torch", train_m=train_m, **kw)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == y64.shape
    assert_close_rel(y, y64, tol, "y")
    assert_close_rel(y, yt, 2 * tol, "y vs torch backend")
    for name, g, g64, gt in zip(NAMES, gr, gr64, grt):
        assert (g is None) == (g64 is None) == (gt is None), name
        if g is None:
            continue
        assert g.dtype == dtype, name
        if M == 0:
            assert g.shape == (0, K) if name == "dx" else torch.count_nonzero(g) == 0, name
            continue
        assert_close_rel(g, g64, tol, name)
        assert_close_rel(g, gt, 2 * tol, f"{name} vs torch backend")
    if dtype == torch.float16 and M > 0:
        # FlashAttention's rule: no more than twice the error of PEFT's formula run by plain torch in fp16
        y_lp, gr_lp = _run(x, w, a, b, m, bias, dy, p, seed, None, train_m=train_m, dtype=dtype, **kw)
        assert_fa_rule(y, y64, y_lp, "y", atol=2e-3)
        assert_fa_rule(gr[0], gr64[0], gr_lp[0], "dx", atol=2e-3)
    return gr


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_triton_vs_float64_and_torch_backend(case, dtype, p):
    _check_vs_oracles(dtype, case, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_grad_when_it_requires_grad(dtype):
    """dW0 = dyᵀ·x + (dy⊙(g−1))ᵀ·drop(x) (W0 trainable; the norm stays a constant, as in PEFT)."""
    gr = _check_vs_oracles(dtype, (13, 37, 29, 8, True, True), 0.3, train_w=True)
    assert gr[5] is not None


def test_non_contiguous_x():
    """x a strided view (every other column of a wider tensor), differentiable."""

    def view(xl):
        wide = torch.zeros(xl.shape[0], 2 * xl.shape[1], dtype=xl.dtype)
        wide = wide.index_copy(1, torch.arange(0, 2 * xl.shape[1], 2), xl)
        v = wide[:, ::2]
        assert not v.is_contiguous()
        return v

    _check_vs_oracles(torch.float32, (21, 19, 13, 3, True, True), 0.2, x_view=view)


def test_3d_x_masks_the_flattened_rows():
    """[B, T, K] input: the mask is over the rows of x flattened to 2-D, so y and dx equal the 2-D call's."""
    x, w, a, b, m, bias, dy = _make(12, 10, 9, 2, torch.float32)
    y2, gr2 = _run(x, w, a, b, m, bias, dy, 0.3, 4, "triton")
    y3, gr3 = _run(x, w, a, b, m, bias, dy, 0.3, 4, "triton", x_view=lambda t: t.reshape(3, 4, 10))
    assert y3.shape == (3, 4, 9) and torch.equal(y3.reshape(12, 9), y2)
    for name, u, v in zip(NAMES, gr2, gr3):
        assert (u is None) == (v is None), name
        if u is not None:
            assert torch.equal(u, v), name
    y64, _ = _run(x, w, a, b, m, bias, dy, 0.3, 4, None, dtype=torch.float64, x_view=lambda t: t.reshape(3, 4, 10))
    assert_close_rel(y3, y64, TOL[torch.float32], "y 3-D")


@pytest.mark.parametrize("frozen", ["only_m", "only_x", "only_ab"])
def test_partial_gradients(frozen):
    """Every output_mask path: only m trains (the standalone dm kernel, the dy kernel does not run), only x (dx
    without dA, dB, dm), only A and B (no dx GEMM)."""
    kw = dict(only_m=dict(train_x=False, train_ab=False, train_m=True),
              only_x=dict(train_x=True, train_ab=False, train_m=False),
              only_ab=dict(train_x=False, train_ab=True, train_m=False))[frozen]
    M, K, N, r = 17, 23, 15, 4
    x, w, a, b, m, bias, dy = _make(M, K, N, r, torch.float32, bias=False)
    _, gr = _run(x, w, a, b, m, bias, dy, 0.25, 9, "triton", **kw)
    _, gr64 = _run(x, w, a, b, m, bias, dy, 0.25, 9, None, dtype=torch.float64, **kw)
    for name, g, g64 in zip(NAMES, gr, gr64):
        assert (g is None) == (g64 is None), name
        if g is not None:
            assert_close_rel(g, g64, TOL[torch.float32], name)


def test_seed_as_tensor_equals_seed_as_int():
    x, w, a, b, m, bias, dy = _make(9, 16, 11, 4, torch.float32)
    y_i, gr_i = _run(x, w, a, b, m, bias, dy, 0.4, 123, "triton")
    y_t, gr_t = _run(x, w, a, b, m, bias, dy, 0.4, torch.tensor(123), "triton")
    assert torch.equal(y_i, y_t)
    for name, u, v in zip(NAMES, gr_i, gr_t):
        if u is not None:
            assert torch.equal(u, v), name
    y_o, _ = _run(x, w, a, b, m, bias, dy, 0.4, 124, "triton")
    assert not torch.equal(y_i, y_o)  # the seed matters


# ----------------------------------------------------------------------------------------------
# The mask, bit for bit: identity weights expose it exactly
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K", [16, 40])  # r = K: 16 the fused shrink, 40 the shrink kernel (r > 32)
@pytest.mark.parametrize("seed", [0, 12345, 2**33 + 5])
def test_masks_bit_for_bit(dtype, K, seed):
    """W0 = A = I, B = 0, g = 2: xa = ypre = drop(x) exactly (the shrink's mask and the second base GEMM's), and
    dx = dy + keep⊙dy/(1−p) (the dx epilogue's mask): each equals reference.dropout_keep_mask, and the Triton and
    torch backends return identical tensors."""
    ops = torch.ops.lora_kernels
    M, p = 33, 0.5  # 1/(1−p) = 2: exact in every dtype
    gen = torch.Generator().manual_seed(seed % 1000)
    x = (torch.rand(M, K, generator=gen) + 0.5).to(dtype)  # no zeros
    dy = (torch.rand(M, K, generator=gen) + 0.5).to(dtype)
    eye = torch.eye(K, dtype=dtype)
    b = torch.zeros(K, K, dtype=dtype)
    g = torch.full((K,), 2.0)
    norm = torch.ones(K)
    keep = ref.dropout_keep_mask(seed, M, K, p)
    out = {}
    for be in ("triton", "torch"):
        y, xa, ypre = ops.dora_linear_fwd(x, eye, eye, b, SCALE, None, g, p, seed, True, be)
        dx, _, _, _, _ = ops.dora_linear_bwd(dy, x, xa, ypre, eye, eye, b, SCALE, g, norm, p, seed,
                                             [True, False, False, False, False], be)
        out[be] = (y, xa, ypre, dx)
        assert torch.equal(xa != 0, keep), f"{be}: shrink mask"
        assert torch.equal(ypre != 0, keep), f"{be}: second base GEMM mask"
        assert torch.equal(dx != dy, keep), f"{be}: dx mask"
        assert torch.equal(ypre, torch.where(keep, 2 * x, torch.zeros_like(x))), be
    for name, u, v in zip(("y", "xa", "ypre", "dx"), out["triton"], out["torch"]):
        assert torch.equal(u.to(v.dtype), v), name


# ----------------------------------------------------------------------------------------------
# The op: dispatch, opcheck
# ----------------------------------------------------------------------------------------------


def test_api_keeps_triton_and_is_quiet():
    from lora_kernels._backend import why_not
    from lora_kernels import functional as F

    x, w, a, b, m, bias, dy = _make(5, 6, 7, 2, torch.float32)
    assert why_not("triton", "dora_linear_dropout", [x, w, a, b, bias]) == []
    assert F._dora_backend(x, w, a, b, bias, 0.2, "triton") == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_kernels.lora_linear(x, w, a, b, SCALE, bias, magnitude=m, backend="triton", dropout_p=0.2, seed=1)


def test_opcheck_with_dropout():
    ops = torch.ops.lora_kernels
    x, w, a, b, m, bias, dy = _make(13, 11, 7, 3, torch.float32)
    g = torch.rand(7) + 0.5
    norm = torch.rand(7) + 1.0
    for save_pre in (True, False):
        torch.library.opcheck(ops.dora_linear_fwd.default, (x, w, a, b, 0.5, bias, g, 0.2, 4, save_pre, "triton"))
    torch.library.opcheck(ops.dora_linear_fwd.default, (x, w, a, b, 0.5, bias, g, 0.2, 0, True, "triton"),
                          {"seed_tensor": torch.tensor(4)})
    _, xa, ypre = ops.dora_linear_fwd(x, w, a, b, 0.5, bias, g, 0.2, 4, True, "triton")
    for mask in ([True, True, False, True, True], [True, True, True, True, False], [False, False, False, True, False]):
        torch.library.opcheck(ops.dora_linear_bwd.default,
                              (dy, x, xa, ypre, w, a, b, 0.5, g, norm, 0.2, 4, mask, "triton"))


# ----------------------------------------------------------------------------------------------
# Byte traffic (interpreter, GPU launch configs; tests/traffic.py)
# ----------------------------------------------------------------------------------------------


def test_triton_traffic():
    """fp16, M=256, K=N=512, r=16, p=0.1, the first GPU config of every kernel. Forward: every operand once (x and W0
    read once by the one GEMM launch: uniq/floor 1.00; plain LoRA with dropout, which keeps a separate shrink: 1.24).
    Backward: dy read twice (the dy kernel, which also forms dm from ypre, and the dx GEMM), x, W0 and ypre once
    (measured uniq/floor 1.28; plain LoRA with dropout: 1.34)."""
    import traffic as T
    from lora_kernels.triton import dora as tdo
    from lora_kernels.triton import lora_linear as tll

    cfg = {tll._lora_dy_kernel: tll.DY_CONFIGS.gpu[0], tll._lora_da_kernel: tll.DA_CONFIGS.gpu[0],
           tdo._dora_dropout_gemm_kernel: tdo.DROP_GEMM_CONFIGS.gpu[0]}
    c = T.linear_case(256, 512, 512, 16)
    g = torch.rand(512) + 0.5
    norm = torch.rand(512) + 1.0
    with T.gpu_launches(cfg):
        with T.Traffic(x=c["x"], weight=c["w"], lora_a=c["a"], lora_b=c["b"], g=g) as fwd:
            y, xa, yp = tdo.dora_dropout_fwd_triton(c["x"], c["w"], c["a"], c["b"], 0.5, None, g, 0.1, 7, True)
            fwd.operands.update(y=y, xa=xa, ypre=yp)
        with T.Traffic(dy=c["dy"], x=c["x"], xa=xa, ypre=yp, weight=c["w"], lora_a=c["a"], lora_b=c["b"], g=g,
                       norm=norm) as bwd:
            dx, da, db, dm, _ = tdo.dora_dropout_bwd_triton(c["dy"], c["x"], xa, yp, c["w"], c["a"], c["b"], 0.5, g,
                                                            norm, 0.1, 7, (True, True, True, True, False))
            bwd.operands.update(dx=dx, da=da, db=db, dm=dm)
    for name in ("x", "weight", "lora_a", "lora_b", "y", "xa", "ypre"):
        assert fwd.stats[name].uniq == fwd.stats[name].nbytes, fwd.table()
    assert fwd.ratios()[1] <= 1.0001, fwd.table()
    dy_bytes = c["dy"].numel() * c["dy"].element_size()
    assert bwd.stats["dy"].uniq == 2 * dy_bytes, bwd.table()
    for name in ("x", "weight", "ypre"):
        assert bwd.stats[name].uniq == bwd.stats[name].nbytes, bwd.table()
    assert bwd.ratios()[1] <= 1.29, bwd.table()  # measured 1.28
