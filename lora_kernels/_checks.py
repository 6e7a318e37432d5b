"""Input validation shared by every backend.

Each public op calls its ``check_*`` function before any kernel runs (and before anything is written),
so a bad input raises a clear error naming the tensor and what was expected instead of a silent wrong
answer or a corrupted weight. Shape/dtype/device checks read only metadata and are traceable by
torch.compile; the data-dependent checks (adapter ids in range, finite scales of a tensor) need a
device→host read, so they are skipped while compiling or capturing a CUDA graph, and can be turned off
with ``LORA_KERNELS_CHECK_DATA=0`` (kernels still skip out-of-range ids rather than read out of bounds).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


class LoRAInputError(ValueError):
    """Raised for a bad input to a lora_kernels op (shape, dtype, device, rank, id, scale)."""


def _fail(op: str, msg: str) -> None:
    raise LoRAInputError(f"lora_kernels.{op}: {msg}")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


def data_checks_enabled(*tensors: torch.Tensor) -> bool:
    """Whether value-dependent checks may run now (they need a device→host read)."""
    if os.environ.get("LORA_KERNELS_CHECK_DATA", "1") == "0" or _is_compiling():
        return False
    if any(t.is_cuda for t in tensors) and torch.cuda.is_available():
        if torch.cuda.is_current_stream_capturing():
            return False
    return True


def memory_overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b share at least one element of memory. Exact for dense tensors and for strided views of
    up to 2^22 elements; larger interleaved views of one storage count as overlapping (conservative). False
    under tracing (fake tensors have no storage to compare)."""
    if _is_compiling() or a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    try:
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return False
        offs, spans = [], []
        for t in (a, b):
            off = t.data_ptr() // t.element_size() if t.element_size() == a.element_size() else None
            last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
            offs.append(off)
            spans.append((t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size(), t.numel() == last + 1))
    except (RuntimeError, NotImplementedError):  # fake / functional tensors: nothing to compare
        return False
    (a0, a1, a_dense), (b0, b1, b_dense) = spans
    if not (a0 < b1 and b0 < a1):
        return False
    if (a_dense and b_dense) or offs[1] is None or max(a.numel(), b.numel()) > 2**22:
        return True  # dense tensors cover their whole spans; or too large / mixed element sizes to check exactly

    def elements(t, base):
        idx = torch.zeros((), dtype=torch.int64)
        for n, st in zip(t.shape, t.stride()):
            idx = idx.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
        return idx.reshape(-1) + base

    return bool(torch.isin(elements(a, offs[0]), elements(b, offs[1])).any())


