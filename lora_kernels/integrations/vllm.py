"""vLLM plugin: vLLM's multi-LoRA layers run on lora_kernels' ops.

Switching it on (the plugin ships with the package; installing it changes nothing until the variable is set)::

    pip install vllm "lora_kernels[triton]"
    LORA_KERNELS_VLLM=1 vllm serve <model> --enable-lora --lora-modules a=/path/to/adapter ...

``pyproject.toml`` registers :func:`register` under the ``vllm.general_plugins`` entry point, which vLLM runs in
every process it starts (front end, engine core, workers). With ``LORA_KERNELS_VLLM=1`` it points the platform's
``get_punica_wrapper()`` (the one place vLLM names its PunicaWrapper class) at ``LoRAKernelsPunicaWrapper``: a
subclass of the platform's own wrapper (``PunicaWrapperCPU`` / ``PunicaWrapperGPU`` / ...) whose dense methods
call our ops. The backend is chosen as for every lora_kernels op (``LORA_KERNELS_BACKEND`` or auto).

Every dense method of ``vllm/lora/punica_wrapper/punica_base.py`` and what it becomes:

=========================  ==============================================================  =================
vLLM method                lora_kernels                                                    rows / ids
=========================  ==============================================================  =================
``update_metadata``        vLLM's own bookkeeping (kept: the MoE path reads it), then our   step's tokens
                           -1-padded id buffers and one ``LoRABatchMeta`` for the step
``add_lora_linear``        ``add_lora`` over the packed slices, reusing the step's meta     tokens
``add_lora_logits``        ``add_lora`` on the logits' first N columns (no meta: one call)  sampled rows
``add_lora_embedding``     ``lora_expand_`` (the embedding's shrink is vLLM's row gather)   tokens
``add_shrink``             ``lora_shrink`` per slice, written into vLLM's fp32 buffer       tokens
``add_expand``             ``lora_expand_`` per slice at its column offset                  tokens
``apply_lora_full_linear`` ``lora_shrink`` with the per-request full head, then vLLM's      sampled rows
                           own row selection (``_select_full_linear_output``)
MoE methods                vLLM's platform wrapper, unchanged (logged once)                 -
=========================  ==============================================================  =================

(``add_lora_linear`` / ``add_lora_logits`` fall back to ``lora_shrink`` + ``lora_expand_`` when x and y differ
in dtype, e.g. an fp32 lm_head; ``add_inputs=False`` zeroes the rows that have an adapter before adding.)

Embedding and lm_head LoRA: vLLM calls ``add_lora_embedding`` with the A rows it has already gathered itself
(``F.embedding`` over its ``lora_a_stacked_2d`` with per-token offsets), never with the token ids, so only the
expand is left to do and it stays ``lora_expand_``. The fused gather + expand, ``lora_kernels.add_lora_embedding``
(token ids, stacked A [L, r, V], B [L, D, r], ids -1 = none), is for stacks that pass token ids. ``add_lora_logits``
is a plain linear LoRA on the sampled hidden rows (A [L, r, hidden], B [L, vocab, r]), i.e. ``add_lora``.

MoE: vLLM's CPU build implements none of the four MoE methods (``PunicaWrapperCPU`` inherits
``NotImplementedError``) and no CPU experts class supports LoRA, so no MoE model with LoRA runs there and a mapping
could not be tested end to end: they stay vLLM's. The same per-pair update over ``[L, E, r, K]`` slots is
``lora_kernels.add_moe_lora``, tested against vLLM's own fused MoE-LoRA kernel (``tests/test_moe_lora.py``).

Ids: vLLM marks a row without an adapter with -1 and our ops skip such rows. (vLLM's own torch ops on the CPU
index the stacked weights with the id, so -1 reads the last slot: when every slot is in use, requests without an
adapter get the last adapter's update. This wrapper does not have that defect.) When a forward sees more rows
than the step's mapping (a batch padded to a captured CUDA-graph size), the extra rows read -1 from the padded id
buffer (capacity ``max_num_batched_tokens``, fixed addresses, updated in place), so they are skipped; the meta is
updated in place too, so a captured graph replays with the new step's grouping.

Ranks: vLLM zero-pads every adapter to ``max_lora_rank``, and there is no hook through which the PunicaWrapper
sees an adapter's rank: the ``LoRAModelManager`` builds the wrapper (from ``max_num_batched_tokens``,
``max_batches``, ``device``, ``lora_config``) before any adapter exists, ``activate_adapter`` copies each
adapter's weights into the layers' stacked tensors (``set_lora``) without telling the wrapper, and
``update_metadata`` receives only the slot -> adapter-id list. So the wrapper reads the ranks off the stacked
weights: a slot's rank is 1 + the last rank column that is nonzero in that layer's A or B (over all slices),
recomputed only when one of those tensors' version counters moved (``set_lora`` / ``reset_lora`` write in
place, which bumps it). The columns it drops are zero in the weights, so the result equals the padded
computation; the ops then work only up to each adapter's own rank. Where that is not possible the ranks are
``None`` (max-rank padding, still correct): stacked tensors created under ``torch.inference_mode`` (no version
counter; logged once) and while ``torch.compile`` traces the model (the meta is not used there either).

Host reads: each ``add_lora`` / ``lora_shrink`` / ``lora_expand_`` call validates the ids with one device->host
read (free on the CPU; skipped inside CUDA-graph capture and torch.compile). For eager GPU serving,
``LORA_KERNELS_CHECK_DATA=0`` removes them. Tested end to end with ``enforce_eager=True`` on the CPU build of
vLLM 0.32 (``tests/test_vllm_e2e.py``); CUDA graphs and torch.compile have not run on a GPU yet.

This module imports vLLM only inside functions, so it imports (and its helpers are testable) without vLLM.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Sequence, Tuple

import torch

from .. import _backend
from ..functional import add_lora, lora_expand_, lora_shrink
from ..ops.multi_lora import LoRABatchMeta

__all__ = ["ENV", "WRAPPER_QUALNAME", "register", "enabled", "make_wrapper_class", "effective_ranks"]

ENV = "LORA_KERNELS_VLLM"
WRAPPER_QUALNAME = f"{__name__}.LoRAKernelsPunicaWrapper"
MOE_METHODS = ("moe_lora_align_block_size", "add_lora_fused_moe", "add_lora_w13", "add_lora_w2")

# vLLM configures the "vllm" logger; a child of it prints in vLLM's format from every engine process.
log = logging.getLogger("vllm.lora_kernels")

_state: Dict[str, object] = {"base": None, "announced": False, "moe_noted": False, "no_version": False}
_classes: Dict[type, type] = {}


def enabled() -> bool:
    """Whether ``LORA_KERNELS_VLLM`` switches the plugin on (1 / true / yes / on)."""
    return os.environ.get(ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def register() -> None:
    """The ``vllm.general_plugins`` entry point (runs in every vLLM process). A no-op unless ``LORA_KERNELS_VLLM=1``;
    otherwise it makes the current platform name ``LoRAKernelsPunicaWrapper`` as its PunicaWrapper. Idempotent."""
    if not enabled():
        return
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    current = platform_cls.get_punica_wrapper()
    if current == WRAPPER_QUALNAME:
        return
    _state["base"] = current
    platform_cls.get_punica_wrapper = classmethod(lambda cls: WRAPPER_QUALNAME)
    log.info("lora_kernels: %s=1, LoRA layers run on lora_kernels ops (PunicaWrapper %s over %s)", ENV,
             WRAPPER_QUALNAME, current)


def _base_class() -> type:
    from vllm.utils.import_utils import resolve_obj_by_qualname

    base = _state["base"]
    if base is None:  # imported without register() (e.g. by a test): the platform's own wrapper
        from vllm.platforms import current_platform

        base = current_platform.get_punica_wrapper()
        if base == WRAPPER_QUALNAME:  # pragma: no cover - register() always records the base first
            raise RuntimeError("lora_kernels: the platform's original PunicaWrapper is unknown")
    return resolve_obj_by_qualname(base)


def __getattr__(name: str):
    # vLLM resolves WRAPPER_QUALNAME with import_module + getattr: the class is built on first access, over the
    # platform wrapper that register() replaced (so this module itself imports without vLLM).
    if name == "LoRAKernelsPunicaWrapper":
        cls = make_wrapper_class(_base_class())
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_wrapper_class(base: type) -> type:
    """``LoRAKernelsPunicaWrapper`` over ``base`` (a vLLM PunicaWrapper class): dense methods on our ops, the rest
    (MoE) inherited from ``base``. One class per base."""
    cls = _classes.get(base)
    if cls is None:
        cls = type("LoRAKernelsPunicaWrapper", (_LoRAKernelsPunica, base),
                   {"__module__": __name__, "__qualname__": "LoRAKernelsPunicaWrapper"})
        _classes[base] = cls
    return cls


# ------------------------------------------------------------------------------------------------
# helpers (no vLLM needed)
# ------------------------------------------------------------------------------------------------


def _slots(t: torch.Tensor, what: str) -> torch.Tensor:
    """vLLM's stacked [L, 1, a, b] weights as [L, a, b] (a view)."""
    if t.dim() == 4:
        if t.shape[1] != 1:
            raise ValueError(f"lora_kernels: {what} must be [L, 1, a, b] as vLLM stacks it, got {list(t.shape)}")
        return t.select(1, 0)
    if t.dim() != 3:
        raise ValueError(f"lora_kernels: {what} must be [L, 1, a, b] or [L, a, b], got {list(t.shape)}")
    return t


