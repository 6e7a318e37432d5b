"""Several named adapters on one :class:`~lora_kernels.LoRALinear` (PEFT's ``add_adapter`` / ``set_adapter`` /
``delete_adapter`` / ``disable_adapters`` / ``add_weighted_adapter``), plus the model-level helpers of the same names.

Layout (backward compatible with single-adapter layers)
------------------------------------------------------
The *primary* adapter (``layer.primary_adapter``, ``"default"`` for a layer made by ``LoRALinear`` /
``inject_lora``) keeps today's attributes and state-dict keys: ``lora_A`` [r, K], ``lora_B`` [N, r], ``r``,
``alpha``, ``scale``, ``dropout``, ``use_rslora``. Every further adapter lives in ``lora_A_named[name]`` /
``lora_B_named[name]`` (state-dict keys ``lora_A_named.<name>`` / ``lora_B_named.<name>``) with its settings in
``layer.adapter_config(name)``. A layer with one adapter has exactly the keys it always had. Deleting the primary
adapter promotes the next one into ``lora_A`` / ``lora_B`` (the same Parameter objects, so optimizers keep them).

Forward with several active adapters
------------------------------------
One ``lora_linear`` call: the active adapters are concatenated along the rank,
``A_cat = [A_1; A_2; ...]`` [Σr, K] and ``B_cat = [ρ_1·B_1, ρ_2·B_2, ...]`` [N, Σr] with ``ρ_i = s_i / s_ref``
and the call's scale ``s_ref`` (the first active adapter's nonzero scale). When the scales are equal (the usual
case) no B is multiplied at all, so the fused call is the exact concatenation; otherwise ``ρ_i·B_i`` is rounded
once to the adapters' dtype (exact in fp32 up to one rounding, about 2⁻⁹ relative in bf16). Gradients reach every
A_i and B_i through the concatenation. One active adapter (primary or not) is a plain ``lora_linear`` call with its
own A, B and scale; the primary alone is today's path (the forward tests one attribute).

Dropout: one ``lora_linear`` call draws one dropout mask for x. Active adapters that share their dropout p share
that mask (each adapter still sees dropout with probability p, but the masks are the same across those adapters,
whereas PEFT draws one per adapter). In training, adapters with *different* p are grouped by p: the group of the
first active adapter runs fused with the base GEMM in ``lora_linear``; each other group adds its branch with torch
ops (``nn.functional.dropout`` then two matmuls, one more pass over x per group). In eval there is one group.

Merging merges the active adapters (``merge_exact_`` with one (A, B, s) per adapter, one record).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._checks import LoRAInputError, check_lora_settings
from ._merge_state import MergeRecordState
from .functional import lora_linear
from .reference import lora_scale

__all__ = [
    "AdapterConfig",
    "NamedAdaptersMixin",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "add_weighted_adapter",
]


@dataclass
class AdapterConfig:
    """Settings of one named adapter of a layer (the primary adapter's are the layer's own attributes)."""

    r: int
    alpha: float
    scale: float
    dropout: float
    use_rslora: bool


class _Reenable:
    """Returned by ``disable_adapters()``: adapters are already disabled; as a context manager, ``__exit__``
    restores the state they had before the call."""

    def __init__(self, restore):
        self._restore = restore

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._restore()
        return False


def _check_name(where: str, name) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise LoRAInputError(f"{where}: adapter name must be a non-empty str without '.', got {name!r}")
    return name


class NamedAdaptersMixin(MergeRecordState):
    """Named-adapter methods of :class:`~lora_kernels.LoRALinear` (see the module docstring).

    Class-level defaults describe a single-adapter layer, so ``LoRALinear.__init__`` needs nothing extra."""

    primary_adapter: str = "default"
    _active: Tuple[str, ...] = ()  # () means (primary_adapter,)
    _disabled: bool = False
    _fast: bool = True  # exactly the primary adapter is active and adapters are enabled: the forward's old path
    merged_adapters: Tuple[str, ...] = ()

    # -- introspection ------------------------------------------------------------------------------------------
    def _extra_cfg(self) -> Dict[str, AdapterConfig]:
        d = self.__dict__.get("_named_cfg")
        if d is None:
            d = self.__dict__["_named_cfg"] = {}
        return d

    @property
    def adapter_names(self) -> Tuple[str, ...]:
        """Every adapter of the layer, the primary first."""
        return (self.primary_adapter, *self._extra_cfg().keys())

    @property
    def active_adapters(self) -> Tuple[str, ...]:
        return self._active or (self.primary_adapter,)

    @property
    def adapters_enabled(self) -> bool:
        return not self._disabled

    def adapter_config(self, name: str) -> AdapterConfig:
        if name == self.primary_adapter:
            return AdapterConfig(self.r, self.alpha, self.scale, self.dropout, self.use_rslora)
        cfg = self._extra_cfg().get(name)
        if cfg is None:
            raise KeyError(f"{type(self).__name__}: no adapter named {name!r} (adapters: {list(self.adapter_names)})")
        return cfg

    def adapter_weights(self, name: str) -> Tuple[nn.Parameter, nn.Parameter]:
        """(lora_A [r, K], lora_B [N, r]) of adapter ``name``."""
        if name == self.primary_adapter:
            return self.lora_A, self.lora_B
        self.adapter_config(name)  # raises a clear KeyError
        return self.lora_A_named[name], self.lora_B_named[name]

    def _update_fast(self) -> None:
        self._fast = (not self._disabled) and self.active_adapters == (self.primary_adapter,)

    def _refuse_merged(self, where: str) -> None:
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.{where}: the layer is merged (adapters {list(self.merged_adapters)}); "
                               "unmerge() first")

    # -- add / set / delete -------------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype: Optional[torch.dtype] = None,
        init_lora_weights: bool = True,
    ) -> None:
        """Add adapter ``name`` (A Kaiming-uniform, B zero: the layer's output does not change). It is not made
        active (``set_adapter``) and, as in PEFT, its parameters are trainable only while it is active."""
        where = f"{type(self).__name__}.add_adapter"
        _check_name(where, name)
        check_lora_settings(where, r, alpha, dropout)
        if name in self.adapter_names:
            raise LoRAInputError(f"{where}: adapter {name!r} already exists (adapters: {list(self.adapter_names)})")
        if getattr(self, "use_dora", False):
            raise LoRAInputError(f"{where}: named adapters are not supported on a DoRA layer (use_dora=True)")
        if "lora_A_named" not in self._modules:
            self.lora_A_named = nn.ParameterDict()
            self.lora_B_named = nn.ParameterDict()
        dt = lora_dtype or self.lora_A.dtype
        dev = self.lora_A.device
        a = nn.Parameter(torch.empty(r, self.in_features, dtype=dt, device=dev))
        b = nn.Parameter(torch.empty(self.out_features, r, dtype=dt, device=dev))
        with torch.no_grad():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init_lora_weights:
                nn.init.zeros_(b)
            else:  # PEFT's init_lora_weights=False: B random too (the layer's output changes)
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        a.requires_grad_(False)
        b.requires_grad_(False)
        self.lora_A_named[name] = a
        self.lora_B_named[name] = b
        self._extra_cfg()[name] = AdapterConfig(r, float(alpha), lora_scale(alpha, r, use_rslora), float(dropout), bool(use_rslora))

    def set_adapter(self, names: Union[str, Sequence[str]]) -> None:
        """Make ``names`` (one name or a list) the active adapters, in that order. As PEFT: the active adapters'
        parameters become trainable and the others frozen. Refused while merged."""
        where = f"{type(self).__name__}.set_adapter"
        self._refuse_merged("set_adapter")
        names = (names,) if isinstance(names, str) else tuple(names)
        if not names:
            raise LoRAInputError(f"{where}: give at least one adapter name")
        if len(set(names)) != len(names):
            raise LoRAInputError(f"{where}: adapter names repeat: {list(names)}")
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            raise LoRAInputError(f"{where}: unknown adapter(s) {unknown} (adapters: {list(self.adapter_names)})")
        for n in self.adapter_names:
            for p in self.adapter_weights(n):
                p.requires_grad_(n in names)
        self._active = () if names == (self.primary_adapter,) else names
        self._update_fast()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``. The last adapter cannot be deleted (use ``merge_and_unload`` or put the base
        layer back). Deleting the primary adapter promotes the next one into ``lora_A`` / ``lora_B``; deleting an
        active adapter leaves the other active ones, or the first remaining adapter when none is left."""
        where = f"{type(self).__name__}.delete_adapter"
        if name not in self.adapter_names:
            raise LoRAInputError(f"{where}: no adapter named {name!r} (adapters: {list(self.adapter_names)})")
        if len(self.adapter_names) == 1:
            raise LoRAInputError(f"{where}: {name!r} is the layer's only adapter; a LoRALinear keeps at least one "
                                 "(use lora_kernels.merge_and_unload, or replace the layer by its base)")
        if self.merged and name in self.merged_adapters:
            self._refuse_merged("delete_adapter")
        active = [n for n in self.active_adapters if n != name]
        cfgs = self._extra_cfg()
        if name == self.primary_adapter:
            new = next(iter(cfgs))
            c = cfgs.pop(new)
            a, b = self.lora_A_named.pop(new), self.lora_B_named.pop(new)
            self.lora_A, self.lora_B = a, b
            self.r, self.alpha, self.scale, self.dropout, self.use_rslora = c.r, c.alpha, c.scale, c.dropout, c.use_rslora
            self.primary_adapter = new
        else:
            del cfgs[name]
            del self.lora_A_named[name]
            del self.lora_B_named[name]
        if not cfgs and "lora_A_named" in self._modules:  # back to a single-adapter layer: its old state-dict keys
            del self.lora_A_named
            del self.lora_B_named
        if not self.merged:
            self._active = ()
            self.set_adapter(active or [self.adapter_names[0]])
        else:  # the deleted adapter was not merged, hence not active: the active (merged) ones stay
            self._active = () if tuple(active) == (self.primary_adapter,) else tuple(active)
            self._update_fast()

    # -- enable / disable ---------------------------------------------------------------------------------------
    def enable_adapters(self) -> None:
        self._disabled = False
        self._update_fast()

    def disable_adapters(self) -> _Reenable:
        """Disable every adapter: the layer computes ``base(x)``. Returns a context manager, so
        ``with layer.disable_adapters(): ...`` re-enables (restores the previous state) on exit.
        Refused while merged (the merged weight holds the adapters)."""
        self._refuse_merged("disable_adapters")
        was = self._disabled
        self._disabled = True
        self._update_fast()

        def restore():
            self._disabled = was
            self._update_fast()

        return _Reenable(restore)

    # -- forward / merge operands -------------------------------------------------------------------------------
    def _fused_operands(self, names: Sequence[str]):
        """(A [Σr, K], B [N, Σr], s_ref) of the named adapters concatenated along the rank (module docstring)."""
        if len(names) == 1:
            a, b = self.adapter_weights(names[0])
            return a, b, self.adapter_config(names[0]).scale
        pairs = [self.adapter_weights(n) for n in names]
        scales = [self.adapter_config(n).scale for n in names]
        dt = pairs[0][0].dtype
        s_ref = next((s for s in scales if s != 0.0), 0.0)
        a_cat = torch.cat([a.to(dt) for a, _ in pairs], 0)
        if s_ref == 0.0:
            return a_cat, torch.cat([b.to(dt) for _, b in pairs], 1), 0.0
        b_cat = torch.cat([b.to(dt) if s == s_ref else b.to(dt) * (s / s_ref) for (_, b), s in zip(pairs, scales)], 1)
        return a_cat, b_cat, s_ref

    def _forward_named(self, x: torch.Tensor) -> torch.Tensor:
        w, bias = self.weight_nk, self.bias  # [N, K] (a transposed view for a Conv1D base)
        if self._disabled:
            return nn.functional.linear(x, w, bias)
        groups: Dict[float, List[str]] = {}
        for n in self.active_adapters:
            groups.setdefault(self.adapter_config(n).dropout if self.training else 0.0, []).append(n)
        (p0, first), *rest = groups.items()
        a, b, s = self._fused_operands(first)
        y = lora_linear(x, w, a, b, s, bias, dropout_p=p0, backend=self.backend)
        for p, names in rest:  # only in training, with adapters of different dropout p (module docstring)
            a, b, s = self._fused_operands(names)
            xd = nn.functional.dropout(x, p, True)
            y = y + s * ((xd @ a.to(x.dtype).t()) @ b.to(x.dtype).t())
        return y

    def _merge_operands(self, where: str):
        """Lists (A_i, B_i, s_i) of the active adapters, for merge_exact_."""
        if self._disabled:
            raise RuntimeError(f"{type(self).__name__}.{where}: adapters are disabled; enable_adapters() first")
        names = self.active_adapters
        pairs = [self.adapter_weights(n) for n in names]
        return [a for a, _ in pairs], [b for _, b in pairs], [self.adapter_config(n).scale for n in names]

    # -- weighted combination -----------------------------------------------------------------------------------
    @torch.no_grad()
    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: Optional[int] = None,
        svd_clamp: Optional[float] = None,
        svd_full_matrices: bool = True,
    ) -> None:
        """Add adapter ``adapter_name`` combining ``adapters`` with ``weights``, as PEFT's
        ``LoraModel.add_weighted_adapter`` computes it (same operations in the same order, so fp32 results are
        bit-identical to PEFT's):

        * ``"cat"``: rank Σrᵢ, ``A = [A_i·w_i·s_i]`` (stacked rows), ``B = [B_i]``: exactly
          ``ΔW = Σ w_i·s_i·B_i·A_i`` (up to the rounding of ``A_i·w_i·s_i``);
        * ``"linear"``: equal ranks, ``A = Σ sign_i·√|w_i s_i|·A_i``, ``B = Σ √|w_i s_i|·B_i`` (PEFT's rough
          approximation: cross terms ``B_i A_j`` appear);
        * ``"svd"`` (PEFT's default): the best rank-``svd_rank`` (default max rᵢ) approximation of
          ``Σ w_i·s_i·B_i·A_i`` (truncated SVD; ``svd_clamp`` a quantile to clamp U·S and Vh as PEFT).

        With one adapter the type is "linear" (as PEFT). The new adapter has ``alpha = r`` (scale 1), no rsLoRA,
        the first adapter's dropout and dtype; it is not activated. Unlike PEFT (which then returns silently), an
        existing ``adapter_name`` is an error; PEFT's rsLoRA quirk (the new adapter keeps use_rslora with
        alpha = r, so its scale is √r, not 1) is not reproduced.
        """
        where = f"{type(self).__name__}.add_weighted_adapter"
        _check_name(where, adapter_name)
        adapters, weights = list(adapters), [float(w) for w in weights]
        if not adapters or len(adapters) != len(weights):
            raise LoRAInputError(f"{where}: give one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
        unknown = [n for n in adapters if n not in self.adapter_names]
        if unknown:
            raise LoRAInputError(f"{where}: unknown adapter(s) {unknown} (adapters: {list(self.adapter_names)})")
        if adapter_name in self.adapter_names:
            raise LoRAInputError(f"{where}: adapter {adapter_name!r} already exists")
        if not all(math.isfinite(w) for w in weights):
            raise LoRAInputError(f"{where}: weights must be finite, got {weights}")
        if len(adapters) == 1:
            combination_type = "linear"
        self._add_weighted(adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_full_matrices)

    def _add_weighted(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_full_matrices):
        where = f"{type(self).__name__}.add_weighted_adapter"
        cfgs = [self.adapter_config(n) for n in adapters]
        pairs = [self.adapter_weights(n) for n in adapters]
        ranks = [c.r for c in cfgs]
        dt = pairs[0][0].dtype
        if combination_type == "cat":
            new_a = torch.cat([a.data * w * c.scale for (a, _), w, c in zip(pairs, weights, cfgs)], 0)
            new_b = torch.cat([b.data for _, b in pairs], 1)
            new_r = sum(ranks)
        elif combination_type == "linear":
            if len(set(ranks)) != 1:
                raise LoRAInputError(f"{where}: combination_type 'linear' needs equal ranks, got {ranks} (use 'cat' or 'svd')")
            wa, wb = [], []
            for w, c in zip(weights, cfgs):
                ws = w * c.scale
                sign = 1 if ws >= 0 else -1
                wa.append(math.sqrt(abs(ws)) * sign)
                wb.append(math.sqrt(abs(ws)))
            dev = pairs[0][0].device
            out = []
            for i, ww in enumerate((wa, wb)):  # PEFT's task_arithmetic: stack, multiply by fp32 weights, sum
                t = torch.stack([p[i].data for p in pairs], 0)
                wt = torch.tensor(ww).to(dev)
                out.append((t * wt.view(wt.shape + (1,) * (t.dim() - 1))).sum(dim=0).to(dt))
            new_a, new_b = out
            new_r = ranks[0]
        elif combination_type == "svd":
            new_r = svd_rank or max(ranks)
            if isinstance(new_r, bool) or not isinstance(new_r, int) or new_r < 1:
                raise LoRAInputError(f"{where}: svd_rank must be a positive int, got {svd_rank!r}")
            deltas = []
            for (a, b), c in zip(pairs, cfgs):  # PEFT's get_delta_weight (16-bit on the CPU via fp32)
                up = b.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)
                d = ((b.float() @ a.float()) if up else (b @ a)) * c.scale
                deltas.append(d.to(b.dtype) if up else d)
            t = torch.stack(deltas, 0)
            wt = torch.tensor(weights).to(t.device)
            delta = (t * wt.view(-1, 1, 1)).sum(dim=0)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices)
            U = U[:, :new_r] @ torch.diag(S[:new_r])
            Vh = Vh[:new_r, :]
            if svd_clamp is not None:
                hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), svd_clamp)
                U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
            new_r = Vh.shape[0]  # min(new_r, N, K)
            new_a, new_b = Vh.to(dt), U.to(dt)
        else:
            raise LoRAInputError(f"{where}: combination_type must be 'cat', 'linear' or 'svd', got {combination_type!r}")
        self.add_adapter(adapter_name, new_r, float(new_r), cfgs[0].dropout, False, lora_dtype=dt)
        a, b = self.adapter_weights(adapter_name)
        a.copy_(new_a)
        b.copy_(new_b)


