"""lora_kernels.peft.patch: PEFT LoRA models on the fused path give PEFT's outputs and gradients, and keep
PEFT's features (adapter switching, disable_adapter, merge/unmerge, save_pretrained) working."""

import copy
import logging
import types

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as peft_lora  # noqa: E402

from conftest import TOL, assert_close_rel  # noqa: E402

import lora_kernels.peft as lkp  # noqa: E402

FP32 = TOL[torch.float32]


class MLP(nn.Module):
    def __init__(self, d_in=24, d_hidden=40, d_out=17, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden, bias=bias)
        self.block = nn.ModuleDict({"proj": nn.Linear(d_hidden, d_hidden, bias=bias)})
        self.fc2 = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x):
        return self.fc2(torch.tanh(self.block["proj"](torch.relu(self.fc1(x)))))


def _mlp_peft(seed=0, bias=True, **cfg):
    torch.manual_seed(seed)
    base = MLP(bias=bias)
    cfg.setdefault("r", 4)
    cfg.setdefault("lora_alpha", 8)
    cfg.setdefault("target_modules", ["fc1", "proj", "fc2"])
    cfg.setdefault("init_lora_weights", False)  # B != 0, so the LoRA branch is visible in outputs and gradients
    return get_peft_model(base, LoraConfig(**cfg))


def _tiny_llama_peft(seed=0, **cfg):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(config)
    cfg.setdefault("r", 4)
    cfg.setdefault("lora_alpha", 8)
    cfg.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    cfg.setdefault("init_lora_weights", False)
    return get_peft_model(base, LoraConfig(**cfg))


