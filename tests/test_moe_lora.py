"""LoRA on mixture-of-experts expert weights (ops/moe_lora.py, lora_kernels/moe.py): the reference against naive loops,
the torch and Triton (interpreter) backends against the float64 reference (forward, every gradient, serving), the
routing metadata, errors, opcheck, no host read on the Triton path, the MoE modules (transformers v5 3-D experts and
nn.ModuleList experts), PEFT ``target_parameters`` on the fused path (losses and gradients equal to PEFT's over
training steps of a tiny MoE model, saved-activation bytes), PEFT adapter files, the bytes the Triton kernels move
(tests/traffic.py) and vLLM's MoE-LoRA semantics."""

import math

import pytest
import torch
from conftest import HAS_CUDA, TOL, assert_close_rel, assert_fa_rule, poison_

import lora_kernels as lk
from lora_kernels import reference as ref
from lora_kernels._checks import LoRAInputError
from lora_kernels.ops.moe_lora import MoERouting, pick_block_m

DEV = "cuda" if HAS_CUDA else "cpu"


def _has_triton():
    try:
        import triton  # noqa: F401

        return HAS_CUDA or __import__("os").environ.get("TRITON_INTERPRET") == "1"
    except ImportError:
        return False


needs_triton = pytest.mark.skipif(not _has_triton(), reason="needs triton (GPU or TRITON_INTERPRET=1)")
F32_TOL = TOL["tf32"] if HAS_CUDA else TOL[torch.float32]


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------


def make_routing_ids(M, k, E, pattern, gen):
    """topk_ids [M, k]: "random" (distinct experts per token, as torch.topk gives), "ties" (router scores with ties:
    many tokens share their experts, equal weights), "skewed" (most experts get no token), "invalid" (ids outside
    [0, E): -1 and E + 3, e.g. masked by expert parallelism), "dup" (a token listing one expert twice)."""
    if pattern == "skewed":
        ids = torch.randint(0, min(E, 2), (M, k), generator=gen)
    else:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)]) if M else torch.zeros(0, k)
    ids = ids.to(torch.int64)
    if pattern == "ties" and M:
        scores = torch.zeros(M, E)
        scores[:, : max(k, 1)] = 1.0  # every expert of the first k has the same score: topk breaks the ties
        ids = torch.topk(scores, k, dim=-1).indices
    if pattern == "invalid" and M:
        ids[::3, 0] = -1
        ids[1::4, -1] = E + 3
    if pattern == "dup" and M and k > 1:
        ids[:, 1] = ids[:, 0]
    return ids


def make_case(M, k, E, N, K, r, dtype, *, pattern="random", pair_rows=False, weights=True, bias=False,
              shared_a=False, lora=True, seed=0, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    rows = M * k if pair_rows else M
    x = torch.randn(rows, K, generator=gen)
    W = torch.randn(E, N, K, generator=gen) / math.sqrt(K)
    A = (torch.randn(r, K, generator=gen) if shared_a else torch.randn(E, r, K, generator=gen)) / math.sqrt(K)
    B = torch.randn(E, N, r, generator=gen) / math.sqrt(max(r, 1))
    b = torch.randn(E, N, generator=gen) if bias else None
    ids = make_routing_ids(M, k, E, pattern, gen)
    w = torch.rand(M, k, generator=gen) + 0.1 if weights else None
    if pattern == "ties" and w is not None:
        w = torch.full((M, k), 1.0 / k)
    to = lambda t, dt=dtype: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    return dict(x=to(x), W=to(W), A=to(A) if lora else None, B=to(B) if lora else None, bias=to(b),
                ids=ids.to(device), w=to(w, torch.float32), scale=0.7)


def _expand_a(c):
    A = c["A"]
    if A is not None and A.dim() == 2:
        A = A.unsqueeze(0).expand(c["W"].shape[0], *A.shape)
    return A


def ref_forward(c, combine, dtype=torch.float64, grad=False):
    """The float64 reference with autograd (returns y and the leaves)."""
    leaves = {}
    for n in ("x", "A", "B", "w", "W", "bias"):
        t = c[n]
        if t is not None:
            t = t.detach().to(dtype).requires_grad_(grad)
        leaves[n] = t
    A = leaves["A"]
    if A is not None and A.dim() == 2:
        A = A.unsqueeze(0).expand(leaves["W"].shape[0], *A.shape)
    y = ref.moe_lora_linear_ref(leaves["x"], leaves["W"], A, leaves["B"], c["scale"], c["ids"], leaves["w"],
                                leaves["bias"], combine)
    return y, leaves


def lowp_forward(c, combine):
    """The same computation by plain torch in the inputs' own precision (the FlashAttention rule's baseline)."""
    y, leaves = ref_forward(c, combine, dtype=c["x"].dtype, grad=True)
    return y, leaves


def run_op(c, combine, backend, grad=True, routing=None):
    leaves = {n: (c[n].detach().clone().requires_grad_(grad) if c[n] is not None else None)
              for n in ("x", "A", "B", "w")}
    y = lk.moe_lora_linear(leaves["x"], c["W"], leaves["A"], leaves["B"], c["scale"], c["ids"], leaves["w"],
                           c["bias"], combine=combine, routing=routing, backend=backend)
    return y, leaves


GRADS = ("x", "A", "B", "w")


def check_against_reference(c, combine, backend, tol):
    y, leaves = run_op(c, combine, backend)
    y_ref, ref_leaves = ref_forward(c, combine, grad=True)
    assert_close_rel(y, y_ref, tol, "y")
    gen = torch.Generator().manual_seed(5)
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    (y * dy).sum().backward()
    (y_ref * dy.to(torch.float64)).sum().backward()
    for n in GRADS:
        if leaves[n] is None:
            continue
        assert leaves[n].grad is not None, f"no gradient for {n}"
        assert_close_rel(leaves[n].grad, ref_leaves[n].grad, tol, f"d{n}")
    if y.dtype in (torch.float16, torch.bfloat16):
        y_lp, lp_leaves = lowp_forward(c, combine)
        (y_lp * dy).sum().backward()
        assert_fa_rule(y, y_ref, y_lp.detach(), "y")
        for n in GRADS:
            if leaves[n] is not None:
                assert_fa_rule(leaves[n].grad, ref_leaves[n].grad, lp_leaves[n].grad, f"d{n}")
    return y


# ----------------------------------------------------------------------------------------------
# the reference (spec) against naive loops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["random", "ties", "invalid", "dup", "skewed"])
@pytest.mark.parametrize("pair_rows,combine", [(False, False), (True, True), (False, True)])
def test_reference_matches_naive_loops(pattern, pair_rows, combine):
    M, k, E, N, K, r = 7, 2, 5, 6, 4, 3
    c = make_case(M, k, E, N, K, r, torch.float64, pattern=pattern, pair_rows=pair_rows, bias=True, device="cpu")
    y = ref.moe_lora_linear_ref(c["x"], c["W"], c["A"], c["B"], c["scale"], c["ids"], c["w"], c["bias"], combine)
    out = torch.zeros(M * k, N, dtype=torch.float64)
    for t in range(M):
        for j in range(k):
            p, e = t * k + j, int(c["ids"][t, j])
            if not 0 <= e < E:
                continue
            xr = c["x"][p] if pair_rows else c["x"][t]
            o = xr @ c["W"][e].t() + c["bias"][e] + c["scale"] * (xr @ c["A"][e].t()) @ c["B"][e].t()
            out[p] = float(c["w"][t, j]) * o
    want = out.view(M, k, N).sum(1) if combine else out
    assert torch.allclose(y, want, rtol=1e-12, atol=1e-12)


def test_serving_reference_matches_naive_loops():
    gen = torch.Generator().manual_seed(3)
    M, k, E, K, L, r = 6, 2, 4, 5, 3, 4
    widths = [3, 5]
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    A = [torch.randn(L, E, r, K, generator=gen, dtype=torch.float64) for _ in widths]
    B = [torch.randn(L, E, n, r, generator=gen, dtype=torch.float64) for n in widths]
    ids = make_routing_ids(M, k, E, "invalid", gen)
    aid = torch.tensor([0, -1, 2, 1, 2, -1])
    scales = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64)
    ranks = torch.tensor([4, 0, 2])
    w = torch.rand(M, k, generator=gen, dtype=torch.float64)
    y0 = torch.randn(M * k, sum(widths), generator=gen, dtype=torch.float64)
    y = ref.add_moe_lora_ref(y0.clone(), x, A, B, ids, w, aid, scales, ranks)
    want = y0.clone()
    for t in range(M):
        i = int(aid[t])
        for j in range(k):
            e = int(ids[t, j])
            if i < 0 or not 0 <= e < E:
                continue
            rk, off = int(ranks[i]), 0
            for a, b in zip(A, B):
                n = b.shape[2]
                want[t * k + j, off:off + n] += float(w[t, j]) * float(scales[i]) * (x[t] @ a[i, e, :rk].t()) @ b[i, e, :, :rk].t()
                off += n
    assert torch.allclose(y, want, rtol=1e-12, atol=1e-12)


def test_reference_is_the_gradient_oracle():
    c = make_case(5, 2, 3, 4, 6, 2, torch.float64, bias=True, device="cpu")
    leaves = [c[n].double().clone().requires_grad_() for n in ("x", "A", "B", "w")]

    def f(x, A, B, w):
        return ref.moe_lora_linear_ref(x, c["W"], A, B, 0.7, c["ids"], w, c["bias"], True)

    assert torch.autograd.gradcheck(f, tuple(leaves))


# ----------------------------------------------------------------------------------------------
# the routing metadata
# ----------------------------------------------------------------------------------------------


def _tiles(r: MoERouting, which="expert"):
    sorted_pairs, tiles, bm = r.expert_groups if which == "expert" else r.lora_groups
    out = []
    for g, s, e in tiles.t().tolist():
        if g >= 0:
            assert 0 < e - s <= bm
            out.append((g, sorted_pairs[s:e].tolist()))
    return out


