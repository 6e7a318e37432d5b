"""``add_lora`` on the torch backend (semantics: :func:`lora_kernels.reference.add_lora_ref`).

Tokens are grouped by adapter (one stable sort and one host read of the per-adapter counts per call), and each
adapter's segment is one pair of GEMMs against that adapter's own ``A[:rank]`` / ``B[:, :rank]``: extra memory is
one segment's ``[n_i, rank_i]`` fp32 product and ``[n_i, N_s]`` update, never a per-token gather of A and B
(``[M, r_max, K]``, which the reference does for clarity). The update is added to y's old value in fp32 and
rounded once, as in the reference. Ids outside ``[0, L)`` leave their rows untouched, as in the kernels.
``groups`` (a LoRABatchMeta's buffers) only accelerates the kernel backends and is not read here.
"""

from __future__ import annotations

import torch

from ..reference import compute_dtype


def add_lora_torch(y, x, lora_a, lora_b, adapter_ids, scales, ranks, groups=None) -> None:
    M = x.shape[0]
    L, r_max = lora_a[0].shape[0], lora_a[0].shape[1]
    if M == 0 or L == 0 or r_max == 0:
        return
    acc = compute_dtype(y.dtype)
    ids = adapter_ids.to(torch.int64)
    key = torch.where((ids >= 0) & (ids < L), ids, torch.full_like(ids, L))  # no adapter -> group L, skipped
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=L + 1)
    host = torch.cat([counts[:L], ranks.to(torch.int64) if ranks is not None else counts.new_full((L,), r_max)])
    host = host.tolist()  # the one host read of the call
    n_per, rank_per = host[:L], host[L:]
    scale_per = scales.to(torch.float64).tolist()
    start = 0
    for i in range(L):
        n, r = n_per[i], min(max(rank_per[i], 0), r_max)
        rows = order[start:start + n]
        start += n
        if n == 0 or r == 0:
            continue
        xs = x.index_select(0, rows).to(acc)
        col = 0
        for a, b in zip(lora_a, lora_b):
            n_s = b.shape[1]
            xa = xs @ a[i, :r].to(acc).t()  # [n, r] fp32
            upd = torch.addmm(y[rows, col:col + n_s].to(acc), xa, b[i, :, :r].to(acc).t(), alpha=scale_per[i])
            y[rows, col:col + n_s] = upd.to(y.dtype)
            col += n_s
