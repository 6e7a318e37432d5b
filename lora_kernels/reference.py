"""Pure-PyTorch reference implementations of every lora_kernels op.

This module is the *specification*: the CPU fallback (``backend="torch"``) and the oracle every
Triton / CUDA kernel is tested against. It imports nothing but torch, runs on any device and dtype,
and each docstring states the op's semantics as executable pseudo-code with shapes.

Notation: x is [M, K] (tokens × in-features), W0 ("weight") is [N, K] (nn.Linear layout), A
("lora_a") is [r, K], B ("lora_b") is [N, r], s ("scale") = alpha / r (or alpha / sqrt(r) for rsLoRA).
``shrink`` is x·Aᵀ (K → r), ``expand`` is += s·xa·Bᵀ (r → N).

Numerics: the low-rank intermediate ``xa`` is always fp32; every product is accumulated in fp32
(or in the input dtype when that is float64) and rounded once to the output dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "dropout_keep_mask",
    "lora_dropout",
    "lora_linear_ref",
    "lora_linear_fwd_ref",
    "lora_linear_bwd_ref",
    "add_lora_ref",
    "merge_ref",
    "merge_delta_ref",
    "compute_dtype",
]

# ----------------------------------------------------------------------------------------------
# Seeded dropout: a counter-based hash, identical in torch, Triton and CUDA, so no mask is stored.
# ----------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
# Dropout keeps an element when the top 24 bits of its hash are >= threshold = round(p * 2^24).
DROPOUT_HASH_BITS = 24


def _mix32(h):
    """lowbias32 integer finaliser on uint32 values held in int64 tensors or Python ints (wrap-around emulated
    by masking)."""
    h = h & _M32
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _M32
    h = h ^ (h >> 16)
    return h


def dropout_seed_hash(seed: int) -> int:
    """``mix32(seed mod 2^32)``, the per-call constant of the dropout hash (kernels take it precomputed)."""
    return _mix32(int(seed) & _M32)


def dropout_threshold(p: float) -> int:
    """Integer threshold on the 24-bit hash: an element is kept iff ``hash24 >= threshold``."""
    return int(round(p * (1 << DROPOUT_HASH_BITS)))


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Keep-mask of seeded LoRA dropout, bool [rows, cols].

    ``keep[m, k] = (mix32(k + mix32(m + mix32(seed))) >> 8) >= round(p · 2^24)`` with uint32
    wrap-around arithmetic, where m is the row of x flattened to [M, K] and k the column.
    The same (seed, m, k) always gives the same bit on every backend and device, so the forward and
    backward passes regenerate the mask instead of storing it. Kept fraction is 1 − p (to 2^-24).
    """
    seed_h = dropout_seed_hash(seed)
    m = torch.arange(rows, dtype=torch.int64, device=device)
    k = torch.arange(cols, dtype=torch.int64, device=device)
    row_h = _mix32(m + seed_h)  # [rows]
    h = _mix32(row_h[:, None] + k[None, :])
    return (h >> (32 - DROPOUT_HASH_BITS)) >= dropout_threshold(p)