# ----------------------------------------------------------------------------------------------------------------
# Model-level helpers: apply to every LoRALinear of a model
# ----------------------------------------------------------------------------------------------------------------


def _layers(model: nn.Module, where: str, name: Optional[str] = None):
    out = [(n, m) for n, m in model.named_modules() if isinstance(m, NamedAdaptersMixin)]
    if not out:
        raise LoRAInputError(f"{where}: the model has no LoRALinear layers (use lora_kernels.inject_lora first)")
    if name is not None:
        out = [(n, m) for n, m in out if name in m.adapter_names]
        if not out:
            raise LoRAInputError(f"{where}: no LoRALinear layer has an adapter named {name!r}")
    return out


def _matches(name: str, target_modules) -> bool:
    import re

    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def add_adapter(model: nn.Module, adapter_name: str, target_modules: Union[str, Iterable[str]], r: int, alpha: float,
                dropout: float = 0.0, use_rslora: bool = False, lora_dtype: Optional[torch.dtype] = None) -> List[str]:
    """Add adapter ``adapter_name`` to every LoRALinear of ``model`` whose qualified name matches
    ``target_modules`` (names / suffixes, or a regex string, as :func:`lora_kernels.inject_lora`). Returns the
    names of the layers it was added to; raises when none matched."""
    tm = target_modules if isinstance(target_modules, str) else list(target_modules)
    other = [n for n, m in model.named_modules() if _matches(n, tm) and not isinstance(m, NamedAdaptersMixin)
             and any(k.startswith("lora_") for k, _ in m.named_parameters(recurse=False))]
    if other:  # LoRAQuantLinear, LoRAEmbedding, MoE expert LoRA: one adapter each
        raise LoRAInputError(f"add_adapter: named adapters are implemented for LoRALinear only; {other[:3]} are other "
                             "LoRA layers (quantised base, embedding or MoE experts)")
    hits = [(n, m) for n, m in _layers(model, "add_adapter") if _matches(n, tm)]
    if not hits:
        raise LoRAInputError(f"add_adapter: no LoRALinear layer matches target_modules={tm!r} (inject_lora first)")
    for _, m in hits:
        m.add_adapter(adapter_name, r, alpha, dropout, use_rslora, lora_dtype)
    return [n for n, _ in hits]


