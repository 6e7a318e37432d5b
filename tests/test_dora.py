"""DoRA training (lora_linear(..., magnitude=m), LoRALinear(use_dora=True), inject_lora(use_dora=True), peft.patch
of PEFT DoRA layers) against the float64 reference and against PEFT 0.21's own DoRA.

Backends: torch (fp64/fp32/fp16/bf16) and Triton on the CPU interpreter (fp32/fp16; launcher outputs poisoned with
NaN before the kernels write them). Also: the reference's explicit backward vs autograd, saved-tensor bytes (no N×K,
ypre only when the magnitude trains), per-op allocations (no N×K temporary in forward or backward), opcheck, and one
test per error message.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from conftest import TOL, assert_close_rel, assert_fa_rule, poison_
import lora_kernels
from lora_kernels import reference as ref
from lora_kernels._checks import LoRAInputError
from lora_kernels.modules import LoRALinear, inject_lora, mark_only_lora_as_trainable


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    from lora_kernels.triton import lora_linear as tll

    monkeypatch.setattr(tll, "_alloc", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype, device=device)))
    monkeypatch.delenv(tll.ENV_FP32_PRECISION, raising=False)


def _make(M, K, N, r, dtype, seed=0, bias=True):
    """x, W0, A, B (non-zero), m (≠ the norm: g ≠ 1), bias, dy; float64 values rounded through dtype."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = rnd(M, K)
    w = rnd(N, K, scale=K ** -0.5)
    a = rnd(r, K, scale=K ** -0.5)
    b = rnd(N, r, scale=0.5)
    m = (ref.dora_weight_norm_ref(w, a, b, 1.5) * (0.5 + torch.rand(N, generator=g, dtype=torch.float64))).to(dtype)
    bias = rnd(N) if bias else None
    dy = rnd(M, N)
    return x, w, a, b, m, bias, dy


SCALE = 1.5
CASES = [(0, 16, 24, 4), (1, 33, 17, 1), (37, 29, 23, 5), (20, 48, 40, 64)]


def _grads_api(x, w, a, b, m, bias, dy, p, seed, backend, noncontig=False):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b, m)]
    bl = bias.detach().clone().requires_grad_(True) if bias is not None else None
    xin = leaves[0]
    if noncontig:  # x a strided view (every other column of a wider tensor), differentiable
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        wide = wide.index_copy(1, torch.arange(0, 2 * x.shape[1], 2), leaves[0])
        xin = wide[:, ::2]
        assert not xin.is_contiguous()
    y = lora_kernels.lora_linear(xin, w, leaves[1], leaves[2], SCALE, bl, dropout_p=p, seed=seed, backend=backend,
                                 magnitude=leaves[3])
    y.backward(dy)
    grads = [t.grad for t in leaves] + ([bl.grad] if bl is not None else [])
    return y.detach(), grads


def _grads_ref(x, w, a, b, m, bias, dy, p, seed, dtype=torch.float64):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, a, b, m)]
    bl = bias.detach().to(dtype).requires_grad_(True) if bias is not None else None
    y = ref.dora_linear_ref(leaves[0], w.to(dtype), leaves[1], leaves[2], SCALE, leaves[3], bl, p, seed)
    y.backward(dy.to(dtype))
    return y.detach(), [t.grad for t in leaves] + ([bl.grad] if bl is not None else [])


NAMES = ("dx", "dA", "dB", "dm", "dbias")


