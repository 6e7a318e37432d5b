"""Triton multi-adapter LoRA (add_lora, BGMV and SGMV strategies) vs the float64 reference."""

import math

import pytest
import torch
from conftest import HAS_CUDA, TOL, add_lora_lowp, assert_close_rel, assert_fa_rule, poison_

import lora_kernels
from lora_kernels.reference import add_lora_ref
from lora_kernels.serving import LoRABatchMeta
from lora_kernels.triton import multi_lora
from lora_kernels.triton.multi_lora import add_lora_triton, choose_strategy

DEV = "cuda" if HAS_CUDA else "cpu"
WIDTHS = [24, 10, 17]  # packed q/k/v-like slices of unequal, odd widths


@pytest.fixture(autouse=True)
def _poison_scratch(monkeypatch):
    """The launchers' scratch buffers (decode partial sums, prefill xa) start as NaN: a kernel reading an entry
    no kernel wrote would put NaN into y."""
    monkeypatch.setattr(multi_lora, "_alloc", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype, device=device)))


def make_ids(pattern: str, M: int, L: int, gen: torch.Generator) -> torch.Tensor:
    if pattern == "distinct":  # every token its own adapter (cycling when M > L)
        ids = torch.randperm(L, generator=gen).repeat(math.ceil(M / L))[:M]
    elif pattern == "uniform":
        ids = torch.randint(0, L, (M,), generator=gen)
    elif pattern == "zipf":
        w = 1.0 / torch.arange(1, L + 1, dtype=torch.float64) ** 1.2
        ids = torch.multinomial(w, M, replacement=True, generator=gen) if M else torch.zeros(0, dtype=torch.int64)
    elif pattern == "one":
        ids = torch.full((M,), L - 1)
    elif pattern == "with_none":  # -1 tokens interleaved with adapters
        ids = torch.randint(-1, L, (M,), generator=gen)
        if M:
            ids[::3] = -1
    else:
        raise ValueError(pattern)
    return ids.to(torch.int32)


def make_case(M, K, widths, L, r_max, dtype, ranks=None, pattern="uniform", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype)
    A = [(torch.randn(L, r_max, K, generator=gen) / math.sqrt(K)).to(dtype) for _ in widths]
    B = [(torch.randn(L, n, r_max, generator=gen) / math.sqrt(max(r_max, 1))).to(dtype) for n in widths]
    ids = make_ids(pattern, M, L, gen)
    scales = torch.rand(L, generator=gen) + 0.5
    rk = None if ranks is None else torch.tensor(ranks, dtype=torch.int32)
    y = torch.randn(M, sum(widths), generator=gen).to(dtype)  # random, not poison: -1 rows must stay bit-identical
    to = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return dict(y=to(y), x=to(x), A=[to(a) for a in A], B=[to(b) for b in B], ids=to(ids), scales=to(scales), ranks=to(rk))


def expected(c):
    d = torch.float64
    y = c["y"].to(d).clone()
    return add_lora_ref(
        y, c["x"].to(d), [a.to(d) for a in c["A"]], [b.to(d) for b in c["B"]], c["ids"], c["scales"].to(d), c["ranks"]
    )


def run_triton(c, strategy, meta=None):
    y = c["y"].clone()
    groups = None if meta is None else meta.groups
    add_lora_triton(y, c["x"], c["A"], c["B"], c["ids"], c["scales"], c["ranks"], groups=groups, strategy=strategy)
    return y


def check(c, y, tol, what):
    exp = expected(c)
    untouched = c["ids"] < 0
    assert torch.equal(y[untouched], c["y"][untouched]), f"{what}: rows with id -1 were modified"
    assert_close_rel(y, exp, tol, what)
    if y.dtype in (torch.float16, torch.bfloat16):
        lowp = add_lora_lowp(c["y"], c["x"], c["A"], c["B"], c["ids"], c["scales"], c["ranks"])
        assert_fa_rule(y, exp, lowp, what)


