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


# ------------------------------------------------------------------ add_lora: strides, contract, backends agree


def _add_lora_case(M=24, L=3, r_max=8, K=20, widths=(12, 7), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        y=torch.randn(M, sum(widths), generator=g).to(dtype),
        x=torch.randn(M, K, generator=g).to(dtype),
        A=[(torch.randn(L, r_max, K, generator=g) / K**0.5).to(dtype) for _ in widths],
        B=[torch.randn(L, n, r_max, generator=g).to(dtype) for n in widths],
        ids=torch.randint(-1, L, (M,), generator=g, dtype=torch.int64).to(torch.int32),
        scales=torch.rand(L, generator=g) + 0.5,
        ranks=torch.tensor([r_max, 3, 1][:L], dtype=torch.int32),
    )


def _expected(c, ids, scales, ranks):
    from lora_kernels.reference import add_lora_ref

    d = torch.float64
    return add_lora_ref(c["y"].to(d).clone(), c["x"].to(d), [a.to(d) for a in c["A"]], [b.to(d) for b in c["B"]],
                        ids, scales.to(d), ranks)


@pytest.mark.parametrize("backend,strategy", [("torch", None), ("triton", "bgmv"), ("triton", "sgmv")])
def test_add_lora_honours_strides_of_ids_scales_ranks(backend, strategy, monkeypatch):
    if strategy:
        monkeypatch.setenv("LORA_KERNELS_MULTI_LORA_STRATEGY", strategy)
    c = _add_lora_case()
    M, L = c["x"].shape[0], c["scales"].shape[0]
    # every other element is garbage: a kernel reading with unit stride would take the wrong ids / scales / ranks
    ids_store = torch.full((2 * M,), L - 1, dtype=torch.int32)
    ids_store[::2] = c["ids"]
    sc_store = torch.full((2 * L,), 1e3)
    sc_store[::2] = c["scales"]
    rk_store = torch.zeros(2 * L, dtype=torch.int32)
    rk_store[::2] = c["ranks"]
    ids, scales, ranks = ids_store[::2], sc_store[::2], rk_store[::2]
    assert not ids.is_contiguous()
    y = c["y"].clone()
    lk.add_lora(y, c["x"], c["A"], c["B"], ids, scales, ranks, backend=backend)
    want = _expected(c, c["ids"], c["scales"], c["ranks"])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[c["ids"] < 0], c["y"][c["ids"] < 0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_add_lora_requires_grad_is_a_clear_error_on_every_backend(backend):
    c = _add_lora_case()
    x = c["x"].clone().requires_grad_(True)
    with pytest.raises(lk.LoRAInputError, match="inference op"):
        lk.add_lora(c["y"].clone(), x, c["A"], c["B"], c["ids"], c["scales"], c["ranks"], backend=backend)
    with torch.no_grad():
        y = lk.add_lora(c["y"].clone(), x, c["A"], c["B"], c["ids"], c["scales"], c["ranks"], backend=backend)
    assert y.grad_fn is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_add_lora_no_adapters_and_out_of_range_ids_agree(backend, monkeypatch):
    c = _add_lora_case(L=3)
    # L = 0: every id must be -1; a valid call that changes nothing
    A0 = [a[:0] for a in c["A"]]
    B0 = [b[:0] for b in c["B"]]
    y = c["y"].clone()
    none = torch.full_like(c["ids"], -1)
    lk.add_lora(y, c["x"], A0, B0, none, c["scales"][:0], None, backend=backend)
    assert torch.equal(y, c["y"])
    # without the data checks an out-of-range id is skipped like -1 (as the kernels do), never an IndexError
    monkeypatch.setenv("LORA_KERNELS_CHECK_DATA", "0")
    ids = c["ids"].clone()
    ids[::4] = 7
    y = c["y"].clone()
    lk.add_lora(y, c["x"], c["A"], c["B"], ids, c["scales"], c["ranks"], backend=backend)
    want = _expected(c, torch.where(ids >= 3, torch.full_like(ids, -1), ids), c["scales"], c["ranks"])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_add_lora_torch_backend_groups_by_adapter():
    """The torch backend never materialises per-token copies of A and B ([M, r_max, K] / [M, N, r_max])."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    M, L, r_max, K, N = 64, 4, 16, 96, 80
    c = _add_lora_case(M=M, L=L, r_max=r_max, K=K, widths=(N,))
    c["ranks"] = torch.full((L,), r_max, dtype=torch.int32)
    y = c["y"].clone()
    torch_launcher = lk.ops.launcher("add_lora", "torch")  # the op's own impl would run below the dispatch mode
    with Largest():
        torch_launcher(y, c["x"], c["A"], c["B"], c["ids"], c["scales"], c["ranks"])
    assert Largest.biggest > 0
    assert Largest.biggest <= max(M * K, M * N), f"an intermediate of {Largest.biggest} elements (gather: {M * r_max * K})"
    torch.testing.assert_close(y.double(), _expected(c, c["ids"], c["scales"], c["ranks"]), rtol=1e-5, atol=1e-5)


def test_add_lora_loose_inputs_are_clear_errors():
    c = _add_lora_case()
    with pytest.raises(lk.LoRAInputError, match="adapter_ids must be a torch.Tensor"):
        lk.add_lora(c["y"], c["x"], c["A"], c["B"], c["ids"].tolist(), c["scales"])
    with pytest.raises(lk.LoRAInputError, match="has elements that share memory"):
        lk.add_lora(torch.zeros(1, 19).expand(24, 19), c["x"], c["A"], c["B"], c["ids"], c["scales"])


def test_batch_meta_and_slots_validate_their_arguments():
    from lora_kernels.serving import AdapterSlots, LoRABatchMeta

    ids = torch.tensor([0, 1, -1], dtype=torch.int32)
    with pytest.raises(lk.LoRAInputError, match="int32 or int64"):
        LoRABatchMeta(ids.float(), 2)
    with pytest.raises(lk.LoRAInputError, match="num_adapters must be an int"):
        LoRABatchMeta(ids, 2.5)
    with pytest.raises(lk.LoRAInputError, match="int32 or int64"):
        LoRABatchMeta(ids, 2).update_(ids.tolist())
    with pytest.raises(lk.LoRAInputError, match="floating-point"):
        AdapterSlots(2, 4, 8, 8, dtype=torch.int32)


def test_adapter_slots_failed_load_leaves_the_slot_unchanged():
    from lora_kernels.serving import AdapterSlots

    slots = AdapterSlots(2, 4, 8, [6, 5], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    A, B = [torch.randn(3, 8, generator=g)] * 2, [torch.randn(6, 3, generator=g), torch.randn(5, 3, generator=g)]
    slots.load(1, A, B, scale=2.0, name="old")
    before = ([a.clone() for a in slots.lora_a], [b.clone() for b in slots.lora_b], slots.scales.clone(), slots.ranks.clone())
    bad_B = [torch.randn(6, 2), torch.empty(5, 2, device="meta")]  # the second cannot be copied to the CPU
    with pytest.raises(lk.LoRAInputError, match="cannot copy"):
        slots.load(1, [torch.randn(2, 8)] * 2, bad_B, scale=3.0, name="new")
    for now, then in zip(slots.lora_a + slots.lora_b, before[0] + before[1]):
        assert torch.equal(now, then)
    assert torch.equal(slots.scales, before[2]) and torch.equal(slots.ranks, before[3])
    assert slots.names == {"old": 1}


def test_peft_config_with_rank_zero_is_a_clear_error():
    from lora_kernels.peft_io import peft_scale

    with pytest.raises(ValueError, match="r must be a positive int"):
        peft_scale({"r": 0, "lora_alpha": 8}, "q_proj")
    with pytest.raises(ValueError, match="r must be a positive int"):
        peft_scale({"r": 8, "rank_pattern": {"q_proj": 0}}, "model.q_proj")
    assert peft_scale({"r": 4, "lora_alpha": 8}, "q_proj") == (4, 8.0, 2.0)


# ------------------------------------------------------------------ in-place ops: versions, aliasing, tied weights


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inplace_ops_bump_the_version_counter(backend):
    c = _add_lora_case()
    y = c["y"].clone()
    v = y._version
    lk.add_lora(y, c["x"], c["A"], c["B"], c["ids"], c["scales"], c["ranks"], backend=backend)
    assert y._version > v
    W = torch.randn(12, 20)
    A, B = torch.randn(4, 20), torch.randn(12, 4)
    v = W._version
    lk.merge_(W, A, B, 0.5, backend=backend)
    assert W._version > v
    v = W._version
    rec = lk.merge_exact_(W, A, B, 0.5, backend=backend)
    assert W._version > v
    lk.merge_exact_(W, A, B, 0.5, backend=backend)  # a second merge makes the first record stale
    with pytest.raises(lk.LoRAInputError, match="modified in place"):
        lk.unmerge_exact_(W, rec)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merge_rejects_adapters_aliasing_the_weight_and_self_overlapping_weights(backend):
    W = torch.randn(16, 16)
    W0 = W.clone()
    with pytest.raises(lk.LoRAInputError, match="lora_a\\[0\\] shares memory with weight"):
        lk.merge_(W, W[:4], torch.randn(16, 4), 0.5, backend=backend)
    with pytest.raises(lk.LoRAInputError, match="lora_b\\[0\\] shares memory with weight"):
        lk.merge_exact_(W, torch.randn(4, 16), W[:, :4], 0.5, backend=backend)
    assert torch.equal(W, W0)
    store = torch.randn(40)
    overlapping = store.as_strided((8, 8), (4, 1))  # rows overlap by half
    kept = store.clone()
    for fn in (lk.merge_, lk.merge_exact_):
        with pytest.raises(lk.LoRAInputError, match="share memory"):
            fn(overlapping, torch.randn(2, 8), torch.randn(8, 2), 0.5, backend=backend)
    assert torch.equal(store, kept)
    # a non-dense but non-overlapping view is fine
    lk.merge_(torch.randn(8, 16)[:, ::2], torch.randn(2, 8), torch.randn(8, 2), 0.5, backend=backend)


def test_internal_overlap_is_exact():
    from lora_kernels._checks import has_internal_overlap

    s = torch.zeros(100)
    assert not has_internal_overlap(s.view(10, 10))
    assert not has_internal_overlap(s.view(10, 10).t())
    assert not has_internal_overlap(s.view(10, 10)[:, ::3])
    assert not has_internal_overlap(s.as_strided((5, 2), (2, 11)))  # interleaved, disjoint
    assert has_internal_overlap(s.as_strided((5, 5), (3, 1)))
    assert has_internal_overlap(s[:1].expand(7))
    assert has_internal_overlap(s.as_strided((4, 3), (1, 2)))  # offsets 0..9 with repeats


def test_tied_lm_head_merge_is_refused_unless_allowed():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(30, 8)
            self.lm_head = nn.Linear(8, 30, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, t):
            return self.lm_head(self.embed(t))

    torch.manual_seed(0)
    m = lk.inject_lora(Tied(), ["lm_head"], r=2, alpha=4)
    nn.init.normal_(m.lm_head.lora_B)
    assert m.lm_head.tied_to == ("embed.weight",)
    emb = m.embed.weight.detach().clone()
    with pytest.raises(lk.LoRAInputError, match="tied to embed.weight"):
        m.lm_head.merge()
    assert torch.equal(m.embed.weight, emb) and not m.lm_head.merged
    with pytest.warns(UserWarning, match="tied to embed.weight"):
        m.lm_head.merge(allow_tied=True)
    assert not torch.equal(m.embed.weight, emb)
    m.lm_head.unmerge()
    assert torch.equal(m.embed.weight, emb)
    # an untied lm_head merges silently
    untied = lk.inject_lora(nn.Sequential(nn.Linear(8, 30)), ["0"], r=2, alpha=4)
    assert untied[0].tied_to == ()
    untied[0].merge()
