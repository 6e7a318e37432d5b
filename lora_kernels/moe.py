"""LoRA on mixture-of-experts expert weights: the modules, ``inject_lora``'s expert discovery, PEFT
``target_parameters`` on the fused path, and PEFT adapter files for expert LoRA.

Two expert layouts are reached:

* **3-D fused expert parameters** (Transformers v5: every ``@use_experts_implementation`` experts class --
  Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, GPT-OSS, ...; ``gate_up_proj`` [E, 2I, H] or ``up_proj``, ``down_proj``
  [E, H, I], stored transposed ([E, in, out]) when ``is_transposed``, optional ``*_bias`` [E, out]).
  :class:`LoRAExperts` wraps such a module without copying: its parameters stay the module's own (state-dict keys
  unchanged) plus ``lora_A.<param>`` [E, r, in] (or one [r, in] shared by every expert) and ``lora_B.<param>``
  [E, out, r] per adapted projection. Its forward takes what the experts module takes
  (``hidden_states`` [T, H], ``top_k_index`` [T, k], ``top_k_weights`` [T, k]) and runs the two grouped
  expert GEMMs with LoRA fused (:func:`lora_kernels.moe_lora_linear`), the model's own gate / activation between
  them, and the weighted sum over each token's experts inside the second GEMM's op: no ``W + s·B·A``, no per-expert
  copy of any weight, one routing (sort by expert on the device) shared by both projections.
* **nn.ModuleList of expert MLPs** (Transformers v4 Mixtral / Qwen2-MoE style: each expert has ``gate_proj`` /
  ``up_proj`` / ``down_proj`` or ``w1`` / ``w3`` / ``w2`` Linears). :class:`LoRAExpertList` replaces the list: the
  expert Linears' weights become views of one stacked [E, 2I, H] / [E, H, I] storage (one copy at injection,
  the old storage is freed; state-dict keys unchanged), each expert's Linears become LoRA projections (so a
  parent block that loops over ``experts[i](x)`` keeps working, one fused ``lora_linear`` per projection), and
  ``forward(hidden_states, top_k_index, top_k_weights)`` runs the grouped path on the stacked storage.

The expert LoRA has no dropout (the fused op has none; PEFT's ``target_parameters`` rejects it too) and is not
merged (``W`` stays frozen and unmerged).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ._backend import resolve_backend
from ._checks import check_lora_settings
from .functional import lora_linear, moe_lora_linear
from .ops.moe_lora import MoERouting, pick_block_m
from .reference import lora_scale

logger = logging.getLogger(__name__)

__all__ = ["LoRAExperts", "LoRAExpertList", "is_fused_experts", "expert_list_names", "inject_moe_lora",
           "experts_forward", "peft_param_forward", "MoEAdapterSlots", "experts_serve"]

# (gate, up, down) Linear names of one expert MLP in the nn.ModuleList layouts
_LIST_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


# ----------------------------------------------------------------------------------------------
# the grouped forward shared by every layout
# ----------------------------------------------------------------------------------------------


def _projections(experts: nn.Module) -> Tuple[str, ...]:
    """The projection parameter names of a 3-D experts module, in order (up projection first)."""
    first = "gate_up_proj" if isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) else "up_proj"
    return (first, "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module with 3-D fused expert parameters (Transformers v5 layout)."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", None)
    if not isinstance(up, torch.Tensor):
        up = getattr(module, "up_proj", None)
    return (isinstance(down, torch.Tensor) and isinstance(up, torch.Tensor) and down.dim() == 3 and up.dim() == 3
            and not isinstance(module, (LoRAExperts, LoRAExpertList)))


def _as_linear_weight(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[E, out, in] view of a 3-D expert parameter stored [E, out, in] or, transposed, [E, in, out]."""
    return w.transpose(1, 2) if transposed else w


def experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    lora: Dict[str, Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]],
    *,
    weights: Optional[Dict[str, torch.Tensor]] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The MoE experts of a Transformers-v5-style experts module with LoRA on its projections, on the grouped path.

    ``lora[name] = (A [E, r, in] or [r, in], B [E, out, r], scale)`` for each adapted projection (absent: no LoRA on
    it); ``weights`` overrides the base weights (as [E, out, in] views; default: the module's parameters, read through
    ``is_transposed``). Returns [T, H] in hidden_states' dtype, as the experts module's own forward would."""
    up_name, down_name = _projections(experts)
    transposed = bool(getattr(experts, "is_transposed", False))
    ws = weights or {}
    w_up = ws.get(up_name)
    if w_up is None:
        w_up = _as_linear_weight(getattr(experts, up_name), transposed)
    w_down = ws.get(down_name)
    if w_down is None:
        w_down = _as_linear_weight(getattr(experts, down_name), transposed)
    has_bias = bool(getattr(experts, "has_bias", False))
    b_up = getattr(experts, f"{up_name}_bias", None) if has_bias else None
    b_down = getattr(experts, f"{down_name}_bias", None) if has_bias else None
    x = hidden_states
    E = w_up.shape[0]
    if top_k_index.dtype not in (torch.int32, torch.int64):
        top_k_index = top_k_index.to(torch.int64)
    routing = None
    if x.shape[0] > 0:
        be = resolve_backend("moe_lora_linear", x, w_up, backend=backend)
        if be != "torch":  # one sort by expert for both projections (the torch backend groups on its own)
            routing = MoERouting(top_k_index, E, block_m=pick_block_m(top_k_index.numel(), E))
    a, b, s = lora.get(up_name, (None, None, 1.0))
    h = moe_lora_linear(x, w_up.to(x.dtype), a, b, s, top_k_index, None, None if b_up is None else b_up.to(x.dtype),
                        combine=False, routing=routing, backend=backend)
    if getattr(experts, "has_gate", up_name == "gate_up_proj"):
        h = experts._apply_gate(h)
    else:
        h = experts.act_fn(h)
    a, b, s = lora.get(down_name, (None, None, 1.0))
    bd = None if b_down is None else b_down.to(h.dtype)
    if getattr(experts, "has_post_expert_norm", False):
        o = moe_lora_linear(h, w_down.to(h.dtype), a, b, s, top_k_index, None, bd, routing=routing, backend=backend)
        o = experts.post_expert_norm(o) * top_k_weights.reshape(-1, 1)
        return o.view(*top_k_index.shape, -1).sum(1).to(x.dtype)
    y = moe_lora_linear(h, w_down.to(h.dtype), a, b, s, top_k_index, top_k_weights, bd, combine=True,
                        routing=routing, backend=backend)
    return y.to(x.dtype)


def _new_lora(E: int, r: int, n_in: int, n_out: int, share_a: bool, dtype, device):
    """(A, B) parameters: A Kaiming-uniform(a=√5) per expert (as PEFT / nn.Linear), B zero."""
    A = nn.Parameter(torch.empty((r, n_in) if share_a else (E, r, n_in), dtype=dtype, device=device))
    B = nn.Parameter(torch.zeros((E, n_out, r), dtype=dtype, device=device))
    bound = 1.0 / math.sqrt(n_in) if n_in else 0.0  # kaiming_uniform_(a=√5) on [r, in]
    with torch.no_grad():
        A.uniform_(-bound, bound)
    return A, B


class _LoRAConfigMixin:
    def _init_lora(self, r, alpha, use_rslora, backend, share_a):
        check_lora_settings(type(self).__name__, r, alpha)
        # lora_-prefixed: experts modules have attributes of their own (GPT-OSS: alpha, the SwiGLU constant)
        self.lora_r, self.lora_alpha, self.use_rslora, self.share_a = r, float(alpha), bool(use_rslora), bool(share_a)
        self.lora_scale = lora_scale(alpha, r, use_rslora)
        self.backend = backend
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()


class LoRAExperts(_LoRAConfigMixin, nn.Module):
    """LoRA on the 3-D fused expert parameters of a Transformers-v5-style experts module (see the module docstring).

    Args:
        base: the experts module (``gate_up_proj`` or ``up_proj``, ``down_proj``; ``is_transposed``, ``has_bias``,
            ``has_gate``, ``_apply_gate`` / ``act_fn`` as ``@use_experts_implementation`` sets them).
        r, alpha, use_rslora: as :class:`lora_kernels.LoRALinear` (scale = alpha / r, or alpha / √r).
        targets: which projections get LoRA (default both; e.g. ``("down_proj",)``).
        share_a: one A [r, in] shared by every expert of a projection instead of one per expert.
        backend, lora_dtype: as :class:`lora_kernels.LoRALinear`.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, use_rslora: bool = False,
                 targets: Optional[Iterable[str]] = None, share_a: bool = False, backend: Optional[str] = None,
                 lora_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not is_fused_experts(base):
            raise TypeError(f"LoRAExperts wraps an experts module with 3-D expert parameters (gate_up_proj / up_proj "
                            f"and down_proj), got {type(base).__name__}")
        for name, p in base._parameters.items():
            if p is not None:
                p.requires_grad_(False)
            self.register_parameter(name, p)
        for name, buf in base._buffers.items():
            self.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)
        for name, m in base._modules.items():
            self.add_module(name, m)
        self.__dict__["base"] = base  # not a submodule: its parameters are registered above as our own
        self._init_lora(r, alpha, use_rslora, backend, share_a)
        names = _projections(base)
        targets = names if targets is None else tuple(targets)
        unknown = [t for t in targets if t not in names]
        if unknown:
            raise ValueError(f"LoRAExperts: unknown projection(s) {unknown}; this experts module has {list(names)}")
        self.transposed = bool(getattr(base, "is_transposed", False))
        for name in targets:
            w = _as_linear_weight(getattr(base, name), self.transposed)  # [E, out, in]
            E, n_out, n_in = w.shape
            A, B = _new_lora(E, r, n_in, n_out, share_a, lora_dtype or w.dtype, w.device)
            self.lora_A[name], self.lora_B[name] = A, B

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("base")
            if base is None:
                raise
            return getattr(base, name)  # the experts module's own attributes (num_experts, is_transposed, ...)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        lora = {n: (self.lora_A[n], self.lora_B[n], self.lora_scale) for n in self.lora_A}
        return experts_forward(self, hidden_states, top_k_index, top_k_weights, lora, backend=self.backend)

    def _apply_gate(self, h):
        return self.__dict__["base"]._apply_gate(h)  # bound to the experts module (its own act_fn, constants)

    def extra_repr(self) -> str:
        return (f"{type(self.__dict__['base']).__name__}, targets={list(self.lora_A.keys())}, r={self.lora_r}, "
                f"alpha={self.lora_alpha:g}, scale={self.lora_scale:g}, share_a={self.share_a}")