def _check(dtype, backend, case, p, noncontig=False, seed=11):
    M, K, N, r = case
    x, w, a, b, m, bias, dy = _make(M, K, N, r, dtype, seed=sum(case))
    y, gr = _grads_api(x, w, a, b, m, bias, dy, p, seed, backend, noncontig)
    y64, gr64 = _grads_ref(x, w, a, b, m, bias, dy, p, seed)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close_rel(y, y64, tol, "y")
    for name, g, g64 in zip(NAMES, gr, gr64):
        assert g is not None, name
        assert g.dtype == dtype, name
        if M == 0:
            assert torch.count_nonzero(g) == 0 if name != "dx" else g.shape == (0, K)
            continue
        assert_close_rel(g, g64, tol, name)
    if dtype in (torch.float16, torch.bfloat16) and M > 0:
        # FlashAttention's rule: no more than twice the error of PEFT's formula run by plain torch in dtype
        y_lp, gr_lp = _grads_ref(x, w, a, b, m, bias, dy, p, seed, dtype=dtype)
        assert_fa_rule(y, y64, y_lp, "y", atol=2e-3)
        assert_fa_rule(gr[0], gr64[0], gr_lp[0], "dx", atol=2e-3)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_torch_backend_vs_float64(case, dtype, p):
    _check(dtype, "torch", case, p)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_vs_float64(case, dtype):
    _check(dtype, "triton", case, 0.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_x_and_3d(backend):
    _check(torch.float32, backend, (21, 19, 13, 3), 0.0, noncontig=True)
    x, w, a, b, m, bias, dy = _make(12, 10, 9, 2, torch.float32)
    y3 = lora_kernels.lora_linear(x.reshape(3, 4, 10), w, a, b, SCALE, bias, magnitude=m, backend=backend)
    y2 = lora_kernels.lora_linear(x, w, a, b, SCALE, bias, magnitude=m, backend=backend)
    assert y3.shape == (3, 4, 9) and torch.equal(y3.reshape(12, 9), y2)


def test_dropout_on_triton_runs_the_triton_backend_without_a_warning():
    """dora_linear_dropout has Triton launchers (triton/dora.py): why_not is empty, the API keeps Triton, no warning,
    and the result matches the torch backend (same seed, same mask; tests/test_dora_dropout_triton.py in depth)."""
    assert lora_kernels.ops.implements("dora_linear", "triton")
    assert lora_kernels.ops.implements("dora_linear_dropout", "triton")
    from lora_kernels._backend import why_not

    x, w, a, b, m, bias, dy = _make(9, 8, 7, 2, torch.float32)
    assert why_not("triton", "dora_linear_dropout", [x, w]) == []
    from lora_kernels import functional as F
    from lora_kernels.ops import _registry
    from lora_kernels.triton import dora as tdo

    assert F._dora_backend(x, w, a, b, bias, 0.1, "triton") == "triton"
    calls = []
    orig = tdo.dora_dropout_fwd_triton

    def spy(*args, **kw):
        calls.append(1)
        return orig(*args, **kw)

    F._dora_warned.discard("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(_registry._resolved, ("dora_dropout_fwd", "triton"), spy)
            y_t = lora_kernels.lora_linear(x, w, a, b, SCALE, bias, dropout_p=0.1, seed=3, magnitude=m,
                                           backend="triton")
    assert calls, "the Triton dropout launcher did not run"
    assert "triton" not in F._dora_warned
    y_ref = lora_kernels.lora_linear(x, w, a, b, SCALE, bias, dropout_p=0.1, seed=3, magnitude=m, backend="torch")
    assert_close_rel(y_t, y_ref, TOL[torch.float32], "y vs torch backend")


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_reference_backward_is_autograd_of_the_forward(p):
    """dora_linear_bwd_ref's closed forms (and dora_linear_fwd_ref) equal autograd through dora_linear_ref."""
    x, w, a, b, m, bias, dy = _make(17, 13, 11, 3, torch.float64)
    w = w.clone().requires_grad_(True)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, m)]
    y = ref.dora_linear_ref(leaves[0], w, leaves[1], leaves[2], SCALE, leaves[3], bias, p, 5)
    y.backward(dy)
    y_f = ref.dora_linear_fwd_ref(x, w.detach(), a, b, SCALE, m, bias, p, 5)[0]
    assert_close_rel(y_f, y.detach(), 1e-13, "fwd_ref")
    out = ref.dora_linear_bwd_ref(dy, x, w.detach(), a, b, SCALE, m, p, 5, (True,) * 5)
    for name, o, g in zip(("dx", "dA", "dB", "dm", "dW0"), out, [t.grad for t in leaves] + [w.grad]):
        assert_close_rel(o, g, 1e-12, name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_only_the_magnitude_trains(backend):
    """x, A, B frozen: only dm (on Triton the standalone dm kernel; with any other grad the dy kernel forms it)."""
    x, w, a, b, m, bias, dy = _make(19, 12, 9, 3, torch.float32)
    ml = m.clone().requires_grad_(True)
    lora_kernels.lora_linear(x, w, a, b, SCALE, bias, magnitude=ml, backend=backend).backward(dy)
    m64 = m.double().requires_grad_(True)
    ref.dora_linear_ref(x.double(), w.double(), a.double(), b.double(), SCALE, m64, bias.double()).backward(dy.double())
    assert_close_rel(ml.grad, m64.grad, TOL[torch.float32], "dm")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_weight_grad_when_asked(backend):
    """dW0 flows when the base weight requires grad (the norm stays a constant, as in PEFT)."""
    x, w, a, b, m, bias, dy = _make(10, 12, 9, 3, torch.float32)
    wl = w.clone().requires_grad_(True)
    lora_kernels.lora_linear(x, wl, a, b, SCALE, bias, magnitude=m, backend=backend).backward(dy)
    w64 = w.double().requires_grad_(True)
    ref.dora_linear_ref(x.double(), w64, a.double(), b.double(), SCALE, m.double(), bias.double()).backward(dy.double())
    assert_close_rel(wl.grad, w64.grad, TOL[torch.float32], "dW0")


# ----------------------------------------------------------------------------------------------
# Memory: saved tensors and temporaries
# ----------------------------------------------------------------------------------------------


def _saved_bytes(fn, params):
    """Bytes of the tensors autograd saves during fn() that are not one of ``params`` (saved by reference)."""
    ptrs = {t.untyped_storage().data_ptr() for t in params}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in ptrs:
            saved.append((tuple(t.shape), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_saved_tensors_plain_lora_plus_o_n(backend):
    """Saved for backward: plain LoRA's tensors + g and the norm (2·N·4 bytes); ypre [M, N] only when m trains;
    nothing N×K."""
    M, K, N, r = 16, 64, 48, 4
    x, w, a, b, m, bias, dy = _make(M, K, N, r, torch.float32)
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    params = [x, w, a, b, m, bias]
    lora = _saved_bytes(lambda: lora_kernels.lora_linear(x, w, a, b, SCALE, bias, backend=backend), params)
    m.requires_grad_(False)
    frozen_m = _saved_bytes(lambda: lora_kernels.lora_linear(x, w, a, b, SCALE, bias, magnitude=m, backend=backend),
                            params)
    m.requires_grad_(True)
    train_m = _saved_bytes(lambda: lora_kernels.lora_linear(x, w, a, b, SCALE, bias, magnitude=m, backend=backend),
                           params)
    total = lambda s: sum(n for _, n in s)  # noqa: E731
    assert total(frozen_m) - total(lora) == 2 * N * 4
    assert total(train_m) - total(frozen_m) == M * N * 4
    assert (M, N) in [sh for sh, _ in train_m] and (M, N) not in [sh for sh, _ in frozen_m]
    for sh, _ in lora + frozen_m + train_m:
        assert sh != (N, K) and sh != (K, N)


def _big_allocs(fn, nbytes):
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up (lazy imports, cached zeros)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.cpu_memory_usage >= nbytes})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_no_nk_temporary_forward_or_backward(dtype, p, monkeypatch):
    """No op of a DoRA forward + backward allocates N×K elements (the torch profiler's per-op CPU memory), while
    PEFT's formula (ΔW = B·A, ‖W0 + s·ΔW‖) does: the check sees such a temporary. For 16-bit weights the norm upcasts
    row blocks of at most ROW_BLOCK_BYTES (64 MiB on real models); here it is set below N×K."""
    import lora_kernels.dora as dora

    M, K, N, r = 8, 512, 384, 4
    monkeypatch.setattr(dora, "ROW_BLOCK_BYTES", 64 * 1024)
    x, w, a, b, m, bias, dy = _make(M, K, N, r, dtype)
    for t in (x, a, b, m):
        t.requires_grad_(True)
    nk = N * K * dtype.itemsize

    def step():
        y = lora_kernels.lora_linear(x, w, a, b, SCALE, bias, dropout_p=p, seed=1, magnitude=m, backend="torch")
        y.backward(dy)

    assert _big_allocs(step, nk) == []

    def peft_formula():
        lw = b @ a
        torch.linalg.norm(w + SCALE * lw, dim=1)

    assert _big_allocs(peft_formula, nk)  # the check can fail


# ----------------------------------------------------------------------------------------------
# Ops: opcheck, dispatcher vs direct calls
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    ops = torch.ops.lora_kernels
    x, w, a, b, m, bias, dy = _make(13, 11, 7, 3, torch.float32)
    g = torch.rand(7) + 0.5
    norm = torch.rand(7) + 1.0
    for save_pre in (True, False):
        torch.library.opcheck(ops.dora_linear_fwd.default, (x, w, a, b, 0.5, bias, g, 0.0, 0, save_pre, backend))
    y, xa, ypre = ops.dora_linear_fwd(x, w, a, b, 0.5, bias, g, 0.0, 0, True, backend)
    torch.library.opcheck(ops.dora_linear_bwd.default,
                          (dy, x, xa, ypre, w, a, b, 0.5, g, norm, 0.0, 0, [True, True, True, True, False], backend))
    if backend == "torch":
        torch.library.opcheck(ops.dora_linear_fwd.default, (x, w, a, b, 0.5, bias, g, 0.2, 4, True, backend))
        _, xa, ypre = ops.dora_linear_fwd(x, w, a, b, 0.5, bias, g, 0.2, 4, True, backend)
        torch.library.opcheck(ops.dora_linear_bwd.default,
                              (dy, x, xa, ypre, w, a, b, 0.5, g, norm, 0.2, 4, [True, True, False, True, True], backend))


def test_dispatcher_and_direct_calls_agree():
    ops = torch.ops.lora_kernels
    from lora_kernels.ops import dora as opd

    x, w, a, b, m, bias, dy = _make(9, 12, 10, 4, torch.float32)
    g = torch.rand(10) + 0.5
    via = ops.dora_linear_fwd(x, w, a, b, 0.5, bias, g, 0.0, 0, True, "torch")
    direct = opd.call_fwd(x, w, a, b, 0.5, bias, g, 0.0, 0, True, "torch")
    for u, v in zip(via, direct):
        assert torch.equal(u, v)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (lambda m: m[:-1], r"magnitude must be \[N\] = \[7\]"),
    (lambda m: m[None], r"magnitude must be \[N\]"),
    (lambda m: m.to(torch.int32), "magnitude must have a floating dtype"),
    (lambda m: m.to("meta"), "magnitude is on meta but x is on cpu"),
    (lambda m: m.clone().index_fill_(0, torch.tensor([2]), float("nan")), r"magnitude has 1 non-finite"),
    (lambda m: m.clone().index_fill_(0, torch.tensor([0, 5]), float("inf")), r"magnitude has 2 non-finite"),
    (lambda m: m.tolist(), "magnitude must be a torch.Tensor"),
])
def test_magnitude_errors(bad, match):
    x, w, a, b, m, bias, dy = _make(5, 6, 7, 2, torch.float32)
    with pytest.raises(LoRAInputError, match=match):
        lora_kernels.lora_linear(x, w, a, b, SCALE, bias, magnitude=bad(m), backend="torch")


