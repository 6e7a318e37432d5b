"""Operand packing shared by the merge launchers of every backend (no kernel code here)."""

from __future__ import annotations

from typing import Sequence

import torch


def concat_adapters(
    weight: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scales: Sequence[float]
):
    """Stack n adapters along the rank for a one-pass weighted merge.

    Returns (A [R, K], B [N, R], rank_starts int32 [n+1], scales fp32 [n]) with R = Σ rᵢ, adapter i owning
    ranks [rank_starts[i], rank_starts[i+1]). One common dtype (fp32 if the adapters' dtypes differ; the
    cast is exact). A single adapter is passed through without a copy.
    """
    dts = {t.dtype for t in list(lora_a) + list(lora_b)}
    common = dts.pop() if len(dts) == 1 else torch.float32
    if len(lora_a) == 1:
        a, b = lora_a[0].to(common), lora_b[0].to(common)
    else:
        a = torch.cat([t.to(common) for t in lora_a], dim=0)
        b = torch.cat([t.to(common) for t in lora_b], dim=1)
    starts = [0]
    for t in lora_a:
        starts.append(starts[-1] + t.shape[0])
    rank_starts = torch.tensor(starts, dtype=torch.int32, device=weight.device)
    scale_t = torch.tensor([float(s) for s in scales], dtype=torch.float32, device=weight.device)
    return a, b, rank_starts, scale_t
