"""Build script: pure-Python by default; the CUDA extension only when asked for and possible.

    pip install -e .                                                   # pure Python (reference + Triton)
    LORA_KERNELS_BUILD_EXT=1 pip install -e . --no-deps --no-build-isolation   # + ahead-of-time CUDA build

Without the ahead-of-time build, lora_kernels/_ext.py builds csrc/ with ninja on first GPU use.
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _ext_modules():
    if os.environ.get("LORA_KERNELS_BUILD_EXT", "0") != "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("lora_kernels: LORA_KERNELS_BUILD_EXT=1 but torch is not importable (use --no-build-isolation)", file=sys.stderr)
        raise
    if torch.version.cuda is None or CUDA_HOME is None:
        raise RuntimeError("lora_kernels: LORA_KERNELS_BUILD_EXT=1 needs a CUDA build of torch and nvcc (CUDA_HOME)")
    sys.path.insert(0, str(ROOT / "lora_kernels"))
    import _ext  # noqa: E402  (only its flag helpers; importing the package would need it installed)

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a;9.0+PTX"  # PTX: newer GPUs JIT it instead of failing
    srcs = [str(p.relative_to(ROOT)) for p in _ext.sources(ROOT / "csrc")]
    ext = CUDAExtension(
        name="lora_kernels._C",
        sources=srcs,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": _ext.nvcc_flags()},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
