"""Several named adapters on one LoRALinear: add / set / delete / disable, fused multi-adapter forward (one
lora_linear call), dropout grouping, merge of the active adapters, add_weighted_adapter vs PEFT."""

import copy
import math

import pytest
import torch
from torch import nn

from conftest import TOL, assert_close_rel

import lora_kernels as lk
import lora_kernels.named_adapters as na
import lora_kernels.peft_io  # noqa: F401  (lk.peft_io)
from lora_kernels import LoRAInputError, LoRALinear
from lora_kernels.ops.merge import BITS_DTYPE
from lora_kernels.reference import dropout_keep_mask

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402


def _layer(N=23, K=37, dtype=torch.float32, backend="torch", seed=0, bias=True):
    torch.manual_seed(seed)
    base = nn.Linear(K, N, bias=bias).to(dtype)
    layer = LoRALinear(base, 4, 8, backend=backend)
    layer.add_adapter("b", 7, 3.0)
    layer.add_adapter("c", 1, 5.0, use_rslora=True)
    with torch.no_grad():
        for n in layer.adapter_names:
            for p in layer.adapter_weights(n):
                p.normal_(0, 0.5)
    return layer


def _ref64(layer, x, names):
    """float64 twin: base(x) + Σ s_i·x·A_iᵀ·B_iᵀ over ``names`` (no dropout)."""
    y = x.double() @ layer.weight.double().t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    for n in names:
        a, b = layer.adapter_weights(n)
        y = y + layer.adapter_config(n).scale * (x.double() @ a.double().t()) @ b.double().t()
    return y


class _Count:
    def __init__(self, monkeypatch):
        self.n = 0
        real = na.lora_linear

        def counted(*a, **k):
            self.n += 1
            return real(*a, **k)

        monkeypatch.setattr(na, "lora_linear", counted)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16), ("torch", torch.float64),
                                           ("triton", torch.float32), ("triton", torch.float16)])
@pytest.mark.parametrize("names", [["b"], ["default", "b"], ["c", "b", "default"]])
def test_fused_forward_and_grads_vs_float64(backend, dtype, names, monkeypatch):
    layer = _layer(dtype=dtype, backend=backend)
    layer.set_adapter(names)
    assert layer.active_adapters == tuple(names)
    x = torch.randn(3, 5, 37, dtype=dtype, requires_grad=True)
    calls = _Count(monkeypatch)
    y = layer(x)
    assert calls.n == 1, "the active adapters must run as ONE lora_linear call"
    tol = TOL[torch.float32] if dtype == torch.float64 else TOL[dtype]
    assert_close_rel(y, _ref64(layer, x, names), tol, f"forward {names}")
    # gradients vs autograd through the float64 twin
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    ps = {n: [p.detach().double().requires_grad_(True) for p in layer.adapter_weights(n)] for n in names}
    y64 = x64 @ layer.weight.double().t()
    for n in names:
        y64 = y64 + layer.adapter_config(n).scale * (x64 @ ps[n][0].t()) @ ps[n][1].t()
    y64.backward(dy.double())
    assert_close_rel(x.grad, x64.grad, tol, "dx")
    for n in names:
        for p, p64, w in zip(layer.adapter_weights(n), ps[n], "AB"):
            assert p.grad is not None, f"{n}.{w} has no grad"
            assert_close_rel(p.grad, p64.grad, tol, f"d{w} of {n}")
    for n in layer.adapter_names:  # inactive adapters are frozen (PEFT's set_adapter)
        for p in layer.adapter_weights(n):
            assert p.requires_grad == (n in names)


