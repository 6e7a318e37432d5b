"""CUDA-extension launchers of ``lora_shrink`` / ``lora_expand_``: the extension's multi-adapter kernels
``cuda_multi_lora_shrink`` / ``cuda_multi_lora_expand_`` (declared in ``ops/multi_lora.py``, implemented in
``csrc/multi_lora.cu`` + ``csrc/multi_lora_torch.cpp``), which are exactly these two halves; the per-token
launch (no tile table)."""

from __future__ import annotations

import torch


def lora_shrink_cuda(x, lora_a, adapter_ids, scale, ranks):
    """fp32 xa [M, r_max]; the kernel computes x·Aᵀ (0 past each rank and for ids outside [0, L)), the scale is one
    fp32 multiply on the r-wide result (the same rounding as the Triton kernel's ``acc * scale``)."""
    xa = torch.ops.lora_kernels.cuda_multi_lora_shrink(x, lora_a, adapter_ids, ranks)
    if scale != 1.0:
        xa.mul_(scale)
    return xa


def lora_expand_cuda(y, xa, lora_b, adapter_ids, scales, ranks, col_offset):
    """In place on y's columns [col_offset, col_offset + N); the kernel takes fp32 xa (a 16-bit xa is widened,
    which is exact)."""
    if xa.dtype != torch.float32:
        xa = xa.to(torch.float32)
    torch.ops.lora_kernels.cuda_multi_lora_expand_(y, xa, lora_b, adapter_ids, scales.to(torch.float32), ranks,
                                                   int(col_offset))
