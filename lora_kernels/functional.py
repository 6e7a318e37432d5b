"""Functional API and the thin autograd.Function over the registered ops.

Validation (each op family's ``check_*`` in ``ops/<family>.py``) and backend choice
(``_backend.resolve_backend``) happen here, before any kernel runs; kernels are reached only through
``torch.ops.lora_kernels.*``.
"""

from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Union

import torch

from ._backend import resolve_backend
from ._checks import LoRAInputError
from .ops import lora_linear as _lora_linear_op
from .ops import dora as _dora_op
from .ops.lora_linear import check_lora_linear
from .ops.merge import check_merge
from .ops.multi_lora import check_add_lora

__all__ = ["LoRALinearFunction", "lora_linear", "add_lora", "merge_", "unmerge_"]  # re-exported by lora_kernels

_ops = torch.ops.lora_kernels

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def _draw_seed():
    """A fresh dropout seed from torch's default CPU generator (so torch.manual_seed reproduces it).

    Eager: a Python int. Under torch.compile: the one-element CPU tensor itself, which the op reads at run time,
    so drawing it neither breaks the graph nor specialises on its value."""
    t = torch.randint(0, 2**31 - 1, (1,))
    return t if torch.compiler.is_compiling() else int(t)


def _check_seed(seed) -> int:
    try:
        return operator.index(seed) & 0x7FFFFFFFFFFFFFFF
    except TypeError:
        raise LoRAInputError(f"lora_kernels.lora_linear: seed must be an int or None, got {seed!r}") from None


def _resolve_seed(seed, dropout_p: float) -> int:
    """The dropout seed an op gets: the caller's (checked), a fresh draw when dropout is on, else 0 (unused)."""
    if seed is not None:
        return _check_seed(seed)
    return _draw_seed() if dropout_p > 0.0 else 0


