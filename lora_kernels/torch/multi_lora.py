"""``add_lora`` on the torch backend (semantics: :func:`lora_kernels.reference.add_lora_ref`).

Tokens are grouped by adapter (one stable sort and one host read of the per-adapter counts per call), and each
adapter's segment is one pair of GEMMs against that adapter's own ``A[:rank]`` / ``B[:, :rank]``: extra memory is
one segment's ``[n_i, rank_i]`` fp32 product and ``[n_i, N_s]`` update, never a per-token gather of A and B
(``[M, r_max, K]``, which the reference does for clarity). The update is added to y's old value in fp32 and
rounded once, as in the reference. Ids outside ``[0, L)`` leave their rows untouched, as in the kernels.
``groups`` (a LoRABatchMeta's buffers) only accelerates the kernel backends and is not read here.

DoRA (``magnitudes`` [L, N] given): each adapter's rows become ``g·(y + lora) + (1 − g)·bias`` with its own g
row, in the same fp32 expression as the update (one rounding); a rank-0 adapter still rescales its rows.
"""

from __future__ import annotations

import torch

from ..reference import compute_dtype


def add_lora_torch(y, x, lora_a, lora_b, adapter_ids, scales, ranks, groups=None, *, magnitudes=None, bias=None) -> None:
    M = x.shape[0]
    L, r_max = lora_a[0].shape[0], lora_a[0].shape[1]
    if M == 0 or L == 0 or (r_max == 0 and magnitudes is None):
        return
    acc = compute_dtype(y.dtype)
    if magnitudes is not None:
        if magnitudes.dtype == torch.float64:
            acc = torch.float64
        g_all = magnitudes.to(acc)
        gb_all = (1.0 - g_all) * bias.to(acc) if bias is not None else None  # [L, N]: (1 - g)·bias
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
        if n == 0 or (r == 0 and magnitudes is None):
            continue
        xs = x.index_select(0, rows).to(acc) if r > 0 else None
        col = 0
        for a, b in zip(lora_a, lora_b):
            n_s = b.shape[1]
            if r > 0:
                xa = xs @ a[i, :r].to(acc).t()  # [n, r] fp32
                upd = torch.addmm(y[rows, col:col + n_s].to(acc), xa, b[i, :, :r].to(acc).t(), alpha=scale_per[i])
            else:
                upd = y[rows, col:col + n_s].to(acc)
            if magnitudes is not None:  # DoRA: g·(y + lora) + (1 - g)·bias
                upd = upd * g_all[i, col:col + n_s]
                if gb_all is not None:
                    upd += gb_all[i, col:col + n_s]
            y[rows, col:col + n_s] = upd.to(y.dtype)
            col += n_s
