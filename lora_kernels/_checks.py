"""Input-validation helpers shared by every op family (each family's ``check_*`` lives beside its schema in
``ops/<family>.py``).

Each public op calls its family's ``check_*`` function before any kernel runs (and before anything is written),
so a bad input raises a clear error naming the tensor and what was expected instead of a silent wrong
answer or a corrupted weight. Shape/dtype/device checks read only metadata and are traceable by
torch.compile; the data-dependent checks (adapter ids in range, finite scales of a tensor) need a
device→host read, so they are skipped while compiling or capturing a CUDA graph, and can be turned off
with ``LORA_KERNELS_CHECK_DATA=0`` (kernels still skip out-of-range ids rather than read out of bounds).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


class LoRAInputError(ValueError):
    """Raised for a bad input to a lora_kernels op (shape, dtype, device, rank, id, scale)."""


def fail(op: str, msg: str) -> None:
    raise LoRAInputError(f"lora_kernels.{op}: {msg}")


def shape_str(t: torch.Tensor) -> str:
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
    return bool(torch.isin(_element_offsets(a) + offs[0], _element_offsets(b) + offs[1]).any())


def _element_offsets(t: torch.Tensor) -> torch.Tensor:
    """Storage offset (in elements, relative to t's first element) of every element of t, int64 on the CPU."""
    idx = torch.zeros((), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        idx = idx.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
    return idx.reshape(-1)


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of t share memory (an expanded or self-overlapping ``as_strided`` view), which an
    in-place kernel writing tiles in parallel cannot handle. Exact: sorted by stride, a layout in which every
    stride exceeds the largest offset the smaller-stride dims reach is overlap-free; other layouts of up to 2^22
    elements are checked element by element, larger ones count as overlapping. False under tracing."""
    if _is_compiling() or t.numel() <= 1:
        return False
    reach = 0
    for st, n in sorted((abs(st), n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if st <= reach:
            break
        reach += st * (n - 1)
    else:
        return False
    if t.numel() > 2**22:
        return True
    offsets = _element_offsets(t)
    return offsets.unique().numel() != offsets.numel()


def check_float(op: str, name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        fail(op, f"{name} must have a floating dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_scale(op: str, scale) -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            fail(op, f"scale must be a Python float or a one-element tensor, got shape {shape_str(scale)}")
        scale = float(scale.item())
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        fail(op, f"scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        fail(op, f"scale must be finite, got {scale}")
    return scale


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    dev0 = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev0:
            fail(op, f"all tensors must be on one device: {items[0][0]} is on {dev0} but {n} is on {t.device}")


def check_adapter_shapes(op: str, N: int, K: int, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> int:
    """A [r, K], B [N, r] with r >= 1, one dtype for A and B, bias [N] or None, for a base weight [N, K]; returns r."""
    if lora_a.dim() != 2 or lora_a.shape[1] != K:
        fail(op, f"lora_a must be [r, K={K}], got shape {shape_str(lora_a)}")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or lora_b.shape[0] != N:
        fail(op, f"lora_b must be [N={N}, r], got shape {shape_str(lora_b)}")
    if lora_b.shape[1] != r:
        fail(op, f"rank mismatch: lora_a has r={r} rows but lora_b has {lora_b.shape[1]} columns")
    if r < 1:
        fail(op, "rank must be at least 1")
    if lora_a.dtype != lora_b.dtype:
        fail(op, f"lora_a dtype {lora_a.dtype} and lora_b dtype {lora_b.dtype} must match")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        fail(op, f"bias must be [N={N}], got shape {shape_str(bias)}")
    return r


def check_lora_settings(where: str, r, alpha, dropout=0.0) -> None:
    """A layer's LoRA hyper-parameters: rank a positive int, dropout in [0, 1), alpha finite (LoRAInputError, a
    ValueError, naming ``where``)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoRAInputError(f"{where}: rank r must be a positive int, got {r!r}")
    if not isinstance(dropout, (int, float)) or not (0.0 <= float(dropout) < 1.0):
        raise LoRAInputError(f"{where}: dropout must be in [0, 1), got {dropout}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(float(alpha)):
        raise LoRAInputError(f"{where}: alpha must be finite, got {alpha}")


def init_lora_settings(layer, where: str, r, alpha, dropout, use_rslora: bool, backend, merge_on_eval: bool) -> None:
    """Check (``check_lora_settings``) and set the adapter settings every LoRA layer carries: ``r``, ``alpha``,
    ``use_rslora``, ``scale`` (``reference.lora_scale``), ``dropout``, ``backend``, ``merge_on_eval``."""
    from .reference import lora_scale

    check_lora_settings(where, r, alpha, dropout)
    layer.r, layer.alpha, layer.use_rslora = r, float(alpha), use_rslora
    layer.scale = lora_scale(alpha, r, use_rslora)
    layer.dropout = float(dropout)
    layer.backend = backend
    layer.merge_on_eval = merge_on_eval


def check_dropout_p(op: str, dropout_p) -> None:
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= float(dropout_p) < 1.0):
        fail(op, f"dropout_p must be in [0, 1), got {dropout_p}")