class LoRALinearFunction(torch.autograd.Function):
    """``y = x·W0ᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ`` with a fused backward.

    Saves x (when dA or dW0 is needed; the caller's tensor itself, not a reshaped copy) and the r-wide fp32 ``xa``.
    The dropout mask is not stored by the kernel backends (they regenerate it from the seed on chip); on the torch
    backend, where hashing it costs real time, it is hashed once in the forward and saved as M×K bytes of uint8
    (less than PEFT keeps: a bool mask plus the dropped x). With a frozen A (LoRA-FA) and frozen W0, x is not saved.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, backend):
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        seed_t = None
        if isinstance(seed, torch.Tensor):  # drawn inside a torch.compile graph: the op reads it at run time
            seed, seed_t = 0, seed
        need = ctx.needs_input_grad
        keep = None
        if dropout_p > 0.0 and backend == "torch" and (need[0] or need[2]) and x2.shape[0] > 0:
            keep = _lora_linear_op.call_dropout_keep(x2, dropout_p, seed, seed_t)
        y2, xa = _lora_linear_op.call_fwd(x2, weight, lora_a, lora_b, scale, bias, dropout_p, seed, backend, seed_t,
                                          keep)
        ctx.save_for_backward(x if (need[1] or need[2]) else None, xa, weight, lora_a, lora_b, seed_t, keep)
        ctx.cfg = (scale, dropout_p, seed, backend)
        if x.dim() == 2:
            return y2
        # Not a view of y2 in autograd's eyes (as nn.Linear's output is not): in-place ops on the result
        # (y += 1, ReLU(inplace=True)) then work, and FSDP2 sees no view output.
        return _unsafe_view(y2, (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx, dy):
        x, xa, weight, lora_a, lora_b, seed_t, keep = ctx.saved_tensors
        scale, dropout_p, seed, backend = ctx.cfg
        need = ctx.needs_input_grad
        mask = [need[0], need[2], need[3], need[1]]
        N, K = weight.shape
        flat = dy.dim() == 2
        dy2 = dy if flat else dy.reshape(-1, N)
        dx = da = db = dw = dbias = None
        if need[0] or need[1] or need[2] or need[3]:
            x2 = x if (x is None or x.dim() == 2) else x.reshape(-1, K)
            dx, da, db, dw = _lora_linear_op.call_bwd(dy2, x2, xa, weight, lora_a, lora_b, scale, dropout_p, seed,
                                                      mask, backend, seed_t, keep)
            dx = (dx if flat else dx.reshape(dy.shape[:-1] + (K,))) if need[0] else None
            da = da if need[2] else None
            db = db if need[3] else None
            dw = dw if need[1] else None
        if need[5]:
            dbias = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if dy2.dtype != torch.float64 else dy2.sum(0)
        return dx, dw, da, db, None, dbias, None, None, None


_unsafe_view = torch.ops.aten._unsafe_view.default


def _autocast_device(x) -> Optional[str]:
    """The device type whose autocast applies to x ("cpu" / "cuda") when it is enabled, else None."""
    if not isinstance(x, torch.Tensor):
        return None
    dev = "cpu" if x.is_cpu else ("cuda" if x.is_cuda else None)
    return dev if (dev is not None and torch.is_autocast_enabled(dev)) else None


def _autocast_inputs(tensors):
    """Cast the floating tensors to the autocast dtype of the first tensor's device when autocast is on there:
    (tensors, device type) or (tensors unchanged, None)."""
    dev = _autocast_device(tensors[0])
    if dev is not None:
        dt = torch.get_autocast_dtype(dev)
        return [t.to(dt) if (t is not None and t.is_floating_point()) else t for t in tensors], dev
    return list(tensors), None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    *,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
    magnitude: Optional[torch.Tensor] = None,
    weight_sq: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """LoRA linear layer: ``y = x·W0ᵀ + bias + scale·(drop(x)·Aᵀ)·Bᵀ`` (DoRA with ``magnitude``, below).

    Args:
        x: [..., K] input (any leading dims, any strides).
        weight: frozen base weight W0, [N, K] (nn.Linear layout), same dtype as x.
        lora_a: A, [r, K]. lora_b: B, [N, r]. Cast to x's dtype if they differ (differentiably).
        scale: alpha / r (or alpha / sqrt(r) for rsLoRA); must be finite.
        bias: optional [N].
        dropout_p: dropout on the LoRA branch input, in [0, 1). The mask is a hash of
            (seed, row, column) (see ``reference.dropout_keep_mask``): the same seed gives the same mask.
        seed: dropout seed; drawn from torch's CPU generator when None and dropout_p > 0.
        backend: "cuda" | "triton" | "torch" | None (auto; see ``resolve_backend``).
        magnitude: DoRA's magnitude vector m [N] (PEFT's ``lora_magnitude_vector``), any float dtype: the layer
            becomes PEFT's DoRA, ``y = g⊙(x·W0ᵀ + scale·(x·Aᵀ)·Bᵀ) + bias`` with ``g = m / ‖W0 + scale·B·A‖`` (row
            norms, detached, rounded to x's dtype); with dropout PEFT applies W0 to the dropped x a second time:
            ``y = x·W0ᵀ + bias + (g−1)⊙(drop(x)·W0ᵀ) + g⊙scale·(drop(x)·Aᵀ)·Bᵀ`` (``reference.dora_linear_fwd_ref``).
            The norm is formed without the N×K update (``lora_kernels.dora.dora_weight_norm``). Gradients also flow
            to magnitude. Backends: torch, Triton and CUDA (dropout > 0 on CUDA: torch, see
            ``why_not("cuda", "dora_linear_dropout", ...)``).
        weight_sq: with magnitude, ``lora_kernels.dora.weight_row_sq_norm(weight)`` if the caller caches it
            (W0 frozen); computed here otherwise.

    Returns y, [..., N]. Under ``torch.autocast`` the inputs are cast to the autocast dtype first.
    Gradients flow to x, lora_a, lora_b, bias, and to weight only if it requires grad.
    """
    if magnitude is not None:
        return _dora_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, backend, magnitude, weight_sq)
    ac = _autocast_device(x)
    if ac is not None:
        (x, weight, lora_a, lora_b, bias), _ = _autocast_inputs((x, weight, lora_a, lora_b, bias))
    scale = check_lora_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p)
    if lora_a.dtype != x.dtype:
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    dropout_p = float(dropout_p)
    seed = _resolve_seed(seed, dropout_p)
    be = resolve_backend("lora_linear", x, weight, lora_a, lora_b, bias, backend=backend)
    if ac is not None:
        with torch.autocast(ac, enabled=False):
            return LoRALinearFunction.apply(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, be)
    return LoRALinearFunction.apply(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, be)


class DoRALinearFunction(torch.autograd.Function):
    """The DoRA linear layer (``lora_linear(..., magnitude=m)``) with a fused backward; grads to x, W0 (only if it
    requires grad), A, B, m and bias.

    Saved for backward: what :class:`LoRALinearFunction` saves (x when dA / dW0 are needed, the r-wide ``xa``, the
    torch backend's dropout keep-mask) plus g and the norm ([N] each), and ``ypre`` = x·W0ᵀ + s·xa·Bᵀ [M, N] (x's
    dtype) ONLY when the magnitude requires grad: ``dm[n] = Σ_t dy[t, n]·ypre[t, n] / norm[n]`` needs either that
    M×N activation saved or an extra M·N·K GEMM in the backward to rebuild it; this saves it (one M×N tensor, like
    the output itself) and never anything N×K."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, magnitude, scale, bias, g, norm, dropout_p, seed, backend):
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        seed_t = None
        if isinstance(seed, torch.Tensor):
            seed, seed_t = 0, seed
        need = ctx.needs_input_grad
        keep = None
        if dropout_p > 0.0 and backend == "torch" and (need[0] or need[1] or need[2]) and x2.shape[0] > 0:
            keep = _lora_linear_op.call_dropout_keep(x2, dropout_p, seed, seed_t)
        save_pre = bool(need[4])
        y2, xa, ypre = _dora_op.call_fwd(x2, weight, lora_a, lora_b, scale, bias, g, dropout_p, seed, save_pre, backend,
                                         seed_t, keep)
        ctx.save_for_backward(x if (need[1] or need[2]) else None, xa, ypre if save_pre else None, weight, lora_a,
                              lora_b, g, norm, seed_t, keep)
        ctx.cfg = (scale, dropout_p, seed, backend, magnitude.dtype)
        if x.dim() == 2:
            return y2
        return _unsafe_view(y2, (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx, dy):
        x, xa, ypre, weight, lora_a, lora_b, g, norm, seed_t, keep = ctx.saved_tensors
        scale, dropout_p, seed, backend, m_dtype = ctx.cfg
        need = ctx.needs_input_grad
        mask = [need[0], need[2], need[3], need[4], need[1]]
        N, K = weight.shape
        dy2 = dy if dy.dim() == 2 else dy.reshape(-1, N)
        dx = da = db = dm = dw = dbias = None
        if any(mask):
            x2 = x if (x is None or x.dim() == 2) else x.reshape(-1, K)
            dx, da, db, dm, dw = _dora_op.call_bwd(dy2, x2, xa, ypre, weight, lora_a, lora_b, scale, g, norm, dropout_p,
                                                   seed, mask, backend, seed_t, keep)
            dx = (dx if dy.dim() == 2 else dx.reshape(dy.shape[:-1] + (K,))) if need[0] else None
            da = da if need[2] else None
            db = db if need[3] else None
            dm = dm.to(m_dtype) if need[4] else None
            dw = dw if need[1] else None
        if need[6]:
            dbias = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if dy2.dtype != torch.float64 else dy2.sum(0)
        return dx, dw, da, db, dm, None, dbias, None, None, None, None, None


_dora_warned: set = set()


def _dora_backend(x, weight, lora_a, lora_b, bias, dropout_p, backend) -> str:
    """The backend of a DoRA call: ``dora_linear``'s; with dropout the one that also implements
    ``dora_linear_dropout`` (PEFT's second base GEMM on the dropped x), else torch with a one-time warning that
    quotes ``why_not``."""
    from ._backend import why_not

    be = resolve_backend("dora_linear", x, weight, lora_a, lora_b, bias, backend=backend)
    if dropout_p > 0.0 and be != "torch":
        reasons = why_not(be, "dora_linear_dropout", [t for t in (x, weight, lora_a, lora_b, bias) if t is not None])
        if reasons:
            if be not in _dora_warned:
                _dora_warned.add(be)
                import warnings

                warnings.warn(f"lora_kernels: DoRA with dropout runs on the torch backend ({'; '.join(reasons)})",
                              RuntimeWarning, stacklevel=3)
            be = "torch"
    return be


def _dora_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, backend, magnitude, weight_sq):
    from .dora import row_norm
    from .ops import dora as _dora_check

    ac = _autocast_device(x)
    if ac is not None:
        (x, weight, lora_a, lora_b, bias), _ = _autocast_inputs((x, weight, lora_a, lora_b, bias))
    scale = _dora_check.check_dora_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p, magnitude)
    if lora_a.dtype != x.dtype:
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    dropout_p = float(dropout_p)
    seed = _resolve_seed(seed, dropout_p)
    be = _dora_backend(x, weight, lora_a, lora_b, bias, dropout_p, backend)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        # PEFT forms the norm in x's dtype: round it there (a no-op for fp32), then g in fp32 (fp64)
        norm = row_norm(weight.detach(), lora_a.detach(), lora_b.detach(), scale, weight_sq)
        if x.dtype != acc:
            norm = norm.to(x.dtype).to(acc)
        g = magnitude.detach().to(acc) / norm
    args = (x, weight, lora_a, lora_b, magnitude, scale, bias, g, norm, dropout_p, seed, be)
    if ac is not None:
        with torch.autocast(ac, enabled=False):
            return DoRALinearFunction.apply(*args)
    return DoRALinearFunction.apply(*args)