def test_other_inputs_still_checked_with_magnitude():
    x, w, a, b, m, bias, dy = _make(5, 6, 7, 2, torch.float32)
    with pytest.raises(LoRAInputError, match="lora_b"):
        lora_kernels.lora_linear(x, w, a, b[:6], SCALE, bias, magnitude=m)
    with pytest.raises(LoRAInputError, match="scale"):
        lora_kernels.lora_linear(x, w, a, b, float("inf"), bias, magnitude=m)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


def test_lora_linear_module_dora():
    torch.manual_seed(0)
    base = nn.Linear(20, 14)
    layer = LoRALinear(base, 4, 8, use_dora=True, backend="torch")
    assert "lora_magnitude" in dict(layer.named_parameters()) and "lora_magnitude" in layer.state_dict()
    assert "_dora_weight_sq" not in layer.state_dict()
    assert_close_rel(layer.lora_magnitude, base.weight.double().norm(dim=1), 1e-6, "m init = ‖W0‖")
    x = torch.randn(6, 20)
    assert_close_rel(layer(x), base(x), 1e-6, "fresh layer = base")
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(torch.rand(14) + 0.5)
    y = layer(x)
    y_f = lora_kernels.lora_linear(x, base.weight, layer.lora_A, layer.lora_B, layer.scale, base.bias,
                                   magnitude=layer.lora_magnitude, backend="torch")
    assert torch.equal(y, y_f)
    # the cached ‖W0‖² follows a change of W0 (as a merge would make)
    with torch.no_grad():
        base.weight.mul_(1.5)
    y2 = layer(x)
    y2_f = lora_kernels.lora_linear(x, base.weight, layer.lora_A, layer.lora_B, layer.scale, base.bias,
                                    magnitude=layer.lora_magnitude, backend="torch")
    assert torch.equal(y2, y2_f) and not torch.equal(y2, y)
    y2.sum().backward()
    assert layer.lora_magnitude.grad is not None and layer.lora_A.grad is not None and base.weight.grad is None