@pytest.mark.parametrize("M,k,E,block_m", [(0, 2, 4, 16), (1, 1, 1, 16), (37, 2, 8, 16), (50, 8, 16, 32), (9, 3, 64, 64)])
def test_routing_tiles_cover_every_pair_once(M, k, E, block_m):
    gen = torch.Generator().manual_seed(M + k)
    ids = make_routing_ids(M, k, E, "invalid", gen).to(DEV)
    r = MoERouting(ids, E, block_m=block_m)
    seen = []
    flat = ids.reshape(-1).tolist()
    for g, pairs in _tiles(r):
        for p in pairs:
            want = flat[p] if 0 <= flat[p] < E else E
            assert g == want, f"pair {p} (expert {flat[p]}) in a tile of group {g}"
        assert pairs == sorted(pairs), "stable order within a group"
        seen += pairs
    assert sorted(seen) == list(range(M * k)), "every pair exactly once"
    used = {g for g, _ in _tiles(r)}
    empty = set(range(E)) - {e for e in flat if 0 <= e < E}
    assert not (used & empty), "an expert with no token got a tile"
    counts = torch.bincount(torch.tensor([e if 0 <= e < E else E for e in flat] + [E]), minlength=E + 1)
    counts[E] -= 1
    assert r.expert_counts.tolist() == counts.tolist()


def test_routing_capacity_update_and_adapter_groups():
    gen = torch.Generator().manual_seed(1)
    E, L, k = 6, 3, 2
    r = MoERouting(make_routing_ids(4, k, E, "random", gen).to(DEV), E, adapter_ids=torch.tensor([0, -1, 2, 1], device=DEV),
                   num_adapters=L, max_tokens=16, block_m=16)
    bufs = [t.data_ptr() for t in (r.expert_sorted, r.expert_tiles, r.lora_sorted, r.lora_tiles)]
    ids = make_routing_ids(11, k, E, "invalid", gen).to(DEV)
    aid = torch.randint(-1, L, (11,), generator=gen).to(DEV)
    r.update_(ids, aid)
    assert [t.data_ptr() for t in (r.expert_sorted, r.expert_tiles, r.lora_sorted, r.lora_tiles)] == bufs, "in place"
    fresh = MoERouting(ids, E, adapter_ids=aid, num_adapters=L, max_tokens=16, block_m=16)
    assert _tiles(r) == _tiles(fresh) and _tiles(r, "lora") == _tiles(fresh, "lora")
    seen = []
    for g, pairs in _tiles(r, "lora"):
        a, e = divmod(g, E)
        for p in pairs:
            assert int(aid[p // k]) == a and int(ids.reshape(-1)[p]) == e
        seen += pairs
    want = [p for p in range(11 * k) if int(aid[p // k]) >= 0 and 0 <= int(ids.reshape(-1)[p]) < E]
    assert sorted(seen) == want, "the lora tiles hold exactly the pairs with an adapter and an expert"
    with pytest.raises(LoRAInputError, match="max_tokens|M <= 16"):
        r.update_(make_routing_ids(17, k, E, "random", gen).to(DEV), torch.zeros(17, dtype=torch.int64, device=DEV))


def test_pick_block_m():
    assert pick_block_m(8, 64) == 16 and pick_block_m(4096, 8) == 64 and pick_block_m(600, 16) == 64
    assert pick_block_m(400, 16) == 32


# ----------------------------------------------------------------------------------------------
# the training op on each backend against the float64 reference (forward and every gradient)
# ----------------------------------------------------------------------------------------------

# (M, k, E, N, K, r, pattern, pair_rows, combine, extras)
CASES = [
    (13, 2, 5, 24, 20, 4, "random", False, False, {}),  # gate/up: token rows -> pair rows
    (13, 2, 5, 24, 20, 4, "random", True, True, {}),  # down: pair rows -> combined token rows
    (13, 2, 5, 24, 20, 4, "random", False, True, {}),  # token rows, combined
    (9, 1, 4, 17, 33, 1, "ties", False, True, {}),  # top-1, rank 1, odd N / K, ties
    (6, 8, 8, 16, 12, 16, "random", True, True, dict(bias=True)),  # top-8 of 8, bias
    (11, 2, 16, 20, 16, 8, "skewed", False, False, dict(weights=False)),  # most experts without tokens
    (10, 3, 6, 18, 14, 5, "invalid", True, True, dict(bias=True)),  # ids outside [0, E)
    (7, 2, 4, 16, 16, 3, "dup", False, True, dict(shared_a=True)),  # one expert twice per token, shared A
    (8, 2, 3, 20, 24, 33, "random", False, False, dict(lora=False)),  # the plain grouped GEMM (no LoRA)
    (1, 2, 4, 16, 16, 2, "random", True, True, {}),  # one token
]


def _ids(case):
    M, k, E, N, K, r, pattern, pair_rows, combine, extra = case
    return f"M{M}k{k}E{E}N{N}K{K}r{r}-{pattern}-{'pair' if pair_rows else 'tok'}{'-comb' if combine else ''}" + \
        "".join(f"-{n}" for n in extra)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_torch_backend_matches_reference(case):
    M, k, E, N, K, r, pattern, pair_rows, combine, extra = case
    c = make_case(M, k, E, N, K, r, torch.float64, pattern=pattern, pair_rows=pair_rows, **extra)
    c["w"] = None if c["w"] is None else c["w"].double()
    check_against_reference(c, combine, "torch", TOL[torch.float64])


@pytest.mark.parametrize("combine", [False, True])
def test_zero_tokens(combine):
    c = make_case(0, 2, 4, 8, 6, 2, torch.float32, pair_rows=combine)
    y, leaves = run_op(c, combine, "torch")
    assert y.shape == ((0, 8) if combine else (0, 8))
    y.sum().backward()
    assert leaves["A"].grad is not None and float(leaves["A"].grad.abs().sum()) == 0.0


def test_weight_and_bias_gradients_when_they_require_grad():
    """LoRA training freezes the experts, but a trainable weight / bias gets its exact gradient (plain torch path)."""
    c = make_case(9, 2, 4, 10, 8, 3, torch.float64, bias=True, pattern="invalid")
    c["w"] = c["w"].double()
    W, b = c["W"].clone().requires_grad_(), c["bias"].clone().requires_grad_()
    y = lk.moe_lora_linear(c["x"], W, c["A"], c["B"], 0.7, c["ids"], c["w"], b, combine=True, backend="torch")
    Wr, br = c["W"].clone().requires_grad_(), c["bias"].clone().requires_grad_()
    yr = ref.moe_lora_linear_ref(c["x"], Wr, c["A"], c["B"], 0.7, c["ids"], c["w"], br, True)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, (W, b), dy)
    gr = torch.autograd.grad(yr, (Wr, br), dy)
    assert_close_rel(g[0], gr[0], TOL[torch.float64], "dW")
    assert_close_rel(g[1], gr[1], TOL[torch.float64], "dbias")


@pytest.fixture
def poisoned_triton(monkeypatch):
    """The Triton launchers' outputs and scratch buffers start as NaN: an element no kernel wrote shows up."""
    from lora_kernels.triton import moe_lora as tm

    monkeypatch.setattr(tm, "_alloc", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype, device=device)))
    return tm


# fp32 on most cases, fp16 (FlashAttention rule too) on the representative ones (interpreter time)
TRITON_CASES = [(CASES[i], torch.float32) for i in (0, 1, 3, 4, 6, 7, 8, 9)] + \
    [(CASES[i], torch.float16) for i in (0, 1, 4, 6)]


@needs_triton
@pytest.mark.parametrize("case,dtype", TRITON_CASES, ids=[f"{_ids(c)}-{str(d)[6:]}" for c, d in TRITON_CASES])
def test_triton_matches_reference(case, dtype, poisoned_triton):
    M, k, E, N, K, r, pattern, pair_rows, combine, extra = case
    c = make_case(M, k, E, N, K, r, dtype, pattern=pattern, pair_rows=pair_rows, **extra)
    check_against_reference(c, combine, "triton", F32_TOL if dtype == torch.float32 else TOL[dtype])


@needs_triton
def test_triton_strided_inputs_and_transposed_weight(poisoned_triton):
    """x a column slice, W stored [E, K, N] (GPT-OSS) and read as W.transpose(1, 2), B a strided view (PEFT's
    [N, r·E] lora_B read per expert), topk_weights non-contiguous: no copies, same result."""
    M, k, E, N, K, r = 10, 2, 4, 20, 18, 3
    c = make_case(M, k, E, N, K, r, torch.float32, bias=True)
    gen = torch.Generator().manual_seed(9)
    big = torch.randn(M, K + 7, generator=gen).to(DEV)
    c["x"] = big[:, 3:3 + K]
    c["W"] = c["W"].transpose(1, 2).contiguous().transpose(1, 2)  # storage [E, K, N]
    c["B"] = c["B"].permute(1, 2, 0).contiguous().permute(2, 0, 1)  # storage [N, r, E] (PEFT's lora_B layout)
    c["w"] = torch.rand(k, M, generator=gen).to(DEV).t()
    assert not c["x"].is_contiguous() and not c["W"].is_contiguous() and not c["B"].is_contiguous()
    check_against_reference(c, True, "triton", F32_TOL)


@needs_triton
@pytest.mark.parametrize("r", [16, 128])
def test_triton_rank_tiles(r, poisoned_triton):
    c = make_case(12, 2, 3, 16, 16, r, torch.float32)
    check_against_reference(c, True, "triton", F32_TOL)


@needs_triton
def test_triton_gradient_subsets(poisoned_triton):
    """Only some gradients asked for (frozen A: LoRA-FA; no router grad; dB only): each alone equals the reference."""
    c = make_case(9, 2, 4, 16, 16, 4, torch.float32)
    y_ref, rl = ref_forward(c, True, grad=True)
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(2))
    (y_ref * dy).sum().backward()
    for wanted in (("B",), ("x", "B"), ("A", "w"), ("w",)):
        leaves = {n: c[n].detach().clone().requires_grad_(n in wanted) for n in ("x", "A", "B", "w")}
        y = lk.moe_lora_linear(leaves["x"], c["W"], leaves["A"], leaves["B"], c["scale"], c["ids"], leaves["w"],
                               combine=True, backend="triton")
        (y * dy.to(y.device)).sum().backward()
        for n in ("x", "A", "B", "w"):
            if n in wanted:
                assert_close_rel(leaves[n].grad, rl[n].grad, F32_TOL, f"d{n} ({wanted})")
            else:
                assert leaves[n].grad is None


@needs_triton
def test_triton_with_a_shared_routing_and_padding_capacity(poisoned_triton):
    """One MoERouting built with spare capacity (as a serving engine would) drives both projections."""
    M, k, E = 7, 2, 5
    c1 = make_case(M, k, E, 24, 16, 4, torch.float32)
    r = MoERouting(c1["ids"], E, max_tokens=32, block_m=16)
    y1, _ = run_op(c1, False, "triton", grad=False, routing=r)
    assert_close_rel(y1, ref_forward(c1, False)[0], F32_TOL, "gate_up")
    c2 = make_case(M, k, E, 16, 24, 4, torch.float32, pair_rows=True)
    c2["ids"] = c1["ids"]
    y2, _ = run_op(c2, True, "triton", grad=False, routing=r)
    assert_close_rel(y2, ref_forward(c2, True)[0], F32_TOL, "down")


# ----------------------------------------------------------------------------------------------
# the routing sum on Triton (triton/moe_lora.py: routing_sum): a per-pair buffer summed in a fixed order, or fp32
# atomics into a zeroed [M, ·] accumulator (y with combine; dx of token-row x in the backward)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def deterministic():
    """Runs the test body's ``with deterministic():`` block under torch.use_deterministic_algorithms(True)."""
    import contextlib

    @contextlib.contextmanager
    def on():
        prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=warn)

    return on