def test_single_default_keeps_old_path_and_keys(monkeypatch):
    layer = _layer()
    assert layer._fast and layer.active_adapters == ("default",)
    calls = _Count(monkeypatch)
    x = torch.randn(4, 37)
    assert_close_rel(layer(x), _ref64(layer, x, ["default"]), TOL[torch.float32])
    assert calls.n == 0  # modules.py's own lora_linear call, not the named path
    plain = LoRALinear(nn.Linear(37, 23), 4, 8)
    assert sorted(plain.state_dict()) == ["bias", "lora_A", "lora_B", "weight"]
    assert sorted(layer.state_dict()) == ["bias", "lora_A", "lora_A_named.b", "lora_A_named.c", "lora_B",
                                          "lora_B_named.b", "lora_B_named.c", "weight"]
    assert (layer.r, layer.scale) == (4, 2.0) and layer.lora_A.shape == (4, 37)


def test_disable_context_and_enable():
    layer = _layer()
    layer.set_adapter(["default", "b"])
    x = torch.randn(6, 37)
    base = x @ layer.weight.t() + layer.bias
    with layer.disable_adapters():
        assert_close_rel(layer(x), base, TOL[torch.float32])
        assert not layer.adapters_enabled
    assert layer.adapters_enabled
    assert_close_rel(layer(x), _ref64(layer, x, ["default", "b"]), TOL[torch.float32])
    layer.disable_adapters()
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    layer.enable_adapters()
    assert layer.adapters_enabled and not layer._fast


def test_delete_adapter_promotes_and_restores_keys():
    layer = _layer()
    a_b = layer.lora_A_named["b"]
    layer.set_adapter(["default", "b"])
    x = torch.randn(5, 37)
    layer.delete_adapter("default")
    assert layer.primary_adapter == "b" and layer.lora_A is a_b and layer.r == 7 and layer.scale == 3.0 / 7
    assert layer.active_adapters == ("b",) and layer._fast
    assert_close_rel(layer(x), _ref64(layer, x, ["b"]), TOL[torch.float32])
    layer.delete_adapter("c")
    assert sorted(layer.state_dict()) == ["bias", "lora_A", "lora_B", "weight"]  # single adapter: the old keys
    with pytest.raises(LoRAInputError, match="only adapter"):
        layer.delete_adapter("b")


def test_errors_are_clear():
    layer = _layer()
    with pytest.raises(LoRAInputError, match="already exists"):
        layer.add_adapter("b", 2, 2)
    with pytest.raises(LoRAInputError, match="without '.'"):
        layer.add_adapter("x.y", 2, 2)
    with pytest.raises(LoRAInputError, match="rank r"):
        layer.add_adapter("z", 0, 2)
    with pytest.raises(LoRAInputError, match=r"unknown adapter\(s\) \['nope'\]"):
        layer.set_adapter(["b", "nope"])
    with pytest.raises(LoRAInputError, match="repeat"):
        layer.set_adapter(["b", "b"])
    with pytest.raises(LoRAInputError, match="equal ranks"):
        layer.add_weighted_adapter(["default", "b"], [1, 1], "m", "linear")
    with pytest.raises(LoRAInputError, match="one weight per adapter"):
        layer.add_weighted_adapter(["default", "b"], [1], "m", "cat")
    layer.set_adapter(["default", "b"])
    layer.merge()
    for call in (lambda: layer.set_adapter("c"), layer.disable_adapters, lambda: layer.delete_adapter("b")):
        with pytest.raises(RuntimeError, match="merged"):
            call()
    layer.delete_adapter("c")  # not merged: allowed while merged, the merged (active) adapters stay
    assert layer.active_adapters == ("default", "b") and layer.merged_adapters == ("default", "b")
    layer.unmerge()
    assert layer.active_adapters == ("default", "b") and not layer._fast
    with layer.disable_adapters(), pytest.raises(RuntimeError, match="disabled"):
        layer.merge()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_of_active_adapters_exact_round_trip(dtype):
    layer = _layer(dtype=dtype)
    layer.set_adapter(["c", "default", "b"])
    x = torch.randn(7, 37, dtype=dtype)
    y_unmerged = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged_adapters == ("c", "default", "b")
    assert_close_rel(layer(x), y_unmerged, TOL[dtype], "merged vs fused")
    delta = sum(layer.adapter_config(n).scale * layer.adapter_weights(n)[1].double() @ layer.adapter_weights(n)[0].double()
                for n in layer.active_adapters)
    assert_close_rel(layer.weight, w0.double() + delta, TOL[dtype], "merged weight")
    layer.unmerge()
    bits = BITS_DTYPE[dtype]
    assert torch.equal(layer.weight.view(bits), w0.view(bits))


