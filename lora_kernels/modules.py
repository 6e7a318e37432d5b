"""nn.Module API: ``LoRALinear`` and loralib-style model helpers.

Modules call only the functional API (``lora_linear``, ``merge_``, ``unmerge_``); they know nothing of
kernels or backends beyond passing a ``backend`` string through.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ._checks import LoRAInputError, init_lora_settings
from .exact_merge import MergeRecord, merge_exact_, unmerge_exact_
from .functional import lora_linear, unmerge_
from .named_adapters import NamedAdaptersMixin
from .quant import is_quantized_base
from .quant_modules import LoRAQuantLinear


class LoRALinear(NamedAdaptersMixin, nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``y = base(x) + s·(drop(x)·Aᵀ)·Bᵀ``.

    Wraps ``base`` without copying: ``self.weight`` / ``self.bias`` are base's own Parameters (so a
    state dict keeps the base keys ``weight`` / ``bias`` and adds ``lora_A`` [r, K] and ``lora_B`` [N, r]).
    A is Kaiming-uniform initialised and B zero (the LoRA paper), so a fresh layer equals the base.
    The base weight is frozen (``requires_grad=False``).

    Args:
        base: the nn.Linear to adapt.
        r: rank (>= 1). alpha: scaling numerator; ``scale = alpha / r`` (``alpha / sqrt(r)`` with use_rslora).
        dropout: dropout probability on the LoRA branch input (seeded in-kernel, no mask stored).
        backend: forwarded to every op ("cuda" | "triton" | "torch" | None for auto).
        merge_on_eval: loralib behaviour: ``eval()`` merges BA into W, ``train()`` unmerges.
        lora_dtype: dtype of A and B (default: the base weight's dtype).
        use_dora: DoRA (PEFT's ``use_dora=True``): a trainable magnitude ``lora_magnitude`` [N] (lora_dtype),
            initialised to ‖W0‖ per output row, and ``y = g⊙(x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + bias`` with
            ``g = lora_magnitude / ‖W0 + s·B·A‖`` (norm recomputed from the current A, B every forward, detached;
            ‖W0‖² cached in the non-persistent buffer ``_dora_weight_sq`` and recomputed when W0 changes). See
            ``lora_linear(..., magnitude=)`` for the dropout semantics. ``merge()`` writes PEFT's merged DoRA weight
            g⊙(W0 + s·B·A) (exact pair: g and the repair list in the record). No quantised base.

    A quantised ``base`` (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, float8; ``lora_kernels.quant``) gives a
    :class:`lora_kernels.quant_modules.LoRAQuantLinear` instead (same arguments; it cannot merge).
    """

    fan_in_fan_out = False  # True for a transformers Conv1D base (weight [K, N]); set per instance in __init__
    use_dora = False  # DoRA (lora_magnitude); set per instance in __init__

    def __new__(cls, base=None, *args, **kwargs):
        if cls is LoRALinear and base is not None and is_quantized_base(base):
            if kwargs.get("use_dora"):
                raise NotImplementedError("LoRALinear(use_dora=True) on a quantised base is not supported")
            return LoRAQuantLinear(base, *args, **kwargs)  # not a LoRALinear, so __init__ does not run again
        return super().__new__(cls)

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: Optional[str] = None,
        merge_on_eval: bool = False,
        lora_dtype: Optional[torch.dtype] = None,
        use_dora: bool = False,
    ):
        super().__init__()
        # GPT-2's transformers Conv1D: weight [K, N], y = x·W + b (PEFT's fan_in_fan_out). The ops get weight.t(), a
        # view (every backend reads the base weight through its strides), and merges go into Conv1D's own parameter.
        self.fan_in_fan_out = is_conv1d(base)
        if not isinstance(base, nn.Linear) and not self.fan_in_fan_out:
            raise TypeError(unsupported_base("LoRALinear", base))
        init_lora_settings(self, "LoRALinear", r, alpha, dropout, use_rslora, backend, merge_on_eval)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        dt = lora_dtype or base.weight.dtype
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dt, device=dev))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=dt, device=dev))
        self.merged = False
        self._merge_record: Optional[MergeRecord] = None  # set by merge(); in state dicts as lora_merge_record
        # Other names of self.weight in the model it was injected into (a tied lm_head / embedding); set by
        # inject_lora. merge() refuses to change a tied weight unless asked.
        self.tied_to: Tuple[str, ...] = ()
        self.use_dora = bool(use_dora)
        if self.use_dora:  # DoRA: magnitude [N] (set by reset_lora_parameters) and the cached ‖W0‖² per row
            self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, dtype=dt, device=dev))
            self.register_buffer("_dora_weight_sq", None, persistent=False)
            self._dora_sq_key = None
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=√5) (as nn.Linear / PEFT / loralib), B = 0; DoRA's magnitude = ‖W0‖ per row."""
        if self.merged:
            raise RuntimeError("LoRALinear: unmerge() before re-initialising the adapter")
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if getattr(self, "use_dora", False):
            with torch.no_grad():  # ‖W0 + s·B·A‖ = ‖W0‖ as B = 0 (PEFT initialises the magnitude the same way)
                self.lora_magnitude.copy_(self.dora_weight_sq().sqrt())

    def dora_weight_sq(self) -> torch.Tensor:
        """‖W0[n]‖² per output row (fp32; fp64 for an fp64 weight), cached while the base weight is unchanged (its
        identity, version counter, storage, dtype and device are the key, so a merge or a load recomputes it)."""
        from .dora import weight_row_sq_norm

        if torch.compiler.is_compiling():  # traced: the cached value as it is (a storage address cannot be traced)
            sq = self._dora_weight_sq
            return sq if sq is not None else weight_row_sq_norm(self.weight_nk.detach())
        w = self.weight
        key = (id(w), w._version, w.data_ptr(), w.dtype, w.device, tuple(w.shape))
        sq = self._dora_weight_sq
        if sq is None or self._dora_sq_key != key:
            sq = self._dora_weight_sq = weight_row_sq_norm(self.weight_nk.detach())
            self._dora_sq_key = key
        return sq

    @property
    def weight_nk(self) -> torch.Tensor:
        """The base weight in nn.Linear's [N, K] layout: ``weight`` itself, or a transposed view of a Conv1D's [K, N]."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Parameters straight from _parameters (nn.Module.__getattr__ costs about a µs each on a small CPU); a name
        # that is not a registered parameter (bias=None is a plain attribute) falls back to getattr.
        p = self._parameters
        w = p["weight"] if "weight" in p else self.weight
        if self.fan_in_fan_out:  # Conv1D [K, N] -> its [N, K] view
            w = w.t()
        bias = p["bias"] if "bias" in p else self.bias
        if self.merged:
            return nn.functional.linear(x, w, bias)
        if not self._fast:  # several / another / no active adapter(s): lora_kernels/named_adapters.py
            if self.use_dora and self.adapters_enabled and self.primary_adapter in self.active_adapters:
                raise NotImplementedError("LoRALinear(use_dora=True): the DoRA adapter together with other named "
                                          "adapters in one forward is not supported")
            return self._forward_named(x)
        if self.use_dora:
            return lora_linear(x, w, p["lora_A"], p["lora_B"], self.scale, bias,
                               dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
                               magnitude=p["lora_magnitude"], weight_sq=self.dora_weight_sq())
        return lora_linear(
            x,
            w,
            p["lora_A"] if "lora_A" in p else self.lora_A,
            p["lora_B"] if "lora_B" in p else self.lora_B,
            self.scale,
            bias,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
        )

    @torch.no_grad()
    def merge(self, allow_tied: bool = False) -> None:
        """Fold ``scale·B·A`` into the base weight in place (fp32 accumulate, one rounding), losslessly.

        Uses :func:`lora_kernels.merge_exact_`: the returned record (a repair list plus a snapshot of A and B;
        see ``lora_kernels.exact_merge``) is kept on the module as ``_merge_record`` (serialised into state dicts as ``lora_merge_record``),
        so :meth:`unmerge` restores the base weight bit-for-bit — even if lora_A / lora_B were changed while
        merged (the record removes exactly what was added; the new A/B are used from then on).

        A weight tied to another module's parameter (``tied_to``, e.g. an lm_head sharing the embedding matrix)
        is refused: merging would change the other module too. ``allow_tied=True`` merges anyway (with a warning).
        """
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): the adapter is already merged; unmerge() first")
        if self.tied_to:
            msg = (f"the weight is tied to {', '.join(self.tied_to)}, so merging changes that parameter too (the adapter "
                   "would then also act on it)")
            if not allow_tied:
                raise LoRAInputError(f"LoRALinear.merge(): {msg}. Untie it first (e.g. module.weight = "
                                     "nn.Parameter(module.weight.detach().clone())), keep the adapter unmerged, or pass "
                                     "allow_tied=True to merge anyway")
            warnings.warn(f"LoRALinear.merge(allow_tied=True): {msg}", UserWarning, stacklevel=2)
        if hasattr(self, "reshard"):  # FSDP2 module: merge the sharded parameters, not a transient unsharded copy
            self.reshard()
        a, b, s = self._merge_operands("merge")  # the active adapters (named_adapters.py)
        if self.use_dora:  # W ← round(g⊙(W0 + s·B·A)), g = m / ‖W0 + s·B·A‖ of the unmerged W0, kept in the record
            self._merge_record = merge_exact_(self.weight_nk, a, b, s, magnitude=self.lora_magnitude.detach())
        else:
            self._merge_record = merge_exact_(self.weight_nk, a, b, s, backend=self.backend)
        self.merged_adapters = self.active_adapters
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``scale·B·A`` from the base weight in place, restoring it bit-for-bit.

        If the base weight itself was modified (or moved / cast) while merged, the record no longer applies:
        a warning is issued and the recorded adapter is subtracted with the plain (rounding) unmerge instead.
        """
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): the adapter is not merged")
        record: Optional[MergeRecord] = getattr(self, "_merge_record", None)
        if hasattr(self, "reshard"):  # FSDP2 module: unmerge the sharded parameters (where merge() merged)
            self.reshard()
        try:
            if record is None:
                raise LoRAInputError("no merge record (merged by an older version or by hand)")
            unmerge_exact_(self.weight_nk, record)
        except LoRAInputError as e:
            warnings.warn(
                f"LoRALinear.unmerge(): exact unmerge impossible ({e}); subtracting the adapter with the plain "
                "unmerge instead (the base weight is restored only up to rounding)",
                RuntimeWarning,
                stacklevel=2,
            )
            if record is not None and record.dora_factor is not None:  # DoRA: W/g − s·B·A with the merge's g
                dev = self.weight.device
                g = record.dora_factor.to(dev)
                unmerge_(self.weight_nk, record.lora_a[0].to(dev), record.lora_b[0].to(dev), record.scales[0],
                         magnitude=g, weight_norm=torch.ones_like(g))  # g = magnitude / 1
            elif record is not None:
                dev = self.weight.device
                a = [t.to(dev) for t in record.lora_a]
                b = [t.to(dev) for t in record.lora_b]
                unmerge_(self.weight_nk, a, b, list(record.scales), backend=self.backend)
            elif self.use_dora:
                raise RuntimeError("LoRALinear.unmerge(): a DoRA layer merged without a merge record cannot be "
                                   "unmerged (its factor g came from the unmerged weight)") from e
            else:
                a, b, s = self._merge_operands("unmerge")
                unmerge_(self.weight_nk, a, b, s, backend=self.backend)
        self._merge_record = None
        self.merged = False
        self.merged_adapters = ()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_on_eval:
            if mode and self.merged:
                self.unmerge()
            elif not mode and not self.merged and not self._disabled:
                self.merge()
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}, merged={self.merged}"
            + (", use_dora=True" if self.use_dora else "")
        )


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers.pytorch_utils.Conv1D`` (GPT-2 family; weight [K, N], y = x·W + b).
    Asked without importing transformers (a model holding one has imported it already)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return mod is not None and isinstance(module, getattr(mod, "Conv1D", ()))


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def unsupported_base(who: str, module: nn.Module, name: Optional[str] = None) -> str:
    """The error message for a module LoRA cannot wrap (convolutions named as such)."""
    what = f"module {name!r} ({type(module).__name__})" if name is not None else type(module).__name__
    if who == "LoRALinear":
        hint = ("; for a 2-D convolution use lora_kernels.LoRAConv2d (inject_lora picks it)" if isinstance(module, nn.Conv2d)
                else "; LoRA on this convolution is not supported" if isinstance(module, _CONV) else "")
        return f"LoRALinear wraps an nn.Linear or a transformers Conv1D, got {what}{hint}"
    if isinstance(module, _CONV):
        return (f"{who}: {what}: LoRA on this convolution is not supported (targets: nn.Linear, transformers Conv1D, "
                "nn.Embedding, nn.Conv2d)")
    return f"{who}: {what} is not a LoRA target (nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv2d)"