@needs_triton
def test_routing_sum_choice(deterministic, monkeypatch):
    """The one place the strategy is chosen: by default the fewest bytes (16-bit: atomics in the result's own dtype,
    2·b·M·N, against the buffer's 2·b·M·k·N; fp32: atomics into the result, 8·M·N); ``LORA_KERNELS_MOE_SUM=fp32``
    keeps 16-bit sums in fp32 (buffer 2·b·M·k·N vs atomic 16·M·N, the buffer on a tie); ``=buffer`` and torch's
    deterministic mode always take the buffer; k = 1 needs no sum; any other value is an error."""
    from lora_kernels.triton.moe_lora import SUM_ENV, routing_sum

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    monkeypatch.delenv(SUM_ENV, raising=False)
    assert routing_sum(128, 1, 256, f16) == "direct"
    assert [routing_sum(128, k, 256, dt) for k in (2, 8) for dt in (f16, bf16)] == ["atomic_out"] * 4
    assert [routing_sum(128, k, 256, f32) for k in (2, 8)] == ["atomic", "atomic"]
    monkeypatch.setenv(SUM_ENV, "fp32")
    assert [routing_sum(128, k, 256, f16) for k in (2, 3, 4, 5, 8)] == ["buffer"] * 3 + ["atomic"] * 2
    assert [routing_sum(128, k, 256, bf16) for k in (4, 5)] == ["buffer", "atomic"]
    assert [routing_sum(128, k, 256, f32) for k in (2, 8)] == ["atomic", "atomic"]
    monkeypatch.setenv(SUM_ENV, "buffer")
    assert [routing_sum(128, k, 256, dt) for k in (2, 8) for dt in (f16, f32)] == ["buffer"] * 4
    monkeypatch.setenv(SUM_ENV, "fast")
    with pytest.raises(LoRAInputError, match="LORA_KERNELS_MOE_SUM"):
        routing_sum(128, 2, 256, f16)
    monkeypatch.delenv(SUM_ENV)
    with deterministic():
        assert [routing_sum(128, k, 256, dt) for k in (2, 8) for dt in (f16, f32)] == ["buffer"] * 4
        assert routing_sum(128, 1, 256, f32) == "direct"


@pytest.fixture
def forced_sum(monkeypatch, poisoned_triton):
    """``forced_sum(how)``: the Triton launchers sum through ``how`` whenever k > 1; returns the list of what they
    took (outputs NaN-poisoned as in ``poisoned_triton``)."""
    tm = poisoned_triton

    def force(how):
        taken = []

        def pick(M, k, N, dtype):
            taken.append("direct" if k == 1 else how)
            return taken[-1]

        monkeypatch.setattr(tm, "routing_sum", pick)
        return taken

    return force


# (M, k, E, N, K, r, pattern, pair_rows, combine, extras): each has a routing sum (combine, or token-row x in the
# backward), or top-1 where there is none to make
SUM_CASES = [
    (9, 1, 4, 17, 33, 1, "ties", False, True, {}),  # top-1 (direct), ties
    (12, 2, 6, 24, 20, 4, "ties", False, True, {}),  # top-2, ties (equal weights), token rows: y and dx summed
    (11, 2, 16, 20, 16, 8, "skewed", True, True, {}),  # most experts without tokens
    (6, 8, 8, 16, 12, 16, "random", True, True, dict(bias=True)),  # top-8 of 8 (every expert), bias
    (10, 2, 6, 18, 14, 5, "invalid", False, True, dict(bias=True)),  # ids -1 / E + 3; token 9 has no expert at all
    (7, 2, 4, 16, 16, 3, "dup", True, True, {}),  # one expert twice per token: two adds to a row from one tile
    (8, 8, 8, 16, 12, 4, "random", False, False, dict(weights=False)),  # gate/up top-8: dx of token rows summed
]
SUM_RUNS = [(c, d, "atomic") for c in SUM_CASES for d in (torch.float32, torch.float16)] + \
    [(c, torch.float16, "atomic_out") for c in SUM_CASES] + \
    [(SUM_CASES[i], torch.float32, "buffer") for i in (1, 4, 6)]


@needs_triton
@pytest.mark.parametrize("case,dtype,how", SUM_RUNS, ids=[f"{_ids(c)}-{str(d)[6:]}-{h}" for c, d, h in SUM_RUNS])
def test_triton_routing_sum_matches_reference(case, dtype, how, forced_sum):
    """Either strategy, forward and every gradient, against the float64 reference (fp16: FlashAttention rule too)."""
    M, k, E, N, K, r, pattern, pair_rows, combine, extra = case
    taken = forced_sum(how)
    c = make_case(M, k, E, N, K, r, dtype, pattern=pattern, pair_rows=pair_rows, **extra)
    y = check_against_reference(c, combine, "triton", F32_TOL if dtype == torch.float32 else TOL[dtype])
    sums = int(combine) + int(not pair_rows and k > 1)  # the forward's (combine), the backward's (token-row x)
    assert taken == ["direct" if k == 1 else how] * sums, taken
    if pattern == "invalid":  # a token whose pairs all lack an expert: an exact zero row (no bias either)
        assert torch.equal(y[9], torch.zeros_like(y[9]))


