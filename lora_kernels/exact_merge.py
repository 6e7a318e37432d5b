"""Lossless merge / unmerge: ``merge_exact_`` then ``unmerge_exact_`` gives back W bit-for-bit, always.

Why the plain round trip is not exact
-------------------------------------
``merge_`` writes ``W' = rnd(W + Δ)`` and ``unmerge_`` writes ``rnd(W' − Δ)``. The rounding error of the
merge, ``e = W' − (W + Δ)``, is at most half an ulp *of W'*; if W' landed in a coarser binade than W (an
update pushing |W| across a power of two), ``W + e`` can round to a neighbour of W, and there several
values of W map to the same W' (information is lost). Ties, −0 + 0 = +0, NaN payloads, fp16 overflow to
inf and flushed subnormals are other (rarer) ways to lose bits.

What the exact merge does
-------------------------
In the same pass as the merge, each element's unmerge result ``rnd(W' − Δ)`` is computed from the very
Δ the merge added, compared with W **as integer bits**, and every element where they differ is appended
to a repair list: its logical index ``n·K + k`` (int32, int64 past 2³¹ elements) and W's original bits
(int16 for fp16/bf16, int32 for fp32, int64 for fp64). ``unmerge_exact_`` runs the plain unmerge and
scatters those bits back. Nothing else is needed for exactness — provided the unmerge forms **the same
Δ, bit for bit**. Hence the :class:`MergeRecord` remembers:

* the backend and its launch config (Triton tile sizes; the CUDA kernel has a fixed tiling), and
  ``unmerge_exact_`` replays exactly those (asking it for another backend is an error): different kernels
  or tilings sum the rank dimension in different orders and give a Δ that differs in the last fp32 bit;
* the adapter operands: by default a private **snapshot** (clone) of every A and B and the scales, so
  later changes to the LoRA parameters (an optimizer step while merged, ``load_state_dict``) cannot break
  the unmerge — it removes exactly what was added. ``snapshot=False`` keeps references instead, records
  their version counters, and the unmerge raises if any of them changed;
* the weight's identity (data pointer, shape, strides, dtype, device) and its version counter after the
  merge: an unmerge with a record from another weight, or after W was modified in place, raises before
  anything is written. A record is single-use.

The unmerge uses ``round(W' + (−Δ))`` computed with negated scales; round-to-nearest-even is symmetric in
sign, so this equals the merge's check ``round(W' − Δ)`` bit for bit (Triton kernels are compiled with FMA
contraction off so this holds whatever the scheduling).

Side storage (reported by :meth:`MergeRecord.nbytes` / :meth:`MergeRecord.summary`)
-------------------------------------------------------------------------------------
repair list: ``n_repairs × (4 + elt)`` bytes, i.e. 6 bytes per repaired bf16/fp16 element. Measured on the
torch path (``tests/test_merge.py::test_repair_fraction_realistic``: bf16 W ~ N(0, 0.02²) [512, 768], rank-16
ΔW with ‖ΔW‖/‖W‖ = 0.68 % / 1.94 % / 6.79 %): 0.98 % / 2.20 % / 5.69 % of the elements need repair, i.e. a
repair list of 2.9 % / 6.6 % / 17.1 % of W's bytes. The failures are dominated by elements that the update
pushes into a coarser binade (their merged value has half the resolution, so a bit is truly lost), which is
why the fraction grows with |ΔW|/|W| (roughly ∝ ρ·ln(1/ρ)). A denser encoding (per-tile 16-bit local index
+ ulp offset) would cut the bytes about 3×. The adapter snapshot adds ``Σ rᵢ·(N + K)·elt`` bytes
(0.8 % of a 4096×4096 W at r = 16, 3.1 % at r = 64); ``snapshot=False`` drops it.

Overflow (fp16 / bf16 / fp32 values whose merged value is ±inf)
-----------------------------------------------------------------
The repair list keeps such elements exact anyway, but an infinite weight is almost certainly a bug, so by
default (``on_overflow="raise"``) the exact merge detects it in the same pass, restores W bit-for-bit from
the record and raises :class:`MergeOverflowError` — W is unchanged when the error reaches the caller.
``on_overflow="keep"`` keeps the infinities (the round trip is still exact).

The exact merge synchronises once (to size the repair list), so it cannot be captured in a CUDA graph;
the plain ``merge_`` / ``unmerge_`` can (while capturing, per-adapter scales and rank offsets reach the device
through fill kernels, ``ops.merge.small_tensor``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ._backend import resolve_backend
from ._checks import LoRAInputError, check_float
from .functional import TensorOrList, dora_merge_inputs, merge_inputs
from .ops import launcher
from .ops._registry import mark_written
from .ops.merge import BITS_DTYPE

__all__ = ["MergeRecord", "MergeOverflowError", "merge_exact_", "unmerge_exact_"]


class MergeOverflowError(LoRAInputError):
    """The merged weight would contain ±inf where W was finite (W has been left unchanged)."""


def _flat(t) -> list:
    return [t] if isinstance(t, torch.Tensor) else list(t)


def _is_dtensor(*tensors) -> bool:
    """Whether any argument is a DTensor (looked up in sys.modules: this never imports torch.distributed)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and any(isinstance(t, mod.DTensor) for t in tensors)


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return int(t._version)
    except Exception:  # inference tensors have no version counter
        return None


