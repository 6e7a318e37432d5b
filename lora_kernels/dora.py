"""DoRA's row norm ‖W0 + s·B·A‖ (one value per output row) without forming the N×K update.

    ‖W0[n] + s·B[n]·A‖² = ‖W0[n]‖² + 2s·B[n]·(A·W0[n]ᵀ) + s²·B[n]·(A·Aᵀ)·B[n]ᵀ

needs one r×N product P = A·W0ᵀ and the r×r Gram matrix G = A·Aᵀ; ‖W0[n]‖² is cached by the caller (W0 is
frozen). Everything is accumulated in fp32 (fp64 for fp64 inputs); 16-bit weights are upcast a block of rows at a
time, so the temporary is at most ``ROW_BLOCK_BYTES``, never N×K. Weights of at most ``SMALL_DIRECT_ELEMENTS``
elements are formed directly (W0 + s·B·A in the accumulation dtype, ≤ 256 KiB): at that size the five small
products of the expanded form cost more in per-op overhead than the one temporary (measured 0.4 ms vs 0.1 ms per
call at 128×128, r = 16, on a 2-core CPU).

Cancellation: the sum loses relative accuracy when the result is small against its terms, i.e. when
ΔW[n] ≈ −W0[n]. Rows where the norm² falls below ``CANCEL_RATIO`` times the sum of the terms' magnitudes are
recomputed directly as ‖W0[n] + s·B[n]·A‖ in the accumulation dtype (only those rows). On the CPU they are found
with ``nonzero``; on an accelerator, without a host sync, the ``MAX_REPAIR_ROWS`` rows of smallest ratio are
recomputed and a device-side assert fires if more rows than that cancel. On adapters of realistic size
(‖ΔW‖/‖W0‖ of 0.1–10%) no row takes that path; ``tests/test_dora_norm.py`` measures the error of both forms
against float64.

Plain torch ops, so it runs on every device; the result is detached (DoRA treats the norm as a constant).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import LoRAInputError

__all__ = ["dora_weight_norm", "weight_row_sq_norm"]

ROW_BLOCK_BYTES = 8 << 20  # largest upcast temporary of W0 rows
SMALL_DIRECT_ELEMENTS = 1 << 16  # N·K at or below this: form W0 + s·B·A directly
CANCEL_RATIO = 1e-3  # norm² / (|‖W0‖²| + |cross| + |‖ΔW‖²|) below this → direct recomputation of the row
MAX_REPAIR_ROWS = 16  # rows recomputed without a host sync on accelerators
_SYNC_FREE_ON_CPU = False  # tests: take the accelerator's sync-free repair on the CPU


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_blocks(weight: torch.Tensor):
    N, K = weight.shape
    acc = _acc(weight.dtype)
    if weight.dtype == acc:
        yield 0, N, weight
        return
    rows = max(1, ROW_BLOCK_BYTES // max(1, K * torch.finfo(acc).bits // 8))
    for n0 in range(0, N, rows):
        yield n0, min(N, n0 + rows), weight[n0:n0 + rows].to(acc)


def _check(weight, lora_a, lora_b, scale, where):
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise LoRAInputError(f"{where}: weight [N, K], lora_a [r, K] and lora_b [N, r] must be 2-D, got "
                             f"{tuple(weight.shape)}, {tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
    N, K = weight.shape
    r = lora_a.shape[0]
    if lora_a.shape[1] != K or tuple(lora_b.shape) != (N, r):
        raise LoRAInputError(f"{where}: lora_a must be [r, {K}] and lora_b [{N}, r] for weight {tuple(weight.shape)}, "
                             f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if len({weight.device, lora_a.device, lora_b.device}) != 1:
        raise LoRAInputError(f"{where}: weight, lora_a and lora_b must be on one device, got "
                             f"{weight.device}, {lora_a.device}, {lora_b.device}")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not t.is_floating_point():
            raise LoRAInputError(f"{where}: {name} must have a floating dtype, got {t.dtype}")
    s = float(scale)
    if s != s or s in (float("inf"), float("-inf")):
        raise LoRAInputError(f"{where}: scale must be finite, got {scale}")
    return s


@torch.no_grad()
def weight_row_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W0[n]‖² for every row, fp32 (fp64 for fp64 weights), [N]; cache it while W0 is frozen."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise LoRAInputError(f"weight_row_sq_norm: weight must be a 2-D floating tensor, got {tuple(weight.shape)} "
                             f"{weight.dtype}")
    out = torch.empty(weight.shape[0], dtype=_acc(weight.dtype), device=weight.device)
    for n0, n1, w in _row_blocks(weight):
        out[n0:n1] = torch.linalg.vector_norm(w.to(out.dtype), dim=1).square()
    return out


@torch.no_grad()
def dora_weight_norm(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    weight_sq: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """‖W0[n] + scale·B[n]·A‖₂ for each output row n, [N] in fp32 (fp64 for fp64 weights), detached.

    Args: weight W0 [N, K]; lora_a A [r, K]; lora_b B [N, r]; scale s; weight_sq: ``weight_row_sq_norm(W0)``
    if cached. Never allocates an N×K tensor (16-bit weights are upcast ``ROW_BLOCK_BYTES`` at a time)."""
    s = _check(weight, lora_a, lora_b, scale, "dora_weight_norm")
    N = weight.shape[0]
    if weight_sq is not None and tuple(weight_sq.shape) != (N,):
        raise LoRAInputError(f"dora_weight_norm: weight_sq must be [{N}], got {tuple(weight_sq.shape)}")
    return row_norm(weight, lora_a, lora_b, s, weight_sq)


def row_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, s: float,
             weight_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`dora_weight_norm` on inputs already validated (``lora_linear`` checks them first), s a float; the
    caller runs it under ``torch.no_grad()``."""
    N, K = weight.shape
    acc = _acc(weight.dtype)
    a = lora_a.to(acc)
    b = lora_b.to(acc)
    if N * K <= SMALL_DIRECT_ELEMENTS:
        return torch.linalg.vector_norm(torch.addmm(weight.to(acc), b, a, alpha=s), dim=1)
    if weight_sq is None:
        weight_sq = weight_row_sq_norm(weight)
    cross = torch.empty(N, dtype=acc, device=weight.device)  # B[n]·(A·W0[n]ᵀ)
    for n0, n1, w in _row_blocks(weight):
        cross[n0:n1] = (torch.mm(w.to(acc), a.t()) * b[n0:n1]).sum(1)
    gram = torch.mm(a, a.t())
    quad = (torch.mm(b, gram) * b).sum(1)  # B[n]·G·B[n]ᵀ = ‖B[n]·A‖²
    sq = weight_sq.to(acc)
    norm2 = sq + (2.0 * s) * cross + (s * s) * quad
    size = sq.abs() + (2.0 * abs(s)) * cross.abs() + (s * s) * quad
    cancels = norm2 < CANCEL_RATIO * size
    if weight.is_cpu and not _SYNC_FREE_ON_CPU:
        bad = cancels.nonzero().flatten()
        if bad.numel():  # cancellation: recompute these rows directly (a few rows at most on real adapters)
            norm2 = norm2.index_copy(0, bad, _direct_sq(weight, a, b, s, bad))
    else:  # no host sync: recompute the rows of smallest ratio, assert on the device that they cover every one
        idx = torch.topk(norm2 / size.clamp_min(torch.finfo(acc).tiny), min(N, MAX_REPAIR_ROWS), largest=False).indices
        norm2 = norm2.index_copy(0, idx, torch.where(cancels[idx], _direct_sq(weight, a, b, s, idx), norm2[idx]))
        torch._assert_async(cancels.sum() <= MAX_REPAIR_ROWS,
                            "dora_weight_norm: more rows cancel (ΔW[n] ≈ -W0[n]) than MAX_REPAIR_ROWS")
    return norm2.clamp_min(0).sqrt()


def _direct_sq(weight, a, b, s, rows):
    """‖W0[n] + s·B[n]·A‖² for the given rows, formed directly in a's dtype."""
    return torch.addmm(weight.index_select(0, rows).to(a.dtype), b.index_select(0, rows), a, alpha=s).square().sum(1)