@needs_triton
def test_deterministic_mode_sums_through_the_buffer_reproducibly(deterministic, poisoned_triton, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) both routing sums of a top-8 fp16 layer (the atomics' case
    otherwise) go through the buffer, and y and dx are bitwise equal across two runs. dA, dB and d(topk_weights)
    stay fp32 atomic sums over tiles (see triton/moe_lora.py), so only their closeness is checked."""
    tm = poisoned_triton
    taken = []
    pick = tm.routing_sum
    monkeypatch.setattr(tm, "routing_sum", lambda *a: taken.append(pick(*a)) or taken[-1])
    c = make_case(12, 8, 8, 20, 16, 4, torch.float16, bias=True)
    assert pick(12, 8, 20, torch.float16) == "atomic_out"
    y_ref, rl = ref_forward(c, True, grad=True)
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3)).to(DEV, torch.float16)
    (y_ref * dy.double()).sum().backward()
    runs = []
    with deterministic():
        for _ in range(2):
            y, leaves = run_op(c, True, "triton")
            (y * dy).sum().backward()
            runs.append((y.detach(), {n: leaves[n].grad for n in GRADS}))
    assert taken == ["buffer", "buffer"] * 2, taken
    (y0, g0), (y1, g1) = runs
    assert torch.equal(y0, y1) and torch.equal(g0["x"], g1["x"])
    assert_close_rel(y0, y_ref, TOL[torch.float16], "y")
    for n in GRADS:
        assert_close_rel(g0[n], rl[n].grad, TOL[torch.float16], f"d{n}")


@needs_triton
def test_autotuner_zeroes_only_outputs(monkeypatch):
    """While it times configs on a GPU the autotuner zeroes the kernels' ``reset_to_zero`` arguments: every launch
    of the gradient subsets and routing sums hands them outputs or scratch only, never dy, x or a weight."""
    from lora_kernels.triton import moe_lora as tm

    seen = []
    for kern in (tm._moe_fwd_kernel, tm._moe_bwd_kernel):
        orig = kern.run

        def spy(*args, _kern=kern, _orig=orig, **kw):
            named = dict(zip(_kern.arg_names, args), **kw)
            seen.append({n: named[n].data_ptr() for n in _kern.reset_to_zero})
            return _orig(*args, **kw)

        monkeypatch.setattr(kern, "run", spy)
    c = make_case(9, 2, 4, 16, 16, 4, torch.float32)
    for wanted in (("B",), ("A", "w"), ("x",), ("w",)):
        leaves = {n: c[n].detach().clone().requires_grad_(n in wanted) for n in ("x", "A", "B", "w")}
        y = lk.moe_lora_linear(leaves["x"], c["W"], leaves["A"], leaves["B"], c["scale"], c["ids"], leaves["w"],
                               combine=True, backend="triton")
        dy = torch.ones_like(y)
        inputs = {t.data_ptr() for t in (dy, leaves["x"], c["W"], leaves["A"], leaves["B"], leaves["w"], c["ids"])}
        seen.clear()
        y.backward(dy)
        assert seen and all(not (set(s.values()) & inputs) for s in seen), (wanted, seen)


# ----------------------------------------------------------------------------------------------
# serving: add_moe_lora over [L, E, ...] slots and per-token adapter ids
# ----------------------------------------------------------------------------------------------


def serve_case(M, k, E, K, widths, L, r_max, dtype, *, ranks=None, pattern="random", pair_rows=False, weights=False,
               seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M * k if pair_rows else M, K, generator=gen)
    A = [torch.randn(L, E, r_max, K, generator=gen) / math.sqrt(K) for _ in widths]
    B = [torch.randn(L, E, n, r_max, generator=gen) / math.sqrt(r_max) for n in widths]
    ids = make_routing_ids(M, k, E, pattern, gen)
    aid = torch.randint(-1, L, (M,), generator=gen)
    if M:
        aid[::4] = -1
    scales = torch.rand(L, generator=gen) + 0.5
    w = torch.rand(M, k, generator=gen) if weights else None
    y = torch.randn(M * k, sum(widths), generator=gen)  # random, not poison: rows without an adapter stay bit-identical
    to = lambda t, dt=dtype: None if t is None else t.to(DEV, dt)  # noqa: E731
    return dict(y=to(y), x=to(x), A=[to(a) for a in A], B=[to(b) for b in B], ids=ids.to(DEV), aid=aid.to(DEV),
                scales=to(scales, torch.float32), w=to(w, torch.float32),
                ranks=None if ranks is None else torch.tensor(ranks, dtype=torch.int32, device=DEV))


def serve_expected(c):
    d = torch.float64
    return ref.add_moe_lora_ref(c["y"].to(d).clone(), c["x"].to(d), [a.to(d) for a in c["A"]], [b.to(d) for b in c["B"]],
                                c["ids"], None if c["w"] is None else c["w"].to(d), c["aid"], c["scales"].to(d),
                                c["ranks"])


def serve_lowp(c):
    return ref.add_moe_lora_ref(c["y"].clone(), c["x"], c["A"], c["B"], c["ids"], c["w"], c["aid"], c["scales"].to(c["y"].dtype),
                                c["ranks"])


def serve_check(c, y, tol, what):
    k = c["ids"].shape[1]
    E = c["A"][0].shape[1]
    skip = (c["aid"].repeat_interleave(k) < 0) | (c["ids"].reshape(-1) < 0) | (c["ids"].reshape(-1) >= E)
    assert torch.equal(y[skip], c["y"][skip]), f"{what}: rows without adapter or expert were modified"
    exp = serve_expected(c)
    assert_close_rel(y, exp, tol, what)
    if y.dtype == torch.float16:
        assert_fa_rule(y, exp, serve_lowp(c), what)


SERVE_CASES = [
    # (M, k, E, K, widths, L, r_max, ranks, pattern, pair_rows, weights)
    (13, 2, 4, 24, [16, 16], 3, 16, [16, 5, 0], "random", False, False),  # w13: gate + up slices, mixed ranks
    (13, 2, 4, 16, [24], 3, 16, None, "invalid", True, True),  # w2: pair rows, routing weights
    (9, 1, 3, 20, [17], 2, 8, [1, 8], "ties", False, False),  # top-1
    (5, 8, 8, 16, [16, 16], 4, 32, [32, 17, 3, 0], "random", False, True),  # top-8
    (1, 2, 4, 16, [16], 2, 16, None, "random", True, False),  # one token
    (0, 2, 4, 16, [16], 2, 16, None, "random", False, False),  # no tokens
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", SERVE_CASES, ids=lambda c: f"M{c[0]}k{c[1]}E{c[2]}-{c[8]}-{'pair' if c[9] else 'tok'}")
def test_add_moe_lora_matches_reference(case, dtype, backend, monkeypatch):
    M, k, E, K, widths, L, r_max, ranks, pattern, pair_rows, weights = case
    if backend == "torch" and dtype == torch.float16 and not HAS_CUDA:
        dtype = torch.float64  # the CPU torch backend: float64 exactly instead
    c = serve_case(M, k, E, K, widths, L, r_max, dtype, ranks=ranks, pattern=pattern, pair_rows=pair_rows, weights=weights)
    y = c["y"].clone()
    with torch.no_grad():
        lk.add_moe_lora(y, c["x"], c["A"], c["B"], c["ids"], c["aid"], c["scales"], c["ranks"], c["w"], backend=backend)
    tol = {torch.float64: TOL[torch.float64], torch.float32: F32_TOL, torch.float16: TOL[torch.float16]}[dtype]
    serve_check(c, y, tol, f"{backend} {dtype}")


@needs_triton
def test_add_moe_lora_cuda_graph_style_replays():
    """One routing with a fixed capacity, updated in place between batches (what a captured CUDA graph replays): every
    batch equals a fresh computation, and the kernels' grid never depends on the batch."""
    from lora_kernels.triton import moe_lora as tm

    E, L, k, cap = 4, 3, 2, 24
    r = None
    grids = set()
    orig = tm._moe_delta_kernel.run

    def spy(*args, grid, **kw):
        grids.add(grid({"BLOCK_N": 32}) if callable(grid) else grid)
        return orig(*args, grid=grid, **kw)

    tm._moe_delta_kernel.run = spy
    try:
        for seed, M in ((0, 5), (1, 24), (2, 1)):
            c = serve_case(M, k, E, 16, [20], L, 16, torch.float32, ranks=[16, 4, 9], seed=seed, pattern="invalid",
                           weights=True)
            if r is None:
                r = MoERouting(c["ids"], E, adapter_ids=c["aid"], num_adapters=L, max_tokens=cap, block_m=16)
            else:
                r.update_(c["ids"], c["aid"])
            y = c["y"].clone()
            with torch.no_grad():
                lk.add_moe_lora(y, c["x"], c["A"], c["B"], c["ids"], c["aid"], c["scales"], c["ranks"], c["w"], routing=r,
                                backend="triton")
            serve_check(c, y, F32_TOL, f"batch {seed}")
    finally:
        tm._moe_delta_kernel.run = orig
    assert len(grids) == 1, f"the grid changed with the batch: {grids}"


