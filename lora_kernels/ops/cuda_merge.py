"""CUDA-extension launchers of the merge ops (kernels in ``csrc/merge.cu``, glue in ``csrc/merge_torch.cpp``,
schemas/fakes of ``cuda_merge_`` / ``cuda_merge_exact_`` in ``_library.py``). Inputs were validated by the caller.

The CUDA kernel has one fixed tiling (TILE_N × TILE_K, below), so a merge record from this backend needs no
config: the exact unmerge replays the same kernel and gets the same Δ bit-for-bit.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from ._operands import concat_adapters

# Must match kTileN / kTileK in csrc/merge.cu (the Python side sizes the overflow-tile buffer with them).
TILE_N = 32
TILE_K = 128

_BITS_DTYPE = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


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
    dev = weight.device
    N, K = weight.shape
    numel = N * K
    idx_dtype = torch.int32 if numel < 2**31 else torch.int64
    bits_dtype = _BITS_DTYPE[weight.dtype]
    if numel == 0:
        return torch.empty(0, dtype=idx_dtype, device=dev), torch.empty(0, dtype=bits_dtype, device=dev), 0, None
    a, b, rank_starts, scale_t = concat_adapters(weight, lora_a, lora_b, scales)
    n_tiles = -(-N // TILE_N) * -(-K // TILE_K)
    capacity = capacity or max(4096, numel // 32)
    counters = torch.zeros(4, dtype=torch.int32, device=dev)
    rec_idx = torch.empty(capacity, dtype=idx_dtype, device=dev)
    rec_bits = torch.empty(capacity, dtype=bits_dtype, device=dev)
    ovf = torch.empty(n_tiles, dtype=torch.int32, device=dev)
    ops = torch.ops.lora_kernels
    ops.cuda_merge_exact_(weight, a, b, rank_starts, scale_t, counters, rec_idx, rec_bits, ovf, None)
    claimed, stored, n_ovf, n_nonfinite = (int(v) for v in counters.tolist())
    parts_idx, parts_bits = [rec_idx[:stored]], [rec_bits[:stored]]
    if n_ovf:
        need = claimed - stored
        counters2 = torch.zeros(4, dtype=torch.int32, device=dev)
        idx2 = torch.empty(max(need, 1), dtype=idx_dtype, device=dev)
        bits2 = torch.empty(max(need, 1), dtype=bits_dtype, device=dev)
        ovf2 = torch.empty(n_ovf, dtype=torch.int32, device=dev)
        ops.cuda_merge_exact_(weight, a, b, rank_starts, scale_t, counters2, idx2, bits2, ovf2, ovf[:n_ovf].clone())
        c2 = [int(v) for v in counters2.tolist()]
        assert c2[2] == 0 and c2[1] == need, f"merge_exact_cuda: second pass stored {c2[1]} of {need} entries"
        n_nonfinite += c2[3]
        parts_idx.append(idx2[:need])
        parts_bits.append(bits2[:need])
    return torch.cat(parts_idx).clone(), torch.cat(parts_bits).clone(), n_nonfinite, None
