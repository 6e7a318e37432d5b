"""Shared test setup.

* Without a CUDA GPU, ``TRITON_INTERPRET=1`` is set before any kernel module is imported, so the Triton
  kernels run on the CPU interpreter (fp32/fp16 only; bf16 is GPU-only).
* One tolerance table (relative Frobenius-norm error vs a float64 reference) for every test.
"""

import os

if not os.environ.get("LORA_KERNELS_TEST_KEEP_ENV"):
    try:
        import torch as _torch

        _has_gpu = _torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_gpu = False
    if not _has_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.pop("LORA_KERNELS_BACKEND", None)

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Relative-norm error bounds vs the float64 reference.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,  # exact fp32 (ieee) paths
    "tf32": 5e-4,  # fp32 inputs through tf32 tensor cores
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / max(‖expected‖, tiny), in float64."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    denom = e.norm().item()
    num = (a - e).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close_rel(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual.detach().to(torch.float64)).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (or a sentinel for ints) before a kernel writes it."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-12345)


def gpu_devices():
    return ["cuda"] if HAS_CUDA else []


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
