"""DoRA training (public op ``dora_linear``, no dropout) on the CUDA extension: the launchers of
lora_kernels/cuda/dora.py (the extension's shrink / cuBLAS / expand-with-DoRA-epilogue / lora_linear backward
kernels, composed) executed on the CPU by the emulator of tests/cuda_emu/ (see tests/test_cuda_emulated.py: the
very csrc/ sources the GPU build compiles, buffers the kernels must fill NaN-poisoned by the emulated glue), plus
the few GPU-only cases at the end (real CUDA tensors, skipped without a GPU).

Checked against the float64 reference (reference.dora_linear_fwd_ref / _bwd_ref, relative-norm error): fp32, fp16
and bf16; M = 0, 1, 7 and 70 (>= 64 switches the one-adapter shrink / expand to the grouped, 8-tokens-per-block
launch); odd K/N; ranks 1, 16, 40; with and without bias; save_pre True/False; output_mask subsets; the launchers
called directly, through the op dispatch (ops.dora.call_fwd / call_bwd and torch.ops.lora_kernels.dora_linear_*),
opcheck, and through the public API lora_linear(..., magnitude=m, backend="cuda") forward + backward.

The public API refuses CPU tensors for backend="cuda" (resolve_backend: "the CUDA extension needs CUDA tensors"),
so the API tests replace functional.resolve_backend by a stand-in that asks the real why_not("cuda", ...), accepts
only the CPU-device / extension-not-loaded objections (so a missing dispatch row still fails), and returns "cuda";
everything after backend resolution (DoRALinearFunction, the op dispatch, the launchers) is the real code. The
launchers' own torch-allocated buffers (the save_pre y, dy⊙g) are NaN-poisoned through cuda.dora._alloc.

Set LORA_KERNELS_SKIP_EMULATOR=1 to skip the emulated tests.
"""

import pytest
import torch
from conftest import TOL, assert_close_rel, assert_fa_rule, poison_

import lora_kernels as lk
from lora_kernels import _backend
from lora_kernels import functional as F_
from lora_kernels import reference as ref
from lora_kernels.cuda import dora as cuda_dora
from lora_kernels.ops import _registry
from lora_kernels.ops import dora as opd


ops = torch.ops.lora_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALE = 1.5
ALL5 = (True, True, True, True, True)
NAMES5 = ("dx", "dA", "dB", "dm", "dW0")




@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(cuda_dora, "_alloc",
                        lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype, device=device)))


