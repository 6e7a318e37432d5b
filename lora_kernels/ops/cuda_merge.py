"""CUDA-extension launchers of the merge ops (kernels in ``csrc/merge.cu``, glue in ``csrc/merge_torch.cpp``,
schemas/fakes of ``cuda_merge_`` / ``cuda_merge_exact_`` in ``_library.py``). Inputs were validated by the caller.

The CUDA kernel has one fixed tiling (TILE_N × TILE_K, below), so a merge record from this backend needs no
config: the exact unmerge replays the same kernel and gets the same Δ bit-for-bit.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ._operands import collect_repair_list, concat_adapters

# Must match kMergeTileN / kMergeTileK in csrc/merge.h (the Python side sizes the overflow-tile buffer with them).
TILE_N = 32
TILE_K = 128


def has_exact_kernel() -> bool:
    """Whether the loaded extension implements ``cuda_merge_exact_`` (older builds may not)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("lora_kernels::cuda_merge_exact_", "CUDA")
    except Exception:
        return False


def merge_cuda(weight, lora_a, lora_b, scales) -> None:
    """In place ``W ← round(W + Σᵢ sᵢ·Bᵢ·Aᵢ)`` with the fused CUDA kernel (fp32 on chip, rounded once)."""
    if weight.numel() == 0:
        return
    a, b, rank_starts, scale_t = concat_adapters(weight, lora_a, lora_b, scales)
    torch.ops.lora_kernels.cuda_merge_(weight, a, b, rank_starts, scale_t)


def merge_exact_cuda(weight, lora_a, lora_b, scales, capacity=None) -> Tuple[torch.Tensor, torch.Tensor, int, None]:
    """:func:`merge_cuda` + the exact unmerge's repair list (same contract as triton.merge.merge_exact_triton)."""
    N, K = weight.shape
    a, b, rank_starts, scale_t = concat_adapters(weight, lora_a, lora_b, scales)
    n_tiles = -(-N // TILE_N) * -(-K // TILE_K)

    def run_pass(counters, rec_idx, rec_bits, ovf_tiles, tile_ids):
        torch.ops.lora_kernels.cuda_merge_exact_(
            weight, a, b, rank_starts, scale_t, counters, rec_idx, rec_bits, ovf_tiles, tile_ids
        )

    index, bits, n_nonfinite = collect_repair_list(weight, n_tiles, run_pass, "merge_exact_cuda", capacity)
    return index, bits, n_nonfinite, None
