"""Backend selection: the one place where cuda / triton / torch is chosen.

Priority: explicit ``backend=`` argument > ``LORA_KERNELS_BACKEND`` env var > auto.
Auto walks the op's preference order and takes the first backend that can run the inputs, quietly.
An explicit request (argument or env var) that cannot run the inputs raises
:class:`BackendUnavailableError` listing every reason. Which backend implements which op comes from the one
dispatch table, ``lora_kernels.ops.TABLE`` (each op family adds its rows).

:func:`why_not` is a pure query (tensor metadata, environment variables, module state). The CUDA extension is
loaded (JIT-built on first use) by :func:`resolve_backend`, right before a launch that may use it, and never
while tracing; ``lora_kernels.load_extension()`` does it explicitly.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from typing import Dict, List, Optional

import torch

from . import _ext
from .ops import _registry

BACKENDS = ("cuda", "triton", "torch")
ENV_BACKEND = "LORA_KERNELS_BACKEND"

# Dtypes a compiled backend handles (the torch backend handles every float dtype, float64 included).
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


def implemented_ops(backend: str) -> list:
    return _registry.implemented_ops(backend)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    """Whether triton is installed (asked once: find_spec took 118 µs per call here, paid by every op call)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(backend: str, op: str, tensors: List[torch.Tensor]) -> List[str]:
    """Reasons ``backend`` cannot run public op ``op`` on ``tensors`` (empty list = it can). No side effects."""
    return _why_not(backend, op, tensors, assume_loaded=False)


def _why_not(backend: str, op: str, tensors: List[torch.Tensor], assume_loaded: bool) -> List[str]:
    if backend not in BACKENDS:
        return [f"unknown backend {backend!r}; choose one of {BACKENDS}"]
    reasons: List[str] = []
    if not _registry.implements(op, backend):
        reasons.append(f"{backend} has no kernel for {op}")
    if backend == "torch":
        return reasons
    devices = {t.device.type for t in tensors}
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    bad = sorted(str(d) for d in dtypes if d not in _KERNEL_DTYPES)
    if bad:
        reasons.append(f"{backend} kernels take fp16/bf16/fp32, got {', '.join(bad)}")
    if backend == "triton":
        if not _triton_importable():
            reasons.append("triton is not installed")
        if "cpu" in devices:
            if not triton_interpreting():
                reasons.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set")
            if torch.bfloat16 in dtypes:
                reasons.append("the Triton CPU interpreter does not support bfloat16")
        if devices - {"cpu", "cuda"}:
            reasons.append(f"triton runs on cuda (or cpu when interpreting), got {sorted(devices)}")
    else:  # cuda
        if devices != {"cuda"}:
            reasons.append(f"the CUDA extension needs CUDA tensors, got {sorted(devices)}")
        elif not (assume_loaded or _ext.is_loaded()):
            reason = _ext.load_failure_reason() or "not built yet; call lora_kernels.load_extension() before tracing"
            reasons.append(f"the CUDA extension is not loaded ({reason})")
    return reasons


def auto_order(op: str, tensors: List[torch.Tensor]) -> tuple:
    """Preference order for ``backend=None``. Per-op, per-shape rules live here and only here.

    On CUDA tensors Triton comes first: the CUDA extension has no GPU-measured advantage yet (the README's
    status table says what has been measured); ``backend="cuda"`` selects it explicitly."""
    if any(t.is_cuda for t in tensors):
        return ("triton", "cuda", "torch")
    if triton_interpreting():
        return ("triton", "torch")  # the CPU interpreter (tests); see why_not
    return ("torch",)  # decided without asking triton: this path is every CPU / MPS call's per-call cost


def _prepare(backend: str, op: str, tensors: List[torch.Tensor]) -> None:
    """The one side effect of choosing a backend: build/load the CUDA extension before its first launch, when
    that is all that stands between these inputs and the cuda backend (never while tracing)."""
    if (
        backend == "cuda"
        and not _ext.is_loaded()
        and not _ext.was_tried()
        and not torch.compiler.is_compiling()
        and not _why_not(backend, op, tensors, assume_loaded=True)
    ):
        _ext.load()


def _register_dtensor_rules(tensors: List[torch.Tensor]) -> None:
    """DTensor inputs run through lora_kernels.distributed's rules, registered when that package is imported: do it
    on first sight of a DTensor (``import lora_kernels`` itself never imports torch.distributed)."""
    dt = sys.modules.get("torch.distributed.tensor")
    if dt is not None and "lora_kernels.distributed" not in sys.modules and any(isinstance(t, dt.DTensor) for t in tensors):
        importlib.import_module("lora_kernels.distributed")


def resolve_backend(op: str, *tensors: Optional[torch.Tensor], backend: Optional[str] = None) -> str:
    """Pick the backend for public op ``op`` on ``tensors``: argument > ``LORA_KERNELS_BACKEND`` > auto."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    _register_dtensor_rules(ts)
    requested = backend if backend is not None else (os.environ.get(ENV_BACKEND) or None)
    if requested is not None:
        requested = requested.lower()
        if requested == "auto":
            requested = None
    if requested is not None:
        if requested not in BACKENDS:
            raise BackendUnavailableError(f"unknown backend {requested!r}; choose one of {BACKENDS} or 'auto'")
        _prepare(requested, op, ts)
        reasons = why_not(requested, op, ts)
        if reasons:
            src = "argument" if backend is not None else f"${ENV_BACKEND}"
            raise BackendUnavailableError(
                f"backend {requested!r} (from {src}) cannot run lora_kernels.{op}: " + "; ".join(reasons)
            )
        return requested
    for cand in auto_order(op, ts):
        _prepare(cand, op, ts)
        if not why_not(cand, op, ts):
            return cand
    return "torch"


def backend_report() -> Dict[str, str]:
    """Human-readable availability of each backend on this machine (for ``lora-kernels info``)."""
    out = {"torch": f"available (every device); ops: {implemented_ops('torch')}"}
    if not _triton_importable():
        out["triton"] = "unavailable: triton is not installed"
    elif torch.cuda.is_available():
        out["triton"] = f"available on cuda; ops: {implemented_ops('triton') or 'none yet'}"
    elif triton_interpreting():
        out["triton"] = f"available on cpu via TRITON_INTERPRET=1 (slow, fp32/fp16 only); ops: {implemented_ops('triton') or 'none yet'}"
    else:
        out["triton"] = "unavailable here: no CUDA GPU (set TRITON_INTERPRET=1 to run kernels on the CPU interpreter)"
    if _ext.is_loaded():
        out["cuda"] = f"available (extension loaded from {_ext.loaded_from()}); ops: {implemented_ops('cuda')}"
    elif not torch.cuda.is_available():
        out["cuda"] = "unavailable: no CUDA GPU visible to torch" + ("" if torch.version.cuda else " (CPU-only torch build)")
    else:
        reason = _ext.load_failure_reason()
        out["cuda"] = f"not loaded: {reason}" if reason else "not built yet (built with ninja on first CUDA use)"
    return out