def _inputs(M, K, N, r, dtype, bias=True, seed=0, device="cpu"):
    """x, W0, A, B, bias, dy (float64 values rounded through dtype), g fp32 [N] (≠ 1) and the fp32 norm."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    x = rnd(M, K)
    w = rnd(N, K, scale=K ** -0.5)
    a = rnd(r, K, scale=K ** -0.5)
    b = rnd(N, r, scale=0.5)
    bb = rnd(N) if bias else None
    dy = rnd(M, N)
    g = (0.5 + torch.rand(N, generator=gen, dtype=torch.float64)).to(torch.float32).to(device)
    norm = ref.dora_weight_norm_ref(w, a, b, SCALE).to(torch.float32)
    return x, w, a, b, bb, dy, g, norm


def _expected(x, w, a, b, bb, dy, g, mask=ALL5):
    """The float64 reference with the magnitude m = g·‖W0 + s·B·A‖ (so its g is the launchers' g); dm is then
    Σ dy⊙ypre / ‖·‖ in float64. Returns ((y, xa, ypre), (dx, dA, dB, dm, dW0))."""
    d = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    n64 = ref.dora_weight_norm_ref(d(w), d(a), d(b), SCALE)
    m = d(g) * n64
    y, xa, ypre, _, _ = ref.dora_linear_fwd_ref(d(x), d(w), d(a), d(b), SCALE, m, d(bb))
    grads = ref.dora_linear_bwd_ref(d(dy), d(x), d(w), d(a), d(b), SCALE, m, output_mask=mask)
    return (y, xa, ypre), grads


# ------------------------------------------------------------------------------------------------
# The launchers, called directly
# ------------------------------------------------------------------------------------------------

SHAPES = [(33, 45, 1), (33, 45, 16), (64, 40, 40)]


def check_fwd(dtype, M, K, N, r, device):
    for bias in (True, False):
        x, w, a, b, bb, dy, g, norm = _inputs(M, K, N, r, dtype, bias, seed=M + K + N + r, device=device)
        (y64, xa64, ypre64), _ = _expected(x, w, a, b, bb, dy, g)
        for save_pre in (False, True):
            what = f"{dtype} M={M} r={r} bias={bias} save_pre={save_pre}"
            y, xa, ypre = cuda_dora.dora_linear_fwd_cuda(x, w, a, b, SCALE, bb, g, save_pre)
            assert y.dtype == dtype and y.shape == (M, N) and y.device == x.device, what
            assert xa.dtype == torch.float32 and xa.shape == (M, r), what
            assert_close_rel(y.cpu(), y64, TOL[dtype], f"y {what}")
            assert_close_rel(xa.cpu(), xa64, TOL[torch.float32], f"xa {what}")
            if save_pre:
                assert ypre.dtype == dtype and ypre.shape == (M, N), what
                assert_close_rel(ypre.cpu(), ypre64, TOL[dtype], f"ypre {what}")
            else:
                assert ypre.shape == (0,) and ypre.dtype == dtype and ypre.device == x.device, what


MASKS = [
    ALL5,
    (True, False, False, False, False),  # dx only
    (False, False, False, True, False),  # dm only (A, B and x frozen)
    (False, True, True, True, False),  # the adapter's parameters and the magnitude
    (True, False, True, True, False),  # no dA / dW0: x not saved (passed as None)
    (False, False, False, False, True),  # dW0 only
]


def check_bwd(dtype, M, K, N, r, device):
    x, w, a, b, bb, dy, g, norm = _inputs(M, K, N, r, dtype, True, seed=3 * M + K + r, device=device)
    _, xa, ypre = cuda_dora.dora_linear_fwd_cuda(x, w, a, b, SCALE, bb, g, True)
    _, expected = _expected(x, w, a, b, bb, dy, g)
    likes = (dy, a, b, None, w)
    for mask in MASKS:
        xin = x if (mask[1] or mask[4]) else None
        pin = ypre if mask[3] else None
        got = cuda_dora.dora_linear_bwd_cuda(dy, xin, xa, pin, w, a, b, SCALE, g, norm, mask)
        assert len(got) == 5
        for name, gr, e, want, like in zip(NAMES5, got, expected, mask, likes):
            what = f"{name} {dtype} M={M} r={r} mask={mask}"
            if not want:
                assert gr is None, what
                continue
            assert gr.dtype == (torch.float32 if name == "dm" else like.dtype), what
            assert gr.device == dy.device, what
            if M == 0:
                assert gr.shape == e.shape, what
                assert name == "dx" or torch.count_nonzero(gr) == 0, what
                continue
            assert_close_rel(gr.cpu(), e, TOL[dtype], what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 70])
@pytest.mark.parametrize("K,N,r", SHAPES)
def test_fwd_launcher(emu, dtype, M, K, N, r):
    check_fwd(dtype, M, K, N, r, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 70])
@pytest.mark.parametrize("K,N,r", SHAPES)
def test_bwd_launcher(emu, dtype, M, K, N, r):
    check_bwd(dtype, M, K, N, r, "cpu")


def test_bwd_dm_without_ypre_is_an_error(emu):
    x, w, a, b, bb, dy, g, norm = _inputs(5, 12, 9, 3, torch.float32)
    _, xa, _ = cuda_dora.dora_linear_fwd_cuda(x, w, a, b, SCALE, bb, g, False)
    for ypre in (None, x.new_empty(0)):
        with pytest.raises(ValueError, match="ypre was not saved"):
            cuda_dora.dora_linear_bwd_cuda(dy, x, xa, ypre, w, a, b, SCALE, g, norm, ALL5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [64, 70, 130])
def test_grouped_launch_equals_per_token_launch(emu, dtype, M, monkeypatch):
    """From GROUPED_MIN_TOKENS tokens the one-adapter shrink / expand take a tile table (8 tokens per block): the
    same fp32 arithmetic per element as the per-token launch, so y and xa are bit-identical."""
    x, w, a, b, bb, dy, g, norm = _inputs(M, 40, 37, 16, dtype, True, seed=M)
    y_grp, xa_grp, _ = cuda_dora.dora_linear_fwd_cuda(x, w, a, b, SCALE, bb, g, False)
    monkeypatch.setattr(cuda_dora, "GROUPED_MIN_TOKENS", 10 ** 9)
    y_tok, xa_tok, _ = cuda_dora.dora_linear_fwd_cuda(x, w, a, b, SCALE, bb, g, False)
    assert torch.equal(xa_grp, xa_tok)
    assert torch.equal(y_grp, y_tok)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dm_over_row_chunks(emu, dtype, monkeypatch):
    """dm of 16-bit inputs is summed over fp32 row chunks (3 rows each here, 64 MiB on a GPU)."""
    M, K, N, r = 70, 24, 45, 4
    monkeypatch.setattr(cuda_dora, "_DM_CHUNK_BYTES", 4 * N * 3)
    x, w, a, b, bb, dy, g, norm = _inputs(M, K, N, r, dtype, False, seed=9)
    _, xa, ypre = cuda_dora.dora_linear_fwd_cuda(x, w, a, b, SCALE, bb, g, True)
    _, _, _, dm, _ = cuda_dora.dora_linear_bwd_cuda(dy, None, xa, ypre, w, a, b, SCALE, g, norm,
                                                    (False, False, False, True, False))
    _, expected = _expected(x, w, a, b, bb, dy, g)
    assert_close_rel(dm, expected[3], TOL[dtype], "dm")
    exact = (dy.double() * ypre.double()).sum(0) / norm.double()  # the same rounded ypre: only fp32 sums differ
    assert_close_rel(dm, exact, TOL[torch.float32], "dm vs fp64 sum of the same products")


def test_non_contiguous_inputs(emu):
    """x a strided view, dy a column-major view, W0 / B column-major: the launchers accept any strides."""
    M, K, N, r = 70, 33, 45, 16
    x, w, a, b, bb, dy, g, norm = _inputs(M, K, N, r, torch.float16, True, seed=4)
    wide = torch.zeros(M, 2 * K, dtype=x.dtype)
    wide[:, ::2] = x
    xs = wide[:, ::2]
    dys = dy.t().contiguous().t()
    wt = w.t().contiguous().t()
    bt = b.t().contiguous().t()
    assert not (xs.is_contiguous() or dys.is_contiguous() or wt.is_contiguous() or bt.is_contiguous())
    (y64, _, _), expected = _expected(x, w, a, b, bb, dy, g)
    for save_pre in (False, True):
        y, xa, ypre = cuda_dora.dora_linear_fwd_cuda(xs, wt, a, bt, SCALE, bb, g, save_pre)
        assert_close_rel(y, y64, TOL[torch.float16], f"y save_pre={save_pre}")
    got = cuda_dora.dora_linear_bwd_cuda(dys, xs, xa, ypre, wt, a, bt, SCALE, g, norm, ALL5)
    for name, gr, e in zip(NAMES5, got, expected):
        assert_close_rel(gr, e, TOL[torch.float16], name)


# ------------------------------------------------------------------------------------------------
# The op dispatch: table rows, ops.dora.call_fwd / call_bwd, torch.ops, opcheck
# ------------------------------------------------------------------------------------------------


def test_cuda_implements_dora_linear_but_not_dropout():
    ts = [torch.empty(2, 3)]
    assert "dora_linear" in _backend.implemented_ops("cuda")
    assert "dora_linear_dropout" not in _backend.implemented_ops("cuda")
    assert not any("no kernel" in r for r in _backend.why_not("cuda", "dora_linear", ts))
    assert "cuda has no kernel for dora_linear_dropout" in _backend.why_not("cuda", "dora_linear_dropout", ts)
    assert _registry.launcher("dora_linear_fwd", "cuda") is cuda_dora.dora_linear_fwd_cuda
    assert _registry.launcher("dora_linear_bwd", "cuda") is cuda_dora.dora_linear_bwd_cuda


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [7, 70])
def test_op_dispatch_equals_launchers(emu, dtype, M):
    """call_fwd / call_bwd (eager: the launcher) and the dispatcher (torch.ops.lora_kernels.dora_linear_*: gradients
    not asked for as empty [0] tensors) give the launchers' results bit for bit."""
    x, w, a, b, bb, dy, g, norm = _inputs(M, 33, 45, 16, dtype, True, seed=M + 1)
    for save_pre in (False, True):
        direct = cuda_dora.dora_linear_fwd_cuda(x, w, a, b, SCALE, bb, g, save_pre)
        via_call = opd.call_fwd(x, w, a, b, SCALE, bb, g, 0.0, 0, save_pre, "cuda")
        via_ops = ops.dora_linear_fwd(x, w, a, b, SCALE, bb, g, 0.0, 0, save_pre, "cuda")
        for u, v, t in zip(direct, via_call, via_ops):
            assert torch.equal(u, v) and torch.equal(u, t)
    _, xa, ypre = direct
    for mask in ([True, True, True, True, True], [True, False, False, True, False]):
        direct = cuda_dora.dora_linear_bwd_cuda(dy, x, xa, ypre, w, a, b, SCALE, g, norm, mask)
        via_call = opd.call_bwd(dy, x, xa, ypre, w, a, b, SCALE, g, norm, 0.0, 0, mask, "cuda")
        via_ops = ops.dora_linear_bwd(dy, x, xa, ypre, w, a, b, SCALE, g, norm, 0.0, 0, mask, "cuda")
        for want, u, v, t in zip(mask, direct, via_call, via_ops):
            if want:
                assert torch.equal(u, v) and torch.equal(u, t)
            else:
                assert u is None and v is None and t.shape == (0,)


def test_opcheck_cuda(emu):
    x, w, a, b, bb, dy, g, norm = _inputs(13, 11, 7, 3, torch.float32, True)
    for save_pre in (True, False):
        torch.library.opcheck(ops.dora_linear_fwd.default, (x, w, a, b, 0.5, bb, g, 0.0, 0, save_pre, "cuda"))
    _, xa, ypre = ops.dora_linear_fwd(x, w, a, b, 0.5, bb, g, 0.0, 0, True, "cuda")
    for mask in ([True, True, True, True, False], [False, False, False, True, True]):
        torch.library.opcheck(ops.dora_linear_bwd.default,
                              (dy, x, xa, ypre, w, a, b, 0.5, g, norm, 0.0, 0, mask, "cuda"))


# ------------------------------------------------------------------------------------------------
# The public API: lora_linear(..., magnitude=m, backend="cuda"), forward + backward
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def api_on_emulator(emu, monkeypatch):
    """Let backend="cuda" through for CPU tensors (see the module docstring); counts the cuda launchers' calls and
    records the forward's save_pre."""
    real = F_.resolve_backend

    def resolve(op, *tensors, backend=None):
        if backend == "cuda":
            reasons = _backend.why_not("cuda", op, [t for t in tensors if isinstance(t, torch.Tensor)])
            assert all("needs CUDA tensors" in r or "not loaded" in r for r in reasons), reasons
            return "cuda"
        return real(op, *tensors, backend=backend)

    monkeypatch.setattr(F_, "resolve_backend", resolve)
    calls = {"fwd": [], "bwd": 0}

    def fwd(*args):
        calls["fwd"].append(bool(args[-1]))
        return cuda_dora.dora_linear_fwd_cuda(*args)

    def bwd(*args):
        calls["bwd"] += 1
        return cuda_dora.dora_linear_bwd_cuda(*args)

    monkeypatch.setitem(_registry._resolved, ("dora_linear_fwd", "cuda"), fwd)
    monkeypatch.setitem(_registry._resolved, ("dora_linear_bwd", "cuda"), bwd)
    return calls


def _make_api(M, K, N, r, dtype, bias, seed, device="cpu"):
    x, w, a, b, bb, dy, _, _ = _inputs(M, K, N, r, dtype, bias, seed=seed, device=device)
    gen = torch.Generator().manual_seed(seed + 1)
    m = ref.dora_weight_norm_ref(w.cpu(), a.cpu(), b.cpu(), SCALE) * (0.5 + torch.rand(N, generator=gen, dtype=torch.float64))
    return x, w, a, b, m.to(dtype).to(device), bb, dy


def _grads_api(x, w, a, b, m, bb, dy, backend="cuda", p=0.0, seed=0, train_m=True):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
    ml = m.detach().clone().requires_grad_(train_m)
    bl = bb.detach().clone().requires_grad_(True) if bb is not None else None
    y = lk.lora_linear(leaves[0], w, leaves[1], leaves[2], SCALE, bl, dropout_p=p, seed=seed, backend=backend,
                       magnitude=ml)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves] + [ml.grad] + ([bl.grad] if bl is not None else [])


