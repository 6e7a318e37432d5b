"""nn.Module API for LoRA on a 2-D convolution: :class:`LoRAConv2d` (PEFT's ``lora.Conv2d`` layout).

LoRA as a conv pair, im2col-free: ``y = conv(x, W) + s·conv1x1(conv(x, A), B)`` with A [r, C_in, kh, kw] (the base's
kernel, stride and padding) and B [C_out, r, 1, 1], both run by torch's own convolutions (no kernel of ours: the
r-wide intermediate is an activation of r channels). Merge / unmerge go through the exact merge on the
[C_out, C_in·kh·kw] view of the kernel: ``W += s·B[:, :, 0, 0]·A.view(r, -1)``, bit-exact on unmerge.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from ._checks import LoRAInputError, init_lora_settings
from .exact_merge import MergeRecord, merge_exact_, unmerge_exact_
from .functional import merge_, unmerge_

__all__ = ["LoRAConv2d"]


class LoRAConv2d(nn.Module):
    """A frozen ``nn.Conv2d`` plus a trainable low-rank conv pair: ``y = base(x) + s·B ∗ (A ∗ drop(x))``.

    Wraps ``base`` without copying (``self.weight`` / ``self.bias`` are its Parameters); ``lora_A`` [r, C_in, kh, kw]
    is Kaiming-uniform (a=√5) and ``lora_B`` [C_out, r, 1, 1] zero, PEFT's names, shapes and initialisation, so PEFT's
    ``lora_A.weight`` / ``lora_B.weight`` keys load as they are. Supported: ``groups == 1``, ``dilation == 1`` and
    ``padding_mode == "zeros"`` (ValueError otherwise: PEFT's A conv ignores dilation and cannot merge groups).
    Dropout (``nn.functional.dropout`` on the A branch input, torch's RNG) as in PEFT.

    Args: as :class:`lora_kernels.LoRALinear`.
    """

    def __init__(
        self,
        base: nn.Conv2d,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: Optional[str] = None,
        merge_on_eval: bool = False,
        lora_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps an nn.Conv2d, got {type(base).__name__}")
        why = self.unsupported(base)
        if why:
            raise ValueError(f"LoRAConv2d: {why}")
        init_lora_settings(self, "LoRAConv2d", r, alpha, dropout, use_rslora, backend, merge_on_eval)
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self.kernel_size = tuple(base.kernel_size)
        self.stride, self.padding = base.stride, base.padding
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        dt = lora_dtype or base.weight.dtype
        dev = base.weight.device
        kh, kw = base.kernel_size
        self.lora_A = nn.Parameter(torch.empty(r, base.in_channels, kh, kw, dtype=dt, device=dev))
        self.lora_B = nn.Parameter(torch.empty(base.out_channels, r, 1, 1, dtype=dt, device=dev))
        self.merged = False
        self._merge_record: Optional[MergeRecord] = None
        self.tied_to: Tuple[str, ...] = ()
        self.reset_lora_parameters()

    @staticmethod
    def unsupported(base: nn.Conv2d) -> str:
        """Why ``base`` cannot take a LoRAConv2d ("" when it can)."""
        if base.groups != 1 or tuple(base.dilation) != (1, 1) or base.padding_mode != "zeros":
            return (f"supports groups=1, dilation=1, padding_mode='zeros'; got groups={base.groups}, "
                    f"dilation={tuple(base.dilation)}, padding_mode={base.padding_mode!r}")
        if not base.weight.is_contiguous():
            return "the kernel must be contiguous (merges go through its [C_out, C_in·kh·kw] view)"
        return ""

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=√5), B = 0 (PEFT)."""
        if self.merged:
            raise RuntimeError("LoRAConv2d: unmerge() before re-initialising the adapter")
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        F = nn.functional
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        if self.merged:
            return y
        a, b = self.lora_A, self.lora_B
        xl = x.to(a.dtype)
        if self.training and self.dropout > 0.0:
            xl = F.dropout(xl, self.dropout)
        lora = F.conv2d(F.conv2d(xl, a, None, self.stride, self.padding), b)
        return y + (lora * self.scale).to(y.dtype)

    def _views(self):
        """(W [C_out, C_in·kh·kw], A [r, C_in·kh·kw], B [C_out, r]): views, the merge ops' layout."""
        return (self.weight.view(self.out_features, -1), self.lora_A.view(self.r, -1),
                self.lora_B.view(self.out_features, self.r))

    @torch.no_grad()
    def merge(self, allow_tied: bool = False) -> None:
        """Fold ``s·B·A`` into the kernel in place (exact merge: :meth:`unmerge` restores it bit for bit)."""
        from .embedding import tied_merge_guard

        if self.merged:
            raise RuntimeError("LoRAConv2d.merge(): the adapter is already merged; unmerge() first")
        tied_merge_guard("LoRAConv2d", self.tied_to, allow_tied)
        w, a, b = self._views()
        self._merge_record = merge_exact_(w, a, b, self.scale, backend=self.backend)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("LoRAConv2d.unmerge(): the adapter is not merged")
        w, a, b = self._views()
        try:
            if self._merge_record is None:
                raise LoRAInputError("no merge record")
            unmerge_exact_(w, self._merge_record)
        except LoRAInputError as e:
            warnings.warn(f"LoRAConv2d.unmerge(): exact unmerge impossible ({e}); subtracting the adapter with the "
                          "plain unmerge instead", RuntimeWarning, stacklevel=2)
            unmerge_(w, a, b, self.scale, backend=self.backend)
        self._merge_record = None
        self.merged = False

    @torch.no_grad()
    def unload_module(self, merge: bool) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding this layer's kernel and bias Parameters (the same objects), for
        ``lora_kernels.merge_and_unload`` / ``unload``: with ``merge`` the adapter folded in (one rounding; a layer
        already merged keeps its merged kernel), else the base kernel (an exact unmerge if merged)."""
        if merge and not self.merged:
            w, a, b = self._views()
            merge_(w, a, b, self.scale, backend=self.backend)
        elif not merge and self.merged:
            self.unmerge()
        self._merge_record = None
        conv = nn.Conv2d(self.in_features, self.out_features, self.kernel_size, self.stride, self.padding,
                         bias=self.bias is not None, device="meta")
        conv.weight = self.weight
        conv.bias = self.bias
        return conv

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_on_eval:
            if mode and self.merged:
                self.unmerge()
            elif not mode and not self.merged:
                self.merge()
        return self

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_features}, out_channels={self.out_features}, kernel={tuple(self.lora_A.shape[2:])}, "
                f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}, merged={self.merged}")
