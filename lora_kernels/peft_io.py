"""Read and write LoRA adapters in PEFT's on-disk format, without needing PEFT itself.

PEFT's format is a directory holding ``adapter_config.json`` and ``adapter_model.safetensors`` (older:
``adapter_model.bin``) whose keys are ``base_model.model.<module path>.lora_A.weight`` [r, K] and
``...lora_B.weight`` [N, r], ``<module path>`` being the module's name in the base model. The scale of a module
is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), where r and alpha may be overridden per module by
``rank_pattern`` / ``alpha_pattern`` (regex keys matched against the end of the module path, as PEFT does).

* :func:`save_peft_adapter` writes the :class:`~lora_kernels.LoRALinear` modules of a model built with
  :func:`~lora_kernels.inject_lora` so that ``peft.PeftModel.from_pretrained(base, dir)`` loads them.
* :func:`load_peft_adapter_` loads a PEFT-saved adapter into such a model (checks ranks, scales, targets).
* :func:`read_peft_adapter` returns the config and ``{module path: (A, B, scale)}`` for serving stacks.

DoRA (``use_dora: true``): each module also has ``<module path>.lora_magnitude_vector`` [N] (PEFT's saved key;
``...lora_magnitude_vector[.<adapter>].weight`` is read too); it travels as ``(A, B, scale, m)`` from
:func:`read_peft_adapter`, into ``LoRALinear(use_dora=True).lora_magnitude`` and back, and into
``AdapterSlots`` through :func:`load_peft_into_slots` (which needs the base weight to form m / ‖W0 + s·B·A‖).

Needs ``safetensors`` for ``.safetensors`` files (``pip install lora_kernels[interop]``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .modules import LoRALinear

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<which>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
# PEFT's embedding LoRA (nn.Parameter, no ".weight"): lora_embedding_A [r, V], lora_embedding_B [D, r]
_EMB_KEY = re.compile(r"^(?P<path>.+)\.lora_embedding_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?$")


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("PEFT adapter files need the `safetensors` package (pip install lora_kernels[interop])") from e
    return st


def _pattern_value(patterns: Dict[str, float], path: str, default):
    """PEFT's rule: the first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)`` wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def peft_scale(config: dict, path: str) -> Tuple[int, float, float]:
    """(r, alpha, scale) of module ``path`` under a PEFT LoRA ``config`` dict."""
    r = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"PEFT adapter config: module {path!r} has rank r={r!r}; r must be a positive int")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"PEFT adapter config: module {path!r} has lora_alpha={alpha!r}; it must be a finite number")
    alpha = float(alpha)
    scale = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return r, alpha, scale


# DoRA's magnitude: PEFT saves "<path>.lora_magnitude_vector" (the module's "...lora_magnitude_vector.<adapter>.weight"
# with ".weight" and the adapter name dropped); either form is read.
_MAG_KEY = re.compile(r"^(?P<path>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?$")