def _grads_ref(x, w, a, b, m, bb, dy, dtype=torch.float64):
    leaves = [t.detach().cpu().to(dtype).requires_grad_(True) for t in (x, a, b, m)]
    bl = bb.detach().cpu().to(dtype).requires_grad_(True) if bb is not None else None
    y = ref.dora_linear_ref(leaves[0], w.cpu().to(dtype), leaves[1], leaves[2], SCALE, leaves[3], bl)
    y.backward(dy.cpu().to(dtype))
    return y.detach(), [t.grad for t in leaves] + ([bl.grad] if bl is not None else [])


API_NAMES = ("dx", "dA", "dB", "dm", "dbias")


def check_api(dtype, M, bias, K=33, N=45, r=16, device="cpu", shape3d=None):
    x, w, a, b, m, bb, dy = _make_api(M, K, N, r, dtype, bias, seed=M + 7 * bias, device=device)
    if shape3d is not None:
        x, dy = x.reshape(*shape3d, K), dy.reshape(*shape3d, N)
    y, gr = _grads_api(x, w, a, b, m, bb, dy)
    y64, gr64 = _grads_ref(x.reshape(-1, K), w, a, b, m, bb, dy.reshape(-1, N))
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], N)
    assert_close_rel(y.reshape(-1, N).cpu(), y64, tol, "y")
    for name, g, g64 in zip(API_NAMES, gr, gr64):
        assert g is not None and g.dtype == dtype, name
        g = g.reshape(-1, K) if name == "dx" else g
        if M == 0:
            assert torch.count_nonzero(g) == 0 if name != "dx" else g.shape == (0, K)
            continue
        assert_close_rel(g.cpu(), g64, tol, f"{name} {dtype} M={M} bias={bias}")
    if dtype in (torch.float16, torch.bfloat16) and M > 0:
        # FlashAttention's rule, as tests/test_dora.py: at most twice the error of PEFT's formula in dtype
        y_lp, gr_lp = _grads_ref(x.reshape(-1, K), w, a, b, m, bb, dy.reshape(-1, N), dtype=dtype)
        assert_fa_rule(y.reshape(-1, N).cpu(), y64, y_lp, "y", atol=2e-3)
        assert_fa_rule(gr[0].reshape(-1, K).cpu(), gr64[0], gr_lp[0], "dx", atol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 70])
