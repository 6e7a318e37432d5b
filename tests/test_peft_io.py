"""lora_kernels.peft_io: adapters saved by lora_kernels load in PEFT and vice versa, with the same outputs."""

import copy
import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from conftest import TOL, assert_close_rel  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels.peft_io import load_peft_adapter_, read_peft_adapter, save_peft_adapter  # noqa: E402

FP32 = TOL[torch.float32]


class Net(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.ModuleDict({"q_proj": nn.Linear(20, 20, bias=bias), "v_proj": nn.Linear(20, 12, bias=bias)}) for _ in range(2)]
        )
        self.head = nn.Linear(12, 5, bias=bias)

    def forward(self, x):
        for blk in self.layers:
            x = torch.tanh(blk["q_proj"](x))
            h = blk["v_proj"](x)
        return self.head(h)


def _base(seed=0, bias=True):
    torch.manual_seed(seed)
    return Net(bias=bias)


def _randomize_lora_(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora_kernels.LoRALinear):
                m.lora_B.normal_(0, 0.3)
                m.lora_A.normal_(0, 0.3)


def _ours(seed=0, **kw):
    base = _base(seed)
    kw.setdefault("r", 4)
    kw.setdefault("alpha", 8)
    model = lora_kernels.inject_lora(base, ["q_proj", "v_proj"], backend="torch", **kw)
    _randomize_lora_(model)
    return model


def test_ours_save_peft_load_same_outputs(tmp_path):
    ours = _ours(use_rslora=True, alpha=6)
    cfg = save_peft_adapter(ours, tmp_path, base_model_name_or_path="toy/net")
    assert (tmp_path / "adapter_model.safetensors").is_file()
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["target_modules"] == ["q_proj", "v_proj"] == cfg["target_modules"]
    assert on_disk["r"] == 4 and on_disk["lora_alpha"] == 6 and on_disk["use_rslora"] is True
    assert on_disk["base_model_name_or_path"] == "toy/net"
    peft_model = PeftModel.from_pretrained(_base(), tmp_path)
    x = torch.randn(3, 20)
    with torch.no_grad():
        assert_close_rel(peft_model(x), ours(x), FP32, "PEFT-loaded vs ours")
        lay = peft_model.base_model.model.layers[1]["v_proj"]
        assert math.isclose(lay.scaling["default"], 6 / math.sqrt(4))
        assert torch.equal(lay.lora_B["default"].weight, ours.layers[1]["v_proj"].lora_B)


