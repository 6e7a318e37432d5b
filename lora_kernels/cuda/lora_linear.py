"""CUDA-extension launchers of the LoRA linear layer (kernel ops ``cuda_lora_linear_fwd`` / ``_bwd``, declared in
``ops/lora_linear.py``, implemented in ``csrc/lora_linear.cu`` + ``csrc/lora_linear_torch.cpp``)."""

from __future__ import annotations

import torch


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
