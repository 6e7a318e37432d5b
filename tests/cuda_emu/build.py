"""Build the CUDA extension of csrc/ for the CPU emulator (tests/cuda_emu/cuda_emu.h) and load it.

The emulated build is the real extension with three differences: every ``csrc/*.cu`` file is copied with its
``kernel<<<grid, block, smem, stream>>>(args)`` launches rewritten to ``::lk_emu::launch(kernel, grid, block,
smem, stream, args)`` and ``cuda_emu.h`` included first, then compiled by the host C++ compiler; the glue
(``csrc/*_torch.cpp``) is compiled with ``-DLORA_KERNELS_EMULATE_CUDA`` (see csrc/torch_glue.h), so the ops
``torch.ops.lora_kernels.cuda_*`` register for CPU tensors; and nothing links against CUDA (only its headers are
used, for the fp16/bf16 types and their host conversions).

``load()`` returns the loaded module, or raises ``EmulatorUnavailable`` with the reason (no C++ compiler, no CUDA
headers). The build is cached under ``$LORA_KERNELS_EMU_BUILD_DIR`` (default: a directory in the system temp dir
named by a hash of the sources and flags).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
EMU_DIR = os.path.dirname(os.path.abspath(__file__))
PRELUDE = os.path.join(EMU_DIR, "cuda_emu.h")
NAME = "lora_kernels_emu"

# kernel<...><<<grid, block, smem, stream>>>(args);  (one launch per statement, no ';' inside)
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;<>]*>)?)\s*<<<([^;]*?)>>>\s*\(([^;]*)\)\s*;")


class EmulatorUnavailable(RuntimeError):
    pass


def cuda_include_dir() -> str | None:
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    cands += ["/usr/local/cuda/include"]
    for c in cands:
        if os.path.exists(os.path.join(c, "cuda_bf16.h")) and os.path.exists(os.path.join(c, "cuda_runtime.h")):
            return c
    return None


def rewrite_launches(src: str) -> tuple[str, int]:
    """Source of a .cu file with its <<<...>>> launches turned into lk_emu::launch calls; (text, count)."""
    out, n = _LAUNCH.subn(lambda m: f"::lk_emu::launch({m.group(1)}, {m.group(2)}, {m.group(3)});", src)
    if "<<<" in out:
        raise EmulatorUnavailable("a kernel launch in csrc/ has a form the emulator's rewrite does not handle")
    return out, n


FLAGS = ["-O1", "-std=c++20", "-DLORA_KERNELS_EMULATE_CUDA", "-ffp-contract=off", "-fno-fast-math",
         "-Wno-unknown-pragmas", "-Wno-attributes",
         "-DLORA_KERNELS_BWD_CHUNK_BYTES=4096"]  # the backward's row chunks: a few rows at the tests' shapes


def load(verbose: bool = False):
    """Build (or reuse) and import the emulated extension; returns the module."""
    import torch.utils.cpp_extension as cpp_ext

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise EmulatorUnavailable(f"no C++ compiler ({cxx}) on PATH")
    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        raise EmulatorUnavailable("CUDA headers (cuda_bf16.h) not found: set CUDA_HOME")
    if platform.machine() not in ("x86_64", "AMD64"):
        raise EmulatorUnavailable(f"the emulator's fiber switch is x86-64 only (this is {platform.machine()})")
    flags = FLAGS

    cu = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))
    cpp = sorted(f for f in os.listdir(CSRC) if f.endswith(".cpp"))
    h = hashlib.sha256()
    for f in sorted(os.listdir(CSRC)):
        with open(os.path.join(CSRC, f), "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read())
    for f in (PRELUDE, os.path.abspath(__file__)):
        with open(f, "rb") as fh:
            h.update(fh.read())
    h.update(" ".join(flags).encode() + cuda_inc.encode() + sys.version.encode())
    import torch

    h.update(torch.__version__.encode())
    build_dir = os.environ.get("LORA_KERNELS_EMU_BUILD_DIR") or os.path.join(
        tempfile.gettempdir(), f"lora_kernels_emu_{h.hexdigest()[:16]}")
    src_dir = os.path.join(build_dir, "src")
    os.makedirs(src_dir, exist_ok=True)

    sources = []
    for f in cu:
        with open(os.path.join(CSRC, f)) as fh:
            text, n = rewrite_launches(fh.read())
        body = f'#include "{PRELUDE}"\n#line 1 "{os.path.join(CSRC, f)}"\n{text}'
        dst = os.path.join(src_dir, f + ".emu.cpp")
        if not os.path.exists(dst) or open(dst).read() != body:
            with open(dst, "w") as fh:
                fh.write(body)
        sources.append(dst)
    sources += [os.path.join(CSRC, f) for f in cpp]

    mod = cpp_ext.load(
        name=NAME,
        sources=sources,
        extra_cflags=flags,
        extra_include_paths=[CSRC, cuda_inc],
        build_directory=build_dir,
        with_cuda=False,
        verbose=verbose,
    )
    # Registered under its name so that other tests can tell the cuda_* ops now have CPU kernels in this process.
    sys.modules.setdefault(NAME, mod)
    return mod


if __name__ == "__main__":
    mod = load(verbose=True)
    print(mod.__file__, mod.version())