@dataclass(eq=False)
class MergeRecord:
    """What ``unmerge_exact_`` needs to restore W bit-for-bit (see the module docstring)."""

    backend: str
    config: Optional[dict]
    lora_a: List[torch.Tensor]
    lora_b: List[torch.Tensor]
    scales: Tuple[float, ...]  # as merged (the unmerge negates them)
    snapshot: bool
    adapter_versions: Optional[Tuple[Optional[int], ...]]
    weight_ptr: int
    weight_shape: Tuple[int, ...]
    weight_stride: Tuple[int, ...]
    weight_dtype: torch.dtype
    weight_device: torch.device
    repair_index: torch.Tensor  # logical n*K + k, int32 or int64
    repair_bits: torch.Tensor  # W's original bits at those elements
    n_nonfinite: int = 0  # elements made ±inf/NaN by the merge (only with on_overflow="keep")
    weight_version: Optional[int] = None
    consumed: bool = field(default=False)
    # DoRA: the row factor g = m / ‖W0 + s·B·A‖ [N] the merge applied (from the unmerged W0); the unmerge divides by it
    dora_factor: Optional[torch.Tensor] = None

    @property
    def n_repairs(self) -> int:
        return int(self.repair_index.numel())

    @property
    def numel(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n

    @property
    def repair_fraction(self) -> float:
        return self.n_repairs / max(self.numel, 1)

    def repair_nbytes(self) -> int:
        return self.repair_index.numel() * self.repair_index.element_size() + self.repair_bits.numel() * self.repair_bits.element_size()

    def adapter_nbytes(self) -> int:
        """Bytes held by the adapter snapshot (0 with snapshot=False: only references are kept)."""
        if not self.snapshot:
            return 0
        return sum(t.numel() * t.element_size() for t in self.lora_a + self.lora_b)

    def nbytes(self) -> int:
        return self.repair_nbytes() + self.adapter_nbytes()

    def weight_nbytes(self) -> int:
        return self.numel * torch.empty(0, dtype=self.weight_dtype).element_size()

    def summary(self) -> str:
        w = max(self.weight_nbytes(), 1)
        return (
            f"MergeRecord[{self.backend}] W{list(self.weight_shape)} {str(self.weight_dtype).replace('torch.', '')}: "
            f"{self.n_repairs} repairs ({100 * self.repair_fraction:.3f}% of elements), "
            f"repair list {self.repair_nbytes()} B ({100 * self.repair_nbytes() / w:.3f}% of W), "
            f"adapter snapshot {self.adapter_nbytes()} B ({100 * self.adapter_nbytes() / w:.3f}% of W)"
        )


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def merge_exact_(
    weight: torch.Tensor,
    lora_a: TensorOrList,
    lora_b: TensorOrList,
    scale: Union[float, Sequence[float]],
    *,
    backend: Optional[str] = None,
    snapshot: bool = True,
    on_overflow: str = "raise",
    magnitude: Optional[torch.Tensor] = None,
    weight_norm: Optional[torch.Tensor] = None,
) -> MergeRecord:
    """In place ``W ← round(W + Σᵢ sᵢ·Bᵢ·Aᵢ)`` (as :func:`lora_kernels.merge_`) and return the record that
    lets :func:`unmerge_exact_` restore W bit-for-bit.

    DoRA (``magnitude`` m [N], one adapter; ``weight_norm`` optional as in :func:`lora_kernels.merge_`):
    ``W ← round(g⊙(W + s·B·A))``; the record keeps g and the repair list of ``round(W'/g − s·B·A)`` (torch backend).

    Args: weight [N, K] (fp16/bf16/fp32 on any backend, fp64 on torch; any strides without aliasing);
    lora_a [r, K] or list of [rᵢ, K]; lora_b [N, r] or list of [N, rᵢ]; scale a float or one per adapter;
    backend "cuda" | "triton" | "torch" | None (auto); snapshot: keep a private copy of the adapter in the
    record (default) or only references + version counters; on_overflow: "raise" (default: W restored,
    :class:`MergeOverflowError`) or "keep".

    Every check runs before W is written; a failed call leaves W unchanged. Synchronises once.
    A DTensor weight (tensor parallel, FSDP2) is merged block by block, each rank its own, and gives a
    ``lora_kernels.distributed.ShardedMergeRecord`` (collective: every rank of the weight's mesh calls it).
    """
    if _is_dtensor(weight, *_flat(lora_a), *_flat(lora_b)):
        if magnitude is not None:
            raise LoRAInputError("lora_kernels.merge_exact_: a DoRA merge of a DTensor weight is not supported")
        from .distributed.merge import merge_exact_sharded_

        return merge_exact_sharded_(weight, lora_a, lora_b, scale, backend=backend, snapshot=snapshot, on_overflow=on_overflow)
    op = "merge_exact_"
    g = None
    if magnitude is not None or weight_norm is not None:  # DoRA: validated and g formed before W is written
        a, b, s, g = dora_merge_inputs(weight, lora_a, lora_b, scale, magnitude, weight_norm, op)
        lora_a, lora_b, scales = [a], [b], [s]
    else:
        lora_a, lora_b, scales = merge_inputs(weight, lora_a, lora_b, scale)
    if on_overflow not in ("raise", "keep"):
        raise LoRAInputError(f"lora_kernels.{op}: on_overflow must be 'raise' or 'keep', got {on_overflow!r}")
    be = resolve_backend("merge_exact" if g is None else "merge_dora_exact", weight, *lora_a, *lora_b, backend=backend)
    with torch.no_grad():
        if snapshot:
            a_ops = [a.detach().clone(memory_format=torch.preserve_format) for a in lora_a]
            b_ops = [b.detach().clone(memory_format=torch.preserve_format) for b in lora_b]
            versions = None
        else:
            a_ops = [a.detach() for a in lora_a]
            b_ops = [b.detach() for b in lora_b]
            versions = tuple(_version(t) for t in lora_a + lora_b)
        if g is None:
            index, bits, n_nonfinite, config = launcher("merge_exact", be)(weight, a_ops, b_ops, scales)
        else:
            index, bits, n_nonfinite, config = launcher("merge_dora_exact", be)(weight, a_ops[0], b_ops[0], scales[0], g)
        mark_written(weight)
        record = MergeRecord(
            backend=be, config=config, lora_a=a_ops, lora_b=b_ops, scales=tuple(scales), snapshot=snapshot,
            adapter_versions=versions, weight_ptr=weight.data_ptr(), weight_shape=tuple(weight.shape),
            weight_stride=tuple(weight.stride()), weight_dtype=weight.dtype, weight_device=weight.device,
            repair_index=index, repair_bits=bits, n_nonfinite=n_nonfinite, dora_factor=g,
        )
        record.weight_version = _version(weight)
        if n_nonfinite and on_overflow == "raise":
            _unmerge_apply(weight, record)
            raise MergeOverflowError(
                f"lora_kernels.{op}: the merged weight would have {n_nonfinite} non-finite element(s) where W was "
                f"finite (overflow of {weight.dtype}); W was restored bit-for-bit and left unchanged. "
                "Pass on_overflow='keep' to merge anyway (the exact unmerge still restores W)."
            )
    return record


def _check_record(op: str, weight: torch.Tensor, record, backend: Optional[str]) -> None:
    if not isinstance(record, MergeRecord):
        raise LoRAInputError(f"lora_kernels.{op}: record must be the MergeRecord returned by merge_exact_, got {type(record).__name__}")
    if record.consumed:
        raise LoRAInputError(f"lora_kernels.{op}: this MergeRecord was already used by an unmerge (records are single-use)")
    check_float(op, "weight", weight)
    mine = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), weight.dtype, weight.device)
    theirs = (record.weight_ptr, record.weight_shape, record.weight_stride, record.weight_dtype, record.weight_device)
    if mine != theirs:
        raise LoRAInputError(
            f"lora_kernels.{op}: the record does not belong to this weight (record: ptr={theirs[0]:#x} shape={list(theirs[1])} "
            f"stride={list(theirs[2])} {theirs[3]} on {theirs[4]}; weight: ptr={mine[0]:#x} shape={list(mine[1])} "
            f"stride={list(mine[2])} {mine[3]} on {mine[4]})"
        )
    v = _version(weight)
    if record.weight_version is not None and v is not None and v != record.weight_version:
        raise LoRAInputError(
            f"lora_kernels.{op}: the weight was modified in place after merge_exact_ (version {record.weight_version} -> {v}); "
            "the record no longer describes it (use the plain unmerge_ to subtract the adapter anyway)"
        )
    if not record.snapshot:
        now = tuple(_version(t) for t in record.lora_a + record.lora_b)
        if now != record.adapter_versions:
            raise LoRAInputError(
                f"lora_kernels.{op}: lora_a/lora_b changed since merge_exact_ (made with snapshot=False), so Δ cannot be "
                "recomputed bit-for-bit; merge with snapshot=True to allow adapter updates while merged"
            )
    if backend is not None and backend.lower() not in ("auto", record.backend):
        raise LoRAInputError(
            f"lora_kernels.{op}: the record was made by the {record.backend!r} backend; the exact unmerge must replay that "
            f"kernel to reproduce Δ bit-for-bit, not {backend!r}"
        )


