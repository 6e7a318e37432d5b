"""Shared test setup.

* Without a CUDA GPU, ``TRITON_INTERPRET=1`` is set before any kernel module is imported, so the Triton
  kernels run on the CPU interpreter (fp32/fp16 only; bf16 is GPU-only).
* One tolerance table (relative Frobenius-norm error vs a float64 reference) for every test, and for 16-bit
  kernels FlashAttention's rule on top of it (``assert_fa_rule``): the kernel's error may be at most twice the
  error of the same computation done by plain torch in the same low precision, plus a small floor. Float64
  stays the oracle for both.
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


# Floor of the FlashAttention rule, in relative-norm units (about a tenth of an fp16 ulp at 1.0): keeps the rule
# from demanding more than rounding noise where torch's low-precision result happens to be nearly exact.
FA_ATOL = 1e-4


def assert_fa_rule(actual, expected, lowp, what="", atol=FA_ATOL):
    """err(kernel) ≤ 2·err(torch in the same low precision) + atol, both measured against the float64 oracle."""
    assert actual.shape == expected.shape == lowp.shape, what
    e_kernel, e_torch = rel_err(actual, expected), rel_err(lowp, expected)
    assert e_kernel <= 2 * e_torch + atol, (
        f"{what}: kernel error {e_kernel:.3e} > 2 x torch-{lowp.dtype} error {e_torch:.3e} + {atol:.0e}"
    )


def lora_linear_lowp(x, w, a, b, bias, scale, p, seed, dy):
    """The LoRA linear layer by plain torch autograd in the inputs' own precision (the FlashAttention rule's
    baseline): returns (y, (dx, dA, dB, dW0))."""
    from lora_kernels import reference as ref

    x, w, a, b = (t.detach().clone().requires_grad_(True) for t in (x, w, a, b))
    y = ref.lora_linear_ref(x, w, a, b, scale, bias, p, seed)
    y.backward(dy)
    return y.detach(), (x.grad, a.grad, b.grad, w.grad)


def add_lora_lowp(y, x, lora_a, lora_b, adapter_ids, scales, ranks):
    """add_lora by plain torch in the inputs' own precision (the adapters'), token by token (the FlashAttention
    rule's baseline); returns a new y."""
    y = y.detach().clone()
    ids = adapter_ids.tolist()
    off = 0
    for a, b in zip(lora_a, lora_b):
        n = b.shape[1]
        for t, i in enumerate(ids):
            if 0 <= i < a.shape[0]:
                r = a.shape[1] if ranks is None else int(ranks[i])
                xa = x[t].to(a.dtype) @ a[i, :r].t()
                y[t, off:off + n] += (scales[i].to(b.dtype) * (xa @ b[i, :, :r].t())).to(y.dtype)
        off += n
    return y


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (or a sentinel for ints) before a kernel writes it."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-12345)


def gpu_devices():
    return ["cuda"] if HAS_CUDA else []


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def emu():
    """The CUDA extension built for the CPU emulator (tests/cuda_emu/build.py) and loaded in this process; skips
    with LORA_KERNELS_SKIP_EMULATOR=1 or where the emulator cannot be built."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
    import build as emu_build

    if os.environ.get("LORA_KERNELS_SKIP_EMULATOR") == "1":
        pytest.skip("LORA_KERNELS_SKIP_EMULATOR=1")
    try:
        return emu_build.load()
    except emu_build.EmulatorUnavailable as e:
        pytest.skip(f"CUDA emulator unavailable: {e}")


@pytest.fixture(scope="module")
def ext():
    """The CUDA extension's GPU build, loaded (skips without a CUDA GPU; on one, a failed load is an error)."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    import lora_kernels as lk

    ok = lk.load_extension()
    assert ok, f"the CUDA extension did not load on a GPU machine: {lk._ext.load_failure_reason()}"
    return True


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
