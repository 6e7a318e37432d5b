"""DoRA serving and merge: ``add_lora(..., magnitudes=, bias=)`` on every CPU backend vs the float64 reference,
``AdapterSlots`` DoRA adapters vs PEFT's DoRA per token, the DoRA merge / unmerge and its exact pair, and
``peft_io`` DoRA files both ways."""

import math
import os

import pytest
import torch
from conftest import TOL, assert_close_rel, poison_

import lora_kernels
from lora_kernels import LoRAInputError
from lora_kernels.dora import dora_weight_norm
from lora_kernels.reference import add_lora_ref, dora_weight_norm_ref
from lora_kernels.serving import AdapterSlots, LoRABatchMeta
from lora_kernels.triton import multi_lora as tml

WIDTHS = [24, 10, 17]  # packed q/k/v-like slices of unequal, odd widths
BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _poison_scratch(monkeypatch):
    """Triton scratch buffers start as NaN: a kernel reading an entry no kernel wrote would put NaN into y."""
    monkeypatch.setattr(tml, "_alloc", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype, device=device)))


def make_case(M, K, widths, L, r_max, dtype, *, ranks=None, seed=0, plain=(), ids=None, with_bias=True):
    """Random non-zero adapters; g rows of ones for the ``plain`` slots; ids with -1 tokens interleaved."""
    gen = torch.Generator().manual_seed(seed)
    N = sum(widths)
    x = torch.randn(M, K, generator=gen).to(dtype)
    A = [(torch.randn(L, r_max, K, generator=gen) / math.sqrt(K)).to(dtype) for _ in widths]
    B = [(torch.randn(L, n, r_max, generator=gen) / math.sqrt(max(r_max, 1))).to(dtype) for n in widths]
    if ids is None:
        ids = torch.randint(-1, L, (M,), generator=gen)
        if M:
            ids[::3] = -1
    ids = torch.as_tensor(ids).to(torch.int32)
    scales = torch.rand(L, generator=gen) + 0.5
    g = torch.rand(L, N, generator=gen) + 0.5
    for i in plain:
        g[i] = 1.0
    bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
    y = torch.randn(M, N, generator=gen).to(dtype)  # the base output (bias included): any values
    rk = None if ranks is None else torch.tensor(ranks, dtype=torch.int32)
    return dict(y=y, x=x, A=A, B=B, ids=ids, scales=scales, ranks=rk, g=g, bias=bias)


def expected(c):
    d = torch.float64
    return add_lora_ref(c["y"].to(d).clone(), c["x"].to(d), [a.to(d) for a in c["A"]], [b.to(d) for b in c["B"]],
                        c["ids"], c["scales"].to(d), c["ranks"], magnitudes=c["g"].to(d),
                        bias=None if c["bias"] is None else c["bias"].to(d))


def run(c, backend, meta=None, strategy=None, monkeypatch=None):
    if strategy is not None:
        monkeypatch.setenv(tml.STRATEGY_ENV, strategy)
    y = c["y"].clone()
    with torch.no_grad():
        out = lora_kernels.add_lora(y, c["x"], c["A"], c["B"], c["ids"], c["scales"], c["ranks"], backend=backend,
                                    meta=meta, magnitudes=c["g"], bias=c["bias"])
    assert out is y
    return y


def check(c, y, what):
    untouched = c["ids"] < 0
    assert torch.equal(y[untouched], c["y"][untouched]), f"{what}: rows with id -1 were modified"
    assert_close_rel(y, expected(c), TOL[y.dtype], what)


