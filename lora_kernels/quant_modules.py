"""LoRA on a quantised frozen base as an ``nn.Module`` (:class:`LoRAQuantLinear`), and the hook that runs PEFT's
bitsandbytes LoRA layers (``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt``) on the fused path.

``LoRALinear(base, ...)`` and ``inject_lora`` return / insert a :class:`LoRAQuantLinear` when ``base`` is a
quantised base (``lora_kernels.quant.is_quantized_base``: bitsandbytes ``Linear4bit`` / ``Linear8bitLt``,
``quant.Float8Linear``, an ``nn.Linear`` with a float8 weight + ``weight_scale`` or a torchao ``Float8Tensor``).
The base module is kept as the child ``base_layer`` (its own state dict, quant state included, under
``base_layer.``), the adapters as ``lora_A`` [r, K] / ``lora_B`` [N, r] in ``lora_dtype``.

This module imports the functional API and the format layer only (never ``modules`` or ``peft``, which import it).
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Callable, Optional

import torch
from torch import nn

from . import quant as Q
from ._checks import LoRAInputError, init_lora_settings
from .functional import quant_lora_linear
from .ops.quant_linear import check_quant_weight

__all__ = ["LoRAQuantLinear", "quant_weight_of_module", "peft_quant_forward"]

logger = logging.getLogger("lora_kernels.peft")

# module -> (key, QuantWeight): reading a bitsandbytes state checks its codebook (a host read on a GPU), so it is
# done once per base and re-done only when the base's tensors change (a weak map: nothing is kept alive by it).
_QW_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _ident(t) -> tuple:
    if t is None:
        return (0,)
    try:
        return (id(t), t.data_ptr(), t.device, t.dtype)
    except (RuntimeError, NotImplementedError, AttributeError):  # tensor subclasses without storage of their own
        return (id(t),)


def quant_weight_of_module(mod: nn.Module) -> "Q.QuantWeight":
    """``quant.from_module(mod)``, validated, cached per module until its quantised tensors change."""
    w = getattr(mod, "weight", None)
    st = getattr(mod, "state", None)
    key = (_ident(w), id(getattr(w, "quant_state", None)), _ident(getattr(w, "SCB", None)),
           _ident(getattr(st, "CB", None)), _ident(getattr(st, "SCB", None)), _ident(getattr(mod, "weight_scale", None)),
           _ident(getattr(w, "qdata", None)))
    hit = _QW_CACHE.get(mod)
    if hit is not None and hit[0] == key:
        return hit[1]
    qw = Q.from_module(mod)
    check_quant_weight(qw, "quant_lora_linear")
    _QW_CACHE[mod] = (key, qw)
    return qw


def _compute_dtype(base, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes runs the base in: ``Linear4bit.compute_dtype`` when set, else x's."""
    cd = getattr(base, "compute_dtype", None)
    return cd if isinstance(cd, torch.dtype) else x.dtype


class LoRAQuantLinear(nn.Module):
    """A quantised frozen base plus a trainable low-rank update: ``y = x·W̃ᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ``.

    Runs :func:`lora_kernels.quant_lora_linear` (dequantisation fused into the GEMM on Triton; no full-precision
    copy of W0 kept between calls). x is cast to the base's compute dtype (bitsandbytes' ``compute_dtype``) and y
    back to x's dtype, as bitsandbytes does; adapters of another dtype are cast to the compute dtype
    (differentiably, gradients arrive in ``lora_dtype``).

    Args:
        base: a quantised base module (see the module docstring); kept as ``self.base_layer``, frozen.
        r, alpha, dropout, use_rslora, backend: as :class:`lora_kernels.LoRALinear`.
        merge_on_eval: must be False (a quantised base cannot absorb the adapter; see :meth:`merge`).
        lora_dtype: dtype of A and B (default: the base's compute dtype, else its dequantised dtype).
        strategy: "fused" / "scratch" / None (auto), see ``lora_kernels.quant_lora_linear``.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 backend: Optional[str] = None, merge_on_eval: bool = False,
                 lora_dtype: Optional[torch.dtype] = None, strategy: Optional[str] = None):
        super().__init__()
        init_lora_settings(self, "LoRAQuantLinear", r, alpha, dropout, use_rslora, backend, False)
        if merge_on_eval:
            raise LoRAInputError(_merge_refusal("merge_on_eval=True"))
        if lora_dtype is not None and (not isinstance(lora_dtype, torch.dtype) or not lora_dtype.is_floating_point
                                       or lora_dtype.itemsize < 2):
            raise LoRAInputError(f"LoRAQuantLinear: lora_dtype must be a float dtype of 16 bits or more, got {lora_dtype}")
        qw = quant_weight_of_module(base)
        self.base_layer = base
        base.weight.requires_grad_(False)
        self.out_features, self.in_features = qw.shape
        self.strategy = strategy
        cd = getattr(base, "compute_dtype", None)
        dt = lora_dtype or (cd if isinstance(cd, torch.dtype) else qw.dtype)
        dev = qw.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dt, device=dev))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=dt, device=dev))
        self.merged = False
        self.tied_to = ()
        self.reset_lora_parameters()

    @property
    def weight(self):
        """The base's (quantised) weight parameter."""
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def quant_weight(self) -> "Q.QuantWeight":
        """The base as a :class:`lora_kernels.quant.QuantWeight` (its own tensors, not a copy)."""
        return quant_weight_of_module(self.base_layer)

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=√5), B = 0 (a fresh layer equals the base)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = _compute_dtype(self.base_layer, x)
        y = quant_lora_linear(x.to(cd), self.quant_weight(), self.lora_A, self.lora_B, self.scale, self.bias,
                              dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
                              strategy=self.strategy)
        return y.to(x.dtype)

    def merge(self, allow_tied: bool = False) -> None:
        raise LoRAInputError(_merge_refusal("LoRAQuantLinear.merge()"))

    def unmerge(self) -> None:
        raise RuntimeError("LoRAQuantLinear.unmerge(): the adapter is not merged (a quantised base is never merged)")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}, "
                f"base={self.quant_weight().fmt}")