@pytest.fixture
def fused_calls(monkeypatch):
    """Count (and record the dropout of) every lora_linear call made by the patched forward."""
    calls = []
    real = lkp.lora_linear

    def counting(*args, **kwargs):
        calls.append(kwargs.get("dropout_p", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(lkp, "lora_linear", counting)
    return calls


@pytest.fixture(autouse=True)
def _fresh_log_state():
    lkp._logged_reasons.clear()
    yield
    lkp._logged_reasons.clear()


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def _compare_fwd_bwd(ref, pat, inputs, loss_fn, tol=FP32):
    out_ref, out_pat = ref(inputs), pat(inputs)
    assert_close_rel(out_pat, out_ref, tol, "output")
    loss_fn(out_ref).backward()
    loss_fn(out_pat).backward()
    g_ref, g_pat = _lora_grads(ref), _lora_grads(pat)
    assert g_ref.keys() == g_pat.keys() and g_ref
    for n in g_ref:
        assert_close_rel(g_pat[n], g_ref[n], tol, n)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_mlp_matches_peft(bias, use_rslora, fused_calls):
    ref = _mlp_peft(bias=bias, use_rslora=use_rslora, r=3, lora_alpha=5)
    pat = copy.deepcopy(ref)
    report = lkp.patch(pat)  # default backend: auto (the Triton interpreter on a CPU test machine)
    assert report.num_patched == 3 and not report.skipped
    x = torch.randn(2, 5, 24)
    _compare_fwd_bwd(ref, pat, x, lambda y: (y * torch.linspace(-1, 1, 17)).sum())
    assert len(fused_calls) == 3


def test_tiny_llama_matches_peft(fused_calls):
    ref = _tiny_llama_peft()
    pat = copy.deepcopy(ref)
    report = lkp.patch(pat, backend="torch")
    assert report.num_patched == 14 and not report.skipped
    ids = torch.randint(0, 97, (2, 11))
    out_ref = ref(input_ids=ids, labels=ids)
    out_pat = pat(input_ids=ids, labels=ids)
    assert len(fused_calls) == 14
    assert_close_rel(out_pat.logits, out_ref.logits, FP32, "logits")
    out_ref.loss.backward()
    out_pat.loss.backward()
    g_ref, g_pat = _lora_grads(ref), _lora_grads(pat)
    assert len(g_ref) == 28
    for n in g_ref:
        assert_close_rel(g_pat[n], g_ref[n], FP32, n)


def test_patch_shares_parameters_and_optimizer_before_patching_trains():
    ref = _mlp_peft()
    pat = copy.deepcopy(ref)
    params_before = [id(p) for p in pat.parameters()]
    opt_ref = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05)
    opt_pat = torch.optim.SGD([p for p in pat.parameters() if p.requires_grad], lr=0.05)  # built BEFORE patch
    lkp.patch(pat, backend="torch")
    assert [id(p) for p in pat.parameters()] == params_before
    assert set(pat.state_dict()) == set(ref.state_dict())
    for step in range(3):
        x = torch.randn(6, 24)
        for m, opt in ((ref, opt_ref), (pat, opt_pat)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (n, p_ref), (_, p_pat) in zip(ref.named_parameters(), pat.named_parameters()):
        assert_close_rel(p_pat, p_ref, FP32, n)
    # and the LoRA weights did move
    assert not torch.equal(pat.base_model.model.fc1.lora_B["default"].weight, _mlp_peft().base_model.model.fc1.lora_B["default"].weight)


def test_two_adapters_set_adapter_switching(fused_calls):
    ref = _mlp_peft(r=4, lora_alpha=8)
    ref.add_adapter("other", LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["fc1", "fc2"], init_lora_weights=False))
    pat = copy.deepcopy(ref)
    lkp.patch(pat, backend="torch")
    x = torch.randn(7, 24)
    for name, n_fused in (("default", 3), ("other", 2), ("default", 3)):
        ref.set_adapter(name)
        pat.set_adapter(name)
        fused_calls.clear()
        with torch.no_grad():
            assert_close_rel(pat(x), ref(x), FP32, f"adapter {name}")
        assert len(fused_calls) == n_fused
    # set_scale changes PEFT's live scaling dict; the fused path reads it each call
    for m in (ref, pat):
        m.base_model.model.fc1.set_scale("default", 0.5)
    with torch.no_grad():
        assert_close_rel(pat(x), ref(x), FP32, "after set_scale")


def test_several_active_adapters_fall_back_and_log_once(fused_calls, caplog):
    ref = _mlp_peft()
    ref.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "proj", "fc2"], init_lora_weights=False))
    pat = copy.deepcopy(ref)
    lkp.patch(pat, backend="torch")
    for m in (ref, pat):
        m.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 24)
    with caplog.at_level(logging.WARNING, logger="lora_kernels.peft"):
        with torch.no_grad():
            for _ in range(3):
                assert_close_rel(pat(x), ref(x), FP32, "two active adapters")
    assert not fused_calls
    msgs = [r.getMessage() for r in caplog.records if "several active adapters" in r.getMessage()]
    assert len(msgs) == 1, msgs


def test_disable_adapter_context(fused_calls):
    ref = _mlp_peft()
    pat = copy.deepcopy(ref)
    lkp.patch(pat, backend="torch")
    x = torch.randn(5, 24)
    with torch.no_grad():
        with pat.disable_adapter():
            y_off = pat(x)
        assert not fused_calls
        with ref.disable_adapter():
            assert_close_rel(y_off, ref(x), FP32, "disabled")
        y_on = pat(x)
        assert len(fused_calls) == 3
        assert_close_rel(y_on, ref(x), FP32, "re-enabled")
        assert (y_on - y_off).abs().max() > 1e-3  # the adapter is visible


def test_merge_unmerge_while_patched(fused_calls):
    ref = _mlp_peft()
    pat = copy.deepcopy(ref)
    lkp.patch(pat, backend="torch")
    x = torch.randn(5, 24)
    with torch.no_grad():
        y_ref = ref(x)
        pat.merge_adapter()
        y_merged = pat(x)
        assert not fused_calls  # merged: PEFT's base-only path
        assert_close_rel(y_merged, y_ref, 1e-5, "merged")
        pat.unmerge_adapter()
        y_unmerged = pat(x)
        assert len(fused_calls) == 3
        assert_close_rel(y_unmerged, y_ref, 1e-5, "unmerged")
        # merge_and_unload gives a plain model with the same function
        plain = copy.deepcopy(pat).merge_and_unload()
        assert not any(isinstance(m, peft_lora.LoraLayer) for m in plain.modules())
        assert_close_rel(plain(x), y_ref, 1e-5, "merge_and_unload")


