"""The LoRA embedding family on the torch backend (semantics: ``reference.lora_embedding_ref`` /
``reference.add_lora_embedding_ref``; contract in ``lora_kernels/ops/embedding.py``).

W [V, D], A [r, V], B [D, r], ids [M], acc = fp64 for fp64 inputs, else fp32::

    forward   xa = A[:, ids]ᵀ                      a column gather of A ([M, r], index_select on the [V, r] view Aᵀ:
                                                   no one-hot, no GEMM against the vocabulary)
              y  = W[ids] + s·xa·Bᵀ                the gathered base rows upcast to acc, one addmm, rounded once
    backward  dxa = s·dy·B                          acc [M, r]; rows of padding tokens zeroed
              dA  = scatter-add of dxaᵀ over ids   index_add_ along V into an acc [r, V] buffer (÷ counts with
                                                   scale_grad_by_freq)
              dB  = s·dyᵀ·xa                        acc, xa gathered again (r values per token: cheaper than saving it)

Only r-wide and M×D temporaries are made; W is read through index_select (the rows of the batch), never copied
whole. The serving op groups the tokens by adapter (one stable sort and one host read of the counts on the CPU,
as ``torch/shrink_expand.py``); elsewhere it runs the reference's gathered batched product.
"""

from __future__ import annotations

import torch

from .. import reference as ref
from .shrink_expand import _rank_list, _segments


def _acc(*dtypes) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _gather_a(lora_a: torch.Tensor, ids: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """xa = A[:, ids]ᵀ [M, r] in acc."""
    return lora_a.t().index_select(0, ids).to(acc)


def lora_embedding_fwd_torch(ids, weight, lora_a, lora_b, scale):
    acc = _acc(weight.dtype, lora_a.dtype)
    ids = ids.to(torch.int64)
    xa = _gather_a(lora_a, ids, acc)
    y = weight.index_select(0, ids)
    if y.dtype != acc:
        y = y.to(acc)
    y.addmm_(xa, lora_b.to(acc).t(), alpha=float(scale))
    return y if y.dtype == weight.dtype else y.to(weight.dtype)


def _inverse_counts(ids: torch.Tensor, V: int, acc: torch.dtype) -> torch.Tensor:
    counts = torch.bincount(ids, minlength=V).to(acc)
    return torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))


def lora_embedding_bwd_torch(dy, ids, lora_a, lora_b, scale, padding_idx, scale_grad_by_freq, need_da, need_db):
    acc = _acc(dy.dtype, lora_a.dtype)
    ids = ids.to(torch.int64)
    V = lora_a.shape[1]
    dy_acc = dy.to(acc)
    da = db = None
    if need_da:
        dxa = dy_acc @ lora_b.to(acc)  # [M, r]
        dxa.mul_(float(scale))
        if padding_idx >= 0:
            dxa.masked_fill_((ids == padding_idx)[:, None], 0.0)
        da = torch.zeros(lora_a.shape, dtype=acc, device=dy.device)  # [r, V]
        da.index_add_(1, ids, dxa.t())
        if scale_grad_by_freq:
            da.mul_(_inverse_counts(ids, V, acc)[None, :])
        da = da.to(lora_a.dtype)
    if need_db:
        xa = _gather_a(lora_a, ids, acc)
        db = (dy_acc.t() @ xa).mul_(float(scale)).to(lora_b.dtype)
    return da, db


def add_lora_embedding_torch(y, token_ids, lora_a, lora_b, adapter_ids, scales, ranks):
    if y.device.type != "cpu":
        ref.add_lora_embedding_ref(y, token_ids, lora_a, lora_b, adapter_ids, scales, ranks)
        return
    L, D, r_max = lora_b.shape
    acc = _acc(y.dtype, lora_a.dtype, lora_b.dtype)
    order, spans = _segments(adapter_ids, L)
    rk = _rank_list(ranks, L, r_max)
    svals = scales.to(acc)
    tok = token_ids.to(torch.int64)
    for i, s, e in spans:
        r = rk[i]
        if r == 0:
            continue
        rows = order[s:e]
        xa = lora_a[i, :r].t().index_select(0, tok.index_select(0, rows)).to(acc)  # [n, r]: A[i, :r, tok]ᵀ
        upd = (xa @ lora_b[i, :, :r].to(acc).t()) * svals[i]
        y.index_copy_(0, rows, (y.index_select(0, rows).to(acc) + upd).to(y.dtype))