def test_dropout_same_p_shares_one_call_and_mask(monkeypatch):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(37, 23), 4, 8, dropout=0.25, backend="torch")
    layer.add_adapter("b", 3, 3.0, dropout=0.25)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_B_named["b"].normal_()
    layer.set_adapter(["default", "b"])
    layer.train()
    x = torch.randn(9, 37)
    calls = _Count(monkeypatch)
    torch.manual_seed(123)
    y = layer(x)
    assert calls.n == 1
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))  # what lora_linear draws (functional._draw_seed)
    xd = x.double() * dropout_keep_mask(seed, 9, 37, 0.25).double() / 0.75
    expect = x.double() @ layer.weight.double().t() + layer.bias.double()
    for n in ("default", "b"):
        a, b = layer.adapter_weights(n)
        expect = expect + layer.adapter_config(n).scale * (xd @ a.double().t()) @ b.double().t()
    assert_close_rel(y, expect, TOL[torch.float32], "shared dropout mask")


def test_dropout_different_p_grouped(monkeypatch):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(37, 23), 4, 8, dropout=0.25, backend="torch")
    layer.add_adapter("b", 3, 3.0, dropout=0.5)
    layer.add_adapter("c", 2, 1.0, dropout=0.25)
    with torch.no_grad():
        for n in layer.adapter_names:
            layer.adapter_weights(n)[1].normal_()
    layer.set_adapter(["default", "b", "c"])
    layer.train()
    x = torch.randn(9, 37)
    calls = _Count(monkeypatch)
    torch.manual_seed(7)
    y = layer(x)
    assert calls.n == 1  # {default, c} (p = 0.25) fused with the base GEMM; b (p = 0.5) by torch ops
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    xd1 = x.double() * dropout_keep_mask(seed, 9, 37, 0.25).double() / 0.75
    xd2 = nn.functional.dropout(x, 0.5, True).double()  # the next draw from the generator
    expect = x.double() @ layer.weight.double().t() + layer.bias.double()
    for n, xd in (("default", xd1), ("c", xd1), ("b", xd2)):
        a, b = layer.adapter_weights(n)
        expect = expect + layer.adapter_config(n).scale * (xd @ a.double().t()) @ b.double().t()
    assert_close_rel(y, expect, TOL[torch.float32], "grouped dropout")
    layer.eval()  # eval: one group, no dropout
    calls.n = 0
    assert_close_rel(layer(x), _ref64(layer, x, ["default", "b", "c"]), TOL[torch.float32])
    assert calls.n == 1


# ----------------------------------------------------------------------------------------------------------------
# Against PEFT
# ----------------------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(20, 24)
        self.v_proj = nn.Linear(24, 12)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.q_proj(x)))


def _pair(use_rslora=False):
    """A PEFT model with adapters default (r=4), b (r=6), c (r=4, only q_proj), random nonzero weights, and our
    copy of it."""
    torch.manual_seed(0)
    base = Net()
    ours = copy.deepcopy(base)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora))
    pm.add_adapter("b", LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora))
    pm.add_adapter("c", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], use_rslora=use_rslora))
    lk.inject_lora(ours, ["q_proj", "v_proj"], 4, 8, use_rslora=use_rslora, backend="torch")
    lk.add_adapter(ours, "b", ["q_proj", "v_proj"], 6, 3, use_rslora=use_rslora)
    lk.add_adapter(ours, "c", ["q_proj"], 4, 16, use_rslora=use_rslora)
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            pl, ol = getattr(pm.base_model.model, name), getattr(ours, name)
            for ad in ol.adapter_names:
                a, b = ol.adapter_weights(ad)
                a.normal_(0, 0.3)
                b.normal_(0, 0.3)
                pl.lora_A[ad].weight.copy_(a)
                pl.lora_B[ad].weight.copy_(b)
    return pm, ours


