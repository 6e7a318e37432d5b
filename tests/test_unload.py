"""merge_and_unload / unload: plain nn.Linear back, HF save_pretrained of the result reloads with no lora_* keys and
the LoRA model's logits; tied lm_head refused or untied."""

import warnings

import pytest
import torch
from torch import nn

from conftest import TOL, assert_close_rel

import lora_kernels as lk
from lora_kernels import LoRAInputError, LoRALinear
from lora_kernels.ops.merge import BITS_DTYPE

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def _llama(tie=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _randomize(model, std=0.2):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for n in m.adapter_names:
                    for p in m.adapter_weights(n):
                        p.normal_(0, std)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_merge_and_unload_save_pretrained_round_trip(tmp_path):
    model = _llama()
    lk.inject_lora(model, ["q_proj", "v_proj", "o_proj", "down_proj"], 4, 8, backend="torch")
    lk.add_adapter(model, "b", ["q_proj", "down_proj"], 3, 6)
    _randomize(model)
    lk.set_adapter(model, ["default", "b"])
    ids = torch.randint(0, 61, (2, 9))
    want = _logits(model, ids)
    model.model.layers[0].self_attn.q_proj.merge()  # one layer already merged: kept as merged
    out = lk.merge_and_unload(model)
    assert out is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model.model.layers[i].self_attn.q_proj) is nn.Linear for i in range(2))
    assert not [k for k in model.state_dict() if "lora" in k]
    assert_close_rel(_logits(model, ids), want, TOL[torch.float32], "unloaded vs LoRA model")
    model.save_pretrained(tmp_path)
    back, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"], info
    assert_close_rel(_logits(back.eval(), ids), want, TOL[torch.float32], "reloaded vs LoRA model")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merged_weight_bits(dtype):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(37, 29).to(dtype), nn.Linear(29, 11).to(dtype))
    w0 = [base[i].weight.detach().clone() for i in range(2)]
    lk.inject_lora(base, ["0", "1"], 5, 10, backend="torch")
    _randomize(base)
    base[0].merge()
    merged_bits = base[0].weight.detach().clone()
    ref = w0[1].clone()
    lk.merge_(ref, base[1].lora_A, base[1].lora_B, base[1].scale, backend="torch")
    x = torch.randn(4, 37, dtype=dtype)
    want = base(x)
    lk.merge_and_unload(base)
    bits = BITS_DTYPE[dtype]
    assert torch.equal(base[0].weight.view(bits), merged_bits.view(bits))  # already merged: left as it was
    assert torch.equal(base[1].weight.view(bits), ref.view(bits))  # merge_: the value merge() writes
    assert_close_rel(base(x), want, TOL[dtype])


def test_unload_restores_base_bits():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(16, 24).to(torch.bfloat16), nn.Linear(24, 8).to(torch.bfloat16))
    w0 = [net[i].weight.detach().clone() for i in range(2)]
    lk.inject_lora(net, ["0", "1"], 4, 8, backend="torch")
    _randomize(net, 0.5)
    net[0].merge()
    lk.unload(net)
    for i in range(2):
        assert type(net[i]) is nn.Linear
        assert torch.equal(net[i].weight.view(torch.int16), w0[i].view(torch.int16))


def test_disabled_adapters_are_not_merged():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(16, 24))
    w0 = net[0].weight.detach().clone()
    lk.inject_lora(net, ["0"], 4, 8, backend="torch")
    _randomize(net)
    lk.disable_adapters(net)
    lk.merge_and_unload(net)
    assert torch.equal(net[0].weight, w0)


def test_tied_lm_head_refused_or_untied(tmp_path):
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb0 = model.model.embed_tokens.weight.detach().clone()
    lk.inject_lora(model, ["lm_head", "q_proj"], 4, 8, backend="torch")
    _randomize(model)
    ids = torch.randint(0, 61, (2, 7))
    want = _logits(model, ids)
    with pytest.raises(LoRAInputError, match=r"lm_head.weight is tied to model.embed_tokens.weight.*tied='untie'"):
        lk.merge_and_unload(model)
    assert isinstance(model.lm_head, LoRALinear) and torch.equal(model.model.embed_tokens.weight, emb0)  # untouched
    with pytest.warns(UserWarning, match="tie is broken"):
        lk.merge_and_unload(model, tied="untie")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, emb0)
    assert model.config.tie_word_embeddings is False
    assert_close_rel(_logits(model, ids), want, TOL[torch.float32], "untied unload")
    model.save_pretrained(tmp_path)
    back, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    assert_close_rel(_logits(back.eval(), ids), want, TOL[torch.float32], "untied reload")