# ----------------------------------------------------------------------------------------------
# nn.ModuleList of expert MLPs
# ----------------------------------------------------------------------------------------------


def expert_list_names(module: nn.Module) -> Optional[Tuple[str, str, str]]:
    """(gate, up, down) Linear names when ``module`` is an nn.ModuleList of identical expert MLPs, else None."""
    if not isinstance(module, nn.ModuleList) or isinstance(module, LoRAExpertList) or len(module) == 0:
        return None
    first = module[0]
    for names in _LIST_NAMES:
        lins = [getattr(first, n, None) for n in names]
        if not all(type(m) is nn.Linear for m in lins):
            continue
        shapes = [tuple(m.weight.shape) for m in lins]
        ok = all(type(e) is type(first) and all(type(getattr(e, n, None)) is nn.Linear
                                                and tuple(getattr(e, n).weight.shape) == s for n, s in zip(names, shapes))
                 for e in module)
        if ok and shapes[0] == shapes[1] and shapes[2][1] == shapes[0][0] and hasattr(first, "act_fn"):
            return names
    return None


class _ExpertProj(nn.Module):
    """One expert's Linear inside a :class:`LoRAExpertList`: ``weight`` is a view of the list's stacked storage and the
    LoRA factors are rows of the list's stacked ``lora_A`` / ``lora_B``; forward = one fused ``lora_linear``."""

    def __init__(self, owner: "LoRAExpertList", proj: str, expert: int, weight: nn.Parameter, bias):
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule (the list owns us)
        self.proj, self.expert = proj, expert
        self.weight = weight
        self.bias = bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x):
        o = self.__dict__["owner"]
        if self.proj not in o.lora_A:
            return nn.functional.linear(x, self.weight, self.bias)
        A = o.lora_A[self.proj]
        A = A if A.dim() == 2 else A[self.expert]
        return lora_linear(x, self.weight, A, o.lora_B[self.proj][self.expert], o.lora_scale, self.bias, backend=o.backend)

    def extra_repr(self) -> str:
        return f"{self.proj}[{self.expert}]: in_features={self.in_features}, out_features={self.out_features}"