# ---------------------------------------------------------------------------------------------------------------
# add_lora with magnitudes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("strategy", ["bgmv", "sgmv"])
def test_add_lora_dora_vs_reference(backend, dtype, strategy, monkeypatch):
    """Several adapters of mixed ranks (one rank 0: DoRA still rescales its rows), one plain (g = 1), -1 tokens,
    three packed slices, with and without bias."""
    for with_bias in (True, False):
        c = make_case(37, 40, WIDTHS, 5, 8, dtype, ranks=[8, 3, 0, 5, 8], plain=(1,), with_bias=with_bias, seed=1)
        y = run(c, backend, strategy=strategy, monkeypatch=monkeypatch)
        check(c, y, f"{backend} {dtype} {strategy} bias={with_bias}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_lora_dora_prefill_with_meta_and_decode(backend, monkeypatch):
    """Prefill through a LoRABatchMeta (SGMV tiles, several per adapter) and decode-sized batches (M = 0, 1, 3)."""
    c = make_case(150, 33, [19, 14], 4, 16, torch.float32, ranks=[16, 7, 16, 1], plain=(2,), seed=2)
    meta = LoRABatchMeta(c["ids"], 4, block_m=16)
    check(c, run(c, backend, meta=meta, strategy="sgmv", monkeypatch=monkeypatch), f"{backend} prefill meta")
    for M in (0, 1, 3):
        d = make_case(M, 33, [19, 14], 4, 16, torch.float32, seed=3 + M, ids=[2, 0, -1][:M])
        y = run(d, backend, strategy="bgmv", monkeypatch=monkeypatch)
        if M:
            check(d, y, f"{backend} decode M={M}")
        else:
            assert y.shape == (0, 33)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_lora_dora_plain_rows_bit_identical(backend, monkeypatch):
    """A plain adapter's rows in a DoRA batch (g row of ones) equal the plain add_lora bit for bit; DoRA rows do
    not (the test can fail)."""
    for strategy in ("bgmv", "sgmv"):
        c = make_case(40, 24, WIDTHS, 3, 8, torch.float32, plain=(0,), seed=4, ids=[0, 1, 2, -1] * 10)
        y_dora = run(c, backend, strategy=strategy, monkeypatch=monkeypatch)
        y_plain = c["y"].clone()
        with torch.no_grad():
            lora_kernels.add_lora(y_plain, c["x"], c["A"], c["B"], c["ids"], c["scales"], backend=backend)
        rows = c["ids"] == 0
        assert torch.equal(y_dora[rows], y_plain[rows]), strategy
        assert not torch.equal(y_dora[c["ids"] == 1], y_plain[c["ids"] == 1])


def test_add_lora_dora_rank0_everywhere():
    """r_max = 0: no LoRA at all, DoRA still rescales (y - bias)."""
    for backend in BACKENDS:
        c = make_case(9, 8, [6, 5], 2, 0, torch.float32, seed=5)
        check(c, run(c, backend), f"{backend} r_max=0")


def test_add_lora_dora_dispatch():
    """Every backend has an add_lora_dora row (CUDA only needs CUDA tensors); fp64 factors are not for kernels."""
    from lora_kernels._backend import why_not

    c = make_case(4, 8, [6], 2, 4, torch.float32)
    for be in ("torch", "triton", "cuda"):
        assert not any("no kernel" in r for r in why_not(be, "add_lora_dora", [c["x"]])), be
    assert any("CUDA tensors" in r for r in why_not("cuda", "add_lora_dora", [c["x"]]))
    assert any("float64" in r for r in why_not("triton", "add_lora_dora", [c["x"], c["g"].double()]))


def test_add_lora_dora_cuda_emulated():
    """The CUDA extension's DoRA expand epilogue (csrc/multi_lora.cu, the GPU build's sources) on the CPU emulator of
    tests/cuda_emu vs float64: fp32 / fp16 / bf16, mixed DoRA / plain (g = 1) / rank-0 / -1 rows, per-token and grouped
    (LoRABatchMeta) launches, bias on and off, r_max = 0; plain rows bit-identical to the plain CUDA path."""
    import sys
    from pathlib import Path

    if os.environ.get("LORA_KERNELS_SKIP_EMULATOR") == "1":
        pytest.skip("LORA_KERNELS_SKIP_EMULATOR=1")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
    import build as emu_build

    try:
        emu_build.load()
    except emu_build.EmulatorUnavailable as e:
        pytest.skip(f"CUDA emulator unavailable: {e}")
    from lora_kernels.cuda.multi_lora import add_lora_cuda

    def run_cuda(c, groups=None, dora=True):
        y = c["y"].clone()
        kw = dict(magnitudes=c["g"], bias=c["bias"]) if dora else {}
        add_lora_cuda(y, c["x"], c["A"], c["B"], c["ids"], c["scales"], c["ranks"], groups, **kw)
        return y

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for with_bias in (True, False):
            c = make_case(37, 40, WIDTHS, 5, 8, dtype, ranks=[8, 3, 0, 5, 8], plain=(1,), with_bias=with_bias, seed=11)
            check(c, run_cuda(c), f"cuda {dtype} per token bias={with_bias}")
        c = make_case(150, 33, [19, 14], 4, 16, dtype, ranks=[16, 7, 16, 1], plain=(2,), seed=12)
        meta = LoRABatchMeta(c["ids"], 4, block_m=16)
        check(c, run_cuda(c, meta.groups), f"cuda {dtype} grouped")
        rows = c["ids"] == 2
        assert torch.equal(run_cuda(c, meta.groups)[rows], run_cuda(c, meta.groups, dora=False)[rows]), dtype
    c = make_case(9, 8, [6, 5], 2, 0, torch.float32, seed=13)
    check(c, run_cuda(c), "cuda r_max=0")
    c = make_case(10, 8, [5, 3], 3, 4, torch.float32, seed=14)
    xa = torch.ops.lora_kernels.cuda_multi_lora_shrink(c["x"], c["A"][1], c["ids"], c["ranks"])
    for kw in (dict(magnitudes=c["g"], bias=c["bias"]), dict(magnitudes=c["g"])):
        torch.library.opcheck(torch.ops.lora_kernels.cuda_multi_lora_expand_.default,
                              (c["y"].clone(), xa, c["B"][1], c["ids"], c["scales"], c["ranks"], 5), kw)


def test_add_lora_dora_fp64_magnitudes_torch():
    """fp64 data and factors run on the torch backend (auto) to float64 accuracy."""
    c = make_case(11, 12, [7, 9], 3, 4, torch.float64, seed=6)
    c["g"] = c["g"].double()
    y = run(c, None)
    assert_close_rel(y, expected(c), TOL[torch.float64], "fp64")


def test_add_lora_dora_errors():
    c = make_case(6, 8, [5, 3], 2, 4, torch.float32)

    def call(**kw):
        args = dict(magnitudes=c["g"], bias=c["bias"])
        args.update(kw)
        with torch.no_grad():
            lora_kernels.add_lora(c["y"].clone(), c["x"], c["A"], c["B"], c["ids"], c["scales"], backend="torch", **args)

    with pytest.raises(LoRAInputError, match=r"magnitudes must be \[L=2, N=8\]"):
        call(magnitudes=c["g"][:, :5])
    with pytest.raises(LoRAInputError, match=r"magnitudes must be \[L=2, N=8\]"):
        call(magnitudes=c["g"][0])
    with pytest.raises(LoRAInputError, match="magnitudes must be float32"):
        call(magnitudes=c["g"].half())
    with pytest.raises(LoRAInputError, match="magnitudes must be a torch.Tensor"):
        call(magnitudes=c["g"].tolist())
    bad = c["g"].clone()
    bad[1, 3] = float("inf")
    with pytest.raises(LoRAInputError, match="magnitudes must be finite"):
        call(magnitudes=bad)
    bad[1, 3] = float("nan")
    with pytest.raises(LoRAInputError, match="magnitudes must be finite"):
        call(magnitudes=bad)
    with pytest.raises(LoRAInputError, match=r"bias must be \[N=8\]"):
        call(bias=c["bias"][:7])
    with pytest.raises(LoRAInputError, match="bias is only read with magnitudes"):
        call(magnitudes=None)
    with pytest.raises(LoRAInputError, match="magnitudes requires grad"):  # grad mode on: an inference op
        lora_kernels.add_lora(c["y"].clone(), c["x"], c["A"], c["B"], c["ids"], c["scales"], backend="torch",
                              magnitudes=c["g"].clone().requires_grad_(True))
    with pytest.raises(LoRAInputError, match="magnitudes"):
        call(magnitudes=c["g"].to("meta"))
    y2 = c["y"][:2].clone()  # [2, 8]: the shape of the magnitudes table (L=2)
    with pytest.raises(LoRAInputError, match="y overlaps magnitudes"):
        with torch.no_grad():
            lora_kernels.add_lora(y2, c["x"][:2], c["A"], c["B"], c["ids"][:2], c["scales"], backend="torch",
                                  magnitudes=y2)


def test_add_lora_dora_opcheck():
    c = make_case(10, 8, [5, 3], 3, 4, torch.float32, seed=7)
    for backend in BACKENDS:
        args = (c["y"].clone(), c["x"], c["A"], c["B"], c["ids"], c["scales"], c["ranks"], backend)
        torch.library.opcheck(torch.ops.lora_kernels.add_lora_.default, args,
                              dict(magnitudes=c["g"], bias=c["bias"]))
        meta = LoRABatchMeta(c["ids"], 3, block_m=16)
        torch.library.opcheck(torch.ops.lora_kernels.add_lora_.default, args + meta.groups,
                              dict(magnitudes=c["g"], bias=None))


# ---------------------------------------------------------------------------------------------------------------
# AdapterSlots + peft_io: PEFT DoRA adapters served per token
# ---------------------------------------------------------------------------------------------------------------

QKV = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]


