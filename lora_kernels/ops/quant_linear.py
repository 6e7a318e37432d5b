"""The quantised-base LoRA linear op family (QLoRA): validation, schemas, fakes, routing and dispatch-table rows.

``y = x·W̃ᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ`` where W̃ is the dequantised frozen base (``lora_kernels.quant``: NF4 /
FP4 with or without double-quantised absmax, bitsandbytes int8, float8_e4m3fn with per-tensor / per-row scale).
Semantics: :func:`lora_kernels.reference.quant_lora_linear_fwd_ref` / ``quant_lora_linear_bwd_ref``.
Launchers: ``torch/quant_linear.py`` (dequantise row chunks, GEMM, drop the chunk), ``triton/quant_linear.py``
(dequantisation fused into the GEMM's operand load, or dequantise-to-scratch + the lora_linear kernels; the
launcher's ``choose_strategy`` picks per call). No backward for W0 (a quantised base is frozen).

The quantised weight travels through the op as plain arguments (``qdata, absmax, absmax2, code2, offset, fmt,
blocksize, wshape, wdtype``); :func:`quant_operands` / :func:`quant_weight_of` convert to and from
:class:`lora_kernels.quant.QuantWeight`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import quant as Q
from .. import reference as ref
from .._checks import check_adapter_shapes, check_dropout_p, check_float, check_same_device, check_scale, fail, shape_str
from ._registry import add_rows, define, impl_all_devices, launcher, lib

OP = "quant_lora_linear"
STRATEGIES = ("auto", "fused", "scratch")

_QW = ("Tensor qdata, Tensor absmax, Tensor? absmax2, Tensor? code2, float offset, str fmt, int blocksize, "
       "int[] wshape, ScalarType wdtype")
define([
    # y [M, N] (x.dtype), xa [M, r] (fp32; fp64 for fp64 x)
    f"quant_lora_linear_fwd(Tensor x, {_QW}, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias, "
    "float dropout_p, SymInt seed, str strategy, str backend, Tensor? seed_tensor=None) -> (Tensor, Tensor)",
    # (dx, dA, dB); one not asked for by output_mask comes back as an empty tensor
    f"quant_lora_linear_bwd(Tensor dy, Tensor? x, Tensor xa, {_QW}, Tensor lora_a, Tensor lora_b, float scale, "
    "float dropout_p, SymInt seed, bool[] output_mask, str strategy, str backend, Tensor? seed_tensor=None) "
    "-> (Tensor, Tensor, Tensor)",
])

add_rows(
    {
        ("quant_lora_linear_fwd", "torch"): "lora_kernels.torch.quant_linear:quant_lora_linear_fwd_torch",
        ("quant_lora_linear_bwd", "torch"): "lora_kernels.torch.quant_linear:quant_lora_linear_bwd_torch",
        ("quant_lora_linear_fwd", "triton"): "lora_kernels.triton.quant_linear:quant_lora_linear_fwd_triton",
        ("quant_lora_linear_bwd", "triton"): "lora_kernels.triton.quant_linear:quant_lora_linear_bwd_triton",
    },
    public={OP: ("quant_lora_linear_fwd", "quant_lora_linear_bwd")},
)


def quant_operands(qw: "Q.QuantWeight") -> tuple:
    """The op arguments of a QuantWeight (in schema order)."""
    return (qw.qdata, qw.absmax, qw.absmax2, qw.code2, float(qw.offset), qw.fmt, int(qw.blocksize),
            [int(qw.shape[0]), int(qw.shape[1])], qw.dtype)


def quant_weight_of(qdata, absmax, absmax2, code2, offset, fmt, blocksize, wshape, wdtype) -> "Q.QuantWeight":
    return Q.QuantWeight(fmt=fmt, shape=(int(wshape[0]), int(wshape[1])), dtype=wdtype, qdata=qdata, absmax=absmax,
                         blocksize=int(blocksize), absmax2=absmax2, code2=code2, offset=float(offset))


def check_quant_weight(qw, op: str = OP) -> None:
    """Metadata checks of a quantised base (no device→host read): format, dtypes, element counts, devices."""
    if not isinstance(qw, Q.QuantWeight):
        fail(op, f"the base weight must be a lora_kernels.quant.QuantWeight (see lora_kernels.quant.from_module), "
                 f"got {type(qw).__name__}")
    src = f" ({qw.source})" if qw.source else ""
    if qw.fmt not in Q.FORMATS:
        fail(op, f"unknown quantised format {qw.fmt!r}{src}; expected one of {Q.FORMATS}")
    N, K = qw.shape
    if N < 0 or K < 0:
        fail(op, f"quantised weight shape must be [N, K] with N, K >= 0, got {list(qw.shape)}")
    if qw.dtype not in Q.DEQUANT_DTYPES:
        fail(op, f"quantised weight dequantises to {qw.dtype}{src}; expected one of {[str(d) for d in Q.DEQUANT_DTYPES]}")
    qd, am = qw.qdata, qw.absmax
    if not isinstance(qd, torch.Tensor) or not isinstance(am, torch.Tensor):
        fail(op, f"qdata and absmax of the quantised weight must be tensors{src}")
    if qw.fmt in Q.FOUR_BIT:
        if qd.dtype != torch.uint8:
            fail(op, f"{qw.fmt} qdata must be uint8 (packed nibbles), got {qd.dtype}{src}")
        if qd.numel() != (N * K + 1) // 2 or not qd.is_contiguous():
            fail(op, f"{qw.fmt} qdata must hold ceil(N*K/2) = {(N * K + 1) // 2} contiguous bytes for shape "
                     f"{list(qw.shape)}, got {qd.numel()}{src} (wrong quant_state for this weight?)")
        if qw.blocksize not in Q.BLOCKSIZES:
            fail(op, f"{qw.fmt} blocksize must be one of {Q.BLOCKSIZES} (bitsandbytes' block sizes), got "
                     f"{qw.blocksize}{src}")
        nb = -(-N * K // qw.blocksize)
        if qw.nested:
            if am.dtype != torch.uint8:
                fail(op, f"a double-quantised (nested) absmax must be uint8 codes, got {am.dtype}{src}")
            a2, c2 = qw.absmax2, qw.code2
            if not isinstance(a2, torch.Tensor) or not isinstance(c2, torch.Tensor):
                fail(op, f"nested absmax needs absmax2 and code2 tensors{src}")
            if a2.dtype != torch.float32 or a2.numel() != -(-nb // Q.NESTED_BLOCKSIZE):
                fail(op, f"nested absmax2 must be fp32 with ceil({nb}/{Q.NESTED_BLOCKSIZE}) = "
                         f"{-(-nb // Q.NESTED_BLOCKSIZE)} elements, got {a2.dtype} with {a2.numel()}{src}")
            if c2.dtype != torch.float32 or c2.numel() != 256:
                fail(op, f"nested code2 must be the fp32 256-entry blockwise code, got {c2.dtype} with {c2.numel()}{src}")
            if not math.isfinite(qw.offset):
                fail(op, f"nested absmax offset must be finite, got {qw.offset}{src}")
        elif am.dtype != torch.float32:
            fail(op, f"{qw.fmt} absmax must be fp32 (or uint8 with a nested state), got {am.dtype}{src}")
        if am.numel() != nb:
            fail(op, f"{qw.fmt} absmax must have ceil(N*K/blocksize) = {nb} elements for shape {list(qw.shape)} and "
                     f"blocksize {qw.blocksize}, got {am.numel()}{src} (wrong quant_state or blocksize?)")
    else:
        want = torch.int8 if qw.fmt == "int8" else torch.float8_e4m3fn
        if qd.dtype != want:
            fail(op, f"{qw.fmt} qdata must be {want}, got {qd.dtype}{src}")
        if qd.dim() != 2 or tuple(qd.shape) != (N, K) or (qd.numel() and qd.stride(1) != 1):
            fail(op, f"{qw.fmt} qdata must be [N, K] = {list(qw.shape)} with unit column stride, got "
                     f"{shape_str(qd)}{src}")
        if am.dtype != torch.float32:
            fail(op, f"{qw.fmt} scale must be fp32, got {am.dtype}{src}")
        ok = am.numel() == N or (qw.fmt == "fp8_e4m3fn" and am.numel() == 1)
        if not ok or not am.is_contiguous():
            what = "SCB [N]" if qw.fmt == "int8" else "scale with 1 (per tensor) or N (per row) elements"
            fail(op, f"{qw.fmt} needs a contiguous {what}, N={N}; got {shape_str(am)}{src}")
        if qw.nested:
            fail(op, f"{qw.fmt} has no nested absmax{src}")
    check_same_device(op, qdata=qd, absmax=am, absmax2=qw.absmax2, code2=qw.code2)


def check_quant_lora_linear(x, qw, lora_a, lora_b, scale, bias, dropout_p, strategy=None) -> float:
    """Validate quant_lora_linear inputs before anything runs; returns the scale as a finite float."""
    check_quant_weight(qw)
    for n, t in (("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
        check_float(OP, n, t)
    if bias is not None:
        check_float(OP, "bias", bias)
    scale = check_scale(OP, scale)
    check_same_device(OP, x=x, qdata=qw.qdata, lora_a=lora_a, lora_b=lora_b, bias=bias)
    if x.dim() < 1:
        fail(OP, "x must have shape [..., K], got a 0-d tensor")
    N, K = qw.shape
    if x.shape[-1] != K:
        fail(OP, f"x has {x.shape[-1]} features in its last dim but the quantised weight is [{N}, {K}] (expects K={K})")
    check_adapter_shapes(OP, N, K, lora_a, lora_b, bias)
    check_dropout_p(OP, dropout_p)
    if strategy is not None and strategy not in STRATEGIES:
        fail(OP, f"strategy must be one of {STRATEGIES} or None, got {strategy!r}")
    return scale


# ----------------------------------------------------------------------------------------------
# Implementations: route to the chosen backend's launcher
# ----------------------------------------------------------------------------------------------


def _fwd(x, qdata, absmax, absmax2, code2, offset, fmt, blocksize, wshape, wdtype, lora_a, lora_b, scale, bias,
         dropout_p, seed, strategy, backend, seed_tensor=None):
    if seed_tensor is not None:
        seed = int(seed_tensor)
    qw = quant_weight_of(qdata, absmax, absmax2, code2, offset, fmt, blocksize, wshape, wdtype)
    return launcher("quant_lora_linear_fwd", backend)(x, qw, lora_a, lora_b, scale, bias, dropout_p, seed, strategy)


def _bwd(dy, x, xa, qdata, absmax, absmax2, code2, offset, fmt, blocksize, wshape, wdtype, lora_a, lora_b, scale,
         dropout_p, seed, output_mask, strategy, backend, seed_tensor=None):
    if seed_tensor is not None:
        seed = int(seed_tensor)
    qw = quant_weight_of(qdata, absmax, absmax2, code2, offset, fmt, blocksize, wshape, wdtype)
    grads = launcher("quant_lora_linear_bwd", backend)(dy, x, xa, qw, lora_a, lora_b, scale, dropout_p, seed,
                                                       output_mask, strategy)
    templates = (dy, lora_a, lora_b)
    return tuple(g if (want and g is not None) else templates[i].new_empty(0)
                 for i, (want, g) in enumerate(zip(output_mask, grads)))


impl_all_devices("quant_lora_linear_fwd", _fwd)
impl_all_devices("quant_lora_linear_bwd", _bwd)


@torch.library.register_fake("lora_kernels::quant_lora_linear_fwd", lib=lib)
def _fwd_fake(x, qdata, absmax, absmax2, code2, offset, fmt, blocksize, wshape, wdtype, lora_a, lora_b, scale, bias,
              dropout_p, seed, strategy, backend, seed_tensor=None):
    y = x.new_empty((x.shape[0], wshape[0]))
    xa = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=ref.compute_dtype(x.dtype))
    return y, xa


@torch.library.register_fake("lora_kernels::quant_lora_linear_bwd", lib=lib)
def _bwd_fake(dy, x, xa, qdata, absmax, absmax2, code2, offset, fmt, blocksize, wshape, wdtype, lora_a, lora_b, scale,
              dropout_p, seed, output_mask, strategy, backend, seed_tensor=None):
    shapes = ((dy.shape[0], wshape[1]), tuple(lora_a.shape), tuple(lora_b.shape))
    dtypes = (dy.dtype, lora_a.dtype, lora_b.dtype)
    return tuple(dy.new_empty(s if want else (0,), dtype=dt) for want, s, dt in zip(output_mask, shapes, dtypes))