def lora_dropout(x2d: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``drop(x) = x · keep / (1 − p)`` for x of shape [M, K]; identity when p == 0."""
    if p == 0.0:
        return x2d
    keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device)
    return x2d * keep.to(x2d.dtype) * (1.0 / (1.0 - p))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# LoRA linear
# ----------------------------------------------------------------------------------------------


def lora_linear_fwd_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of the LoRA linear layer on 2-D input.

    Shapes: x [M, K], weight [N, K], lora_a [r, K], lora_b [N, r], bias [N] or None.
    ::

        xa = drop(x) @ lora_a.T                      # [M, r], fp32 (saved for backward)
        y  = x @ weight.T + bias + scale * xa @ lora_b.T   # [M, N], accumulated in fp32, x.dtype

    Returns ``(y, xa)``.
    """
    acc = compute_dtype(x.dtype)
    xd = lora_dropout(x, dropout_p, seed)
    xa = xd.to(acc) @ lora_a.to(acc).t()
    y = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    y = y + scale * (xa @ lora_b.to(acc).t())
    return y.to(x.dtype), xa.to(acc)


def lora_linear_bwd_ref(
    dy: torch.Tensor,
    x: Optional[torch.Tensor],
    xa: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    output_mask: Sequence[bool] = (True, True, True, False),
) -> Tuple[Optional[torch.Tensor], ...]:
    """Backward of :func:`lora_linear_fwd_ref` on 2-D tensors.

    ``output_mask`` = which of (dx, dA, dB, dW0) to compute; the others are returned as None.
    x is needed only for dA and dW0 (LoRA-FA, a frozen A, saves only xa).
    ::

        dxa = scale * dy @ lora_b                    # [M, r], fp32
        dB  = scale * dy.T @ xa                      # [N, r]
        dA  = dxa.T @ drop(x)                        # [r, K]
        dx  = dy @ weight + drop'(dxa @ lora_a)      # [M, K]; drop'(g) = g · keep / (1 − p)
        dW0 = dy.T @ x                               # [N, K], only when asked

    Every product accumulates in fp32 and is rounded once to the parameter's dtype.
    """
    need_dx, need_da, need_db, need_dw = (bool(v) for v in output_mask)
    acc = compute_dtype(dy.dtype)
    dy_c = dy.to(acc)
    dxa = scale * (dy_c @ lora_b.to(acc))
    dx = da = db = dw = None
    if need_db:
        db = (scale * (dy_c.t() @ xa.to(acc))).to(lora_b.dtype)
    if need_da:
        if x is None:
            raise ValueError("lora_linear backward: dA was requested but x was not saved")
        da = (dxa.t() @ lora_dropout(x, dropout_p, seed).to(acc)).to(lora_a.dtype)
    if need_dx:
        g = dxa @ lora_a.to(acc)
        if dropout_p != 0.0:
            keep = dropout_keep_mask(seed, g.shape[0], g.shape[1], dropout_p, device=g.device)
            g = g * keep.to(acc) * (1.0 / (1.0 - dropout_p))
        dx = (dy_c @ weight.to(acc) + g).to(dy.dtype)
    if need_dw:
        if x is None:
            raise ValueError("lora_linear backward: dW0 was requested but x was not saved")
        dw = (dy_c.t() @ x.to(acc)).to(weight.dtype)
    return dx, da, db, dw


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """``y = x·W0ᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ`` for x of shape [..., K]; y is [..., N].

    Differentiable by plain autograd (used as the gradient oracle)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xd = lora_dropout(x2, dropout_p, seed)
    y = x2 @ weight.t()
    if bias is not None:
        y = y + bias
    y = y + scale * ((xd @ lora_a.t()) @ lora_b.t())
    return y.reshape(*lead, weight.shape[0])


# ----------------------------------------------------------------------------------------------
# Batched multi-adapter LoRA (Punica BGMV/SGMV semantics)
# ----------------------------------------------------------------------------------------------


def add_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    adapter_ids: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor] = None,
    magnitudes: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In-place multi-adapter LoRA over packed output slices (plain LoRA, or DoRA with ``magnitudes``).

    Shapes: x [M, K]; y [M, N_total]; for each slice s: lora_a[s] [L, r_max, K],
    lora_b[s] [L, N_s, r_max], with Σ N_s == N_total and slice s occupying columns
    [off_s, off_s + N_s) of y in order; adapter_ids [M] integer in [-1, L); scales [L];
    ranks [L] integer in [0, r_max] (None = r_max for all).
    ::

        for t in range(M):
            i = adapter_ids[t]
            if i < 0: continue                        # token without adapter: y[t] untouched
            r = ranks[i]
            for s in slices:
                xa = x[t] @ lora_a[s][i, :r].T       # [r], fp32
                y[t, off_s:off_s+N_s] += scales[i] * xa @ lora_b[s][i, :, :r].T

    DoRA serving (``magnitudes`` [L, N_total], the per-adapter factor g = m / ‖W0 + s·B·A‖_row precomputed at
    load time, one value per output column across all packed slices; ``bias`` [N_total] or None = zeros, the base
    layer's bias that y already contains)::

        for t with i = adapter_ids[t] >= 0:
            y[t] = g[i] * (y[t] - bias + lora[t]) + bias        # lora[t]: the update above, all slices; [N_total]

    i.e. PEFT's ``y = g⊙(x·W0ᵀ + s·x·Aᵀ·Bᵀ) + bias`` given the base output. A plain adapter in a DoRA batch has
    g = 1 (kernels compute ``g·(y + lora) + (1 − g)·bias``, which is ``y + lora`` exactly for g = 1).

    The update is accumulated in fp32 (fp64 for fp64 data) together with y's old value and rounded once. Returns y.
    """
    M = x.shape[0]
    if M == 0:
        return y
    acc = compute_dtype(y.dtype)
    if magnitudes is not None:
        acc = torch.float64 if acc == torch.float64 or magnitudes.dtype == torch.float64 else acc
    ids = adapter_ids.to(torch.int64)
    active = ids >= 0
    safe = ids.clamp(min=0)
    r_max = lora_a[0].shape[1]
    if ranks is not None:
        rank_mask = (torch.arange(r_max, device=x.device)[None, :] < ranks.to(x.device)[safe][:, None]).to(acc)
    else:
        rank_mask = torch.ones(M, r_max, dtype=acc, device=x.device)
    s_tok = (scales.to(acc)[safe] * active.to(acc))[:, None]  # [M, 1]
    xc = x.to(acc)
    off = 0
    for a, b in zip(lora_a, lora_b):
        n_s = b.shape[1]
        xa = torch.bmm(a[safe].to(acc), xc[:, :, None])[:, :, 0] * rank_mask  # [M, r_max]
        upd = torch.bmm(b[safe].to(acc), xa[:, :, None])[:, :, 0] * s_tok  # [M, N_s]
        cols = y[:, off : off + n_s]
        val = cols.to(acc) + upd
        if magnitudes is not None:
            g = magnitudes[:, off : off + n_s].to(acc)[safe]  # [M, N_s]
            b_s = bias[off : off + n_s].to(acc) if bias is not None else torch.zeros(n_s, dtype=acc, device=y.device)
            val = g * (val - b_s) + b_s
        new = torch.where(active[:, None], val, cols.to(acc))
        cols.copy_(new.to(y.dtype))
        off += n_s
    return y


# ----------------------------------------------------------------------------------------------
# Merge / unmerge
# ----------------------------------------------------------------------------------------------


def merge_ref(
    weight: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """In-place weighted merge ``W ← round(W + Σᵢ sᵢ·Bᵢ·Aᵢ)``, accumulated in fp32, rounded once.

    Shapes: weight [N, K]; lora_a[i] [rᵢ, K]; lora_b[i] [N, rᵢ]. Unmerge is the same op with
    negated scales. Returns weight.
    """
    delta = merge_delta_ref(weight, lora_a, lora_b, scales)
    weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
    return weight


def merge_delta_ref(
    weight: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """``Δ = Σᵢ sᵢ·(Bᵢ·Aᵢ)``, [N, K] in fp32 (fp64 for an fp64 weight), summed over adapters in order.
    Deterministic for fixed inputs, and ``merge_delta_ref(..., -scales) == -merge_delta_ref(..., scales)``
    bit for bit (negation is exact), which the exact unmerge relies on."""
    acc = compute_dtype(weight.dtype)
    delta = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    for a, b, s in zip(lora_a, lora_b, scales):
        delta += float(s) * (b.to(acc) @ a.to(acc))
    return delta


__all__ += ["dora_merge_ref", "dora_unmerge_ref"]


def dora_merge_ref(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                   factor: torch.Tensor) -> torch.Tensor:
    """In-place DoRA merge (PEFT's ``DoraLinearVariant.merge``): ``W ← round(g ⊙ (W + s·B·A))`` row by row.

    Shapes: weight W0 [N, K]; lora_a [r, K]; lora_b [N, r]; factor g [N] = m / ‖W0 + s·B·A‖_row (computed from the
    UNMERGED W0). Accumulated in fp32 (fp64 for fp64 weight or factor), rounded once. Returns weight::

        W[n, :] = round(g[n] * (W[n, :] + s * B[n, :] @ A))
    """
    acc = torch.float64 if torch.float64 in (weight.dtype, factor.dtype) else compute_dtype(weight.dtype)
    delta = float(scale) * (lora_b.to(acc) @ lora_a.to(acc))
    weight.copy_((factor.to(acc)[:, None] * (weight.to(acc) + delta)).to(weight.dtype))
    return weight


def dora_unmerge_ref(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                     factor: torch.Tensor) -> torch.Tensor:
    """In-place DoRA unmerge (PEFT's ``DoraLinearVariant.unmerge``), the inverse of :func:`dora_merge_ref` up to
    rounding, with the SAME g the merge used (from the unmerged W0; a merged W cannot give it back)::

        W[n, :] = round(W[n, :] / g[n] - s * B[n, :] @ A)
    """
    acc = torch.float64 if torch.float64 in (weight.dtype, factor.dtype) else compute_dtype(weight.dtype)
    delta = float(scale) * (lora_b.to(acc) @ lora_a.to(acc))
    weight.copy_((weight.to(acc) / factor.to(acc)[:, None] - delta).to(weight.dtype))
    return weight


__all__ += ["dora_weight_norm_ref"]


def dora_weight_norm_ref(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """DoRA's row norm, formed directly in float64: ``‖W0 + scale·B·A‖₂`` over each row, [N] fp64.

    weight W0 [N, K], lora_a A [r, K], lora_b B [N, r]. (``lora_kernels.dora.dora_weight_norm`` computes the same
    without forming the N×K sum.)"""
    return (weight.double() + float(scale) * (lora_b.double() @ lora_a.double())).norm(dim=1)


# ----------------------------------------------------------------------------------------------
# DoRA linear (weight-decomposed LoRA), PEFT 0.21's semantics (peft/tuners/lora/dora.py DoraLinearLayer.forward and
# variants.py DoraLinearVariant.forward)
# ----------------------------------------------------------------------------------------------

__all__ += ["dora_scale_ref", "dora_linear_fwd_ref", "dora_linear_bwd_ref", "dora_linear_ref"]


def dora_scale_ref(weight, lora_a, lora_b, scale, magnitude, dtype: Optional[torch.dtype] = None):
    """DoRA's per-output-row factor ``g = m / ‖W0 + s·B·A‖`` and the norm itself, both [N] in
    ``compute_dtype(dtype)`` (dtype: the layer's compute dtype, x's; default the weight's)::

        norm = ‖W0 + s·B·A‖₂ over each row        # [N], float64, detached (a constant for autograd, as in PEFT)
        norm = round(norm, dtype)                   # PEFT forms the norm in x's dtype (weight.to(x.dtype)) and
                                                    # returns it in that dtype: a 16-bit layer rounds it to 16 bits
        g    = m / norm                             # [N]

    Returns ``(g, norm)``."""
    dtype = dtype or weight.dtype
    acc = compute_dtype(dtype)
    norm = dora_weight_norm_ref(weight, lora_a, lora_b, scale).to(dtype).to(acc)
    return magnitude.detach().to(acc) / norm, norm


def dora_linear_fwd_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the DoRA linear layer on 2-D input, exactly PEFT's (``Linear.forward`` + ``DoraLinearVariant`` +
    ``DoraLinearLayer.forward``), the norm treated as a constant.

    Shapes: x [M, K], weight W0 [N, K], lora_a A [r, K], lora_b B [N, r], magnitude m [N], bias [N] or None.
    ::

        g, norm = dora_scale_ref(W0, A, B, s, m, x.dtype)           # [N], [N]
        xd   = drop(x)                               # [M, K]; xd = x when dropout_p == 0 (or in eval)
        xa   = xd @ A.T                              # [M, r], fp32
        ypre = xd @ W0.T + s * xa @ B.T              # [M, N], fp32: the un-scaled DoRA output (dm needs it)
        if dropout_p == 0:                           # PEFT: base_result = result − bias (the base layer's output)
            y = g * ypre + bias                      #   = x·W0ᵀ + b + (g − 1)·(x·W0ᵀ) + g·s·xa·Bᵀ
        else:                                        # PEFT (training with nn.Dropout): x = dropout(x),
            y = x @ W0.T + bias + (g - 1) * (xd @ W0.T) + g * s * xa @ B.T   # base_result=None: W0 applied again
                                                     # to the dropped x; the base layer keeps the un-dropped x

    Everything accumulates in fp32 (fp64 for fp64 x); y is rounded once to x.dtype.
    Returns ``(y, xa, ypre, g, norm)`` (xa, ypre, g, norm in the accumulation dtype).
    """
    acc = compute_dtype(x.dtype)
    g, norm = dora_scale_ref(weight, lora_a, lora_b, scale, magnitude, x.dtype)
    xd = lora_dropout(x, dropout_p, seed).to(acc)
    w = weight.to(acc)
    xa = xd @ lora_a.to(acc).t()
    lora = scale * (xa @ lora_b.to(acc).t())
    base_d = xd @ w.t()
    ypre = base_d + lora
    if dropout_p == 0.0:
        y = g * ypre
    else:
        y = x.to(acc) @ w.t() + (g - 1.0) * base_d + g * lora
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), xa, ypre, g, norm


def dora_linear_bwd_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
    output_mask: Sequence[bool] = (True, True, True, True, False),
) -> Tuple[Optional[torch.Tensor], ...]:
    """Backward of :func:`dora_linear_fwd_ref` (the norm a constant): ``(dx, dA, dB, dm, dW0)``, the ones not in
    ``output_mask`` None. (dbias = Σ_t dy[t], as for any linear layer.)
    ::

        g, norm = dora_scale_ref(W0, A, B, s, m, dy.dtype)
        xd, xa, ypre = (as in the forward)
        dyg = dy * g                                 # [M, N]: the rescale moves onto dy
        dxa = s * dyg @ B                            # [M, r]
        dB  = s * dyg.T @ xa                         # [N, r]
        dA  = dxa.T @ xd                             # [r, K]
        dm  = (dy * ypre).sum(0) / norm              # [N]: ∂y/∂m[n] = ypre[:, n] / norm[n] in both cases
        if dropout_p == 0:
            dx  = dyg @ W0 + dxa @ A                 # [M, K]
            dW0 = dyg.T @ x                          # [N, K], only when asked
        else:                                        # drop'(t) = t · keep / (1 − p)
            dx  = dy @ W0 + drop'((dy * (g - 1)) @ W0 + dxa @ A)
            dW0 = dy.T @ x + (dy * (g - 1)).T @ xd

    Every product accumulates in fp32 (fp64 for fp64 inputs) and is rounded once to the gradient's dtype (dx:
    dy's; dA, dB, dm, dW0: their parameter's).
    """
    need_dx, need_da, need_db, need_dm, need_dw = (bool(v) for v in output_mask)
    acc = compute_dtype(dy.dtype)
    _, xa, ypre, g, norm = dora_linear_fwd_ref(x, weight, lora_a, lora_b, scale, magnitude, None, dropout_p, seed)
    dyc = dy.to(acc)
    w = weight.to(acc)
    xd = lora_dropout(x, dropout_p, seed).to(acc)
    dyg = dyc * g
    dxa = scale * (dyg @ lora_b.to(acc))
    dx = da = db = dm = dw = None
    if need_db:
        db = (scale * (dyg.t() @ xa)).to(lora_b.dtype)
    if need_da:
        da = (dxa.t() @ xd).to(lora_a.dtype)
    if need_dm:
        dm = ((dyc * ypre).sum(0) / norm).to(magnitude.dtype)
    if dropout_p == 0.0:
        if need_dx:
            dx = (dyg @ w + dxa @ lora_a.to(acc)).to(dy.dtype)
        if need_dw:
            dw = (dyg.t() @ x.to(acc)).to(weight.dtype)
    else:
        dyq = dyc * (g - 1.0)
        if need_dx:
            t = dyq @ w + dxa @ lora_a.to(acc)
            keep = dropout_keep_mask(seed, t.shape[0], t.shape[1], dropout_p, device=t.device)
            dx = (dyc @ w + t * keep.to(acc) * (1.0 / (1.0 - dropout_p))).to(dy.dtype)
        if need_dw:
            dw = (dyc.t() @ x.to(acc) + dyq.t() @ xd).to(weight.dtype)
    return dx, da, db, dm, dw


def dora_linear_ref(x, weight, lora_a, lora_b, scale, magnitude, bias=None, dropout_p=0.0, seed=0):
    """The DoRA linear layer for x [..., K] → y [..., N], differentiable by plain autograd (the gradient oracle):
    PEFT's formula term by term, the norm detached (computed from detached A, B, W0 and rounded to x.dtype)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    norm = dora_weight_norm_ref(weight.detach(), lora_a.detach(), lora_b.detach(), scale).to(x.dtype)
    g = magnitude / norm
    lora = ((lora_dropout(x2, dropout_p, seed) @ lora_a.t()) @ lora_b.t()) * scale
    if dropout_p == 0.0:
        base = x2 @ weight.t()
        y = base + (g - 1) * base + g * lora
    else:
        y = x2 @ weight.t() + (g - 1) * (lora_dropout(x2, dropout_p, seed) @ weight.t()) + g * lora
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[0])


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """LoRA scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else float(r))


# ----------------------------------------------------------------------------------------------
# Shrink / expand halves of the multi-adapter op (what vLLM's PunicaWrapper.add_shrink / add_expand /
# add_lora_embedding call; ops/shrink_expand.py)
# ----------------------------------------------------------------------------------------------

__all__ += ["lora_shrink_ref", "lora_expand_ref"]


def lora_shrink_ref(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    adapter_ids: torch.Tensor,
    scale: float = 1.0,
    ranks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token shrink into a new fp32 tensor (fp64 when x or lora_a is fp64).

    Shapes: x [M, K]; lora_a [L, r_max, K]; adapter_ids [M] integer in [-1, L); ranks [L] integer in [0, r_max]
    (None = r_max for all); returns xa [M, r_max].
    ::

        xa = zeros(M, r_max)                          # fp32
        for t in range(M):
            i = adapter_ids[t]
            if i < 0: continue                        # token without adapter: its row stays 0
            r = ranks[i]
            xa[t, :r] = scale * (x[t] @ lora_a[i, :r].T)   # columns r.. stay 0

    Products accumulate in fp32 and are scaled once at the end.
    """
    M, r_max = x.shape[0], lora_a.shape[1]
    acc = torch.float64 if torch.float64 in (x.dtype, lora_a.dtype) else torch.float32
    xa = torch.zeros((M, r_max), dtype=acc, device=x.device)
    if M == 0 or r_max == 0:
        return xa
    ids = adapter_ids.to(torch.int64)
    active = ids >= 0
    safe = ids.clamp(min=0)
    prod = torch.bmm(lora_a[safe].to(acc), x.to(acc)[:, :, None])[:, :, 0] * float(scale)  # [M, r_max]
    if ranks is not None:
        keep = torch.arange(r_max, device=x.device)[None, :] < ranks.to(x.device, torch.int64)[safe][:, None]
    else:
        keep = torch.ones((M, r_max), dtype=torch.bool, device=x.device)
    xa.copy_(torch.where(keep & active[:, None], prod, torch.zeros((), dtype=acc, device=x.device)))
    return xa


def lora_expand_ref(
    y: torch.Tensor,
    xa: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor] = None,
    col_offset: int = 0,
) -> torch.Tensor:
    """Per-token expand, in place on y's columns [col_offset, col_offset + N).

    Shapes: y [M, N_total] with col_offset + N <= N_total; xa [M, r_max] (any float dtype, read as fp32);
    lora_b [L, N, r_max]; adapter_ids [M] integer in [-1, L); scales [L]; ranks [L] in [0, r_max] or None.
    ::

        for t in range(M):
            i = adapter_ids[t]
            if i < 0: continue                        # token without adapter: y[t] untouched
            r = ranks[i]
            y[t, col_offset:col_offset+N] += scales[i] * (xa[t, :r] @ lora_b[i, :, :r].T)

    The update is accumulated in fp32 together with y's old value and rounded once. Returns y.
    """
    M, N, r_max = y.shape[0], lora_b.shape[1], lora_b.shape[2]
    if M == 0 or N == 0:
        return y
    acc = compute_dtype(y.dtype)
    if torch.float64 in (xa.dtype, lora_b.dtype):
        acc = torch.float64
    ids = adapter_ids.to(torch.int64)
    active = ids >= 0
    safe = ids.clamp(min=0)
    xac = xa.to(acc)
    if ranks is not None:
        xac = xac * (torch.arange(r_max, device=y.device)[None, :] < ranks.to(y.device, torch.int64)[safe][:, None]).to(acc)
    upd = torch.bmm(lora_b[safe].to(acc), xac[:, :, None])[:, :, 0] * scales.to(acc)[safe][:, None]  # [M, N]
    cols = y[:, col_offset : col_offset + N]
    cols.copy_(torch.where(active[:, None], cols.to(acc) + upd, cols.to(acc)).to(y.dtype))
    return y