def _pop_magnitudes(other: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Move the DoRA magnitude vectors out of ``other``: ``{module path: m [N]}``."""
    mags = {}
    for k in list(other):
        m = _MAG_KEY.match(k[: -len(".weight")] if k.endswith(".weight") else k)
        if m is not None:
            mags[m.group("path")] = other.pop(k)
    return mags


def _check_supported(config: dict, where: str) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not LoRA")
    unsupported = []
    if config.get("use_dora") and config.get("target_parameters"):
        unsupported.append("use_dora=True with target_parameters (PEFT has no DoRA for those either)")
    if config.get("lora_bias"):
        unsupported.append("lora_bias=True")
    if unsupported:
        raise ValueError(f"{where}: unsupported PEFT LoRA options: {', '.join(unsupported)}")


def _load_tensors(path: str) -> Dict[str, torch.Tensor]:
    st_file, bin_file = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(st_file):
        return _safetensors().load_file(st_file)
    if os.path.isfile(bin_file):
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {path!r}")


def _read(path: str):
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r} (is it a PEFT adapter directory?)")
    with open(cfg_file) as f:
        config = json.load(f)
    tensors = _load_tensors(path)
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    other: Dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _LORA_KEY.match(k)
        if m is None:
            e = _EMB_KEY.match(k)  # embedding LoRA: the same (A [r, K=V], B [N=D, r]) roles
            if e is None:
                other[k] = t
                continue
            pairs.setdefault(e.group("path"), {})["lora_" + e.group("which")] = t
            continue
        pairs.setdefault(m.group("path"), {})[m.group("which")] = t
    return config, pairs, other


def read_peft_adapter(path: str) -> Tuple[dict, Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]]:
    """Read a PEFT LoRA adapter directory.

    Returns ``(config, {module_path: (lora_A [r, K], lora_B [N, r], scale)})``: ``config`` is the parsed
    ``adapter_config.json``; ``module_path`` is the module's name in the base model (PEFT's
    ``base_model.model.`` prefix removed; a ``target_parameters`` adapter of MoE expert weights is keyed
    ``"<module path>.<parameter>"`` with A [E, r, in] and B [E, out, r]); tensors stay on the CPU in their saved dtype; ``scale`` follows
    ``lora_alpha``, ``r``, ``use_rslora``, ``rank_pattern`` and ``alpha_pattern``. An embedding module
    (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``) reads as (A [r, V], B [D, r], scale); ``fan_in_fan_out``
    (GPT-2 Conv1D bases) leaves A [r, K] / B [N, r] as they are. A DoRA adapter (``use_dora: true``) reads each
    module as ``(A, B, scale, m)``, m being its ``lora_magnitude_vector`` [N] (a DoRA entry is the only 4-tuple).
    Raises on ``lora_bias``, non-LoRA adapters, half pairs, or shapes that disagree with the config.
    """
    config, out, _ = _parse(path)
    return config, out


def _parse(path: str):
    config, pairs, other = _read(path)
    _check_supported(config, f"read_peft_adapter({path!r})")
    params = {}
    if config.get("target_parameters"):  # PEFT target_parameters (MoE expert weights): lora_kernels/moe.py
        from .moe import split_param_pairs

        pairs, params = split_param_pairs(config, pairs, peft_scale)
    mags = _pop_magnitudes(other)  # DoRA: {module path: lora_magnitude_vector [N]}
    dora = bool(config.get("use_dora"))
    if mags and not dora:
        raise ValueError(f"read_peft_adapter({path!r}): the file has DoRA magnitudes ({sorted(mags)[:3]}) but the config "
                         "has no use_dora=true")
    stray = sorted(set(mags) - set(pairs))
    if stray:
        raise ValueError(f"read_peft_adapter({path!r}): DoRA magnitudes for modules without lora_A/lora_B: {stray[:3]}")
    emb = [k for k in other if "lora_embedding" in k or "lora_magnitude" in k]
    if emb:
        raise ValueError(f"read_peft_adapter({path!r}): unsupported tensors (DoRA magnitudes): {emb[:3]}")
    out = {}
    for mpath, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"read_peft_adapter({path!r}): module {mpath!r} has only {sorted(ab)}")
        a, b = ab["lora_A"], ab["lora_B"]
        r, _, scale = peft_scale(config, mpath)
        conv = a.dim() == 4 and b.dim() == 4 and tuple(b.shape[2:]) == (1, 1)  # Conv2d: [r, C, kh, kw], [N, r, 1, 1]
        if (not conv and (a.dim() != 2 or b.dim() != 2)) or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"read_peft_adapter({path!r}): module {mpath!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                "are not [r, K] and [N, r] (or a Conv2d's [r, C_in, kh, kw] and [C_out, r, 1, 1])"
            )
        if a.shape[0] != r:
            raise ValueError(
                f"read_peft_adapter({path!r}): module {mpath!r} has rank {a.shape[0]} but the config says r={r}"
            )
        if dora:
            m = mags.get(mpath)
            if m is None or m.dim() != 1 or m.shape[0] != b.shape[0]:
                raise ValueError(f"read_peft_adapter({path!r}): DoRA module {mpath!r} needs lora_magnitude_vector "
                                 f"[{b.shape[0]}], got {None if m is None else tuple(m.shape)}")
            out[mpath] = (a, b, scale, m)
            continue
        out[mpath] = (a, b, scale)
    out.update(params)  # "<experts path>.<parameter>": (A [E, r, in], B [E, out, r], scale)
    return config, out, other


def _lora_modules(model: nn.Module) -> Dict[str, LoRALinear]:
    """LoRALinear and LoRAEmbedding modules by path (a LoRAEmbedding exposes its A / B as lora_A / lora_B too)."""
    from .conv import LoRAConv2d
    from .embedding import LoRAEmbedding

    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding, LoRAConv2d))}


class _AdapterView:
    """A named adapter of a LoRALinear (not its primary one) seen under the single-adapter names this module uses
    (``lora_A``, ``lora_B``, ``r``, ``alpha``, ``scale``, ``dropout``, ``use_rslora``); the rest is the layer's."""

    _CFG = ("r", "alpha", "scale", "dropout", "use_rslora")

    @classmethod
    def of(cls, layer, name):
        if name == layer.primary_adapter:
            return layer
        view = object.__new__(cls)
        object.__setattr__(view, "_layer", layer)
        object.__setattr__(view, "_name", name)
        return view

    def __getattr__(self, k):
        if k in ("lora_A", "lora_B"):
            return self._layer.adapter_weights(self._name)[k == "lora_B"]
        if k in self._CFG:
            return getattr(self._layer.adapter_config(self._name), k)
        return getattr(self._layer, k)

    def __setattr__(self, k, v):
        if k not in self._CFG:
            raise AttributeError(f"_AdapterView: cannot set {k!r}")
        setattr(self._layer.adapter_config(self._name), k, v)