@pytest.mark.parametrize("use_rslora", [False, True])
def test_set_adapter_and_disable_match_peft(use_rslora):
    pm, ours = _pair(use_rslora)
    x = torch.randn(5, 20)
    for names in (["b"], ["default", "b"], ["c", "b"], ["default", "b", "c"]):
        pm.base_model.set_adapter(names)
        lk.set_adapter(ours, names)
        assert_close_rel(ours(x), pm(x), TOL[torch.float32], f"active {names}")
    with pm.disable_adapter(), lk.disable_adapters(ours):
        assert_close_rel(ours(x), pm(x), TOL[torch.float32], "disabled")
    assert_close_rel(ours(x), pm(x), TOL[torch.float32], "re-enabled")
    # gradients of every active adapter (the fused call) vs PEFT's per-adapter loop
    xg, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ours(xg) ** 2).sum().backward()
    (pm(xp) ** 2).sum().backward()
    assert_close_rel(xg.grad, xp.grad, TOL[torch.float32], "dx")
    for name in ("q_proj", "v_proj"):
        pl, ol = getattr(pm.base_model.model, name), getattr(ours, name)
        for ad in ol.adapter_names:
            a, b = ol.adapter_weights(ad)
            assert_close_rel(a.grad, pl.lora_A[ad].weight.grad, TOL[torch.float32], f"dA {name}.{ad}")
            assert_close_rel(b.grad, pl.lora_B[ad].weight.grad, TOL[torch.float32], f"dB {name}.{ad}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("combination_type", ["cat", "linear", "svd"])
def test_add_weighted_adapter_matches_peft(combination_type, dtype):
    pm, ours = _pair()
    pm.to(dtype)
    ours.to(dtype)
    tol = TOL[dtype]
    adapters, weights = (["default", "c"], [0.7, -1.3]) if combination_type == "linear" else (["default", "b", "c"], [0.7, 1.5, -0.4])
    pm.add_weighted_adapter(adapters, weights, "mix", combination_type=combination_type)
    lk.add_weighted_adapter(ours, adapters, weights, "mix", combination_type=combination_type)
    for name in ("q_proj", "v_proj"):
        pl, ol = getattr(pm.base_model.model, name), getattr(ours, name)
        a, b = ol.adapter_weights("mix")
        pa, pb = pl.lora_A["mix"].weight, pl.lora_B["mix"].weight
        assert ol.adapter_config("mix").scale == pl.scaling["mix"] == 1.0
        if combination_type == "svd":  # singular vectors are defined up to sign: compare ΔW
            assert_close_rel(b.double() @ a.double(), pb.double() @ pa.double(), tol, f"svd {name}")
        else:  # the same operations in the same order: bit-identical. PEFT sizes "cat" by the model's ranks and
            # zero-pads a layer lacking an adapter (v_proj has no "c"); we keep that layer's own rank.
            r = a.shape[0]
            assert torch.equal(a, pa[:r]) and torch.equal(b, pb[:, :r]), f"{combination_type} {name}"
            assert not pa[r:].any() and not pb[:, r:].any()
    x = torch.randn(5, 20).to(dtype)
    pm.base_model.set_adapter("mix")
    lk.set_adapter(ours, "mix")
    if combination_type == "svd" and dtype != torch.float32:  # PEFT leaves its svd adapter in fp32 (.data = Vh)
        pm.to(dtype)
    assert_close_rel(ours(x), pm(x), tol, "mix forward")
    if combination_type == "cat":  # exact: Σ w_i·s_i·B_i·A_i, so equal to the weighted active adapters
        q = ours.q_proj
        want = sum(w * q.adapter_config(n).scale * q.adapter_weights(n)[1].double() @ q.adapter_weights(n)[0].double()
                   for n, w in zip(adapters, weights))
        a, b = q.adapter_weights("mix")
        assert_close_rel(b.double() @ a.double(), want, 1e-6 if dtype == torch.float32 else tol, "cat is exact")


def test_model_level_add_adapter_requires_a_match():
    _, ours = _pair()
    with pytest.raises(LoRAInputError, match="no LoRALinear layer matches"):
        lk.add_adapter(ours, "z", ["k_proj"], 2, 2)
    emb = nn.Module()
    emb.tok = nn.Embedding(10, 4)
    emb.proj = nn.Linear(4, 4)
    lk.inject_lora(emb, ["tok", "proj"], 2, 2)
    with pytest.raises(LoRAInputError, match=r"LoRALinear only; \['tok'\]"):
        lk.add_adapter(emb, "z", ["tok", "proj"], 2, 2)
    assert emb.proj.adapter_names == ("default",)  # refused before anything was added
    with pytest.raises(LoRAInputError, match="unknown adapter"):
        lk.set_adapter(ours, "zz")
    lk.delete_adapter(ours, "c")
    assert ours.q_proj.adapter_names == ("default", "b")
    assert math.isclose(ours.v_proj.adapter_config("b").scale, 0.5)


# ----------------------------------------------------------------------------------------------------------------
# modules_to_save (inject_lora / peft_io) in PEFT's on-disk layout, both ways
# ----------------------------------------------------------------------------------------------------------------


class Cls(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 16)
        self.norm = nn.BatchNorm1d(16)  # parameters and buffers (running stats)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.q_proj(x))))


def _perturb_(mod):
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for name, b in mod.named_buffers():
            if b.is_floating_point():
                b.add_(torch.rand_like(b))


def test_modules_to_save_ours_to_peft(tmp_path):
    from safetensors.torch import load_file
    from peft import PeftModel

    torch.manual_seed(0)
    base = Cls().eval()
    ours = lk.inject_lora(copy.deepcopy(base), ["q_proj"], 4, 8, backend="torch", modules_to_save=["head", "norm"])
    assert ours.lora_modules_to_save == ("head", "norm")
    lk.mark_only_lora_as_trainable(ours)
    assert all(p.requires_grad for p in ours.head.parameters()) and not ours.q_proj.weight.requires_grad
    with torch.no_grad():
        ours.q_proj.lora_B.normal_(0, 0.3)
    _perturb_(ours.head)
    _perturb_(ours.norm)
    cfg = lk.peft_io.save_peft_adapter(ours, str(tmp_path))
    assert cfg["modules_to_save"] == ["head", "norm"]
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {"base_model.model.head.weight", "base_model.model.head.bias", "base_model.model.norm.weight",
            "base_model.model.norm.running_mean", "base_model.model.norm.running_var"} <= keys
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert type(pm.base_model.model.head).__name__ == "ModulesToSaveWrapper"
    x = torch.randn(6, 12)
    assert_close_rel(pm(x), ours(x), TOL[torch.float32], "PEFT loads our modules_to_save")


def test_modules_to_save_peft_to_ours(tmp_path):
    torch.manual_seed(1)
    base = Cls().eval()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                        modules_to_save=["head", "norm"]))
    with torch.no_grad():
        pm.base_model.model.q_proj.lora_B["default"].weight.normal_(0, 0.3)
    _perturb_(pm.base_model.model.head.modules_to_save["default"])
    _perturb_(pm.base_model.model.norm.modules_to_save["default"])
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    ours = lk.inject_lora(copy.deepcopy(base), ["q_proj"], 4, 8, backend="torch").eval()
    lk.peft_io.load_peft_adapter_(ours, str(tmp_path))
    assert ours.lora_modules_to_save == ("head", "norm")
    x = torch.randn(6, 12)
    assert_close_rel(ours(x), pm(x), TOL[torch.float32], "our load of PEFT's modules_to_save")
    # and back: our save of what we loaded equals PEFT's file key for key
    from safetensors.torch import load_file

    lk.peft_io.save_peft_adapter(ours, str(tmp_path / "again"))
    a, b = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_modules_to_save_errors():
    with pytest.raises(ValueError, match="no module of the model ends with"):
        lk.inject_lora(Cls(), ["q_proj"], 2, 2, modules_to_save=["nope"])
    with pytest.raises(ValueError, match="LoRA layers"):
        lk.inject_lora(Cls(), ["q_proj"], 2, 2, modules_to_save=["q_proj"])


