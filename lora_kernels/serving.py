"""Serving helpers for batched multi-adapter LoRA: per-batch metadata and per-layer adapter slots.

* :class:`LoRABatchMeta` (defined beside its op in ``ops/multi_lora.py``, re-exported here) — built once per
  batch from ``adapter_ids`` on the device (no host sync), reused by every layer's ``add_lora(..., meta=meta)``,
  and updatable in place (``meta.update_(ids)``) between CUDA-graph replays.
* :class:`AdapterSlots` — owns one layer's stacked adapter tensors (A, B per packed slice, scales, ranks), loads
  PEFT-layout weights into a slot, evicts, keeps name → slot bookkeeping and applies ``add_lora``.

Nothing here knows about a particular serving engine.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Union

import torch

from ._checks import LoRAInputError
from .functional import add_lora
from .ops.multi_lora import DEFAULT_BLOCK_M, LoRABatchMeta

__all__ = ["LoRABatchMeta", "AdapterSlots", "DEFAULT_BLOCK_M"]


def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def fill_slices(where: str, in_features: int, out_features: Sequence[int], As: list, Bs: list, scale):
    """Reduce an adapter whose packed slices differ to the stacked layout (one rank, one scale per slot):

    * a slice given as None (lora_A and lora_B both None) is one the adapter does not touch: zero weights;
    * slices of different ranks are zero-padded to the largest (the padding adds exactly 0);
    * ``scale`` may be one number per slice (None for a slice left out). ``add_lora`` takes one scale per
      adapter, so the slot keeps ``s_ref`` (the first nonzero slice scale) and slice s is loaded as
      ``B_s·(s_s/s_ref)``, formed in float64 and rounded once to the slots' dtype: exact for fp32 slots up to
      that one rounding; for 16-bit slots it replaces the rounding of B_s by the rounding of the product (same
      size, measured in tests/test_named_adapters.py). Slices whose scale equals s_ref are copied unchanged.

    Returns (As, Bs, scale) for ``load``; malformed tensors are passed through for its checks to name (``where``
    names the caller in the errors raised here; ShardedAdapterSlots.load uses it too)."""
    S = len(out_features)
    per_slice = isinstance(scale, (list, tuple))
    if len(As) != S or len(Bs) != S or (not per_slice and all(a is not None and b is not None for a, b in zip(As, Bs))
                                        and len({a.shape[0] if isinstance(a, torch.Tensor) and a.dim() == 2 else -1
                                                 for a in As}) == 1):
        return As, Bs, scale  # the usual case (or a count mismatch load reports): unchanged
    for s, (a, b) in enumerate(zip(As, Bs)):
        if (a is None) != (b is None):
            raise LoRAInputError(f"{where}: slice {s}: give lora_A and lora_B, or None for both (a slice "
                                 "the adapter leaves out)")
    present = [s for s in range(S) if As[s] is not None]
    if not present:
        raise LoRAInputError(f"{where}: every slice is None (evict() empties a slot)")
    if any(not isinstance(As[s], torch.Tensor) or As[s].dim() != 2 or not isinstance(Bs[s], torch.Tensor)
           or Bs[s].dim() != 2 for s in present):
        return As, Bs, scale
    scales = list(scale) if per_slice else [scale] * S
    if len(scales) != S:
        raise LoRAInputError(f"{where}: scale must be one number or one per slice ({S}), got {len(scales)}")
    for s in present:
        try:
            v = float(scales[s])
        except (TypeError, ValueError):
            v = float("nan")
        if not math.isfinite(v):
            raise LoRAInputError(f"{where}: scale[{s}] must be a finite number, got {scales[s]!r}")
        scales[s] = v
    for s in present:
        if Bs[s].shape[1] != As[s].shape[0]:
            raise LoRAInputError(f"{where}: slice {s}: lora_A has r={As[s].shape[0]} rows but lora_B has "
                                 f"{Bs[s].shape[1]} columns")
    r = max(As[s].shape[0] for s in present)
    s_ref = next((scales[s] for s in present if scales[s] != 0.0), 0.0)
    ref = As[present[0]]
    outA, outB = [], []
    for s in range(S):
        if s not in present:
            outA.append(torch.zeros(r, in_features, dtype=ref.dtype, device=ref.device))
            outB.append(torch.zeros(out_features[s], r, dtype=ref.dtype, device=ref.device))
            continue
        a, b = As[s], Bs[s]
        if s_ref != 0.0 and scales[s] != s_ref:
            b = b.detach().to(torch.float64) * (scales[s] / s_ref)
        if a.shape[0] < r:
            a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], 1)
        outA.append(a)
        outB.append(b)
    return outA, outB, s_ref


class AdapterSlots:
    """Stacked adapter weights of one LoRA layer (optionally q/k/v-packed), with slot bookkeeping.

    ``lora_a[s]`` is [L, r_max, K] and ``lora_b[s]`` is [L, N_s, r_max] for each output slice s (widths
    ``out_features``); ``scales`` [L] (fp32) and ``ranks`` [L] (int32). Empty slots have rank 0 and zero weights. An adapter may leave
    packed slices out (None: zero weights there, e.g. PEFT's Llama default targets q and v only) and give each slice
    its own rank and scale (:func:`fill_slices` folds them into the one rank and scale a slot holds).

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
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise LoRAInputError(f"AdapterSlots: dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.num_slots, self.r_max, self.in_features, self.out_features = num_slots, r_max, in_features, widths
        self.lora_a = [torch.zeros((num_slots, r_max, in_features), dtype=dtype, device=device) for _ in widths]
        self.lora_b = [torch.zeros((num_slots, n, r_max), dtype=dtype, device=device) for n in widths]
        self.scales = torch.zeros((num_slots,), dtype=torch.float32, device=device)
        self.ranks = torch.zeros((num_slots,), dtype=torch.int32, device=device)
        self._names: Dict[str, int] = {}
        # DoRA: [L, N_total] fp32 factors g = m / ‖W0 + s·B·A‖_row (ones for plain slots), allocated by the first
        # DoRA load; apply() passes it only while a DoRA adapter is loaded (plain batches keep the plain kernels).
        self.magnitudes: Optional[torch.Tensor] = None
        self._dora_slots: set = set()

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
    def _fill_slices(self, As: list, Bs: list, scale):
        """See :func:`fill_slices` (slices left out, per-slice ranks and scales)."""
        return fill_slices("AdapterSlots.load", self.in_features, self.out_features, As, Bs, scale)

    def load(
        self,
        slot: int,
        lora_A: Union[torch.Tensor, Sequence[torch.Tensor]],
        lora_B: Union[torch.Tensor, Sequence[torch.Tensor]],
        scale: Union[float, Sequence[Optional[float]]],
        *,
        name: Optional[str] = None,
        magnitude: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
        base_weight: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    ) -> int:
        """Copy an adapter into ``slot``: lora_A [r, K] (PEFT ``lora_A.weight``) and lora_B [N_s, r]
        (``lora_B.weight``), one pair per slice (a single tensor when there is one slice). Ranks r <= r_max are
        zero-padded and ``ranks[slot] = r``. All inputs are validated before anything is written. Returns slot.

        DoRA: ``magnitude`` (PEFT ``lora_magnitude_vector``, [N_s] per slice (None for a slice left out: g = 1
        there), or one [ΣN_s] tensor) and the frozen
        ``base_weight`` W0 ([N_s, K] per slice, or the packed [ΣN_s, K]); the factors
        ``g = m / ‖W0 + scale·B·A‖_row`` are computed here once (fp32, without forming the N×K sum:
        :func:`lora_kernels.dora.dora_weight_norm`) and :meth:`apply` rescales this slot's tokens by them."""
        slot = self._check_slot(slot)
        As = [lora_A] if isinstance(lora_A, torch.Tensor) else list(lora_A)
        Bs = [lora_B] if isinstance(lora_B, torch.Tensor) else list(lora_B)
        As, Bs, scale = self._fill_slices(As, Bs, scale)  # slices left out (None), per-slice ranks and scales
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
        g = self._dora_factors(As, Bs, float(scale_t), magnitude, base_weight)  # validates; None for plain LoRA
        # Everything that can fail (dtype/device conversion) happens before the slot is touched, so a failed load
        # leaves the slot, its scale, rank and name exactly as they were.
        dev, dt = self.scales.device, self.lora_a[0].dtype
        try:
            staged = [(a.detach().to(device=dev, dtype=dt), b.detach().to(device=dev, dtype=dt)) for a, b in zip(As, Bs)]
        except (RuntimeError, TypeError, NotImplementedError) as e:
            raise LoRAInputError(f"AdapterSlots.load: cannot copy the adapter to {dt} on {dev}: {e}") from e
        with torch.no_grad():
            for s, (a, b) in enumerate(staged):
                self.lora_a[s][slot].zero_()
                self.lora_b[s][slot].zero_()
                self.lora_a[s][slot, :r].copy_(a)
                self.lora_b[s][slot, :, :r].copy_(b)
            self.scales[slot] = float(scale_t)
            self.ranks[slot] = r
            self._set_factors(slot, g)
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
            self._set_factors(slot, None)
        for n, sl in list(self._names.items()):
            if sl == slot:
                del self._names[n]
        return slot

    # -- DoRA ---------------------------------------------------------------------------------
    def _dora_factors(self, As, Bs, scale: float, magnitude, base_weight) -> Optional[torch.Tensor]:
        """g = m / ‖W0 + scale·B·A‖_row per slice, concatenated: [ΣN_s] fp32 on the slots' device (None without
        ``magnitude``). Raises LoRAInputError naming the input before anything is written."""
        from .dora import dora_weight_norm

        if magnitude is None:
            if base_weight is not None:
                raise LoRAInputError("AdapterSlots.load: base_weight is only used with magnitude (DoRA)")
            return None
        if base_weight is None:
            raise LoRAInputError("AdapterSlots.load: a DoRA adapter (magnitude given) needs base_weight, the frozen "
                                 "W0 of this layer, to compute m / ‖W0 + s·B·A‖")
        widths, K = self.out_features, self.in_features
        N = sum(widths)

        def split(t, what, shape_of):
            ts = [t] if isinstance(t, torch.Tensor) else list(t)
            if len(ts) == 1 and len(widths) > 1:
                if not isinstance(ts[0], torch.Tensor) or ts[0].shape[:1] != (N,):
                    packed = ", ".join(str(d) for d in shape_of(N))
                    raise LoRAInputError(f"AdapterSlots.load: {what} must be [{packed}] (packed) or one per slice "
                                         f"(widths {widths}), got {_shape(ts[0])}")
                ts = list(torch.split(ts[0], widths, dim=0))
            if len(ts) != len(widths):
                raise LoRAInputError(f"AdapterSlots.load: expected {len(widths)} {what} tensors (one per slice), got {len(ts)}")
            for s, (t, n) in enumerate(zip(ts, widths)):
                if t is None and what == "magnitude":
                    continue  # a slice the adapter leaves out (plain there: g = 1)
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape_of(n)) or not t.is_floating_point():
                    raise LoRAInputError(f"AdapterSlots.load: {what}[{s}] must be a floating tensor {list(shape_of(n))}, "
                                         f"got {_shape(t)}{' ' + str(t.dtype) if isinstance(t, torch.Tensor) else ''}")
            return ts

        ms = split(magnitude, "magnitude", lambda n: (n,))
        ws = split(base_weight, "base_weight", lambda n: (n, K))
        out = []
        for s, (m, w, a, b) in enumerate(zip(ms, ws, As, Bs)):
            if m is None:
                out.append(torch.ones(widths[s], dtype=torch.float32, device=w.device))
                continue
            if not bool(torch.isfinite(m).all()):
                raise LoRAInputError(f"AdapterSlots.load: magnitude[{s}] has non-finite values")
            dev = w.device
            norm = dora_weight_norm(w.detach(), a.detach().to(dev), b.detach().to(dev), scale)
            g = m.detach().to(device=dev, dtype=torch.float32) / norm.to(torch.float32)
            if not bool(torch.isfinite(g).all()):
                raise LoRAInputError(f"AdapterSlots.load: slice {s}: ‖W0 + s·B·A‖ is 0 in some row (m / 0 is not finite)")
            out.append(g)
        return torch.cat(out).to(self.scales.device)

    def _set_factors(self, slot: int, g: Optional[torch.Tensor]) -> None:
        if g is None:
            self._dora_slots.discard(slot)
            if self.magnitudes is not None:
                self.magnitudes[slot].fill_(1.0)
            return
        if self.magnitudes is None:
            self.magnitudes = torch.ones((self.num_slots, sum(self.out_features)), dtype=torch.float32,
                                         device=self.scales.device)
        self.magnitudes[slot].copy_(g)
        self._dora_slots.add(slot)

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
        bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``lora_kernels.add_lora`` with this layer's stacked weights: y [M, ΣN_s] += per-token LoRA (in place).

        y holds the base output. While a DoRA adapter is loaded, every adapter's tokens get
        ``y = g⊙(y − bias + lora) + bias`` (g = 1 for plain adapters): pass the base layer's ``bias`` [ΣN_s] when it
        has one (it is not read otherwise)."""
        if self._dora_slots:
            return add_lora(y, x, self.lora_a, self.lora_b, adapter_ids, self.scales, self.ranks, meta=meta,
                            backend=backend, magnitudes=self.magnitudes, bias=bias)
        return add_lora(
            y, x, self.lora_a, self.lora_b, adapter_ids, self.scales, self.ranks, meta=meta, backend=backend
        )
