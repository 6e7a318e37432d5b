"""Drop-in behaviour a user of nn.Linear / PEFT relies on (regression tests of issue 11's defects)."""

import pytest
import torch
from torch import nn

import lora_kernels as lk
from conftest import HAS_CUDA

BACKENDS = ["torch", "triton"] + (["cuda"] if HAS_CUDA else [])


def _layer(backend, dropout=0.0):
    torch.manual_seed(0)
    layer = lk.LoRALinear(nn.Linear(12, 10), r=4, alpha=8, dropout=dropout, backend=backend)
    nn.init.normal_(layer.lora_B)
    return layer


# ------------------------------------------------------------------ in-place ops on our outputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_inplace_on_output_like_nn_linear(backend, lead):
    layer = _layer(backend)
    x = torch.randn(*lead, 12, requires_grad=True)
    y = layer(x)
    assert not y._is_view(), "the output must not be a view (in-place ops and FSDP2 rely on it)"
    y += 1
    torch.relu_(y)
    (y * 2).sum().backward()
    # the same ops on the reference formula give the same gradients
    x2 = x.detach().clone().requires_grad_(True)
    ref = nn.functional.linear(x2, layer.weight, layer.bias) + layer.scale * (x2 @ layer.lora_A.t()) @ layer.lora_B.t()
    ((ref + 1).relu() * 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_relu_inplace_after_layer_in_sequential():
    model = nn.Sequential(_layer("torch"), nn.ReLU(inplace=True), nn.Linear(10, 3))
    x = torch.randn(4, 12)
    model(x).sum().backward()
    assert model[0].lora_B.grad is not None


# ------------------------------------------------------------------ seeds


@pytest.mark.parametrize("seed", [1.5, "3", [1]])
def test_seed_must_be_an_int(seed):
    x, w, a, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    with pytest.raises(lk.LoRAInputError, match="seed must be an int"):
        lk.lora_linear(x, w, a, b, 0.5, dropout_p=0.1, seed=seed)


def test_seed_accepts_integer_types():
    import numpy as np

    x, w, a, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    y1 = lk.lora_linear(x, w, a, b, 0.5, dropout_p=0.3, seed=np.int64(7))
    y2 = lk.lora_linear(x, w, a, b, 0.5, dropout_p=0.3, seed=7)
    assert torch.equal(y1, y2)


def test_compile_with_dropout_has_no_graph_break():
    """Default torch.compile (not fullgraph) of a model with dropout: one graph, like unpatched PEFT."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = nn.Sequential(_layer("torch", dropout=0.2), nn.ReLU(), _layer_like(10, 6))
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(3, 12)
    torch.manual_seed(5)
    y1 = compiled(x)
    y1.sum().backward()
    torch.manual_seed(5)
    y_eager = model(x)
    y2 = compiled(x)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs"
    torch.testing.assert_close(y1, y_eager)  # same seed stream as eager
    assert not torch.equal(y1, y2), "each call draws a new seed"


def _layer_like(k, n):
    torch.manual_seed(1)
    layer = lk.LoRALinear(nn.Linear(k, n), r=2, alpha=4, dropout=0.2, backend="torch")
    nn.init.normal_(layer.lora_B)
    return layer


# ------------------------------------------------------------------ PEFT


def test_peft_patch_inplace_and_mixed_model():
    pytest.importorskip("peft")
    from peft import LoHaConfig, LoraConfig, get_peft_model

    import lora_kernels.peft as lkp

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            return self.lin(x)

    # plain PEFT LoRA: patched output accepts in-place ops
    torch.manual_seed(0)
    m = get_peft_model(M(), LoraConfig(target_modules=["lin"], r=4, init_lora_weights=False))
    x = torch.randn(3, 16)
    want = m(x) + 1
    assert lkp.patch(m).num_patched == 1
    y = m(x)
    y += 1
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)

    # LoRA stacked on LoHa in a PeftMixedModel: the LoRA layer's base is the LoHa layer, whose contribution the
    # fused path (which reads base.weight) would drop: the layer must stay on PEFT's path.
    torch.manual_seed(0)
    mm = get_peft_model(M(), LoHaConfig(target_modules=["lin"], r=4, init_weights=False), adapter_name="loha", mixed=True)
    mm.add_adapter("lora", LoraConfig(target_modules=["lin"], r=4, init_lora_weights=False))
    mm.set_adapter(["loha", "lora"])
    want = mm(x)
    report = lkp.patch(mm)
    assert report.num_patched == 0 and any("another tuner" in r for r in report.skipped)
    torch.testing.assert_close(mm(x), want, rtol=0, atol=0)
