"""Public API: functional ops through autograd, modules, backend resolution, op registration, compile."""

import os

import pytest
import torch
from torch import nn

import lora_kernels as lk
from conftest import TOL, assert_close_rel
from lora_kernels import reference as ref
from lora_kernels._backend import BackendUnavailableError, resolve_backend


# ------------------------------------------------------------------ functional + autograd


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12), (0, 12), (1, 12)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_linear_torch_backend_matches_reference_grads(shape, p):
    K, N, r = shape[-1], 10, 4
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    W = torch.randn(N, K, dtype=torch.float64)
    A = torch.randn(r, K, dtype=torch.float64, requires_grad=True)
    B = torch.randn(N, r, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, dtype=torch.float64, requires_grad=True)
    y = lk.lora_linear(x, W, A, B, 0.5, b, dropout_p=p, seed=11, backend="torch")
    y_ref = ref.lora_linear_ref(x, W, A, B, 0.5, b, dropout_p=p, seed=11)
    assert y.shape == (*shape[:-1], N)
    assert_close_rel(y, y_ref, TOL[torch.float64], "y")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B, b), dy, allow_unused=True)
    want = torch.autograd.grad(y_ref, (x, A, B, b), dy, allow_unused=True)
    for g, w, n in zip(got, want, ("dx", "dA", "dB", "dbias")):
        assert_close_rel(g, w, TOL[torch.float64], n)


def test_lora_linear_gradcheck_through_function():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, W, A, B, bias):
        return lk.lora_linear(x, W, A, B, 0.7, bias, dropout_p=0.3, seed=5, backend="torch")

    assert torch.autograd.gradcheck(f, (x, W, A, B, bias))


def test_same_seed_same_result_other_seed_other_mask():
    x, W = torch.randn(16, 32), torch.randn(8, 32)
    A, B = torch.randn(4, 32), torch.randn(8, 4)
    y1 = lk.lora_linear(x, W, A, B, 1.0, dropout_p=0.5, seed=1)
    y2 = lk.lora_linear(x, W, A, B, 1.0, dropout_p=0.5, seed=1)
    y3 = lk.lora_linear(x, W, A, B, 1.0, dropout_p=0.5, seed=2)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    torch.manual_seed(3)
    y4 = lk.lora_linear(x, W, A, B, 1.0, dropout_p=0.5)
    torch.manual_seed(3)
    y5 = lk.lora_linear(x, W, A, B, 1.0, dropout_p=0.5)
    assert torch.equal(y4, y5), "seed=None must draw from torch's generator"


def test_lora_fa_does_not_save_x():
    x = torch.randn(6, 8, requires_grad=True)
    W, A = torch.randn(5, 8), torch.randn(3, 8)  # A frozen (LoRA-FA)
    B = torch.randn(5, 3, requires_grad=True)
    y = lk.lora_linear(x, W, A, B, 2.0, backend="torch")
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert all(t.data_ptr() != x.data_ptr() for t in saved)
    assert sum(t.numel() for t in saved) == 6 * 3 + W.numel() + A.numel() + B.numel()  # xa + params only
    dy = torch.randn_like(y)
    gx, gB = torch.autograd.grad(y, (x, B), dy)
    y_ref = ref.lora_linear_ref(x, W, A, B, 2.0)
    wx, wB = torch.autograd.grad(y_ref, (x, B), dy)
    assert_close_rel(gx, wx, 1e-5, "dx")
    assert_close_rel(gB, wB, 1e-5, "dB")