class LoRAExpertList(_LoRAConfigMixin, nn.ModuleList):
    """LoRA on an nn.ModuleList of expert MLPs (see the module docstring). Still an nn.ModuleList of the same expert
    modules (``len``, indexing and iteration see only the experts), with:

    * ``gate_up`` [E, 2I, H] and ``down`` [E, H, I]: the stacked storage the experts' Linear weights are views of
      (non-persistent buffers: the state dict keeps the per-expert keys);
    * ``lora_A.gate_proj`` / ``up_proj`` / ``down_proj`` [E, r, in] (or [r, in] with ``share_a``) and ``lora_B.*``
      [E, out, r] (keyed by the experts' own Linear names);
    * ``forward(hidden_states, top_k_index, top_k_weights)``: the grouped path (the v5 experts signature).
    """

    def __init__(self, experts: nn.ModuleList, r: int, alpha: float, use_rslora: bool = False,
                 targets: Optional[Iterable[str]] = None, share_a: bool = False, backend: Optional[str] = None,
                 lora_dtype: Optional[torch.dtype] = None):
        names = expert_list_names(experts)
        if names is None:
            raise TypeError("LoRAExpertList wraps an nn.ModuleList of identical expert MLPs with nn.Linear "
                            f"{' / '.join(_LIST_NAMES[0])} or {' / '.join(_LIST_NAMES[1])} and an act_fn")
        super().__init__(list(experts))
        self._init_lora(r, alpha, use_rslora, backend, share_a)
        self.names = names
        targets = names if targets is None else tuple(targets)
        unknown = [t for t in targets if t not in names]
        if unknown:
            raise ValueError(f"LoRAExpertList: unknown projection(s) {unknown}; the experts have {list(names)}")
        self.has_bias = any(getattr(e, n).bias is not None for e in experts for n in names)
        if self.has_bias:
            raise ValueError("LoRAExpertList: expert Linears with a bias are not supported on the grouped path")
        gate, up, down = names
        with torch.no_grad():
            gu = torch.stack([torch.cat([getattr(e, gate).weight, getattr(e, up).weight]) for e in experts])
            dn = torch.stack([getattr(e, down).weight for e in experts])
        self.register_buffer("gate_up", gu, persistent=False)
        self.register_buffer("down", dn, persistent=False)
        self._repoint()
        E = len(experts)
        for name in targets:
            proj = getattr(self[0], name)
            A, B = _new_lora(E, r, proj.in_features, proj.out_features, share_a, lora_dtype or proj.weight.dtype,
                             proj.weight.device)
            self.lora_A[name], self.lora_B[name] = A, B

    # the experts are the numeric children only
    def _experts(self) -> List[nn.Module]:
        return [m for k, m in self._modules.items() if k.isdigit()]

    def __len__(self):
        return sum(1 for k in self._modules if k.isdigit())

    def __iter__(self):
        return iter(self._experts())

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.ModuleList(self._experts()[idx])
        return self._experts()[idx]

    def _repoint(self) -> None:
        """Make every expert Linear an :class:`_ExpertProj` whose weight is a view of the stacked storage."""
        gate, up, down = self.names
        I = self.gate_up.shape[1] // 2
        for e, expert in enumerate(self._experts()):
            views = {gate: self.gate_up[e, :I], up: self.gate_up[e, I:], down: self.down[e]}
            for n, v in views.items():
                old = getattr(expert, n)
                setattr(expert, n, _ExpertProj(self, n, e, nn.Parameter(v, requires_grad=False), None))
                del old

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() convert every parameter and buffer on its own, which would leave the experts'
        # weights and the stacked storage as separate copies: convert, then rebuild the views.
        super()._apply(fn, recurse)
        with torch.no_grad():
            gate, up, down = self.names
            ex = self._experts()
            self.gate_up = torch.stack([torch.cat([getattr(e, gate).weight, getattr(e, up).weight]) for e in ex])
            self.down = torch.stack([getattr(e, down).weight for e in ex])
        self._repoint()
        return self

    def stacked_lora(self):
        """{"gate_up": (A [E, 2r, H], B [E, 2I, 2r], s), "down": (A, B, s)} for the grouped path: the gate and up
        factors side by side (B block-diagonal), built differentiably from the parameters (r-sized copies only)."""
        gate, up, down = self.names
        E = len(self)
        out = {}
        I = self.gate_up.shape[1] // 2
        H = self.gate_up.shape[2]

        def full_a(n):
            A = self.lora_A[n]
            return A.unsqueeze(0).expand(E, *A.shape) if A.dim() == 2 else A

        if gate in self.lora_A or up in self.lora_A:
            dt = (self.lora_A[gate] if gate in self.lora_A else self.lora_A[up]).dtype
            dev = self.gate_up.device
            zA = torch.zeros(E, self.lora_r, H, dtype=dt, device=dev)
            zB = torch.zeros(E, I, self.lora_r, dtype=dt, device=dev)
            Ag = full_a(gate) if gate in self.lora_A else zA
            Au = full_a(up) if up in self.lora_A else zA
            Bg = self.lora_B[gate] if gate in self.lora_B else zB
            Bu = self.lora_B[up] if up in self.lora_B else zB
            A = torch.cat([Ag, Au], dim=1)
            B = torch.cat([torch.cat([Bg, zB], dim=2), torch.cat([zB, Bu], dim=2)], dim=1)
            out["gate_up_proj"] = (A, B, self.lora_scale)
        if down in self.lora_A:
            out["down_proj"] = (full_a(down), self.lora_B[down], self.lora_scale)
        return out

    @property
    def gate_up_proj(self):
        return self.gate_up

    @property
    def down_proj(self):
        return self.down

    @property
    def has_gate(self):
        return True

    def _apply_gate(self, h):
        gate, up = h.chunk(2, dim=-1)
        return self[0].act_fn(gate) * up

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return experts_forward(self, hidden_states, top_k_index, top_k_weights, self.stacked_lora(),
                               weights={"gate_up_proj": self.gate_up, "down_proj": self.down}, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"experts={len(self)}, targets={list(self.lora_A.keys())}, r={self.lora_r}, alpha={self.lora_alpha:g}, "
                f"scale={self.lora_scale:g}, share_a={self.share_a}")


# ----------------------------------------------------------------------------------------------
# inject_lora's expert discovery (called by modules.inject_lora)
# ----------------------------------------------------------------------------------------------


