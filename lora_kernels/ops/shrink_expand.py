"""The shrink / expand op family: the two halves of the multi-adapter op as public ops of their own
(``lora_shrink``, ``lora_expand_``), for callers that keep the r-wide intermediate themselves: vLLM's
``PunicaWrapper.add_shrink`` / ``add_expand`` (fully-sharded tensor-parallel layers, which all-gather ``xa``
between the halves) and ``add_lora_embedding`` (the shrink of an embedding is a row lookup, so only the expand
is a kernel).

Semantics: :func:`lora_kernels.reference.lora_shrink_ref` / :func:`lora_kernels.reference.lora_expand_ref`.
Launchers: ``torch/shrink_expand.py``, ``triton/shrink_expand.py``, ``cuda/shrink_expand.py`` (the CUDA
extension's ``cuda_multi_lora_shrink`` / ``cuda_multi_lora_expand_`` kernels, declared in ``ops/multi_lora.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import (
    INDEX_DTYPES,
    check_float,
    check_same_device,
    check_scale,
    data_checks_enabled,
    fail,
    has_internal_overlap,
    memory_overlaps,
    shape_str,
)
from ._registry import add_rows, define, impl_all_devices, launcher, lib, mark_written

SHRINK = "lora_shrink"
EXPAND = "lora_expand_"

__all__ = ["check_lora_shrink", "check_lora_expand", "shrink_out_dtype"]


def shrink_out_dtype(x_dtype: torch.dtype, a_dtype: torch.dtype) -> torch.dtype:
    """xa is fp32, or fp64 when x or lora_a is fp64 (the torch backend keeps double precision)."""
    return torch.float64 if torch.float64 in (x_dtype, a_dtype) else torch.float32


def _check_no_grad(op, **tensors):
    """Both ops are inference ops (no backward on any backend): with grad mode on, an input that requires grad is an
    error rather than a silently detached result."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                fail(op, f"{name} requires grad, but {op} is an inference op (not differentiable on any backend); "
                         "call it under torch.no_grad() or torch.inference_mode()")


def _check_ids_and_ranks(op, adapter_ids, M, ranks, L):
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in INDEX_DTYPES:
        fail(op, f"adapter_ids must be an int32 or int64 tensor, got "
                 f"{adapter_ids.dtype if isinstance(adapter_ids, torch.Tensor) else type(adapter_ids).__name__}")
    if adapter_ids.dim() != 1 or adapter_ids.shape[0] != M:
        fail(op, f"adapter_ids must be [M={M}], got shape {shape_str(adapter_ids)}")
    if ranks is not None:
        if not isinstance(ranks, torch.Tensor) or ranks.dtype not in INDEX_DTYPES:
            fail(op, f"ranks must be an int32 or int64 tensor, got "
                     f"{ranks.dtype if isinstance(ranks, torch.Tensor) else type(ranks).__name__}")
        if ranks.dim() != 1 or ranks.shape[0] != L:
            fail(op, f"ranks must be [L={L}], got shape {shape_str(ranks)}")


def _check_values(op, x, adapter_ids, ranks, L, r_max, scales=None):
    """The value checks (one device->host read): ids in [-1, L), ranks in [0, r_max], scales finite."""
    if not data_checks_enabled(x):
        return
    M = adapter_ids.shape[0]
    dev = adapter_ids.device
    stats = [torch.isfinite(scales).all().to(torch.int64) if scales is not None else torch.ones((), dtype=torch.int64, device=dev)]
    if M > 0:
        stats += [adapter_ids.min().to(torch.int64), adapter_ids.max().to(torch.int64)]
    if ranks is not None and L > 0:
        stats += [ranks.min().to(torch.int64).to(dev), ranks.max().to(torch.int64).to(dev)]
    vals = torch.stack(stats).tolist()
    finite, rest = vals[0], vals[1:]
    if M > 0:
        lo, hi, rest = rest[0], rest[1], rest[2:]
        if lo < -1 or hi >= L:
            fail(op, f"adapter id out of range: adapter_ids must be in [-1, L={L}), got min {lo}, max {hi}")
    if rest:
        rlo, rhi = rest
        if rlo < 0 or rhi > r_max:
            fail(op, f"ranks must be in [0, r_max={r_max}], got min {rlo}, max {rhi}")
    if not finite:
        fail(op, f"scales must be finite, got {scales.tolist() if L <= 16 else 'non-finite values'}")


def check_lora_shrink(x, lora_a, adapter_ids, scale, ranks) -> float:
    """Validate lora_shrink inputs (see reference.lora_shrink_ref); returns the scale as a float."""
    op = SHRINK
    check_float(op, "x", x)
    check_float(op, "lora_a", lora_a)
    _check_no_grad(op, x=x, lora_a=lora_a)
    if x.dim() != 2:
        fail(op, f"x must be 2-D [M, K], got shape {shape_str(x)}")
    M, K = x.shape
    if lora_a.dim() != 3 or lora_a.shape[2] != K:
        fail(op, f"lora_a must be [L, r_max, K={K}] (K from x {shape_str(x)}), got shape {shape_str(lora_a)}")
    L, r_max = lora_a.shape[0], lora_a.shape[1]
    _check_ids_and_ranks(op, adapter_ids, M, ranks, L)
    scale = check_scale(op, scale)
    check_same_device(op, x=x, lora_a=lora_a, adapter_ids=adapter_ids, ranks=ranks)
    _check_values(op, x, adapter_ids, ranks, L, r_max)
    return scale