def test_autocast_casts_inputs():
    lin = nn.Linear(16, 8)
    layer = lk.LoRALinear(lin, r=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32


def test_lora_params_in_other_dtype_are_cast():
    x = torch.randn(3, 8, dtype=torch.float64)
    W = torch.randn(4, 8, dtype=torch.float64)
    A = torch.randn(2, 8, requires_grad=True)  # fp32 adapter, fp64 activations
    B = torch.randn(4, 2, requires_grad=True)
    y = lk.lora_linear(x, W, A, B, 1.0)
    assert y.dtype == torch.float64
    y.sum().backward()
    assert A.grad.dtype == torch.float32


def test_add_lora_returns_y_in_place():
    L, r, K, N, M = 3, 4, 8, 6, 5
    x, y = torch.randn(M, K), torch.randn(M, N)
    A, B = torch.randn(L, r, K), torch.randn(L, N, r)
    ids = torch.tensor([2, -1, 0, 0, 1], dtype=torch.int32)
    y0 = y.clone()
    out = lk.add_lora(y, x, A, B, ids, torch.tensor([1.0, 0.5, 2.0]), backend="torch")
    assert out is y
    want = ref.add_lora_ref(y0.double(), x.double(), [A.double()], [B.double()], ids, torch.tensor([1.0, 0.5, 2.0]))
    assert_close_rel(y, want, TOL[torch.float32], "y")


def test_merge_unmerge_functional():
    W = torch.randn(6, 8, dtype=torch.float64)
    W0 = W.clone()
    A, B = torch.randn(2, 8, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    assert lk.merge_(W, A, B, 0.5, backend="torch") is W
    assert_close_rel(W, W0 + 0.5 * B @ A, TOL[torch.float64], "merged")
    lk.unmerge_(W, A, B, 0.5, backend="torch")
    assert_close_rel(W, W0, TOL[torch.float64], "unmerged")


# ------------------------------------------------------------------ modules


def _layer(bias=True, r=4, alpha=8.0, **kw):
    torch.manual_seed(0)
    return lk.LoRALinear(nn.Linear(12, 10, bias=bias), r=r, alpha=alpha, **kw)


def test_fresh_layer_equals_base():
    layer = _layer()
    x = torch.randn(7, 12)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert layer.lora_A.abs().sum() > 0
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-6)


def test_layer_wraps_without_copy_and_freezes_weight():
    lin = nn.Linear(12, 10)
    layer = lk.LoRALinear(lin, r=2, alpha=2)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not layer.weight.requires_grad
    assert layer.lora_A.shape == (2, 12) and layer.lora_B.shape == (10, 2)
    assert layer.scale == 1.0
    assert lk.LoRALinear(lin, r=4, alpha=8, use_rslora=True).scale == 4.0


def test_merged_eval_equals_unmerged():
    layer = _layer(dropout=0.1)
    nn.init.normal_(layer.lora_B)
    layer.eval()
    x = torch.randn(5, 12)
    y_unmerged = layer(x)
    W0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y_unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, W0, rtol=0, atol=1e-6)


def test_merge_on_eval_loralib_style():
    layer = _layer(merge_on_eval=True)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 12)
    y_train = layer(x)
    layer.eval()
    assert layer.merged
    torch.testing.assert_close(layer(x), y_train, rtol=1e-5, atol=1e-5)
    layer.train()
    assert not layer.merged


def test_dropout_only_in_training():
    layer = _layer(dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 12)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    b = layer(x)
    assert not torch.equal(a, b)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8, bias=False)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x):
        return self.mlp(self.q_proj(x) + self.v_proj(x))


def test_inject_mark_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = _Block()
    lk.inject_lora(model, ["q_proj", "v_proj"], r=2, alpha=4)
    assert isinstance(model.q_proj, lk.LoRALinear) and isinstance(model.v_proj, lk.LoRALinear)
    assert isinstance(model.mlp[0], nn.Linear) and not isinstance(model.mlp[0], lk.LoRALinear)
    lk.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"}
    lk.mark_only_lora_as_trainable(model, bias="lora_only")
    assert model.q_proj.bias.requires_grad and not model.mlp[0].bias.requires_grad
    # base keys are preserved, lora keys added
    keys = set(model.state_dict())
    assert {"q_proj.weight", "q_proj.bias", "v_proj.weight", "q_proj.lora_A"} <= keys
    for p in (model.q_proj.lora_B, model.v_proj.lora_B):
        nn.init.normal_(p)
    sd = lk.lora_state_dict(model)
    assert set(sd) == {"q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"}
    torch.manual_seed(0)
    fresh = lk.inject_lora(_Block(), ["q_proj", "v_proj"], r=2, alpha=4)
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), model(x))
    # regex targets
    m2 = lk.inject_lora(_Block(), r"mlp\.\d+", r=1, alpha=1)
    assert isinstance(m2.mlp[0], lk.LoRALinear) and isinstance(m2.mlp[2], lk.LoRALinear)


