"""``lora_shrink`` / ``lora_expand_`` on the torch backend (semantics: ``reference.lora_shrink_ref`` /
``reference.lora_expand_ref``).

On the CPU the tokens are grouped by adapter (one stable sort and one host read of the per-adapter counts,
free on the CPU) and each adapter's tokens go through one matmul up to that adapter's own rank, so the work is
Σ tokens·rank·K rather than a gathered [M, r_max, K] copy of the weights. Elsewhere (a CUDA tensor on the torch
backend, where a host read would sync and break graph capture) the reference's gathered batched matmul runs.
"""

from __future__ import annotations

import torch

from .. import reference as ref
from ..ops.shrink_expand import shrink_out_dtype


def _segments(adapter_ids: torch.Tensor, L: int):
    """(order, [(adapter, start, end)]): token indices sorted by adapter, and each adapter's span in that order
    (tokens without an adapter are left out)."""
    ids = adapter_ids.to(torch.int64)
    key = torch.where((ids >= 0) & (ids < L), ids, torch.full_like(ids, L))
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=L + 1).tolist()
    spans, start = [], 0
    for i in range(L):
        if counts[i]:
            spans.append((i, start, start + counts[i]))
        start += counts[i]
    return order, spans


def _rank_list(ranks, L: int, r_max: int):
    return [r_max] * L if ranks is None else [min(max(int(r), 0), r_max) for r in ranks.tolist()]


def lora_shrink_torch(x, lora_a, adapter_ids, scale, ranks):
    if x.device.type != "cpu":
        return ref.lora_shrink_ref(x, lora_a, adapter_ids, scale, ranks).to(shrink_out_dtype(x.dtype, lora_a.dtype))
    M, r_max = x.shape[0], lora_a.shape[1]
    L = lora_a.shape[0]
    acc = shrink_out_dtype(x.dtype, lora_a.dtype)
    xa = torch.zeros((M, r_max), dtype=acc, device=x.device)
    order, spans = _segments(adapter_ids, L)
    rk = _rank_list(ranks, L, r_max)
    for i, s, e in spans:
        r = rk[i]
        if r == 0:
            continue
        rows = order[s:e]
        part = x.index_select(0, rows).to(acc) @ lora_a[i, :r].to(acc).t()
        if scale != 1.0:
            part.mul_(scale)
        xa[rows, :r] = part
    return xa


def lora_expand_torch(y, xa, lora_b, adapter_ids, scales, ranks, col_offset):
    if y.device.type != "cpu":
        ref.lora_expand_ref(y, xa, lora_b, adapter_ids, scales, ranks, col_offset)
        return
    L, N, r_max = lora_b.shape
    acc = ref.compute_dtype(y.dtype)
    if torch.float64 in (xa.dtype, lora_b.dtype):
        acc = torch.float64
    order, spans = _segments(adapter_ids, L)
    rk = _rank_list(ranks, L, r_max)
    svals = scales.to(acc)
    cols = y[:, col_offset : col_offset + N]
    for i, s, e in spans:
        r = rk[i]
        if r == 0:
            continue
        rows = order[s:e]
        upd = (xa.index_select(0, rows)[:, :r].to(acc) @ lora_b[i, :, :r].to(acc).t()) * svals[i]
        cols.index_copy_(0, rows, (cols.index_select(0, rows).to(acc) + upd).to(y.dtype))
