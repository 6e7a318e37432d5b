"""The DoRA linear layer on the torch backend: lora_linear's torch launchers plus an O(N) rescale, no N×K tensor.

Semantics are :func:`lora_kernels.reference.dora_linear_fwd_ref` / :func:`~lora_kernels.reference.dora_linear_bwd_ref`
(x [M, K], W0 [N, K], A [r, K], B [N, r], s = scale, g = m / ‖W0 + s·B·A‖ [N] given by the caller, acc = fp64 for
fp64 inputs, else fp32)::

    no dropout  forward   ypre, xa = lora_linear_fwd_torch(x, W0, A, B, s)     (x·W0ᵀ + s·xa·Bᵀ, x's dtype)
                          y = g⊙ypre + bias                                     (in acc, rounded to x's dtype)
                backward  dx, dA, dB = lora_linear_bwd_torch(dy⊙g, ...)        (the rescale moves onto dy)
                          dm = Σ_t dy⊙ypre / norm                                (acc, row blocks)
    dropout     forward   xk = x∘keep (exact), xa = (xk·Aᵀ)/(1−p), zd = (xk·W0ᵀ)/(1−p)
                          y = x·W0ᵀ + bias + (g−1)⊙zd + g⊙s·xa·Bᵀ,  ypre = zd + s·xa·Bᵀ   (PEFT's two base GEMMs)
                backward  dx = dy·W0 + keep∘((dy⊙(g−1))·W0 + (s·(dy⊙g)·B)·A)/(1−p);  dA, dB, dm as above

The base GEMMs run in x's dtype on W0 in place (no copy of the weight, no N×K temporary). ``dy⊙g`` is formed in acc
and rounded to dy's dtype once (16-bit: one extra rounding of dy, as the Triton backend's tensor-core operand
has); ``ypre`` is kept in x's dtype only when the caller asks (``save_pre``: the magnitude trains). The dropout
keep-mask is lora_linear's (``lora_dropout_keep_torch``, bit for bit the reference's hash), passed in by the
autograd function when it saved it, else hashed here.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .lora_linear import (_acc, _block_rows, _mm_dy_w, _zero, keep_mask_rows, lora_linear_bwd_torch,
                          lora_linear_fwd_torch)

__all__ = ["dora_linear_fwd_torch", "dora_linear_bwd_torch", "dora_dropout_fwd_torch", "dora_dropout_bwd_torch"]

_linear = torch.nn.functional.linear


def _rescale_into(out: torch.Tensor, src: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``out = g⊙src + bias`` per column, computed in g's dtype (acc) and rounded once to out's dtype; row blocks on
    the CPU for 16-bit inputs (the acc temporary stays cache-sized). out may be src (in place)."""
    M, N = src.shape
    acc = g.dtype
    b = None if bias is None else (bias if bias.dtype == acc else bias.to(acc))
    if src.dtype == acc:
        if out is src:
            src.mul_(g)
            return src.add_(b) if b is not None else src
        return torch.addcmul(b, src, g, out=out) if b is not None else torch.mul(src, g, out=out)
    br = _block_rows(M, N, src.device)
    for r0 in range(0, M, br):
        r1 = min(M, r0 + br)
        t = src[r0:r1].to(acc).mul_(g)
        if b is not None:
            t.add_(b)
        out[r0:r1].copy_(t)
    return out


