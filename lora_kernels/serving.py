"""Serving helpers for batched multi-adapter LoRA: per-batch metadata and per-layer adapter slots.

* :class:`LoRABatchMeta` — built once per batch from ``adapter_ids`` on the device (no host sync), reused by
  every layer's ``add_lora(..., meta=meta)``, and updatable in place (``meta.update_(ids)``) between CUDA-graph
  replays because every buffer has a fixed capacity.
* :class:`AdapterSlots` — owns one layer's stacked adapter tensors (A, B per packed slice, scales, ranks), loads
  PEFT-layout weights into a slot, evicts, keeps name → slot bookkeeping and applies ``add_lora``.

Nothing here knows about a particular serving engine.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

from ._checks import LoRAInputError

__all__ = ["LoRABatchMeta", "AdapterSlots", "DEFAULT_BLOCK_M"]

# Tokens per SGMV tile (the M tile of the grouped GEMMs); fixed at build time because the tile table depends on it.
DEFAULT_BLOCK_M = 64


def _tile_capacity(capacity: int, num_adapters: int, block_m: int) -> int:
    """Upper bound on Σ_i ceil(count_i / block_m) over adapters with count_i > 0 and Σ count_i <= capacity."""
    active = min(num_adapters, capacity)
    return min(capacity, (capacity + active * (block_m - 1)) // block_m)


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
        if adapter_ids.dim() != 1:
            raise LoRAInputError(f"LoRABatchMeta: adapter_ids must be 1-D [M], got shape {list(adapter_ids.shape)}")
        M = adapter_ids.shape[0]
        capacity = M if max_tokens is None else int(max_tokens)
        if capacity < M:
            raise LoRAInputError(f"LoRABatchMeta: max_tokens={capacity} is smaller than the batch ({M} tokens)")
        if num_adapters < 0:
            raise LoRAInputError(f"LoRABatchMeta: num_adapters must be >= 0, got {num_adapters}")
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

    @classmethod
    def from_buffers(cls, sorted_token_ids: torch.Tensor, tiles: torch.Tensor, block_m: int) -> "LoRABatchMeta":
        """A read-only view over the two buffers the kernels read (used inside the registered op, which receives
        tensors rather than this object). It cannot be updated or checked."""
        self = cls.__new__(cls)
        self.sorted_token_ids, self.tiles, self.block_m = sorted_token_ids, tiles, int(block_m)
        self.capacity = sorted_token_ids.shape[0]
        self.num_adapters = self.num_tokens = None
        self.adapter_ids = self.counts = self.seg_offsets = self.token_pos = None
        return self

    @property
    def device(self) -> torch.device:
        return self.sorted_token_ids.device

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[1]

    def update_(self, adapter_ids: torch.Tensor) -> "LoRABatchMeta":
        """Recompute every buffer in place for new ``adapter_ids`` ([M'] with M' <= capacity; the rest is padding
        with id -1). Device ops only: safe to run between CUDA-graph replays or inside a capture."""
        if adapter_ids.dim() != 1 or adapter_ids.shape[0] > self.capacity:
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

    def matches(self, adapter_ids: torch.Tensor) -> bool:
        """Whether the meta's ids equal ``adapter_ids`` (reads device data: a host sync; for validation only)."""
        M = adapter_ids.shape[0]
        return M == self.num_tokens and bool(torch.equal(self.adapter_ids[:M], adapter_ids.to(torch.int32)))

    def __repr__(self) -> str:
        return (
            f"LoRABatchMeta(num_tokens={self.num_tokens}, capacity={self.capacity}, num_adapters={self.num_adapters}, "
            f"block_m={self.block_m}, num_tiles={self.num_tiles}, device={self.device})"
        )


class AdapterSlots:
    """Stacked adapter weights of one LoRA layer (optionally q/k/v-packed), with slot bookkeeping.

    ``lora_a[s]`` is [L, r_max, K] and ``lora_b[s]`` is [L, N_s, r_max] for each output slice s (widths
    ``out_features``); ``scales`` [L] (fp32) and ``ranks`` [L] (int32). Empty slots have rank 0 and zero weights.

    Example::

        slots = AdapterSlots(num_slots=8, r_max=64, in_features=4096, out_features=[4096, 1024, 1024],
                             dtype=torch.bfloat16, device="cuda")
        slots.load(0, [A_q, A_k, A_v], [B_q, B_k, B_v], scale=2.0, name="tenant-a")   # PEFT layout
        slots.apply(qkv_out, x, adapter_ids, meta=meta)
    """

    def __init__(
        self,
        num_slots: int,
        r_max: int,
        in_features: int,
        out_features: Union[int, Sequence[int]],
        *,
        dtype: torch.dtype = torch.float16,
        device: Union[str, torch.device, None] = None,
    ):
        if num_slots < 1 or r_max < 1 or in_features < 1:
            raise LoRAInputError(
                f"AdapterSlots: num_slots, r_max and in_features must be >= 1, got {num_slots}, {r_max}, {in_features}"
            )
        widths = [int(out_features)] if isinstance(out_features, int) else [int(w) for w in out_features]
        if not widths or any(w < 1 for w in widths):
            raise LoRAInputError(f"AdapterSlots: out_features must be positive widths, got {out_features}")
        self.num_slots, self.r_max, self.in_features, self.out_features = num_slots, r_max, in_features, widths
        self.lora_a = [torch.zeros((num_slots, r_max, in_features), dtype=dtype, device=device) for _ in widths]
        self.lora_b = [torch.zeros((num_slots, n, r_max), dtype=dtype, device=device) for n in widths]
        self.scales = torch.zeros((num_slots,), dtype=torch.float32, device=device)
        self.ranks = torch.zeros((num_slots,), dtype=torch.int32, device=device)
        self._names: Dict[str, int] = {}

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def names(self) -> Dict[str, int]:
        """name → slot of the loaded adapters (a copy)."""
        return dict(self._names)

    def slot_of(self, name: str) -> int:
        if name not in self._names:
            raise KeyError(f"AdapterSlots: no adapter named {name!r} is loaded (loaded: {sorted(self._names)})")
        return self._names[name]

    def free_slot(self) -> Optional[int]:
        """Lowest slot with no named adapter, or None when all are taken."""
        used = set(self._names.values())
        return next((s for s in range(self.num_slots) if s not in used), None)

    def _check_slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not (0 <= slot < self.num_slots):
            raise LoRAInputError(f"AdapterSlots: slot must be an int in [0, {self.num_slots}), got {slot!r}")
        return slot

    def ids_for(self, names: Sequence[Optional[str]], device=None) -> torch.Tensor:
        """adapter_ids tensor (int32) for per-token adapter names; None → -1 (no adapter)."""
        ids = [-1 if n is None else self.slot_of(n) for n in names]
        return torch.tensor(ids, dtype=torch.int32, device=device if device is not None else self.scales.device)

    # -- load / evict ------------------------------------------------------------------------
    def load(
        self,
        slot: int,
        lora_A: Union[torch.Tensor, Sequence[torch.Tensor]],
        lora_B: Union[torch.Tensor, Sequence[torch.Tensor]],
        scale: float,
        *,
        name: Optional[str] = None,
    ) -> int:
        """Copy an adapter into ``slot``: lora_A [r, K] (PEFT ``lora_A.weight``) and lora_B [N_s, r]
        (``lora_B.weight``), one pair per slice (a single tensor when there is one slice). Ranks r <= r_max are
        zero-padded and ``ranks[slot] = r``. All inputs are validated before anything is written. Returns slot."""
        slot = self._check_slot(slot)
        As = [lora_A] if isinstance(lora_A, torch.Tensor) else list(lora_A)
        Bs = [lora_B] if isinstance(lora_B, torch.Tensor) else list(lora_B)
        S = len(self.out_features)
        if len(As) != S or len(Bs) != S:
            raise LoRAInputError(f"AdapterSlots.load: expected {S} lora_A and {S} lora_B (one per slice), got {len(As)} and {len(Bs)}")
        r = None
        for s, (a, b) in enumerate(zip(As, Bs)):
            if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.shape[1] != self.in_features:
                raise LoRAInputError(
                    f"AdapterSlots.load: lora_A[{s}] must be [r, K={self.in_features}], got "
                    f"{list(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}"
                )
            if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[0] != self.out_features[s]:
                raise LoRAInputError(
                    f"AdapterSlots.load: lora_B[{s}] must be [N={self.out_features[s]}, r], got "
                    f"{list(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}"
                )
            if b.shape[1] != a.shape[0]:
                raise LoRAInputError(f"AdapterSlots.load: slice {s}: lora_A has r={a.shape[0]} rows but lora_B has {b.shape[1]} columns")
            if r is not None and a.shape[0] != r:
                raise LoRAInputError(f"AdapterSlots.load: all slices must share one rank, got {r} and {a.shape[0]}")
            r = a.shape[0]
            if not (a.is_floating_point() and b.is_floating_point()):
                raise LoRAInputError(f"AdapterSlots.load: slice {s}: lora_A/lora_B must be floating point")
        if r > self.r_max:
            raise LoRAInputError(f"AdapterSlots.load: rank {r} exceeds r_max={self.r_max}")
        scale_t = torch.as_tensor(scale, dtype=torch.float64)
        if scale_t.numel() != 1 or not bool(torch.isfinite(scale_t)):
            raise LoRAInputError(f"AdapterSlots.load: scale must be one finite number, got {scale!r}")
        if name is not None and name in self._names and self._names[name] != slot:
            raise LoRAInputError(f"AdapterSlots.load: adapter {name!r} is already loaded in slot {self._names[name]}")
        with torch.no_grad():
            for s, (a, b) in enumerate(zip(As, Bs)):
                self.lora_a[s][slot].zero_()
                self.lora_b[s][slot].zero_()
                self.lora_a[s][slot, :r].copy_(a.detach())
                self.lora_b[s][slot, :, :r].copy_(b.detach())
            self.scales[slot] = float(scale_t)
            self.ranks[slot] = r
        for n, sl in list(self._names.items()):
            if sl == slot:
                del self._names[n]
        if name is not None:
            self._names[name] = slot
        return slot

    def evict(self, slot_or_name: Union[int, str]) -> int:
        """Zero a slot's weights and scale and set its rank to 0; forgets its name. Returns the slot."""
        slot = self.slot_of(slot_or_name) if isinstance(slot_or_name, str) else self._check_slot(slot_or_name)
        with torch.no_grad():
            for a, b in zip(self.lora_a, self.lora_b):
                a[slot].zero_()
                b[slot].zero_()
            self.scales[slot] = 0.0
            self.ranks[slot] = 0
        for n, sl in list(self._names.items()):
            if sl == slot:
                del self._names[n]
        return slot

    # -- compute -----------------------------------------------------------------------------
    def make_meta(self, adapter_ids: torch.Tensor, **kw) -> LoRABatchMeta:
        return LoRABatchMeta(adapter_ids, self.num_slots, **kw)

    def apply(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        adapter_ids: torch.Tensor,
        meta: Optional[LoRABatchMeta] = None,
        *,
        backend: Optional[str] = None,
    ) -> torch.Tensor:
        """``lora_kernels.add_lora`` with this layer's stacked weights: y [M, ΣN_s] += per-token LoRA (in place)."""
        from .functional import add_lora

        return add_lora(
            y, x, self.lora_a, self.lora_b, adapter_ids, self.scales, self.ranks, meta=meta, backend=backend
        )
