"""CUDA-extension launchers: compose the extension's kernel ops (declared in ``_library.py``, implemented
in ``csrc/``) into the public ops. Inputs were validated by the caller; nothing here knows about modules."""

from __future__ import annotations

import torch


def add_lora_cuda(y, x, lora_a, lora_b, adapter_ids, scales, ranks):
    """add_lora_ on the CUDA extension: one shrink (fp32 xa) and one in-place expand per slice."""
    ops = torch.ops.lora_kernels
    scales32 = scales.to(torch.float32)
    col = 0
    for a, b in zip(lora_a, lora_b):
        xa = ops.cuda_multi_lora_shrink(x, a, adapter_ids, ranks)
        ops.cuda_multi_lora_expand_(y, xa, b, adapter_ids, scales32, ranks, col)
        col += b.shape[1]