def test_torch_compile_equals_eager():
    """A DoRA layer's training step under torch.compile (aot_eager: the ops' fakes and the autograd function traced)
    gives eager's output and gradients bit for bit. Not fullgraph: the row norm's cancellation guard
    (``lora_kernels.dora``: ``if bad.numel():``) is a data-dependent branch, i.e. a graph break."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 17), 4, 8, use_dora=True, backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(torch.rand(17) + 0.5)
    x = torch.randn(5, 24, requires_grad=True)

    def step(f):
        for p in [x, *layer.parameters()]:
            p.grad = None
        y = f(x)
        y.sum().backward()
        return [y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad]

    eager = step(layer)
    torch._dynamo.reset()
    compiled = step(torch.compile(layer, backend="aot_eager"))
    for name, a, b in zip(("y", "dx", "dA", "dB", "dm"), eager, compiled):
        assert torch.equal(a, b), name


def test_inject_lora_use_dora_and_trainable():
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 5))
    inject_lora(model, ["0", "2"], r=2, alpha=4, use_dora=True, backend="torch")
    mark_only_lora_as_trainable(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"{i}.lora_{k}" for i in (0, 2) for k in ("A", "B", "magnitude")}
    assert all(model[i].use_dora for i in (0, 2))


# ----------------------------------------------------------------------------------------------
# PEFT's DoRA: same outputs and gradients
# ----------------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

import lora_kernels.peft as lkp  # noqa: E402

FP32 = TOL[torch.float32]


class _HashDropout(nn.Module):
    """nn.Dropout's role in PEFT's DoRA path with lora_kernels' seeded hash mask, so both sides drop the same
    elements."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return ref.lora_dropout(x.reshape(-1, x.shape[-1]), self.p, self.seed).reshape(x.shape)