def _matches(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject_moe_lora(model: nn.Module, target_modules: Union[str, Iterable[str]], r: int, alpha: float,
                    dropout: float = 0.0, use_rslora: bool = False, backend: Optional[str] = None,
                    merge_on_eval: bool = False, lora_dtype: Optional[torch.dtype] = None) -> List[str]:
    """Replace every expert container whose qualified name matches ``target_modules`` (e.g. ``"experts"``) with
    :class:`LoRAExperts` (3-D fused parameters) or :class:`LoRAExpertList` (nn.ModuleList of expert MLPs), in place;
    for 3-D experts, a target ``"<experts name>.<parameter>"`` (e.g. ``"experts.down_proj"``, PEFT's
    ``target_parameters`` spelling) adapts that projection only. Returns the replaced paths. Raises for options the expert LoRA does not have (dropout, merge_on_eval)."""
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    hits = []
    for name, mod in model.named_modules():
        if not name:
            continue
        if is_fused_experts(mod):
            # the module's name selects every projection; "<name>.<param>" (PEFT's target_parameters) selects one
            projs = _projections(mod)
            chosen = projs if _matches(name, target_modules) else tuple(
                p for p in projs if _matches(f"{name}.{p}", target_modules))
            if chosen:
                hits.append((name, mod, chosen))
        elif expert_list_names(mod) is not None and _matches(name, target_modules):
            hits.append((name, mod, None))
    if hits and dropout:
        raise ValueError(f"inject_lora: {hits[0][0]} holds MoE experts, whose LoRA has no dropout (PEFT's "
                         "target_parameters neither); inject the experts in a separate call with dropout=0")
    if hits and merge_on_eval:
        raise ValueError(f"inject_lora: merge_on_eval is not supported for MoE experts ({hits[0][0]})")
    for name, mod, targets in hits:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        cls = LoRAExperts if is_fused_experts(mod) else LoRAExpertList
        setattr(parent, child, cls(mod, r, alpha, use_rslora, targets=targets, backend=backend, lora_dtype=lora_dtype))
    return [n for n, _, _ in hits]


# ----------------------------------------------------------------------------------------------
# PEFT target_parameters (ParamWrapper) on the fused path: the hook lora_kernels.peft.patch calls
# ----------------------------------------------------------------------------------------------

_INNER_ATTR = "_lora_kernels_moe_inner"  # set on ParamWrappers nested in a patched outermost wrapper


def _param_wrapper_cls():
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # pragma: no cover - older PEFT without target_parameters
        return None
    return ParamWrapper


def _wrapper_chain(mod) -> Tuple[list, nn.Module]:
    """(the ParamWrappers from ``mod`` inwards, the module they wrap)."""
    PW = _param_wrapper_cls()
    chain, m = [], mod
    while PW is not None and isinstance(m, PW):
        chain.append(m)
        m = m.base_layer
    return chain, m


def _peft_factors(w, name: str):
    """PEFT's ``target_parameters`` factors of adapter ``name`` as (A [E, r, in], B [E, out, r], scale): views of
    ``lora_A[name].weight`` [r·E, in] (expert-major rows) and ``lora_B[name].weight`` [out, r·E] (expert-minor
    columns), exactly PEFT's ``get_delta_weight`` layout; no copy."""
    E, r = w.num_experts, w.r[name]
    a = w.lora_A[name].weight
    b = w.lora_B[name].weight
    return a.view(E, r, a.shape[-1]), b.view(b.shape[0], r, E).permute(2, 0, 1), float(w.scaling[name])


def peft_param_forward(mod, reason: Optional[str], orig_forward: Callable, adapter_reason: Callable,
                       log_once: Callable):
    """For ``lora_kernels.peft.patch``: ``(reason, forward)`` for a PEFT ``ParamWrapper`` (``target_parameters``).

    * the outermost ParamWrapper around a 3-D experts module whose wrapped parameters are its projections:
      ``(None, forward)``, a forward that runs every wrapped projection's LoRA on the grouped path;
    * a ParamWrapper nested in such a wrapper: ``(None, None)`` (the outer one's forward runs it; nothing to patch);
    * anything else: ``(reason, None)`` with the reason it stays on PEFT's path."""
    if mod.__dict__.get(_INNER_ATTR):
        return None, None
    chain, base = _wrapper_chain(mod)
    if not chain:
        return reason, None
    if not is_fused_experts(base):
        return (f"target_parameters on {type(base).__module__}.{type(base).__qualname__} (not an experts module with "
                "3-D expert parameters) is not fused"), None
    names = _projections(base)
    for w in chain:
        if w.parameter_name not in names:
            return f"target_parameters {w.parameter_name!r} of an experts module (only {list(names)}) is not fused", None
    for w in chain[1:]:
        w.__dict__[_INNER_ATTR] = True

    def forward(self, x, *args, **kwargs):
        r = _param_call(self, x, args, kwargs, adapter_reason)
        if isinstance(r, str):
            if r:
                log_once(r)
            return orig_forward(self)(x, *args, **kwargs)
        lora, experts = r
        return experts_forward(experts, x, args[0], args[1], lora, backend=self.__dict__.get("_lora_kernels_backend"))

    return None, forward


def _param_call(self, x, args, kwargs, adapter_reason):
    """``(lora factors, experts module)`` when this call of a patched outermost ParamWrapper can run fused, else the
    reason why not ('' when no message is needed). Reads PEFT's live state on every call."""
    if kwargs and any(v is not None for v in kwargs.values()):
        return "extra forward arguments (e.g. adapter_names) are not fused"
    if len(args) != 2 or not isinstance(x, torch.Tensor) or x.dim() != 2:
        return "an experts call other than (hidden_states [T, H], top_k_index, top_k_weights) is not fused"
    chain, base = _wrapper_chain(self)
    lora = {}
    for w in chain:
        if w.disable_adapters or w.merged:
            return ""  # PEFT's own path (base only, or the merged weight)
        active = [a for a in w.active_adapters if a in w.lora_A]
        if len(active) > 1:
            return "several active adapters at once are not fused"
        if not active:
            continue
        reason = adapter_reason(w, active[0])
        if reason is not None:
            return reason
        lora[w.parameter_name] = _peft_factors(w, active[0])
    w0 = getattr(base, _projections(base)[0])
    if x.dtype != w0.dtype and not torch.is_autocast_enabled(x.device.type):
        return "input dtype different from the expert weights' dtype is not fused"
    return lora, base


# ----------------------------------------------------------------------------------------------
# PEFT adapter files (peft_io's hooks): target_parameters keys for 3-D experts, per-expert keys for expert lists
# ----------------------------------------------------------------------------------------------

_BASE = ".base_layer"


def _param_targets(config: dict, module_path: str) -> List[str]:
    """Parameter names of module ``module_path`` that the config's ``target_parameters`` select (PEFT's matching:
    ``key == target or key.endswith("." + target)`` for key = "<module path>.<parameter>"), in PEFT's wrapping order
    for the experts layouts (the up / gate_up projection first, down last, anything else after)."""
    names = []
    for t in config.get("target_parameters") or []:
        mod, _, pname = t.rpartition(".")
        key = f"{module_path}.{pname}"
        if (key == t or key.endswith("." + t)) and pname not in names:
            names.append(pname)
    order = {"gate_up_proj": 0, "up_proj": 0, "down_proj": 1}
    return sorted(names, key=lambda n: (order.get(n, 2), n))


def split_param_pairs(config: dict, pairs: Dict[str, dict], peft_scale: Callable):
    """Split peft_io's ``{key path: {"lora_A": t, "lora_B": t}}`` into (the other pairs, the target_parameters pairs
    as ``{"<module path>.<parameter>": (A [E, r, in], B [E, out, r], scale)}``). PEFT nests one ParamWrapper per
    targeted parameter of a module: the last one (in the module's parameter order) is outermost (key path = the
    module path), each earlier one one ``.base_layer`` deeper. ``peft_scale``: peft_io's (r, alpha, scale) rule."""
    rest, groups = {}, {}
    for path, ab in pairs.items():
        base, depth = path, 0
        while base.endswith(_BASE):
            base, depth = base[: -len(_BASE)], depth + 1
        if not _param_targets(config, base):
            rest[path] = ab
            continue
        groups.setdefault(base, {})[depth] = (path, ab)
    out = {}
    for base, by_depth in groups.items():
        names = _param_targets(config, base)
        if sorted(by_depth) != list(range(len(names))):
            raise ValueError(f"PEFT adapter: module {base!r}: target_parameters select {names} but the file has "
                             f"{len(by_depth)} nested LoRA pairs for it")
        for depth, (path, ab) in by_depth.items():
            name = names[len(names) - 1 - depth]
            if set(ab) != {"lora_A", "lora_B"}:
                raise ValueError(f"PEFT adapter: {path!r} has only {sorted(ab)}")
            a, b = ab["lora_A"], ab["lora_B"]
            r, _, scale = peft_scale(config, f"{base}.{name}")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] % r:
                raise ValueError(f"PEFT adapter: {base}.{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are not "
                                 f"[r·E, in] / [out, r·E] for r={r}")
            E = a.shape[0] // r
            out[f"{base}.{name}"] = (a.reshape(E, r, a.shape[1]), b.reshape(b.shape[0], r, E).permute(2, 0, 1).contiguous(),
                                     scale)
    return rest, out


