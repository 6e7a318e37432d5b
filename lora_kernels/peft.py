"""Run PEFT LoRA models on the fused ``lora_linear`` path, in place.

``patch(model)`` swaps the ``forward`` of every supported PEFT LoRA ``Linear`` (``peft.tuners.lora.layer.Linear``)
for a wrapper that, on each call, reads PEFT's live state (active adapter, ``disable_adapter()``, merged
adapters, ``scaling``, dropout module and its training flag) and either runs ``lora_kernels.lora_linear`` on
PEFT's own tensors (``base_layer.weight`` / ``.bias``, ``lora_A[name].weight``, ``lora_B[name].weight``) or
calls PEFT's original forward. No parameter is copied or re-registered, so ``save_pretrained``, optimizers built
before or after patching, ``set_adapter``, ``disable_adapter()``, ``merge_adapter`` / ``unmerge_adapter`` and
``set_scale`` keep working. ``unpatch(model)`` puts the original forwards back exactly.

The fused path runs when, for that call: exactly one adapter is active (and present in the layer), the adapters
are enabled and nothing is merged, the adapter is plain LoRA or DoRA (no other ``lora_variant``, no
``lora_bias``), its dropout is ``nn.Dropout`` or ``nn.Identity``, the base is a plain ``nn.Linear`` without
hooks, ``fan_in_fan_out`` is False, no extra forward arguments (``adapter_names=...``) are passed, and x has
the base weight's dtype and device (or autocast is on). Anything else takes PEFT's path, and each reason is
logged once (per reason, not per call or per module) on the ``lora_kernels.peft`` logger.

Numerics: identical to PEFT when adapter and base share a dtype. When PEFT keeps the adapter in fp32 over a
bf16/fp16 base (its ``autocast_adapter_dtype`` default), PEFT computes the LoRA branch in fp32, while the fused
path casts A and B to x's dtype (differentiably; their gradients still arrive in fp32). Dropout uses
lora_kernels' seeded hash mask, not ``nn.Dropout``'s RNG stream: same distribution, different masks.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from typing import Dict, List, Optional

import torch
from torch import nn

from .functional import lora_linear

logger = logging.getLogger(__name__)

_ORIG_ATTR = "_lora_kernels_orig_forward"  # the instance-level forward that existed before patching (or _NONE)
_BACKEND_ATTR = "_lora_kernels_backend"
_NONE = "__lora_kernels_no_instance_forward__"

_logged_reasons: set = set()


def _log_once(reason: str) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.warning("lora_kernels.peft: PEFT LoRA layers stay on PEFT's own forward: %s", reason)


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` did: ``patched`` module paths and ``skipped`` ``{reason: [module paths]}``."""

    patched: List[str] = dataclasses.field(default_factory=list)
    skipped: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    already_patched: List[str] = dataclasses.field(default_factory=list)

    @property
    def num_patched(self) -> int:
        return len(self.patched) + len(self.already_patched)

    @property
    def skipped_counts(self) -> Dict[str, int]:
        return {reason: len(v) for reason, v in self.skipped.items()}

    def __str__(self) -> str:
        lines = [f"lora_kernels.peft.patch: {self.num_patched} LoRA Linear layer(s) on the fused path"]
        for reason, n in self.skipped_counts.items():
            lines.append(f"  skipped {n}: {reason}")
        return "\n".join(lines)


def _peft_lora():
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("lora_kernels.peft needs the `peft` package (pip install lora_kernels[interop])") from e
    return lora_layer


def _adapter_reason(mod, name: str, dora_ok: bool = False) -> Optional[str]:
    """Why adapter ``name`` of a PEFT lora.Linear cannot take the fused path (None: it can). Runs on every call of a
    patched layer, so submodules are read from ``_modules`` directly (not through ``nn.Module.__getattr__``).
    ``dora_ok``: the caller runs DoRA adapters (plain lora.Linear layers: ``lora_linear(..., magnitude=)``); the
    quantised and MoE paths do not."""
    d = mod.__dict__
    dora = d.get("use_dora", {}).get(name, False)
    if dora and not dora_ok:
        return "use_dora=True (DoRA) is not fused"
    variant = d.get("lora_variant", {}).get(name)
    if dora:
        if variant is not None and type(variant).__name__ != "DoraLinearVariant":
            return f"LoRA variant {type(variant).__name__} with use_dora is not fused"
        mags = mod._modules.get("lora_magnitude_vector")
        if mags is None or name not in mags._modules or not isinstance(
                mags._modules[name]._parameters.get("weight"), torch.Tensor):
            return "DoRA layer without lora_magnitude_vector[adapter].weight is not fused"
    elif variant is not None:
        return f"LoRA variant {type(variant).__name__} is not fused"
    mods = mod._modules
    lora_a, lora_b = mods["lora_A"]._modules[name], mods["lora_B"]._modules[name]
    if d.get("lora_bias", {}).get(name, False) or lora_b.bias is not None:
        return "lora_bias=True is not fused"
    if lora_a.bias is not None:
        return "lora_A with a bias is not fused"
    drop = mods["lora_dropout"]._modules.get(name)
    if drop is not None and type(drop) is not nn.Dropout and type(drop) is not nn.Identity:
        return f"lora_dropout of type {type(drop).__name__} (only nn.Dropout / nn.Identity) is not fused"
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return "lora_A/lora_B that are not plain nn.Linear are not fused"
    return None