def _col_dot(dy: torch.Tensor, ypre: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``Σ_t dy[t, n]·ypre[t, n]`` for every column n, [N] in acc (row blocks: no M×N acc temporary on the CPU)."""
    M, N = dy.shape
    br = _block_rows(M, N, dy.device)
    if dy.dtype == acc and ypre.dtype == acc and br >= M:  # one block in acc already: one op
        return torch.linalg.vecdot(dy, ypre, dim=0)
    out = torch.zeros(N, dtype=acc, device=dy.device)
    for r0 in range(0, M, br):
        r1 = min(M, r0 + br)
        d, p = dy[r0:r1], ypre[r0:r1]
        if d.dtype == acc:
            out += torch.mul(d, p).sum(0)
        else:
            out += d.to(acc).mul_(p.to(acc)).sum(0)
    return out


def _scaled_dy(dy: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``dy⊙g`` (g per column) in dy's dtype, formed in acc and rounded once."""
    if dy.dtype == g.dtype:
        return torch.mul(dy, g)
    out = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
    return _rescale_into(out, dy, g, None)


def dora_linear_fwd_torch(x, weight, lora_a, lora_b, scale, bias, g, save_pre):
    """dora_linear_fwd without dropout on 2-D x [M, K]: (y [M, N] x.dtype, xa [M, r] acc, ypre [M, N] x.dtype or an
    empty [0] tensor)."""
    ypre, xa = lora_linear_fwd_torch(x, weight, lora_a, lora_b, scale, None, 0.0, 0)
    if save_pre:
        y = _rescale_into(torch.empty_like(ypre), ypre, g, bias)
        return y, xa, ypre
    return _rescale_into(ypre, ypre, g, bias), xa, x.new_empty(0)


def dora_linear_bwd_torch(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm,
                          output_mask: Sequence[bool] = (True, True, True, True, False)):
    """dora_linear_bwd without dropout: (dx, dA, dB, dm, dW0), None for a gradient not in ``output_mask``."""
    need_dx, need_da, need_db, need_dm, need_dw = (bool(v) for v in output_mask)
    dm = None
    if need_dm:
        if ypre is None or ypre.numel() != dy.numel():
            raise ValueError("dora_linear backward: dm was requested but ypre was not saved")
        dm = _col_dot(dy, ypre, g.dtype).div_(norm)
    dx = da = db = dw = None
    if need_dx or need_da or need_db or need_dw:
        dyg = _scaled_dy(dy, g)
        dx, da, db, dw = lora_linear_bwd_torch(dyg, x, xa, weight, lora_a, lora_b, scale, 0.0, 0,
                                               (need_dx, need_da, need_db, need_dw))
    return dx, da, db, dm, dw


def _keep(x: torch.Tensor, p: float, seed: int, keep: Optional[torch.Tensor]) -> torch.Tensor:
    if keep is not None:
        return keep
    return keep_mask_rows(int(seed), 0, x.shape[0], x.shape[1], float(p), x.device)


def dora_dropout_fwd_torch(x, weight, lora_a, lora_b, scale, bias, g, dropout_p, seed, save_pre, keep=None):
    """dora_linear_fwd with dropout (PEFT's training path): (y, xa, ypre or an empty tensor). Whole-tensor ops:
    acc temporaries of M×N (activation-sized), never N×K."""
    acc = _acc(x.dtype)
    p = float(dropout_p)
    inv = 1.0 / (1.0 - p)
    keep = _keep(x, p, seed, keep)
    a = lora_a if lora_a.dtype == acc else lora_a.to(acc)
    b = lora_b if lora_b.dtype == acc else lora_b.to(acc)
    xk = torch.mul(x, keep)  # drop(x)·(1 − p), exact in x's dtype
    if x.dtype == acc:
        # fp32/fp64: y = x·W0ᵀ − zd + g⊙(zd + s·xa·Bᵀ) + bias = (x − drop(x))·W0ᵀ + g⊙ypre + bias, zd = drop(x)·W0ᵀ:
        # eight ops in place of fifteen (at small shapes each op's fixed cost is most of the layer's time)
        xd = xk.mul_(inv)  # drop(x)
        xa = _linear(xd, a)
        ypre = _linear(xd, weight).addmm_(xa, b.t(), alpha=scale)
        y = _linear(torch.sub(x, xd), weight, bias).addcmul_(ypre, g)
        return y, xa, (ypre if save_pre else x.new_empty(0))
    xa = _linear(xk.to(acc), a).mul_(inv)
    zd = _linear(xk, weight).to(acc).mul_(inv)  # drop(x)·W0ᵀ
    lora = torch.mm(xa, b.t()).mul_(scale)  # s·xa·Bᵀ
    y = _linear(x, weight, bias).to(acc)  # x·W0ᵀ + bias: the base layer on the un-dropped x
    y.add_(zd * (g - 1.0)).add_(lora.mul(g))
    ypre = zd.add_(lora).to(x.dtype) if save_pre else x.new_empty(0)
    return y.to(x.dtype), xa, ypre


def dora_dropout_bwd_torch(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm, dropout_p, seed,
                           output_mask: Sequence[bool] = (True, True, True, True, False), keep=None):
    """dora_linear_bwd with dropout: (dx, dA, dB, dm, dW0), None for a gradient not in ``output_mask``."""
    need_dx, need_da, need_db, need_dm, need_dw = (bool(v) for v in output_mask)
    if (need_da or need_dw) and x is None:
        raise ValueError("dora_linear backward: dA or dW0 was requested but x was not saved")
    acc = _acc(dy.dtype)
    p = float(dropout_p)
    inv = 1.0 / (1.0 - p)
    dx = da = db = dm = dw = None
    if need_dm:
        if ypre is None or ypre.numel() != dy.numel():
            raise ValueError("dora_linear backward: dm was requested but ypre was not saved")
        dm = _col_dot(dy, ypre, acc).div_(norm)
    M, K = dy.shape[0], weight.shape[1]
    kp = None
    if (need_dx or need_da or need_dw) and M > 0:
        kp = _keep(x if x is not None else dy.new_empty((M, K)), p, seed, keep)
    a = lora_a if lora_a.dtype == acc else lora_a.to(acc)
    b = lora_b if lora_b.dtype == acc else lora_b.to(acc)
    if dy.dtype == acc and not need_dw:
        # fp32/fp64: the same products with fewer ops (scales folded into the GEMMs, (g−1)⊙dy formed in place)
        zero = _zero(acc, dy.device)
        dyg = dy * g
        dxa = torch.addmm(zero, dyg, b, beta=0, alpha=scale)  # s·(dy⊙g)·B
        if need_db:
            db = torch.addmm(zero, dyg.t(), xa, beta=0, alpha=scale)
        if need_da:
            da = torch.addmm(zero, dxa.t(), torch.mul(x, kp) if M > 0 else x, beta=0, alpha=inv)
        if need_dx:
            t = torch.mm(dyg.sub_(dy), weight).addmm_(dxa, a)  # (dy⊙(g−1))·W0 + s·(dy⊙g)·B·A
            if M > 0:
                t.mul_(kp)
            dx = t.addmm_(dy, weight, beta=inv)  # dy·W0 + keep∘t/(1−p)
        return dx, da, db, dm, dw
    dyc = dy if dy.dtype == acc else dy.to(acc)
    dyg = dyc * g
    dxa = torch.mm(dyg, b).mul_(scale)  # s·(dy⊙g)·B
    if need_db:
        db = torch.mm(dyg.t(), xa.to(acc)).mul_(scale).to(lora_b.dtype)
    if need_da:
        xk = torch.mul(x, kp) if M > 0 else x
        da = torch.mm(dxa.t(), xk.to(acc)).mul_(inv).to(lora_a.dtype)
    dyq = dyc * (g - 1.0)
    if need_dx:
        t = torch.mm(dyq.to(dy.dtype), weight).to(acc)  # (dy⊙(g−1))·W0, a base GEMM in dy's dtype
        t.addmm_(dxa, a).mul_(inv)
        if M > 0:
            t.mul_(kp)
        dx = t.add_(_mm_dy_w(dy, weight)).to(dy.dtype)
    if need_dw:
        xk = torch.mul(x, kp).to(acc).mul_(inv) if M > 0 else x.to(acc)
        dw = (torch.mm(dyc.t(), x.to(acc)) + torch.mm(dyq.t(), xk)).to(weight.dtype)
    return dx, da, db, dm, dw
