"""CUDA-extension launchers: compose the extension's kernel ops (declared in ``_library.py``, implemented
in ``csrc/``) into the public ops. Inputs were validated by the caller; nothing here knows about modules."""

from __future__ import annotations

import torch


# Tokens from which a batch with a LoRABatchMeta takes the grouped launch (tokens sorted by adapter, 8 of one
# adapter per block, so each adapter's weights are read once per 8 tokens) instead of one token per block:
# the launchers' own multi-token cut (M >= 64). Not yet tuned on a GPU.
GROUPED_MIN_TOKENS = 64


def add_lora_cuda(y, x, lora_a, lora_b, adapter_ids, scales, ranks, meta=None):
    """add_lora_ on the CUDA extension: one shrink (fp32 xa) and one in-place expand per slice; grouped by
    adapter through ``meta`` (serving.LoRABatchMeta of these ids) when it is given and the batch is long."""
    ops = torch.ops.lora_kernels
    scales32 = scales.to(torch.float32)
    grouped = ()
    if meta is not None and x.shape[0] >= GROUPED_MIN_TOKENS:
        grouped = (meta.sorted_token_ids, meta.tiles, meta.block_m)
    col = 0
    for a, b in zip(lora_a, lora_b):
        xa = ops.cuda_multi_lora_shrink(x, a, adapter_ids, ranks, *grouped)
        ops.cuda_multi_lora_expand_(y, xa, b, adapter_ids, scales32, ranks, col, *grouped)
        col += b.shape[1]


def lora_linear_fwd_cuda(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed):
    """lora_linear_fwd on the CUDA extension (x 2-D [M, K]): returns (y [M, N] x.dtype, xa [M, r] fp32).

    Shrink kernel (dropout fused) + cuBLAS base GEMM (+ bias) + in-place expand kernel; see
    csrc/lora_linear_torch.cpp for the composition and its numerics."""
    return torch.ops.lora_kernels.cuda_lora_linear_fwd(
        x, weight, lora_a, lora_b, float(scale), bias, float(dropout_p), int(seed)
    )


def lora_linear_bwd_cuda(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask):
    """lora_linear_bwd on the CUDA extension: (dx, dA, dB, dW0), None for a gradient not in output_mask.

    x may be None when neither dA nor dW0 is requested."""
    mask = [bool(v) for v in output_mask]
    grads = torch.ops.lora_kernels.cuda_lora_linear_bwd(
        dy, x, xa, weight, lora_a, lora_b, float(scale), float(dropout_p), int(seed), mask
    )
    return tuple(g if want else None for g, want in zip(grads, mask))


def lora_dropout_cuda(x, dropout_p, seed):
    """``drop(x)`` in fp32 for x [M, K] on the extension (the same mask as reference.dropout_keep_mask)."""
    return torch.ops.lora_kernels.cuda_lora_dropout(x, float(dropout_p), int(seed))