def _as_list(t: TensorOrList) -> List[torch.Tensor]:
    return [t] if isinstance(t, torch.Tensor) else list(t)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: TensorOrList,
    lora_b: TensorOrList,
    adapter_ids: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor] = None,
    slices: Optional[Sequence[int]] = None,
    *,
    backend: Optional[str] = None,
    meta=None,
    magnitudes: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Batched multi-adapter LoRA (or DoRA), in place on y; returns y.

    ``y[t, slice s] += scales[i]·(x[t]·A_s[i][:rank_i]ᵀ)·B_s[i][:, :rank_i]ᵀ`` for ``i = adapter_ids[t]``;
    rows whose id is -1 are untouched. With ``magnitudes`` (DoRA): ``y[t] = g[i]⊙(y[t] − bias + lora[t]) + bias``
    with ``g = magnitudes[i]``, y holding the base output (bias included) on entry.

    Args:
        y: [M, N_total] output, updated in place (same dtype as x).
        x: [M, K] tokens.
        lora_a: stacked A, [L, r_max, K], or a list with one per output slice (q/k/v packing).
        lora_b: stacked B, [L, N_s, r_max], or a list with one per slice; slices fill y's columns in order.
        adapter_ids: [M] int32/int64 in [-1, L).
        scales: [L] per-adapter scale (finite).
        ranks: [L] per-adapter rank in [0, r_max] (None: all r_max); columns past the rank are ignored.
        slices: optional widths [N_0, N_1, ...] to assert against lora_b's shapes.
        backend: "cuda" | "triton" | "torch" | None (auto).
        meta: optional :class:`lora_kernels.serving.LoRABatchMeta` built from these adapter_ids (once per batch,
            shared by every layer); only accelerates the grouped (SGMV) path, never changes the result.
        magnitudes: DoRA factors, [L, N_total] fp32: ``g[i] = m_i / ‖W0 + s_i·B_i·A_i‖_row`` precomputed per adapter
            (``AdapterSlots.load(..., magnitude=, base_weight=)`` does it; a plain adapter's row is all ones).
        bias: [N_total], the base layer's bias already in y (only with magnitudes; None = no bias).
    """
    lora_a, lora_b = _as_list(lora_a), _as_list(lora_b)
    check_add_lora(y, x, lora_a, lora_b, adapter_ids, scales, ranks, slices, meta=meta, magnitudes=magnitudes, bias=bias)
    if magnitudes is None:
        be = resolve_backend("add_lora", y, x, *lora_a, *lora_b, backend=backend)
        if meta is None:
            _ops.add_lora_(y, x, lora_a, lora_b, adapter_ids, scales, ranks, be)
        else:
            _ops.add_lora_(y, x, lora_a, lora_b, adapter_ids, scales, ranks, be, *meta.groups)
        return y
    be = resolve_backend("add_lora_dora", y, x, *lora_a, *lora_b, magnitudes, bias, backend=backend)
    groups = meta.groups if meta is not None else (None, None, 0)
    _ops.add_lora_(y, x, lora_a, lora_b, adapter_ids, scales, ranks, be, *groups, magnitudes=magnitudes, bias=bias)
    return y


def merge_inputs(weight, lora_a: TensorOrList, lora_b: TensorOrList, scale):
    """Normalise and validate (multi-)merge arguments: (lora_a list, lora_b list, finite float scales);
    ``scale`` is one float shared by every adapter or one per adapter."""
    lora_a, lora_b = _as_list(lora_a), _as_list(lora_b)
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(lora_a)
    return lora_a, lora_b, check_merge(weight, lora_a, lora_b, scales)


def dora_merge_inputs(weight, lora_a, lora_b, scale, magnitude, weight_norm, op: str):
    """Validate a DoRA (un)merge and form its row factor: (A, B, scale, g) with g = m / ‖W0 + s·B·A‖ [N] fp32
    (fp64 for an fp64 weight), the norm computed from ``weight`` (the unmerged W0) when ``weight_norm`` is None."""
    from .dora import dora_weight_norm
    from .ops.merge import check_dora_merge

    lora_a, lora_b, scales = merge_inputs(weight, lora_a, lora_b, scale)
    if magnitude is None:
        raise LoRAInputError(f"lora_kernels.{op}: weight_norm is only used with magnitude (DoRA)")
    check_dora_merge(weight, lora_a, lora_b, magnitude, weight_norm, op)
    a, b = lora_a[0].detach(), lora_b[0].detach()
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        if weight_norm is None:
            weight_norm = dora_weight_norm(weight.detach(), a, b, scales[0])
            if not bool((weight_norm > 0).all()):
                raise LoRAInputError(f"lora_kernels.{op}: ‖W0 + s·B·A‖ is 0 in some row (g = m / 0 is not finite)")
        g = magnitude.detach().to(acc) / weight_norm.detach().to(acc)
    return a, b, scales[0], g


def _merge_dora(weight, lora_a, lora_b, scale, magnitude, weight_norm, inverse: bool, backend):
    op = "unmerge_" if inverse else "merge_"
    if inverse and weight_norm is None:
        raise LoRAInputError(
            f"lora_kernels.{op}: a DoRA unmerge needs weight_norm, the ‖W0 + s·B·A‖ the merge used (a merged W no longer "
            "gives it): compute it with lora_kernels.dora.dora_weight_norm(W0, A, B, s) before merging and pass it to "
            "both (or use merge_exact_ / unmerge_exact_, whose record keeps it)")
    a, b, s, g = dora_merge_inputs(weight, lora_a, lora_b, scale, magnitude, weight_norm, op)
    be = resolve_backend("merge_dora", weight, a, b, backend=backend)
    with torch.no_grad():
        _ops.merge_dora_(weight, a, b, s, g, inverse, be)
    return weight


def _merge(weight, lora_a, lora_b, scale, sign: float, backend, magnitude=None, weight_norm=None):
    if magnitude is not None or weight_norm is not None:
        return _merge_dora(weight, lora_a, lora_b, scale, magnitude, weight_norm, sign < 0, backend)
    lora_a, lora_b, scales = merge_inputs(weight, lora_a, lora_b, scale)
    be = resolve_backend("merge", weight, *lora_a, *lora_b, backend=backend)
    with torch.no_grad():
        _ops.merge_(weight, [a.detach() for a in lora_a], [b.detach() for b in lora_b], [sign * s for s in scales], be)
    return weight


def merge_(
    weight: torch.Tensor,
    lora_a: TensorOrList,
    lora_b: TensorOrList,
    scale: Union[float, Sequence[float]],
    *,
    backend: Optional[str] = None,
    magnitude: Optional[torch.Tensor] = None,
    weight_norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In place: ``W ← round(W + Σᵢ sᵢ·Bᵢ·Aᵢ)``, the update accumulated in fp32 and rounded once.

    weight [N, K]; lora_a [r, K] or a list of [rᵢ, K]; lora_b [N, r] or a list of [N, rᵢ]; scale a float
    (shared) or one per adapter. Every input is checked before W is touched; returns weight.

    DoRA (``magnitude`` m [N], one adapter): ``W ← round(g⊙(W + s·B·A))`` row-wise, PEFT's merge, with
    ``g = m / weight_norm`` and ``weight_norm = ‖W + s·B·A‖_row`` of the unmerged W (computed here without the N×K
    sum when not given). Keep that norm: :func:`unmerge_` needs it. Torch backend (any device).
    """
    return _merge(weight, lora_a, lora_b, scale, 1.0, backend, magnitude, weight_norm)


def unmerge_(
    weight: torch.Tensor,
    lora_a: TensorOrList,
    lora_b: TensorOrList,
    scale: Union[float, Sequence[float]],
    *,
    backend: Optional[str] = None,
    magnitude: Optional[torch.Tensor] = None,
    weight_norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In place: ``W ← round(W − Σᵢ sᵢ·Bᵢ·Aᵢ)``; the inverse of :func:`merge_` up to rounding.

    DoRA (``magnitude``): ``W ← round(W/g − s·B·A)`` with ``g = magnitude / weight_norm``, ``weight_norm`` (required)
    being the norm the merge used (``lora_kernels.dora.dora_weight_norm`` of the unmerged W0)."""
    return _merge(weight, lora_a, lora_b, scale, -1.0, backend, magnitude, weight_norm)


# ----------------------------------------------------------------------------------------------
# The shrink / expand halves of add_lora as ops of their own (ops/shrink_expand.py): for callers that keep the
# r-wide intermediate themselves (vLLM's add_shrink / add_expand / add_lora_embedding)
# ----------------------------------------------------------------------------------------------

from .ops.shrink_expand import check_lora_expand, check_lora_shrink  # noqa: E402  (kept beside its users)

__all__ += ["lora_shrink", "lora_expand_"]


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    adapter_ids: torch.Tensor,
    scale: float = 1.0,
    ranks: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-token shrink: a new ``xa`` [M, r_max], fp32 (fp64 when x or lora_a is fp64), with
    ``xa[t, :rank_i] = scale·x[t]·A[i, :rank_i]ᵀ`` for ``i = adapter_ids[t]`` and 0 everywhere else (whole rows
    for id -1, columns past each adapter's rank).

    Args:
        x: [M, K] tokens (any strides). lora_a: stacked A, [L, r_max, K] (any strides; e.g. vLLM's
            ``lora_a_stacked[s][:, 0]``). adapter_ids: [M] int32/int64 in [-1, L). scale: a finite float.
        ranks: [L] per-adapter rank in [0, r_max] (None: all r_max).
        backend: "cuda" | "triton" | "torch" | None (auto).

    An inference op (no autograd). Semantics: ``reference.lora_shrink_ref``.
    """
    scale = check_lora_shrink(x, lora_a, adapter_ids, scale, ranks)
    be = resolve_backend("lora_shrink", x, lora_a, backend=backend)
    return _ops.lora_shrink(x, lora_a, adapter_ids, scale, ranks, be)


def lora_expand_(
    y: torch.Tensor,
    xa: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor] = None,
    col_offset: int = 0,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-token expand, in place on y's columns [col_offset, col_offset + N); returns y.

    ``y[t, col_offset:col_offset+N] += scales[i]·xa[t, :rank_i]·B[i, :, :rank_i]ᵀ`` for ``i = adapter_ids[t]``
    (fp32 accumulation with y's old value, one rounding); rows whose id is -1 and columns outside the window are
    untouched.

    Args:
        y: [M, N_total] (any strides, every element stored once). xa: [M, r_max], any float dtype (read as fp32).
        lora_b: stacked B, [L, N, r_max] (any strides). adapter_ids: [M] int32/int64 in [-1, L).
        scales: [L] per-adapter scale (finite). ranks: [L] in [0, r_max] or None. col_offset: first column of y.
        backend: "cuda" | "triton" | "torch" | None (auto).

    An inference op (no autograd). Semantics: ``reference.lora_expand_ref``.
    """
    col_offset = check_lora_expand(y, xa, lora_b, adapter_ids, scales, ranks, col_offset)
    be = resolve_backend("lora_expand", y, xa, lora_b, backend=backend)
    _ops.lora_expand_(y, xa, lora_b, adapter_ids, scales, ranks, col_offset, be)
    return y


# ----------------------------------------------------------------------------------------------
# LoRA on a quantised frozen base (QLoRA: bitsandbytes NF4 / FP4 / int8, float8): ops/quant_linear.py
# ----------------------------------------------------------------------------------------------

from .ops.quant_linear import check_quant_lora_linear, quant_operands  # noqa: E402  (kept beside its users)

__all__ += ["quant_lora_linear", "QuantLoRALinearFunction"]


class QuantLoRALinearFunction(torch.autograd.Function):
    """``y = x·W̃ᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ`` over a quantised frozen W0 (``qw``, a ``quant.QuantWeight``).

    Saves x (only when dA is needed), the fp32 ``xa`` and the adapters; the quantised base is referenced as it
    is (its own packed tensors), never dequantised into a saved tensor: backward decodes W0ᵀ again."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, qw, scale, dropout_p, seed, backend, strategy):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        seed_int, seed_t = (0, seed) if isinstance(seed, torch.Tensor) else (seed, None)
        y2, xa = _ops.quant_lora_linear_fwd(x2, *quant_operands(qw), lora_a, lora_b, scale, bias, dropout_p, seed_int,
                                            strategy, backend, seed_t)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, xa, lora_a, lora_b, seed_t)
        ctx.qw = qw
        ctx.cfg = (scale, dropout_p, seed_int, backend, strategy, x.shape)
        return torch.ops.aten._unsafe_view(y2, (*x.shape[:-1], qw.shape[0]))

    @staticmethod
    def backward(ctx, dy):
        x2, xa, lora_a, lora_b, seed_t = ctx.saved_tensors
        scale, dropout_p, seed, backend, strategy, xshape = ctx.cfg
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, ctx.qw.shape[0])
        dx = da = db = dbias = None
        mask = [need[0], need[1], need[2]]
        if any(mask):
            dx, da, db = _ops.quant_lora_linear_bwd(dy2, x2, xa, *quant_operands(ctx.qw), lora_a, lora_b, scale,
                                                    dropout_p, seed, mask, strategy, backend, seed_t)
            dx = dx.reshape(xshape) if need[0] else None
            da = da if need[1] else None
            db = db if need[2] else None
        if need[3]:
            dbias = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if dy2.dtype != torch.float64 else dy2.sum(0)
        return dx, da, db, dbias, None, None, None, None, None, None


def quant_lora_linear(
    x: torch.Tensor,
    qweight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    *,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
    strategy: Optional[str] = None,
) -> torch.Tensor:
    """LoRA linear layer over a quantised frozen base: ``y = x·W̃ᵀ + bias + scale·(drop(x)·Aᵀ)·Bᵀ``.

    Args:
        x: [..., K] input, any float dtype (fp16/bf16/fp32 on the kernel backends).
        qweight: the base as a :class:`lora_kernels.quant.QuantWeight` [N, K], or a quantised module
            (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, ``quant.Float8Linear``, an ``nn.Linear`` with a torchao
            ``Float8Tensor`` weight), read with ``lora_kernels.quant.from_module``. ``W̃`` is its dequantised
            weight in the format's dtype (``qweight.dtype``), used in x's dtype.
        lora_a: A [r, K]; lora_b: B [N, r]; any float dtype (cast to x's dtype, differentiably).
        scale, bias, dropout_p, seed, backend: as :func:`lora_linear` (bias is cast to x's dtype).
        strategy: "fused" (dequantise inside the GEMM), "scratch" (dequantise to a per-call buffer, then the
            16-bit GEMM), or None / "auto" (``$LORA_KERNELS_QUANT_STRATEGY``, else a rule on M; Triton backend only).

    Returns y [..., N]. Gradients flow to x, lora_a, lora_b and bias; the quantised base is frozen.
    """
    from . import quant as _quant

    qw = qweight if isinstance(qweight, _quant.QuantWeight) else _quant.from_module(qweight)
    (x, lora_a, lora_b, bias), ac = _autocast_inputs((x, lora_a, lora_b, bias))
    scale = check_quant_lora_linear(x, qw, lora_a, lora_b, scale, bias, dropout_p, strategy)
    if lora_a.dtype != x.dtype:
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    dropout_p = float(dropout_p)
    seed = _resolve_seed(seed, dropout_p)
    # the packed weight joins only as a device witness (its dtype is not a compute dtype)
    be = resolve_backend("quant_lora_linear", x, lora_a, lora_b, bias, torch.empty(0, dtype=torch.uint8, device=qw.device), backend=backend)
    args = (x, lora_a, lora_b, bias, qw, scale, dropout_p, seed, be, strategy or "auto")
    if ac is not None:
        with torch.autocast(ac, enabled=False):
            return QuantLoRALinearFunction.apply(*args)
    return QuantLoRALinearFunction.apply(*args)


# ----------------------------------------------------------------------------------------------
# LoRA on mixture-of-experts expert weights (ops/moe_lora.py; the MoE modules are in moe.py)
# ----------------------------------------------------------------------------------------------

from .ops.moe_lora import MoERouting, check_add_moe_lora, check_moe_lora_linear, pick_block_m  # noqa: E402

__all__ += ["moe_lora_linear", "MoELoRALinearFunction", "add_moe_lora", "MoERouting"]


def _moe_frozen_grads(dy, x, weight, bias, topk_ids, topk_weights, combine, need_w, need_bias):
    """dW [E, N, K] and dbias [E, N] of moe_lora_linear by plain torch (one host read of the expert counts): only when
    the expert weights / biases require grad, which LoRA training does not ask for (they are frozen)."""
    M, k = topk_ids.shape
    E, N, K = weight.shape
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    ids = topk_ids.reshape(-1).to(torch.int64)
    key = torch.where((ids >= 0) & (ids < E), ids, torch.full_like(ids, E))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1).tolist()
    dw = torch.zeros(weight.shape, dtype=acc, device=dy.device) if need_w else None
    db = torch.zeros((E, N), dtype=acc, device=dy.device) if need_bias else None
    start = 0
    for e in range(E):
        rows = order[start:start + counts[e]]
        start += counts[e]
        if rows.numel() == 0:
            continue
        g = dy.index_select(0, rows // k if combine else rows).to(acc)
        if topk_weights is not None:
            g = g * topk_weights.reshape(-1)[rows].to(acc)[:, None]
        if need_w:
            dw[e] = g.t() @ x.index_select(0, rows if x.shape[0] == M * k else rows // k).to(acc)
        if need_bias:
            db[e] = g.sum(0)
    return (dw.to(weight.dtype) if need_w else None), (db.to(bias.dtype) if need_bias else None)


class MoELoRALinearFunction(torch.autograd.Function):
    """The grouped expert linear layer with LoRA (:func:`moe_lora_linear`) with a fused backward.

    Saves x (the caller's tensor), the fp32 ``xa`` [M·k, r], the routing and the parameters: never ``W + s·B·A``
    nor any per-expert copy of a weight. Gradients: x, lora_a, lora_b and topk_weights on the fused kernels; the
    expert weights and biases, if they require grad (LoRA training freezes them), by plain torch."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, topk_weights, scale, topk_ids, combine, backend, routing):
        groups = routing.expert_groups if routing is not None else (None, None, 0)
        y, xa = _ops.moe_lora_fwd(x, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights, combine, backend,
                                  *groups)
        ctx.save_for_backward(x, xa, weight, bias, lora_a, lora_b, topk_weights, topk_ids)
        ctx.cfg = (scale, combine, backend, groups)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, weight, bias, lora_a, lora_b, topk_weights, topk_ids = ctx.saved_tensors
        scale, combine, backend, groups = ctx.cfg
        need = ctx.needs_input_grad
        mask = [need[0], need[3], need[4], need[5]]
        dx = da = db = dw = dweight = dbias = None
        dy = dy.contiguous() if dy.stride(-1) != 1 else dy
        if any(mask):
            dx, da, db, dw = _ops.moe_lora_bwd(dy, x, xa, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights,
                                               combine, mask, backend, *groups)
            dx, da, db, dw = (g if want else None for g, want in zip((dx, da, db, dw), mask))
        if need[1] or need[2]:
            dweight, dbias = _moe_frozen_grads(dy, x, weight, bias, topk_ids, topk_weights, combine, need[1], need[2])
        return dx, dweight, dbias, da, db, dw, None, None, None, None, None


def moe_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    scale: float,
    topk_ids: torch.Tensor,
    topk_weights: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    combine: bool = False,
    routing: Optional[MoERouting] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Grouped expert linear layer with LoRA on every expert: for each (token t, expert slot j) pair p = t·k + j with
    expert e = topk_ids[t, j] (ids outside [0, E) mean no expert: a zero row),
    ``out[p] = c_p·(x_p·W[e]ᵀ + bias[e] + scale·(x_p·A[e]ᵀ)·B[e]ᵀ)``; y = out [M·k, N], or with ``combine``
    ``y[t] = Σ_j out[t·k + j]`` [M, N]. The LoRA branch stays factored (no ``W + s·B·A`` is ever formed).

    Args:
        x: [M, K] (one row per token; every pair of the token reads it) or [M·k, K] (one row per pair, e.g. the
            activation between the gate/up and the down projection).
        weight: the experts' frozen weights [E, N, K] (nn.Linear layout per expert; any strides: a [E, K, N]
            storage such as GPT-OSS's is ``w.transpose(1, 2)``), same dtype as x. bias: [E, N] or None.
        lora_a: A [E, r, K], or one [r, K] shared by every expert; lora_b: B [E, N, r]; both None: no LoRA (the
            plain grouped GEMM). Cast to x's dtype if they differ (differentiably).
        scale: alpha / r (finite). topk_ids: [M, k] int32/int64. topk_weights: [M, k] or None (c_p = 1).
        combine: sum each token's k pair rows (the down projection of an MoE MLP). On Triton the sum is fp32
            atomics into an [M, N] accumulator where they move fewer bytes than a per-pair buffer (top-k >= 5 in
            16-bit, >= 2 in fp32; the fp32 addition order, so the last bits, can vary between runs), else the
            per-pair buffer summed in a fixed order; ``torch.use_deterministic_algorithms(True)`` always takes the
            buffer. The torch backend sums in fp32 with ``index_add_``.
        routing: an optional :class:`MoERouting` built from these topk_ids (shared by the layer's two projections;
            built here when absent, on the device, without a host read).
        backend: "triton" | "torch" | None (auto).

    Differentiable w.r.t. x, lora_a, lora_b and topk_weights (the router's gradient), and weight / bias when they
    require grad. Semantics: ``reference.moe_lora_linear_ref``.
    """
    if lora_a is not None and isinstance(lora_a, torch.Tensor) and lora_a.dim() == 2 and isinstance(weight, torch.Tensor) \
            and weight.dim() == 3:
        lora_a = lora_a.unsqueeze(0).expand(weight.shape[0], *lora_a.shape)  # one A shared by every expert
    ac = _autocast_device(x)
    if ac is not None:
        (x, weight, lora_a, lora_b, bias), _ = _autocast_inputs((x, weight, lora_a, lora_b, bias))
    scale = check_moe_lora_linear(x, weight, lora_a, lora_b, scale, topk_ids, topk_weights, bias, combine, routing)
    if lora_a is not None and lora_a.dtype != x.dtype:
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    be = resolve_backend("moe_lora_linear", x, weight, lora_a, lora_b, bias, backend=backend)
    if routing is None and be != "torch" and x.shape[0] > 0:
        M, k = topk_ids.shape
        routing = MoERouting(topk_ids, weight.shape[0], block_m=pick_block_m(M * k, weight.shape[0]))
    args = (x, weight, bias, lora_a, lora_b, topk_weights, scale, topk_ids, combine, be, routing)
    if ac is not None:
        with torch.autocast(ac, enabled=False):
            return MoELoRALinearFunction.apply(*args)
    return MoELoRALinearFunction.apply(*args)


def add_moe_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: TensorOrList,
    lora_b: TensorOrList,
    topk_ids: torch.Tensor,
    adapter_ids: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    *,
    routing: Optional[MoERouting] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Serving: many adapters' MoE expert LoRA in one batch, in place on the per-pair output y; returns y.

    ``y[p, slice s] += c_p·scales[i]·(x_p·A_s[i, e, :rank_i]ᵀ)·B_s[i, e, :, :rank_i]ᵀ`` for each pair p = t·k + j
    with adapter i = adapter_ids[t] >= 0 and expert e = topk_ids[t, j] in [0, E); other rows are untouched.

    Args:
        y: [M·k, N_total], one row per (token, expert) pair (e.g. the expert GEMM's output before the routing sum).
        x: [M, K] token rows or [M·k, K] pair rows, y's dtype.
        lora_a: [L, E, r_max, K] or a list with one per packed output slice (gate, up); lora_b: [L, E, N_s, r_max]
            or a list. adapter_ids: [M] int32/int64 in [-1, L). scales: [L]. ranks: [L] in [0, r_max] or None.
        topk_ids: [M, k]. topk_weights: [M, k] to multiply each pair's update by its routing weight, or None.
        routing: an optional :class:`MoERouting` built with these adapter_ids (``adapter_ids=..., num_adapters=L``,
            fixed ``max_tokens`` for CUDA graphs; ``routing.update_`` between replays).
        backend: "triton" | "torch" | None (auto).

    An inference op (no autograd). With a routing given, the Triton path reads nothing on the host (the value
    checks' one read is skipped while capturing a CUDA graph). Semantics: ``reference.add_moe_lora_ref``.
    """
    lora_a, lora_b = _as_list(lora_a), _as_list(lora_b)
    check_add_moe_lora(y, x, lora_a, lora_b, topk_ids, topk_weights, adapter_ids, scales, ranks, routing)
    be = resolve_backend("add_moe_lora", y, x, *lora_a, *lora_b, backend=backend)
    groups = routing.lora_groups if routing is not None else (None, None, 0)
    _ops.add_moe_lora_(y, x, lora_a, lora_b, topk_ids, topk_weights, adapter_ids, scales, ranks, be, *groups)
    return y


# ----------------------------------------------------------------------------------------------
# LoRA on an embedding table: A gathered by token id, B expanded (ops/embedding.py; module: embedding.py)
# ----------------------------------------------------------------------------------------------

from .ops.embedding import check_add_lora_embedding, check_lora_embedding  # noqa: E402  (kept beside its users)

__all__ += ["lora_embedding", "LoRAEmbeddingFunction", "add_lora_embedding"]


class LoRAEmbeddingFunction(torch.autograd.Function):
    """``y = W[ids] + s·A[:, ids]ᵀ·Bᵀ`` with the gather fused into the shrink. Saves ids and the adapters (the r-wide
    column of A is gathered again in the backward: cheaper than keeping it). dA is a scatter-add over the ids (none
    for ``padding_idx`` tokens), dB = s·dyᵀ·A[:, ids]ᵀ; W gets a gradient (a scatter-add of dy, by torch) only when it
    requires one."""

    @staticmethod
    def forward(ctx, ids, weight, lora_a, lora_b, scale, padding_idx, scale_grad_by_freq, backend):
        flat = ids.reshape(-1)
        y = _ops.lora_embedding_fwd(flat, weight, lora_a, lora_b, scale, backend)
        ctx.save_for_backward(flat, lora_a, lora_b)
        ctx.cfg = (scale, padding_idx, scale_grad_by_freq, backend, tuple(weight.shape))
        return _unsafe_view(y, (*ids.shape, weight.shape[1]))

    @staticmethod
    def backward(ctx, dy):
        flat, lora_a, lora_b = ctx.saved_tensors
        scale, padding_idx, by_freq, backend, (V, D) = ctx.cfg
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, D)
        dw = da = db = None
        if need[2] or need[3]:
            da, db = _ops.lora_embedding_bwd(dy2, flat, lora_a, lora_b, scale, padding_idx, by_freq,
                                             [need[2], need[3]], backend)
            da = da if need[2] else None
            db = db if need[3] else None
        if need[1]:  # a trainable base table (not LoRA's case): nn.Embedding's dense gradient
            dw = torch.ops.aten.embedding_dense_backward(dy2, flat, V, padding_idx, by_freq)
        return None, dw, da, db, None, None, None, None


def lora_embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    padding_idx: Optional[int] = None,
    scale_grad_by_freq: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """LoRA embedding lookup (PEFT's ``lora.Embedding``): ``y = W[ids] + scale·A[:, ids]ᵀ·Bᵀ``.

    Args:
        ids: integer token ids, any shape, values in [0, V) (checked: an id out of range raises LoRAInputError).
        weight: the frozen table W [V, D] (nn.Embedding layout, any strides).
        lora_a: A [r, V] (PEFT's ``lora_embedding_A``); lora_b: B [D, r] (``lora_embedding_B``); cast to weight's
            dtype if they differ (differentiably).
        scale: alpha / r (finite). padding_idx: as nn.Embedding (tokens equal to it give A and W no gradient;
            negative values count from the end). scale_grad_by_freq: as nn.Embedding (dA's column of each id is
            divided by its count in the batch).
        backend: "triton" | "torch" | None (auto).

    Returns y [*ids.shape, D] in weight's dtype. Semantics: ``reference.lora_embedding_ref``.
    """
    scale = check_lora_embedding(ids, weight, lora_a, lora_b, scale)
    V = weight.shape[0]
    if padding_idx is None:
        pad = -1
    else:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not -V <= padding_idx < V:
            raise LoRAInputError(f"lora_kernels.lora_embedding: padding_idx must be an int in [-{V}, {V}) or None, "
                                 f"got {padding_idx!r}")
        pad = padding_idx % V
    if lora_a.dtype != weight.dtype:
        lora_a, lora_b = lora_a.to(weight.dtype), lora_b.to(weight.dtype)
    be = resolve_backend("lora_embedding", weight, lora_a, lora_b, ids, backend=backend)
    return LoRAEmbeddingFunction.apply(ids, weight, lora_a, lora_b, scale, pad, bool(scale_grad_by_freq), be)


def add_lora_embedding(
    y: torch.Tensor,
    token_ids: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Serving: embedding LoRA of many adapters in one batch, in place on the gathered base rows y; returns y.

    ``y[t] += scales[i]·A[i, :rank_i, token_ids[t]]·B[i, :, :rank_i]ᵀ`` for ``i = adapter_ids[t]``; rows with id -1
    are untouched. The shrink is a gather of A's column (no GEMM against the vocabulary).

    Args:
        y: [M, D] (``W[token_ids]``, any strides, every element stored once). token_ids: [M] int32/int64 in [0, V).
        lora_a: stacked A [L, r_max, V] (PEFT's ``lora_embedding_A`` per adapter; any strides, so a [L, V, r_max]
            storage is passed as ``.transpose(1, 2)``). lora_b: [L, D, r_max]. adapter_ids: [M] in [-1, L).
        scales: [L] (finite). ranks: [L] in [0, r_max] or None (all r_max). backend: "triton" | "torch" | None.

    An inference op (no autograd). Semantics: ``reference.add_lora_embedding_ref``.
    """
    check_add_lora_embedding(y, token_ids, lora_a, lora_b, adapter_ids, scales, ranks)
    be = resolve_backend("add_lora_embedding", y, lora_a, lora_b, backend=backend)
    _ops.add_lora_embedding_(y, token_ids, lora_a, lora_b, adapter_ids, scales, ranks, be)
    return y