def rebind_record_(record, old_weight: torch.Tensor, new_weight: torch.Tensor) -> bool:
    """Re-bind ``record`` (a copy, e.g. made by ``copy.deepcopy``) from ``old_weight`` to ``new_weight``, a bit-identical
    copy of it (same shape, strides, dtype, device; another storage). Done only while the record still describes
    ``old_weight`` (not used, same identity, same version counter): then ``unmerge_exact_(new_weight, record)``
    restores the copy bit-for-bit. Returns whether it re-bound; a stale record is left as it is (its unmerge then
    refuses as before). Callers guarantee the bits are equal (a clone); this checks the metadata only."""
    if not isinstance(record, MergeRecord) or record.consumed:
        return False
    old = (old_weight.data_ptr(), tuple(old_weight.shape), tuple(old_weight.stride()), old_weight.dtype, old_weight.device)
    if old != (record.weight_ptr, record.weight_shape, record.weight_stride, record.weight_dtype, record.weight_device):
        return False
    v = _version(old_weight)
    if record.weight_version is not None and v is not None and v != record.weight_version:
        return False
    if (tuple(new_weight.shape), tuple(new_weight.stride()), new_weight.dtype) != old[1:4]:
        return False
    record.weight_ptr = new_weight.data_ptr()
    record.weight_device = new_weight.device
    record.weight_version = _version(new_weight)
    return True