def _rows(y: torch.Tensor) -> torch.Tensor:
    """y as [rows, features], a view (the ops write through it)."""
    return y if y.dim() == 2 else y.view(-1, y.shape[-1])


def _rank_extent(t: torch.Tensor, rank_last: bool) -> torch.Tensor:
    """[L] int32: 1 + the last rank index holding a nonzero weight in slot i (0 for an all-zero slot).
    ``t`` is [L, 1, r, K] / [L, r, K] (A, rank second to last) or [L, 1, N, r] / [L, N, r] (B, rank last)."""
    w = _slots(t, "a stacked LoRA weight")
    nz = w.ne(0).any(dim=1) if rank_last else w.ne(0).any(dim=2)  # [L, r]
    r = nz.shape[1]
    pos = torch.arange(1, r + 1, dtype=torch.int32, device=nz.device)
    return (nz.to(torch.int32) * pos).amax(dim=1) if r > 0 else torch.zeros(nz.shape[0], dtype=torch.int32,
                                                                             device=nz.device)


def effective_ranks(lora_a: Sequence[torch.Tensor] = (), lora_b: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """[L] int32 per-slot ranks of zero-padded stacked weights: 1 + the last rank column that is nonzero in any A
    (rank second to last) or B (rank last). Columns past it are zero in every given weight, so an op limited to
    these ranks gives the result of the padded computation."""
    exts = [_rank_extent(a, rank_last=False) for a in lora_a] + [_rank_extent(b, rank_last=True) for b in lora_b]
    out = exts[0]
    for e in exts[1:]:
        out = torch.maximum(out, e)
    return out


def _zero_adapted_rows(y2: torch.Tensor, ids: torch.Tensor, col: int, n: int) -> None:
    """add_inputs=False: the window of rows that have an adapter starts from 0 (rows without one are untouched,
    as in vLLM's kernels)."""
    y2[:, col:col + n].masked_fill_((ids >= 0).unsqueeze(1), 0)


def _announce(base: type) -> None:
    if not _state["announced"]:
        _state["announced"] = True
        be = os.environ.get(_backend.ENV_BACKEND) or "auto"
        log.info("lora_kernels: dense LoRA (linear, embedding, logits, shrink/expand, full heads) on lora_kernels ops "
                 "(backend %s); MoE LoRA stays on vLLM's %s", be, base.__name__)


class _LoRAKernelsPunica:
    """The dense PunicaWrapper methods on lora_kernels' ops (mixed in before the platform's wrapper class)."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        cfg = kwargs.get("lora_config")
        self._lk_slots: Optional[int] = int(cfg.max_loras) if cfg is not None else None
        self._lk_capacity = int(max_num_batched_tokens)
        dev = torch.device(device)
        # -1-padded copies of vLLM's index buffers: rows past the step's mapping (padded batches) read -1.
        self._lk_token_ids = torch.full((self._lk_capacity,), -1, dtype=torch.int64, device=dev)
        self._lk_sampler_ids = torch.full((self._lk_capacity,), -1, dtype=torch.int64, device=dev)
        self._lk_meta: Optional[LoRABatchMeta] = None
        self._lk_rank_cache: Dict[Tuple, Tuple[Tuple[int, ...], torch.Tensor]] = {}
        self._lk_scales: Dict[Tuple, torch.Tensor] = {}
        self._lk_use_ranks = True
        self._lk_first_calls: set = set()
        self._lk_active = False  # whether any slot holds an adapter (from update_metadata's slot list)
        self.lk_calls: Dict[str, int] = {}  # method -> calls (for tests and debugging)
        # steps in which every slot held an adapter that a request of the step used, and one request had none
        # (the batches where vLLM's own CPU ops apply the last slot to requests without an adapter)
        self.lk_full_steps_with_base_rows = 0
        base = next(c for c in type(self).__mro__[1:] if c is not _LoRAKernelsPunica)
        _announce(base)

    # ---- per-step state ------------------------------------------------------------------------

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._lk_active = any(i is not None for i in lora_index_to_id)
        used = set(mapping.prompt_mapping)
        if 0 in used and len(used - {0}) == len(lora_index_to_id):
            self.lk_full_steps_with_base_rows += 1
        n_tok, n_smp = int(self.indices_len[0]), int(self.indices_len[1])
        for buf, src, n in ((self._lk_token_ids, self._token_lora_indices, n_tok),
                            (self._lk_sampler_ids, self._sampler_indices, n_smp)):
            buf[:n].copy_(src[:n])
            buf[n:].fill_(-1)
        if self._lk_slots is not None and not torch.compiler.is_compiling():
            if self._lk_meta is None or self._lk_meta.num_adapters != self._lk_slots:
                self._lk_meta = LoRABatchMeta(self._lk_token_ids[:n_tok], self._lk_slots, max_tokens=self._lk_capacity)
            else:
                self._lk_meta.update_(self._lk_token_ids[:n_tok])
        self._count("update_metadata")

    def _lk_ids(self, which: str, rows: int) -> torch.Tensor:
        buf = self._lk_token_ids if which == "token" else self._lk_sampler_ids
        if rows > buf.shape[0]:
            raise ValueError(f"lora_kernels: {rows} rows exceed the wrapper's capacity of {buf.shape[0]} "
                             "(max_num_batched_tokens)")
        return buf[:rows]

    def _lk_meta_for(self, rows: int, num_slots: int) -> Optional[LoRABatchMeta]:
        """The step's meta (built in update_metadata), re-described for a padded row count if the forward has one."""
        meta = self._lk_meta
        if meta is None or meta.num_adapters != num_slots or torch.compiler.is_compiling():
            return None
        if meta.num_tokens != rows:
            meta.update_(self._lk_ids("token", rows))  # the padding rows are -1: same grouping, new row count
        return meta

    def _lk_ranks(self, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-slot ranks of these stacked weights (see the module docstring), cached until a weight is rewritten."""
        if not self._lk_use_ranks or torch.compiler.is_compiling():
            return None
        tensors = (*lora_a, *lora_b)
        try:
            versions = tuple(t._version for t in tensors)
        except RuntimeError:  # inference tensors have no version counter: keep vLLM's padding
            self._lk_use_ranks = False
            if not _state["no_version"]:
                _state["no_version"] = True
                log.info("lora_kernels: the stacked LoRA weights are inference tensors (no version counter); "
                         "using vLLM's max-rank padding")
            return None
        key = (len(lora_a),) + tuple((id(t), t.data_ptr()) for t in tensors)
        hit = self._lk_rank_cache.get(key)
        if hit is not None and hit[0] == versions:
            return hit[1]
        ranks = effective_ranks(lora_a, lora_b)
        self._lk_rank_cache[key] = (versions, ranks)
        return ranks

    def _lk_scale_vec(self, num_slots: int, scale: float, device) -> torch.Tensor:
        key = (num_slots, float(scale), str(device))
        t = self._lk_scales.get(key)
        if t is None:
            t = self._lk_scales[key] = torch.full((num_slots,), float(scale), dtype=torch.float32, device=device)
        return t

    def _count(self, method: str, op: Optional[str] = None, tensors=(), rows: int = 0, ranks=None, extra="") -> None:
        """Count the call; on a method's first call with an adapter loaded (per LORA_KERNELS_BACKEND value), log
        which op and backend it ran on."""
        self.lk_calls[method] = self.lk_calls.get(method, 0) + 1
        key = (method, os.environ.get(_backend.ENV_BACKEND))
        if op is not None and self._lk_active and key not in self._lk_first_calls:
            self._lk_first_calls.add(key)
            log.info("lora_kernels: first %s call: %s on backend %s, %d rows, ranks %s%s", method, op,
                     _backend.resolve_backend(op, *tensors), rows, "padded" if ranks is None else ranks.tolist(),
                     extra)

    def _lk_linear(self, y2, x2, A, B, ids, scale, ranks, meta) -> str:
        """y2 += scale·(x2·Aᵀ)·Bᵀ per row over packed slices; returns the public op used."""
        L = A[0].shape[0]
        scales = self._lk_scale_vec(L, scale, y2.device)
        if x2.dtype == y2.dtype:
            add_lora(y2, x2, A, B, ids, scales, ranks, meta=meta)
            return "add_lora"
        col = 0
        for a, b in zip(A, B):
            xa = lora_shrink(x2, a, ids, 1.0, ranks)
            lora_expand_(y2, xa, b, ids, scales, ranks, col)
            col += b.shape[1]
        return "lora_expand"

    # ---- the dense PunicaWrapper methods -------------------------------------------------------

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        add_inputs = kwargs.pop("add_inputs", True)
        y2 = _rows(y)
        x2 = x.reshape(-1, x.shape[-1])
        A = [_slots(a, "lora_a_stacked") for a in lora_a_stacked]
        B = [_slots(b, "lora_b_stacked") for b in lora_b_stacked]
        widths = [b.shape[1] for b in B]
        if list(output_slices) != widths:
            raise ValueError(f"lora_kernels: output_slices {list(output_slices)} != lora_b widths {widths}")
        ids = self._lk_ids("token", x2.shape[0])
        if not add_inputs:
            _zero_adapted_rows(y2, ids, 0, sum(widths))
        ranks = self._lk_ranks(lora_a_stacked, lora_b_stacked)
        meta = self._lk_meta_for(x2.shape[0], A[0].shape[0])
        op = self._lk_linear(y2, x2, A, B, ids, scale, ranks, meta)
        self._count("add_lora_linear", op, (y2, x2, *A, *B), x2.shape[0], ranks,
                    f", slices {widths}, meta {meta is not None}")
        return y

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        y2 = _rows(y)
        x2 = x.reshape(-1, x.shape[-1])
        a = _slots(lora_a_stacked, "lora_a_stacked")
        b = _slots(lora_b_stacked, "lora_b_stacked")
        n = min(b.shape[1], y2.shape[1])  # logits may be padded past the vocabulary (vLLM's CPU ops do the same)
        ids = self._lk_ids("sampler", x2.shape[0])
        ranks = self._lk_ranks((lora_a_stacked,), (lora_b_stacked,))
        op = self._lk_linear(y2[:, :n], x2, [a], [b[:, :n]], ids, scale, ranks, None)
        self._count("add_lora_logits", op, (y2, x2, a, b), x2.shape[0], ranks, f", {n} logit columns")
        return y

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        y2 = _rows(y)
        x2 = x.reshape(-1, x.shape[-1])
        b = _slots(lora_b_stacked, "lora_b_stacked")
        ids = self._lk_ids("token", x2.shape[0])
        if not add_inputs:
            _zero_adapted_rows(y2, ids, 0, b.shape[1])
        ranks = self._lk_ranks((), (lora_b_stacked,))
        ones = self._lk_scale_vec(b.shape[0], 1.0, y2.device)
        lora_expand_(y2, x2, b, ids, ones, ranks, 0)
        self._count("add_lora_embedding", "lora_expand", (y2, x2, b), x2.shape[0], ranks)
        return y

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        x2 = x.reshape(-1, x.shape[-1])
        ids = self._lk_ids("token", x2.shape[0])
        for s, a_st in enumerate(lora_a_stacked):
            a = _slots(a_st, f"lora_a_stacked[{s}]")
            ranks = self._lk_ranks((a_st,), ())
            xa = lora_shrink(x2, a, ids, scale, ranks)
            y[s].copy_(xa.view(y[s].shape))
        self._count("add_shrink", "lora_shrink", (x2, a), x2.shape[0], ranks)
        return y

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kwargs):
        y2 = _rows(y)
        ids = self._lk_ids("token", y2.shape[0])
        col = int(offset_start)
        for s, b_st in enumerate(lora_b_stacked):
            b = _slots(b_st, f"lora_b_stacked[{s}]")
            if b.shape[1] != output_slices[s]:
                raise ValueError(f"lora_kernels: output_slices[{s}]={output_slices[s]} != lora_b width {b.shape[1]}")
            xs = x[s].reshape(-1, x[s].shape[-1])
            if not add_inputs:
                _zero_adapted_rows(y2, ids, col, b.shape[1])
            ranks = self._lk_ranks((), (b_st,))
            lora_expand_(y2, xs, b, ids, self._lk_scale_vec(b.shape[0], 1.0, y2.device), ranks, col)
            col += b.shape[1]
        self._count("add_expand", "lora_expand", (y2, xs, b), y2.shape[0], ranks)
        return y

    def apply_lora_full_linear(self, y, x, weight_stacked, bias_stacked, module_enabled):
        x2 = x.reshape(-1, x.shape[-1])
        w = _slots(weight_stacked, "weight_stacked")
        ids = self._lk_ids("sampler", x2.shape[0])
        adapter_y = lora_shrink(x2, w, ids, 1.0, None)  # x·W_iᵀ per row (0 for rows without an adapter)
        y.copy_(self._select_full_linear_output(y, adapter_y, bias_stacked, module_enabled))
        self._count("apply_lora_full_linear", "lora_shrink", (x2, w), x2.shape[0])
        return y

    # ---- MoE: vLLM's path ------------------------------------------------------------------------

    def _moe(self, method: str):
        if not _state["moe_noted"]:
            _state["moe_noted"] = True
            log.info("lora_kernels: MoE LoRA (%s, ...) runs on vLLM's own PunicaWrapper kernels", method)
        self._count(method)
        return getattr(super(), method)

    def moe_lora_align_block_size(self, *args, **kwargs):
        return self._moe("moe_lora_align_block_size")(*args, **kwargs)

    def add_lora_fused_moe(self, *args, **kwargs):
        return self._moe("add_lora_fused_moe")(*args, **kwargs)

    def add_lora_w13(self, *args, **kwargs):
        return self._moe("add_lora_w13")(*args, **kwargs)

    def add_lora_w2(self, *args, **kwargs):
        return self._moe("add_lora_w2")(*args, **kwargs)