def _moe_modules(model: nn.Module):
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRAExperts, LoRAExpertList))}


def _full_a(m, name):
    A = m.lora_A[name]
    E = m.lora_B[name].shape[0]
    return A.unsqueeze(0).expand(E, *A.shape) if A.dim() == 2 else A


def peft_moe_entries(model: nn.Module):
    """For ``peft_io.save_peft_adapter``: (tensors by key path without PEFT's prefix, target_parameters entries, extra
    target_modules entries, {path: (r, alpha, use_rslora)} of every adapted projection). 3-D experts are written as
    PEFT ``target_parameters`` (lora_A [r·E, in], lora_B [out, r·E], nested ``.base_layer`` keys); an expert list as
    the per-expert Linears PEFT itself would adapt (``<list>.<i>.<name>``)."""
    tensors, params, modules, ranks = {}, [], [], {}
    for path, m in _moe_modules(model).items():
        if m.share_a:
            logger.info("lora_kernels.moe: %s shares one A over its experts; PEFT files store it once per expert", path)
        cfg = (m.lora_r, m.lora_alpha, m.use_rslora)
        if isinstance(m, LoRAExperts):
            adapted = [n for n in _projections(m.__dict__["base"]) if n in m.lora_A]
            for i, n in enumerate(adapted):
                key = path + _BASE * (len(adapted) - 1 - i)
                A, B = _full_a(m, n).detach(), m.lora_B[n].detach()
                E, r, n_in = A.shape
                tensors[f"{key}.lora_A.weight"] = A.reshape(E * r, n_in).contiguous().cpu()
                tensors[f"{key}.lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], r * E).contiguous().cpu()
                params.append(f"{path}.{n}")
                ranks[f"{path}.{n}"] = cfg
        else:
            for n in m.lora_A:
                A, B = _full_a(m, n).detach(), m.lora_B[n].detach()
                for e in range(len(m)):
                    tensors[f"{path}.{e}.{n}.lora_A.weight"] = A[e].contiguous().cpu()
                    tensors[f"{path}.{e}.{n}.lora_B.weight"] = B[e].contiguous().cpu()
                    modules.append(f"{path}.{e}.{n}")
                    ranks[f"{path}.{e}.{n}"] = cfg
    return tensors, params, modules, ranks


def plan_peft_moe_load(model: nn.Module, config: dict, adapters: dict, params: dict, *, strict: bool,
                       adopt_scale: bool, where: str):
    """For ``peft_io.load_peft_adapter_``: check the expert adapters of a PEFT file against the model's MoE LoRA
    modules and return (the adapters left for LoRALinear modules, a function that copies the expert ones in). Raises
    before anything is copied."""
    mods = _moe_modules(model)
    copies = []  # (parameter, tensor) pairs
    seen = set()

    def check_scale(m, path, scale):
        if not adopt_scale and not math.isclose(scale, m.lora_scale, rel_tol=1e-6):
            raise ValueError(f"{where}: {path}: the adapter's scale {scale:g} differs from the module's "
                             f"{m.lora_scale:g}; pass adopt_scale=True to take the file's")

    for key, (A, B, scale) in params.items():
        path, _, name = key.rpartition(".")
        m = mods.get(path)
        if not isinstance(m, LoRAExperts) or name not in m.lora_A:
            raise ValueError(f"{where}: the adapter targets parameter {key!r}, which is not an expert projection with "
                             f"LoRA in the model (MoE LoRA modules: {sorted(mods)[:3]})")
        if tuple(A.shape) != tuple(_full_a(m, name).shape) or tuple(B.shape) != tuple(m.lora_B[name].shape):
            raise ValueError(f"{where}: {key}: adapter A {tuple(A.shape)} / B {tuple(B.shape)} vs model "
                             f"{tuple(_full_a(m, name).shape)} / {tuple(m.lora_B[name].shape)}")
        if m.share_a and not torch.equal(A, A[:1].expand_as(A)):
            raise ValueError(f"{where}: {key}: the module shares one A over its experts but the file's differ")
        check_scale(m, key, scale)
        copies.append((m.lora_A[name], A[0] if m.share_a else A))
        copies.append((m.lora_B[name], B))
        seen.add((path, name))
    rest = {}
    lists = {p: m for p, m in mods.items() if isinstance(m, LoRAExpertList)}
    for key, ab in adapters.items():
        lp, _, tail = key.rpartition(".")
        lpath, _, idx = lp.rpartition(".")
        m = lists.get(lpath)
        if m is None or not idx.isdigit() or tail not in m.lora_A:
            rest[key] = ab
            continue
        e = int(idx)
        A, B, scale = ab
        if tuple(A.shape) != tuple(m.lora_A[tail].shape[-2:]) or tuple(B.shape) != tuple(m.lora_B[tail].shape[1:]):
            raise ValueError(f"{where}: {key}: adapter A {tuple(A.shape)} / B {tuple(B.shape)} do not fit the expert list")
        check_scale(m, key, scale)
        copies.append((m.lora_A[tail] if m.share_a else m.lora_A[tail][e], A))
        copies.append((m.lora_B[tail][e], B))
        seen.add((lpath, tail, e))
    if strict:
        for p, m in mods.items():
            for n in m.lora_A:
                missing = (p, n) not in seen if isinstance(m, LoRAExperts) else any(
                    (p, n, e) not in seen for e in range(len(m)))
                if missing:
                    raise ValueError(f"{where}: the MoE LoRA projection {p}.{n} has no weights in the adapter (pass "
                                     "strict=False to leave it unchanged)")

    def apply():
        with torch.no_grad():
            for dst, src in copies:
                dst.copy_(src)

    return rest, apply


# ----------------------------------------------------------------------------------------------
# serving: many adapters' expert LoRA in [L, E, ...] slots, per-token adapter ids
# ----------------------------------------------------------------------------------------------


class MoEAdapterSlots:
    """Stacked expert-LoRA slots of one projection of one MoE layer: ``lora_a`` [L, E, r_max, in], ``lora_b``
    [L, E, out, r_max], ``scales`` [L], ``ranks`` [L] (the layout :func:`lora_kernels.add_moe_lora` and vLLM's
    ``lora_a_stacked`` / ``lora_b_stacked`` use). Adapters of rank <= r_max are zero-padded and run only up to their
    own rank; an empty slot has rank 0. ``num_slices`` > 1 packs several outputs (gate and up) into one projection."""

    def __init__(self, num_slots: int, num_experts: int, r_max: int, in_features: int, out_features, *,
                 dtype=torch.float32, device=None):
        outs = [out_features] if isinstance(out_features, int) else list(out_features)
        self.num_slots, self.num_experts, self.r_max, self.in_features = num_slots, num_experts, r_max, in_features
        self.out_features = outs
        z = dict(dtype=dtype, device=device)
        self.lora_a = [torch.zeros(num_slots, num_experts, r_max, in_features, **z) for _ in outs]
        self.lora_b = [torch.zeros(num_slots, num_experts, n, r_max, **z) for n in outs]
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.names: List[Optional[str]] = [None] * num_slots

    @torch.no_grad()
    def load(self, slot: int, lora_a, lora_b, scale: float, name: Optional[str] = None) -> int:
        """Put an adapter in ``slot``: A [E, r, in] (or [r, in] shared) and B [E, out, r] per slice (a list for packed
        slices, one scale for all). Returns the slot."""
        As = [lora_a] if isinstance(lora_a, torch.Tensor) else list(lora_a)
        Bs = [lora_b] if isinstance(lora_b, torch.Tensor) else list(lora_b)
        if not 0 <= slot < self.num_slots or len(As) != len(self.lora_a) or len(Bs) != len(self.lora_b):
            raise ValueError(f"MoEAdapterSlots.load: slot {slot} of {self.num_slots}, {len(As)} / {len(Bs)} slices of "
                             f"{len(self.lora_a)}")
        r = As[0].shape[-2]
        if r > self.r_max:
            raise ValueError(f"MoEAdapterSlots.load: rank {r} > r_max={self.r_max}")
        for s, (a, b) in enumerate(zip(As, Bs)):
            a = a.expand(self.num_experts, *a.shape) if a.dim() == 2 else a
            if tuple(a.shape) != (self.num_experts, r, self.in_features) or \
                    tuple(b.shape) != (self.num_experts, self.out_features[s], r):
                raise ValueError(f"MoEAdapterSlots.load: slice {s}: A {tuple(a.shape)} / B {tuple(b.shape)}, expected "
                                 f"[{self.num_experts}, {r}, {self.in_features}] / [{self.num_experts}, "
                                 f"{self.out_features[s]}, {r}]")
            self.lora_a[s][slot].zero_()
            self.lora_b[s][slot].zero_()
            self.lora_a[s][slot, :, :r] = a
            self.lora_b[s][slot, :, :, :r] = b
        self.scales[slot] = float(scale)
        self.ranks[slot] = r
        self.names[slot] = name
        return slot

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        for a, b in zip(self.lora_a, self.lora_b):
            a[slot].zero_()
            b[slot].zero_()
        self.scales[slot] = 0.0
        self.ranks[slot] = 0
        self.names[slot] = None

    def apply(self, y, x, topk_ids, adapter_ids, topk_weights=None, *, routing: Optional[MoERouting] = None,
              backend: Optional[str] = None):
        """``lora_kernels.add_moe_lora`` with these slots: y [M·k, Σ out] += the adapters' update, in place."""
        from .functional import add_moe_lora

        return add_moe_lora(y, x, self.lora_a, self.lora_b, topk_ids, adapter_ids, self.scales, self.ranks,
                            topk_weights, routing=routing, backend=backend)


@torch.no_grad()
def experts_serve(experts: nn.Module, hidden_states, top_k_index, top_k_weights, slots: Dict[str, MoEAdapterSlots],
                  adapter_ids, *, routing: Optional[MoERouting] = None, backend: Optional[str] = None):
    """Inference forward of a Transformers-v5-style experts module for a batch of many adapters (one per token, -1 =
    none): the grouped expert GEMMs (no LoRA), each projection's adapters added per pair from ``slots[name]``
    (``MoEAdapterSlots`` of the projection, e.g. ``"gate_up_proj"`` with one slice, or gate and up as two slices),
    the model's gate / activation, the routing-weighted sum. With a ``routing`` built once per step
    (``MoERouting(topk_ids, E, adapter_ids=..., num_adapters=L, max_tokens=C)``, updated in place) nothing is read on
    the host (CUDA-graph safe on the Triton backend)."""
    up_name, down_name = _projections(experts)
    transposed = bool(getattr(experts, "is_transposed", False))
    w_up = _as_linear_weight(getattr(experts, up_name), transposed)
    w_down = _as_linear_weight(getattr(experts, down_name), transposed)
    has_bias = bool(getattr(experts, "has_bias", False))
    b_up = getattr(experts, f"{up_name}_bias", None) if has_bias else None
    b_down = getattr(experts, f"{down_name}_bias", None) if has_bias else None
    x = hidden_states
    M, k = top_k_index.shape
    if routing is None:
        L = next(iter(slots.values())).num_slots if slots else 0
        routing = MoERouting(top_k_index, w_up.shape[0], adapter_ids=adapter_ids, num_adapters=L,
                             block_m=pick_block_m(top_k_index.numel(), w_up.shape[0]))
    groups = dict(routing=routing, backend=backend)
    h = moe_lora_linear(x, w_up, None, None, 1.0, top_k_index, None, b_up, **groups)
    if up_name in slots:
        slots[up_name].apply(h, x, top_k_index, adapter_ids, **groups)
    h = experts._apply_gate(h) if getattr(experts, "has_gate", up_name == "gate_up_proj") else experts.act_fn(h)
    o = moe_lora_linear(h, w_down, None, None, 1.0, top_k_index, top_k_weights, b_down, **groups)
    if down_name in slots:
        slots[down_name].apply(o, h, top_k_index, adapter_ids, top_k_weights, **groups)
    return o.view(M, k, -1).sum(1, dtype=torch.float32).to(x.dtype)