def _named_targets(mods, adapters, config, name, where):
    """``{path: view of adapter name}`` for load_peft_adapter_(adapter_name=name); adds the adapter (file's r, alpha,
    dropout, rsLoRA) to targeted layers lacking it, after checking every one can take it."""
    add = []
    for p, (a, b, _) in adapters.items():
        m = mods.get(p)
        if m is None or not hasattr(m, "adapter_names"):
            continue  # reported as unexpected below (or a LoRAEmbedding: no named adapters)
        if name not in m.adapter_names:
            if a.shape[1] != m.in_features or b.shape[0] != m.out_features:
                raise ValueError(f"{where}: module {p!r}: adapter lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do "
                                 f"not fit in={m.in_features} / out={m.out_features}")
            add.append((p, m))
    for p, m in add:
        r, alpha, _ = peft_scale(config, p)
        m.add_adapter(name, r, alpha, dropout=float(config.get("lora_dropout") or 0.0),
                      use_rslora=bool(config.get("use_rslora", False)), lora_dtype=m.lora_A.dtype)
    return {p: _AdapterView.of(m, name) for p, m in mods.items() if name in getattr(m, "adapter_names", ())}


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


@torch.no_grad()
def save_peft_adapter(
    model: nn.Module,
    path: str,
    base_model_name_or_path: Optional[str] = None,
    *,
    save_biases: bool = False,
    modules_to_save: Optional[Sequence[str]] = None,
    adapter_name: Optional[str] = None,
) -> dict:
    """Save the :class:`LoRALinear` adapters of ``model`` as a PEFT LoRA adapter directory.

    ``model`` is the base model with LoRA injected by :func:`lora_kernels.inject_lora` (module paths must be
    those of the plain base model, which ``PeftModel.from_pretrained(base, path)`` then adapts). Writes
    ``adapter_config.json`` (``r`` / ``lora_alpha`` the most common values, per-module exceptions in
    ``rank_pattern`` / ``alpha_pattern``; ``target_modules`` the leaf names when they select exactly the
    adapted layers, else the full module paths) and ``adapter_model.safetensors``. With ``save_biases`` the
    adapted layers' biases are stored too (PEFT's ``bias="lora_only"``). Returns the config dict written.

    ``modules_to_save`` (default: the model's, from ``inject_lora(..., modules_to_save=...)``): modules saved in full,
    in PEFT's layout: every entry of their state dict as ``base_model.model.<module path>.<name>`` (PEFT strips its
    ``modules_to_save.default.`` wrapper when saving) and the names in the config's ``modules_to_save``; a module is
    selected when its path ends with a name (PEFT's rule).

    ``adapter_name``: save that named adapter (:mod:`lora_kernels.named_adapters`) of the LoRALinear layers that have
    it, as its own PEFT adapter (PEFT's ``save_pretrained`` puts a non-default adapter in ``<path>/<name>``); default:
    each layer's primary adapter (``lora_A`` / ``lora_B``).
    """
    mods = _lora_modules(model)
    if adapter_name is not None:
        mods = {p: _AdapterView.of(m, adapter_name) for p, m in mods.items()
                if adapter_name in getattr(m, "adapter_names", ())}
        if not mods:
            raise ValueError(f"save_peft_adapter: no LoRALinear layer has an adapter named {adapter_name!r}")
    from .moe import peft_moe_entries  # MoE expert LoRA (target_parameters / per-expert keys): lora_kernels/moe.py

    moe_tensors, moe_params, moe_modules, moe_cfg = peft_moe_entries(model) if adapter_name is None else ({}, [], [], {})
    if not mods and not moe_tensors:
        raise ValueError("save_peft_adapter: the model has no LoRALinear modules (use lora_kernels.inject_lora first)")
    cfgs = {p: (m.r, m.alpha, m.use_rslora) for p, m in mods.items()}
    cfgs.update(moe_cfg)
    rslora = {c[2] for c in cfgs.values()}
    if len(rslora) > 1:
        raise ValueError("save_peft_adapter: PEFT has one use_rslora flag per adapter; the model mixes both")
    dora = {bool(getattr(m, "use_dora", False)) for m in mods.values()}  # DoRA: lora_magnitude_vector per module
    if len(dora) > 1:
        raise ValueError("save_peft_adapter: PEFT has one use_dora flag per adapter; the model mixes DoRA and plain "
                         "LoRA modules (save them as two adapters)")
    use_dora = dora.pop() if dora else False
    r0 = _most_common(c[0] for c in cfgs.values())
    a0 = _most_common(c[1] for c in cfgs.values())
    rank_pattern = {p: c[0] for p, c in cfgs.items() if c[0] != r0}
    alpha_pattern = {p: (int(c[1]) if float(c[1]).is_integer() else c[1]) for p, c in cfgs.items() if c[1] != a0}

    leaves = sorted({p.rpartition(".")[2] for p in mods})
    by_leaf = {name for name, _ in model.named_modules() if name.rpartition(".")[2] in leaves}
    target_modules = (leaves if by_leaf == set(mods) else sorted(mods)) if mods else []
    target_modules += moe_modules
    dropout = _most_common(m.dropout for m in mods.values()) if mods else 0.0

    mts = list(modules_to_save) if modules_to_save is not None else list(getattr(model, "lora_modules_to_save", ()))
    mts_paths = [n for n, _ in model.named_modules() if n and any(n.endswith(t) for t in mts)]
    unmatched = [t for t in mts if not any(n.endswith(t) for n in mts_paths)]
    if unmatched:
        raise ValueError(f"save_peft_adapter: modules_to_save {unmatched} match no module of the model")
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": int(a0) if float(a0).is_integer() else a0,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "use_rslora": rslora.pop(),
        "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for m in mods.values()),  # GPT-2 Conv1D
        "bias": "lora_only" if save_biases else "none",
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": mts or None,
        "init_lora_weights": True,
        "use_dora": use_dora,
        "lora_bias": False,
        "target_parameters": moe_params or None,
    }
    tensors = {f"{PREFIX}{k}": v for k, v in moe_tensors.items()}
    for p, m in mods.items():
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if hasattr(m, "lora_embedding_A") else \
            ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{p}.{a_key}"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{p}.{b_key}"] = m.lora_B.detach().contiguous().cpu()
        if save_biases and m.bias is not None:
            tensors[f"{PREFIX}{p}.base_layer.bias"] = m.bias.detach().contiguous().cpu()
        if use_dora:  # PEFT's on-disk key (its module's "...lora_magnitude_vector.<adapter>.weight")
            tensors[f"{PREFIX}{p}.lora_magnitude_vector"] = m.lora_magnitude.detach().contiguous().cpu()
    for mp in mts_paths:  # PEFT's on-disk layout of modules_to_save: the module's own keys under its path
        for k, v in model.get_submodule(mp).state_dict().items():
            tensors[f"{PREFIX}{mp}.{k}"] = v.detach().cpu().clone()
    os.makedirs(path, exist_ok=True)
    _safetensors().save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return config