def record_to_tensor(record: MergeRecord) -> torch.Tensor:
    """Serialise a (single-use, unconsumed) record into a CPU uint8 tensor, so it can travel in a state dict
    (``torch.save`` and safetensors alike). Only what the unmerge needs is kept (not the weight's identity, which
    :func:`record_from_tensor` takes from the weight it is loaded next to). Needs ``snapshot=True`` records."""
    import io

    if not isinstance(record, MergeRecord) or record.consumed or not record.snapshot:
        raise LoRAInputError("record_to_tensor: needs an unused MergeRecord made with snapshot=True")
    payload = {
        "version": 1, "backend": record.backend, "config": record.config,
        "lora_a": [t.detach().cpu() for t in record.lora_a], "lora_b": [t.detach().cpu() for t in record.lora_b],
        "scales": [float(s) for s in record.scales], "shape": list(record.weight_shape),
        "dtype": str(record.weight_dtype).replace("torch.", ""), "repair_index": record.repair_index.cpu(),
        "repair_bits": record.repair_bits.cpu(), "n_nonfinite": int(record.n_nonfinite),
        "dora_factor": None if getattr(record, "dora_factor", None) is None else record.dora_factor.detach().cpu(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def record_from_tensor(t: torch.Tensor, weight: torch.Tensor) -> MergeRecord:
    """The record serialised by :func:`record_to_tensor`, bound to ``weight`` as it is now (which must hold the merged
    bits the record was made with: a state dict's weight loaded next to it). Raises LoRAInputError when the shape or
    dtype disagree or the backend is not available here."""
    import io

    try:
        p = torch.load(io.BytesIO(t.detach().cpu().numpy().tobytes()), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding problem is a bad record
        raise LoRAInputError(f"record_from_tensor: not a serialised MergeRecord ({e})") from None
    if not isinstance(p, dict) or p.get("version") != 1:
        raise LoRAInputError("record_from_tensor: not a serialised MergeRecord (version 1)")
    if list(weight.shape) != p["shape"] or str(weight.dtype).replace("torch.", "") != p["dtype"]:
        raise LoRAInputError(f"record_from_tensor: the record is for a {p['dtype']} weight {p['shape']}, not "
                             f"{weight.dtype} {list(weight.shape)}")
    dev = weight.device
    return MergeRecord(
        backend=p["backend"], config=p["config"], lora_a=[a.to(dev) for a in p["lora_a"]],
        lora_b=[b.to(dev) for b in p["lora_b"]], scales=tuple(p["scales"]), snapshot=True, adapter_versions=None,
        weight_ptr=weight.data_ptr(), weight_shape=tuple(weight.shape), weight_stride=tuple(weight.stride()),
        weight_dtype=weight.dtype, weight_device=dev, repair_index=p["repair_index"].to(dev),
        repair_bits=p["repair_bits"].to(dev), n_nonfinite=p["n_nonfinite"], weight_version=_version(weight),
        dora_factor=None if p.get("dora_factor") is None else p["dora_factor"].to(dev),
    )


def _unmerge_apply(weight: torch.Tensor, record: MergeRecord) -> None:
    if record.dora_factor is not None:  # DoRA: round(W'/g − s·B·A), as the merge's check computed it
        launcher("merge_dora", record.backend)(weight, record.lora_a[0], record.lora_b[0], record.scales[0],
                                               record.dora_factor, True)
    else:
        # the plain merge of the same backend and launch config with negated scales forms exactly −Δ
        launcher("merge", record.backend)(weight, record.lora_a, record.lora_b, [-s for s in record.scales], record.config)
    mark_written(weight)
    if record.n_repairs:
        K = weight.shape[1]
        idx = record.repair_index.to(torch.int64)
        weight.view(BITS_DTYPE[weight.dtype])[idx // K, idx % K] = record.repair_bits
    record.consumed = True


def unmerge_exact_(weight: torch.Tensor, record: MergeRecord, *, backend: Optional[str] = None) -> torch.Tensor:
    """Undo :func:`merge_exact_` in place: W becomes bit-for-bit what it was before the merge. Returns weight.

    ``record`` must come from ``merge_exact_`` on this very weight, which must not have been modified since;
    ``backend`` (optional) must name the record's backend. All checks run before anything is written.
    A DTensor weight takes the ``ShardedMergeRecord`` its sharded merge returned (each rank restores its block).
    """
    if _is_dtensor(weight):
        from .distributed.merge import unmerge_exact_sharded_

        return unmerge_exact_sharded_(weight, record, backend=backend)
    _check_record("unmerge_exact_", weight, record, backend)
    with torch.no_grad():
        _unmerge_apply(weight, record)
    return weight