def _merge_refusal(what: str) -> str:
    return (f"{what}: cannot merge a LoRA adapter into a quantised base (its weight is not a float matrix, and "
            "re-quantising W0 + s·B·A would lose most of the update). Alternatives: keep the adapter unmerged (the fused "
            "kernels run it without a full-precision copy of W0), or merge into a dequantised copy: "
            "W = lora_kernels.quant.dequantize(layer.quant_weight(), torch.bfloat16); "
            "lora_kernels.merge_(W, layer.lora_A, layer.lora_B, layer.scale), and use W in a plain nn.Linear "
            "(re-quantise it yourself if you need a quantised model)")


# ----------------------------------------------------------------------------------------------
# PEFT: peft.tuners.lora.bnb.Linear4bit / Linear8bitLt on the fused path (called by lora_kernels.peft.patch)
# ----------------------------------------------------------------------------------------------


def _is_peft_bnb_layer(mod) -> bool:
    t = type(mod)
    return t.__module__ == "peft.tuners.lora.bnb" and t.__name__ in ("Linear4bit", "Linear8bitLt")


def peft_quant_forward(mod, orig_forward: Callable, adapter_reason: Callable, log_once: Callable) -> Optional[Callable]:
    """The fused forward for PEFT LoRA layer ``mod`` when it is a bitsandbytes LoRA layer this library runs
    (None otherwise). ``orig_forward(self)`` / ``adapter_reason(self, name)`` / ``log_once(reason)`` are
    ``lora_kernels.peft``'s helpers (passed in: this module does not import ``peft``).

    Per call it falls back to PEFT's own forward in the cases ``lora_kernels.peft`` documents (several active
    adapters, DoRA, extra arguments, merged, disabled, hooks) and when the base is not quantised yet."""
    if not _is_peft_bnb_layer(mod) or hasattr(mod, "_hf_hook") or getattr(mod, "fan_in_fan_out", False):
        return None
    base = mod.base_layer
    if not Q.is_quantized_base(base) or hasattr(base, "_hf_hook"):
        return None
    try:
        quant_weight_of_module(base)
    except LoRAInputError as e:
        log_once(f"bitsandbytes base layer not fused: {e}")
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        reason = _call_reason(self, x, args, kwargs, adapter_reason)
        if reason is not None:
            if reason:
                log_once(reason)
            return orig_forward(self)(x, *args, **kwargs)
        name = next(a for a in self.active_adapters if a in self.lora_A)
        base = self.base_layer
        drop = self.lora_dropout[name] if name in self.lora_dropout else None
        p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
        backend = self.__dict__.get("_lora_kernels_backend")
        cd = _compute_dtype(base, x) if not torch.is_autocast_enabled(x.device.type) else x.dtype
        y = quant_lora_linear(x.to(cd), quant_weight_of_module(base), self.lora_A[name].weight,
                              self.lora_B[name].weight, float(self.scaling[name]), base.bias, dropout_p=p,
                              backend=backend)
        return y.to(x.dtype)

    return forward


def _call_reason(self, x, args, kwargs, adapter_reason) -> Optional[str]:
    """Why this call of a PEFT bitsandbytes LoRA layer must use PEFT's forward (None: fused; "": silently)."""
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments (e.g. adapter_names for mixed-adapter batches) are not fused"
    if self.disable_adapters or self.merged:
        return ""
    active = [a for a in self.active_adapters if a in self.lora_A]
    if not active:
        return ""
    if len(active) > 1:
        return "several active adapters at once are not fused"
    reason = adapter_reason(self, active[0])
    if reason is not None:
        return reason
    base = self.base_layer
    if base._forward_hooks or base._forward_pre_hooks:
        return "forward hooks on the base layer are not fused"
    if not x.is_floating_point():
        return "non-floating-point input is not fused"
    if x.device != base.weight.device or self.lora_A[active[0]].weight.device != base.weight.device:
        return "inputs and weights on different devices are not fused"
    return None