def test_dropout_train_and_eval(fused_calls):
    ref = _mlp_peft(lora_dropout=0.25)
    pat = copy.deepcopy(ref)
    lkp.patch(pat, backend="torch")
    x = torch.randn(64, 24)
    pat.train()
    torch.manual_seed(1)
    y1 = pat(x)
    torch.manual_seed(1)
    y2 = pat(x)
    assert fused_calls[:3] == [0.25, 0.25, 0.25]
    assert torch.equal(y1, y2)  # seeded mask drawn from torch's generator: reproducible
    with torch.no_grad():
        pat.eval()
        ref.eval()
        fused_calls.clear()
        y_eval = pat(x)
        assert fused_calls == [0.0, 0.0, 0.0]
        assert_close_rel(y_eval, ref(x), FP32, "eval (no dropout)")
        assert (y1 - y_eval).abs().max() > 1e-4  # dropout did act in train mode


def test_dora_layers_take_the_fused_path_quietly(fused_calls, caplog):
    """PEFT DoRA layers run lora_linear(..., magnitude=) (tests/test_dora.py compares outputs and gradients in
    depth); nothing is skipped or logged."""
    ref = _mlp_peft(use_dora=True)
    pat = copy.deepcopy(ref)
    with caplog.at_level(logging.WARNING, logger="lora_kernels.peft"):
        report = lkp.patch(pat, backend="torch")
        x = torch.randn(3, 24)
        with torch.no_grad():
            for _ in range(2):
                assert_close_rel(pat(x), ref(x), FP32, "dora")
    assert report.num_patched == 3 and not report.skipped
    assert len(fused_calls) == 6
    assert not [r for r in caplog.records if "DoRA" in r.getMessage()]


def test_unsupported_lora_bias_skipped():
    ref = _mlp_peft(lora_bias=True)
    report = lkp.patch(ref)
    assert report.num_patched == 0 and "lora_bias" in next(iter(report.skipped))


def test_unpatch_restores_exactly():
    pat = _mlp_peft()
    fc1 = pat.base_model.model.fc1
    sentinel_calls = []

    def instance_forward(self, x):  # a pre-existing instance-level forward (as accelerate hooks install)
        sentinel_calls.append(1)
        return type(self).forward(self, x)

    fc1.forward = types.MethodType(instance_forward, fc1)
    prev = fc1.__dict__["forward"]
    x = torch.randn(2, 24)
    with torch.no_grad():
        y0 = pat(x)
        assert lkp.patch(pat, backend="torch").num_patched == 3
        assert fc1.__dict__["forward"] is not prev
        assert lkp.unpatch(pat) == 3
        assert fc1.__dict__["forward"] is prev
        for m in pat.modules():
            if isinstance(m, peft_lora.Linear) and m is not fc1:
                assert "forward" not in m.__dict__
            assert not lkp.is_patched(m)
        sentinel_calls.clear()
        assert torch.equal(pat(x), y0)
        assert sentinel_calls == [1]
    assert lkp.unpatch(pat) == 0


def test_save_pretrained_after_patched_training_round_trips(tmp_path):
    pat = _mlp_peft()
    lkp.patch(pat, backend="torch")
    opt = torch.optim.AdamW([p for p in pat.parameters() if p.requires_grad], lr=1e-2)  # built AFTER patch
    for _ in range(4):
        opt.zero_grad()
        pat(torch.randn(8, 24)).square().mean().backward()
        opt.step()
    pat.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = MLP(bias=True)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    x = torch.randn(4, 24)
    with torch.no_grad():
        assert_close_rel(loaded(x), pat(x), FP32, "reloaded")
        assert_close_rel(
            loaded.base_model.model.fc2.lora_B["default"].weight, pat.base_model.model.fc2.lora_B["default"].weight, 0.0, "B"
        )


def test_patch_plain_module_without_peft_layers_is_noop():
    m = MLP()
    report = lkp.patch(m)
    assert report.num_patched == 0 and not report.skipped


