"""The LoRA linear op family: validation, schemas, fakes, routing and dispatch-table rows.

Semantics: :func:`lora_kernels.reference.lora_linear_fwd_ref` / :func:`lora_kernels.reference.lora_linear_bwd_ref`.
Launchers: ``torch/lora_linear.py`` (a composition of PyTorch ops in the input dtype; the float64-faithful
oracle stays in ``reference.py``), ``triton/lora_linear.py``, ``cuda/lora_linear.py`` (kernels in
``csrc/lora_linear.cu``, glue in ``csrc/lora_linear_torch.cpp``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference as ref
from .._checks import (
    FLOAT_DTYPES,
    check_adapter_shapes,
    check_dropout_p,
    check_float,
    check_same_device,
    check_scale,
    fail,
    shape_str,
)
from ._registry import add_rows, define, impl_all_devices, launcher, lib

OP = "lora_linear"

define([
    # y [M, N] (x.dtype), xa [M, r] (fp32; fp64 for fp64 inputs). The dropout seed is `seed`, or the value of
    # `seed_tensor` (a one-element int64 CPU tensor) when given: a seed drawn inside a torch.compile graph
    # reaches the kernels without a graph break (the op reads it at run time, on the host). `keep`: the dropout
    # keep-mask from lora_dropout_keep (uint8 [M, K]), used by the torch backend instead of hashing it again;
    # the kernel backends regenerate the mask on chip and ignore it.
    "lora_linear_fwd(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias, "
    "float dropout_p, SymInt seed, str backend, Tensor? seed_tensor=None, Tensor? keep=None) -> (Tensor, Tensor)",
    # (dx, dA, dB, dW0); a gradient not asked for by output_mask comes back as an empty tensor
    "lora_linear_bwd(Tensor dy, Tensor? x, Tensor xa, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
    "float dropout_p, SymInt seed, bool[] output_mask, str backend, Tensor? seed_tensor=None, Tensor? keep=None) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    # keep-mask of drop(x) for x [M, K] as uint8 0/1 [M, K] (reference.dropout_keep_mask(seed, M, K, p) as 0/1);
    # the torch backend saves it in training so that it is hashed once per step
    "lora_dropout_keep(Tensor x, float dropout_p, SymInt seed, Tensor? seed_tensor=None) -> Tensor",
    # --- CUDA extension kernels (C++ implementation only, csrc/lora_linear_torch.cpp) ---
    # lora_linear_fwd on the extension (x [M, K] 2-D): (y [M, N] x.dtype, xa [M, r] fp32)
    "cuda_lora_linear_fwd(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias, "
    "float dropout_p, int seed) -> (Tensor, Tensor)",
    # lora_linear_bwd on the extension: (dx, dA, dB, dW0); one not asked for by output_mask is an empty [0] tensor
    "cuda_lora_linear_bwd(Tensor dy, Tensor? x, Tensor xa, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
    "float dropout_p, int seed, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
    # drop(x) = x · keep / (1 − p) in fp32 [M, K], keep = reference.dropout_keep_mask(seed, M, K, p)
    "cuda_lora_dropout(Tensor x, float dropout_p, int seed) -> Tensor",
])

add_rows(
    {
        ("lora_linear_fwd", "torch"): "lora_kernels.torch.lora_linear:lora_linear_fwd_torch",
        ("lora_linear_bwd", "torch"): "lora_kernels.torch.lora_linear:lora_linear_bwd_torch",
        ("lora_linear_fwd", "triton"): "lora_kernels.triton.lora_linear:lora_linear_fwd_triton",
        ("lora_linear_bwd", "triton"): "lora_kernels.triton.lora_linear:lora_linear_bwd_triton",
        ("lora_linear_fwd", "cuda"): "lora_kernels.cuda.lora_linear:lora_linear_fwd_cuda",
        ("lora_linear_bwd", "cuda"): "lora_kernels.cuda.lora_linear:lora_linear_bwd_cuda",
    },
    public={OP: ("lora_linear_fwd", "lora_linear_bwd")},
)


_FLOATS = frozenset(FLOAT_DTYPES)
_Tensor = torch.Tensor


def _valid(x, weight, lora_a, lora_b, scale, bias, dropout_p) -> bool:
    """Whether every condition :func:`check_lora_linear` enforces holds (one boolean pass over metadata: the common
    case costs a few µs; on False the detailed checks run and raise the error that names the problem)."""
    if not (isinstance(x, _Tensor) and isinstance(weight, _Tensor) and isinstance(lora_a, _Tensor)
            and isinstance(lora_b, _Tensor) and (bias is None or isinstance(bias, _Tensor))):
        return False
    dt = x.dtype
    if dt not in _FLOATS or weight.dtype != dt or lora_a.dtype not in _FLOATS or lora_b.dtype != lora_a.dtype:
        return False
    if (type(scale) is not float and type(scale) is not int) or not math.isfinite(scale):
        return False  # (a bool is neither; a one-element tensor scale takes the detailed path)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        return False
    if x.dim() < 1 or weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        return False
    N, K = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != K or lora_a.shape[1] != K or lora_b.shape[0] != N or lora_b.shape[1] != r or r < 1:
        return False
    dev = x.device
    if weight.device != dev or lora_a.device != dev or lora_b.device != dev:
        return False
    if bias is not None and (bias.dtype != dt or bias.dim() != 1 or bias.shape[0] != N or bias.device != dev):
        return False
    return True


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
    if _valid(x, weight, lora_a, lora_b, scale, bias, dropout_p):
        return float(scale)
    for n, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check_float(OP, n, t)
    if bias is not None:
        check_float(OP, "bias", bias)
    scale = check_scale(OP, scale)
    check_same_device(OP, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    if x.dim() < 1:
        fail(OP, "x must have shape [..., K], got a 0-d tensor")
    if weight.dim() != 2:
        fail(OP, f"weight must be 2-D [N, K] (nn.Linear layout), got shape {shape_str(weight)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        fail(OP, f"x has {x.shape[-1]} features in its last dim but weight is {shape_str(weight)} (expects K={K})")
    check_adapter_shapes(OP, N, K, lora_a, lora_b, bias)
    if weight.dtype != x.dtype:
        fail(OP, f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        fail(OP, f"bias dtype {bias.dtype} must equal x dtype {x.dtype}")
    check_dropout_p(OP, dropout_p)
    return scale


# ----------------------------------------------------------------------------------------------
# Implementations: route to the chosen backend's launcher
# ----------------------------------------------------------------------------------------------


def _lora_linear_fwd(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, backend, seed_tensor=None, keep=None):
    if seed_tensor is not None:
        seed = int(seed_tensor)
    fn = launcher("lora_linear_fwd", backend)
    if keep is not None and backend == "torch":
        return fn(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, keep)
    return fn(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed)


def _lora_linear_bwd(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask, backend, seed_tensor=None,
                     keep=None):
    if seed_tensor is not None:
        seed = int(seed_tensor)
    fn = launcher("lora_linear_bwd", backend)
    if keep is not None and backend == "torch":
        grads = fn(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask, keep)
    else:
        grads = fn(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask)
    templates = (x if x is not None else dy, lora_a, lora_b, weight)
    return tuple(
        g if (want and g is not None) else templates[i].new_empty(0) for i, (want, g) in enumerate(zip(output_mask, grads))
    )


def _lora_dropout_keep(x, dropout_p, seed, seed_tensor=None):
    # One implementation for every device (the torch backend's hash), imported on first use like a launcher.
    fn = _keep_impl or _load_keep_impl()
    if seed_tensor is not None:
        seed = int(seed_tensor)
    return fn(x, dropout_p, seed)


_keep_impl = None


def _load_keep_impl():
    global _keep_impl
    from ..torch.lora_linear import lora_dropout_keep_torch

    _keep_impl = lora_dropout_keep_torch
    return _keep_impl


impl_all_devices("lora_linear_fwd", _lora_linear_fwd)
impl_all_devices("lora_linear_bwd", _lora_linear_bwd)
impl_all_devices("lora_dropout_keep", _lora_dropout_keep)

# ----------------------------------------------------------------------------------------------
# Calling the ops. The API calls these: while tracing (torch.compile), under a dispatch / torch-function mode or with
# tensor subclasses they go through torch.ops.lora_kernels.* (the schemas and fakes above are the contract);
# in plain eager mode on plain tensors they call the very implementation the op dispatches to, skipping the
# dispatcher's round trip into Python (~30 µs per call on a CPU, i.e. most of a small layer's fixed cost).
# ----------------------------------------------------------------------------------------------

_ops = torch.ops.lora_kernels
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # nn.Parameter disables __torch_function__: dispatched like a Tensor


def _eager(*tensors) -> bool:
    if _is_compiling() or _dispatch_modes() or _function_modes():
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


def call_fwd(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, backend, seed_tensor=None, keep=None):
    """``torch.ops.lora_kernels.lora_linear_fwd(...)`` (see the note above)."""
    if seed_tensor is None and _eager(x, weight, lora_a, lora_b, bias, keep):
        return _lora_linear_fwd(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, backend, None, keep)
    return _ops.lora_linear_fwd(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, backend, seed_tensor, keep)


def call_bwd(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask, backend, seed_tensor=None,
             keep=None):
    """``torch.ops.lora_kernels.lora_linear_bwd(...)`` (see the note above), except that in eager mode a gradient
    not asked for by ``output_mask`` may come back as None instead of an empty tensor."""
    if seed_tensor is None and _eager(dy, x, xa, weight, lora_a, lora_b, keep):
        fn = launcher("lora_linear_bwd", backend)
        if keep is not None and backend == "torch":
            return fn(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask, keep)
        return fn(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask)
    return _ops.lora_linear_bwd(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask, backend,
                                seed_tensor, keep)


def call_dropout_keep(x, dropout_p, seed, seed_tensor=None):
    """``torch.ops.lora_kernels.lora_dropout_keep(...)`` (see the note above)."""
    if _eager(x):
        return _lora_dropout_keep(x, dropout_p, seed, seed_tensor)
    return _ops.lora_dropout_keep(x, dropout_p, seed, seed_tensor)

# ----------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and devices only
# ----------------------------------------------------------------------------------------------


def _fwd_fake(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, backend=None, seed_tensor=None, keep=None):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    xa = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=ref.compute_dtype(x.dtype))
    return y, xa


def _bwd_fake(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask, backend=None, seed_tensor=None,
              keep=None):
    shapes = ((dy.shape[0], weight.shape[1]), tuple(lora_a.shape), tuple(lora_b.shape), tuple(weight.shape))
    dtypes = (dy.dtype, lora_a.dtype, lora_b.dtype, weight.dtype)
    return tuple(dy.new_empty(shape if want else (0,), dtype=dt) for want, shape, dt in zip(output_mask, shapes, dtypes))


torch.library.register_fake("lora_kernels::lora_linear_fwd", _fwd_fake, lib=lib)
torch.library.register_fake("lora_kernels::lora_linear_bwd", _bwd_fake, lib=lib)
# The extension's ops only take 16/32-bit inputs, so xa is always fp32 there (compute_dtype gives fp32 too).
torch.library.register_fake("lora_kernels::cuda_lora_linear_fwd", _fwd_fake, lib=lib)
torch.library.register_fake("lora_kernels::cuda_lora_linear_bwd", _bwd_fake, lib=lib)


@torch.library.register_fake("lora_kernels::lora_dropout_keep", lib=lib)
def _lora_dropout_keep_fake(x, dropout_p, seed, seed_tensor=None):
    return x.new_empty(x.shape, dtype=torch.uint8)


@torch.library.register_fake("lora_kernels::cuda_lora_dropout", lib=lib)
def _cuda_lora_dropout_fake(x, dropout_p, seed):
    return x.new_empty(x.shape, dtype=torch.float32)