def test_save_mixed_ranks_and_partial_targets(tmp_path):
    base = _base()
    # only layer 0's q_proj at r=4, every v_proj at r=2 / alpha 3: needs full-path targets and a rank_pattern
    lora_kernels.inject_lora(base, r"layers\.0\.q_proj", r=4, alpha=8, backend="torch")
    lora_kernels.inject_lora(base, ["v_proj"], r=2, alpha=3, backend="torch")
    _randomize_lora_(base)
    cfg = save_peft_adapter(base, tmp_path)
    assert cfg["target_modules"] == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.v_proj"]
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    peft_model = PeftModel.from_pretrained(_base(), tmp_path)
    assert not hasattr(peft_model.base_model.model.layers[1]["q_proj"], "lora_A")
    assert peft_model.base_model.model.layers[1]["v_proj"].r["default"] == 2
    x = torch.randn(5, 20)
    with torch.no_grad():
        assert_close_rel(peft_model(x), base(x), FP32, "mixed ranks")
    _, adapters = read_peft_adapter(tmp_path)
    assert adapters["layers.0.q_proj"][2] == 2.0 and adapters["layers.1.v_proj"][2] == 1.5


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_save_ours_load_same_outputs(tmp_path, use_rslora):
    torch.manual_seed(1)
    peft_model = get_peft_model(
        _base(), LoraConfig(r=4, lora_alpha=7, use_rslora=use_rslora, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path)
    ours = lora_kernels.inject_lora(_base(), ["q_proj", "v_proj"], r=4, alpha=7, use_rslora=use_rslora, backend="torch")
    load_peft_adapter_(ours, tmp_path)
    x = torch.randn(6, 20)
    with torch.no_grad():
        assert_close_rel(ours(x), peft_model(x), FP32, "ours-loaded vs PEFT")


def test_peft_save_with_lora_only_bias(tmp_path):
    torch.manual_seed(2)
    peft_model = get_peft_model(_base(), LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"], bias="lora_only", init_lora_weights=False))
    with torch.no_grad():
        peft_model.base_model.model.layers[0]["v_proj"].base_layer.bias.add_(1.0)  # a trained bias
    peft_model.save_pretrained(tmp_path)
    ours = lora_kernels.inject_lora(_base(), ["v_proj"], r=2, alpha=2, backend="torch")
    load_peft_adapter_(ours, tmp_path)
    x = torch.randn(4, 20)
    with torch.no_grad():
        assert_close_rel(ours(x), peft_model(x), FP32, "with bias")


def test_read_peft_adapter_shapes_and_scales(tmp_path):
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.q_proj": 3})
    get_peft_model(_base(), cfg).save_pretrained(tmp_path)
    config, adapters = read_peft_adapter(tmp_path)
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert sorted(adapters) == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    a, b, s = adapters["layers.0.q_proj"]
    assert a.shape == (4, 20) and b.shape == (20, 4) and s == 2.0
    a, b, s = adapters["layers.1.v_proj"]
    assert a.shape == (2, 20) and b.shape == (12, 2) and s == 4.0
    assert adapters["layers.1.q_proj"][2] == 0.75


def test_load_errors_are_clear(tmp_path):
    get_peft_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    wrong_r = lora_kernels.inject_lora(_base(), ["q_proj", "v_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match="lora_A"):
        load_peft_adapter_(wrong_r, tmp_path)
    wrong_alpha = lora_kernels.inject_lora(_base(), ["q_proj", "v_proj"], r=4, alpha=16)
    before = wrong_alpha.layers[0]["q_proj"].lora_A.detach().clone()
    with pytest.raises(ValueError, match="scale"):
        load_peft_adapter_(wrong_alpha, tmp_path)
    assert torch.equal(wrong_alpha.layers[0]["q_proj"].lora_A, before)  # nothing written on error
    load_peft_adapter_(wrong_alpha, tmp_path, adopt_scale=True)
    assert wrong_alpha.layers[0]["q_proj"].scale == 2.0
    fewer = lora_kernels.inject_lora(_base(), ["q_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="not LoRALinear"):
        load_peft_adapter_(fewer, tmp_path)
    more = lora_kernels.inject_lora(_base(), ["q_proj", "v_proj", "head"], r=4, alpha=8)
    with pytest.raises(ValueError, match="no weights in the adapter"):
        load_peft_adapter_(more, tmp_path)
    load_peft_adapter_(more, tmp_path, strict=False)
    with pytest.raises(FileNotFoundError):
        read_peft_adapter(tmp_path / "nope")


def test_dora_adapter_is_read_and_refused_by_plain_modules(tmp_path):
    """A PEFT DoRA adapter reads as (A, B, scale, m) (tests/test_dora_serving.py has the rest); loading it into plain
    LoRALinear modules is refused, naming DoRA."""
    get_peft_model(_base(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path)
    config, adapters = read_peft_adapter(tmp_path)
    assert config["use_dora"] and all(len(v) == 4 for v in adapters.values())
    plain = lora_kernels.inject_lora(_base(), ["q_proj"], r=2, alpha=8, backend="torch")
    with pytest.raises(ValueError, match="DoRA"):
        load_peft_adapter_(plain, tmp_path)


def test_round_trip_ours_to_ours(tmp_path):
    ours = _ours()
    save_peft_adapter(ours, tmp_path)
    other = lora_kernels.inject_lora(_base(), ["q_proj", "v_proj"], r=4, alpha=8, backend="torch")
    load_peft_adapter_(other, tmp_path)
    for (n, p), (_, q) in zip(ours.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q), n


def test_tiny_llama_ours_save_peft_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    fresh = copy.deepcopy(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora_kernels.inject_lora(base, targets, r=4, alpha=8, backend="torch")
    _randomize_lora_(base)
    save_peft_adapter(base, tmp_path)
    peft_model = PeftModel.from_pretrained(fresh, tmp_path)
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        assert_close_rel(peft_model(input_ids=ids).logits, base(input_ids=ids).logits, FP32, "llama logits")


def test_load_peft_into_slots(tmp_path):
    serving = pytest.importorskip("lora_kernels.serving")
    from lora_kernels.peft_io import load_peft_into_slots

    torch.manual_seed(4)
    get_peft_model(_base(), LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(tmp_path)
    _, adapters = read_peft_adapter(tmp_path)
    slots = serving.AdapterSlots(num_slots=2, r_max=4, in_features=20, out_features=[20, 12], dtype=torch.float32)
    load_peft_into_slots(slots, tmp_path, ["layers.0.q_proj", "layers.0.v_proj"], 1, name="a")
    assert slots.slot_of("a") == 1 and int(slots.ranks[1]) == 3 and float(slots.scales[1]) == 2.0
    assert torch.equal(slots.lora_a[1][1, :3], adapters["layers.0.v_proj"][0])
    assert torch.equal(slots.lora_b[0][1, :, :3], adapters["layers.0.q_proj"][1])
    assert torch.count_nonzero(slots.lora_a[0][1, 3:]) == 0
    with pytest.raises(KeyError):
        load_peft_into_slots(slots, (None, adapters), "layers.0.head", 0)


def test_ours_save_biases_peft_load(tmp_path):
    ours = _ours()
    with torch.no_grad():
        ours.layers[1]["v_proj"].bias.add_(0.5)  # a trained bias
    save_peft_adapter(ours, tmp_path, save_biases=True)
    peft_model = PeftModel.from_pretrained(_base(), tmp_path)
    x = torch.randn(3, 20)
    with torch.no_grad():
        assert_close_rel(peft_model(x), ours(x), FP32, "PEFT-loaded with biases")
    other = lora_kernels.inject_lora(_base(), ["q_proj", "v_proj"], r=4, alpha=8, backend="torch")
    load_peft_adapter_(other, tmp_path)
    assert torch.equal(other.layers[1]["v_proj"].bias, ours.layers[1]["v_proj"].bias)
