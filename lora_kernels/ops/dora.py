"""The DoRA linear op family (weight-decomposed LoRA): validation, schemas, fakes, routing and dispatch-table rows.

Semantics: :func:`lora_kernels.reference.dora_linear_fwd_ref` / :func:`lora_kernels.reference.dora_linear_bwd_ref`
(PEFT's DoRA, dropout included). The ops take the per-row factor ``g = m / ‖W0 + s·B·A‖`` (fp32 [N], fp64 for fp64
inputs) and the detached norm, both computed by the API (``functional.lora_linear(..., magnitude=m)``) with
``lora_kernels.dora.dora_weight_norm``; the ops never see an N×K update.

Two public ops share the two schemas:

* ``dora_linear`` (no dropout, or eval): y = g⊙(x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + bias; torch, Triton and CUDA-extension
  launchers (Triton puts g into the epilogue of lora_linear's fused GEMM and onto dy in its backward; the extension
  applies g and bias in its expand kernel's DoRA epilogue, ``cuda/dora.py``).
* ``dora_linear_dropout`` (dropout_p > 0, training): PEFT applies W0 a second time, to the dropped x; torch and
  Triton launchers (Triton: ``_dora_dropout_gemm_kernel``, one pass over x and W0 with two accumulators). The CUDA
  extension has none: ``why_not("cuda", "dora_linear_dropout", ...)`` says so and the API then runs the torch backend.

Launchers: ``torch/dora.py``, ``triton/dora.py``, ``cuda/dora.py``.
"""

from __future__ import annotations

import math

import torch

from .. import reference as ref
from .._checks import FLOAT_DTYPES, check_float, data_checks_enabled, fail, shape_str
from ._registry import add_rows, define, impl_all_devices, launcher, lib
from .lora_linear import _eager, check_lora_linear

OP = "lora_linear"  # errors name the public function the user called (lora_linear(..., magnitude=m))

define([
    # (y [M, N] x.dtype, xa [M, r] fp32 (fp64 for fp64 x), ypre [M, N] x.dtype: x·W0ᵀ + s·xa·Bᵀ before the rescale,
    # only when save_pre (what dm needs), else an empty [0] tensor). g: [N] fp32/fp64 = m / norm. Dropout seed and
    # keep as in lora_linear_fwd (keep: the torch backend's uint8 keep-mask, ignored elsewhere).
    "dora_linear_fwd(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias, Tensor g, "
    "float dropout_p, SymInt seed, bool save_pre, str backend, Tensor? seed_tensor=None, Tensor? keep=None) "
    "-> (Tensor, Tensor, Tensor)",
    # (dx, dA, dB, dm, dW0) for output_mask of 5 booleans; dm is fp32 (fp64) [N] = Σ_t dy⊙ypre / norm; a gradient
    # not asked for comes back as an empty [0] tensor. ypre is needed only for dm, x only for dA and dW0.
    "dora_linear_bwd(Tensor dy, Tensor? x, Tensor xa, Tensor? ypre, Tensor weight, Tensor lora_a, Tensor lora_b, "
    "float scale, Tensor g, Tensor norm, float dropout_p, SymInt seed, bool[] output_mask, str backend, "
    "Tensor? seed_tensor=None, Tensor? keep=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
])

add_rows(
    {
        ("dora_linear_fwd", "torch"): "lora_kernels.torch.dora:dora_linear_fwd_torch",
        ("dora_linear_bwd", "torch"): "lora_kernels.torch.dora:dora_linear_bwd_torch",
        ("dora_linear_fwd", "triton"): "lora_kernels.triton.dora:dora_linear_fwd_triton",
        ("dora_linear_bwd", "triton"): "lora_kernels.triton.dora:dora_linear_bwd_triton",
        ("dora_linear_fwd", "cuda"): "lora_kernels.cuda.dora:dora_linear_fwd_cuda",
        ("dora_linear_bwd", "cuda"): "lora_kernels.cuda.dora:dora_linear_bwd_cuda",
        ("dora_dropout_fwd", "torch"): "lora_kernels.torch.dora:dora_dropout_fwd_torch",
        ("dora_dropout_bwd", "torch"): "lora_kernels.torch.dora:dora_dropout_bwd_torch",
        ("dora_dropout_fwd", "triton"): "lora_kernels.triton.dora:dora_dropout_fwd_triton",
        ("dora_dropout_bwd", "triton"): "lora_kernels.triton.dora:dora_dropout_bwd_triton",
    },
    public={"dora_linear": ("dora_linear_fwd", "dora_linear_bwd"),
            "dora_linear_dropout": ("dora_dropout_fwd", "dora_dropout_bwd")},
)