# ----------------------------------------------------------------------------------------------------------------
# AdapterSlots: adapters leaving packed slices out, per-slice ranks and scales; per token vs PEFT, mixed batch
# ----------------------------------------------------------------------------------------------------------------

QKV_K, QKV_N = 20, [16, 8, 8]


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(QKV_K, QKV_N[0], bias=False)
        self.k_proj = nn.Linear(QKV_K, QKV_N[1], bias=False)
        self.v_proj = nn.Linear(QKV_K, QKV_N[2], bias=False)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)


_QKV_CONFIGS = {  # name -> LoraConfig kwargs: slices left out, per-slice ranks and scales
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),  # PEFT's Llama default: no k
    "mixed": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], rank_pattern={"k_proj": 2},
                  alpha_pattern={"v_proj": 3, "k_proj": 16}),  # scales q 2, k 8, v 0.75; ranks 4, 2, 4
    "k_only": dict(r=3, lora_alpha=3, target_modules=["k_proj"], use_rslora=True),
}


def _qkv_adapters(tmp_path):
    torch.manual_seed(5)
    base = Attn()
    dirs = {}
    for i, (name, kw) in enumerate(_QKV_CONFIGS.items()):
        torch.manual_seed(10 + i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw))  # B nonzero
        dirs[name] = str(tmp_path / name)
        pm.save_pretrained(dirs[name])
    return base, dirs