def set_adapter(model: nn.Module, names: Union[str, Sequence[str]]) -> None:
    """``set_adapter`` on every LoRALinear; a layer that has none of ``names`` gets its adapters disabled
    (PEFT: a layer without the active adapter computes its base output), one that has some of them activates those."""
    names = [names] if isinstance(names, str) else list(names)
    layers = _layers(model, "set_adapter")
    known = {n for _, m in layers for n in m.adapter_names}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LoRAInputError(f"set_adapter: unknown adapter(s) {unknown} (the model has {sorted(known)})")
    for _, m in layers:
        here = [n for n in names if n in m.adapter_names]
        if here:
            m.set_adapter(here)
            m.enable_adapters()
        else:
            m._refuse_merged("set_adapter")
            for n in m.adapter_names:
                for p in m.adapter_weights(n):
                    p.requires_grad_(False)
            m._disabled = True
            m._update_fast()


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """``delete_adapter`` on every LoRALinear that has ``adapter_name``."""
    for _, m in _layers(model, "delete_adapter", adapter_name):
        m.delete_adapter(adapter_name)


def enable_adapters(model: nn.Module) -> None:
    for _, m in _layers(model, "enable_adapters"):
        m.enable_adapters()


def disable_adapters(model: nn.Module):
    """Disable the adapters of every LoRALinear; returns a context manager restoring the previous state on exit
    (``with lora_kernels.disable_adapters(model): base_logits = model(x)``)."""
    layers = _layers(model, "disable_adapters")
    for _, m in layers:
        m._refuse_merged("disable_adapters")
    states = [(m, m._disabled) for _, m in layers]
    for _, m in layers:
        m.disable_adapters()
    def restore():
        for m, was in states:
            m._disabled = was
            m._update_fast()

    return _Reenable(restore)


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None, svd_clamp: Optional[float] = None,
                         svd_full_matrices: bool = True) -> None:
    """``add_weighted_adapter`` on every LoRALinear holding at least one of ``adapters`` (with the adapters that
    layer has, as PEFT does per layer)."""
    layers = _layers(model, "add_weighted_adapter")
    adapters, weights = list(adapters), [float(w) for w in weights]
    if len(adapters) != len(weights):
        raise LoRAInputError(f"add_weighted_adapter: give one weight per adapter, got {len(adapters)} and {len(weights)}")
    known = {n for _, m in layers for n in m.adapter_names}
    unknown = [n for n in adapters if n not in known]
    if unknown or adapter_name in known:
        raise LoRAInputError(f"add_weighted_adapter: unknown adapter(s) {unknown} or existing new name {adapter_name!r} "
                             f"(the model has {sorted(known)})")
    if len(adapters) == 1:  # PEFT decides on the model's adapter list, not per layer
        combination_type = "linear"
    done = 0
    for _, m in layers:
        idx = [i for i, n in enumerate(adapters) if n in m.adapter_names]
        if not idx:
            continue
        m._add_weighted([adapters[i] for i in idx], [weights[i] for i in idx], adapter_name, combination_type,
                        svd_rank, svd_clamp, svd_full_matrices)
        done += 1
    if not done:
        raise LoRAInputError(f"add_weighted_adapter: no LoRALinear layer has any of the adapters {list(adapters)}")