def _module_reason(mod) -> Optional[str]:
    """Why a PEFT LoRA layer can never take the fused path, whatever its adapters (None: it can)."""
    lora_layer = _peft_lora()
    if type(mod) is not lora_layer.Linear:
        return f"{type(mod).__module__}.{type(mod).__name__} (quantized or non-Linear LoRA layer) is not fused"
    if hasattr(mod, "_hf_hook"):
        return "LoRA layer with an accelerate hook (offloading / device alignment) is not fused"
    if getattr(mod, "fan_in_fan_out", False):
        return "fan_in_fan_out=True is not fused"
    # The layer's own base, not get_base_layer(): in a PeftMixedModel it can be another tuner's layer (LoHa, LoKr,
    # ...) whose contribution PEFT adds by calling it; unwrapping to its nn.Linear would drop that contribution.
    base = mod.base_layer
    if type(base) is not nn.Linear:
        return (f"base layer {type(base).__module__}.{type(base).__qualname__} (another tuner's layer, quantized, or "
                "not a plain nn.Linear) is not fused")
    if hasattr(base, "_hf_hook"):
        return "base layer with an accelerate hook (offloading) is not fused"
    return None


def _call_reason(self, x, args, kwargs) -> Optional[str]:
    """Why this particular call must use PEFT's forward (None: fused)."""
    r = _fused_call(self, x, args, kwargs)
    return r if isinstance(r, str) else None


def _fused_call(self, x, args, kwargs):
    """``(name,)`` when this call can take the fused path (name: the one active adapter), else the reason why not, a
    string ('' when no message is needed). Reads PEFT's live state; cheap (dict lookups) on the fused path."""
    if args or (kwargs and any(v is not None for v in kwargs.values())):
        return "extra forward arguments (e.g. adapter_names for mixed-adapter batches) are not fused"
    if self.disable_adapters or self.merged:
        return ""  # PEFT's own base-only path is already a single GEMM: no message needed
    lora_a = self._modules["lora_A"]._modules
    active = [a for a in self.active_adapters if a in lora_a]
    if not active:
        return ""
    if len(active) > 1:
        return "several active adapters at once are not fused"
    name = active[0]
    reason = _adapter_reason(self, name, dora_ok=True)
    if reason is not None:
        return reason
    base = self._modules["base_layer"]
    if base._forward_hooks or base._forward_pre_hooks:
        return "forward hooks on the base layer are not fused"
    w = _param(base, "weight")
    if x.device != w.device or _param(lora_a[name], "weight").device != w.device:
        return "inputs and weights on different devices are not fused"
    if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
        return "input dtype different from the base weight dtype is not fused"
    if not x.is_floating_point():
        return "non-floating-point input is not fused"
    return (name,)


_MISSING = object()


def _param(mod: nn.Module, name: str):
    """``mod.<name>`` for a registered parameter (a dict lookup), through ``getattr`` for anything else."""
    p = mod._parameters.get(name, _MISSING)
    return getattr(mod, name) if p is _MISSING else p