@pytest.mark.parametrize("train", [True, False])
def test_single_peft_dora_layer_with_dropout(train):
    """PEFT's DoRA Linear (dropout applied to the LoRA input and to PEFT's second base GEMM) vs
    lora_linear(..., magnitude=, dropout_p=) with the same mask: y and every gradient."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(24, 17)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, lora_dropout=0.1,
                                      init_lora_weights=False))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(17) + 0.5)
    layer.lora_dropout["default"] = _HashDropout(0.1, 77)
    model.train(train)
    x = torch.randn(2, 9, 24, requires_grad=True)
    y_peft = model(x)
    dy = torch.randn_like(y_peft)
    y_peft.backward(dy)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    g_peft = [x.grad] + [p.grad for p in params]
    x2 = x.detach().clone().requires_grad_(True)
    ours = [p.detach().clone().requires_grad_(True) for p in params]
    base = layer.base_layer
    y = lora_kernels.lora_linear(x2, base.weight, ours[0], ours[1], layer.scaling["default"], base.bias,
                                 dropout_p=0.1 if train else 0.0, seed=77, magnitude=ours[2], backend="torch")
    y.backward(dy)
    assert_close_rel(y, y_peft, FP32, "y")
    for name, g, gp in zip(("dx", "dA", "dB", "dm"), [x2.grad] + [t.grad for t in ours], g_peft):
        assert_close_rel(g, gp, FP32, name)


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_dora_llama():
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                                     init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    return model


def _dora_grads(model, key):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and key(n)}


def test_tiny_llama_inject_lora_dora_matches_peft():
    ref_model = _peft_dora_llama()
    ours = _tiny_llama()
    inject_lora(ours, TARGETS, r=4, alpha=8, use_dora=True, backend="torch")
    mark_only_lora_as_trainable(ours)
    peft_params = dict(ref_model.named_parameters())
    n_copied = 0
    for name, mod in ours.named_modules():
        if isinstance(mod, LoRALinear):
            pre = f"base_model.model.{name}"
            with torch.no_grad():
                mod.lora_A.copy_(peft_params[f"{pre}.lora_A.default.weight"])
                mod.lora_B.copy_(peft_params[f"{pre}.lora_B.default.weight"])
                mod.lora_magnitude.copy_(peft_params[f"{pre}.lora_magnitude_vector.default.weight"])
            n_copied += 1
    assert n_copied == 14
    ids = torch.randint(0, 97, (2, 11))
    out_ref = ref_model(input_ids=ids, labels=ids)
    out = ours(input_ids=ids, labels=ids)
    assert_close_rel(out.logits, out_ref.logits, FP32, "logits")
    out_ref.loss.backward()
    out.loss.backward()
    g_ref = _dora_grads(ref_model, lambda n: "lora_" in n)
    g = _dora_grads(ours, lambda n: "lora_" in n)
    assert len(g_ref) == len(g) == 42
    for name, gr in g.items():
        mod, kind = name.rsplit(".", 1)
        peft_name = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
                     "lora_magnitude": "lora_magnitude_vector.default.weight"}[kind]
        assert_close_rel(gr, g_ref[f"base_model.model.{mod}.{peft_name}"], FP32, name)


def test_tiny_llama_peft_patch_runs_dora_fused(monkeypatch):
    ref_model = _peft_dora_llama()
    pat = copy.deepcopy(ref_model)
    calls = []
    real = lkp.lora_linear

    def counting(*args, **kwargs):
        calls.append(kwargs.get("magnitude") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(lkp, "lora_linear", counting)
    report = lkp.patch(pat, backend="torch")
    assert report.num_patched == 14 and not report.skipped
    ids = torch.randint(0, 97, (2, 11))
    out_ref = ref_model(input_ids=ids, labels=ids)
    out_pat = pat(input_ids=ids, labels=ids)
    assert calls == [True] * 14
    assert_close_rel(out_pat.logits, out_ref.logits, FP32, "logits")
    out_ref.loss.backward()
    out_pat.loss.backward()
    g_ref = _dora_grads(ref_model, lambda n: "lora_" in n)
    g_pat = _dora_grads(pat, lambda n: "lora_" in n)
    assert len(g_ref) == 42 and g_ref.keys() == g_pat.keys()
    for n in g_ref:
        assert_close_rel(g_pat[n], g_ref[n], FP32, n)
    assert pat.state_dict().keys() == ref_model.state_dict().keys()  # same parameters: save/load unchanged


def test_peft_patch_dora_eval_and_disable_adapter():
    ref_model = _peft_dora_llama()
    pat = copy.deepcopy(ref_model)
    lkp.patch(pat, backend="torch")
    ids = torch.randint(0, 97, (1, 7))
    ref_model.eval()
    pat.eval()
    with torch.no_grad():
        assert_close_rel(pat(input_ids=ids).logits, ref_model(input_ids=ids).logits, FP32, "eval")
        with pat.disable_adapter(), ref_model.disable_adapter():
            assert_close_rel(pat(input_ids=ids).logits, ref_model(input_ids=ids).logits, FP32, "disabled")


def test_dora_quiet_on_the_happy_path():
    """No warning on a DoRA call that runs where it was asked to."""
    x, w, a, b, m, bias, dy = _make(5, 6, 7, 2, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_kernels.lora_linear(x, w, a, b, SCALE, bias, magnitude=m, backend="torch", dropout_p=0.2, seed=1)


# ----------------------------------------------------------------------------------------------
# Triton byte traffic (interpreter, GPU launch configs; tests/traffic.py)
# ----------------------------------------------------------------------------------------------


def test_triton_traffic_vs_plain_lora():
    """fp16, M=256, K=N=512, r=16, the first GPU config of every kernel. Forward: plain LoRA's bytes + the ypre store
    + g, each once (x and W0 still read once). Backward: dy is read twice (the dy kernel, which also forms dm from
    ypre, and the dx GEMM; plain LoRA's fused backward reads it once), ypre once."""
    import traffic as T
    from lora_kernels.triton import dora as tdo
    from lora_kernels.triton import lora_linear as tll

    cfg = {tll._lora_gemm_kernel: tll.GEMM_CONFIGS.gpu[0], tll._lora_shrink_kernel: tll.SHRINK_CONFIGS.gpu[0],
           tll._lora_dy_kernel: tll.DY_CONFIGS.gpu[0], tll._lora_da_kernel: tll.DA_CONFIGS.gpu[0],
           tdo._dora_dm_kernel: tdo.DM_CONFIGS.gpu[0]}
    c = T.linear_case(256, 512, 512, 16)
    g = torch.rand(512) + 0.5
    norm = torch.rand(512) + 1.0
    with T.gpu_launches(cfg):
        with T.Traffic(x=c["x"], weight=c["w"], lora_a=c["a"], lora_b=c["b"], g=g) as fwd:
            y, xa, yp = tdo.dora_linear_fwd_triton(c["x"], c["w"], c["a"], c["b"], 0.5, None, g, True)
            fwd.operands.update(y=y, xa=xa, ypre=yp)
        with T.Traffic(dy=c["dy"], x=c["x"], xa=xa, ypre=yp, weight=c["w"], lora_a=c["a"], lora_b=c["b"], g=g,
                       norm=norm) as bwd:
            dx, da, db, dm, _ = tdo.dora_linear_bwd_triton(c["dy"], c["x"], xa, yp, c["w"], c["a"], c["b"], 0.5, g, norm,
                                                           (True, True, True, True, False))
            bwd.operands.update(dx=dx, da=da, db=db, dm=dm)
        plain_f = T.measure_lora_linear(c, cfg)
    uniq = lambda tr: sum(s.uniq for s in tr.stats.values())  # noqa: E731
    ypre_bytes, g_bytes = yp.numel() * yp.element_size(), g.numel() * 4
    assert uniq(fwd) == uniq(plain_f) + ypre_bytes + g_bytes, fwd.table()
    assert fwd.ratios()[1] <= 1.0001, fwd.table()
    for name in ("x", "weight"):
        assert fwd.stats[name].uniq == fwd.stats[name].nbytes, fwd.table()
    dy_bytes = c["dy"].numel() * c["dy"].element_size()
    assert bwd.stats["dy"].uniq == 2 * dy_bytes, bwd.table()
    assert bwd.stats["ypre"].uniq == ypre_bytes and bwd.stats["weight"].uniq == bwd.stats["weight"].nbytes, bwd.table()
    assert bwd.ratios()[1] <= 1.29, bwd.table()  # measured 1.28 (plain LoRA's fused backward: 1.12)