# ----------------------------------------------------------------------------------------------
# LoRA linear on a quantised frozen base (QLoRA): W̃ dequantised by the format's own library
# ----------------------------------------------------------------------------------------------

__all__ += ["quant_dequantize_ref", "quant_lora_linear_fwd_ref", "quant_lora_linear_bwd_ref"]


def quant_dequantize_ref(qw, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W̃ [N, K] in ``dtype`` (default ``qw.dtype``; fp16 / bf16 / fp32) of a :class:`lora_kernels.quant.QuantWeight`,
    rounded once from the fp32 decode, by the format's own library
    (imported here, lazily): ``bitsandbytes.functional.dequantize_4bit`` (NF4 / FP4, nested absmax included, via a
    ``QuantState`` rebuilt from ``qw``), ``bitsandbytes.functional.int8_vectorwise_dequant`` (int8: CB, SCB), and
    torch's float8 conversion for fp8 (``float(q) · scale``, torchao's ``Float8Tensor.dequantize`` convention).
    Our own decoders (``quant.dequantize`` and the Triton kernels) are tested bit for bit against this."""
    N, K = qw.shape
    dtype = dtype or qw.dtype
    if dtype == torch.float64:  # exact: every fp32 value is a float64 value
        return quant_dequantize_ref(qw, torch.float32).to(torch.float64)
    if qw.fmt in ("nf4", "fp4"):
        import bitsandbytes.functional as bnbf

        state2 = None
        offset = None
        if qw.absmax2 is not None:
            state2 = bnbf.QuantState(absmax=qw.absmax2, code=qw.code2, blocksize=256, dtype=torch.float32)
            offset = torch.tensor(qw.offset, dtype=torch.float32, device=qw.absmax.device)
        code = bnbf.get_4bit_type(qw.fmt, device=qw.qdata.device)
        qs = bnbf.QuantState(absmax=qw.absmax, shape=torch.Size([N, K]), code=code, blocksize=qw.blocksize,
                             quant_type=qw.fmt, dtype=dtype, offset=offset, state2=state2)
        return bnbf.dequantize_4bit(qw.qdata.reshape(-1, 1), qs).reshape(N, K)
    if qw.fmt == "int8":
        import bitsandbytes.functional as bnbf

        return bnbf.int8_vectorwise_dequant(qw.qdata, qw.absmax.reshape(-1)).to(dtype)
    scale = qw.absmax.reshape(-1)
    scale = scale if scale.numel() == 1 else scale.reshape(N, 1)
    return (qw.qdata.to(torch.float32) * scale).to(dtype)


def quant_lora_linear_fwd_ref(x, qw, lora_a, lora_b, scale, bias=None, dropout_p=0.0, seed=0):
    """Forward of the LoRA linear layer on a quantised base: :func:`lora_linear_fwd_ref` with
    ``weight = quant_dequantize_ref(qw, x.dtype)`` (W̃ rounded once to x's dtype; x [M, K], qw [N, K], lora_a [r, K], lora_b [N, r]).
    Returns ``(y, xa)``. Adapters of another dtype than x are used as they are (accumulated in fp32 / fp64)."""
    w = quant_dequantize_ref(qw, x.dtype)
    return lora_linear_fwd_ref(x, w, lora_a, lora_b, scale, bias, dropout_p, seed)


def quant_lora_linear_bwd_ref(dy, x, xa, qw, lora_a, lora_b, scale, dropout_p=0.0, seed=0,
                              output_mask=(True, True, True)):
    """Backward of :func:`quant_lora_linear_fwd_ref`: ``(dx, dA, dB)`` per ``output_mask`` (the frozen quantised
    base gets no gradient); ``dx = dy·W̃ + drop'(dxa·A)`` with ``W̃ = quant_dequantize_ref(qw, dy.dtype)``."""
    w = quant_dequantize_ref(qw, dy.dtype)
    dx, da, db, _ = lora_linear_bwd_ref(dy, x, xa, w, lora_a, lora_b, scale, dropout_p, seed,
                                        (*output_mask, False))
    return dx, da, db


# ----------------------------------------------------------------------------------------------
# LoRA on mixture-of-experts expert weights (ops/moe_lora.py): a grouped expert GEMM with the LoRA branch, for
# training (one adapter, forward + backward) and serving (per-token adapter ids over [L, E, ...] slots)
# ----------------------------------------------------------------------------------------------

__all__ += ["moe_lora_linear_ref", "add_moe_lora_ref", "moe_pair_rows"]


def moe_pair_rows(x_rows: int, num_tokens: int, top_k: int, what: str = "x") -> bool:
    """Whether a tensor with ``x_rows`` rows holds one row per (token, slot) pair (``M·k`` rows, pair p = t·k + j)
    rather than one per token (``M`` rows). With k == 1 the two coincide (and so do the semantics)."""
    if x_rows == num_tokens * top_k:
        return True
    if x_rows == num_tokens:
        return False
    raise ValueError(f"{what} has {x_rows} rows; expected M={num_tokens} (token rows) or M·k={num_tokens * top_k} "
                     "(pair rows)")


def moe_lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    scale: float,
    topk_ids: torch.Tensor,
    topk_weights: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    combine: bool = False,
) -> torch.Tensor:
    """Grouped expert linear layer with LoRA on every expert (the training op; differentiable by plain autograd,
    the gradient oracle).

    Shapes: M tokens routed to k experts each (``topk_ids`` [M, k] integer, ``topk_weights`` [M, k] or None = 1);
    pair p = t·k + j is (token t, its j-th expert e = topk_ids[t, j]). x is [M, K] (one row per token: every pair of
    the token reads it, e.g. the gate/up projection) or [M·k, K] (one row per pair, e.g. the down projection after
    the activation). weight [E, N, K] (nn.Linear layout per expert; any strides, so a transposed [E, K, N] storage
    is ``weight.transpose(1, 2)``); bias [E, N] or None; lora_a [E, r, K] (``expand`` one [r, K] over E for an A
    shared by every expert); lora_b [E, N, r]; lora_a = lora_b = None: no LoRA branch (the plain grouped GEMM).
    ::

        out = zeros(M·k, N)
        for t in range(M):
            for j in range(k):
                p = t·k + j;  e = topk_ids[t, j]
                if not 0 <= e < E: continue               # no expert (e.g. masked by expert parallelism): row stays 0
                xr = x[t] if x has M rows else x[p]
                c  = topk_weights[t, j] if topk_weights is not None else 1
                out[p] = c · (xr·W[e]ᵀ + bias[e] + scale·(xr·A[e]ᵀ)·B[e]ᵀ)
        y = out                                           # combine=False: [M·k, N], one row per pair
        y = out.view(M, k, N).sum(1)                      # combine=True:  [M, N], Σ over the token's k experts

    Every product accumulates in fp32 (fp64 for fp64 inputs) and y is rounded once to x's dtype. For the whole
    MoE MLP of a token: ``h = act(moe_lora_linear(x, W_gate_up, ...))`` (pair rows), then
    ``y = moe_lora_linear(h, W_down, ..., topk_weights, combine=True)``.
    """
    M, k = topk_ids.shape
    E, N, K = weight.shape
    pair_rows = moe_pair_rows(x.shape[0], M, k)
    acc = compute_dtype(x.dtype)
    ids = topk_ids.reshape(-1).to(torch.int64)
    valid = (ids >= 0) & (ids < E)
    e = torch.where(valid, ids, torch.zeros_like(ids))
    xr = x if pair_rows else x.repeat_interleave(k, dim=0)  # [P, K]
    xr = xr.to(acc)
    out = torch.bmm(weight.to(acc)[e], xr[:, :, None])[:, :, 0]  # [P, N]
    if bias is not None:
        out = out + bias.to(acc)[e]
    if lora_a is not None:
        xa = torch.bmm(lora_a.to(acc)[e], xr[:, :, None])  # [P, r, 1]
        out = out + scale * torch.bmm(lora_b.to(acc)[e], xa)[:, :, 0]
    if topk_weights is not None:
        out = out * topk_weights.reshape(-1, 1).to(acc)
    out = out * valid[:, None].to(acc)
    if combine:
        out = out.view(M, k, N).sum(1)
    return out.to(x.dtype)