def _tiny_peft(tmp_path, seed=0):
    """A tiny Llama (q/k/v with bias) and a PeftModel with two DoRA adapters (different r, alpha, rsLoRA) and a plain
    one, every lora_B and magnitude random and non-zero; each adapter saved by PEFT in its own directory."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    base = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in base.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    tm = ["q_proj", "k_proj", "v_proj"]
    confs = {
        "d1": peft.LoraConfig(r=4, lora_alpha=8, target_modules=tm, use_dora=True),
        "d2": peft.LoraConfig(r=8, lora_alpha=5, target_modules=tm, use_dora=True, use_rslora=True),
        "plain": peft.LoraConfig(r=2, lora_alpha=4, target_modules=tm),
    }
    pm = peft.get_peft_model(base, confs["d1"], adapter_name="d1")
    for name in ("d2", "plain"):
        pm.add_adapter(name, confs[name])
    with torch.no_grad():
        for n, mod in pm.named_modules():
            if hasattr(mod, "lora_B") and isinstance(getattr(mod, "lora_B"), torch.nn.ModuleDict):
                for name in mod.lora_B:
                    mod.lora_B[name].weight.normal_(0, 0.3)
                    if name in mod.lora_magnitude_vector:
                        mod.lora_magnitude_vector[name].weight.mul_(1 + 0.3 * torch.randn_like(
                            mod.lora_magnitude_vector[name].weight))
    pm.eval()
    dirs = {}
    for name in confs:
        d = tmp_path / name
        pm.save_pretrained(str(d), selected_adapters=[name])
        dirs[name] = str(d / name) if (d / name / "adapter_config.json").exists() else str(d)
    return pm, dirs


def _peft_layer(pm, path):
    return pm.base_model.model.get_submodule(path)


def _peft_per_token(pm, x, names):
    """PEFT's q/k/v outputs, packed, for each token's adapter (None = the base layer)."""
    out = torch.empty(x.shape[0], sum(_peft_layer(pm, p).base_layer.out_features for p in QKV))
    with torch.no_grad():
        for name in set(names):
            rows = [t for t, n in enumerate(names) if n == name]
            if name is None:
                y = torch.cat([_peft_layer(pm, p).base_layer(x[rows]) for p in QKV], 1)
            else:
                pm.set_adapter(name)
                y = torch.cat([_peft_layer(pm, p)(x[rows]) for p in QKV], 1)
            out[rows] = y
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_slots_dora_equal_peft_per_token(tmp_path, backend):
    """Packed q/k/v AdapterSlots with two PEFT DoRA adapters, a plain one and -1 tokens in one batch equal PEFT's
    per-token outputs (fp32), prefill (with a LoRABatchMeta) and decode."""
    from lora_kernels.peft_io import load_peft_into_slots, read_peft_adapter

    pm, dirs = _tiny_peft(tmp_path)
    layers = [_peft_layer(pm, p).base_layer for p in QKV]
    W = [m.weight.detach() for m in layers]
    bias = torch.cat([m.bias.detach() for m in layers])
    slots = AdapterSlots(4, 8, 32, [w.shape[0] for w in W], dtype=torch.float32)
    for slot, name in ((0, "d1"), (2, "d2"), (3, "plain")):
        src = read_peft_adapter(dirs[name])
        load_peft_into_slots(slots, src, QKV, slot, name=name, base_weight=W)  # ignored for the plain adapter
    assert sorted(slots._dora_slots) == [0, 2]
    assert torch.equal(slots.magnitudes[3], torch.ones(64)) and torch.equal(slots.magnitudes[1], torch.ones(64))
    gen = torch.Generator().manual_seed(1)
    for M in (70, 3):
        names = [[None, "d1", "d2", "plain"][i] for i in torch.randint(0, 4, (M,), generator=gen).tolist()]
        x = torch.randn(M, 32, generator=gen)
        exp = _peft_per_token(pm, x, names)
        ids = slots.ids_for(names)
        y = torch.cat([m(x) for m in layers], 1).detach()
        meta = slots.make_meta(ids, block_m=16) if M > 16 else None
        with torch.no_grad():
            slots.apply(y, x, ids, meta=meta, backend=backend, bias=bias)
        assert_close_rel(y, exp, TOL[torch.float32], f"{backend} M={M}")
        for t, n in enumerate(names):  # per token, not only in norm
            assert_close_rel(y[t], exp[t], 1e-5, f"{backend} M={M} token {t} ({n})")


def test_slots_dora_factors_and_bookkeeping():
    """g = m / ‖W0 + s·B·A‖ per packed slice vs float64; evict and plain reload restore ones; apply without DoRA
    slots takes the plain path; bad DoRA inputs raise before the slot changes."""
    gen = torch.Generator().manual_seed(3)
    widths, K, r = [12, 7], 10, 3
    W = [torch.randn(n, K, generator=gen) for n in widths]
    A = [torch.randn(r, K, generator=gen) for _ in widths]
    B = [torch.randn(n, r, generator=gen) for n in widths]
    m = torch.rand(sum(widths), generator=gen) + 0.5
    slots = AdapterSlots(3, 4, K, widths, dtype=torch.float32)
    assert slots.magnitudes is None
    slots.load(1, A, B, 1.7, magnitude=m, base_weight=torch.cat(W), name="dora")  # packed m and W0
    exp = torch.cat([m[:12].double() / dora_weight_norm_ref(W[0], A[0], B[0], 1.7),
                     m[12:].double() / dora_weight_norm_ref(W[1], A[1], B[1], 1.7)])
    assert_close_rel(slots.magnitudes[1], exp, 1e-6, "g")
    assert torch.equal(slots.magnitudes[0], torch.ones(19)) and torch.equal(slots.magnitudes[2], torch.ones(19))
    g_before = slots.magnitudes.clone()
    a_before = [a.clone() for a in slots.lora_a]
    bad_w = [w.clone() for w in W]
    bad_w[1][2] = 0.0
    B0 = [b.clone() for b in B]
    B0[1][2] = 0.0  # row 2 of slice 1: W0 + s·B·A = 0 -> m / 0
    cases = [
        (dict(magnitude=m), "needs base_weight"),
        (dict(base_weight=W), "base_weight is only used with magnitude"),
        (dict(magnitude=m[:18], base_weight=W), r"magnitude must be \[19\] \(packed\)"),
        (dict(magnitude=[m[:12], m[12:18]], base_weight=W), r"magnitude\[1\] must be a floating tensor \[7\]"),
        (dict(magnitude=m, base_weight=[W[0], W[1][:, :9]]), r"base_weight\[1\] must be a floating tensor \[7, 10\]"),
        (dict(magnitude=m.masked_fill(torch.arange(19) == 4, float("nan")), base_weight=W), "non-finite"),
        (dict(magnitude=m, base_weight=bad_w, lora_B=B0), "is 0 in some row"),
    ]
    for kw, msg in cases:
        b_arg = kw.pop("lora_B", B)
        with pytest.raises(LoRAInputError, match=msg):
            slots.load(0, A, b_arg, 1.0, name="x", **kw)
        assert torch.equal(slots.magnitudes, g_before) and all(torch.equal(a, b) for a, b in zip(slots.lora_a, a_before))
        assert slots.names == {"dora": 1}
    slots.load(1, A, B, 1.0, name="dora")  # plain reload of the slot: its factors back to ones
    assert torch.equal(slots.magnitudes[1], torch.ones(19)) and not slots._dora_slots
    slots.load(2, A, B, 1.0, magnitude=[m[:12], m[12:]], base_weight=W)
    slots.evict(2)
    assert torch.equal(slots.magnitudes[2], torch.ones(19)) and not slots._dora_slots


def test_peft_io_reads_dora(tmp_path):
    """read_peft_adapter gives (A, B, scale, m) for PEFT DoRA modules and (A, B, scale) for plain ones; DoRA files
    without base_weight are refused by load_peft_into_slots with the reason."""
    from lora_kernels.peft_io import load_peft_into_slots, read_peft_adapter

    pm, dirs = _tiny_peft(tmp_path)
    cfg, ad = read_peft_adapter(dirs["d2"])
    assert cfg["use_dora"] is True
    for p in QKV:
        a, b, scale, m = ad[p]
        lay = _peft_layer(pm, p)
        assert torch.equal(m, lay.lora_magnitude_vector["d2"].weight.detach())
        assert torch.equal(a, lay.lora_A["d2"].weight.detach()) and torch.equal(b, lay.lora_B["d2"].weight.detach())
        assert scale == pytest.approx(lay.scaling["d2"])
    _, plain = read_peft_adapter(dirs["plain"])
    assert all(len(v) == 3 for v in plain.values())
    slots = AdapterSlots(2, 8, 32, [32, 16, 16], dtype=torch.float32)
    with pytest.raises(ValueError, match="pass base_weight="):
        load_peft_into_slots(slots, dirs["d1"], QKV, 0)


def test_slots_dora_subset_of_slices_equal_peft(tmp_path):
    """A PEFT DoRA adapter on q and v only, loaded into q/k/v-packed slots: k keeps the base output (g = 1 there),
    q and v equal PEFT's DoRA per token."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora_kernels.peft_io import load_peft_into_slots

    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)).eval()
    with torch.no_grad():
        for mod in pm.modules():
            if isinstance(getattr(mod, "lora_B", None), torch.nn.ModuleDict):
                mod.lora_B["default"].weight.normal_(0, 0.3)
                mod.lora_magnitude_vector["default"].weight.mul_(1.5)
    pm.save_pretrained(str(tmp_path))
    attn = pm.base_model.model.model.layers[0].self_attn
    layers = [attn.q_proj.base_layer, attn.k_proj, attn.v_proj.base_layer]
    slots = AdapterSlots(2, 4, 32, [32, 16, 16], dtype=torch.float32)
    load_peft_into_slots(slots, str(tmp_path), QKV, 1, base_weight=[m.weight.detach() for m in layers])
    assert torch.equal(slots.magnitudes[1, 32:48], torch.ones(16))
    x = torch.randn(9, 32)
    ids = torch.tensor([1, -1, 1, 0, 1, 1, -1, 1, 0], dtype=torch.int32)
    with torch.no_grad():
        y = torch.cat([m(x) for m in layers], 1)
        exp = torch.where((ids == 1)[:, None], torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], 1), y)
        slots.apply(y, x, ids, backend="torch", bias=torch.cat([m.bias for m in layers]))
    assert_close_rel(y, exp, TOL[torch.float32], "q/v DoRA, k untouched")
    assert torch.equal(y[:, 32:48], exp[:, 32:48])