@needs_triton
def test_triton_paths_read_nothing_on_the_host(monkeypatch):
    """With a prebuilt routing and the value checks off (as inside a CUDA-graph capture), neither the serving update
    nor the training forward / backward reads a device value on the host (no aten._local_scalar_dense: .item(),
    .tolist(), bool())."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoHostRead(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func is not torch.ops.aten._local_scalar_dense.default, "a device value was read on the host"
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("LORA_KERNELS_CHECK_DATA", "0")
    c = serve_case(9, 2, 4, 16, [16, 16], 3, 16, torch.float32, ranks=[16, 3, 0], weights=True)
    r = MoERouting(c["ids"], 4, adapter_ids=c["aid"], num_adapters=3, max_tokens=16, block_m=16)
    y = c["y"].clone()
    with torch.no_grad(), NoHostRead():
        lk.add_moe_lora(y, c["x"], c["A"], c["B"], c["ids"], c["aid"], c["scales"], c["ranks"], c["w"], routing=r,
                        backend="triton")
        r.update_(c["ids"], c["aid"])
    serve_check(c, y, F32_TOL, "under NoHostRead")
    t = make_case(9, 2, 4, 16, 16, 4, torch.float32)
    rt = MoERouting(t["ids"], 4, block_m=16)
    leaves = {n: t[n].clone().requires_grad_() for n in ("x", "A", "B", "w")}
    with NoHostRead():
        y = lk.moe_lora_linear(leaves["x"], t["W"], leaves["A"], leaves["B"], 0.5, t["ids"], leaves["w"], combine=True,
                               routing=rt, backend="triton")
        y.sum().backward()
    assert all(leaves[n].grad is not None for n in leaves)


# ----------------------------------------------------------------------------------------------
# errors (raised before any kernel runs), opcheck
# ----------------------------------------------------------------------------------------------


def _train_args(**over):
    c = make_case(5, 2, 3, 8, 6, 2, torch.float32)
    args = dict(x=c["x"], weight=c["W"], lora_a=c["A"], lora_b=c["B"], scale=0.5, topk_ids=c["ids"], topk_weights=c["w"],
                bias=None)
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(weight=torch.zeros(3, 8)), r"weight must be 3-D \[E, N, K\]"),
    (dict(x=torch.zeros(5, 7)), r"x has 7 features but weight is \[3, 8, 6\]"),
    (dict(x=torch.zeros(6, 6)), r"x must have M=5 rows .* or M·k=10 rows"),
    (dict(lora_a=torch.zeros(2, 2, 6)), r"lora_a must be \[E=3, r, K=6\]"),
    (dict(lora_b=torch.zeros(3, 8, 3)), r"rank mismatch: lora_a has r=2 but lora_b has 3"),
    (dict(lora_b=None), r"lora_a and lora_b must be given together"),
    (dict(topk_ids=torch.zeros(5, 2)), r"topk_ids must be a 2-D int32 or int64 tensor"),
    (dict(topk_weights=torch.zeros(5, 3)), r"topk_weights must be \[M=5, k=2\]"),
    (dict(bias=torch.zeros(3, 7)), r"bias must be \[E=3, N=8\]"),
    (dict(scale=float("nan")), r"scale must be finite"),
    (dict(x=torch.zeros(5, 6, dtype=torch.float64)), r"weight dtype torch.float32 must equal x dtype torch.float64"),
])
def test_moe_lora_linear_errors(over, match):
    args = _train_args(**{k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in over.items()})
    with pytest.raises(LoRAInputError, match=match):
        lk.moe_lora_linear(**args)


def test_routing_mismatch_is_an_error():
    args = _train_args()
    other = MoERouting(torch.zeros(5, 2, dtype=torch.int64, device=DEV), 3)
    with pytest.raises(LoRAInputError, match="routing was built from different topk_ids"):
        lk.moe_lora_linear(**args, routing=other)
    with pytest.raises(LoRAInputError, match="routing was built for E=4 experts"):
        lk.moe_lora_linear(**args, routing=MoERouting(args["topk_ids"], 4))
    with pytest.raises(LoRAInputError, match="routing describes 3 tokens"):
        lk.moe_lora_linear(**args, routing=MoERouting(args["topk_ids"][:3], 3))


@pytest.mark.parametrize("what,match", [
    ("ids_high", r"adapter id out of range: adapter_ids must be in \[-1, L=3\), got min -1, max 3"),
    ("ids_low", r"adapter id out of range"),
    ("rank", r"ranks must be in \[0, r_max=16\]"),
    ("scale", r"scales must be finite"),
    ("y_rows", r"y must be 2-D \[M·k=18, N\]"),
    ("width", r"slice widths \[16, 16\] sum to 32 but y has 31 columns"),
    ("a4d", r"lora_a must be \[L, E, r_max, K\]"),
    ("grad", r"requires grad, but add_moe_lora is an inference op"),
    ("overlap", r"y overlaps x in memory"),
    ("routing", r"routing was built without adapter_ids"),
])
def test_add_moe_lora_errors_leave_y_untouched(what, match):
    c = serve_case(9, 2, 4, 16, [16, 16], 3, 16, torch.float32, ranks=[16, 3, 0])
    y, x, A, B, aid, scales, ranks = c["y"].clone(), c["x"], c["A"], c["B"], c["aid"].clone(), c["scales"].clone(), c["ranks"].clone()
    routing = None
    if what == "ids_high":
        aid[2] = 3
    elif what == "ids_low":
        aid[2] = -2
    elif what == "rank":
        ranks[0] = 17
    elif what == "scale":
        scales[1] = float("inf")
    elif what == "y_rows":
        y = y[:-1]
    elif what == "width":
        y = y[:, :-1]
    elif what == "a4d":
        A = [a[0] for a in A]
    elif what == "grad":
        x = x.clone().requires_grad_()
    elif what == "overlap":
        x = y[: x.shape[0], :16]
    elif what == "routing":
        routing = MoERouting(c["ids"], 4)
    before = y.clone()
    with pytest.raises(LoRAInputError, match=match):
        lk.add_moe_lora(y, x, A, B, c["ids"], aid, scales, ranks, routing=routing)
    assert torch.equal(y, before), "y changed although the call failed"


@needs_triton
def test_triton_rank_above_128_is_a_clear_error():
    c = make_case(4, 2, 2, 16, 16, 129, torch.float32)
    with pytest.raises(LoRAInputError, match="rank 129 > 128"):
        lk.moe_lora_linear(c["x"], c["W"], c["A"], c["B"], 0.5, c["ids"], backend="triton")


def test_opcheck():
    c = make_case(6, 2, 3, 8, 6, 2, torch.float32, pair_rows=True, bias=True)
    ops = torch.ops.lora_kernels
    for combine in (False, True):
        torch.library.opcheck(ops.moe_lora_fwd, (c["x"], c["W"], c["bias"], c["A"], c["B"], 0.5, c["ids"], c["w"], combine,
                                                 "torch"))
    y, xa = ops.moe_lora_fwd(c["x"], c["W"], c["bias"], c["A"], c["B"], 0.5, c["ids"], c["w"], True, "torch")
    dy = torch.randn_like(y)
    for mask in ([True, True, True, True], [False, True, False, True]):
        torch.library.opcheck(ops.moe_lora_bwd, (dy, c["x"], xa, c["W"], c["bias"], c["A"], c["B"], 0.5, c["ids"], c["w"],
                                                 True, mask, "torch"))
    s = serve_case(6, 2, 3, 16, [8, 8], 2, 4, torch.float32, ranks=[4, 2], weights=True)
    torch.library.opcheck(ops.add_moe_lora_, (s["y"].clone(), s["x"], s["A"], s["B"], s["ids"], s["w"], s["aid"], s["scales"],
                                              s["ranks"], "torch"))


# ----------------------------------------------------------------------------------------------
# modules: inject_lora on MoE experts (Transformers v5 3-D experts; nn.ModuleList experts)
# ----------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from lora_kernels.moe import LoRAExpertList, LoRAExperts  # noqa: E402


def tiny_moe_model(kind, layers=1, seed=0):
    """A tiny MoE causal LM built from a Transformers config (no download), float32, weights N(0, 0.1²)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    if kind == "mixtral":
        m = transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=24, num_local_experts=4,
                                                                        num_experts_per_tok=2, **common))
    elif kind == "qwen3_moe":
        m = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16,
                                                                          num_experts=8, num_experts_per_tok=8, head_dim=8,
                                                                          **common))
    elif kind == "gpt_oss":
        m = transformers.GptOssForCausalLM(transformers.GptOssConfig(intermediate_size=16, num_local_experts=4,
                                                                      num_experts_per_tok=1, head_dim=8, **common))
    else:
        raise ValueError(kind)
    m = m.float().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    return m


def _merged_copy(model, injected):
    """A copy of the plain model whose expert weights hold W + s·B·A of the injected model (the reference)."""
    import copy

    ref_model = copy.deepcopy(model)
    for name, m in injected.named_modules():
        if isinstance(m, LoRAExperts):
            tgt = ref_model.get_submodule(name)
            for p in m.lora_A:
                A = m.lora_A[p] if m.lora_A[p].dim() == 3 else m.lora_A[p].expand(m.lora_B[p].shape[0], -1, -1)
                delta = m.lora_scale * torch.bmm(m.lora_B[p], A)  # [E, out, in]
                with torch.no_grad():
                    getattr(tgt, p).add_(delta.transpose(1, 2) if m.transposed else delta)
    return ref_model


@pytest.mark.parametrize("kind,backend", [("mixtral", "torch"), ("qwen3_moe", "torch"), ("gpt_oss", "torch"),
                                          pytest.param("gpt_oss", "triton", marks=needs_triton),
                                          pytest.param("mixtral", "triton", marks=needs_triton)])
def test_inject_lora_on_3d_experts_equals_the_merged_model(kind, backend):
    """Mixtral (gate_up [E, 2I, H]), Qwen3-MoE (top-8 of 8), GPT-OSS (transposed [E, in, out], biases, interleaved
    gate/up, its own clamped SwiGLU): a fresh adapter equals the base model, a trained-looking one equals the model
    with W + s·B·A merged into every expert."""
    import copy

    model = tiny_moe_model(kind)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want0 = model(ids).logits
    inj = copy.deepcopy(model)
    lk.inject_lora(inj, ["experts"], r=4, alpha=8, backend=backend)
    experts = [m for m in inj.modules() if isinstance(m, LoRAExperts)]
    assert len(experts) == 1 and set(experts[0].lora_A) == {"gate_up_proj", "down_proj"}
    with torch.no_grad():
        assert_close_rel(inj(ids).logits, want0, 1e-5, "fresh adapter")
        for n, p in inj.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
        want = _merged_copy(model, inj)(ids).logits
        assert_close_rel(inj(ids).logits, want, 1e-5, "adapter vs merged weights")
        assert (want - want0).abs().max() > 1e-3, "the adapter changed nothing: the test would not see a wrong LoRA"