@pytest.mark.parametrize("bias", [True, False])
def test_api_forward_backward(api_on_emulator, dtype, M, bias):
    check_api(dtype, M, bias)
    assert api_on_emulator["fwd"] == [True], "the magnitude trains: the forward saves ypre"
    assert api_on_emulator["bwd"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_api_3d_input_and_odd_rank(api_on_emulator, dtype):
    check_api(dtype, 70, True, K=29, N=23, r=5, shape3d=(7, 10))
    assert api_on_emulator["fwd"] == [True] and api_on_emulator["bwd"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_api_frozen_magnitude(api_on_emulator, dtype):
    """m frozen: the forward does not save ypre (save_pre False: the fused-epilogue path) and dm is not asked."""
    M, K, N, r = 70, 33, 45, 16
    x, w, a, b, m, bb, dy = _make_api(M, K, N, r, dtype, True, seed=21)
    y, gr = _grads_api(x, w, a, b, m, bb, dy, train_m=False)
    assert api_on_emulator["fwd"] == [False] and api_on_emulator["bwd"] == 1
    y64, gr64 = _grads_ref(x, w, a, b, m, bb, dy)
    assert_close_rel(y, y64, TOL[dtype], "y")
    assert gr[3] is None
    for name, g, g64 in zip(API_NAMES, gr, gr64):
        if name != "dm":
            assert_close_rel(g, g64, TOL[dtype], name)


def test_api_dropout_runs_the_torch_backend_with_a_warning(api_on_emulator, monkeypatch):
    """DoRA with dropout has no CUDA launcher: the API warns (quoting why_not) and runs the torch backend."""
    monkeypatch.setattr(F_, "_dora_warned", set())
    x, w, a, b, m, bb, dy = _make_api(20, 33, 45, 16, torch.float32, True, seed=5)
    with pytest.warns(RuntimeWarning, match="cuda has no kernel for dora_linear_dropout"):
        y, gr = _grads_api(x, w, a, b, m, bb, dy, p=0.1, seed=3)
    assert api_on_emulator["fwd"] == [] and api_on_emulator["bwd"] == 0
    y_t, gr_t = _grads_api(x, w, a, b, m, bb, dy, backend="torch", p=0.1, seed=3)
    assert torch.equal(y, y_t)
    for g, gt in zip(gr, gr_t):
        assert torch.equal(g, gt)


# ------------------------------------------------------------------------------------------------
# GPU only: real CUDA tensors through the GPU build of the extension
# ------------------------------------------------------------------------------------------------




@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [7, 300])
def test_gpu_launchers(ext, dtype, M):
    check_fwd(dtype, M, 64, 96, 16, "cuda")
    check_bwd(dtype, M, 64, 96, 16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_api_forward_backward(ext, dtype):
    check_api(dtype, 300, True, K=64, N=96, r=16, device="cuda", shape3d=(3, 100))