def test_e2e_bench_llama_tiny_smoke(tmp_path):
    pytest.importorskip("transformers")
    from lora_kernels.benchmarking.e2e import run_model_bench

    out = run_model_bench("llama-tiny", device="cpu", steps=2, warmup=0, seq=8, batch=2, backend="torch",
                          out_json=str(tmp_path / "e2e.json"), out_png=None, verbose=False)
    assert set(out["results"]) == {"peft", "peft+patch", "inject_lora"}
    for res in out["results"].values():
        assert res["tokens_per_s"] > 0 and len(res["losses"]) == 2
        assert res["max_abs_loss_diff_vs_peft"] < 1e-4  # same init, same data, dropout 0: same training
    assert (tmp_path / "e2e.json").is_file()
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in run_model_bench("llama-7b-layer", verbose=False)["skipped"]


def test_bf16_base_with_fp32_adapters(fused_calls):
    """PEFT's default keeps adapters in fp32 over a bf16 base; the fused path casts them to bf16 (within bf16 tolerance)."""
    torch.manual_seed(0)
    ref = get_peft_model(MLP().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "proj", "fc2"], init_lora_weights=False))
    assert ref.base_model.model.fc1.lora_A["default"].weight.dtype == torch.float32
    pat = copy.deepcopy(ref)
    lkp.patch(pat, backend="torch")
    x = torch.randn(9, 24, dtype=torch.bfloat16)
    y_ref, y_pat = ref(x), pat(x)
    assert y_pat.dtype == torch.bfloat16 and len(fused_calls) == 3
    assert_close_rel(y_pat, y_ref, TOL[torch.bfloat16], "bf16 output")
    y_ref.float().square().sum().backward()
    y_pat.float().square().sum().backward()
    g_ref, g_pat = _lora_grads(ref), _lora_grads(pat)
    for n in g_ref:
        assert g_pat[n].dtype == torch.float32
        assert_close_rel(g_pat[n], g_ref[n], 2 * TOL[torch.bfloat16], n)


def test_mixed_adapter_batch_falls_back(fused_calls):
    ref = _mlp_peft()
    ref.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "proj", "fc2"], init_lora_weights=False))
    pat = copy.deepcopy(ref)
    lkp.patch(pat, backend="torch")
    x = torch.randn(3, 24)
    names = ["default", "other", "__base__"]
    ref.eval()
    pat.eval()
    with torch.no_grad():
        assert_close_rel(pat(x, adapter_names=names), ref(x, adapter_names=names), FP32, "mixed batch")
    assert not fused_calls


def test_deepcopy_of_patched_model_is_independent(fused_calls):
    pat = _mlp_peft()
    lkp.patch(pat, backend="torch")
    twin = copy.deepcopy(pat)
    assert all(lkp.is_patched(m) for m in twin.modules() if isinstance(m, peft_lora.Linear))
    fc1 = twin.base_model.model.fc1
    assert fc1.forward.__self__ is fc1  # bound to the copy, not the original
    x = torch.randn(2, 24)
    with torch.no_grad():
        assert torch.equal(twin(x), pat(x))
    assert len(fused_calls) == 6
    lkp.unpatch(twin)
    assert all(lkp.is_patched(m) for m in pat.modules() if isinstance(m, peft_lora.Linear))


@pytest.mark.gpu
def test_tiny_llama_bf16_cuda_matches_peft():
    ref = _tiny_llama_peft().to("cuda", torch.bfloat16)  # adapters bf16 too: same dtype as the base
    pat = copy.deepcopy(ref)
    report = lkp.patch(pat)  # auto backend: the CUDA extension or Triton
    assert report.num_patched == 14
    ids = torch.randint(0, 97, (2, 33), device="cuda")
    out_ref, out_pat = ref(input_ids=ids, labels=ids), pat(input_ids=ids, labels=ids)
    assert_close_rel(out_pat.logits, out_ref.logits, TOL[torch.bfloat16], "bf16 logits")
    out_ref.loss.backward()
    out_pat.loss.backward()
    g_ref, g_pat = _lora_grads(ref), _lora_grads(pat)
    for n in g_ref:
        assert_close_rel(g_pat[n], g_ref[n], 3 * TOL[torch.bfloat16], n)