def test_inject_lora_one_projection_and_trainable_set():
    model = tiny_moe_model("mixtral")
    lk.inject_lora(model, ["experts.down_proj", "q_proj"], r=2, alpha=4)
    (experts,) = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert list(experts.lora_A) == ["down_proj"]
    lk.mark_only_lora_as_trainable(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["model.layers.0.mlp.experts.lora_A.down_proj", "model.layers.0.mlp.experts.lora_B.down_proj",
                         "model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B"]
    sd = model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd and "model.layers.0.mlp.experts.down_proj" in sd
    with pytest.raises(ValueError, match="no dropout"):
        lk.inject_lora(tiny_moe_model("mixtral"), ["experts"], r=2, alpha=4, dropout=0.1)


class V4Expert(torch.nn.Module):
    """Transformers v4's MixtralBlockSparseTop2MLP: w2(act(w1 x) · w3 x)."""

    def __init__(self, H, I):
        super().__init__()
        self.w1, self.w2, self.w3 = (torch.nn.Linear(H, I, bias=False), torch.nn.Linear(I, H, bias=False),
                                     torch.nn.Linear(H, I, bias=False))
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class V4Block(torch.nn.Module):
    """Transformers v4's MixtralSparseMoeBlock: router, softmax, top-k, renormalise, a loop over the expert list."""

    def __init__(self, H=16, I=24, E=4, k=2):
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=False)
        self.experts = torch.nn.ModuleList([V4Expert(H, I) for _ in range(E)])
        self.top_k, self.E = k, E

    def route(self, h):
        w = torch.softmax(self.gate(h), dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        return (w / w.sum(-1, keepdim=True)).to(h.dtype), sel

    def forward(self, h):
        w, sel = self.route(h)
        out = torch.zeros_like(h)
        mask = torch.nn.functional.one_hot(sel, self.E).permute(2, 1, 0)
        for e in range(self.E):
            idx, top = torch.where(mask[e])
            if top.numel():
                out.index_add_(0, top, self.experts[e](h[top]) * w[top, idx, None])
        return out


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_expert_list_loop_and_grouped_paths(backend):
    """nn.ModuleList experts: the parent's own loop (per-expert fused lora_linear) and the grouped forward agree with
    each other and with merged weights, in outputs and LoRA gradients; keys unchanged; views survive .double()."""
    import copy

    torch.manual_seed(0)
    blk = V4Block()
    h = torch.randn(10, 16)
    keys = list(blk.state_dict())
    inj = copy.deepcopy(blk)
    lk.inject_lora(inj, ["experts"], r=3, alpha=6, backend=backend)
    assert isinstance(inj.experts, LoRAExpertList) and len(inj.experts) == 4
    assert sorted(k for k in inj.state_dict() if "lora_" not in k) == sorted(keys)
    with torch.no_grad():
        assert_close_rel(inj(h), blk(h), 1e-6, "fresh adapter")
        for n, p in inj.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    merged = copy.deepcopy(blk)
    with torch.no_grad():
        for e, ex in enumerate(merged.experts):
            for n in ("w1", "w2", "w3"):
                getattr(ex, n).weight += inj.experts.lora_scale * inj.experts.lora_B[n][e] @ inj.experts.lora_A[n][e]
    y_loop = inj(h)
    w, sel = inj.route(h)
    y_grp = inj.experts(h, sel, w)
    assert_close_rel(y_loop, merged(h).detach(), 1e-5, "loop vs merged")
    assert_close_rel(y_grp, y_loop.detach(), 1e-5, "grouped vs loop")
    params = [p for n, p in inj.named_parameters() if "lora_" in n]
    g_loop = torch.autograd.grad(y_loop.square().sum(), params)
    g_grp = torch.autograd.grad(y_grp.square().sum(), params)
    for a, b in zip(g_grp, g_loop):
        assert_close_rel(a, b, 1e-5, "LoRA gradients")
    assert inj.experts[2].w3.weight.data_ptr() == inj.experts.gate_up[2, 24:].data_ptr()
    inj.double()
    assert inj.experts.gate_up.dtype == torch.float64
    assert inj.experts[1].w2.weight.data_ptr() == inj.experts.down[1].data_ptr(), "views rebuilt after .double()"
    sd = {k: v.clone() for k, v in inj.state_dict().items()}
    sd["experts.3.w1.weight"].fill_(0.5)
    inj.load_state_dict(sd)
    assert bool((inj.experts.gate_up[3, :24] == 0.5).all()), "load_state_dict reaches the stacked storage"


# ----------------------------------------------------------------------------------------------
# PEFT target_parameters on the fused path; saved activations; PEFT adapter files
# ----------------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")
import lora_kernels.peft as lkpeft  # noqa: E402
from lora_kernels import moe as lkmoe  # noqa: E402
from lora_kernels import peft_io  # noqa: E402


def peft_moe_model(kind="mixtral", layers=2, r=4, seed=0):
    model = tiny_moe_model(kind, layers=layers, seed=seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                          target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # PEFT initialises B = 0: make the adapter matter from step 0
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    return pm


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_peft_target_parameters_training_equals_peft(backend, monkeypatch):
    """A tiny Mixtral (2 layers, 4 experts, top-2) with PEFT LoRA on q/v and target_parameters on both expert
    projections: 3 AdamW steps with PEFT's own forward vs lora_kernels.peft.patch -- equal losses and gradients at
    every step (the expert LoRA running on the grouped kernels, checked by counting the fused calls)."""
    import copy

    pm = peft_moe_model()
    ours = copy.deepcopy(pm)
    report = lkpeft.patch(ours, backend=backend)
    assert sorted(p for p in report.patched if p.endswith("experts")) == [
        "base_model.model.model.layers.0.mlp.experts", "base_model.model.model.layers.1.mlp.experts"]
    calls = []
    orig = lkmoe.experts_forward
    monkeypatch.setattr(lkmoe, "experts_forward", lambda *a, **k: calls.append(1) or orig(*a, **k))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (pm, ours)]
    for step in range(3):
        losses, grads = [], []
        for m, opt in zip((pm, ours), opts):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
            opt.step()
            opt.zero_grad(set_to_none=True)
        print(f"\n{backend} step {step}: loss PEFT {losses[0]:.7f}, lora_kernels {losses[1]:.7f}")
        assert math.isclose(losses[0], losses[1], rel_tol=2e-6), f"step {step}: PEFT {losses[0]} vs ours {losses[1]}"
        assert grads[0].keys() == grads[1].keys() and any("experts" in n for n in grads[0])
        for n in grads[0]:
            assert_close_rel(grads[1][n], grads[0][n], 2e-5, f"step {step} {n}")
    assert len(calls) == 3 * 2, "the experts did not run on the fused path"


def test_peft_patch_falls_back_with_peft_state():
    """disable_adapter() and merged adapters take PEFT's own path (equal outputs); unpatch restores it."""
    import copy

    pm = peft_moe_model(layers=1)
    ours = copy.deepcopy(pm)
    lkpeft.patch(ours, backend="torch")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_rel(ours(ids).logits, pm(ids).logits, 1e-5, "fused")
        with ours.disable_adapter(), pm.disable_adapter():
            assert_close_rel(ours(ids).logits, pm(ids).logits, 1e-6, "adapters disabled")
        ours.merge_adapter()
        assert_close_rel(ours(ids).logits, pm(ids).logits, 1e-5, "merged")
        ours.unmerge_adapter()
    assert lkpeft.unpatch(ours) >= 3


def _saved_bytes(fn, exclude):
    """Bytes of the distinct storages autograd saves while ``fn`` runs, except those of ``exclude`` (parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = (st.nbytes(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(b for b, _ in seen.values()), sorted(seen.values(), reverse=True)


def test_saved_activations_vs_peft():
    """One experts call of a PEFT target_parameters model (T=64 tokens, H=64, I=96, E=8, top-2, r=8, fp32): PEFT saves
    W + ΔW of both projections for the backward (an E·N·K tensor each); the fused path saves no weight-sized tensor."""
    import copy

    H, I, E, T = 64, 96, 8, 64
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=32, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2)).float()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=[],
                                                    target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    ours = copy.deepcopy(pm)
    lkpeft.patch(ours, backend="torch")
    x = torch.randn(T, H, requires_grad=True)
    w, sel = torch.topk(torch.randn(T, E).softmax(-1), 2)
    out = {}
    for name, m in (("peft", pm), ("ours", ours)):
        experts = m.base_model.model.model.layers[0].mlp.experts
        out[name] = _saved_bytes(lambda: experts(x, sel, w), list(m.parameters()))
    weight_sized = {(E, H, 2 * I), (E, 2 * I, H), (E, I, H), (E, H, I)}
    assert weight_sized & {s for _, s in out["peft"][1]}, f"PEFT's W + ΔW not seen: {out['peft'][1][:4]}"
    assert not weight_sized & {s for _, s in out["ours"][1]}, f"a weight-sized tensor saved: {out['ours'][1][:4]}"
    big = max(b for b, _ in out["ours"][1])
    assert big <= T * 2 * 2 * I * 4, "nothing larger than the [T·k, 2I] gate/up activation"
    assert out["ours"][0] < out["peft"][0] / 3, out
    print(f"saved bytes: PEFT {out['peft'][0]}, lora_kernels {out['ours'][0]}")


def test_peft_adapter_files_both_directions(tmp_path):
    """A PEFT target_parameters adapter (with q_proj LoRA too) loads into an inject_lora model (equal outputs) and an
    adapter saved from one loads with PeftModel.from_pretrained (equal outputs); read_peft_adapter gives [E, r, in] /
    [E, out, r] factors."""
    import copy

    pm = peft_moe_model(layers=2)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    cfg, ad = peft_io.read_peft_adapter(str(tmp_path / "peft"))
    assert ad["model.layers.1.mlp.experts.gate_up_proj"][0].shape == (4, 4, 32)
    assert ad["model.layers.1.mlp.experts.down_proj"][1].shape == (4, 32, 4)
    base = tiny_moe_model("mixtral", layers=2)
    ours = copy.deepcopy(base)
    lk.inject_lora(ours, ["q_proj", "v_proj", "experts"], r=4, alpha=8)
    peft_io.load_peft_adapter_(ours, str(tmp_path / "peft"))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close_rel(ours(ids).logits, pm(ids).logits, 1e-5, "PEFT file -> inject_lora model")
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.1)
    peft_io.save_peft_adapter(ours, str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert_close_rel(back(ids).logits, ours(ids).logits, 1e-5, "inject_lora model -> PEFT file -> PEFT")
    dense_only = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    dense_only.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"MoE LoRA projection model.layers.0.mlp.experts.gate_up_proj has no weights"):
        peft_io.load_peft_adapter_(ours, str(tmp_path / "dense"))
    peft_io.load_peft_adapter_(ours, str(tmp_path / "dense"), strict=False)


def test_expert_list_adapter_file_loads_in_peft(tmp_path):
    """An nn.ModuleList expert LoRA saved as the per-expert Linear keys PEFT itself uses: PEFT loads it (equal
    outputs) and it loads back."""
    import copy

    torch.manual_seed(0)
    blk = V4Block()
    inj = copy.deepcopy(blk)
    lk.inject_lora(inj, ["experts"], r=2, alpha=4)
    with torch.no_grad():
        for n, p in inj.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    peft_io.save_peft_adapter(inj, str(tmp_path / "a"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(blk), str(tmp_path / "a"))
    h = torch.randn(6, 16)
    with torch.no_grad():
        assert_close_rel(back(h), inj(h), 1e-5, "PEFT with the saved per-expert adapters")
        again = copy.deepcopy(blk)
        lk.inject_lora(again, ["experts"], r=2, alpha=4)
        peft_io.load_peft_adapter_(again, str(tmp_path / "a"))
        assert_close_rel(again(h), inj(h), 1e-6, "loaded back")


# ----------------------------------------------------------------------------------------------
# bytes moved by the Triton kernels (tests/traffic.py: exact counts under the interpreter, GPU launch configs)
# ----------------------------------------------------------------------------------------------


def _traffic_case(M, k, E, N, K, r, pair_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M * k if pair_rows else M, K, generator=g).half()
    W = (torch.randn(E, N, K, generator=g) / K ** 0.5).half()
    A = (torch.randn(E, r, K, generator=g) / K ** 0.5).half()
    B = torch.randn(E, N, r, generator=g).half()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)]).to(torch.int64)
    return x, W, A, B, ids, torch.rand(M, k, generator=g)


@pytest.fixture
def traffic(monkeypatch):
    """(tests/traffic.py, triton/moe_lora.py, the fp32 accumulators the launchers allocate, in order: the backward's
    dA, dB, d(topk_weights) come first and are named as the outputs they are, read and written by atomics; an
    atomic routing sum's [M, ·] accumulator comes last and stays a temporary). The strategies the routing sums
    took are recorded in ``tm.taken``."""
    if __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts bytes under TRITON_INTERPRET=1 (CPU only)")
    import traffic as T
    from lora_kernels.triton import moe_lora as tm

    acc = []
    orig = tm._zeros
    monkeypatch.setattr(tm, "_zeros", lambda shape, device: acc.append(orig(shape, device)) or acc[-1])
    taken = []
    pick = tm.routing_sum
    monkeypatch.setattr(tm, "routing_sum", lambda *a: taken.append(pick(*a)) or taken[-1])
    monkeypatch.setattr(tm, "taken", taken, raising=False)
    return T, tm, acc


def _measure_fwd(T, tm, M, k, E, N, K, r, pair_rows, combine):
    x, W, A, B, ids, w = _traffic_case(M, k, E, N, K, r, pair_rows)
    rt = MoERouting(ids, E, block_m=pick_block_m(M * k, E))
    w = w if combine else None
    with T.force_config(tm._moe_fwd_kernel, tm.FWD_CONFIGS.gpu[0]), \
            T.force_config(tm._moe_combine_kernel, tm.COMBINE_CONFIGS.gpu[0]):
        with T.Traffic(x=x, W=W, A=A, B=B, topk_weights=w, sorted=rt.expert_sorted, tiles=rt.expert_tiles) as tr:
            y, xa = tm.moe_lora_fwd_triton(x, W, None, A, B, 0.5, ids, w, combine, rt.expert_groups)
            tr.operands.update(y=y, xa=xa)
    return tr, (x, W, A, B, ids, w, rt, xa, y)


@pytest.mark.parametrize("case,ceiling,how,mode", [
    # gate/up projection: token rows in, one row per pair out -- every operand once
    ((128, 2, 8, 512, 256, 16, False, False), 1.01, [], None),
    # down projection + routing sum at Mixtral's proportions (top-2 of 8, I/H = 3.5), by default: 16-bit atomics into
    # the zeroed y, y read back by the atomics (2·M·N bytes beyond y's write; + the 2·M·N zeroing, a torch memset
    # outside the count, printed apart): measured 1.015 (+0.015)
    ((128, 2, 8, 256, 896, 16, True, True), 1.02, ["atomic_out"], None),
    # ... the deterministic per-pair buffer, 2·M·k·N·2 bytes, small next to the expert weights (measured 1.06)
    ((128, 2, 8, 256, 896, 16, True, True), 1.10, ["buffer"], "deterministic"),
    # the same at fine-grained-expert proportions (Qwen3-MoE: top-8 of many small experts, I/H = 0.375), by default:
    # 16-bit atomics into y: measured 1.050 (+0.050 for the zeroing)
    ((128, 8, 16, 256, 96, 16, True, True), 1.06, ["atomic_out"], None),
    # ... at a training batch (1 024 tokens), where activations outweigh the expert weights: measured 1.143 (+0.143;
    # the fp32 atomic sum: 1.86, the buffer 3.30)
    ((1024, 8, 16, 256, 96, 16, True, True), 1.15, ["atomic_out"], None),
    # ... with LORA_KERNELS_MOE_SUM=fp32: fp32 atomics into the [M, N] sum, its cast read back -- 12·M·N bytes counted
    # (+ the 4·M·N zeroing); measured 1.302 (1 696 128 / 1 302 912)
    ((128, 8, 16, 256, 96, 16, True, True), 1.31, ["atomic"], "fp32"),
    # ... under torch's deterministic mode: the per-pair buffer, 4·M·k·N bytes, as large as the expert weights
    # (measured 1.80)
    ((128, 8, 16, 256, 96, 16, True, True), 1.85, ["buffer"], "deterministic"),
], ids=["gate_up", "down-mixtral", "down-mixtral-deterministic", "down-fine-grained", "down-fine-grained-1024",
        "down-fine-grained-fp32-sum", "down-fine-grained-deterministic"])
def test_traffic_forward(case, ceiling, how, mode, traffic, deterministic, monkeypatch):
    T, tm, _ = traffic
    import contextlib

    if mode == "fp32":
        monkeypatch.setenv(tm.SUM_ENV, "fp32")
    with deterministic() if mode == "deterministic" else contextlib.nullcontext():
        tr, _ = _measure_fwd(T, tm, *case)
    assert tm.taken == how
    ynb = tr.stats["y"].nbytes
    # the floor writes y once; the harness counts an operand that atomics touch as in place (read + write): take y's
    # read out of the floor (it stays in uniq, where it belongs), and show the torch memset that zeroes y apart
    floor = tr.floor - (ynb if how == ["atomic_out"] else 0)
    uniq = tr.uniq / floor
    zeroing = ynb / floor if how == ["atomic_out"] else 0.0
    print(f"\nforward {case} {mode or 'default'}: req/floor {tr.req / floor:.3f} uniq/floor {uniq:.3f} "
          f"(+{zeroing:.3f} for zeroing y)\n{tr.table()}")
    assert uniq <= ceiling, tr.table()
    for name in ("x", "W", "A", "B", "y", "xa"):
        once = tr.stats[name].nbytes * (2 if (name == "y" and how == ["atomic_out"]) else 1)  # y: atomics read it too
        assert tr.stats[name].uniq == once, \
            f"{name} moved {tr.stats[name].uniq} distinct bytes, not {once}\n{tr.table()}"


@pytest.mark.parametrize("case,ceiling,how", [
    ((128, 2, 8, 512, 256, 16, False, False), 1.03, ["atomic_out"]),  # gate/up: dx of token rows summed by 16-bit
    # atomics into dx (measured 1.019, +0.019 for the zeroing)
    ((128, 2, 8, 512, 256, 16, False, False), 1.20, ["buffer", "fp32"]),  # ... from a per-pair buffer (measured 1.08)
    ((128, 2, 8, 256, 256, 16, True, True), 1.01, []),  # down: dy of token rows read once by the one backward kernel
    # gate/up at fine-grained proportions (top-8 of 16, K = 256, N = 2·96): dx of token rows by 16-bit atomics into
    # the zeroed dx (read back by the atomics; the zeroing printed apart), measured 1.020 (+0.020)
    ((128, 8, 16, 192, 256, 16, False, False), 1.03, ["atomic_out"]),
    # ... with LORA_KERNELS_MOE_SUM=fp32: fp32 atomics into an [M, K] sum, cast afterwards, measured 1.12 (the per-pair
    # buffer: 1.32)
    ((128, 8, 16, 192, 256, 16, False, False), 1.15, ["atomic", "fp32"]),
])
def test_traffic_backward(case, ceiling, how, traffic, monkeypatch):
    T, tm, acc = traffic
    if how and how[-1] == "fp32":
        monkeypatch.setenv(tm.SUM_ENV, "fp32")
        how = how[:-1]
    _, (x, W, A, B, ids, w, rt, xa, y) = _measure_fwd(T, tm, *case)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).half()
    acc.clear()
    tm.taken.clear()
    with T.force_config(tm._moe_bwd_kernel, tm.BWD_CONFIGS.gpu[0]), \
            T.force_config(tm._moe_combine_kernel, tm.COMBINE_CONFIGS.gpu[0]):
        with T.Traffic(dy=dy, x=x, xa=xa, W=W, A=A, B=B, topk_weights=w, sorted=rt.expert_sorted,
                       tiles=rt.expert_tiles) as tr:
            dx, *_ = tm.moe_lora_bwd_triton(dy, x, xa, W, None, A, B, 0.5, ids, w, case[-1],
                                            [True, True, True, w is not None], rt.expert_groups)
            names = ("dA", "dB") + (("dtopk_weights",) if w is not None else ())
            tr.operands.update(dx=dx, **dict(zip(names, acc)))  # an atomic dx sum's accumulator stays a temporary
    assert tm.taken == how
    dxb = tr.stats["dx"].nbytes
    floor = tr.floor - (dxb if how == ["atomic_out"] else 0)  # dx written once (see test_traffic_forward)
    uniq = tr.uniq / floor
    print(f"\nbackward {case}: req/floor {tr.req / floor:.3f} uniq/floor {uniq:.3f} "
          f"(+{dxb / floor if how == ['atomic_out'] else 0.0:.3f} for zeroing dx)\n{tr.table()}")
    assert uniq <= ceiling, tr.table()
    for name in ("dy", "W", "x"):
        assert tr.stats[name].uniq == tr.stats[name].nbytes, f"{name} read more than once\n{tr.table()}"


def _measure_serving(T, tm, M, k, E, N, K, L, r, ids, aid, slices):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).half()
    As = [(torch.randn(L, E, r, K, generator=g) / K ** 0.5).half() for _ in range(slices)]
    Bs = [torch.randn(L, E, N, r, generator=g).half() for _ in range(slices)]
    y = torch.randn(M * k, N * slices, generator=g).half()
    scales = torch.full((L,), 0.5)
    rt = MoERouting(ids, E, adapter_ids=aid, num_adapters=L, block_m=pick_block_m(M * k, L * E))
    with T.force_config(tm._moe_delta_kernel, tm.DELTA_CONFIGS.gpu[0]):
        with T.Traffic(y=y, x=x, scales=scales, sorted=rt.lora_sorted, tiles=rt.lora_tiles,
                       **{f"A{i}": a for i, a in enumerate(As)}, **{f"B{i}": b for i, b in enumerate(Bs)}) as tr:
            tm.add_moe_lora_triton(y, x, As, Bs, ids, None, aid, scales, None, rt.lora_groups)
    return tr


def test_traffic_serving_prefill(traffic):
    """256 tokens, top-2 of 8 experts, 4 adapters (every (adapter, expert) slot used), gate + up slices: A and B read
    once, y read and written once; x once per slice (the two slices are two launches)."""
    T, tm, _ = traffic
    g = torch.Generator().manual_seed(0)
    M, k, E, L = 256, 2, 8, 4
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)])
    tr = _measure_serving(T, tm, M, k, E, 256, 256, L, 16, ids, torch.arange(M) % L, 2)
    req, uniq = tr.ratios()
    print(f"\nserving prefill: req/floor {req:.2f} uniq/floor {uniq:.2f}\n{tr.table()}")
    assert uniq <= 1.10, tr.table()
    for name in ("A0", "A1", "B0", "B1"):
        assert tr.stats[name].uniq == tr.stats[name].nbytes, tr.table()


def test_traffic_serving_decode(traffic):
    """Decode: 8 tokens x top-2 over 8 experts and 2 adapters, each (adapter, expert) slot used by exactly one pair:
    every slot's A and B read once (req == bytes), K = N = 1024."""
    T, tm, _ = traffic
    M, k, E, L = 8, 2, 8, 2
    ids = torch.tensor([[2 * (t % 4), 2 * (t % 4) + 1] for t in range(M)])
    aid = torch.arange(M) // 4
    tr = _measure_serving(T, tm, M, k, E, 1024, 1024, L, 16, ids, aid, 1)
    req, uniq = tr.ratios()
    print(f"\nserving decode: req/floor {req:.2f} uniq/floor {uniq:.2f}\n{tr.table()}")
    assert tr.stats["A0"].req == tr.stats["A0"].nbytes and tr.stats["B0"].req == tr.stats["B0"].nbytes, tr.table()
    assert uniq <= 1.05, tr.table()


# ----------------------------------------------------------------------------------------------
# vLLM's MoE-LoRA semantics (runs where vLLM is importable: the .ci/vllm_e2e.sh venv)
# ----------------------------------------------------------------------------------------------


def _vllm():
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: not this venv
        return None
    return vllm


needs_vllm = pytest.mark.skipif(_vllm() is None, reason="vLLM is not importable here (see .ci/vllm_e2e.sh)")


def _vllm_one_shot_kernel(tmp_path):
    """vLLM's own fused MoE-LoRA kernel (``_fused_moe_lora_one_shot_kernel``), compiled from its source with the real
    Triton: vLLM's CPU build replaces ``triton`` by a placeholder when Triton has no CPU backend, so the kernel's
    source is written to a module of its own (the interpreter re-reads a kernel's source file) and jitted there, to
    run on the interpreter (TRITON_INTERPRET=1)."""
    import importlib.util
    import inspect
    import textwrap

    import triton
    from vllm.lora.ops.triton_ops import fused_moe_lora_op as fmod

    src = textwrap.dedent(inspect.getsource(inspect.unwrap(fmod._fused_moe_lora_one_shot_kernel)))
    body = src[src.index("def _fused_moe_lora_one_shot_kernel"):]
    path = tmp_path / "vllm_fused_moe_lora_one_shot.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n@triton.jit\n" + body)
    spec = importlib.util.spec_from_file_location("vllm_fused_moe_lora_one_shot", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(mod._fused_moe_lora_one_shot_kernel)


def _run_vllm_moe_lora(kern, out, x, lora_a, lora_b, topk_ids, topk_weights, token_lora_mapping, mul_routed_weight):
    """vLLM's ``add_lora_fused_moe`` with ``naive_block_assignment`` (its small-batch routing: one pair per program,
    experts from topk_ids), launched exactly as ``_run_fused_moe_lora_one_shot`` does; in place on out
    [M, k, N·slices] (``ADD_INPUTS``)."""
    M, k = topk_ids.shape
    A0, B0 = lora_a[0], lora_b[0]
    L, E, r, K = A0.shape
    N = B0.shape[2]
    a_ptrs = torch.tensor([a.data_ptr() for a in lora_a], dtype=torch.int64)
    b_ptrs = torch.tensor([b.data_ptr() for b in lora_b], dtype=torch.int64)
    out_view = out.view(-1, out.shape[-1])
    enabled = torch.ones(L + 1, dtype=torch.int32)
    lora_ids = torch.arange(L, dtype=torch.int32)
    kern[(M * k, len(lora_a), 1)](
        x, a_ptrs, b_ptrs, out_view, topk_weights, None, topk_ids.reshape(-1).to(torch.int32), None,
        token_lora_mapping.to(torch.int32), lora_ids, enabled,
        N, K, topk_weights.numel(), k, L,
        x.stride(0), x.stride(1), *A0.stride(), *B0.stride(), out_view.stride(0), out_view.stride(1), 0, 0, N,
        token_mapping_factor=1 if mul_routed_weight else k, naive_block_assignment=True,
        MUL_ROUTED_WEIGHT=mul_routed_weight, BLOCK_M=16, BLOCK_R=max(16, 1 << (r - 1).bit_length()), actual_rank=r,
        NPID_FACTOR=1, BLOCK_N=32, BLOCK_K=32, ADD_INPUTS=True)


@needs_vllm
@needs_triton
@pytest.mark.parametrize("which", ["w13", "w2"])
def test_add_moe_lora_equals_vllm_fused_moe_lora(which, tmp_path):
    """``add_moe_lora`` against vLLM's own MoE-LoRA kernel on the same tensors and vLLM's layout: w13 (gate + up
    slices, x token rows) and w2 (x pair rows, routing weights multiplied in), 4 slots with one id -1 (no adapter),
    vLLM's zero-padded ranks, scale 1 (vLLM folds the scaling into B). fp32: equal to 1e-5."""
    kern = _vllm_one_shot_kernel(tmp_path)
    g = torch.Generator().manual_seed(0)
    M, k, E, L, r, K = 9, 2, 4, 4, 8, 48
    widths = [32, 32] if which == "w13" else [40]
    pair_rows = which == "w2"
    x = torch.randn(M * k if pair_rows else M, K, generator=g)
    A = [torch.randn(L, E, r, K, generator=g) / K ** 0.5 for _ in widths]
    B = [torch.randn(L, E, n, r, generator=g) for n in widths]
    for a, b in zip(A, B):  # slot 2 holds a rank-5 adapter zero-padded to r = 8, as vLLM stores it
        a[2, :, 5:] = 0
        b[2, :, :, 5:] = 0
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)])
    tw = torch.rand(M, k, generator=g)
    lora_of_token = torch.tensor([0, 1, -1, 2, 3, 1, 0, 2, -1])
    base = torch.randn(M, k, sum(widths), generator=g)
    want = base.clone()
    _run_vllm_moe_lora(kern, want, x, A, B, ids, tw, lora_of_token, mul_routed_weight=pair_rows)
    got = base.clone().view(M * k, -1)
    with torch.no_grad():
        lk.add_moe_lora(got, x, A, B, ids, lora_of_token, torch.ones(L), torch.tensor([8, 8, 5, 8]),
                        topk_weights=tw if pair_rows else None, backend="triton")
    assert not torch.equal(want, base), "vLLM's kernel changed nothing: the comparison would be vacuous"
    assert_close_rel(got.view(M, k, -1), want, 1e-5, f"{which} vs vLLM")
    untouched = (lora_of_token < 0).repeat_interleave(k)
    assert torch.equal(got[untouched], base.view(M * k, -1)[untouched])


