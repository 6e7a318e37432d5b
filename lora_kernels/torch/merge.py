"""The merge family on the torch backend: plain and exact merge (contract in ``lora_kernels/ops/merge.py``).

Δ is :func:`lora_kernels.reference.merge_delta_ref` (fp32, one rounding of W), so the unmerge (this merge with
negated scales) forms exactly ``−Δ`` and the exact merge's per-element check matches what the unmerge will do.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference as ref
from ..ops.merge import BITS_DTYPE


def merge_torch(weight, lora_a, lora_b, scales, config: Optional[dict] = None) -> None:
    ref.merge_ref(weight, lora_a, lora_b, scales)


def merge_exact_torch(weight, lora_a, lora_b, scales, config: Optional[dict] = None, capacity: Optional[int] = None):
    """Merge in place and return (repair_index, repair_bits, n_new_nonfinite, None): the logical indices
    ``n·K + k`` where ``round(W' − Δ) != W`` bitwise, and W's original bits there."""
    ib = BITS_DTYPE[weight.dtype]
    delta = ref.merge_delta_ref(weight, lora_a, lora_b, scales)
    out = (weight.to(delta.dtype) + delta).to(weight.dtype)
    back = (out.to(delta.dtype) - delta).to(weight.dtype)  # what the unmerge computes from W' = out
    bad = back.view(ib) != weight.view(ib)
    rows, cols = bad.nonzero(as_tuple=True)
    idx_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    index = (rows * weight.shape[1] + cols).to(idx_dtype)
    bits = weight.view(ib)[rows, cols].clone()
    n_nonfinite = int((torch.isfinite(weight) & ~torch.isfinite(out)).sum())
    weight.copy_(out)
    return index, bits, n_nonfinite, None


def merge_dora_torch(weight, lora_a, lora_b, scale, factor, inverse: bool) -> None:
    """DoRA merge ``W ← round(g⊙(W + s·B·A))`` or (``inverse``) unmerge ``W ← round(W/g − s·B·A)``, fp32 (fp64)."""
    (ref.dora_unmerge_ref if inverse else ref.dora_merge_ref)(weight, lora_a, lora_b, scale, factor)


def merge_dora_exact_torch(weight, lora_a, lora_b, scale, factor, capacity: Optional[int] = None):
    """DoRA merge in place plus the repair list of the exact unmerge: (repair_index, repair_bits, n_new_nonfinite,
    None), the indices ``n·K + k`` where :func:`merge_dora_torch` with ``inverse=True`` would not give W back bit for
    bit, and W's original bits there (same contract as :func:`merge_exact_torch`)."""
    ib = BITS_DTYPE[weight.dtype]
    out = weight.clone()
    ref.dora_merge_ref(out, lora_a, lora_b, scale, factor)
    back = out.clone()
    ref.dora_unmerge_ref(back, lora_a, lora_b, scale, factor)  # exactly what the unmerge computes from W' = out
    bad = back.view(ib) != weight.view(ib)
    rows, cols = bad.nonzero(as_tuple=True)
    idx_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    index = (rows * weight.shape[1] + cols).to(idx_dtype)
    bits = weight.view(ib)[rows, cols].clone()
    n_nonfinite = int((torch.isfinite(weight) & ~torch.isfinite(out)).sum())
    weight.copy_(out)
    return index, bits, n_nonfinite, None