def test_training_step_only_updates_lora():
    torch.manual_seed(0)
    model = lk.inject_lora(_Block(), ["q_proj", "v_proj"], r=2, alpha=4)
    lk.mark_only_lora_as_trainable(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 8)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == ("lora_" in n), n


# ------------------------------------------------------------------ backend resolution


def test_resolve_backend_priority(monkeypatch):
    x = torch.randn(2, 4)
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    assert resolve_backend("lora_linear", x, backend="torch") == "torch"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    assert resolve_backend("lora_linear", x) == "torch"
    # explicit argument beats the env var
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    assert resolve_backend("lora_linear", x, backend="torch") == "torch"
    with pytest.raises(BackendUnavailableError, match=r"from \$LORA_KERNELS_BACKEND"):
        resolve_backend("lora_linear", x)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
    assert resolve_backend("lora_linear", x) in ("torch", "triton")


def test_explicit_unavailable_backend_lists_reasons(monkeypatch):
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' \(from argument\) cannot run lora_kernels.add_lora: .*float64.*CUDA tensors"):
        resolve_backend("add_lora", x, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="unknown backend 'gpu'"):
        resolve_backend("add_lora", x, backend="gpu")
    with pytest.raises(BackendUnavailableError):
        lk.lora_linear(x, torch.randn(3, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64),
                       torch.randn(3, 1, dtype=torch.float64), 1.0, backend="cuda")


def test_auto_falls_back_quietly(monkeypatch):
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    x64 = torch.randn(2, 4, dtype=torch.float64)
    assert resolve_backend("add_lora", x64) == "torch"  # no kernel takes fp64
    xb = torch.randn(2, 4, dtype=torch.bfloat16)
    assert resolve_backend("add_lora", xb) == "torch"  # interpreter has no bf16
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("add_lora", torch.randn(2, 4)) == "torch"


def test_backend_report_mentions_every_backend():
    rep = lk.backend_report()
    assert set(rep) == {"torch", "triton", "cuda"}
    if not torch.cuda.is_available():
        assert "unavailable" in rep["cuda"]


def test_extension_load_never_raises_on_cpu():
    from lora_kernels import _ext

    with pytest.warns(RuntimeWarning, match="CUDA extension unavailable") if not _ext._state["tried"] else _nullctx():
        ok = lk.load_extension()
    assert ok is False or torch.cuda.is_available()
    assert _ext.load_failure_reason() is not None or _ext.is_loaded()


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------ op registration


def test_opcheck_registered_ops():
    ops = torch.ops.lora_kernels
    x, W = torch.randn(5, 8), torch.randn(6, 8)
    A, B, b = torch.randn(3, 8), torch.randn(6, 3), torch.randn(6)
    torch.library.opcheck(ops.lora_linear_fwd.default, (x, W, A, B, 0.5, b, 0.2, 7, "torch"))
    _, xa = ops.lora_linear_fwd(x, W, A, B, 0.5, b, 0.2, 7, "torch")
    dy = torch.randn(5, 6)
    torch.library.opcheck(ops.lora_linear_bwd.default, (dy, x, xa, W, A, B, 0.5, 0.2, 7, [True, True, True, False], "torch"))
    torch.library.opcheck(ops.lora_linear_bwd.default, (dy, None, xa, W, A, B, 0.5, 0.0, 0, [True, False, True, False], "torch"))
    L = 3
    As, Bs = [torch.randn(L, 4, 8), torch.randn(L, 4, 8)], [torch.randn(L, 6, 4), torch.randn(L, 2, 4)]
    ids = torch.tensor([0, 2, -1, 1, 1])
    torch.library.opcheck(ops.add_lora_.default, (torch.randn(5, 8), x, As, Bs, ids, torch.rand(L), torch.tensor([4, 1, 2]), "torch"))
    torch.library.opcheck(ops.merge_.default, (torch.randn(6, 8), [A], [B], [0.5], "torch"))