@torch.no_grad()
def load_peft_adapter_(model: nn.Module, path: str, *, strict: bool = True, adopt_scale: bool = False,
                       adapter_name: Optional[str] = None) -> nn.Module:
    """Load a PEFT-saved LoRA adapter into the :class:`LoRALinear` modules of ``model``, in place.

    Each ``<module path>`` of the adapter must be a LoRALinear of ``model`` with the same rank and the same
    in/out features; with ``strict`` every LoRALinear of ``model`` must also be in the adapter. The scale
    implied by the config must equal the module's (``alpha / r`` or rsLoRA), unless ``adopt_scale`` is set, in
    which case the module's alpha / use_rslora / scale are set from the file. Biases saved by PEFT with
    ``bias="all"`` or ``"lora_only"`` are copied into the matching parameters. Refuses merged modules.
    Tensors are copied into the existing parameters (so optimizers keep working), cast to their dtype/device.
    ``adapter_name`` (PEFT's ``load_adapter(path, adapter_name)``): load into that named adapter
    (:mod:`lora_kernels.named_adapters`), added with the file's rank / alpha / dropout / rsLoRA to the LoRALinear
    layers the file targets that do not have it yet (not activated); ``strict`` then concerns the layers having it.
    Returns ``model``.
    """
    config, adapters, other = _parse(path)
    mags = {p: v[3] for p, v in adapters.items() if len(v) > 3}  # DoRA: lora_magnitude_vector per module
    adapters = {p: tuple(v[:3]) for p, v in adapters.items()}
    mods = _lora_modules(model)
    where = f"load_peft_adapter_({path!r})"
    from .moe import plan_peft_moe_load  # MoE expert LoRA: lora_kernels/moe.py

    adapters, load_moe = plan_peft_moe_load(
        model, config, {k: v for k, v in adapters.items() if v[0].dim() != 3},  # 2-D, or a Conv2d's 4-D
        {k: v for k, v in adapters.items() if v[0].dim() == 3}, strict=strict, adopt_scale=adopt_scale, where=where)
    if adapter_name is not None:  # into a named adapter, created where the file targets a layer that lacks it
        mods = _named_targets(mods, adapters, config, adapter_name, where)
    unexpected = sorted(set(adapters) - set(mods))
    missing = sorted(set(mods) - set(adapters))
    if unexpected:
        raise ValueError(
            f"{where}: the adapter targets modules that are not LoRALinear in the model: {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (adapter target_modules={config.get('target_modules')!r}; "
            f"model LoRA modules e.g. {sorted(mods)[:3]})"
        )
    if strict and missing:
        raise ValueError(
            f"{where}: LoRALinear modules of the model have no weights in the adapter: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} (pass strict=False to leave them unchanged)"
        )
    for p, (a, b, scale) in adapters.items():
        m = mods[p]
        if m.merged:
            raise RuntimeError(f"{where}: module {p!r} is merged; unmerge() it before loading an adapter")
        if tuple(a.shape) != tuple(m.lora_A.shape) or tuple(b.shape) != tuple(m.lora_B.shape):
            raise ValueError(
                f"{where}: module {p!r}: adapter lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} vs model "
                f"lora_A {tuple(m.lora_A.shape)} / lora_B {tuple(m.lora_B.shape)} (r={m.r}, in={m.in_features}, "
                f"out={m.out_features})"
            )
        if not adopt_scale and not math.isclose(scale, m.scale, rel_tol=1e-6, abs_tol=0.0):
            r, alpha, _ = peft_scale(config, p)
            raise ValueError(
                f"{where}: module {p!r}: the adapter's scale {scale:g} (r={r}, lora_alpha={alpha:g}, "
                f"use_rslora={bool(config.get('use_rslora'))}) differs from the module's {m.scale:g} "
                f"(r={m.r}, alpha={m.alpha:g}, use_rslora={m.use_rslora}); pass adopt_scale=True to take the file's"
            )
    for p in adapters:  # DoRA: the file's magnitudes go to LoRALinear(use_dora=True).lora_magnitude
        is_dora = bool(getattr(mods[p], "use_dora", False))
        if (p in mags) != is_dora:
            raise ValueError(
                f"{where}: module {p!r}: the adapter is {'DoRA' if p in mags else 'plain LoRA'} (use_dora="
                f"{bool(config.get('use_dora'))}) but the module is {'DoRA' if is_dora else 'plain LoRA'}; build the "
                f"model with inject_lora(..., use_dora={p in mags})"
            )
        if p in mags and tuple(mags[p].shape) != tuple(mods[p].lora_magnitude.shape):
            raise ValueError(f"{where}: module {p!r}: lora_magnitude_vector {tuple(mags[p].shape)} vs the module's "
                             f"lora_magnitude {tuple(mods[p].lora_magnitude.shape)}")
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head keeps its own name
    params.update(dict(model.named_buffers(remove_duplicate=False)))  # modules_to_save with buffers (running stats)
    for k, t in other.items():
        target = k.replace(".base_layer.", ".")
        if target not in params or tuple(params[target].shape) != tuple(t.shape):
            raise ValueError(f"{where}: the adapter stores {k!r} {tuple(t.shape)} (modules_to_save / trainable tokens / "
                             f"biases) but the model has no parameter {target!r} of that shape")
    for p, (a, b, scale) in adapters.items():
        m = mods[p]
        m.lora_A.copy_(a)
        m.lora_B.copy_(b)
        if p in mags:
            m.lora_magnitude.copy_(mags[p])
        if adopt_scale:
            _, alpha, _ = peft_scale(config, p)
            m.alpha, m.use_rslora, m.scale = alpha, bool(config.get("use_rslora", False)), scale
    for k, t in other.items():
        params[k.replace(".base_layer.", ".")].copy_(t)
    load_moe()
    if config.get("modules_to_save"):  # PEFT lists names that may match nothing here (task_type defaults)
        from .modules import set_modules_to_save

        names = [n for n, _ in model.named_modules() if n]
        here = [t for t in config["modules_to_save"] if any(n.endswith(t) for n in names)]
        if here:
            set_modules_to_save(model, here)
    return model