def check_float(op: str, name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        _fail(op, f"{name} must have a floating dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_scale(op: str, scale) -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            _fail(op, f"scale must be a Python float or a one-element tensor, got shape {_shape(scale)}")
        scale = float(scale.item())
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        _fail(op, f"scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        _fail(op, f"scale must be finite, got {scale}")
    return scale


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    dev0 = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev0:
            _fail(op, f"all tensors must be on one device: {items[0][0]} is on {dev0} but {n} is on {t.device}")


def check_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale,
    bias: Optional[torch.Tensor],
    dropout_p: float,
) -> float:
    """Validate lora_linear inputs; returns the scale as a finite float."""
    op = "lora_linear"
    for n, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check_float(op, n, t)
    if bias is not None:
        check_float(op, "bias", bias)
    scale = check_scale(op, scale)
    check_same_device(op, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    if x.dim() < 1:
        _fail(op, "x must have shape [..., K], got a 0-d tensor")
    if weight.dim() != 2:
        _fail(op, f"weight must be 2-D [N, K] (nn.Linear layout), got shape {_shape(weight)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        _fail(op, f"x has {x.shape[-1]} features in its last dim but weight is {_shape(weight)} (expects K={K})")
    if lora_a.dim() != 2 or lora_a.shape[1] != K:
        _fail(op, f"lora_a must be [r, K={K}], got shape {_shape(lora_a)}")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or lora_b.shape[0] != N:
        _fail(op, f"lora_b must be [N={N}, r], got shape {_shape(lora_b)}")
    if lora_b.shape[1] != r:
        _fail(op, f"rank mismatch: lora_a has r={r} rows but lora_b has {lora_b.shape[1]} columns")
    if r < 1:
        _fail(op, "rank must be at least 1")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        _fail(op, f"bias must be [N={N}], got shape {_shape(bias)}")
    if weight.dtype != x.dtype:
        _fail(op, f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    if lora_a.dtype != lora_b.dtype:
        _fail(op, f"lora_a dtype {lora_a.dtype} and lora_b dtype {lora_b.dtype} must match")
    if bias is not None and bias.dtype != x.dtype:
        _fail(op, f"bias dtype {bias.dtype} must equal x dtype {x.dtype}")
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= float(dropout_p) < 1.0):
        _fail(op, f"dropout_p must be in [0, 1), got {dropout_p}")
    return scale


def check_add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    adapter_ids: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor],
    slices: Optional[Sequence[int]] = None,
    meta=None,
) -> None:
    """Validate add_lora inputs (see reference.add_lora_ref for the semantics); with ``meta`` (a
    serving.LoRABatchMeta), also that it describes these adapter_ids (in the same single host read)."""
    op = "add_lora"
    check_float(op, "y", y)
    check_float(op, "x", x)
    if len(lora_a) == 0 or len(lora_a) != len(lora_b):
        _fail(op, f"lora_a and lora_b must be non-empty lists of equal length (one per slice), got {len(lora_a)} and {len(lora_b)}")
    if x.dim() != 2:
        _fail(op, f"x must be 2-D [M, K], got shape {_shape(x)}")
    if y.dim() != 2 or y.shape[0] != x.shape[0]:
        _fail(op, f"y must be 2-D [M={x.shape[0]}, N], got shape {_shape(y)}")
    M, K = x.shape
    a0 = lora_a[0]
    if not isinstance(a0, torch.Tensor) or a0.dim() != 3:
        _fail(op, f"lora_a must be [L, r_max, K], got {_shape(a0) if isinstance(a0, torch.Tensor) else type(a0).__name__}")
    L, r_max = a0.shape[0], a0.shape[1]
    widths = []
    for s, (a, b) in enumerate(zip(lora_a, lora_b)):
        check_float(op, f"lora_a[{s}]", a)
        check_float(op, f"lora_b[{s}]", b)
        if a.dim() != 3 or a.shape != (L, r_max, K):
            _fail(op, f"lora_a[{s}] must be [L={L}, r_max={r_max}, K={K}], got shape {_shape(a)}")
        if b.dim() != 3 or b.shape[0] != L or b.shape[2] != r_max:
            _fail(op, f"lora_b[{s}] must be [L={L}, N_s, r_max={r_max}], got shape {_shape(b)} (rank mismatch with lora_a?)")
        if a.dtype != a0.dtype or b.dtype != a0.dtype:
            _fail(op, f"all lora_a/lora_b must share one dtype: lora_a[0] is {a0.dtype}, slice {s} has {a.dtype}/{b.dtype}")
        widths.append(b.shape[1])
    if slices is not None:
        if [int(w) for w in slices] != widths:
            _fail(op, f"slices {list(slices)} do not match the widths of lora_b {widths}")
    if sum(widths) != y.shape[1]:
        _fail(op, f"slice widths {widths} sum to {sum(widths)} but y has {y.shape[1]} columns")
    if x.dtype != y.dtype:
        _fail(op, f"x dtype {x.dtype} must equal y dtype {y.dtype}")
    if adapter_ids.dtype not in INDEX_DTYPES:
        _fail(op, f"adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
    if adapter_ids.dim() != 1 or adapter_ids.shape[0] != M:
        _fail(op, f"adapter_ids must be [M={M}], got shape {_shape(adapter_ids)}")
    if not isinstance(scales, torch.Tensor) or scales.dim() != 1 or scales.shape[0] != L:
        _fail(op, f"scales must be a 1-D tensor [L={L}], got {_shape(scales) if isinstance(scales, torch.Tensor) else type(scales).__name__}")
    check_float(op, "scales", scales)
    if ranks is not None:
        if ranks.dtype not in INDEX_DTYPES:
            _fail(op, f"ranks must be int32 or int64, got {ranks.dtype}")
        if ranks.dim() != 1 or ranks.shape[0] != L:
            _fail(op, f"ranks must be [L={L}], got shape {_shape(ranks)}")
    tensors = dict(y=y, x=x, adapter_ids=adapter_ids, scales=scales, ranks=ranks)
    tensors.update({f"lora_a[{s}]": a for s, a in enumerate(lora_a)})
    tensors.update({f"lora_b[{s}]": b for s, b in enumerate(lora_b)})
    check_same_device(op, **tensors)
    # y is written slice by slice while x and the weights are still being read: no shared memory.
    for name, t in tensors.items():
        if name != "y" and t is not None and memory_overlaps(y, t):
            _fail(op, f"y overlaps {name} in memory (y is updated in place while {name} is read); pass separate tensors")
    if meta is not None:
        meta.check(adapter_ids, L, op)
    if data_checks_enabled(x):
        # One device->host read for all value checks:
        # [all scales finite, meta ids equal, ids min, ids max, ranks min, ranks max].
        stats = [torch.isfinite(scales).all().to(torch.int64)]
        stats.append((meta.adapter_ids[:M] == adapter_ids.to(torch.int32)).all().to(torch.int64) if meta is not None
                     else torch.ones((), dtype=torch.int64, device=scales.device))
        if M > 0:
            stats += [adapter_ids.min().to(torch.int64), adapter_ids.max().to(torch.int64)]
        if ranks is not None and L > 0:
            stats += [ranks.min().to(torch.int64), ranks.max().to(torch.int64)]
        vals = torch.stack(stats).tolist()
        finite, meta_same, rest = vals[0], vals[1], vals[2:]
        if M > 0:
            lo, hi, rest = rest[0], rest[1], rest[2:]
            if lo < -1 or hi >= L:
                _fail(op, f"adapter id out of range: ids must be in [-1, L={L}), got min {lo}, max {hi}")
        if not finite:
            _fail(op, f"scales must be finite, got {scales.tolist() if L <= 16 else 'non-finite values'}")
        if rest:
            rlo, rhi = rest
            if rlo < 0 or rhi > r_max:
                _fail(op, f"ranks must be in [0, r_max={r_max}], got min {rlo}, max {rhi}")
        if not meta_same:
            _fail(op, "meta was built from different adapter_ids (call meta.update_(adapter_ids))")


def check_merge(
    weight: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> list:
    """Validate (multi-)merge inputs; returns the scales as finite floats."""
    op = "merge_"
    check_float(op, "weight", weight)
    if weight.dim() != 2:
        _fail(op, f"weight must be 2-D [N, K], got shape {_shape(weight)}")
    for d in range(weight.dim()):
        if weight.stride(d) == 0 and weight.shape[d] > 1:
            _fail(op, f"weight has stride 0 in dim {d} (an expanded view whose elements alias); an in-place merge "
                      "needs every element stored once (call .contiguous() and merge that)")
    if len(lora_a) == 0 or not (len(lora_a) == len(lora_b) == len(scales)):
        _fail(op, f"need one scale per adapter and non-empty lists: got {len(lora_a)} lora_a, {len(lora_b)} lora_b, {len(scales)} scales")
    N, K = weight.shape
    out = []
    for i, (a, b, s) in enumerate(zip(lora_a, lora_b, scales)):
        check_float(op, f"lora_a[{i}]", a)
        check_float(op, f"lora_b[{i}]", b)
        if a.dim() != 2 or a.shape[1] != K:
            _fail(op, f"lora_a[{i}] must be [r, K={K}], got shape {_shape(a)}")
        if b.dim() != 2 or b.shape[0] != N:
            _fail(op, f"lora_b[{i}] must be [N={N}, r], got shape {_shape(b)}")
        if b.shape[1] != a.shape[0]:
            _fail(op, f"rank mismatch in adapter {i}: lora_a has r={a.shape[0]} rows, lora_b has {b.shape[1]} columns")
        if a.device != weight.device or b.device != weight.device:
            _fail(op, f"adapter {i} is on {a.device}/{b.device} but weight is on {weight.device}")
        out.append(check_scale(op, s))
    return out