@needs_vllm
def test_vllm_cpu_build_has_no_moe_lora_path():
    """Why the vLLM plugin leaves the MoE PunicaWrapper methods to vLLM: on the CPU build they are not implemented
    (PunicaWrapperCPU inherits PunicaWrapperBase's NotImplementedError) and no CPU experts class supports LoRA, so no
    MoE model with LoRA runs there -- nothing an end-to-end test could compare against."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    for method in ("moe_lora_align_block_size", "add_lora_fused_moe", "add_lora_w13", "add_lora_w2"):
        fn = getattr(PunicaWrapperCPU, method)
        with pytest.raises(NotImplementedError):
            fn(*([None] * (fn.__code__.co_argcount - 1)))
    experts = [c for c in vars(cpu_moe).values() if isinstance(c, type) and hasattr(c, "supports_lora")]
    assert experts and not any(c.supports_lora() for c in experts), experts


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_experts_serve_mixed_adapters_from_peft_files(backend, tmp_path):
    """Serving a batch that mixes three PEFT target_parameters adapters (ranks 2 / 4 / 3, read from their files
    into [L, E, ...] slots) and tokens without an adapter through one Mixtral experts module: every token's output
    equals PEFT's model with that token's adapter (or the base model for id -1)."""
    import copy

    base = tiny_moe_model("mixtral", layers=1, seed=1)
    experts = base.model.layers[0].mlp.experts
    E, H, I = 4, 32, 24
    slots = {"gate_up_proj": lkmoe.MoEAdapterSlots(4, E, 4, H, 2 * I), "down_proj": lkmoe.MoEAdapterSlots(4, E, 4, I, H)}
    peft_models = []
    for slot, r in enumerate((2, 4, 3)):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=r, lora_alpha=3 * r + 1, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(slot * 10 + len(n)))
        pm.save_pretrained(tmp_path / f"a{slot}")
        _, ad = peft_io.read_peft_adapter(str(tmp_path / f"a{slot}"))
        for proj in slots:
            A, B, s = ad[f"model.layers.0.mlp.experts.{proj}"]
            slots[proj].load(slot, A, B, s, name=f"a{slot}")
        peft_models.append(pm.eval())
    g = torch.Generator().manual_seed(7)
    M = 12
    x = torch.randn(M, H, generator=g)
    w, sel = torch.topk(torch.randn(M, E, generator=g).softmax(-1), 2)
    aid = torch.tensor([0, 1, 2, -1, 2, 1, 0, -1, 1, 1, 2, 0])
    routing = MoERouting(sel, E, adapter_ids=aid, num_adapters=4, max_tokens=32, block_m=16)
    y = lkmoe.experts_serve(experts, x, sel, w, slots, aid, routing=routing, backend=backend)
    with torch.no_grad():
        for t in range(M):
            model = peft_models[int(aid[t])] if aid[t] >= 0 else None
            mod = model.base_model.model.model.layers[0].mlp.experts if model is not None else experts
            want = mod(x[t:t + 1], sel[t:t + 1], w[t:t + 1])
            assert_close_rel(y[t:t + 1], want, 1e-5, f"token {t} (adapter {int(aid[t])})")
