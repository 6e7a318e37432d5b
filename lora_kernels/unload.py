"""``merge_and_unload`` / ``unload``: give back a plain model (``nn.Linear`` where LoRA was), as PEFT's methods of the
same names, so that ``save_pretrained`` of the result has exactly the base model's keys.

* A :class:`~lora_kernels.LoRALinear` becomes an ``nn.Linear`` (a transformers ``Conv1D`` for a GPT-2 base) holding the base's own ``weight`` / ``bias``
  Parameters (no copy). ``merge_and_unload`` first folds the active adapters into that weight: a layer already
  merged (``layer.merge()``) keeps its merged weight as it is (its exact-merge record is dropped: the result has no
  adapter to unmerge); an unmerged one is merged with :func:`lora_kernels.merge_` (fp32 accumulate, one rounding:
  the same value ``merge()`` writes; a DoRA layer merges with its own ``merge()``). ``unload`` gives back the base weight instead (an exactly unmerged one for a
  merged layer). A layer whose adapters are disabled is unloaded without merging.
* A :class:`~lora_kernels.LoRAEmbedding` becomes an ``nn.Embedding`` the same way (its adapter merged into the
  table's [D, V] view).
* Tied weights (an ``lm_head`` sharing the embedding matrix, found by parameter identity in the model): merging
  into the shared matrix would change the embedding too, so ``tied="refuse"`` (default) raises and names the
  parameters; ``tied="untie"`` gives the adapted layer a merged copy of its own, leaves the other module's weight
  unchanged and sets ``config.tie_word_embeddings = False`` on a Hugging Face model so that ``save_pretrained`` /
  ``from_pretrained`` keep the two apart (a warning says so); ``tied="merge"`` merges into the shared matrix once
  (every module sharing it changes; a warning says so).
* Other adapted modules: a module with an ``unload_module(merge: bool) -> nn.Module`` method (the protocol other
  LoRA modules of this package implement) is replaced by what it returns; a quantised ``LoRAQuantLinear`` cannot merge, so
  ``merge_and_unload`` refuses it by name (``unload`` returns its base); MoE expert LoRA is refused by both (not done).
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from ._checks import LoRAInputError
from .functional import merge_

__all__ = ["merge_and_unload", "unload"]


def _names_of(model: nn.Module) -> Dict[int, List[str]]:
    out: Dict[int, List[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(n)
    return out


def _plain_linear(layer, weight: nn.Parameter) -> nn.Module:
    if getattr(layer, "fan_in_fan_out", False):  # GPT-2's transformers Conv1D (weight [K, N]): give a Conv1D back
        from transformers.pytorch_utils import Conv1D

        new = Conv1D(layer.out_features, layer.in_features)
    else:
        new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    new.weight = weight
    if layer.bias is not None:
        new.bias = layer.bias
    new.train(layer.training)
    return new


def _plain_embedding(layer, weight: nn.Parameter) -> nn.Embedding:
    new = nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx,
                       scale_grad_by_freq=layer.scale_grad_by_freq, device="meta")
    new.weight = weight
    new.train(layer.training)
    return new


def _untie_config(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    configs = [cfg]
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
    if text is not None and text is not cfg:
        configs.append(text)
    for c in configs:
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False


@torch.no_grad()
def _unload(model: nn.Module, merge: bool, tied: str) -> nn.Module:
    from .embedding import LoRAEmbedding
    from .modules import LoRALinear
    from .quant_modules import LoRAQuantLinear

    mergeable = (LoRALinear, LoRAEmbedding)

    where = "merge_and_unload" if merge else "unload"
    if tied not in ("refuse", "untie", "merge"):
        raise LoRAInputError(f"{where}: tied must be 'refuse', 'untie' or 'merge', got {tied!r}")
    names_of = _names_of(model)
    from .moe import _LoRAConfigMixin

    moe = [n for n, m in model.named_modules() if isinstance(m, _LoRAConfigMixin)]
    if moe:
        raise LoRAInputError(f"{where}: MoE expert LoRA layers ({moe[:3]}) are not supported by {where} yet")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (*mergeable, LoRAQuantLinear))
               or hasattr(m, "unload_module")]
    if not targets:
        raise LoRAInputError(f"{where}: the model has no LoRA layers (nothing to unload)")
    if merge:
        bad = [n for n, m in targets if not isinstance(m, mergeable) and not hasattr(m, "unload_module")]
        if bad:
            raise LoRAInputError(f"{where}: these LoRA layers cannot merge (quantised base): {bad[:5]}; "
                                 "use lora_kernels.unload(model) to drop their adapters, or keep them unmerged")
    # plan first (every check before any weight is written)
    plans = []
    untie_any = False
    for name, m in targets:
        if not isinstance(m, mergeable):
            plans.append((name, m, None))
            continue
        others = [p for p in names_of.get(id(m.weight), []) if p != (f"{name}.weight" if name else "weight")]
        enabled = getattr(m, "adapters_enabled", True)
        do_merge = merge and not m.merged and enabled
        touches = merge and (m.merged or enabled)  # unload restores a shared matrix exactly: no conflict
        mode = "own"
        if others and touches:
            if tied == "refuse":
                raise LoRAInputError(
                    f"{where}: {name}.weight is tied to {', '.join(others)}; merging the adapter into it would change "
                    f"{'that parameter' if len(others) == 1 else 'those parameters'} too. Pass tied='untie' (the layer "
                    "gets a merged copy of its own and the tie is broken, config.tie_word_embeddings=False), or "
                    "tied='merge' (merge into the shared matrix: the other module changes as well)")
            mode = tied
            untie_any |= tied == "untie"
            warnings.warn(f"{where}: {name}.weight is tied to {', '.join(others)}; "
                          + ("the layer gets its own merged copy and the tie is broken" if tied == "untie"
                             else "merging into the shared matrix changes those modules too"), UserWarning, stacklevel=3)
        plans.append((name, m, (do_merge, mode)))
    # DoRA's merge is not W + s·B·A: such layers merge with their own merge(), first, and are put back exactly if one
    # of them cannot (so a refusal leaves the model unchanged)
    done = []
    for name, m, plan in plans:
        if plan is not None and plan[0] and getattr(m, "use_dora", False):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the tied case was reported above
                    m.merge(allow_tied=True)
            except (NotImplementedError, LoRAInputError, RuntimeError) as e:
                for d in done:
                    d.unmerge()
                raise LoRAInputError(f"{where}: cannot merge the DoRA layer {name} ({e}); use "
                                     "lora_kernels.unload(model) or keep the adapters") from e
            done.append(m)
    for name, m, plan in plans:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if plan is None:
            if hasattr(m, "unload_module"):
                new = m.unload_module(merge)
            else:  # LoRAQuantLinear: its base (unload only; merge was refused above)
                new = m.base_layer
            setattr(parent, child, new)
            continue
        do_merge, mode = plan
        do_merge = do_merge and not getattr(m, "use_dora", False)  # merged above by the layer itself
        weight = m.weight
        if mode == "untie":
            if m.merged:  # the shared matrix holds the merge: give it back its base bits, keep the merge in a copy
                merged = weight.detach().clone()
                m.unmerge()
                weight = nn.Parameter(merged, requires_grad=False)
            else:
                weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if merge:
            if do_merge:
                if isinstance(m, LoRAEmbedding):  # the table's [D, V] view, as LoRAEmbedding.merge
                    merge_(weight.t(), m.lora_embedding_A, m.lora_embedding_B, m.scale, backend=m.backend)
                else:
                    a, b, s = m._merge_operands(where)
                    merge_(weight.t() if m.fan_in_fan_out else weight, a, b, s, backend=m.backend)
            # an already-merged layer keeps its merged weight; its record is dropped with the layer
        elif m.merged:
            m.unmerge()  # exact (bit-for-bit) where the record allows, else a warning and a rounding unmerge
        setattr(parent, child, _plain_embedding(m, weight) if isinstance(m, LoRAEmbedding) else _plain_linear(m, weight))
    if untie_any:
        _untie_config(model)
    return model


def merge_and_unload(model: nn.Module, *, tied: str = "refuse") -> nn.Module:
    """Merge every LoRA layer's active adapters into its base weight and replace the layer by a plain ``nn.Linear``
    (module docstring: tied weights, already-merged layers, other LoRA modules). In place; returns ``model``.
    ``save_pretrained`` of the result writes the base model's keys only."""
    return _unload(model, True, tied)


def unload(model: nn.Module, *, tied: str = "refuse") -> nn.Module:
    """Replace every LoRA layer by its base module without merging (a merged layer is unmerged first). In place;
    returns ``model``."""
    return _unload(model, False, tied)
