"""LoRABatchMeta (device-built batch metadata) and AdapterSlots (per-layer adapter storage)."""

import math

import pytest
import torch
from conftest import HAS_CUDA, TOL, assert_close_rel

import lora_kernels
from lora_kernels import LoRAInputError
from lora_kernels.reference import add_lora_ref
from lora_kernels.serving import AdapterSlots, LoRABatchMeta

DEV = "cuda" if HAS_CUDA else "cpu"


# ----------------------------------------------------------------------------------------------
# LoRABatchMeta
# ----------------------------------------------------------------------------------------------


def _check_meta_invariants(meta: LoRABatchMeta, ids: torch.Tensor, L: int):
    ids = ids.cpu().to(torch.int64)
    M, C, BM = ids.shape[0], meta.capacity, meta.block_m
    full = torch.full((C,), -1, dtype=torch.int64)
    full[:M] = ids
    key = torch.where((full >= 0) & (full < L), full, torch.full_like(full, L))
    counts = torch.bincount(key, minlength=L + 1)
    assert torch.equal(meta.counts.cpu().to(torch.int64), counts)
    assert torch.equal(meta.seg_offsets.cpu().to(torch.int64), torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
    order = meta.sorted_token_ids.cpu().to(torch.int64)
    assert torch.equal(order, torch.sort(key, stable=True).indices)  # stable: token order kept inside a segment
    assert torch.equal(meta.token_pos.cpu().to(torch.int64)[order], torch.arange(C))
    # tiles: every token with an adapter is covered exactly once by a tile of its own adapter, <= block_m tokens each
    tiles = meta.tiles.cpu().to(torch.int64)
    covered = torch.zeros(C, dtype=torch.int64)
    used = 0
    for a, s, e in tiles.t().tolist():
        if a < 0:
            continue
        used += 1
        assert 0 < e - s <= BM
        toks = order[s:e]
        assert bool((key[toks] == a).all())
        covered[toks] += 1
    has = key < L
    assert bool((covered[has] == 1).all()) and bool((covered[~has] == 0).all())
    assert used == int(sum(math.ceil(int(c) / BM) for c in counts[:L]))
    assert meta.num_tiles >= used


@pytest.mark.parametrize("M,L,cap,bm", [(0, 3, None, 64), (1, 1, None, 16), (7, 4, 10, 16), (70, 5, 96, 16), (300, 8, 300, 64), (33, 40, 33, 16)])
def test_meta_buffers(M, L, cap, bm):
    gen = torch.Generator().manual_seed(M + L)
    ids = torch.randint(-1, L, (M,), generator=gen, dtype=torch.int32).to(DEV)
    meta = LoRABatchMeta(ids, L, max_tokens=cap, block_m=bm)
    assert meta.capacity == (cap or M)
    _check_meta_invariants(meta, ids, L)


def test_meta_update_in_place_matches_fresh():
    L, cap = 6, 50
    gen = torch.Generator().manual_seed(0)
    meta = LoRABatchMeta(torch.randint(-1, L, (50,), generator=gen).to(DEV), L, max_tokens=cap, block_m=16)
    ptrs = {n: getattr(meta, n).data_ptr() for n in ("adapter_ids", "counts", "seg_offsets", "sorted_token_ids", "token_pos", "tiles")}
    for M in (50, 31, 1, 0):
        ids = torch.randint(-1, L, (M,), generator=gen, dtype=torch.int64).to(DEV)
        meta.update_(ids)
        assert meta.num_tokens == M
        assert {n: getattr(meta, n).data_ptr() for n in ptrs} == ptrs  # same storage: graph replays see the update
        fresh = LoRABatchMeta(ids, L, max_tokens=cap, block_m=16)
        for n in ptrs:
            assert torch.equal(getattr(meta, n), getattr(fresh, n)), (M, n)
        _check_meta_invariants(meta, ids, L)


def test_meta_out_of_range_ids_grouped_with_none():
    ids = torch.tensor([2, 9, -4, 0, 2, -1], dtype=torch.int32, device=DEV)
    meta = LoRABatchMeta(ids, 3, block_m=16)
    assert meta.counts.tolist() == [1, 0, 2, 3]
    _check_meta_invariants(meta, ids, 3)


def test_meta_errors():
    ids = torch.zeros(8, dtype=torch.int32, device=DEV)
    with pytest.raises(LoRAInputError, match="1-D"):
        LoRABatchMeta(ids.view(2, 4), 3)
    with pytest.raises(LoRAInputError, match="smaller than the batch"):
        LoRABatchMeta(ids, 3, max_tokens=4)
    with pytest.raises(LoRAInputError, match="power of two"):
        LoRABatchMeta(ids, 3, block_m=24)
    meta = LoRABatchMeta(ids, 3)
    with pytest.raises(LoRAInputError, match="at most 8 tokens"):
        meta.update_(torch.zeros(9, dtype=torch.int32, device=DEV))
    with pytest.raises(LoRAInputError, match="meta describes 8 tokens"):
        meta.check(torch.zeros(5, dtype=torch.int32, device=DEV), 3)
    assert "num_tokens=8" in repr(meta)


# ----------------------------------------------------------------------------------------------
# AdapterSlots
# ----------------------------------------------------------------------------------------------

K, WIDTHS, RMAX = 24, [16, 8, 8], 8


def _peft(r, gen, dtype=torch.float32):
    A = [torch.randn(r, K, generator=gen).to(dtype) for _ in WIDTHS]
    B = [torch.randn(n, r, generator=gen).to(dtype) for n in WIDTHS]
    return A, B


def _slots(dtype=torch.float32, num=4):
    return AdapterSlots(num, RMAX, K, WIDTHS, dtype=dtype, device=DEV)


def test_slots_load_pads_and_sets_rank():
    gen = torch.Generator().manual_seed(0)
    slots = _slots()
    A, B = _peft(3, gen)
    assert slots.load(2, A, B, scale=0.5, name="a") == 2
    assert slots.ranks.tolist() == [0, 0, 3, 0]
    assert slots.scales.tolist() == [0.0, 0.0, 0.5, 0.0]
    for s in range(len(WIDTHS)):
        assert torch.equal(slots.lora_a[s][2, :3].cpu(), A[s])
        assert torch.equal(slots.lora_b[s][2, :, :3].cpu(), B[s])
        assert not slots.lora_a[s][2, 3:].any() and not slots.lora_b[s][2, :, 3:].any()
        assert not slots.lora_a[s][[0, 1, 3]].any()
    assert slots.names == {"a": 2} and slots.slot_of("a") == 2 and slots.free_slot() == 0
    # reloading a slot with a smaller rank clears the old columns
    A2, B2 = _peft(1, gen)
    slots.load(2, A2, B2, scale=1.0, name="b")
    assert slots.ranks[2].item() == 1 and slots.names == {"b": 2}
    assert not slots.lora_a[0][2, 1:].any()


def test_slots_evict():
    gen = torch.Generator().manual_seed(1)
    slots = _slots()
    slots.load(0, *_peft(8, gen), scale=2.0, name="x")
    slots.load(1, *_peft(4, gen), scale=2.0, name="y")
    assert slots.evict("x") == 0
    assert slots.ranks.tolist()[:2] == [0, 4] and slots.scales[0].item() == 0.0
    assert not any(a[0].any() for a in slots.lora_a) and not any(b[0].any() for b in slots.lora_b)
    assert slots.names == {"y": 1}
    slots.evict(1)
    assert slots.names == {} and slots.ranks.tolist() == [0, 0, 0, 0]


def test_slots_errors():
    gen = torch.Generator().manual_seed(2)
    slots = _slots()
    A, B = _peft(4, gen)
    with pytest.raises(LoRAInputError, match="exceeds r_max=8"):
        slots.load(0, *_peft(9, gen), scale=1.0)
    with pytest.raises(LoRAInputError, match=r"slot must be an int in \[0, 4\)"):
        slots.load(4, A, B, scale=1.0)
    with pytest.raises(LoRAInputError, match="slot must be"):
        slots.evict(-1)
    with pytest.raises(LoRAInputError, match=r"lora_A\[1\] must be \[r, K=24\]"):
        slots.load(0, [A[0], A[1][:, :5], A[2]], B, scale=1.0)
    with pytest.raises(LoRAInputError, match=r"lora_B\[2\] must be \[N=8, r\]"):
        slots.load(0, A, [B[0], B[1], torch.randn(9, 4)], scale=1.0)
    with pytest.raises(LoRAInputError, match="rank mismatch|r=4 rows"):
        slots.load(0, A, [B[0][:, :3], B[1], B[2]], scale=1.0)
    with pytest.raises(LoRAInputError, match="expected 3 lora_A"):
        slots.load(0, A[0], B[0], scale=1.0)
    with pytest.raises(LoRAInputError, match="finite"):
        slots.load(0, A, B, scale=float("inf"))
    slots.load(0, A, B, scale=1.0, name="t")
    with pytest.raises(LoRAInputError, match="already loaded in slot 0"):
        slots.load(1, A, B, scale=1.0, name="t")
    with pytest.raises(KeyError, match="no adapter named"):
        slots.evict("nope")
    with pytest.raises(LoRAInputError, match="must be >= 1"):
        AdapterSlots(0, 8, K, WIDTHS)
    # nothing was written by the failed loads
    assert slots.ranks.tolist() == [4, 0, 0, 0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_slots_apply_matches_reference(backend, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    slots = _slots(dtype=dtype)
    peft = {}
    for slot, (r, name) in enumerate([(8, "a"), (3, "b"), (1, "c")]):
        A, B = _peft(r, gen, dtype)
        s = 0.25 * (slot + 1)
        slots.load(slot, A, B, scale=s, name=name)
        peft[name] = (A, B, s)
    names = ["a", None, "c", "b", "b", None, "a", "c", "a"] * 3
    ids = slots.ids_for(names)
    x = torch.randn(len(names), K, generator=gen).to(dtype).to(DEV)
    y0 = torch.randn(len(names), sum(WIDTHS), generator=gen).to(dtype).to(DEV)
    # expected straight from the PEFT-layout tensors: y[t] += s·(x[t]·Aᵀ)·Bᵀ per slice
    exp = y0.double().clone()
    for t, n in enumerate(names):
        if n is None:
            continue
        A, B, s = peft[n]
        col = 0
        for a, b in zip(A, B):
            exp[t, col : col + b.shape[0]] += s * (x[t].double().cpu() @ a.double().t() @ b.double().t()).to(DEV)
            col += b.shape[0]
    for meta in (None, slots.make_meta(ids, block_m=16)):
        # auto picks the decode kernel for this small batch; with meta, force the grouped path that reads it
        monkeypatch.setenv("LORA_KERNELS_MULTI_LORA_STRATEGY", "auto" if meta is None else "sgmv")
        y = y0.clone()
        assert slots.apply(y, x, ids, meta=meta, backend=backend) is y
        assert torch.equal(y[ids < 0], y0[ids < 0])
        assert_close_rel(y, exp, TOL[dtype], f"apply/{backend}/{dtype}/meta={meta is not None}")
    # evicting an adapter makes its tokens' update vanish
    slots.evict("c")
    y = y0.clone()
    slots.apply(y, x, ids, backend=backend)
    c_rows = torch.tensor([n == "c" for n in names], device=DEV)
    assert torch.equal(y[c_rows], y0[c_rows])


def test_slots_single_slice_tensor_load():
    gen = torch.Generator().manual_seed(4)
    slots = AdapterSlots(2, 4, K, 12, dtype=torch.float32, device=DEV)
    A, B = torch.randn(2, K, generator=gen), torch.randn(12, 2, generator=gen)
    slots.load(1, A, B, scale=3.0)
    x = torch.randn(3, K, generator=gen).to(DEV)
    ids = torch.tensor([1, -1, 1], device=DEV)
    y = slots.apply(torch.zeros(3, 12, device=DEV), x, ids, backend="torch")
    exp = add_lora_ref(torch.zeros(3, 12, device=DEV).double(), x.double(), [a.double() for a in slots.lora_a],
                       [b.double() for b in slots.lora_b], ids, slots.scales.double(), slots.ranks)
    # the torch backend is its own composition (grouped by adapter), no longer the reference itself
    assert_close_rel(y, exp, TOL[torch.float32], "torch backend vs float64 reference")
    assert torch.equal(y[1], torch.zeros(12, device=DEV))
    assert_close_rel(y[0], 3.0 * (x[0].cpu() @ A.t() @ B.t()).to(DEV), TOL[torch.float32], "single slice")


# ----------------------------------------------------------------------------------------------
# GPU: public add_lora captured in a CUDA graph with meta.update_ between replays
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("M", [4, 96])
def test_cuda_graph_add_lora_with_meta_update(M):
    gen = torch.Generator().manual_seed(5)
    L, r_max, K_, widths = 8, 16, 256, [256, 64, 64]
    slots = AdapterSlots(L, r_max, K_, widths, dtype=torch.bfloat16, device="cuda")
    for slot in range(L - 1):  # last slot stays empty (rank 0)
        r = [16, 8, 1, 4, 16, 2, 12][slot]
        A = [torch.randn(r, K_, generator=gen) / 16 for _ in widths]
        B = [torch.randn(n, r, generator=gen) / 4 for n in widths]
        slots.load(slot, A, B, scale=0.5 + slot / 8)
    x = torch.randn(M, K_, generator=gen).to(torch.bfloat16).cuda()
    y0 = torch.randn(M, sum(widths), generator=gen).to(torch.bfloat16).cuda()
    ids = torch.randint(-1, L, (M,), generator=gen, dtype=torch.int32).cuda()
    meta = LoRABatchMeta(ids, L)
    y = y0.clone()

    def step():
        y.copy_(y0)
        slots.apply(y, x, ids, meta=meta, backend="triton")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for seed in (11, 12, 13):
        new = torch.randint(-1, L, (M,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32).cuda()
        ids.copy_(new)
        meta.update_(ids)
        g.replay()
        torch.cuda.synchronize()
        exp = add_lora_ref(
            y0.double().clone(), x.double(), [a.double() for a in slots.lora_a], [b.double() for b in slots.lora_b],
            new, slots.scales.double(), slots.ranks,
        )
        assert torch.equal(y[new < 0], y0[new < 0])
        assert_close_rel(y, exp, TOL[torch.bfloat16], f"graph replay seed={seed}")
