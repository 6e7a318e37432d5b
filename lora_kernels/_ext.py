"""Loader for the CUDA extension built from ``csrc/``.

The extension only *implements* ops whose schemas and fake kernels are declared in
``lora_kernels/ops/<family>.py`` (it contributes ``TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m)``), so
importing lora_kernels never needs it.

Order of attempts, once per process:
1. ``lora_kernels._C`` built ahead of time by ``LORA_KERNELS_BUILD_EXT=1 pip install -e . --no-build-isolation``;
2. a JIT build with ninja through ``torch.utils.cpp_extension.load`` for the current GPU's arch only, into
   ``$LORA_KERNELS_CACHE_DIR`` (default ``~/.cache/lora_kernels``) keyed by torch / CUDA / arch / source
   hash, under a file lock so concurrent processes build once. ``LORA_KERNELS_NO_JIT=1`` forbids it.
Any failure warns once and records the reason; callers then fall back to another backend.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import List, Optional

import torch

_state = {"loaded": False, "tried": False, "reason": None, "from": None}
_load_lock = threading.Lock()

ENV_NO_JIT = "LORA_KERNELS_NO_JIT"
ENV_CACHE = "LORA_KERNELS_CACHE_DIR"
ENV_VERBOSE = "LORA_KERNELS_VERBOSE_BUILD"


def is_loaded() -> bool:
    return _state["loaded"]


def was_tried() -> bool:
    """Whether a load was attempted in this process (it is attempted once)."""
    return _state["tried"]


def load_failure_reason() -> Optional[str]:
    return _state["reason"]


def loaded_from() -> Optional[str]:
    return _state["from"]


def csrc_dir() -> Optional[Path]:
    """The csrc/ folder of a source checkout or editable install (None in a plain wheel)."""
    for cand in (Path(__file__).resolve().parent.parent / "csrc", Path(__file__).resolve().parent / "csrc"):
        if cand.is_dir() and any(cand.glob("*.cu")):
            return cand
    return None


def sources(root: Path) -> List[Path]:
    return sorted(root.glob("*.cu")) + sorted(root.glob("*.cpp"))


def arch_flags(major: int, minor: int) -> List[str]:
    """nvcc -gencode flags for one GPU: sm_90a on Hopper (wgmma/TMA), plain sm_XY elsewhere."""
    suffix = "a" if (major, minor) == (9, 0) else ""
    arch = f"{major}{minor}{suffix}"
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def nvcc_flags() -> List[str]:
    """Our nvcc flags. No --use_fast_math: it implies -ftz=true, which would flush fp32 subnormals and break
    the bit-exact merge round trip. The C++ standard is left to torch (c++17 on torch<=2.12, c++20 after)."""
    return ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


def _fail(reason: str) -> bool:
    _state["reason"] = reason
    warnings.warn(f"lora_kernels: CUDA extension unavailable, falling back to triton/torch: {reason}", RuntimeWarning, stacklevel=3)
    return False


def load(verbose: Optional[bool] = None) -> bool:
    """Load (building if needed) the CUDA extension; returns whether it is loaded. Never raises.
    Thread-safe: a second caller waits for a build in progress and gets its outcome."""
    with _load_lock:
        if _state["loaded"] or _state["tried"]:
            return _state["loaded"]
        _state["tried"] = True
        return _load(verbose)


def _load(verbose: Optional[bool]) -> bool:
    try:
        from . import _C  # noqa: F401  (ahead-of-time build registers its kernels on import)

        _state.update(loaded=True, reason=None)
        _state["from"] = "lora_kernels._C (ahead-of-time build)"
        return True
    except ImportError:
        pass
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return _fail("no CUDA GPU or CPU-only torch build")
    if os.environ.get(ENV_NO_JIT, "0") == "1":
        return _fail(f"{ENV_NO_JIT}=1 forbids the JIT build")
    root = csrc_dir()
    if root is None:
        return _fail("csrc/ sources not found (install from a source checkout, or build ahead of time)")
    try:
        import fcntl  # POSIX only; imported here so that `import lora_kernels` works on Windows

        from torch.utils import cpp_extension
    except Exception as e:  # pragma: no cover
        return _fail(f"JIT build unavailable: {type(e).__name__}: {e}")
    srcs = sources(root)
    major, minor = torch.cuda.get_device_capability()
    digest = hashlib.sha256()
    for s in srcs + sorted(root.glob("*.h")) + sorted(root.glob("*.cuh")):
        digest.update(s.name.encode())
        digest.update(s.read_bytes())
    tag = f"torch{torch.__version__}_cu{torch.version.cuda}_sm{major}{minor}_{digest.hexdigest()[:12]}".replace("+", "_").replace(".", "_")
    build_dir = Path(os.environ.get(ENV_CACHE, Path.home() / ".cache" / "lora_kernels")) / tag
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}{'a' if (major, minor) == (9, 0) else ''}"
        try:
            with open(build_dir / ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    # torch's own lock file is deleted in a `finally`, so a build killed by a signal leaves it
                    # behind and every later build in this directory would wait for it forever. Holding our
                    # flock, no other process is building here: a leftover file is stale.
                    (build_dir / "lock").unlink(missing_ok=True)
                    cpp_extension.load(
                        name="lora_kernels_cuda",
                        sources=[str(s) for s in srcs],
                        extra_cflags=["-O3"],
                        extra_cuda_cflags=nvcc_flags() + arch_flags(major, minor),
                        extra_include_paths=[str(root)],
                        build_directory=str(build_dir),
                        is_python_module=False,
                        verbose=bool(verbose if verbose is not None else os.environ.get(ENV_VERBOSE) == "1"),
                    )
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            if old_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    except Exception as e:
        return _fail(f"JIT build failed: {type(e).__name__}: {str(e)[-2000:]}")
    _state.update(loaded=True, reason=None)
    _state["from"] = str(build_dir)
    return True