def _peft_outputs(base, dirs, x):
    from peft import PeftModel

    out = {None: base(x)}
    for name, d in dirs.items():
        out[name] = PeftModel.from_pretrained(copy.deepcopy(base), d)(x)
    return out


def test_slots_partial_slices_per_slice_scales_vs_peft(tmp_path):
    from lora_kernels.peft_io import load_peft_into_slots, read_peft_adapter
    from lora_kernels.serving import AdapterSlots

    base, dirs = _qkv_adapters(tmp_path)
    paths = ["q_proj", "k_proj", "v_proj"]
    slots = AdapterSlots(4, 8, QKV_K, QKV_N, dtype=torch.float32)
    for slot, (name, d) in enumerate(dirs.items()):
        load_peft_into_slots(slots, d, paths, slot, name=name)
    assert slots.ranks.tolist() == [4, 4, 3, 0]
    assert float(slots.scales[0]) == 2.0 and float(slots.scales[1]) == 2.0  # "mixed": s_ref = the q scale
    assert not slots.lora_a[1][0].any() and not slots.lora_b[1][0].any()  # "qv" has no k: zeros
    _, ad = read_peft_adapter(dirs["mixed"])
    assert torch.equal(slots.lora_b[0][1, :, :4], ad["q_proj"][1])  # equal-scale slice copied unchanged
    assert torch.equal(slots.lora_b[1][1, :, :2], ad["k_proj"][1] * 4.0)  # k: B·(8 / 2), exact (power of two)
    assert not slots.lora_a[1][1, 2:].any()  # k's rank 2 padded to 4 with zeros
    torch.manual_seed(0)
    M = 23
    x = torch.randn(M, QKV_K)
    names = [None, "qv", "mixed", "k_only"]
    pick = torch.randint(0, 4, (M,))
    ids = slots.ids_for([names[int(i)] for i in pick])
    with torch.no_grad():
        want = _peft_outputs(base, dirs, x)
        y = base(x)
    slots.apply(y, x, ids, backend="torch")
    expect = torch.stack([want[names[int(i)]][t] for t, i in enumerate(pick)])
    assert_close_rel(y, expect, TOL[torch.float32], "mixed batch vs PEFT per token")
    for t, i in enumerate(pick):  # every token, not just the batch norm
        assert_close_rel(y[t], want[names[int(i)]][t], 1e-5, f"token {t} ({names[int(i)]})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slots_per_slice_scale_fold_error_16bit(tmp_path, dtype):
    """The per-slice scale is folded into B (rounded once to 16 bit). Its error vs float64 is measured against the
    alternative a per-slice-scale kernel would have (B rounded to 16 bit, scale applied in fp32): same size."""
    from lora_kernels.peft_io import load_peft_into_slots, read_peft_adapter
    from lora_kernels.reference import add_lora_ref
    from lora_kernels.serving import AdapterSlots

    _, dirs = _qkv_adapters(tmp_path)
    _, ad = read_peft_adapter(dirs["mixed"])
    slots = AdapterSlots(2, 8, QKV_K, QKV_N, dtype=dtype)
    load_peft_into_slots(slots, dirs["mixed"], ["q_proj", "k_proj", "v_proj"], 0)
    torch.manual_seed(1)
    x = torch.randn(64, QKV_K).to(dtype)
    ids = torch.zeros(64, dtype=torch.int32)
    y = torch.zeros(64, sum(QKV_N), dtype=dtype)
    slots.apply(y, x, ids, backend="torch")
    exact = torch.cat([ad[p][2] * (x.double() @ ad[p][0].double().t()) @ ad[p][1].double().t()
                       for p in ("q_proj", "k_proj", "v_proj")], 1)
    alt = torch.cat([ad[p][2] * (x.double() @ ad[p][0].to(dtype).double().t()) @ ad[p][1].to(dtype).double().t()
                     for p in ("q_proj", "k_proj", "v_proj")], 1)
    err, err_alt = [float((t.double() - exact).norm() / exact.norm()) for t in (y, alt)]
    assert err <= TOL[dtype]
    # output rounding included in err only; the v slice (scale ratio 0.375, not a power of two) is the folded one
    v = slice(sum(QKV_N[:2]), None)
    ev = float((y[:, v].double() - exact[:, v]).norm() / exact[:, v].norm())
    ev_alt = float((alt[:, v] - exact[:, v]).norm() / exact[:, v].norm())
    print(f"{dtype}: folded slots rel err {err:.2e} (v slice {ev:.2e}); per-slice-scale alternative without output "
          f"rounding {err_alt:.2e} (v slice {ev_alt:.2e})")
    assert ev <= 4 * ev_alt + 2 * torch.finfo(dtype).eps


def test_slots_slice_errors():
    from lora_kernels.serving import AdapterSlots

    slots = AdapterSlots(2, 4, QKV_K, QKV_N, dtype=torch.float32)
    A, B = torch.randn(2, QKV_K), torch.randn(16, 2)
    with pytest.raises(LoRAInputError, match="None for both"):
        slots.load(0, [A, None, None], [B, torch.randn(8, 2), None], scale=1.0)
    with pytest.raises(LoRAInputError, match="every slice is None"):
        slots.load(0, [None] * 3, [None] * 3, scale=1.0)
    with pytest.raises(LoRAInputError, match=r"scale\[0\] must be a finite"):
        slots.load(0, [A, None, None], [B, None, None], scale=[float("nan"), None, None])
    with pytest.raises(LoRAInputError, match="one per slice"):
        slots.load(0, [A, None, None], [B, None, None], scale=[1.0, 2.0])
    assert slots.ranks.tolist() == [0, 0]


def test_lora_state_dict_has_named_adapters_and_modules_to_save():
    torch.manual_seed(0)
    model = lk.inject_lora(Cls(), ["q_proj"], 2, 4, modules_to_save=["head"])
    lk.add_adapter(model, "b", ["q_proj"], 3, 3)
    for bias in ("none", "all", "lora_only"):
        sd = lk.lora_state_dict(model, bias=bias)
        assert {"q_proj.lora_A", "q_proj.lora_B", "q_proj.lora_A_named.b", "q_proj.lora_B_named.b", "head.weight",
                "head.bias"} <= set(sd), bias
        assert "norm.weight" not in sd and "q_proj.weight" not in sd
    fresh = lk.inject_lora(Cls(), ["q_proj"], 2, 4, modules_to_save=["head"])
    lk.add_adapter(fresh, "b", ["q_proj"], 3, 3)
    fresh.load_state_dict(lk.lora_state_dict(model), strict=False)
    assert torch.equal(fresh.q_proj.lora_A_named["b"], model.q_proj.lora_A_named["b"])
    assert torch.equal(fresh.head.weight, model.head.weight)


def test_named_adapter_peft_files_both_ways(tmp_path):
    """save_peft_adapter(adapter_name=...) / load_peft_adapter_(adapter_name=...) vs PEFT's save_pretrained (a
    non-default adapter in <dir>/<name>) and load_adapter."""
    from peft import PeftModel

    pm, ours = _pair()
    x = torch.randn(5, 20)
    # PEFT -> ours: PEFT writes default at the root and b, c in sub-directories
    pm.save_pretrained(str(tmp_path / "peft"))
    torch.manual_seed(0)
    fresh = lk.inject_lora(Net(), ["q_proj", "v_proj"], 4, 8, backend="torch")
    with torch.no_grad():  # a different base: copy PEFT's base weights
        for n in ("q_proj", "v_proj"):
            getattr(fresh, n).weight.copy_(getattr(pm.base_model.model, n).base_layer.weight)
            getattr(fresh, n).bias.copy_(getattr(pm.base_model.model, n).base_layer.bias)
    lk.peft_io.load_peft_adapter_(fresh, str(tmp_path / "peft"))
    lk.peft_io.load_peft_adapter_(fresh, str(tmp_path / "peft" / "b"), adapter_name="b")
    lk.peft_io.load_peft_adapter_(fresh, str(tmp_path / "peft" / "c"), adapter_name="c")
    assert fresh.q_proj.adapter_names == ("default", "b", "c") and fresh.v_proj.adapter_names == ("default", "b")
    assert fresh.v_proj.adapter_config("b").r == 6 and fresh.q_proj.adapter_config("c").scale == 4.0
    for names in (["b"], ["default", "b", "c"]):
        pm.base_model.set_adapter(names)
        lk.set_adapter(fresh, names)
        assert_close_rel(fresh(x), pm(x), TOL[torch.float32], f"loaded {names}")
    # ours -> PEFT: each named adapter saved on its own, loaded with PEFT's load_adapter
    lk.peft_io.save_peft_adapter(ours, str(tmp_path / "ours"))
    for n in ("b", "c"):
        cfg = lk.peft_io.save_peft_adapter(ours, str(tmp_path / "ours" / n), adapter_name=n)
        assert cfg["target_modules"] == (["q_proj", "v_proj"] if n == "b" else ["q_proj"])
    torch.manual_seed(0)
    back = PeftModel.from_pretrained(Net(), str(tmp_path / "ours"))  # _pair's base (same seed)
    back.load_adapter(str(tmp_path / "ours" / "b"), "b")
    back.load_adapter(str(tmp_path / "ours" / "c"), "c")
    for names in (["c"], ["default", "b", "c"]):
        back.base_model.set_adapter(names)
        lk.set_adapter(ours, names)
        assert_close_rel(back(x), ours(x), TOL[torch.float32], f"PEFT loaded our {names}")
    with pytest.raises(ValueError, match="no LoRALinear layer has an adapter named 'zz'"):
        lk.peft_io.save_peft_adapter(ours, str(tmp_path / "z"), adapter_name="zz")