def add_moe_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    topk_ids: torch.Tensor,
    topk_weights: Optional[torch.Tensor],
    adapter_ids: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Serving: the LoRA update of an MoE expert projection for a batch of many adapters, in place on the per-pair
    output (what vLLM's ``add_lora_w13`` / ``add_lora_w2`` add into its intermediate caches).

    Shapes: ``topk_ids`` [M, k]; y [M·k, N_total] (row p = t·k + j, the pair's expert output before the routing sum);
    x [M, K] (token rows) or [M·k, K] (pair rows); for each packed slice s (e.g. gate and up): lora_a[s]
    [L, E, r_max, K], lora_b[s] [L, E, N_s, r_max], Σ N_s = N_total, slice s at columns [off_s, off_s + N_s);
    adapter_ids [M] integer in [-1, L) (one adapter per token, -1 = none); scales [L]; ranks [L] in [0, r_max] or
    None (= r_max); topk_weights [M, k] or None (multiply each pair's update by its routing weight: the down
    projection's ``mul_routed_weight``).
    ::

        for t in range(M):
            i = adapter_ids[t]
            if i < 0: continue                            # token without adapter: its k rows untouched
            for j in range(k):
                p = t·k + j;  e = topk_ids[t, j]
                if not 0 <= e < E: continue               # no expert: row untouched
                xr = x[t] if x has M rows else x[p];  r = ranks[i]
                c  = topk_weights[t, j] if topk_weights is not None else 1
                for s in slices:
                    y[p, off_s:off_s+N_s] += c · scales[i] · (xr·A_s[i, e, :r]ᵀ)·B_s[i, e, :, :r]ᵀ

    The update is accumulated in fp32 with y's old value and rounded once. Returns y.
    """
    M, k = topk_ids.shape
    P = M * k
    if P == 0:
        return y
    L, E, r_max = lora_a[0].shape[0], lora_a[0].shape[1], lora_a[0].shape[2]
    pair_rows = moe_pair_rows(x.shape[0], M, k)
    acc = compute_dtype(y.dtype)
    if any(t.dtype == torch.float64 for t in (x, *lora_a, *lora_b)):
        acc = torch.float64
    ids = adapter_ids.to(torch.int64).repeat_interleave(k)  # [P]
    ex = topk_ids.reshape(-1).to(torch.int64)
    active = (ids >= 0) & (ids < L) & (ex >= 0) & (ex < E)
    ia, ie = ids.clamp(0, max(L - 1, 0)), ex.clamp(0, max(E - 1, 0))
    rank_mask = torch.ones(P, r_max, dtype=acc, device=y.device)
    if ranks is not None:
        rank_mask = (torch.arange(r_max, device=y.device)[None, :] < ranks.to(y.device, torch.int64)[ia][:, None]).to(acc)
    c = scales.to(acc)[ia]
    if topk_weights is not None:
        c = c * topk_weights.reshape(-1).to(acc)
    xr = (x if pair_rows else x.repeat_interleave(k, dim=0)).to(acc)
    off = 0
    for a, b in zip(lora_a, lora_b):
        n_s = b.shape[2]
        xa = torch.bmm(a[ia, ie].to(acc), xr[:, :, None])[:, :, 0] * rank_mask  # [P, r_max]
        upd = torch.bmm(b[ia, ie].to(acc), xa[:, :, None])[:, :, 0] * c[:, None]  # [P, N_s]
        cols = y[:, off:off + n_s]
        cols.copy_(torch.where(active[:, None], cols.to(acc) + upd, cols.to(acc)).to(y.dtype))
        off += n_s
    return y


# ----------------------------------------------------------------------------------------------
# LoRA on an embedding table (ops/embedding.py): A gathered by token id, B expanded
# ----------------------------------------------------------------------------------------------

__all__ += ["lora_embedding_ref", "add_lora_embedding_ref"]


def lora_embedding_ref(
    ids: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    padding_idx: Optional[int] = None,
) -> torch.Tensor:
    """LoRA embedding lookup (PEFT's ``lora.Embedding`` layout), differentiable w.r.t. lora_a / lora_b / weight.

    Shapes: ids [...] integer in [0, V); weight [V, D] (nn.Embedding layout); lora_a [r, V] (PEFT's
    ``lora_embedding_A``); lora_b [D, r] (``lora_embedding_B``). acc = fp64 when any input is fp64, else fp32.
    ::

        xa[m]  = A[:, ids[m]]                              # [M, r]: A's column of the token (a gather, no GEMM)
        y[m]   = W[ids[m]] + scale · xa[m] @ B.T           # [M, D], accumulated in acc, rounded once to W's dtype

    ``padding_idx`` changes only the gradient, as in ``nn.Embedding``: tokens equal to it contribute nothing to
    dA (PEFT embeds with ``F.embedding(ids, A.T, padding_idx)``). Returns y [..., D] in weight's dtype.
    """
    acc = compute_dtype(weight.dtype)
    if torch.float64 in (lora_a.dtype, lora_b.dtype):
        acc = torch.float64
    flat = ids.reshape(-1).to(torch.int64)
    xa = torch.nn.functional.embedding(flat, lora_a.to(acc).t(), padding_idx=padding_idx)
    y = weight[flat].to(acc) + scale * (xa @ lora_b.to(acc).t())  # the batch's rows, not the whole table, upcast
    return y.to(weight.dtype).reshape(*ids.shape, weight.shape[1])


def add_lora_embedding_ref(
    y: torch.Tensor,
    token_ids: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Serving: many adapters' embedding LoRA in one batch, in place on the gathered embedding rows y.

    Shapes: y [M, D] (the base rows ``W[token_ids]``); token_ids [M] integer in [0, V); lora_a [L, r_max, V]
    (stacked ``lora_embedding_A``; a [L, V, r_max] storage is ``.transpose(1, 2)``); lora_b [L, D, r_max];
    adapter_ids [M] in [-1, L); scales [L]; ranks [L] in [0, r_max] or None (all r_max).
    ::

        for t in range(M):
            i = adapter_ids[t]
            if i < 0: continue                                      # token without adapter: y[t] untouched
            r = ranks[i]
            y[t] += scales[i] * (lora_a[i, :r, token_ids[t]] @ lora_b[i, :, :r].T)

    The update is accumulated in fp32 (fp64 when an input is fp64) with y's old value and rounded once. Returns y.
    """
    M, D, r_max = y.shape[0], lora_b.shape[1], lora_b.shape[2]
    if M == 0 or D == 0:
        return y
    acc = compute_dtype(y.dtype)
    if torch.float64 in (lora_a.dtype, lora_b.dtype):
        acc = torch.float64
    ids = adapter_ids.to(torch.int64)
    active = ids >= 0
    safe = ids.clamp(min=0)
    xa = lora_a[safe, :, token_ids.to(torch.int64)].to(acc)  # [M, r_max]: A[i, :, tok] per token (gathered, then cast)
    if ranks is not None:
        xa = xa * (torch.arange(r_max, device=y.device)[None, :] < ranks.to(y.device, torch.int64)[safe][:, None]).to(acc)
    upd = torch.bmm(lora_b[safe].to(acc), xa[:, :, None])[:, :, 0] * scales.to(acc)[safe][:, None]
    y.copy_(torch.where(active[:, None], y.to(acc) + upd, y.to(acc)).to(y.dtype))
    return y