# ---------------------------------------------------------------------------------------------------------------
# DoRA merge / unmerge and the exact pair
# ---------------------------------------------------------------------------------------------------------------


def _merge_case(N=37, K=29, r=5, dtype=torch.float32, seed=8, strided=False):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen) * 0.05
    A = torch.randn(r, K, generator=gen) / math.sqrt(K)
    B = torch.randn(N, r, generator=gen) * 0.05
    s = 1.7
    m = dora_weight_norm_ref(W, A, B, s).float() * (1 + 0.3 * torch.randn(N, generator=gen))
    W = W.to(dtype)
    if strided:  # a transposed view: any strides
        W = W.t().contiguous().t()
    return W, A.to(dtype), B.to(dtype), s, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dora_merge_unmerge_vs_reference(dtype):
    """merge_(magnitude=) = g⊙(W0 + s·B·A) with g = m / ‖W0 + s·B·A‖ from the unmerged W0 (float64 oracle);
    unmerge_ with the same norm gives W0 back within rounding."""
    for strided in (False, True):
        W0, A, B, s, m = _merge_case(dtype=dtype, strided=strided)
        d = torch.float64
        norm64 = dora_weight_norm_ref(W0, A, B, s)
        exp = (m.double() / norm64)[:, None] * (W0.to(d) + s * B.to(d) @ A.to(d))
        W = W0.clone()
        norm = dora_weight_norm(W, A, B, s)
        out = lora_kernels.merge_(W, A, B, s, magnitude=m)
        assert out is W and W.stride() == W0.stride()
        assert_close_rel(W, exp, TOL[dtype], f"merge {dtype}")
        W2 = W0.clone()
        lora_kernels.merge_(W2, A, B, s, magnitude=m, weight_norm=norm)  # the norm given: the same result
        assert torch.equal(W, W2)
        lora_kernels.unmerge_(W, A, B, s, magnitude=m, weight_norm=norm)
        assert_close_rel(W, W0, TOL[dtype] if dtype != torch.float32 else 1e-6, f"unmerge {dtype}")