def test_tied_merge_mode_warns_and_changes_shared_matrix():
    model = _llama(tie=True)
    lk.inject_lora(model, ["lm_head"], 4, 8, backend="torch")
    _randomize(model)
    emb0 = model.model.embed_tokens.weight.detach().clone()
    with pytest.warns(UserWarning, match="changes those modules too"):
        lk.merge_and_unload(model, tied="merge")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(model.model.embed_tokens.weight, emb0)


def test_nothing_to_unload_and_bad_tied():
    with pytest.raises(LoRAInputError, match="no LoRA layers"):
        lk.merge_and_unload(nn.Sequential(nn.Linear(3, 3)))
    net = lk.inject_lora(nn.Sequential(nn.Linear(3, 3)), ["0"], 2, 2)
    with pytest.raises(LoRAInputError, match="tied must be"):
        lk.merge_and_unload(net, tied="yes")


# ----------------------------------------------------------------------------------------------------------------
# Merge records follow copy.deepcopy; state_dict says it cannot carry them
# ----------------------------------------------------------------------------------------------------------------


def _bits(t):
    return t.detach().view(BITS_DTYPE[t.dtype]).clone() if t.dtype in BITS_DTYPE else t.detach().clone()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_deepcopy_of_merged_bf16_model_unmerges_bit_exactly(arch):
    import copy

    if arch == "llama":
        model = _llama(dtype=torch.bfloat16)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    else:  # transformers Conv1D (weight [K, N]): the record describes the transposed view
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).to(torch.bfloat16)
        targets = ["c_attn", "c_proj", "c_fc"]
    lk.inject_lora(model, targets, 4, 8, backend="torch")
    _randomize(model, 0.3)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = {id(m): _bits(m.weight) for m in layers}
    for m in layers:
        m.merge()
    assert any(m._merge_record.n_repairs for m in layers)  # the plain unmerge would not restore these bits
    twin = copy.deepcopy(model)
    twin_layers = [m for m in twin.modules() if isinstance(m, LoRALinear)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "exact unmerge impossible" warning
        for m, t in zip(layers, twin_layers):
            assert t.weight.data_ptr() != m.weight.data_ptr()
            t.unmerge()
            assert torch.equal(_bits(t.weight), before[id(m)])
        for m in layers:  # the original keeps its own record
            m.unmerge()
            assert torch.equal(_bits(m.weight), before[id(m)])


def test_deepcopy_of_a_stale_record_still_warns():
    import copy

    net = lk.inject_lora(nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16)), ["0"], 2, 4, backend="torch")
    _randomize(net)
    net[0].merge()
    with torch.no_grad():
        net[0].weight.add_(1)  # the record no longer describes the weight
    twin = copy.deepcopy(net)
    with pytest.warns(RuntimeWarning, match="exact unmerge impossible"):
        twin[0].unmerge()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_state_dict_carries_the_merge_record(tmp_path, dtype):
    """A merged model's state dict -> torch.save / safetensors -> a fresh (unmerged) LoRA model: it is merged, its
    output is the merged one, and unmerge() restores W0 bit for bit, without a warning."""
    from safetensors.torch import load_file, save_file

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 8)).to(dtype)
        return lk.inject_lora(m, ["0", "2"], 4, 8, backend="torch")

    net = build()
    _randomize(net, 0.3)
    w0 = [_bits(net[i].weight) for i in (0, 2)]
    unmerged_keys = sorted(net.state_dict())
    assert "0.lora_merge_record" not in unmerged_keys  # an unmerged layer's keys are unchanged
    for i in (0, 2):
        net[i].merge()
    assert net[0]._merge_record.n_repairs > 0
    x = torch.randn(3, 24, dtype=dtype)
    want = net(x)
    sd = net.state_dict()
    assert sorted(sd) == sorted(unmerged_keys + ["0.lora_merge_record", "2.lora_merge_record"])
    torch.save(sd, tmp_path / "sd.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "sd.safetensors"))
    for loaded in (torch.load(tmp_path / "sd.pt", weights_only=True), load_file(str(tmp_path / "sd.safetensors"))):
        fresh = build()
        fresh.load_state_dict(loaded, strict=True)
        assert fresh[0].merged and fresh[2].merged
        assert torch.equal(fresh(x), want)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for i, w in zip((0, 2), w0):
                fresh[i].unmerge()
                assert torch.equal(_bits(fresh[i].weight), w)
    # an unmerged state dict loaded into a merged layer: the layer is unmerged (its weight is W0 now)
    net2 = build()
    net2[0].merge()
    net2.load_state_dict(build().state_dict())
    assert not net2[0].merged and torch.equal(_bits(net2[0].weight), w0[0])
    # a plain model takes the merged weights once the lora_* keys are dropped
    plain = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 8)).to(dtype)
    plain.load_state_dict({k: v for k, v in sd.items() if "lora_" not in k})
    assert torch.equal(plain(x), want)


