"""The batched multi-adapter op family (``add_lora``; Punica BGMV/SGMV, S-LoRA mixed ranks): batch metadata,
validation, schemas, fakes, routing and dispatch-table rows.

Semantics: :func:`lora_kernels.reference.add_lora_ref`. Launchers: ``torch/multi_lora.py``,
``triton/multi_lora.py``, ``cuda/multi_lora.py`` (kernels in ``csrc/multi_lora.cu``, glue in
``csrc/multi_lora_torch.cpp``).

:class:`LoRABatchMeta` lives here, beside the op that consumes it: built once per batch from ``adapter_ids`` on
the device (no host sync), reused by every layer's ``add_lora(..., meta=meta)``, and updatable in place
(``meta.update_(ids)``) between CUDA-graph replays because every buffer has a fixed capacity. The op receives
only the two buffers its kernels read (``sorted_token_ids``, ``tiles``) and ``block_m``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._checks import (
    INDEX_DTYPES,
    LoRAInputError,
    check_float,
    check_same_device,
    data_checks_enabled,
    fail,
    has_internal_overlap,
    memory_overlaps,
    shape_str,
)
from ._registry import add_rows, define, impl_all_devices, launcher, lib, mark_written

OP = "add_lora"

__all__ = ["LoRABatchMeta", "DEFAULT_BLOCK_M", "check_add_lora"]

# Tokens per SGMV tile (the M tile of the grouped GEMMs); fixed at build time because the tile table depends on it.
DEFAULT_BLOCK_M = 64


def _tile_capacity(capacity: int, num_adapters: int, block_m: int) -> int:
    """Upper bound on Σ_i ceil(count_i / block_m) over adapters with count_i > 0 and Σ count_i <= capacity."""
    active = min(num_adapters, capacity)
    return min(capacity, (capacity + active * (block_m - 1)) // block_m)


def _check_int(who: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise LoRAInputError(f"{who}: {name} must be an int, got {v!r}")
    return v


def _check_ids(who: str, ids) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in INDEX_DTYPES or ids.dim() != 1:
        got = f"{ids.dtype} tensor of shape {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise LoRAInputError(f"{who}: adapter_ids must be a 1-D int32 or int64 tensor [M], got {got}")


class LoRABatchMeta:
    """Token → adapter grouping of one batch, shared by every LoRA layer of a forward pass.

    Built on ``adapter_ids``' device with no host synchronisation and no data-dependent shape, so it can be
    built or updated inside a captured CUDA graph or between replays. Buffers (capacity C = ``max_tokens``)::

        adapter_ids      [C]      int32  the ids, padded with -1 past the current batch
        counts           [L + 1]  int32  tokens per adapter; counts[L] = tokens without an adapter (id -1 or
                                         out of range) and padding
        seg_offsets      [L + 2]  int32  exclusive prefix sum of counts: adapter i's tokens are at sorted
                                         positions [seg_offsets[i], seg_offsets[i + 1])
        sorted_token_ids [C]      int32  token indices stably sorted by adapter (tokens without one last)
        token_pos        [C]      int32  inverse permutation: sorted position of each token
        tiles            [3, T]   int32  SGMV tile table: (adapter or -1 for an unused tile, start, end) in sorted
                                         positions, at most ``block_m`` tokens each, T = ``num_tiles`` (a bound)

    ``counts`` is a scatter-add rather than ``torch.bincount(minlength=L+1)``: on CUDA bincount reads the max id
    back to the host. Metadata only accelerates: results never depend on whether it is given.
    """

    def __init__(
        self,
        adapter_ids: torch.Tensor,
        num_adapters: int,
        *,
        max_tokens: Optional[int] = None,
        block_m: int = DEFAULT_BLOCK_M,
    ):
        _check_ids("LoRABatchMeta", adapter_ids)
        M = adapter_ids.shape[0]
        capacity = M if max_tokens is None else _check_int("LoRABatchMeta", "max_tokens", max_tokens)
        if capacity < M:
            raise LoRAInputError(f"LoRABatchMeta: max_tokens={capacity} is smaller than the batch ({M} tokens)")
        num_adapters = _check_int("LoRABatchMeta", "num_adapters", num_adapters)
        if num_adapters < 0:
            raise LoRAInputError(f"LoRABatchMeta: num_adapters must be >= 0, got {num_adapters}")
        block_m = _check_int("LoRABatchMeta", "block_m", block_m)
        if block_m < 16 or block_m & (block_m - 1):
            raise LoRAInputError(f"LoRABatchMeta: block_m must be a power of two >= 16, got {block_m}")
        dev = adapter_ids.device
        self.num_adapters = int(num_adapters)
        self.capacity = capacity
        self.block_m = int(block_m)
        self.num_tokens = M
        L = self.num_adapters
        i32 = dict(dtype=torch.int32, device=dev)
        self.adapter_ids = torch.full((capacity,), -1, **i32)
        self.counts = torch.zeros((L + 1,), **i32)
        self.seg_offsets = torch.zeros((L + 2,), **i32)
        self.sorted_token_ids = torch.zeros((capacity,), **i32)
        self.token_pos = torch.zeros((capacity,), **i32)
        self.tiles = torch.full((3, _tile_capacity(capacity, L, self.block_m)), -1, **i32)
        self.update_(adapter_ids)

    @property
    def device(self) -> torch.device:
        return self.sorted_token_ids.device

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[1]

    @property
    def groups(self):
        """``(sorted_token_ids, tiles, block_m)``: what the kernels read (the ``groups`` argument of launchers)."""
        return self.sorted_token_ids, self.tiles, self.block_m

    def update_(self, adapter_ids: torch.Tensor) -> "LoRABatchMeta":
        """Recompute every buffer in place for new ``adapter_ids`` ([M'] with M' <= capacity; the rest is padding
        with id -1). Device ops only: safe to run between CUDA-graph replays or inside a capture."""
        _check_ids("LoRABatchMeta.update_", adapter_ids)
        if adapter_ids.shape[0] > self.capacity:
            raise LoRAInputError(
                f"LoRABatchMeta.update_: adapter_ids must be 1-D with at most {self.capacity} tokens, "
                f"got shape {list(adapter_ids.shape)}"
            )
        if adapter_ids.device != self.device:
            raise LoRAInputError(f"LoRABatchMeta.update_: adapter_ids is on {adapter_ids.device}, meta on {self.device}")
        M = adapter_ids.shape[0]
        L, C, BM = self.num_adapters, self.capacity, self.block_m
        self.num_tokens = M
        ids = self.adapter_ids
        ids[:M].copy_(adapter_ids)
        if M < C:
            ids[M:].fill_(-1)
        valid = (ids >= 0) & (ids < L)
        key = torch.where(valid, ids, torch.full_like(ids, L)).to(torch.int64)  # no adapter -> group L (last)
        counts = torch.zeros((L + 1,), dtype=torch.int64, device=ids.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        self.counts.copy_(counts)
        ends = torch.cumsum(counts, 0)
        self.seg_offsets[0].zero_()
        self.seg_offsets[1:].copy_(ends)
        _, order = torch.sort(key, stable=True)
        self.sorted_token_ids.copy_(order)
        self.token_pos.scatter_(0, order, torch.arange(C, dtype=torch.int32, device=ids.device))
        T = self.tiles.shape[1]
        if T > 0 and L > 0:
            c = counts[:L]
            starts = ends[:L] - c
            tiles_per = (c + (BM - 1)) // BM
            tile_cum = torch.cumsum(tiles_per, 0)
            j = torch.arange(T, dtype=torch.int64, device=ids.device)
            owner = torch.searchsorted(tile_cum, j, right=True)  # first adapter whose cumulative tiles exceed j
            used = owner < L
            a = owner.clamp(max=L - 1)
            within = j - (tile_cum[a] - tiles_per[a])
            t_start = starts[a] + within * BM
            t_end = torch.minimum(t_start + BM, ends[a])
            self.tiles[0].copy_(torch.where(used, a, torch.full_like(a, -1)))
            self.tiles[1].copy_(torch.where(used, t_start, torch.zeros_like(a)))
            self.tiles[2].copy_(torch.where(used, t_end, torch.zeros_like(a)))
        return self

    def check(self, adapter_ids: torch.Tensor, num_adapters: int, op: str = "add_lora") -> None:
        """Raise if this meta cannot describe ``adapter_ids`` for ``num_adapters`` adapters (shape checks always;
        with ``data=True``-style checks left to the caller, see ``_checks.data_checks_enabled``)."""
        if not isinstance(self, LoRABatchMeta):  # pragma: no cover - defensive
            raise LoRAInputError(f"lora_kernels.{op}: meta must be a LoRABatchMeta")
        if self.num_adapters != num_adapters:
            raise LoRAInputError(
                f"lora_kernels.{op}: meta was built for L={self.num_adapters} adapters but the weights have L={num_adapters}"
            )
        if adapter_ids.shape[0] > self.capacity or adapter_ids.shape[0] != self.num_tokens:
            raise LoRAInputError(
                f"lora_kernels.{op}: meta describes {self.num_tokens} tokens (capacity {self.capacity}) "
                f"but adapter_ids has {adapter_ids.shape[0]}"
            )
        if adapter_ids.device != self.device:
            raise LoRAInputError(f"lora_kernels.{op}: meta is on {self.device} but adapter_ids is on {adapter_ids.device}")

    def __repr__(self) -> str:
        return (
            f"LoRABatchMeta(num_tokens={self.num_tokens}, capacity={self.capacity}, num_adapters={self.num_adapters}, "
            f"block_m={self.block_m}, num_tiles={self.num_tiles}, device={self.device})"
        )


def check_add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    adapter_ids: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor],
    slices: Optional[Sequence[int]] = None,
    meta=None,
    magnitudes: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> None:
    """Validate add_lora inputs (see reference.add_lora_ref for the semantics); with ``meta`` (a
    :class:`LoRABatchMeta`), also that it describes these adapter_ids (in the same single host read). DoRA:
    ``magnitudes`` [L, N_total] fp32 (fp64 on the torch backend) and finite; ``bias`` [N_total] (only with
    magnitudes).

    add_lora is an inference op on every backend: with grad mode on, an input that requires grad is an error
    (it would be differentiable on one backend and silently not on another)."""
    check_float(OP, "y", y)
    check_float(OP, "x", x)
    for name, t in (("adapter_ids", adapter_ids), ("scales", scales), ("ranks", ranks), ("magnitudes", magnitudes),
                    ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            fail(OP, f"{name} must be a torch.Tensor, got {type(t).__name__} (e.g. torch.tensor({name}, device=x.device))")
    if torch.is_grad_enabled():
        for name, t in (("y", y), ("x", x), ("scales", scales), ("magnitudes", magnitudes), ("bias", bias),
                        *((f"lora_a[{s}]", a) for s, a in enumerate(lora_a)),
                        *((f"lora_b[{s}]", b) for s, b in enumerate(lora_b))):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                fail(OP, f"{name} requires grad, but add_lora is an inference op (not differentiable on any backend); "
                         "call it under torch.no_grad() or torch.inference_mode(), or use lora_linear to train")
    if len(lora_a) == 0 or len(lora_a) != len(lora_b):
        fail(OP, f"lora_a and lora_b must be non-empty lists of equal length (one per slice), got {len(lora_a)} and {len(lora_b)}")
    if x.dim() != 2:
        fail(OP, f"x must be 2-D [M, K], got shape {shape_str(x)}")
    if y.dim() != 2 or y.shape[0] != x.shape[0]:
        fail(OP, f"y must be 2-D [M={x.shape[0]}, N], got shape {shape_str(y)}")
    M, K = x.shape
    a0 = lora_a[0]
    if not isinstance(a0, torch.Tensor) or a0.dim() != 3:
        fail(OP, f"lora_a must be [L, r_max, K], got {shape_str(a0) if isinstance(a0, torch.Tensor) else type(a0).__name__}")
    L, r_max = a0.shape[0], a0.shape[1]
    widths = []
    for s, (a, b) in enumerate(zip(lora_a, lora_b)):
        check_float(OP, f"lora_a[{s}]", a)
        check_float(OP, f"lora_b[{s}]", b)
        if a.dim() != 3 or a.shape != (L, r_max, K):
            fail(OP, f"lora_a[{s}] must be [L={L}, r_max={r_max}, K={K}], got shape {shape_str(a)}")
        if b.dim() != 3 or b.shape[0] != L or b.shape[2] != r_max:
            fail(OP, f"lora_b[{s}] must be [L={L}, N_s, r_max={r_max}], got shape {shape_str(b)} (rank mismatch with lora_a?)")
        if a.dtype != a0.dtype or b.dtype != a0.dtype:
            fail(OP, f"all lora_a/lora_b must share one dtype: lora_a[0] is {a0.dtype}, slice {s} has {a.dtype}/{b.dtype}")
        widths.append(b.shape[1])
    if slices is not None:
        if [int(w) for w in slices] != widths:
            fail(OP, f"slices {list(slices)} do not match the widths of lora_b {widths}")
    if sum(widths) != y.shape[1]:
        fail(OP, f"slice widths {widths} sum to {sum(widths)} but y has {y.shape[1]} columns")
    if x.dtype != y.dtype:
        fail(OP, f"x dtype {x.dtype} must equal y dtype {y.dtype}")
    if adapter_ids.dtype not in INDEX_DTYPES:
        fail(OP, f"adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
    if adapter_ids.dim() != 1 or adapter_ids.shape[0] != M:
        fail(OP, f"adapter_ids must be [M={M}], got shape {shape_str(adapter_ids)}")
    if not isinstance(scales, torch.Tensor) or scales.dim() != 1 or scales.shape[0] != L:
        fail(OP, f"scales must be a 1-D tensor [L={L}], got {shape_str(scales) if isinstance(scales, torch.Tensor) else type(scales).__name__}")
    check_float(OP, "scales", scales)
    if ranks is not None:
        if ranks.dtype not in INDEX_DTYPES:
            fail(OP, f"ranks must be int32 or int64, got {ranks.dtype}")
        if ranks.dim() != 1 or ranks.shape[0] != L:
            fail(OP, f"ranks must be [L={L}], got shape {shape_str(ranks)}")
    if magnitudes is not None:
        N = y.shape[1]
        if magnitudes.dtype not in (torch.float32, torch.float64):
            fail(OP, f"magnitudes must be float32 [L={L}, N={N}] (the DoRA factors m / ‖W0 + s·B·A‖), got {magnitudes.dtype}")
        if magnitudes.dim() != 2 or tuple(magnitudes.shape) != (L, N):
            fail(OP, f"magnitudes must be [L={L}, N={N}] (one DoRA factor per adapter and output column, all packed "
                     f"slices), got shape {shape_str(magnitudes)}")
    if bias is not None:
        if magnitudes is None:
            fail(OP, "bias is only read with magnitudes (DoRA rescales y - bias); a plain add_lora leaves the bias in y")
        check_float(OP, "bias", bias)
        if bias.dim() != 1 or bias.shape[0] != y.shape[1]:
            fail(OP, f"bias must be [N={y.shape[1]}] (the base layer's bias, all packed slices), got shape {shape_str(bias)}")
    tensors = dict(y=y, x=x, adapter_ids=adapter_ids, scales=scales, ranks=ranks, magnitudes=magnitudes, bias=bias)
    tensors.update({f"lora_a[{s}]": a for s, a in enumerate(lora_a)})
    tensors.update({f"lora_b[{s}]": b for s, b in enumerate(lora_b)})
    check_same_device(OP, **tensors)
    if has_internal_overlap(y):
        fail(OP, f"y (shape {shape_str(y)}, strides {list(y.stride())}) has elements that share memory; it is updated "
                 "in place, so every element must be stored once (pass a contiguous y)")
    # y is written slice by slice while x and the weights are still being read: no shared memory.
    for name, t in tensors.items():
        if name != "y" and t is not None and memory_overlaps(y, t):
            fail(OP, f"y overlaps {name} in memory (y is updated in place while {name} is read); pass separate tensors")
    if meta is not None:
        meta.check(adapter_ids, L, OP)
    if data_checks_enabled(x):
        # One device->host read for all value checks:
        # [all scales finite, meta ids equal, ids min, ids max, ranks min, ranks max].
        stats = [torch.isfinite(scales).all().to(torch.int64)]
        if magnitudes is not None:
            stats[0] = stats[0] * 2 + torch.isfinite(magnitudes).all().to(torch.int64)  # 3 = both finite
        stats.append((meta.adapter_ids[:M] == adapter_ids.to(torch.int32)).all().to(torch.int64) if meta is not None
                     else torch.ones((), dtype=torch.int64, device=scales.device))
        if M > 0:
            stats += [adapter_ids.min().to(torch.int64), adapter_ids.max().to(torch.int64)]
        if ranks is not None and L > 0:
            stats += [ranks.min().to(torch.int64), ranks.max().to(torch.int64)]
        vals = torch.stack(stats).tolist()
        finite, meta_same, rest = vals[0], vals[1], vals[2:]
        if magnitudes is not None:
            if finite % 2 == 0:
                fail(OP, "magnitudes must be finite (DoRA factors m / ‖W0 + s·B·A‖; a zero row norm gives inf)")
            finite //= 2
        if M > 0:
            lo, hi, rest = rest[0], rest[1], rest[2:]
            if lo < -1 or hi >= L:
                fail(OP, f"adapter id out of range: ids must be in [-1, L={L}), got min {lo}, max {hi}")
        if not finite:
            fail(OP, f"scales must be finite, got {scales.tolist() if L <= 16 else 'non-finite values'}")
        if rest:
            rlo, rhi = rest
            if rlo < 0 or rhi > r_max:
                fail(OP, f"ranks must be in [0, r_max={r_max}], got min {rlo}, max {rhi}")
        if not meta_same:
            fail(OP, "meta was built from different adapter_ids (call meta.update_(adapter_ids))")


define([
    # y[t, slice s] += scales[i]·(x[t]·A_s[i, :rank_i]ᵀ)·B_s[i, :, :rank_i]ᵀ for i = adapter_ids[t] >= 0, in place.
    # sorted_token_ids [C] int32 / tiles [3, T] int32 / block_m: an optional LoRABatchMeta of these adapter_ids;
    # an acceleration structure only (the result does not depend on whether it is given).
    # DoRA (magnitudes [L, N] fp32 given): y[t] = g[i]·(y[t] - bias + lora[t]) + bias instead, g = magnitudes[i],
    # bias [N] or None (zeros).
    "add_lora_(Tensor(a!) y, Tensor x, Tensor[] lora_a, Tensor[] lora_b, Tensor adapter_ids, Tensor scales, "
    "Tensor? ranks, str backend, Tensor? sorted_token_ids=None, Tensor? tiles=None, int block_m=0, "
    "Tensor? magnitudes=None, Tensor? bias=None) -> ()",
    # --- CUDA extension kernels (C++ implementation only, csrc/multi_lora_torch.cpp) ---
    # xa[m, :ranks[i]] = x[m] · lora_a[i, :ranks[i]]ᵀ for i = adapter_ids[m] >= 0; other entries 0. fp32 [M, r_max]
    # (with sorted_token_ids + tiles of a LoRABatchMeta: the grouped launch, adapters taken from the tiles)
    "cuda_multi_lora_shrink(Tensor x, Tensor lora_a, Tensor adapter_ids, Tensor? ranks, "
    "Tensor? sorted_token_ids=None, Tensor? tiles=None, int block_m=0) -> Tensor",
    # y[m, col_offset + n] += scales[i] · Σ_j<ranks[i] xa[m, j] · lora_b[i, n, j]   for i = adapter_ids[m] >= 0
    # DoRA (magnitudes [L, N_total] given): y[m, c] = g[i, c]·(y[m, c] + update) + (1 - g[i, c])·bias[c], c = col_offset + n
    "cuda_multi_lora_expand_(Tensor(a!) y, Tensor xa, Tensor lora_b, Tensor adapter_ids, Tensor scales, Tensor? ranks, "
    "int col_offset, Tensor? sorted_token_ids=None, Tensor? tiles=None, int block_m=0, Tensor? magnitudes=None, "
    "Tensor? bias=None) -> ()",
])

# Launcher signature: (y, x, lora_a list, lora_b list, adapter_ids, scales, ranks, groups) with groups None or
# (sorted_token_ids, tiles, block_m); the DoRA launcher ("add_lora_dora", public op of the same name: what
# resolve_backend is asked when magnitudes are given) takes keyword arguments magnitudes= and bias= on top.
add_rows({
    ("add_lora", "torch"): "lora_kernels.torch.multi_lora:add_lora_torch",
    ("add_lora", "triton"): "lora_kernels.triton.multi_lora:add_lora_triton",
    ("add_lora", "cuda"): "lora_kernels.cuda.multi_lora:add_lora_cuda",
    ("add_lora_dora", "torch"): "lora_kernels.torch.multi_lora:add_lora_torch",
    ("add_lora_dora", "triton"): "lora_kernels.triton.multi_lora:add_lora_triton",
    ("add_lora_dora", "cuda"): "lora_kernels.cuda.multi_lora:add_lora_cuda",
}, public={OP: ("add_lora",), "add_lora_dora": ("add_lora_dora",)})


def _add_lora_(y, x, lora_a, lora_b, adapter_ids, scales, ranks, backend, sorted_token_ids=None, tiles=None, block_m=0,
               magnitudes=None, bias=None):
    if x.shape[0] == 0:
        return
    groups = None if sorted_token_ids is None else (sorted_token_ids, tiles, block_m)
    if magnitudes is None:
        launcher("add_lora", backend)(y, x, lora_a, lora_b, adapter_ids, scales, ranks, groups)
    else:
        launcher("add_lora_dora", backend)(y, x, lora_a, lora_b, adapter_ids, scales, ranks, groups,
                                           magnitudes=magnitudes, bias=bias)
    mark_written(y)


impl_all_devices("add_lora_", _add_lora_)


@torch.library.register_fake("lora_kernels::add_lora_", lib=lib)
def _add_lora_fake(y, x, lora_a, lora_b, adapter_ids, scales, ranks, backend, sorted_token_ids=None, tiles=None, block_m=0,
                   magnitudes=None, bias=None):
    return None


@torch.library.register_fake("lora_kernels::cuda_multi_lora_shrink", lib=lib)
def _cuda_multi_lora_shrink_fake(x, lora_a, adapter_ids, ranks, sorted_token_ids=None, tiles=None, block_m=0):
    return x.new_empty((x.shape[0], lora_a.shape[1]), dtype=torch.float32)


@torch.library.register_fake("lora_kernels::cuda_multi_lora_expand_", lib=lib)
def _cuda_multi_lora_expand_fake(y, xa, lora_b, adapter_ids, scales, ranks, col_offset, sorted_token_ids=None, tiles=None,
                                 block_m=0, magnitudes=None, bias=None):
    return None