def _orig_forward(self):
    prev = self.__dict__.get(_ORIG_ATTR, _NONE)
    if isinstance(prev, str) and prev == _NONE:
        return type(self).forward.__get__(self)
    return prev


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replacement forward bound to a PEFT lora.Linear by :func:`patch`."""
    r = _fused_call(self, x, args, kwargs)
    if isinstance(r, str):
        if r:
            _log_once(r)
        return _orig_forward(self)(x, *args, **kwargs)
    name = r[0]
    mods = self._modules
    base = mods["base_layer"]
    drop = mods["lora_dropout"]._modules.get(name)
    p = float(drop.p) if (drop is not None and drop.training and type(drop) is nn.Dropout) else 0.0
    magnitude = None
    if self.__dict__.get("use_dora", {}).get(name, False):
        # PEFT's DoraLinearVariant: dropout (nn.Dropout, module in training) gives the two-base-GEMM form, else
        # g⊙(x·W0ᵀ + s·x·Aᵀ·Bᵀ) + bias; the magnitude is PEFT's own Parameter (save/load unchanged)
        if not self.training:
            p = 0.0
        magnitude = mods["lora_magnitude_vector"]._modules[name]._parameters["weight"]
    return lora_linear(
        x,
        _param(base, "weight"),
        _param(mods["lora_A"]._modules[name], "weight"),
        _param(mods["lora_B"]._modules[name], "weight"),
        float(self.scaling[name]),
        _param(base, "bias"),
        dropout_p=p,
        backend=self.__dict__.get(_BACKEND_ATTR),
        magnitude=magnitude,
    )


def is_patched(module: nn.Module) -> bool:
    return _ORIG_ATTR in module.__dict__


def patch(model: nn.Module, backend: Optional[str] = None, *, verbose: bool = True) -> PatchReport:
    """Put every supported PEFT LoRA ``Linear`` in ``model`` on the fused path, in place.

    ``model`` is a ``PeftModel`` or any module containing PEFT LoRA layers. Layers whose every adapter is
    unsupported (DoRA, lora_bias, other variants), non-``nn.Linear`` bases (except bitsandbytes ``Linear4bit`` /
    ``Linear8bitLt``: their PEFT layers run ``quant_lora_linear``, lora_kernels/quant_modules.py) and ``fan_in_fan_out``
    layers are left untouched and listed in the report, one log line per reason. Supported layers get a
    forward that re-checks PEFT's live state on each call and falls back to PEFT's own forward when needed.
    Calling ``patch`` again is harmless (already patched layers are counted, not re-wrapped; ``backend`` is
    updated). ``backend`` is passed to every ``lora_linear`` call.

    Returns a :class:`PatchReport`.
    """
    lora_layer = _peft_lora()
    report = PatchReport()
    for path, mod in model.named_modules():
        if not isinstance(mod, lora_layer.LoraLayer):
            continue
        if is_patched(mod):
            mod.__dict__[_BACKEND_ATTR] = backend
            report.already_patched.append(path)
            continue
        reason = _module_reason(mod)
        forward = _fused_forward
        if reason is not None:  # PEFT's bitsandbytes LoRA layers (QLoRA): lora_kernels/quant_modules.py
            from .quant_modules import peft_quant_forward

            quant_forward = peft_quant_forward(mod, _orig_forward, _adapter_reason, _log_once)
            if quant_forward is not None:
                reason, forward = None, quant_forward
        if reason is not None and hasattr(mod, "parameter_name"):  # target_parameters (MoE experts): lora_kernels/moe.py
            from .moe import peft_param_forward

            reason, forward = peft_param_forward(mod, reason, _orig_forward, _adapter_reason, _log_once)
            if reason is None and forward is None:
                continue  # nested in another ParamWrapper, whose patched forward runs it
        if reason is None:
            names = list(mod.lora_A.keys())
            dora_ok = forward is _fused_forward
            reasons = {n: _adapter_reason(mod, n, dora_ok) for n in names}
            if names and all(r is not None for r in reasons.values()):
                reason = reasons[names[0]]
            else:
                for n, r in reasons.items():
                    if r is not None:
                        _log_once(f"{r} (adapter {n!r}; the layer's other adapters are fused)")
        if reason is not None:
            report.skipped.setdefault(reason, []).append(path)
            continue
        mod.__dict__[_ORIG_ATTR] = mod.__dict__.get("forward", _NONE)
        mod.__dict__[_BACKEND_ATTR] = backend
        mod.forward = types.MethodType(forward, mod)
        report.patched.append(path)
    for reason, paths in report.skipped.items():
        _log_once(f"{reason} ({len(paths)} layer(s), e.g. {paths[0]})")
    if verbose:
        logger.info("%s", report)
    return report


def unpatch(model: nn.Module) -> int:
    """Restore the original forward of every layer :func:`patch` touched. Returns how many were restored."""
    n = 0
    for mod in model.modules():
        if not is_patched(mod):
            continue
        prev = mod.__dict__.pop(_ORIG_ATTR)
        mod.__dict__.pop(_BACKEND_ATTR, None)
        if isinstance(prev, str) and prev == _NONE:
            mod.__dict__.pop("forward", None)
        else:
            mod.__dict__["forward"] = prev
        n += 1
    return n


__all__ = ["patch", "unpatch", "is_patched", "PatchReport"]
