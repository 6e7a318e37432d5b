"""Quantised frozen bases: the formats, how to read them off the modules users bring, and our own decoder.

A quantised base weight W0 [N, K] is described by a :class:`QuantWeight` (tensors are the module's own, never
copied). Every format dequantises as

    w32 = decode(q) · scale            (fp32 products; formats below)
    W̃   = w32.to(dtype)               (one rounding, to the dtype W̃ is used in)

and the layer computes ``y = x·W̃ᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ`` with ``W̃`` rounded once to x's dtype (the base's
compute dtype): what bitsandbytes' 4-bit GEMM does in its forward (``gemm_4bit`` dequantises straight to the
activation dtype). ``QuantWeight.dtype`` (bitsandbytes' ``quant_state.dtype``) is the dtype :func:`dequantize`
returns by default. (bitsandbytes' own 4-bit *backward* goes through ``quant_state.dtype`` first; with a compute
dtype wider than the stored dtype that differs from its forward by at most one rounding of the stored dtype.)

Formats (``QuantWeight.fmt``):

* ``"nf4"`` / ``"fp4"`` — bitsandbytes ``Linear4bit`` / ``Params4bit``. ``qdata``: the packed bytes of the
  row-major flattened weight, element ``f = n·K + k`` in byte ``f // 2``, high nibble for even ``f``;
  ``w32 = code[nibble] · absmax[f // blocksize]``. With double quantisation (``compress_statistics=True``,
  ``nested``) ``absmax`` is uint8 and decodes first, in fp32, as
  ``absmax[i] = code2[qabsmax[i]] · absmax2[i // 256] + offset`` (bitsandbytes' ``dequantize_blockwise`` plus
  its ``absmax += offset``). The 16-entry codebooks are fixed (:data:`NF4_CODE`, :data:`FP4_CODE`); FP4 code
  0b1000 is −0.0 (the sign bit), as bitsandbytes' C++/CUDA kernels decode it.
* ``"int8"`` — bitsandbytes ``Linear8bitLt`` (``has_fp16_weights=False``): ``qdata`` = CB int8 [N, K],
  ``absmax`` = SCB fp32 [N]; ``w32 = (CB · SCB[n]) · fp32(1/127)`` (``bitsandbytes.functional.
  int8_vectorwise_dequant``); ``dtype`` float32. Note bitsandbytes' own 8-bit *matmul* also quantises the
  activations (LLM.int8()); here only the weight is quantised, x stays in its float dtype.
* ``"fp8_e4m3fn"`` — ``torch.float8_e4m3fn`` [N, K] with a per-tensor (one element) or per-row ([N] or [N, 1])
  fp32 scale: ``w32 = float(q) · scale`` (torchao's ``Float8Tensor`` layout: ``qdata`` and ``scale``).

Ways in: :func:`from_module` reads bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, our :class:`Float8Linear`,
any ``nn.Linear`` whose weight is float8 with a ``weight_scale`` attribute, and an ``nn.Linear`` whose weight is
a torchao ``Float8Tensor``. :func:`dequantize` is our pure-torch decoder (the torch backend's); the tests check it
and the Triton kernels bit for bit against the formats' own libraries (``reference.quant_dequantize_ref``).

This module imports only torch and ``_checks`` (it sits beside the op families, below the API).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn

from ._checks import LoRAInputError

__all__ = [
    "QuantWeight",
    "Float8Linear",
    "from_module",
    "is_quantized_base",
    "dequantize",
    "quantize_fp8",
    "NF4_CODE",
    "FP4_CODE",
    "FORMATS",
]

FORMATS = ("nf4", "fp4", "int8", "fp8_e4m3fn")
FOUR_BIT = ("nf4", "fp4")
# bitsandbytes' 4-bit block sizes (quantize_4bit / dequantize_4bit accept exactly these)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes double-quantises the 4-bit absmax in blocks of 256
INT8_INV = 7.874015718698502e-3  # bitsandbytes' 1/127 (rounded to fp32 where it multiplies)
DEQUANT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# NF4: quantiles of N(0, 1) (QLoRA); bitsandbytes.functional.get_4bit_type("nf4"), fp32.
NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=torch.float32,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bits, bias 2), normalised by its largest magnitude 12, in bit-pattern order;
# code 0b1000 is −0.0.
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=torch.float32) / 12.0
FP4_CODE = torch.cat([FP4_CODE, -FP4_CODE])
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def _err(msg: str) -> None:
    raise LoRAInputError(f"lora_kernels.quant: {msg}")


@dataclasses.dataclass(eq=False)
class QuantWeight:
    """A quantised frozen weight W0 [N, K] (see the module docstring for each format's decoding).

    Attributes:
        fmt: one of :data:`FORMATS`.
        shape: (N, K).
        dtype: the default dtype of :func:`dequantize` (bitsandbytes' ``quant_state.dtype``; float32 for int8; the
            Float8Tensor's dtype or float32 for fp8). The layers round W̃ once to x's dtype instead.
        qdata: packed 4-bit bytes (uint8, ``ceil(N·K/2)`` elements), int8 [N, K], or float8_e4m3fn [N, K].
        absmax: 4-bit: fp32 per block (``ceil(N·K/blocksize)``), or uint8 codes when nested; int8: SCB fp32 [N];
            fp8: the fp32 scale (one element, or N).
        blocksize: 4-bit block size (0 for the other formats).
        absmax2, code2, offset: the double-quantisation state of a nested 4-bit absmax (fp32 [ceil(nblocks/256)],
            fp32 [256], float), else None / None / 0.0.
        source: where it came from (for messages).
    """

    fmt: str
    shape: Tuple[int, int]
    dtype: torch.dtype
    qdata: torch.Tensor
    absmax: torch.Tensor
    blocksize: int = 0
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    offset: float = 0.0
    source: str = ""

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    def __repr__(self) -> str:
        extra = f", blocksize={self.blocksize}{', nested' if self.nested else ''}" if self.fmt in FOUR_BIT else ""
        return f"QuantWeight({self.fmt}, shape={list(self.shape)}, dtype={self.dtype}{extra}, source={self.source!r})"


# ----------------------------------------------------------------------------------------------
# Reading the formats off modules
# ----------------------------------------------------------------------------------------------


def _bnb_kind(mod) -> Optional[str]:
    """'4bit' / '8bit' for bitsandbytes' Linear4bit / Linear8bitLt (and subclasses: LinearNF4, LinearFP4, ...)."""
    for cls in type(mod).__mro__:
        if cls.__module__.startswith("bitsandbytes"):
            if cls.__name__ == "Linear4bit":
                return "4bit"
            if cls.__name__ == "Linear8bitLt":
                return "8bit"
    return None


def _is_torchao_float8(w) -> bool:
    return type(w).__name__ == "Float8Tensor" and hasattr(w, "qdata") and hasattr(w, "scale")


def is_quantized_base(mod) -> bool:
    """Whether :func:`from_module` knows ``mod`` as a quantised base (a cheap type/dtype test, no validation)."""
    if _bnb_kind(mod) is not None:
        return True
    w = getattr(mod, "weight", None)
    if not isinstance(mod, nn.Linear) or not isinstance(w, torch.Tensor):
        return False
    return _is_torchao_float8(w) or (w.dtype == torch.float8_e4m3fn and getattr(mod, "weight_scale", None) is not None)


def _bnb4(mod) -> QuantWeight:
    w = mod.weight
    qs = getattr(w, "quant_state", None) or getattr(mod, "quant_state", None)
    if qs is None or w.dtype in DEQUANT_DTYPES:
        _err(f"{type(mod).__name__} is not quantised yet (its weight is {w.dtype} without a quant_state): bitsandbytes "
             "quantises a Linear4bit when it is moved to a device, e.g. module.to('cuda') or module.to('cpu')")
    return from_bnb_4bit(w.data, qs, source=f"bitsandbytes.{type(mod).__name__}")


def from_bnb_4bit(packed: torch.Tensor, quant_state, source: str = "bitsandbytes") -> QuantWeight:
    """QuantWeight of a packed 4-bit tensor and its bitsandbytes ``QuantState`` (validated against the format)."""
    qs = quant_state
    qt = getattr(qs, "quant_type", None)
    if qt not in FOUR_BIT:
        _err(f"{source}: quant_state.quant_type must be 'nf4' or 'fp4', got {qt!r}")
    shape = tuple(qs.shape) if qs.shape is not None else ()
    if len(shape) != 2:
        _err(f"{source}: quant_state.shape must be [N, K] (out, in features), got {list(shape)}")
    code = getattr(qs, "code", None)
    if code is not None:  # bitsandbytes stores the codebook in the state: it must be the standard one
        c = code.detach().to("cpu", torch.float32).reshape(-1)
        if c.numel() != 16 or not torch.equal(c, CODES[qt]):  # == ignores the sign of zero
            _err(f"{source}: quant_state.code is not the {qt} codebook (a state from another quant_type or a "
                 "custom code is not supported)")
    if packed.dtype != torch.uint8:  # quant_storage (bf16, fp32, ...): the same bytes
        packed = packed.reshape(-1).view(torch.uint8)
    nested = bool(getattr(qs, "nested", False))
    absmax2 = code2 = None
    offset = 0.0
    if nested:
        st2 = qs.state2
        if st2 is None or getattr(st2, "code", None) is None or qs.offset is None:
            _err(f"{source}: nested quant_state without state2 / offset")
        if st2.blocksize != NESTED_BLOCKSIZE:
            _err(f"{source}: nested absmax block size must be {NESTED_BLOCKSIZE} (bitsandbytes' 4-bit double "
                 f"quantisation), got {st2.blocksize}")
        absmax2, code2 = st2.absmax, st2.code
        offset = float(qs.offset)
    return QuantWeight(fmt=qt, shape=(int(shape[0]), int(shape[1])), dtype=qs.dtype, qdata=packed.reshape(-1),
                       absmax=qs.absmax, blocksize=int(qs.blocksize), absmax2=absmax2, code2=code2, offset=offset,
                       source=source)


def _bnb8(mod) -> QuantWeight:
    w = mod.weight
    state = getattr(mod, "state", None)
    if state is not None and getattr(state, "has_fp16_weights", False):
        _err("bitsandbytes.Linear8bitLt with has_fp16_weights=True keeps a float weight: it is not a quantised base "
             "(create it with has_fp16_weights=False)")
    cb = getattr(w, "CB", None)
    scb = getattr(w, "SCB", None)
    if cb is None and state is not None:  # after its first forward bitsandbytes moves CB/SCB to module.state
        cb, scb = getattr(state, "CB", None), getattr(state, "SCB", None)
    if cb is None and w.dtype == torch.int8:
        cb = w.data
    if cb is None or scb is None:
        _err("bitsandbytes.Linear8bitLt is not quantised yet (no CB/SCB): move it to a device first "
             "(module.to('cuda') or module.to('cpu'))")
    return QuantWeight(fmt="int8", shape=(int(cb.shape[0]), int(cb.shape[1])), dtype=torch.float32, qdata=cb,
                       absmax=scb, source=f"bitsandbytes.{type(mod).__name__}")


def from_float8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                source: str = "float8") -> QuantWeight:
    """QuantWeight of a float8_e4m3fn [N, K] weight with a per-tensor (1 element) or per-row ([N] / [N, 1]) scale:
    ``W̃ = (float(weight) · scale).to(dtype)``."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        _err(f"{source}: a float8 weight must be a 2-D [N, K] tensor")
    return QuantWeight(fmt="fp8_e4m3fn", shape=(int(weight.shape[0]), int(weight.shape[1])), dtype=dtype,
                       qdata=weight, absmax=scale, source=source)


def from_module(mod: nn.Module) -> QuantWeight:
    """The :class:`QuantWeight` of a quantised base module (raises LoRAInputError for anything else)."""
    kind = _bnb_kind(mod)
    if kind == "4bit":
        return _bnb4(mod)
    if kind == "8bit":
        return _bnb8(mod)
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and _is_torchao_float8(w):
        bs = list(getattr(w, "block_size", []) or [])
        N, K = int(w.shape[0]), int(w.shape[1])
        if bs and bs not in ([1, K], [N, K]):
            _err(f"torchao Float8Tensor with block_size {bs}: only per-row [1, K] or per-tensor [N, K] scales are fused")
        return from_float8(w.qdata, w.scale, dtype=w.dtype, source="torchao.Float8Tensor")
    if isinstance(w, torch.Tensor) and w.dtype == torch.float8_e4m3fn:
        scale = getattr(mod, "weight_scale", None)
        if scale is None:
            _err(f"{type(mod).__name__} has a float8 weight but no weight_scale")
        return from_float8(w, scale, dtype=getattr(mod, "dequant_dtype", torch.float32), source=type(mod).__name__)
    _err(f"{type(mod).__name__} is not a quantised base this library knows (bitsandbytes Linear4bit / Linear8bitLt, "
         "Float8Linear, an nn.Linear with a float8 weight and weight_scale, or a torchao Float8Tensor weight)")


# ----------------------------------------------------------------------------------------------
# Our decoder (pure torch; the torch backend's). Bit-exact against the formats' libraries (tests/test_quant.py).
# ----------------------------------------------------------------------------------------------


def block_absmax(qw: QuantWeight) -> torch.Tensor:
    """The fp32 per-block absmax of a 4-bit weight (decoding a nested one: code2[q]·absmax2[i // 256] + offset)."""
    if not qw.nested:
        return qw.absmax
    nb = qw.absmax.numel()
    idx = torch.arange(nb, device=qw.absmax.device) // NESTED_BLOCKSIZE
    return qw.code2[qw.absmax.int()] * qw.absmax2[idx] + qw.offset


def decode_rows(qw: QuantWeight, n0: int, n1: int, absmax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 values ``w32`` of rows [n0, n1) of W0 (before the rounding to ``qw.dtype``), [n1 - n0, K]."""
    N, K = qw.shape
    if qw.fmt in FOUR_BIT:
        f0, f1 = n0 * K, n1 * K
        b = qw.qdata[f0 // 2 : (f1 + 1) // 2]
        nib = torch.stack((b >> 4, b & 15), -1).reshape(-1)[f0 % 2 : f0 % 2 + (f1 - f0)]
        vals = CODES[qw.fmt].to(qw.device)[nib.int()]
        am = block_absmax(qw) if absmax is None else absmax
        bs = qw.blocksize
        if f0 % bs == 0 and f1 % bs == 0:
            out = (vals.view(-1, bs) * am[f0 // bs : f1 // bs, None]).view(-1)
        else:
            out = vals * am[torch.arange(f0, f1, device=qw.device) // bs]
        return out.view(n1 - n0, K)
    if qw.fmt == "int8":
        return qw.qdata[n0:n1] * qw.absmax.reshape(-1)[n0:n1, None] * INT8_INV
    s = qw.absmax.reshape(-1)
    s = s if s.numel() == 1 else s[n0:n1, None]
    return qw.qdata[n0:n1].float() * s


def dequantize(qw: QuantWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W̃ [N, K] rounded once to ``dtype`` (default ``qw.dtype``): a full-precision copy, for tests, merging into
    a dequantised copy, and export. The layers never keep one."""
    return decode_rows(qw, 0, qw.shape[0]).to(dtype or qw.dtype)


# ----------------------------------------------------------------------------------------------
# A float8 base module (for users without torchao / a serving stack's fp8 checkpoint)
# ----------------------------------------------------------------------------------------------

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(w: torch.Tensor, per_row: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(qdata float8_e4m3fn [N, K], fp32 scale [N, 1] or [1]) with ``scale = amax / 448`` (torchao's convention:
    ``W ≈ float(qdata) · scale``); all-zero rows get scale 1."""
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1, keepdim=True) if per_row else w32.abs().amax().reshape(1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w32 / (scale if per_row else scale.reshape(1, 1))).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


class Float8Linear(nn.Linear):
    """A frozen ``nn.Linear`` with a float8_e4m3fn weight and an fp32 ``weight_scale`` (per row [N, 1] or per
    tensor [1]); ``forward`` runs ``x·W̃ᵀ + bias`` with ``W̃ = (float(weight)·weight_scale).to(dequant_dtype)``.
    Build one with :meth:`from_linear`; ``LoRALinear`` / ``inject_lora`` put LoRA on it with the fused kernels."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, per_row: bool = True,
                 dequant_dtype: torch.dtype = torch.float32, device=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones((out_features, 1) if per_row else (1,), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.dequant_dtype = dequant_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_row: bool = True) -> "Float8Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, per_row, linear.weight.dtype,
                device=linear.weight.device)
        q, s = quantize_fp8(linear.weight, per_row)
        m.weight.data = q
        m.weight_scale.copy_(s)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return m

    def reset_parameters(self) -> None:  # nn.Linear's init does not apply to a float8 weight
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(from_module(self), x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