def load_peft_into_slots(slots, source, module_path, slot: int, *, name: Optional[str] = None, base_weight=None) -> int:
    """Copy one layer of a PEFT adapter into a :class:`lora_kernels.serving.AdapterSlots` slot.

    ``source`` is a PEFT adapter directory or the ``(config, adapters)`` pair returned by
    :func:`read_peft_adapter` (read once, load many layers). ``module_path`` is the layer's path in the base
    model (e.g. ``"model.layers.0.self_attn.q_proj"``), or one path per output slice for q/k/v-packed slots.
    A slice whose module the adapter does not have is left out (zero weights: PEFT's Llama default targets q and v
    only), and slices may differ in rank and scale (``serving.fill_slices``); at least one must be present.
    Returns the slot.

    DoRA adapters (``use_dora``) need ``base_weight``: the layer's frozen W0 ([N, K], one per slice or the packed
    [ΣN_s, K]), from which the slot's factors m / ‖W0 + s·B·A‖ are computed at load time (a slice the adapter
    leaves out keeps g = 1); it is ignored for plain LoRA adapters (so one call site can load both).
    """
    _, adapters = read_peft_adapter(source) if isinstance(source, (str, os.PathLike)) else source
    paths = [module_path] if isinstance(module_path, str) else list(module_path)
    if not any(p in adapters for p in paths):
        raise KeyError(f"load_peft_into_slots: the adapter has no module {paths[0]!r}"
                       f"{' (nor the other slices)' if len(paths) > 1 else ''} (it has e.g. {sorted(adapters)[:3]})")
    As = [adapters[p][0] if p in adapters else None for p in paths]  # None: a slice the adapter leaves out
    Bs = [adapters[p][1] if p in adapters else None for p in paths]
    scales = [adapters[p][2] if p in adapters else None for p in paths]
    dora_kw = {}
    mags = [adapters[p][3] if p in adapters and len(adapters[p]) > 3 else None for p in paths]
    if any(m is not None for m in mags):  # DoRA: lora_magnitude_vector per slice
        if base_weight is None:
            raise ValueError(f"load_peft_into_slots: {paths[0]!r} is a DoRA module (lora_magnitude_vector); pass "
                             "base_weight= (the layer's W0, [N, K] per slice or packed) to compute m / ‖W0 + s·B·A‖")
        dora_kw = dict(magnitude=mags if len(mags) > 1 else mags[0], base_weight=base_weight)
    return slots.load(slot, As if len(As) > 1 else As[0], Bs if len(Bs) > 1 else Bs[0],
                      scales if len(set(scales)) > 1 else scales[0], name=name,
                      **dora_kw)


__all__ = ["read_peft_adapter", "save_peft_adapter", "load_peft_adapter_", "load_peft_into_slots", "peft_scale"]