def test_state_dict_of_a_stale_merge_warns():
    net = lk.inject_lora(nn.Sequential(nn.Linear(8, 8)), ["0"], 2, 4, backend="torch")
    net[0].merge()
    with torch.no_grad():
        net[0].weight.add_(1)  # the record no longer describes the weight
    with pytest.warns(UserWarning, match="merge record cannot be saved"):
        assert "0.lora_merge_record" not in net.state_dict()


def test_gpt2_conv1d_merge_and_unload_save_pretrained(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    lk.inject_lora(model, ["c_attn", "c_proj"], 4, 8, backend="torch")
    lk.add_adapter(model, "b", ["c_attn"], 2, 2)
    _randomize(model)
    lk.set_adapter(model, ["default", "b"])
    ids = torch.randint(0, 50, (2, 9))
    want = _logits(model, ids)
    lk.merge_and_unload(model)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D and type(model.transformer.h[1].mlp.c_proj) is Conv1D
    assert_close_rel(_logits(model, ids), want, TOL[torch.float32], "unloaded GPT-2")
    model.save_pretrained(tmp_path)
    back, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    assert_close_rel(_logits(back.eval(), ids), want, TOL[torch.float32], "reloaded GPT-2")


def test_embedding_and_linear_merge_and_unload_save_pretrained(tmp_path):
    model = _llama()
    lk.inject_lora(model, ["embed_tokens", "q_proj", "lm_head"], 4, 8, backend="torch")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LoRALinear, lk.LoRAEmbedding)):
                m.lora_A.normal_(0, 0.3)
                m.lora_B.normal_(0, 0.3)
    ids = torch.randint(0, 61, (2, 9))
    want = _logits(model, ids)
    lk.merge_and_unload(model)
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert_close_rel(_logits(model, ids), want, TOL[torch.float32], "unloaded embedding + linear")
    model.save_pretrained(tmp_path)
    back, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    assert_close_rel(_logits(back.eval(), ids), want, TOL[torch.float32], "reloaded")


def test_dora_layers_merge_with_their_own_merge():
    import inspect

    if "use_dora" not in inspect.signature(LoRALinear.__init__).parameters:
        pytest.skip("LoRALinear has no use_dora in this tree")
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    lk.inject_lora(net, ["0", "2"], 4, 8, backend="torch", use_dora=True)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.3)
                m.lora_magnitude.mul_(1.5)
    x = torch.randn(5, 16)
    want = net(x).detach()
    w0 = [net[i].weight.detach().clone() for i in (0, 2)]
    try:
        net[0].merge()
        net[0].unmerge()
    except NotImplementedError:  # DoRA merge not implemented in this tree: refused, the model unchanged
        with pytest.raises(LoRAInputError, match="cannot merge the DoRA layer 0"):
            lk.merge_and_unload(net)
        assert isinstance(net[0], LoRALinear) and all(torch.equal(net[i].weight, w) for i, w in zip((0, 2), w0))
        lk.unload(net)
        assert type(net[0]) is nn.Linear and torch.equal(net[0].weight, w0[0])
        return
    lk.merge_and_unload(net)
    assert type(net[0]) is nn.Linear and type(net[2]) is nn.Linear
    assert_close_rel(net(x), want, TOL[torch.float32], "DoRA merged and unloaded")


def test_embedding_merge_record_follows_deepcopy_and_state_dict():
    import copy

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Embedding(50, 24), nn.Linear(24, 8)).to(torch.bfloat16)
        return lk.inject_lora(m, ["0", "1"], 4, 8, backend="torch")

    net = build()
    with torch.no_grad():
        for m in net:
            m.lora_A.normal_(0, 0.5)
            m.lora_B.normal_(0, 0.5)
    w0 = [_bits(m.weight) for m in net]
    for m in net:
        m.merge()
    assert net[0]._merge_record.n_repairs > 0
    ids = torch.randint(0, 50, (3, 7))
    want = net(ids)
    twin = copy.deepcopy(net)
    sd = net.state_dict()
    assert "0.lora_merge_record" in sd and "1.lora_merge_record" in sd
    fresh = build()
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh(ids), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model in (twin, fresh, net):
            for m, w in zip(model, w0):
                m.unmerge()
                assert torch.equal(_bits(m.weight), w)
