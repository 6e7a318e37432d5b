"""The merge op family: ``W ← round(W ± Σᵢ sᵢ·Bᵢ·Aᵢ)`` in place, plain and exact (with the repair list of
``lora_kernels.exact_merge``): validation, schemas, fakes, routing, dispatch-table rows and the host-side pieces
every backend's merge launcher shares (operand packing, the repair-list protocol).

Semantics: :func:`lora_kernels.reference.merge_ref`. Launchers: ``torch/merge.py``, ``triton/merge.py``,
``cuda/merge.py`` (kernels in ``csrc/merge.cu``, glue in ``csrc/merge_torch.cpp``). Launcher signatures:

* ``merge``: ``(weight, lora_a list, lora_b list, scales list, config=None) -> None``; ``config`` replays a
  recorded launch config (``None``: the backend's deterministic choice);
* ``merge_exact``: ``(weight, lora_a, lora_b, scales, config=None, capacity=None)
  -> (repair_index, repair_bits, n_new_nonfinite, config)``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .._checks import check_float, check_scale, fail, has_internal_overlap, memory_overlaps, shape_str
from ._registry import add_rows, define, impl_all_devices, launcher, lib, mark_written

OP = "merge_"

define([
    "merge_(Tensor(a!) weight, Tensor[] lora_a, Tensor[] lora_b, float[] scales, str backend) -> ()",
    # --- CUDA extension kernels (C++ implementation only, csrc/merge_torch.cpp) ---
    # weight[N, K] <- round(weight + Σᵢ scales[i]·lora_b[:, rs[i]:rs[i+1]]·lora_a[rs[i]:rs[i+1]]) with rs = rank_starts
    # (adapters concatenated along the rank; rank_starts int32 [n+1], scales fp32 [n], both on the device)
    "cuda_merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, Tensor rank_starts, Tensor scales) -> ()",
    # cuda_merge_ + repair list of the exact unmerge (lora_kernels/exact_merge.py): counters int32 [4] =
    # (claimed, stored, overflowed tiles, new non-finite); tiles listed in tile_ids only (None: all tiles)
    "cuda_merge_exact_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, Tensor rank_starts, Tensor scales, "
    "Tensor(b!) counters, Tensor(c!) repair_index, Tensor(d!) repair_bits, Tensor(e!) overflow_tiles, "
    "Tensor? tile_ids) -> ()",
    # DoRA: weight <- round(g ⊙ (weight + scale·lora_b·lora_a)) row-wise, or with inverse=True
    # weight <- round(weight / g - scale·lora_b·lora_a); g [N] fp32 (fp64) = m / ‖W0 + s·B·A‖ of the unmerged W0
    "merge_dora_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scale, Tensor factor, bool inverse, "
    "str backend) -> ()",
])

add_rows(
    {
        ("merge", "torch"): "lora_kernels.torch.merge:merge_torch",
        ("merge_exact", "torch"): "lora_kernels.torch.merge:merge_exact_torch",
        ("merge", "triton"): "lora_kernels.triton.merge:merge_triton",
        ("merge_exact", "triton"): "lora_kernels.triton.merge:merge_exact_triton",
        ("merge", "cuda"): "lora_kernels.cuda.merge:merge_cuda",
        ("merge_exact", "cuda"): "lora_kernels.cuda.merge:merge_exact_cuda",
    },
    public={"merge": ("merge",), "merge_exact": ("merge", "merge_exact")},
)

# DoRA merge (row-scaled, one adapter): torch only, on every device (a one-off per layer, memory-bound; the fused
# merge kernels have no row scale). Launchers: ``merge_dora(weight, a, b, scale, factor, inverse)`` and
# ``merge_dora_exact(weight, a, b, scale, factor) -> (repair_index, repair_bits, n_new_nonfinite, None)``.
add_rows(
    {
        ("merge_dora", "torch"): "lora_kernels.torch.merge:merge_dora_torch",
        ("merge_dora_exact", "torch"): "lora_kernels.torch.merge:merge_dora_exact_torch",
    },
    public={"merge_dora": ("merge_dora",), "merge_dora_exact": ("merge_dora", "merge_dora_exact")},
)


def check_merge(
    weight: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> list:
    """Validate (multi-)merge inputs; returns the scales as finite floats."""
    check_float(OP, "weight", weight)
    if weight.dim() != 2:
        fail(OP, f"weight must be 2-D [N, K], got shape {shape_str(weight)}")
    for d in range(weight.dim()):
        if weight.stride(d) == 0 and weight.shape[d] > 1:
            fail(OP, f"weight has stride 0 in dim {d} (an expanded view whose elements alias); an in-place merge "
                     "needs every element stored once (call .contiguous() and merge that)")
    if has_internal_overlap(weight):
        fail(OP, f"weight (shape {shape_str(weight)}, strides {list(weight.stride())}) has elements that share memory; "
                 "an in-place merge needs every element stored once (call .contiguous() and merge that)")
    if len(lora_a) == 0 or not (len(lora_a) == len(lora_b) == len(scales)):
        fail(OP, f"need one scale per adapter and non-empty lists: got {len(lora_a)} lora_a, {len(lora_b)} lora_b, {len(scales)} scales")
    N, K = weight.shape
    out = []
    for i, (a, b, s) in enumerate(zip(lora_a, lora_b, scales)):
        check_float(OP, f"lora_a[{i}]", a)
        check_float(OP, f"lora_b[{i}]", b)
        if a.dim() != 2 or a.shape[1] != K:
            fail(OP, f"lora_a[{i}] must be [r, K={K}], got shape {shape_str(a)}")
        if b.dim() != 2 or b.shape[0] != N:
            fail(OP, f"lora_b[{i}] must be [N={N}, r], got shape {shape_str(b)}")
        if b.shape[1] != a.shape[0]:
            fail(OP, f"rank mismatch in adapter {i}: lora_a has r={a.shape[0]} rows, lora_b has {b.shape[1]} columns")
        if a.device != weight.device or b.device != weight.device:
            fail(OP, f"adapter {i} is on {a.device}/{b.device} but weight is on {weight.device}")
        for name, t in ((f"lora_a[{i}]", a), (f"lora_b[{i}]", b)):
            if memory_overlaps(weight, t):
                fail(OP, f"{name} shares memory with weight (it is read while weight is written in place); "
                         "pass a copy (.clone())")
        out.append(check_scale(OP, s))
    return out


def check_dora_merge(weight, lora_a, lora_b, magnitude, weight_norm, op: str = OP) -> None:
    """The DoRA parts of a merge's inputs (after :func:`check_merge`): one adapter, m [N] and (if given) the norm
    ‖W0 + s·B·A‖ [N], floating, finite, on weight's device; the norm also > 0 (g = m / norm must be finite)."""
    if len(lora_a) != 1:
        fail(op, f"a DoRA merge (magnitude given) takes one adapter, got {len(lora_a)} (merge them one by one)")
    N = weight.shape[0]
    for name, t in (("magnitude", magnitude), ("weight_norm", weight_norm)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            fail(op, f"{name} must be a torch.Tensor [N={N}], got {type(t).__name__}")
        check_float(op, name, t)
        if t.dim() != 1 or t.shape[0] != N:
            fail(op, f"{name} must be [N={N}] (one value per output row of weight), got shape {shape_str(t)}")
        if t.device != weight.device:
            fail(op, f"{name} is on {t.device} but weight is on {weight.device}")
        if memory_overlaps(weight, t):
            fail(op, f"{name} shares memory with weight (it is read while weight is written in place); pass a copy")
        if not bool(torch.isfinite(t).all()):
            fail(op, f"{name} must be finite")
    if weight_norm is not None and not bool((weight_norm > 0).all()):
        fail(op, "weight_norm must be > 0 in every row (g = magnitude / weight_norm)")


def _merge_dora_(weight, lora_a, lora_b, scale, factor, inverse, backend):
    launcher("merge_dora", backend)(weight, lora_a, lora_b, scale, factor, inverse)
    mark_written(weight)


impl_all_devices("merge_dora_", _merge_dora_)


@torch.library.register_fake("lora_kernels::merge_dora_", lib=lib)
def _merge_dora_fake(weight, lora_a, lora_b, scale, factor, inverse, backend):
    return None


def _merge_(weight, lora_a, lora_b, scales, backend):
    launcher("merge", backend)(weight, lora_a, lora_b, scales)
    mark_written(weight)


impl_all_devices("merge_", _merge_)


@torch.library.register_fake("lora_kernels::merge_", lib=lib)
def _merge_fake(weight, lora_a, lora_b, scales, backend):
    return None


@torch.library.register_fake("lora_kernels::cuda_merge_", lib=lib)
def _cuda_merge_fake(weight, lora_a, lora_b, rank_starts, scales):
    return None


@torch.library.register_fake("lora_kernels::cuda_merge_exact_", lib=lib)
def _cuda_merge_exact_fake(weight, lora_a, lora_b, rank_starts, scales, counters, repair_index, repair_bits,
                           overflow_tiles, tile_ids):
    return None


# ----------------------------------------------------------------------------------------------
# Host-side pieces shared by the merge launchers (no kernel code)
# ----------------------------------------------------------------------------------------------


def concat_adapters(
    weight: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
    *,
    device_tables: bool = True,
):
    """Kernel operands of a (multi-)merge: adapters stacked along the rank for a one-pass weighted merge.

    Returns (A [R, K], B [N, R], rank_starts int32 [n+1], scales fp32 [n]) with R = Σ rᵢ, adapter i owning
    ranks [rank_starts[i], rank_starts[i+1]). One common dtype (fp32 if the adapters' dtypes differ; the cast is
    exact). A single adapter is passed through without a copy (any strides). With ``device_tables=False`` and a
    single adapter, rank_starts and scales are None (the kernel takes the rank and scale as scalars).
    """
    dts = {t.dtype for t in list(lora_a) + list(lora_b)}
    common = dts.pop() if len(dts) == 1 else torch.float32
    if len(lora_a) == 1:
        a, b = lora_a[0].to(common), lora_b[0].to(common)
        if not device_tables:
            return a, b, None, None
    else:
        a = torch.cat([t.to(common) for t in lora_a], dim=0)
        b = torch.cat([t.to(common) for t in lora_b], dim=1)
    starts = [0]
    for t in lora_a:
        starts.append(starts[-1] + t.shape[0])
    rank_starts = small_tensor(starts, torch.int32, weight.device)
    scale_t = small_tensor([float(s) for s in scales], torch.float32, weight.device)
    return a, b, rank_starts, scale_t


def small_tensor(values: Sequence, dtype: torch.dtype, device, *, by_fill: Optional[bool] = None) -> torch.Tensor:
    """A few host scalars as a tensor on ``device``, safe inside CUDA-graph capture.

    Normally one host-to-device copy (``torch.tensor``). While the current stream is capturing, such a copy from
    pageable host memory is an error (or would replay from a freed host buffer), so each value is written by
    its own fill kernel instead, whose scalar the graph records. ``by_fill`` forces either path (tests).
    """
    device = torch.device(device)
    if by_fill is None:
        by_fill = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not by_fill:
        return torch.tensor(values, dtype=dtype, device=device)
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, v in enumerate(values):
        out[i].fill_(v)
    return out


# Raw-bits dtype of each weight dtype (the repair list stores W's original bits).
BITS_DTYPE = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def collect_repair_list(
    weight: torch.Tensor,
    n_tiles: int,
    run_pass: Callable,
    who: str,
    capacity: Optional[int] = None,
):
    """The exact merge's repair-list protocol, shared by its Triton and CUDA launchers.

    ``run_pass(counters, rec_idx, rec_bits, ovf_tiles, tile_ids)`` launches one exact-merge pass over every tile
    (``tile_ids`` None) or over the listed tiles only, with counters int32 [4] = (claimed, stored, overflowed
    tiles, new non-finite). Pass 1 stores up to ``capacity`` entries and lists the tiles whose entries did not fit
    (those tiles are left unwritten); after one host read of the counters, pass 2 reruns exactly those tiles into
    a list of the right size. Returns ``(index int32|int64 [n], bits int16|int32 [n], n_new_nonfinite)``.
    """
    dev = weight.device
    numel = weight.numel()
    idx_dtype = torch.int32 if numel < 2**31 else torch.int64
    bits_dtype = BITS_DTYPE[weight.dtype]
    if numel == 0:
        return torch.empty(0, dtype=idx_dtype, device=dev), torch.empty(0, dtype=bits_dtype, device=dev), 0
    capacity = capacity or max(4096, numel // 32)
    counters = torch.zeros(4, dtype=torch.int32, device=dev)
    rec_idx = torch.empty(capacity, dtype=idx_dtype, device=dev)
    rec_bits = torch.empty(capacity, dtype=bits_dtype, device=dev)
    ovf = torch.empty(n_tiles, dtype=torch.int32, device=dev)
    run_pass(counters, rec_idx, rec_bits, ovf, None)
    claimed, stored, n_ovf, n_nonfinite = (int(v) for v in counters.tolist())
    parts_idx, parts_bits = [rec_idx[:stored]], [rec_bits[:stored]]
    if n_ovf:
        need = claimed - stored
        counters2 = torch.zeros(4, dtype=torch.int32, device=dev)
        idx2 = torch.empty(max(need, 1), dtype=idx_dtype, device=dev)
        bits2 = torch.empty(max(need, 1), dtype=bits_dtype, device=dev)
        ovf2 = torch.empty(n_ovf, dtype=torch.int32, device=dev)
        run_pass(counters2, idx2, bits2, ovf2, ovf[:n_ovf].clone())
        c2 = [int(v) for v in counters2.tolist()]
        assert c2[2] == 0 and c2[1] == need, f"{who}: second pass stored {c2[1]} of {need} entries"
        n_nonfinite += c2[3]
        parts_idx.append(idx2[:need])
        parts_bits.append(bits2[:need])
    return torch.cat(parts_idx).clone(), torch.cat(parts_bits).clone(), n_nonfinite
