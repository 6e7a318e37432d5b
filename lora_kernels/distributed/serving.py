"""Tensor-parallel serving: the stacked adapters of one layer sharded over a TP group, like the layer itself.

:class:`ShardedAdapterSlots` is :class:`lora_kernels.serving.AdapterSlots` for a column- or row-parallel layer. Each
rank keeps only its shard of every adapter and works on the local shard of the layer's activations; the engine keeps
its own collectives for the base layer. With ``fully_sharded=True`` (vLLM's ``fully_sharded_loras``, after S-LoRA):

* colwise (q/k/v, gate/up): A is split by rank (r_max/p rows per rank) and B by output rows. ``apply(y_local, x)``
  shrinks x with the local rank block (:func:`lora_kernels.lora_shrink`), all-gathers the [M, Σ r_max] shrink
  outputs of every slice in **one** collective, and expands into the rank's own output columns
  (:func:`lora_kernels.lora_expand_`).
* rowwise (o, down): A is split by input features, B by output rows. ``apply(y_partial, x_local)`` shrinks the local
  input columns (a partial [M, r_max]), all-reduces it in **one** collective and adds each rank's slice of the LoRA
  output into its partial sum — the engine's all-reduce of ``y_partial`` then carries both.

With ``fully_sharded=False`` no collective is added at all: colwise keeps A whole (each rank shrinks redundantly),
rowwise keeps B whole (each rank expands its partial shrink over every output; the sum is linear), and ``apply`` is a
single :func:`lora_kernels.add_lora` on the local shard. The trade is memory (a whole A or B per rank) and the
redundant r-wide GEMM against one [M, r] collective per layer.

Adapters are loaded in PEFT layout and full size on every rank (each rank slices out its shard), so a checkpoint
needs no resharding.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .._checks import LoRAInputError
from ..functional import add_lora, lora_expand_, lora_shrink
from ..serving import fill_slices
from ._comm import all_gather_cols, all_reduce

__all__ = ["ShardedAdapterSlots"]


def _group_of(group):
    """A ProcessGroup from a ProcessGroup, a 1-D DeviceMesh, or None (the default group)."""
    if group is None:
        return dist.group.WORLD
    if hasattr(group, "get_group") and hasattr(group, "ndim"):
        if group.ndim != 1:
            raise LoRAInputError(f"ShardedAdapterSlots: needs a 1-D tensor-parallel mesh, got a {group.ndim}-D mesh "
                                 f"{tuple(group.shape)}; pass mesh['tp']")
        return group.get_group(0)
    return group


class ShardedAdapterSlots:
    """Stacked adapters of one tensor-parallel LoRA layer (optionally q/k/v-packed), sharded over ``group``.

    Args:
        num_slots, r_max: as :class:`lora_kernels.serving.AdapterSlots`.
        in_features, out_features: the layer's **global** sizes (out_features: one width per packed slice).
        style: "colwise" (column-parallel layer: y_local holds this rank's N_s/p columns of every slice, in slice
            order) or "rowwise" (row-parallel layer: x_local holds this rank's K/p input columns, y is the full-width
            partial sum before the engine's all-reduce).
        group: the tensor-parallel ProcessGroup or a 1-D DeviceMesh (default: the world).
        fully_sharded: one r-wide collective per layer and 1/p of every adapter per rank (default), or no collective
            and a whole A (colwise) / B (rowwise) per rank.
        dtype, device: of the adapter storage.

    Local storage: ``lora_a[s]`` [L, r_a, K_a] and ``lora_b[s]`` [L, N_b, r_max] with (r_a, K_a, N_b) = (r_max/p, K,
    N_s/p) colwise fully sharded, (r_max, K, N_s/p) colwise, (r_max, K/p, N_s/p) rowwise fully sharded,
    (r_max, K/p, N_s) rowwise; ``scales`` [L] fp32, ``ranks`` [L] int32 (the adapters' full ranks).
    """

    def __init__(
        self,
        num_slots: int,
        r_max: int,
        in_features: int,
        out_features: Union[int, Sequence[int]],
        *,
        style: str,
        group=None,
        fully_sharded: bool = True,
        dtype: torch.dtype = torch.float16,
        device: Union[str, torch.device, None] = None,
    ):
        if style not in ("colwise", "rowwise"):
            raise LoRAInputError(f"ShardedAdapterSlots: style must be 'colwise' or 'rowwise', got {style!r}")
        if num_slots < 1 or r_max < 1 or in_features < 1:
            raise LoRAInputError(f"ShardedAdapterSlots: num_slots, r_max and in_features must be >= 1, got {num_slots}, "
                                 f"{r_max}, {in_features}")
        widths = [int(out_features)] if isinstance(out_features, int) else [int(w) for w in out_features]
        if not widths or any(w < 1 for w in widths):
            raise LoRAInputError(f"ShardedAdapterSlots: out_features must be positive widths, got {out_features}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise LoRAInputError(f"ShardedAdapterSlots: dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.group = _group_of(group)
        self.tp = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.style, self.fully_sharded = style, bool(fully_sharded)
        self.num_slots, self.r_max, self.in_features, self.out_features = num_slots, r_max, in_features, widths
        tp = self.tp
        bad = [w for w in widths if w % tp]
        if bad:
            raise LoRAInputError(f"ShardedAdapterSlots: every output width must be divisible by the tensor-parallel size "
                                 f"{tp}, got {widths}")
        if style == "rowwise" and in_features % tp:
            raise LoRAInputError(f"ShardedAdapterSlots: rowwise shards the {in_features} input features over {tp} ranks; "
                                 f"in_features must be divisible by {tp}")
        if style == "colwise" and self.fully_sharded and r_max % tp:
            raise LoRAInputError(f"ShardedAdapterSlots: the fully sharded colwise scheme splits the rank over {tp} ranks; "
                                 f"r_max={r_max} must be divisible by {tp} (or use fully_sharded=False)")
        self.r_a = r_max // tp if (style == "colwise" and self.fully_sharded) else r_max
        self.k_a = in_features // tp if style == "rowwise" else in_features
        b_whole = style == "rowwise" and not self.fully_sharded
        self.n_b = [w if b_whole else w // tp for w in widths]
        self.lora_a = [torch.zeros((num_slots, self.r_a, self.k_a), dtype=dtype, device=device) for _ in widths]
        self.lora_b = [torch.zeros((num_slots, n, r_max), dtype=dtype, device=device) for n in self.n_b]
        self.scales = torch.zeros((num_slots,), dtype=torch.float32, device=device)
        self.ranks = torch.zeros((num_slots,), dtype=torch.int32, device=device)
        self._names: Dict[str, int] = {}

    # -- bookkeeping (as AdapterSlots) ---------------------------------------------------------
    @property
    def names(self) -> Dict[str, int]:
        return dict(self._names)

    def slot_of(self, name: str) -> int:
        if name not in self._names:
            raise KeyError(f"ShardedAdapterSlots: no adapter named {name!r} is loaded (loaded: {sorted(self._names)})")
        return self._names[name]

    def ids_for(self, names: Sequence[Optional[str]], device=None) -> torch.Tensor:
        ids = [-1 if n is None else self.slot_of(n) for n in names]
        return torch.tensor(ids, dtype=torch.int32, device=device if device is not None else self.scales.device)

    def _check_slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not (0 <= slot < self.num_slots):
            raise LoRAInputError(f"ShardedAdapterSlots: slot must be an int in [0, {self.num_slots}), got {slot!r}")
        return slot

    # -- shards ---------------------------------------------------------------------------------
    def local_columns(self) -> List[slice]:
        """For each slice: the columns of the local y this rank's part of the LoRA output goes to."""
        out, off = [], 0
        for w, n in zip(self.out_features, self.n_b):
            if self.style == "colwise":
                out.append(slice(off, off + n))
                off += n
            else:
                start = off + (self.rank * n if self.fully_sharded else 0)
                out.append(slice(start, start + n))
                off += w
        return out

    def load(self, slot: int, lora_A, lora_B, scale, *, name: Optional[str] = None) -> int:
        """Load the **full** adapter (PEFT layout: lora_A [r, K], lora_B [N_s, r] per slice; every rank passes the same
        tensors) into ``slot``; each rank keeps its shard. All inputs are validated before anything is written."""
        slot = self._check_slot(slot)
        As = [lora_A] if isinstance(lora_A, torch.Tensor) else list(lora_A)
        Bs = [lora_B] if isinstance(lora_B, torch.Tensor) else list(lora_B)
        # slices left out (None), per-slice ranks and scales, as AdapterSlots (lora_kernels.serving.fill_slices)
        As, Bs, scale = fill_slices("ShardedAdapterSlots.load", self.in_features, self.out_features, As, Bs, scale)
        S = len(self.out_features)
        if len(As) != S or len(Bs) != S:
            raise LoRAInputError(f"ShardedAdapterSlots.load: expected {S} lora_A and {S} lora_B (one per slice), got "
                                 f"{len(As)} and {len(Bs)}")
        r = None
        for s, (a, b) in enumerate(zip(As, Bs)):
            if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.shape[1] != self.in_features:
                raise LoRAInputError(f"ShardedAdapterSlots.load: lora_A[{s}] must be [r, K={self.in_features}] (the full "
                                     f"adapter), got {list(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
            if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[0] != self.out_features[s]:
                raise LoRAInputError(f"ShardedAdapterSlots.load: lora_B[{s}] must be [N={self.out_features[s]}, r] (the "
                                     f"full adapter), got {list(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
            if b.shape[1] != a.shape[0] or (r is not None and a.shape[0] != r):
                raise LoRAInputError(f"ShardedAdapterSlots.load: slice {s}: ranks disagree (lora_A {a.shape[0]}, lora_B "
                                     f"{b.shape[1]}, earlier slices {r})")
            r = a.shape[0]
        if r > self.r_max:
            raise LoRAInputError(f"ShardedAdapterSlots.load: rank {r} exceeds r_max={self.r_max}")
        scale_t = torch.as_tensor(scale, dtype=torch.float64)
        if scale_t.numel() != 1 or not bool(torch.isfinite(scale_t)):
            raise LoRAInputError(f"ShardedAdapterSlots.load: scale must be one finite number, got {scale!r}")
        if name is not None and name in self._names and self._names[name] != slot:
            raise LoRAInputError(f"ShardedAdapterSlots.load: adapter {name!r} is already loaded in slot {self._names[name]}")
        dev, dt = self.scales.device, self.lora_a[0].dtype
        staged = []
        for s, (a, b) in enumerate(zip(As, Bs)):
            a_pad = torch.zeros((self.r_max, self.in_features), dtype=dt, device=dev)
            a_pad[:r] = a.detach().to(device=dev, dtype=dt)
            b_pad = torch.zeros((self.out_features[s], self.r_max), dtype=dt, device=dev)
            b_pad[:, :r] = b.detach().to(device=dev, dtype=dt)
            if self.style == "colwise" and self.fully_sharded:
                a_loc = a_pad[self.rank * self.r_a:(self.rank + 1) * self.r_a]
            elif self.style == "rowwise":
                a_loc = a_pad[:, self.rank * self.k_a:(self.rank + 1) * self.k_a]
            else:
                a_loc = a_pad
            n = self.n_b[s]
            b_loc = b_pad if n == self.out_features[s] else b_pad[self.rank * n:(self.rank + 1) * n]
            staged.append((a_loc, b_loc))
        with torch.no_grad():
            for s, (a_loc, b_loc) in enumerate(staged):
                self.lora_a[s][slot].copy_(a_loc)
                self.lora_b[s][slot].copy_(b_loc)
            self.scales[slot] = float(scale_t)
            self.ranks[slot] = r
        for n_, sl in list(self._names.items()):
            if sl == slot:
                del self._names[n_]
        if name is not None:
            self._names[name] = slot
        return slot

    def evict(self, slot_or_name) -> int:
        slot = self.slot_of(slot_or_name) if isinstance(slot_or_name, str) else self._check_slot(slot_or_name)
        with torch.no_grad():
            for a, b in zip(self.lora_a, self.lora_b):
                a[slot].zero_()
                b[slot].zero_()
            self.scales[slot] = 0.0
            self.ranks[slot] = 0
        for n_, sl in list(self._names.items()):
            if sl == slot:
                del self._names[n_]
        return slot

    # -- compute --------------------------------------------------------------------------------
    def apply(self, y: torch.Tensor, x: torch.Tensor, adapter_ids: torch.Tensor, meta=None, *,
              backend: Optional[str] = None) -> torch.Tensor:
        """Add the per-token LoRA output into ``y`` in place (see the class docstring for the local shapes); returns y.

        colwise: y [M, Σ N_s/p] (this rank's columns of each slice, in order), x [M, K] (whole).
        rowwise: y [M, Σ N_s] (the partial sum before the engine's all-reduce), x [M, K/p] (this rank's columns).
        Every rank of the group must call it (it issues the layer's one r-wide collective when fully sharded).
        ``meta`` (a :class:`~lora_kernels.serving.LoRABatchMeta`) is used by the non-fully-sharded path only."""
        want_y = sum(self.n_b) if self.style == "colwise" else sum(self.out_features)
        if y.dim() != 2 or y.shape[1] != want_y:
            raise LoRAInputError(f"ShardedAdapterSlots.apply ({self.style}): y must be [M, {want_y}] on this rank, got "
                                 f"{list(y.shape)}")
        if x.dim() != 2 or x.shape[1] != self.k_a:
            raise LoRAInputError(f"ShardedAdapterSlots.apply ({self.style}): x must be [M, {self.k_a}] on this rank, got "
                                 f"{list(x.shape)}")
        cols = self.local_columns()
        if not self.fully_sharded:  # one fused add_lora on the local shard (the slices fill y's columns in order)
            return add_lora(y, x, self.lora_a, self.lora_b, adapter_ids, self.scales, self.ranks, meta=meta,
                            backend=backend)
        if self.style == "colwise":
            ranks_loc = (self.ranks - self.rank * self.r_a).clamp(0, self.r_a).to(torch.int32)
            parts = [lora_shrink(x, a, adapter_ids, 1.0, ranks_loc, backend=backend) for a in self.lora_a]
            xa_loc = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [M, S·r_max/p]
            xa = all_gather_cols(xa_loc, self.group)  # [M, p·S·r_max/p]: the layer's one collective
            M, S = x.shape[0], len(parts)
            xa = xa.view(M, self.tp, S, self.r_a)
            for s, (b, c) in enumerate(zip(self.lora_b, cols)):
                lora_expand_(y, xa[:, :, s].reshape(M, self.r_max), b, adapter_ids, self.scales, self.ranks,
                             col_offset=c.start, backend=backend)
            return y
        parts = [lora_shrink(x, a, adapter_ids, 1.0, self.ranks, backend=backend) for a in self.lora_a]
        xa = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # partial [M, S·r_max]
        xa = all_reduce(xa, self.group)  # the layer's one collective
        for s, (b, c) in enumerate(zip(self.lora_b, cols)):
            lora_expand_(y, xa[:, s * self.r_max:(s + 1) * self.r_max], b, adapter_ids, self.scales, self.ranks,
                         col_offset=c.start, backend=backend)
        return y