def check_lora_expand(y, xa, lora_b, adapter_ids, scales, ranks, col_offset) -> int:
    """Validate lora_expand_ inputs (see reference.lora_expand_ref); returns col_offset as an int."""
    op = EXPAND
    check_float(op, "y", y)
    check_float(op, "xa", xa)
    check_float(op, "lora_b", lora_b)
    _check_no_grad(op, y=y, xa=xa, lora_b=lora_b, scales=scales)
    if y.dim() != 2:
        fail(op, f"y must be 2-D [M, N_total], got shape {shape_str(y)}")
    M = y.shape[0]
    if lora_b.dim() != 3:
        fail(op, f"lora_b must be [L, N, r_max], got shape {shape_str(lora_b)}")
    L, N, r_max = lora_b.shape
    if xa.dim() != 2 or xa.shape[0] != M or xa.shape[1] != r_max:
        fail(op, f"xa must be [M={M}, r_max={r_max}] (M from y {shape_str(y)}, r_max from lora_b "
                 f"{shape_str(lora_b)}), got shape {shape_str(xa)}")
    if isinstance(col_offset, bool) or not isinstance(col_offset, int):
        fail(op, f"col_offset must be an int, got {type(col_offset).__name__}")
    if col_offset < 0 or col_offset + N > y.shape[1]:
        fail(op, f"col_offset={col_offset} puts the N={N} columns of lora_b at [{col_offset}, {col_offset + N}), "
                 f"outside y's {y.shape[1]} columns")
    _check_ids_and_ranks(op, adapter_ids, M, ranks, L)
    if not isinstance(scales, torch.Tensor) or scales.dim() != 1 or scales.shape[0] != L:
        fail(op, f"scales must be a 1-D tensor [L={L}], got "
                 f"{shape_str(scales) if isinstance(scales, torch.Tensor) else type(scales).__name__}")
    check_float(op, "scales", scales)
    tensors = dict(y=y, xa=xa, lora_b=lora_b, adapter_ids=adapter_ids, scales=scales, ranks=ranks)
    check_same_device(op, **tensors)
    if has_internal_overlap(y):
        fail(op, f"y (shape {shape_str(y)}, strides {list(y.stride())}) has elements that share memory; it is updated "
                 "in place, so every element must be stored once (pass a contiguous y)")
    for name, t in tensors.items():
        if name != "y" and t is not None and memory_overlaps(y, t):
            fail(op, f"y overlaps {name} in memory (y is updated in place while {name} is read); pass separate tensors")
    _check_values(op, y, adapter_ids, ranks, L, r_max, scales)
    return int(col_offset)


define([
    # xa[t, :rank_i] = scale · x[t]·lora_a[i, :rank_i]ᵀ for i = adapter_ids[t] >= 0; every other entry 0.
    # A new [M, r_max] tensor, fp32 (fp64 when x or lora_a is fp64).
    "lora_shrink(Tensor x, Tensor lora_a, Tensor adapter_ids, float scale, Tensor? ranks, str backend) -> Tensor",
    # y[t, col_offset : col_offset + N] += scales[i] · xa[t, :rank_i]·lora_b[i, :, :rank_i]ᵀ for i = adapter_ids[t]
    # >= 0, in place (fp32 accumulation with y's old value, one rounding); rows with id -1 untouched.
    "lora_expand_(Tensor(a!) y, Tensor xa, Tensor lora_b, Tensor adapter_ids, Tensor scales, Tensor? ranks, "
    "int col_offset, str backend) -> ()",
])

# Launcher signatures: shrink (x, lora_a, adapter_ids, scale, ranks) -> xa;
# expand (y, xa, lora_b, adapter_ids, scales, ranks, col_offset) -> None (in place on y).
add_rows({
    ("lora_shrink", "torch"): "lora_kernels.torch.shrink_expand:lora_shrink_torch",
    ("lora_shrink", "triton"): "lora_kernels.triton.shrink_expand:lora_shrink_triton",
    ("lora_shrink", "cuda"): "lora_kernels.cuda.shrink_expand:lora_shrink_cuda",
    ("lora_expand", "torch"): "lora_kernels.torch.shrink_expand:lora_expand_torch",
    ("lora_expand", "triton"): "lora_kernels.triton.shrink_expand:lora_expand_triton",
    ("lora_expand", "cuda"): "lora_kernels.cuda.shrink_expand:lora_expand_cuda",
}, public={"lora_shrink": ("lora_shrink",), "lora_expand": ("lora_expand",)})


def _lora_shrink(x, lora_a, adapter_ids, scale, ranks, backend):
    if x.shape[0] == 0 or lora_a.shape[1] == 0:
        return torch.zeros((x.shape[0], lora_a.shape[1]), dtype=shrink_out_dtype(x.dtype, lora_a.dtype), device=x.device)
    return launcher("lora_shrink", backend)(x, lora_a, adapter_ids, scale, ranks)


def _lora_expand_(y, xa, lora_b, adapter_ids, scales, ranks, col_offset, backend):
    if y.shape[0] == 0 or lora_b.shape[1] == 0 or lora_b.shape[2] == 0:
        return
    launcher("lora_expand", backend)(y, xa, lora_b, adapter_ids, scales, ranks, col_offset)
    mark_written(y)


impl_all_devices("lora_shrink", _lora_shrink)
impl_all_devices("lora_expand_", _lora_expand_)


@torch.library.register_fake("lora_kernels::lora_shrink", lib=lib)
def _lora_shrink_fake(x, lora_a, adapter_ids, scale, ranks, backend):
    return x.new_empty((x.shape[0], lora_a.shape[1]), dtype=shrink_out_dtype(x.dtype, lora_a.dtype))


@torch.library.register_fake("lora_kernels::lora_expand_", lib=lib)
def _lora_expand_fake(y, xa, lora_b, adapter_ids, scales, ranks, col_offset, backend):
    return None
