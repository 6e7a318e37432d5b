"""The MoE LoRA ops on the torch backend (semantics: :func:`lora_kernels.reference.moe_lora_linear_ref` and
:func:`lora_kernels.reference.add_moe_lora_ref`).

The (token, expert) pairs are grouped by expert (serving: by (adapter, expert)) with one stable sort and one host
read of the group counts per call; each non-empty group is a few dense GEMMs on its own rows against its own
``W[e]`` / ``A[e]`` / ``B[e]``, so an expert without tokens costs nothing and no per-pair copy of any weight is
made (the reference gathers ``W[e]`` per pair, [M·k, N, K], for clarity). The LoRA branch stays factored:
``(x·Aᵀ)·Bᵀ``, never ``W + s·B·A``. Products accumulate in fp32 (fp64 for fp64 inputs) and each output is
rounded once; ``groups`` (a MoERouting's buffers) only accelerates the kernel backends and is not read here.
"""

from __future__ import annotations

import torch

from ..reference import compute_dtype


def _segments(key: torch.Tensor, G: int):
    """Stable order of the pairs by ``key`` (values in [0, G], G = skipped) and the (group, rows) of every non-empty
    group < G, with one host read."""
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=G + 1).tolist()  # the one host read of the call
    out, start = [], 0
    for g in range(G):
        n = counts[g]
        if n:
            out.append((g, order[start:start + n]))
        start += n
    return out


def moe_lora_fwd_torch(x, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights, combine, groups=None):
    M, k = topk_ids.shape
    E, N, K = weight.shape
    P = M * k
    acc = compute_dtype(x.dtype)
    pair_rows = x.shape[0] == P
    r = 0 if lora_a is None else lora_a.shape[1]
    ids = topk_ids.reshape(-1).to(torch.int64)
    key = torch.where((ids >= 0) & (ids < E), ids, torch.full_like(ids, E))
    out = torch.zeros((M if combine else P, N), dtype=acc, device=x.device)
    xa = torch.zeros((P, r), dtype=acc, device=x.device)
    tw = None if topk_weights is None else topk_weights.reshape(-1).to(acc)
    for e, rows in _segments(key, E):
        xs = x.index_select(0, rows if pair_rows else rows // k).to(acc)
        o = xs @ weight[e].to(acc).t()
        if bias is not None:
            o += bias[e].to(acc)
        if r:
            xa_s = xs @ lora_a[e].to(acc).t()
            xa[rows] = xa_s
            o = torch.addmm(o, xa_s, lora_b[e].to(acc).t(), alpha=scale)
        if tw is not None:
            o *= tw[rows, None]
        if combine:
            out.index_add_(0, rows // k, o)
        else:
            out[rows] = o
    return out.to(x.dtype), xa


def moe_lora_bwd_torch(dy, x, xa, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights, combine, output_mask,
                       groups=None):
    need_dx, need_da, need_db, need_dw = (bool(v) for v in output_mask)
    M, k = topk_ids.shape
    E, N, K = weight.shape
    P = M * k
    acc = compute_dtype(dy.dtype)
    pair_rows = x.shape[0] == P
    lora = lora_a is not None
    need_da, need_db = need_da and lora, need_db and lora
    ids = topk_ids.reshape(-1).to(torch.int64)
    key = torch.where((ids >= 0) & (ids < E), ids, torch.full_like(ids, E))
    dev = dy.device
    dx = torch.zeros((x.shape[0], K), dtype=acc, device=dev) if need_dx else None
    da = torch.zeros(lora_a.shape, dtype=acc, device=dev) if need_da else None
    db = torch.zeros(lora_b.shape, dtype=acc, device=dev) if need_db else None
    dw = torch.zeros((P,), dtype=acc, device=dev) if need_dw else None
    tw = None if topk_weights is None else topk_weights.reshape(-1).to(acc)
    for e, rows in _segments(key, E):
        dys = dy.index_select(0, rows // k if combine else rows).to(acc)  # [n, N]
        c = None if tw is None else tw[rows, None]
        xs = x.index_select(0, rows if pair_rows else rows // k).to(acc) if (need_da or need_dw) else None
        g = None
        if need_dx or need_dw:
            g = dys @ weight[e].to(acc)  # [n, K], the gradient of the unweighted pair output
        if lora:
            dxa_u = (dys @ lora_b[e].to(acc)) * scale  # [n, r]
            if g is not None:
                g = torch.addmm(g, dxa_u, lora_a[e].to(acc))
            if need_da:
                da[e] += (dxa_u if c is None else dxa_u * c).t() @ xs
            if need_db:
                db[e] += ((dys if c is None else dys * c).t() @ xa[rows].to(acc)) * scale
        if need_dw:
            d = (g * xs).sum(1)
            if bias is not None:
                d += dys @ bias[e].to(acc)
            dw[rows] = d
        if need_dx:
            gx = g if c is None else g * c
            if pair_rows:
                dx[rows] = gx
            else:
                dx.index_add_(0, rows // k, gx)
    return (
        dx.to(x.dtype) if need_dx else None,
        da.to(lora_a.dtype) if need_da else None,
        db.to(lora_b.dtype) if need_db else None,
        dw.view(M, k).to(topk_weights.dtype) if need_dw else None,
    )


def add_moe_lora_torch(y, x, lora_a, lora_b, topk_ids, topk_weights, adapter_ids, scales, ranks, groups=None) -> None:
    M, k = topk_ids.shape
    L, E, r_max = lora_a[0].shape[0], lora_a[0].shape[1], lora_a[0].shape[2]
    P = M * k
    if P == 0 or L == 0 or r_max == 0:
        return
    acc = compute_dtype(y.dtype)
    pair_rows = x.shape[0] == P
    ex = topk_ids.reshape(-1).to(torch.int64)
    ad = adapter_ids.to(torch.int64).repeat_interleave(k)
    ok = (ex >= 0) & (ex < E) & (ad >= 0) & (ad < L)
    G = L * E
    key = torch.where(ok, ad * E + ex, torch.full_like(ex, G))
    segs = _segments(key, G)
    if not segs:
        return
    host = (ranks.to(torch.int64).tolist() if ranks is not None else [r_max] * L), scales.to(torch.float64).tolist()
    rank_per, scale_per = host
    tw = None if topk_weights is None else topk_weights.reshape(-1).to(acc)
    for g, rows in segs:
        i, e = divmod(g, E)
        r = min(max(rank_per[i], 0), r_max)
        if r == 0:
            continue
        xs = x.index_select(0, rows if pair_rows else rows // k).to(acc)
        c = None if tw is None else tw[rows, None]
        col = 0
        for a, b in zip(lora_a, lora_b):
            n_s = b.shape[2]
            xa = xs @ a[i, e, :r].to(acc).t()
            if c is not None:
                xa = xa * c
            upd = torch.addmm(y[rows, col:col + n_s].to(acc), xa, b[i, e, :, :r].to(acc).t(), alpha=scale_per[i])
            y[rows, col:col + n_s] = upd.to(y.dtype)
            col += n_s
