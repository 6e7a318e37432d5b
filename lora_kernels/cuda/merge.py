"""CUDA-extension launchers of the merge family (kernel ops ``cuda_merge_`` / ``cuda_merge_exact_``, declared in
``ops/merge.py``, implemented in ``csrc/merge.cu`` + ``csrc/merge_torch.cpp``). Inputs were validated by the caller.

The CUDA kernel has one fixed tiling (TILE_N × TILE_K, below), so a merge record from this backend needs no
config: the exact unmerge replays the same kernel and gets the same Δ bit-for-bit.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops.merge import collect_repair_list, concat_adapters

# kMergeTileN / kMergeTileK of csrc/merge.h (tests/test_cuda_emulated.py checks they agree; the glue also rejects
# an overflow-tile buffer smaller than the kernel's tile count).
TILE_N = 32
TILE_K = 128


def merge_cuda(weight, lora_a, lora_b, scales, config: Optional[dict] = None) -> None:
    """In place ``W ← round(W + Σᵢ sᵢ·Bᵢ·Aᵢ)`` with the fused CUDA kernel (fp32 on chip, rounded once)."""
    if weight.numel() == 0:
        return
    a, b, rank_starts, scale_t = concat_adapters(weight, lora_a, lora_b, scales)
    torch.ops.lora_kernels.cuda_merge_(weight, a, b, rank_starts, scale_t)


def merge_exact_cuda(
    weight, lora_a, lora_b, scales, config: Optional[dict] = None, capacity: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor, int, None]:
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