def test_dora_merge_equals_peft_merge():
    """A PEFT DoRA nn.Linear merged by PEFT (merge_safe) equals our merge_ with its magnitude (fp32), and the
    merged layer's output equals the unmerged DoRA output."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(9)
    base = torch.nn.Sequential(torch.nn.Linear(23, 19))
    pm = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0"], use_dora=True)).eval()
    lay = pm.base_model.model[0]
    with torch.no_grad():
        lay.lora_B["default"].weight.normal_(0, 0.2)
        lay.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.randn(19))
    x = torch.randn(6, 23)
    with torch.no_grad():
        y_dora = lay(x)
        W = lay.base_layer.weight.detach().clone()
        lora_kernels.merge_(W, lay.lora_A["default"].weight.detach(), lay.lora_B["default"].weight.detach(),
                            lay.scaling["default"], magnitude=lay.lora_magnitude_vector["default"].weight.detach())
        lay.merge(safe_merge=True)
        assert_close_rel(W, lay.base_layer.weight, 1e-6, "merged W vs PEFT")
        assert_close_rel(torch.nn.functional.linear(x, W, lay.base_layer.bias), y_dora, 1e-5, "merged output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dora_exact_merge_round_trip_bit_exact(dtype):
    from lora_kernels.exact_merge import merge_exact_, unmerge_exact_

    for strided in (False, True):
        W0, A, B, s, m = _merge_case(N=64, K=48, r=8, dtype=dtype, seed=10, strided=strided)
        W = W0.clone()
        rec = merge_exact_(W, A, B, s, magnitude=m)
        W_plain = W0.clone()
        lora_kernels.merge_(W_plain, A, B, s, magnitude=m)
        assert torch.equal(W, W_plain), "the exact merge writes what merge_ writes"
        assert rec.dora_factor is not None and rec.backend == "torch"
        plain_back = W.clone()
        lora_kernels.unmerge_(plain_back, A, B, s, magnitude=m, weight_norm=dora_weight_norm(W0, A, B, s))
        unmerge_exact_(W, rec)
        assert torch.equal(W.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           W0.view(torch.int16 if dtype != torch.float32 else torch.int32)), f"{dtype} not bit-exact"
        if dtype != torch.float32:  # the plain round trip loses bits in 16-bit: the repair list is not idle
            assert rec.n_repairs > 0 and not torch.equal(plain_back, W0)


def test_dora_merge_bad_input_leaves_weight_untouched():
    from lora_kernels.exact_merge import merge_exact_

    W0, A, B, s, m = _merge_case()
    W = W0.clone()
    nan_m = m.clone()
    nan_m[3] = float("nan")
    zero_norm = torch.ones(37)
    zero_norm[5] = 0.0
    cases = [
        (lambda: lora_kernels.merge_(W, A, B, s, magnitude=m[:36]), r"magnitude must be \[N=37\]"),
        (lambda: lora_kernels.merge_(W, A, B, s, magnitude=m[None]), r"magnitude must be \[N=37\]"),
        (lambda: lora_kernels.merge_(W, A, B, s, magnitude=m.to(torch.int32)), "magnitude"),
        (lambda: lora_kernels.merge_(W, A, B, s, magnitude=nan_m), "magnitude must be finite"),
        (lambda: lora_kernels.merge_(W, A, B, s, magnitude=m, weight_norm=zero_norm), "weight_norm must be > 0"),
        (lambda: lora_kernels.merge_(W, A, B, s, magnitude=m, weight_norm=m[:3]), r"weight_norm must be \[N=37\]"),
        (lambda: lora_kernels.merge_(W, A, B, s, magnitude=m.to("meta")), "magnitude is on meta"),
        (lambda: lora_kernels.merge_(W, A, B, s, weight_norm=m), "weight_norm is only used with magnitude"),
        (lambda: lora_kernels.merge_(W, [A, A], [B, B], s, magnitude=m), "takes one adapter"),
        (lambda: lora_kernels.merge_(W, A, B[:, :4], s, magnitude=m), "rank mismatch"),
        (lambda: lora_kernels.merge_(W, A, B, float("nan"), magnitude=m), "scale"),
        (lambda: lora_kernels.unmerge_(W, A, B, s, magnitude=m), "needs weight_norm"),
        (lambda: lora_kernels.merge_(W, A, B, s, magnitude=m, backend="triton"), "no kernel for merge_dora"),
        (lambda: merge_exact_(W, A, B, s, magnitude=nan_m), "magnitude must be finite"),
        (lambda: lora_kernels.merge_(W, A, B, s, magnitude=W[:, 0]), "shares memory with weight"),
    ]
    for fn, msg in cases:
        with pytest.raises((LoRAInputError, lora_kernels.BackendUnavailableError), match=msg):
            fn()
        assert torch.equal(W.view(torch.int32), W0.view(torch.int32)), msg


def test_dora_merge_opcheck():
    W0, A, B, s, m = _merge_case(N=9, K=7, r=2)
    g = m / dora_weight_norm(W0, A, B, s)
    for inverse in (False, True):
        torch.library.opcheck(torch.ops.lora_kernels.merge_dora_.default, (W0.clone(), A, B, s, g, inverse, "torch"))


# ---------------------------------------------------------------------------------------------------------------
# LoRALinear(use_dora=True): merge / unmerge and PEFT files both ways (needs the training half of DoRA)
# ---------------------------------------------------------------------------------------------------------------


def _needs_loralinear_dora():
    import inspect

    if "use_dora" not in inspect.signature(lora_kernels.LoRALinear.__init__).parameters:
        pytest.skip("LoRALinear has no use_dora in this tree")


def _randomize_dora_(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora_kernels.LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)
                m.lora_magnitude.mul_(1 + 0.3 * torch.randn(m.lora_magnitude.shape, generator=gen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loralinear_dora_merge_unmerge(dtype):
    """merge() writes g⊙(W0 + s·B·A): the merged layer's output equals the DoRA forward; unmerge() gives W0 back bit for
    bit (the exact pair), and the layer computes what it computed before merging."""
    _needs_loralinear_dora()
    torch.manual_seed(14)
    net = torch.nn.Sequential(torch.nn.Linear(24, 19), torch.nn.Linear(19, 13)).to(dtype)
    lora_kernels.inject_lora(net, ["0", "1"], 4, 8, backend="torch", use_dora=True)
    _randomize_dora_(net, 15)
    net.eval()
    x = torch.randn(7, 24).to(dtype)
    W0 = [net[i].weight.detach().clone() for i in range(2)]
    with torch.no_grad():
        y = net(x)
        for i in range(2):
            net[i].merge()
            assert net[i].merged and not torch.equal(net[i].weight, W0[i])
            g = net[i].lora_magnitude.float() / dora_weight_norm(W0[i], net[i].lora_A, net[i].lora_B, net[i].scale)
            exp = g.double()[:, None] * (W0[i].double() + net[i].scale * net[i].lora_B.double() @ net[i].lora_A.double())
            assert_close_rel(net[i].weight, exp, TOL[dtype], f"merged W {i}")
        assert_close_rel(net(x), y, TOL[dtype], "merged output")
        for i in range(2):
            net[i].unmerge()
            assert torch.equal(net[i].weight, W0[i]), f"layer {i}: unmerge is not bit-exact"
        assert torch.equal(net(x), y)


def _llama_pair(seed=16):
    transformers = pytest.importorskip("transformers")
    import copy

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    base = transformers.LlamaForCausalLM(cfg).eval()
    return base, copy.deepcopy(base), copy.deepcopy(base)


def test_peft_dora_file_loads_into_loralinear_and_back(tmp_path):
    """PEFT DoRA adapter (saved by PEFT) -> load_peft_adapter_ into inject_lora(use_dora=True): logits equal PEFT's;
    save_peft_adapter of that model -> PeftModel.from_pretrained: logits equal again, magnitudes bit-identical."""
    _needs_loralinear_dora()
    peft = pytest.importorskip("peft")
    base, ours_base, fresh = _llama_pair()
    tm = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=6, target_modules=tm, use_dora=True)).eval()
    with torch.no_grad():
        for mod in pm.modules():
            if isinstance(getattr(mod, "lora_B", None), torch.nn.ModuleDict):
                mod.lora_B["default"].weight.normal_(0, 0.3)
                mod.lora_magnitude_vector["default"].weight.mul_(1 + 0.3 * torch.randn_like(
                    mod.lora_magnitude_vector["default"].weight))
    pm.save_pretrained(str(tmp_path / "peft"))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        want = pm(ids).logits
    from lora_kernels.peft_io import load_peft_adapter_, save_peft_adapter

    ours = lora_kernels.inject_lora(ours_base, tm, r=4, alpha=6, backend="torch", use_dora=True).eval()
    load_peft_adapter_(ours, str(tmp_path / "peft"))
    with torch.no_grad():
        assert_close_rel(ours(ids).logits, want, TOL[torch.float32], "PEFT file -> LoRALinear(use_dora)")
    cfg = save_peft_adapter(ours, str(tmp_path / "ours"))
    assert cfg["use_dora"] is True
    back = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert_close_rel(back(ids).logits, want, TOL[torch.float32], "LoRALinear(use_dora) file -> PEFT")
    for name, mod in back.named_modules():
        if isinstance(getattr(mod, "lora_magnitude_vector", None), torch.nn.ModuleDict) and "default" in mod.lora_magnitude_vector:
            ours_m = ours.get_submodule(name.replace("base_model.model.", "", 1)).lora_magnitude
            assert torch.equal(mod.lora_magnitude_vector["default"].weight, ours_m), name


def test_add_lora_dora_triton_traffic():
    """The DoRA epilogue reads each used adapter's g row once (decode: tokens of distinct adapters; prefill: one read
    per tile) and moves nothing else extra; counted exactly under the interpreter with the GPU configs."""
    traffic = pytest.importorskip("traffic")
    if not traffic.interpreting():
        pytest.skip("counts bytes under TRITON_INTERPRET=1")
    for strategy, M, L, cfgs in (
        ("bgmv", 16, 16, {tml._bgmv_shrink_kernel: tml._BGMV_SHRINK_CONFIGS.gpu[0],
                          tml._bgmv_expand_kernel: tml._BGMV_EXPAND_CONFIGS.gpu[0]}),
        ("sgmv", 128, 8, {tml._sgmv_shrink_kernel: tml._SHRINK_CONFIGS.gpu[0],
                          tml._sgmv_expand_kernel: tml._EXPAND_CONFIGS.gpu[0]})):
        ids = torch.randperm(L, generator=torch.Generator().manual_seed(0)).repeat(M // L).to(torch.int32)
        c = traffic.add_lora_case(M, L, 16, 256, 256, ids=ids)
        g, bias = torch.rand(L, 256) + 0.5, torch.randn(256).half()
        meta = LoRABatchMeta(c["ids"], L).groups if strategy == "sgmv" else None
        totals = {}
        for dora in (False, True):
            y = c["y"].clone()
            kw = dict(magnitudes=g, bias=bias) if dora else {}
            tracked = dict(y=y, x=c["x"], A=c["A"], B=c["B"], ids=c["ids"], scales=c["scales"], **kw)
            if dora:
                tracked = dict(tracked, g=tracked.pop("magnitudes"))
            with traffic.gpu_launches(cfgs):
                with traffic.Traffic(**tracked) as tr:
                    tml.add_lora_triton(y, c["x"], [c["A"]], [c["B"]], c["ids"], c["scales"], None, groups=meta,
                                        strategy=strategy, **kw)
            totals[dora] = {k: v.req for k, v in tr.stats.items()}
        assert totals[True]["g"] == g.numel() * 4, (strategy, totals[True]["g"])  # each adapter row once
        extra = sum(totals[True].values()) - sum(totals[False].values()) - totals[True]["g"] - totals[True]["bias"]
        assert extra == 0, (strategy, totals)
