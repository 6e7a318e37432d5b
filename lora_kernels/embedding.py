"""nn.Module API for LoRA on an embedding table: :class:`LoRAEmbedding` (PEFT's ``lora.Embedding`` layout).

The module calls only the functional API (``lora_embedding``, ``merge_exact_`` / ``unmerge_exact_``); the gather
fused into the shrink lives in ``ops/embedding.py`` and its launchers.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from ._checks import LoRAInputError, init_lora_settings
from ._merge_state import MergeRecordState
from .exact_merge import MergeRecord, merge_exact_, unmerge_exact_
from .functional import lora_embedding, unmerge_

__all__ = ["LoRAEmbedding", "tied_merge_guard"]


def tied_merge_guard(cls_name: str, tied_to: Tuple[str, ...], allow_tied: bool) -> None:
    """Refuse (LoRAInputError) or, with ``allow_tied``, warn about merging into a weight another module shares."""
    if not tied_to:
        return
    msg = (f"the weight is tied to {', '.join(tied_to)}, so merging changes that parameter too (the adapter would then "
           "also act on it)")
    if not allow_tied:
        raise LoRAInputError(f"{cls_name}.merge(): {msg}. Untie it first (e.g. module.weight = "
                             "nn.Parameter(module.weight.detach().clone())), keep the adapter unmerged, or pass "
                             "allow_tied=True to merge anyway")
    warnings.warn(f"{cls_name}.merge(allow_tied=True): {msg}", UserWarning, stacklevel=3)


class LoRAEmbedding(MergeRecordState, nn.Module):  # record under deepcopy / in state dicts
    """A frozen ``nn.Embedding`` plus a trainable low-rank update: ``y = W[ids] + s·A[:, ids]ᵀ·Bᵀ``.

    Wraps ``base`` without copying: ``self.weight`` is base's own Parameter (frozen), and the adapter is
    ``lora_embedding_A`` [r, V] and ``lora_embedding_B`` [D, r], PEFT's names, layout and initialisation (A = 0,
    B ~ N(0, 1), so a fresh layer equals the base). The token's column of A is gathered inside the kernel that
    expands it with B and adds the base row (``lora_kernels.lora_embedding``).

    ``padding_idx`` and ``scale_grad_by_freq`` act as in ``nn.Embedding`` (and PEFT): padding tokens give A no
    gradient. ``max_norm`` (which renormalises the table in place on every lookup) and ``sparse`` gradients are not
    supported (ValueError); neither is an embedding subclass with its own ``forward`` (e.g. a scaled embedding).
    ``dropout`` is accepted for ``inject_lora``'s sake and, as in PEFT's embedding LoRA, not applied.

    Args: as :class:`lora_kernels.LoRALinear` (``base``, ``r``, ``alpha``, ``dropout``, ``use_rslora``, ``backend``,
    ``merge_on_eval``, ``lora_dtype``).
    """

    def __init__(
        self,
        base: nn.Embedding,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: Optional[str] = None,
        merge_on_eval: bool = False,
        lora_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base).__name__}")
        if type(base).forward is not nn.Embedding.forward:
            raise TypeError(f"LoRAEmbedding: {type(base).__name__} overrides nn.Embedding.forward (e.g. a scaled "
                            "embedding); only the plain lookup W[ids] is supported")
        if base.max_norm is not None:
            raise ValueError("LoRAEmbedding: nn.Embedding(max_norm=...) renormalises the table in place on every lookup; "
                             "not supported")
        if base.sparse:
            raise ValueError("LoRAEmbedding: nn.Embedding(sparse=True) is not supported (the gradients are dense)")
        init_lora_settings(self, "LoRAEmbedding", r, alpha, dropout, use_rslora, backend, merge_on_eval)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.weight = base.weight
        self.weight.requires_grad_(False)
        dt = lora_dtype or base.weight.dtype
        dev = base.weight.device
        self.lora_embedding_A = nn.Parameter(torch.empty(r, self.num_embeddings, dtype=dt, device=dev))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, dtype=dt, device=dev))
        self.merged = False
        self._merge_record: Optional[MergeRecord] = None
        self.tied_to: Tuple[str, ...] = ()  # other names of self.weight in the model (set by inject_lora)
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:  # PEFT's names for an embedding's V and D
        return self.num_embeddings

    @property
    def out_features(self) -> int:
        return self.embedding_dim

    # The LoRALinear names, so code written for LoRALinear (lora_state_dict's "lora_" filter, peft_io) reads both.
    @property
    def lora_A(self) -> nn.Parameter:
        return self.lora_embedding_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.lora_embedding_B

    def reset_lora_parameters(self) -> None:
        """A = 0, B ~ N(0, 1) (PEFT / loralib for embeddings)."""
        if self.merged:
            raise RuntimeError("LoRAEmbedding: unmerge() before re-initialising the adapter")
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.embedding(ids, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq)
        return lora_embedding(ids, self.weight, self.lora_embedding_A, self.lora_embedding_B, self.scale,
                              padding_idx=self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq,
                              backend=self.backend)

    def _weight_t(self) -> torch.Tensor:
        """Wᵀ [D, V], a view: the merge ops' [N, K] layout for B [D, r]·A [r, V] (no copy of the table)."""
        return self.weight.t()

    @torch.no_grad()
    def merge(self, allow_tied: bool = False) -> None:
        """Fold ``scale·(B·A)ᵀ`` into the table in place (fp32 accumulate, one rounding), exactly reversible by
        :meth:`unmerge` (``lora_kernels.merge_exact_`` on the transposed view; the record is kept on the module).
        A table tied to another module (an lm_head) is refused unless ``allow_tied`` (then with a warning)."""
        if self.merged:
            raise RuntimeError("LoRAEmbedding.merge(): the adapter is already merged; unmerge() first")
        tied_merge_guard("LoRAEmbedding", self.tied_to, allow_tied)
        self._merge_record = merge_exact_(self._weight_t(), self.lora_embedding_A, self.lora_embedding_B, self.scale,
                                          backend=self.backend)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what :meth:`merge` added, restoring the table bit for bit (plain unmerge with a warning when the
        record no longer applies)."""
        if not self.merged:
            raise RuntimeError("LoRAEmbedding.unmerge(): the adapter is not merged")
        record = self._merge_record
        try:
            if record is None:
                raise LoRAInputError("no merge record")
            unmerge_exact_(self._weight_t(), record)
        except LoRAInputError as e:
            warnings.warn(f"LoRAEmbedding.unmerge(): exact unmerge impossible ({e}); subtracting the adapter with the "
                          "plain unmerge instead (the table is restored only up to rounding)", RuntimeWarning,
                          stacklevel=2)
            if record is not None:
                dev = self.weight.device
                unmerge_(self._weight_t(), [t.to(dev) for t in record.lora_a], [t.to(dev) for t in record.lora_b],
                         list(record.scales), backend=self.backend)
            else:
                unmerge_(self._weight_t(), self.lora_embedding_A, self.lora_embedding_B, self.scale,
                         backend=self.backend)
        self._merge_record = None
        self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_on_eval:
            if mode and self.merged:
                self.unmerge()
            elif not mode and not self.merged:
                self.merge()
        return self

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"padding_idx={self.padding_idx}, r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, "
                f"merged={self.merged}")