def test_fake_kernels_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, W = torch.empty(5, 8, dtype=torch.float16), torch.empty(6, 8, dtype=torch.float16)
        A, B = torch.empty(3, 8, dtype=torch.float16), torch.empty(6, 3, dtype=torch.float16)
        y, xa = torch.ops.lora_kernels.lora_linear_fwd(x, W, A, B, 1.0, None, 0.0, 0, "triton")
        assert y.shape == (5, 6) and y.dtype == torch.float16 and xa.dtype == torch.float32 and xa.shape == (5, 3)
        dx, da, db, dw = torch.ops.lora_kernels.lora_linear_bwd(y, x, xa, W, A, B, 1.0, 0.0, 0, [True, True, True, False], "cuda")
        assert dx.shape == (5, 8) and da.shape == (3, 8) and db.shape == (6, 3) and dw.shape == (0,)
        xa2 = torch.ops.lora_kernels.cuda_multi_lora_shrink(x, torch.empty(4, 7, 8, dtype=torch.float16), torch.empty(5, dtype=torch.int64), None)
        assert xa2.shape == (5, 7) and xa2.dtype == torch.float32


# ------------------------------------------------------------------ torch.compile


def test_compile_fullgraph_traces_public_api():
    torch._dynamo.reset()
    layer = _layer()
    nn.init.normal_(layer.lora_B)
    layer.eval()

    def step(x, y_serv, ids):
        y = layer(x)
        lk.add_lora(y_serv, x, A_stack, B_stack, ids, scales, backend="torch")
        return y.sum() + y_serv.sum()

    L = 3
    A_stack, B_stack, scales = torch.randn(L, 4, 12), torch.randn(L, 6, 4), torch.rand(L)
    x = torch.randn(4, 12)
    ids = torch.tensor([0, 2, -1, 1])
    want = step(x, torch.zeros(4, 6), ids)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x, torch.zeros(4, 6), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_compile_fullgraph_training_step():
    torch._dynamo.reset()
    x = torch.randn(6, 12, requires_grad=True)
    W = torch.randn(10, 12)
    A = torch.randn(4, 12, requires_grad=True)
    B = torch.randn(10, 4, requires_grad=True)

    def f(x, W, A, B):
        return lk.lora_linear(x, W, A, B, 0.5, dropout_p=0.1, seed=3, backend="torch").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, W, A, B)
    gx, gA, gB = torch.autograd.grad(loss, (x, A, B))
    loss_ref = ref.lora_linear_ref(x, W, A, B, 0.5, dropout_p=0.1, seed=3).square().sum()
    wx, wA, wB = torch.autograd.grad(loss_ref, (x, A, B))
    for g, w in ((gx, wx), (gA, wA), (gB, wB)):
        assert_close_rel(g, w, 1e-5)


def test_compile_fullgraph_dropout_training_draws_seed_in_graph():
    """A training step with dropout and no explicit seed compiles without graph breaks, draws a fresh
    seed every call from torch's generator (same as eager), and backward regenerates the same mask."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = lk.LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.3, backend="torch")
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")

    def run(fn, seed):
        torch.manual_seed(seed)
        layer.zero_grad()
        y = fn(x)
        y.square().sum().backward()
        return y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    eager = run(layer, 123)
    comp = run(compiled, 123)
    for e, c in zip(eager, comp):
        assert_close_rel(c, e, 1e-6)
    other = run(compiled, 124)
    assert not torch.equal(other[0], comp[0]), "a new call must draw a new dropout seed"