def check_dora_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p, magnitude) -> float:
    """Validate DoRA linear inputs (lora_linear's checks plus the magnitude's); returns the scale as a float.

    magnitude: a floating tensor [N] (N = weight.shape[0]) on x's device with finite values (the value check reads
    the tensor on the host: skipped while tracing, during CUDA-graph capture, or with LORA_KERNELS_CHECK_DATA=0)."""
    scale = check_lora_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p)
    if not isinstance(magnitude, torch.Tensor):
        fail(OP, f"magnitude must be a torch.Tensor [N], got {type(magnitude).__name__}")
    check_float(OP, "magnitude", magnitude, FLOAT_DTYPES)
    N = weight.shape[0]
    if magnitude.dim() != 1 or magnitude.shape[0] != N:
        fail(OP, f"magnitude must be [N] = [{N}] (one value per output row of weight {shape_str(weight)}), "
                 f"got {shape_str(magnitude)}")
    if magnitude.device != x.device:
        fail(OP, f"magnitude is on {magnitude.device} but x is on {x.device}")
    if data_checks_enabled(magnitude) and not _all_finite(magnitude.detach()):
        bad = int((~torch.isfinite(magnitude.detach())).sum())
        fail(OP, f"magnitude has {bad} non-finite value(s) (NaN or inf)")
    return scale


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of t is finite, with one op and one host read on the common path: a float64 sum of
    16/32-bit values is finite iff they all are (it cannot overflow); otherwise, and on devices without float64
    (MPS), ``isfinite`` decides."""
    fast = t.dtype != torch.float64 and t.device.type in ("cpu", "cuda")
    if fast and math.isfinite(float(t.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(t).all())


# ----------------------------------------------------------------------------------------------
# Implementations: route to the chosen backend's launcher
# ----------------------------------------------------------------------------------------------


def _fwd_impl(x, weight, lora_a, lora_b, scale, bias, g, dropout_p, seed, save_pre, backend, seed_tensor=None,
              keep=None):
    if seed_tensor is not None:
        seed = int(seed_tensor)
    if dropout_p > 0.0:
        return launcher("dora_dropout_fwd", backend)(x, weight, lora_a, lora_b, scale, bias, g, dropout_p, seed,
                                                     save_pre, keep)
    return launcher("dora_linear_fwd", backend)(x, weight, lora_a, lora_b, scale, bias, g, save_pre)


def _bwd_raw(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm, dropout_p, seed, output_mask, backend,
             seed_tensor=None, keep=None):
    if seed_tensor is not None:
        seed = int(seed_tensor)
    if dropout_p > 0.0:
        return launcher("dora_dropout_bwd", backend)(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm, dropout_p,
                                                     seed, output_mask, keep)
    return launcher("dora_linear_bwd", backend)(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm, output_mask)


def _bwd_impl(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm, dropout_p, seed, output_mask, backend,
              seed_tensor=None, keep=None):
    grads = _bwd_raw(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm, dropout_p, seed, output_mask, backend,
                     seed_tensor, keep)
    templates = (x if x is not None else dy, lora_a, lora_b, g, weight)
    return tuple(gr if (want and gr is not None) else templates[i].new_empty(0)
                 for i, (want, gr) in enumerate(zip(output_mask, grads)))


impl_all_devices("dora_linear_fwd", _fwd_impl)
impl_all_devices("dora_linear_bwd", _bwd_impl)

_ops = torch.ops.lora_kernels


def call_fwd(x, weight, lora_a, lora_b, scale, bias, g, dropout_p, seed, save_pre, backend, seed_tensor=None,
             keep=None):
    """``torch.ops.lora_kernels.dora_linear_fwd(...)``; in plain eager mode the implementation is called directly
    (see the note in ``ops/lora_linear.py``)."""
    if seed_tensor is None and _eager(x, weight, lora_a, lora_b, bias, g, keep):
        return _fwd_impl(x, weight, lora_a, lora_b, scale, bias, g, dropout_p, seed, save_pre, backend, None, keep)
    return _ops.dora_linear_fwd(x, weight, lora_a, lora_b, scale, bias, g, dropout_p, seed, save_pre, backend,
                                seed_tensor, keep)


def call_bwd(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm, dropout_p, seed, output_mask, backend,
             seed_tensor=None, keep=None):
    """``torch.ops.lora_kernels.dora_linear_bwd(...)``; in eager mode a gradient not asked for may be None."""
    if seed_tensor is None and _eager(dy, x, xa, ypre, weight, lora_a, lora_b, g, norm, keep):
        return _bwd_raw(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm, dropout_p, seed, output_mask, backend,
                        None, keep)
    return _ops.dora_linear_bwd(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm, dropout_p, seed, output_mask,
                                backend, seed_tensor, keep)


# ----------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and devices only
# ----------------------------------------------------------------------------------------------


@torch.library.register_fake("lora_kernels::dora_linear_fwd", lib=lib)
def _fwd_fake(x, weight, lora_a, lora_b, scale, bias, g, dropout_p, seed, save_pre, backend, seed_tensor=None,
              keep=None):
    M, N = x.shape[0], weight.shape[0]
    y = x.new_empty((M, N))
    xa = x.new_empty((M, lora_a.shape[0]), dtype=ref.compute_dtype(x.dtype))
    ypre = x.new_empty((M, N) if save_pre else (0,))
    return y, xa, ypre


@torch.library.register_fake("lora_kernels::dora_linear_bwd", lib=lib)
def _bwd_fake(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm, dropout_p, seed, output_mask, backend,
              seed_tensor=None, keep=None):
    shapes = ((dy.shape[0], weight.shape[1]), tuple(lora_a.shape), tuple(lora_b.shape), (weight.shape[0],),
              tuple(weight.shape))
    dtypes = (dy.dtype, lora_a.dtype, lora_b.dtype, ref.compute_dtype(dy.dtype), weight.dtype)
    return tuple(dy.new_empty(shape if want else (0,), dtype=dt) for want, shape, dt in zip(output_mask, shapes, dtypes))
