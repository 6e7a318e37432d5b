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


def test_add_lora_dora_auto_backend_skips_cuda():
    """The dispatch table has no DoRA row for the CUDA extension: auto never picks it, an explicit request says why."""
    from lora_kernels._backend import why_not

    c = make_case(4, 8, [6], 2, 4, torch.float32)
    assert "cuda has no kernel for add_lora_dora" in why_not("cuda", "add_lora_dora", [c["x"]])
    assert not any("no kernel" in r for r in why_not("triton", "add_lora_dora", [c["x"]]))
    with pytest.raises(lora_kernels.BackendUnavailableError, match="cuda has no kernel for add_lora_dora"):
        run(c, "cuda")


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