def mixed_ranks(L, r_max):
    """Ranks in [0, r_max] with one rank-0 adapter and one full-rank adapter."""
    ranks = [max(1, (r_max * (j + 1)) // L) for j in range(L)]
    ranks[1 % L] = 0
    ranks[-1] = r_max
    return ranks


# ----------------------------------------------------------------------------------------------
# Accuracy across token→adapter patterns, both strategies forced
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", ["distinct", "uniform", "zipf", "one", "with_none"])
@pytest.mark.parametrize("strategy", ["bgmv", "sgmv"])
def test_patterns_mixed_ranks(strategy, pattern, dtype):
    L, r_max = 6, 16
    M = 24 if strategy == "bgmv" else 90
    c = make_case(M, 40, WIDTHS, L, r_max, dtype, ranks=mixed_ranks(L, r_max), pattern=pattern, seed=1)
    check(c, run_triton(c, strategy), TOL[dtype], f"{strategy}/{pattern}/{dtype}")
    # Padding past each adapter's rank must never be read: NaN there would leak into y.
    poisoned = dict(c, A=[a.clone() for a in c["A"]], B=[b.clone() for b in c["B"]])
    for i, r in enumerate(c["ranks"].tolist()):
        for a, b in zip(poisoned["A"], poisoned["B"]):
            a[i, r:] = float("nan")
            b[i, :, r:] = float("nan")
    y = c["y"].clone()
    add_lora_triton(y, c["x"], poisoned["A"], poisoned["B"], c["ids"], c["scales"], c["ranks"], strategy=strategy)
    check(c, y, TOL[dtype], f"{strategy}/{pattern}/{dtype} with NaN padding")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", ["distinct", "zipf", "one", "with_none"])
def test_bgmv_token_tiles_and_k_splits(pattern, dtype):
    """Decode kernels with several 16-token tiles, several K splits (partials summed by the expand), several
    distinct adapters per tile, mixed ranks (one 0) and two slices."""
    L, r_max, K = 5, 32, 200
    assert triton_splits(K) > 1
    c = make_case(37, K, [40, 9], L, r_max, dtype, ranks=[32, 0, 7, 17, 1], pattern=pattern, seed=17)
    check(c, run_triton(c, "bgmv"), TOL[dtype], f"bgmv tiles+splits/{pattern}/{dtype}")


def triton_splits(K):
    return -(-K // multi_lora._k_per_split(K))


@pytest.mark.parametrize("r", [1, 8, 16, 64, 128])
@pytest.mark.parametrize("strategy", ["bgmv", "sgmv"])
def test_uniform_ranks(strategy, r):
    c = make_case(7, 33, [19, 6], 3, r, torch.float32, ranks=None, pattern="with_none", seed=r)
    check(c, run_triton(c, strategy), TOL[torch.float32], f"{strategy}/r={r}")


@pytest.mark.parametrize("strategy", ["bgmv", "sgmv"])
def test_mixed_ranks_up_to_128(strategy):
    L, r_max = 4, 128
    c = make_case(9, 24, [12, 20], L, r_max, torch.float32, ranks=[128, 0, 1, 37], pattern="uniform", seed=3)
    check(c, run_triton(c, strategy), TOL[torch.float32], f"{strategy}/mixed<=128")


@pytest.mark.parametrize(
    "M,strategy",
    [(0, "bgmv"), (0, "sgmv"), (1, "bgmv"), (1, "sgmv"), (7, "bgmv"), (7, "sgmv"), (64, "bgmv"), (64, "sgmv"), (300, "sgmv")],
)
def test_num_tokens(M, strategy):
    L, r_max = 5, 8
    c = make_case(M, 20, WIDTHS, L, r_max, torch.float16, ranks=mixed_ranks(L, r_max), pattern="zipf", seed=M)
    y = run_triton(c, strategy)
    if M == 0:
        assert y.shape == (0, sum(WIDTHS))
        return
    check(c, y, TOL[torch.float16], f"M={M}/{strategy}")


def test_bgmv_large_batch_small_dims():
    """The decode kernel on a prefill-sized batch (correctness only; auto never picks it here)."""
    c = make_case(160, 16, [8, 5], 4, 4, torch.float32, ranks=[4, 2, 0, 1], pattern="zipf", seed=7)
    check(c, run_triton(c, "bgmv"), TOL[torch.float32], "bgmv M=300")


# ----------------------------------------------------------------------------------------------
# Layout, slices, ids, dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["bgmv", "sgmv"])
def test_non_contiguous_x_and_y(strategy):
    c = make_case(11, 36, WIDTHS, 4, 16, torch.float32, ranks=[16, 3, 0, 9], pattern="with_none", seed=11)
    xt = torch.randn(c["x"].shape[1], 2 * c["x"].shape[0], device=DEV)
    x = xt[:, ::2].t()  # [M, K] with strides (2, 2M)
    x.copy_(c["x"])
    big = torch.randn(c["y"].shape[0], c["y"].shape[1] + 13, device=DEV)
    y = big[:, 5 : 5 + c["y"].shape[1]]
    y.copy_(c["y"])
    assert not x.is_contiguous() and not y.is_contiguous()
    before = big.clone()
    add_lora_triton(y, x, c["A"], c["B"], c["ids"], c["scales"], c["ranks"], strategy=strategy)
    check(c, y, TOL[torch.float32], f"non-contiguous/{strategy}")
    assert torch.equal(big[:, :5], before[:, :5]) and torch.equal(big[:, 5 + y.shape[1] :], before[:, 5 + y.shape[1] :])


@pytest.mark.parametrize("strategy", ["bgmv", "sgmv"])
def test_more_slices_than_one_launch(strategy):
    widths = [7, 16, 3, 9, 12, 5]  # > MAX_SLICES: two launch groups with a column offset
    assert len(widths) > multi_lora.MAX_SLICES
    c = make_case(13, 20, widths, 3, 8, torch.float32, ranks=[8, 0, 5], pattern="uniform", seed=5)
    check(c, run_triton(c, strategy), TOL[torch.float32], f"6 slices/{strategy}")


@pytest.mark.parametrize("strategy", ["bgmv", "sgmv"])
def test_single_tensor_slice_and_ranks_none(strategy):
    c = make_case(10, 20, [33], 3, 16, torch.float16, ranks=None, pattern="with_none", seed=6)
    check(c, run_triton(c, strategy), TOL[torch.float16], f"one slice/{strategy}")


@pytest.mark.parametrize("strategy", ["bgmv", "sgmv"])
def test_out_of_range_ids_are_skipped(strategy):
    """Validation rejects them upstream; the kernels must still not touch those rows (nor read out of bounds)."""
    c = make_case(12, 20, WIDTHS, 3, 8, torch.float32, ranks=[8, 4, 2], pattern="uniform", seed=9)
    bad = c["ids"].clone()
    bad[[0, 5, 11]] = torch.tensor([3, -7, 1000], dtype=bad.dtype, device=bad.device)
    y = c["y"].clone()
    add_lora_triton(y, c["x"], c["A"], c["B"], bad, c["scales"], c["ranks"], strategy=strategy)
    skipped = (bad < 0) | (bad >= 3)
    assert torch.equal(y[skipped], c["y"][skipped])
    good = dict(c, ids=torch.where(skipped, torch.full_like(bad, -1), bad))
    check(good, y, TOL[torch.float32], f"bad ids/{strategy}")


@pytest.mark.parametrize("strategy", ["bgmv", "sgmv"])
def test_int64_ids_and_adapter_dtype_differs(strategy):
    c = make_case(9, 24, WIDTHS, 3, 8, torch.float16, ranks=[8, 1, 6], pattern="uniform", seed=12)
    c["ids"] = c["ids"].to(torch.int64)
    c["A"] = [a.float() for a in c["A"]]
    c["B"] = [b.float() for b in c["B"]]
    check(c, run_triton(c, strategy), TOL[torch.float16], f"int64 ids, fp32 adapters/{strategy}")


def test_all_ids_none_is_identity():
    c = make_case(20, 16, WIDTHS, 3, 8, torch.float32, pattern="uniform", seed=2)
    c["ids"] = torch.full_like(c["ids"], -1)
    for s in ("bgmv", "sgmv"):
        assert torch.equal(run_triton(c, s), c["y"])


# ----------------------------------------------------------------------------------------------
# Strategy choice and metadata
# ----------------------------------------------------------------------------------------------


def test_choose_strategy_rule_and_overrides(monkeypatch):
    monkeypatch.delenv(multi_lora.STRATEGY_ENV, raising=False)
    assert choose_strategy(1, 128, 64) == "bgmv"
    assert choose_strategy(8, 128, 64) == "bgmv"
    assert choose_strategy(16, 8, 16) == "bgmv"
    assert choose_strategy(2048, 8, 16) == "sgmv"
    assert choose_strategy(64, 128, 64) == "sgmv"
    assert choose_strategy(2048, 8, 16, "bgmv") == "bgmv"
    monkeypatch.setenv(multi_lora.STRATEGY_ENV, "sgmv")
    assert choose_strategy(1, 1, 8) == "sgmv"
    assert choose_strategy(1, 1, 8, "bgmv") == "bgmv"  # argument beats env
    monkeypatch.setenv(multi_lora.STRATEGY_ENV, "auto")
    assert choose_strategy(1, 1, 8) == "bgmv"
    monkeypatch.setenv(multi_lora.STRATEGY_ENV, "gemm")
    with pytest.raises(ValueError, match="unknown multi-LoRA strategy"):
        choose_strategy(1, 1, 8)


@pytest.mark.parametrize("strategy", ["bgmv", "sgmv"])
def test_public_api_env_strategy_and_meta(monkeypatch, strategy):
    monkeypatch.setenv(multi_lora.STRATEGY_ENV, strategy)
    L = 4
    c = make_case(40, 24, WIDTHS, L, 16, torch.float32, ranks=[16, 0, 5, 11], pattern="zipf", seed=21)
    meta = LoRABatchMeta(c["ids"], L, block_m=16)
    for m in (None, meta):
        y = c["y"].clone()
        out = lora_kernels.add_lora(y, c["x"], c["A"], c["B"], c["ids"], c["scales"], c["ranks"], backend="triton", meta=m)
        assert out is y
        check(c, y, TOL[torch.float32], f"public/{strategy}/meta={m is not None}")


def test_meta_reuse_across_layers_and_update():
    """One meta for two 'layers' (different weights and widths), then update_ for a new batch == a fresh meta."""
    L = 5
    c1 = make_case(70, 24, WIDTHS, L, 16, torch.float32, ranks=mixed_ranks(L, 16), pattern="zipf", seed=31)
    c2 = make_case(70, 24, [32], L, 8, torch.float32, ranks=[8, 8, 0, 2, 5], pattern="zipf", seed=31)
    c2["ids"] = c1["ids"]
    meta = LoRABatchMeta(c1["ids"], L, max_tokens=96, block_m=16)
    for c in (c1, c2):
        check(c, run_triton(c, "sgmv", meta=meta), TOL[torch.float32], "meta reuse")
    gen = torch.Generator().manual_seed(99)
    new_ids = make_ids("with_none", 70, L, gen).to(DEV)
    meta.update_(new_ids)
    fresh = LoRABatchMeta(new_ids, L, max_tokens=96, block_m=16)
    for name in ("adapter_ids", "counts", "seg_offsets", "sorted_token_ids", "token_pos", "tiles"):
        assert torch.equal(getattr(meta, name), getattr(fresh, name)), name
    c3 = dict(c1, ids=new_ids)
    y_upd = run_triton(c3, "sgmv", meta=meta)
    y_fresh = run_triton(c3, "sgmv", meta=fresh)
    assert torch.equal(y_upd, y_fresh)
    check(c3, y_upd, TOL[torch.float32], "after update_")


def test_meta_rejected_when_stale():
    L = 3
    c = make_case(10, 16, [8], L, 4, torch.float32, pattern="uniform", seed=4)
    meta = LoRABatchMeta(c["ids"], L)
    other = (c["ids"] + 1) % L
    with pytest.raises(lora_kernels.LoRAInputError, match="different adapter_ids"):
        lora_kernels.add_lora(c["y"].clone(), c["x"], c["A"], c["B"], other, c["scales"], backend="triton", meta=meta)
    with pytest.raises(lora_kernels.LoRAInputError, match="L=4 adapters"):
        lora_kernels.add_lora(
            c["y"].clone(), c["x"], c["A"], c["B"], c["ids"], c["scales"], backend="triton", meta=LoRABatchMeta(c["ids"], 4)
        )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_add_lora_meta(backend):
    L = 3
    c = make_case(9, 16, [8, 5], L, 8, torch.float32, ranks=[8, 0, 3], pattern="with_none", seed=8)
    meta = LoRABatchMeta(c["ids"], L, block_m=16)
    args = (c["y"].clone(), c["x"], c["A"], c["B"], c["ids"], c["scales"], c["ranks"], backend, *meta.groups)
    torch.library.opcheck(torch.ops.lora_kernels.add_lora_.default, args)
    y = c["y"].clone()
    torch.ops.lora_kernels.add_lora_(y, *args[1:])
    check(c, y, TOL[torch.float32], f"add_lora_ with meta/{backend}")


def test_torch_compile_fullgraph_with_meta():
    L = 3
    c = make_case(20, 16, [12, 5], L, 8, torch.float32, ranks=[8, 0, 3], pattern="with_none", seed=13)
    meta = LoRABatchMeta(c["ids"], L, block_m=16)

    def f(y, x, ids):
        return lora_kernels.add_lora(y, x, c["A"], c["B"], ids, c["scales"], c["ranks"], backend="triton", meta=meta)

    y = torch.compile(f, fullgraph=True)(c["y"].clone(), c["x"], c["ids"])
    check(c, y, TOL[torch.float32], "torch.compile + meta")


# ----------------------------------------------------------------------------------------------
# GPU only: bf16, autotuned configs, CUDA graphs
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["bgmv", "sgmv"])
@pytest.mark.parametrize("pattern", ["distinct", "zipf", "with_none"])
def test_bf16_gpu(strategy, pattern):
    L, r_max = 16, 64
    M = 32 if strategy == "bgmv" else 512
    c = make_case(M, 1024, [1024, 256, 256], L, r_max, torch.bfloat16, ranks=mixed_ranks(L, r_max), pattern=pattern, seed=41)
    check(c, run_triton(c, strategy), TOL[torch.bfloat16], f"bf16/{strategy}/{pattern}")


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["bgmv", "sgmv"])
def test_cuda_graph_replay_with_meta_update(strategy):
    L, M = 8, 48
    c = make_case(M, 256, [256, 64, 64], L, 16, torch.float16, ranks=mixed_ranks(L, 16), pattern="zipf", seed=51)
    ids = c["ids"].clone()
    meta = LoRABatchMeta(ids, L)
    y_static = c["y"].clone()

    def step():
        y_static.copy_(c["y"])
        add_lora_triton(y_static, c["x"], c["A"], c["B"], ids, c["scales"], c["ranks"], groups=meta.groups, strategy=strategy)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: compile + autotune outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for seed in (1, 2):
        new_ids = make_ids("with_none", M, L, torch.Generator().manual_seed(seed)).cuda()
        ids.copy_(new_ids)
        meta.update_(ids)
        g.replay()
        torch.cuda.synchronize()
        check(dict(c, ids=new_ids), y_static, TOL[torch.float16], f"graph replay {seed}/{strategy}")


# ----------------------------------------------------------------------------------------------
# The benchmark script's CPU-checkable parts
# ----------------------------------------------------------------------------------------------


def _bench_module():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_multi_lora.py"
    spec = importlib.util.spec_from_file_location("bench_multi_lora", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_baseline_and_floor_on_cpu(capsys):
    bench = _bench_module()
    case = dict(name="t", M=20, L=4, r_max=8, ranks=[8, 2, 0, 5], widths=[16, 8], K=24)
    inp = bench.make_inputs(case, torch.float32, "cpu")
    d = torch.float64
    exp = add_lora_ref(inp["y0"].to(d).clone(), inp["x"].to(d), [a.to(d) for a in inp["A"]], [b.to(d) for b in inp["B"]],
                       inp["ids"], inp["scales"].to(d), inp["ranks"])
    y = inp["y0"].clone()
    bench.gather_bmm_(y, inp["x"], inp["A"], inp["B"], inp["ids"], inp["scales"], inp["ranks"])  # padding is zero
    assert_close_rel(y, exp, TOL[torch.float32], "gather_bmm baseline")
    used = set(inp["ids"].tolist())
    assert bench.floor_bytes(case, inp, 4) == 4 * (sum(case["ranks"][i] * (24 + 24) for i in used) + 20 * 24 + 2 * 20 * 24)
    if not HAS_CUDA:
        assert bench.main(["--quick"]) == 0
        assert "no CUDA GPU" in capsys.readouterr().out