def _matches(name: str, target_modules: Union[str, Iterable[str]]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject_lora(
    model: nn.Module,
    target_modules: Union[str, Iterable[str]],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    backend: Optional[str] = None,
    merge_on_eval: bool = False,
    lora_dtype: Optional[torch.dtype] = None,
    use_dora: bool = False,
    modules_to_save: Optional[Iterable[str]] = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` (or transformers ``Conv1D``) whose qualified name matches with a :class:`LoRALinear`,
    every ``nn.Embedding`` with a :class:`lora_kernels.LoRAEmbedding` and every ``nn.Conv2d`` with a
    :class:`lora_kernels.LoRAConv2d`, in place. Another matched convolution (Conv1d/3d, transposed, a Conv2d with
    groups / dilation) raises TypeError; a target whose weight is tied to another parameter (a tied lm_head) gets a
    warning.

    Quantised bases (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, float8) get a ``LoRAQuantLinear``;
    ``lora_dtype`` is the adapters' dtype (default: the base's, or its compute dtype when quantised).

    ``target_modules`` is a list of names or name suffixes (``["q_proj", "v_proj"]``, PEFT-style) or a
    regex string matched against the full qualified name. Raises if nothing matched. Returns model.

    ``use_dora=True``: DoRA on the nn.Linear / Conv1D targets (:class:`LoRALinear`'s ``use_dora``); MoE experts and
    embeddings are not targeted then (DoRA is not implemented for them).

    ``modules_to_save``: PEFT's option, see :func:`set_modules_to_save` (fully trained modules saved with the adapter).
    """
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    if modules_to_save:
        set_modules_to_save(model, modules_to_save, exclude=target_modules)
    from .moe import inject_moe_lora  # MoE experts (3-D expert parameters, nn.ModuleList experts): lora_kernels/moe.py

    moe_hits = [] if use_dora else inject_moe_lora(model, target_modules, r, alpha, dropout, use_rslora, backend,
                                                   merge_on_eval, lora_dtype)
    from .conv import LoRAConv2d  # nn.Conv2d targets: lora_kernels/conv.py
    from .embedding import LoRAEmbedding  # nn.Embedding targets: lora_kernels/embedding.py

    hits = []
    for name, mod in model.named_modules():
        if isinstance(mod, (LoRALinear, LoRAQuantLinear, LoRAEmbedding, LoRAConv2d)) or not _matches(name, target_modules):
            continue
        if isinstance(mod, (nn.Linear, nn.Embedding)) or is_conv1d(mod):
            hits.append((name, mod))
        elif isinstance(mod, nn.Conv2d) and not isinstance(mod, LoRAConv2d):
            why = LoRAConv2d.unsupported(mod)
            if why:
                raise TypeError(f"inject_lora: module {name!r} (Conv2d): {why}")
            hits.append((name, mod))
        elif isinstance(mod, _CONV):
            raise TypeError(unsupported_base("inject_lora", mod, name))
    if not hits:
        if moe_hits:
            return model
        raise ValueError(f"inject_lora: no nn.Linear in the model matches target_modules={target_modules!r} (nor a "
                         "transformers Conv1D, nn.Embedding or nn.Conv2d; a layer that already has LoRA takes another "
                         "adapter with lora_kernels.add_adapter(model, name, target_modules, r, alpha))")
    names_of: Dict[int, list] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(pname)
    for name, mod in hits:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        cls = LoRAEmbedding if isinstance(mod, nn.Embedding) else LoRAConv2d if isinstance(mod, nn.Conv2d) else LoRALinear
        if use_dora and cls is LoRAEmbedding:
            continue  # (documented above: DoRA targets the linear layers only)
        extra = {"use_dora": True} if use_dora else {}
        layer = cls(mod, r, alpha, dropout, use_rslora, backend, merge_on_eval, lora_dtype, **extra)
        own = f"{name}.weight"
        layer.tied_to = tuple(n for n in names_of.get(id(mod.weight), ()) if n != own)
        if layer.tied_to:  # as PEFT warns for a tied lm_head / embedding target
            warnings.warn(f"inject_lora: {own} is tied to {', '.join(layer.tied_to)}; the adapter is not tied (it acts on "
                          f"{name} only), and merging it would change the tied parameter too, so merge() refuses "
                          "unless allow_tied=True. Untie the weights first to merge safely.", UserWarning, stacklevel=2)
        setattr(parent, child, layer)
    return model


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze every parameter except LoRA's (loralib parity).

    ``bias``: "none" (freeze all biases), "all" (train all biases), "lora_only" (train biases of
    LoRA layers only).
    """
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"mark_only_lora_as_trainable: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    for name in getattr(model, "lora_modules_to_save_paths", ()):  # set_modules_to_save: trained in full
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        from .conv import LoRAConv2d

        for m in model.modules():
            if isinstance(m, (LoRALinear, LoRAQuantLinear, LoRAConv2d)) and m.bias is not None:
                m.bias.requires_grad_(True)
    return model


def set_modules_to_save(model: nn.Module, modules_to_save: Iterable[str], *, exclude=None) -> List[str]:
    """PEFT's ``modules_to_save``: modules trained in full and saved with the adapter (a classification head, a norm).

    A module is selected when its qualified name ends with one of the strings (PEFT's rule, plain ``str.endswith``).
    Its parameters are made trainable (and stay so under :func:`mark_only_lora_as_trainable`); the list is kept on the
    model as ``model.lora_modules_to_save`` (the names as given, what PEFT writes in ``adapter_config.json``) and
    ``model.lora_modules_to_save_paths`` (the matched paths) for :func:`lora_kernels.peft_io.save_peft_adapter`.
    Unlike PEFT no copy of the original module is kept: the module itself is trained (so ``disable_adapters`` does not
    bring back its original weights). Raises when a string matches nothing or a matched module is a LoRA target.
    Returns the matched paths."""
    names = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"modules_to_save: give a list of module names, got {modules_to_save!r}")
    paths, unmatched = [], []
    all_mods = [(n, m) for n, m in model.named_modules() if n]
    for t in names:
        hit = [n for n, _ in all_mods if n.endswith(t)]
        if not hit:
            unmatched.append(t)
        paths += [n for n in hit if n not in paths]
    if unmatched:
        raise ValueError(f"modules_to_save: no module of the model ends with {unmatched}")
    lora = [n for n in paths if isinstance(model.get_submodule(n), (LoRALinear, LoRAQuantLinear))
            or (exclude is not None and _matches(n, exclude))]
    if lora:
        raise ValueError(f"modules_to_save: {lora[:3]} are (or would become) LoRA layers; a module is either adapted or "
                         "saved in full")
    for n in paths:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)
    model.lora_modules_to_save = tuple(dict.fromkeys([*getattr(model, "lora_modules_to_save", ()), *names]))
    model.lora_modules_to_save_paths = tuple(dict.fromkeys([*getattr(model, "lora_modules_to_save_paths", ()), *paths]))
    return paths


def lora_state_dict(model: nn.Module, bias: str = "none") -> Dict[str, torch.Tensor]:
    """The LoRA parameters of ``model`` (every named adapter; plus biases per ``bias``, as in loralib), and the full
    state of its ``modules_to_save`` (:func:`set_modules_to_save`), as PEFT's adapter state dict holds them."""
    sd = model.state_dict()
    keep = tuple(f"{p}." for p in getattr(model, "lora_modules_to_save_paths", ()))
    if bias == "none":
        return {k: v for k, v in sd.items() if "lora_" in k or k.startswith(keep)}
    if bias == "all":
        return {k: v for k, v in sd.items() if "lora_" in k or k.endswith("bias") or k.startswith(keep)}
    if bias == "lora_only":
        out = {k: v for k, v in sd.items() if k.startswith(keep)}
        for name, m in model.named_modules():
            if isinstance(m, (LoRALinear, LoRAQuantLinear)):
                pre = f"{name}." if name else ""
                out[pre + "lora_A"] = m.lora_A.detach()
                out[pre + "lora_B"] = m.lora_B.detach()
                for n in getattr(m, "_named_cfg", None) or ():  # the other named adapters (named_adapters.py)
                    out[f"{pre}lora_A_named.{n}"] = m.lora_A_named[n].detach()
                    out[f"{pre}lora_B_named.{n}"] = m.lora_B_named[n].detach()
                if m.bias is not None:  # a LoRAQuantLinear keeps its base (and the bias) as base_layer
                    out[pre + ("base_layer.bias" if isinstance(m, LoRAQuantLinear) else "bias")] = m.bias.detach()
        from .conv import LoRAConv2d

        out.update({k: v for k, v in sd.items() if "lora_" in k and k not in out})  # LoRAEmbedding, LoRAConv2d, ...
        for name, m in model.named_modules():
            if isinstance(m, LoRAConv2d) and m.bias is not None:
                out[f"{name}.bias" if name else "bias"] = m.bias.detach()
        return out
    raise ValueError(f"lora_state_dict: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
