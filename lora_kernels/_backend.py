"""Backend selection: the one place where cuda / triton / torch is chosen.

Priority: explicit ``backend=`` argument > ``LORA_KERNELS_BACKEND`` env var > auto.
Auto walks the op's preference order and takes the first backend that can run the inputs, quietly.
An explicit request (argument or env var) that cannot run the inputs raises
:class:`BackendUnavailableError` listing every reason. The function reads only tensor metadata,
environment variables and module state, so Dynamo can trace it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional

import torch

BACKENDS = ("cuda", "triton", "torch")
ENV_BACKEND = "LORA_KERNELS_BACKEND"

# Dtypes a compiled backend handles (the reference handles every float dtype, float64 included).
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


def _implements(backend: str, op: str) -> bool:
    from .ops._library import has_launcher  # the one table of which backend implements which op

    return has_launcher(op, backend)


def implemented_ops(backend: str) -> list:
    return [op for op in ("lora_linear", "add_lora", "merge") if _implements(backend, op)]


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(backend: str, op: str, tensors: List[torch.Tensor]) -> List[str]:
    """Reasons ``backend`` cannot run ``op`` on ``tensors`` (empty list = it can)."""
    if backend == "torch":
        return []
    reasons: List[str] = []
    if not _implements(backend, op):
        reasons.append(f"{backend} has no kernel for {op}")
    devices = {t.device.type for t in tensors}
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    bad = sorted(str(d) for d in dtypes if d not in _KERNEL_DTYPES)
    if bad:
        reasons.append(f"{backend} kernels take fp16/bf16/fp32, got {', '.join(bad)}")
    if backend == "triton":
        if not _triton_importable():
            reasons.append("triton is not installed")
        if "cpu" in devices:
            if not _interpreting():
                reasons.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set")
            if torch.bfloat16 in dtypes:
                reasons.append("the Triton CPU interpreter does not support bfloat16")
        if devices - {"cpu", "cuda"}:
            reasons.append(f"triton runs on cuda (or cpu when interpreting), got {sorted(devices)}")
    elif backend == "cuda":
        if devices != {"cuda"}:
            reasons.append(f"the CUDA extension needs CUDA tensors, got {sorted(devices)}")
        else:
            from . import _ext

            if not _ext.is_loaded():
                reason = _ext.load_failure_reason()
                if reason is None and not torch.compiler.is_compiling():
                    _ext.load()  # lazy JIT build on first CUDA use; never while tracing
                    reason = _ext.load_failure_reason()
                if not _ext.is_loaded():
                    reasons.append(f"the CUDA extension is not loaded ({reason or 'not built yet; call lora_kernels.load_extension() before tracing'})")
    else:
        reasons.append(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return reasons


def auto_order(op: str, tensors: List[torch.Tensor]) -> tuple:
    """Preference order for ``backend=None``. Per-op, per-shape rules live here and only here."""
    if any(t.device.type == "cuda" for t in tensors):
        # Triton first: its kernels are verified under the interpreter in CI, while the CUDA extension's
        # kernels have so far only been compiled (no GPU was lent to the sessions that wrote them). Once
        # tests/test_cuda_ext.py passes on a GPU, this becomes a per-op, per-shape rule backed by the
        # measurement tables in benchmarks/results/. backend="cuda" (or the env var) selects it explicitly.
        return ("triton", "cuda", "torch")
    return ("triton", "torch")  # triton only when interpreting on the CPU (see why_not)


def resolve_backend(op: str, *tensors: Optional[torch.Tensor], backend: Optional[str] = None) -> str:
    """Pick the backend for ``op`` on ``tensors``: argument > ``LORA_KERNELS_BACKEND`` > auto."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    requested = backend if backend is not None else (os.environ.get(ENV_BACKEND) or None)
    if requested is not None:
        requested = requested.lower()
        if requested == "auto":
            requested = None
    if requested is not None:
        if requested not in BACKENDS:
            raise BackendUnavailableError(f"unknown backend {requested!r}; choose one of {BACKENDS} or 'auto'")
        reasons = why_not(requested, op, ts)
        if reasons:
            src = "argument" if backend is not None else f"${ENV_BACKEND}"
            raise BackendUnavailableError(
                f"backend {requested!r} (from {src}) cannot run lora_kernels.{op}: " + "; ".join(reasons)
            )
        return requested
    for cand in auto_order(op, ts):
        if not why_not(cand, op, ts):
            return cand
    return "torch"


def backend_report() -> Dict[str, str]:
    """Human-readable availability of each backend on this machine (for ``lora-kernels info``)."""
    from . import _ext

    out = {"torch": "available (reference, every op, every device)"}
    if not _triton_importable():
        out["triton"] = "unavailable: triton is not installed"
    elif torch.cuda.is_available():
        out["triton"] = f"available on cuda; ops: {implemented_ops('triton') or 'none yet'}"
    elif _interpreting():
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
