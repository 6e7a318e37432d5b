"""Triton merge / unmerge: ``W ← round(W + Σᵢ sᵢ·Bᵢ·Aᵢ)`` in one pass over W.

One kernel, two modes:

* plain (``merge_triton``): each program owns a BLOCK_N × BLOCK_K tile of W; it forms the tile of
  ``Δ = Σᵢ sᵢ·(Bᵢ·Aᵢ)`` on chip in fp32 (tensor cores for fp16/bf16 adapters, exact fp32 FMAs for fp32
  adapters), adds it to the tile of W in fp32 and rounds once. W is read once and written once, any strides.
  Unmerge is the same call with negated scales; because round-to-nearest-even is symmetric in sign, the
  Δ it forms is bit-for-bit the negation of the merge's Δ.
* exact (``merge_exact_triton``): the same pass also checks, per element, that the unmerge would give
  back W bit-for-bit (``round(W' − Δ) == W`` compared as integer bits, so ±0 and NaN payloads count) and
  appends the elements where it would not to a compact repair list (logical index ``n·K + k``, original
  bits). Lists are compacted inside the tile (prefix sum) and reserved with one atomic per tile; a tile
  whose entries do not fit in the preallocated list leaves W untouched and is re-run in a second launch
  with a list of the exact size, so nothing is ever lost.

Launch configs are chosen by a deterministic rule (:func:`pick_config`) instead of autotuning: the exact
unmerge has to replay the merge's config to reproduce Δ bit-for-bit, so the config is part of the
merge record. ``MERGE_CONFIGS`` is the one list the rule (and ``benchmarks/bench_merge.py``) draws from.
FMA contraction is disabled (``enable_fp_fusion=False``) so Δ is ``Σᵢ round(sᵢ·round(Bᵢ·Aᵢ))`` exactly as
written, independent of how the compiler schedules the epilogue.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops.merge import collect_repair_list, concat_adapters
from ._common import INTERPRET

# Rank chunk fed to one tl.dot (tl.dot needs every dim >= 16); ranks are masked, never padded.
BLOCK_R = 16

# (BLOCK_N, BLOCK_K, num_warps, num_stages). Hopper and Ampere both run these; the merge is bandwidth-bound
# (r << BLOCK sizes), so the choice is about bytes in flight per SM and coalescing along K.
MERGE_CONFIGS = [
    dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2),  # default: 16 KiB bf16 tile
    dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=2),  # large W on H100/A100
    dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=2),  # small / skinny W
    dict(BLOCK_N=64, BLOCK_K=256, num_warps=8, num_stages=2),
    dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=2),  # W stored K-major (transposed)
]
_INTERPRET_CONFIG = dict(BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1)


def pick_config(weight: torch.Tensor) -> dict:
    """Deterministic launch config for ``weight`` (a function of shape, strides and device only)."""
    if INTERPRET or weight.device.type != "cuda":
        return dict(_INTERPRET_CONFIG)
    N, K = weight.shape
    if weight.stride(0) == 1 and weight.stride(1) != 1:  # transposed storage: tile long along N
        return dict(MERGE_CONFIGS[4])
    n_sm = torch.cuda.get_device_properties(weight.device).multi_processor_count
    big = MERGE_CONFIGS[1]
    if triton.cdiv(N, big["BLOCK_N"]) * triton.cdiv(K, big["BLOCK_K"]) >= 8 * n_sm:
        return dict(big)
    if N <= 64:
        return dict(MERGE_CONFIGS[2])
    return dict(MERGE_CONFIGS[0])


@triton.jit
def _lora_merge_kernel(
    w_ptr, stride_wn, stride_wk, N, K,
    a_ptr, stride_ar, stride_ak,  # A (concatenated over adapters): [R, K]
    b_ptr, stride_bn, stride_br,  # B (concatenated over adapters): [N, R]
    rank_start_ptr, scale_ptr, n_adapters,  # MULTI: adapter i owns rank rows [start[i], start[i+1]), scale[i]
    rank, scale,  # single adapter (MULTI=False)
    tile_ids_ptr,  # USE_TILE_LIST: program -> tile id
    counters_ptr,  # EXACT, int32 [4]: entries claimed, entries stored, overflowed tiles, new non-finite
    rec_idx_ptr, rec_bits_ptr, rec_capacity, ovf_tiles_ptr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    MULTI: tl.constexpr, EXACT: tl.constexpr, USE_TILE_LIST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BITS_TYPE: tl.constexpr,
):
    # Reads a BLOCK_N x BLOCK_K tile of W plus the matching rows of B and columns of A; writes the tile of
    # W once: round(W + Δ). EXACT also writes repair entries (index, original bits) and the counters.
    pid = tl.program_id(0)
    if USE_TILE_LIST:
        tile = tl.load(tile_ids_ptr + pid)
    else:
        tile = pid
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid_n = tile // tiles_k
    pid_k = tile % tiles_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask = mask_n[:, None] & mask_k[None, :]
    offs_r = tl.arange(0, BLOCK_R)

    delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if MULTI:
        n_ad = n_adapters
    else:
        n_ad = 1
    for i in range(n_ad):
        if MULTI:
            r_lo = tl.load(rank_start_ptr + i)
            r_hi = tl.load(rank_start_ptr + i + 1)
            s = tl.load(scale_ptr + i)
        else:
            r_lo = 0
            r_hi = rank
            s = scale
        ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(r_lo, r_hi, BLOCK_R):
            rr = r0 + offs_r
            mask_r = rr < r_hi
            b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + rr[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            a = tl.load(a_ptr + rr[:, None].to(tl.int64) * stride_ar + offs_k[None, :] * stride_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            ba = tl.dot(b, a, ba, input_precision=DOT_PRECISION)
        delta += s * ba

    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :].to(tl.int64) * stride_wk
    w = tl.load(w_ptrs, mask=mask, other=0.0)
    out = (w.to(tl.float32) + delta).to(w.dtype)
    if EXACT:
        back = (out.to(tl.float32) - delta).to(w.dtype)  # what the unmerge will compute
        w_bits = w.to(BITS_TYPE, bitcast=True)
        bad = (back.to(BITS_TYPE, bitcast=True) != w_bits) & mask
        bad_i = bad.to(tl.int32)
        row_cnt = tl.sum(bad_i, axis=1)
        count = tl.sum(row_cnt, axis=0)
        # exclusive prefix sum over the tile in row-major order -> slot of each bad element
        pos = (tl.cumsum(row_cnt, axis=0) - row_cnt)[:, None] + tl.cumsum(bad_i, axis=1) - bad_i
        base = tl.atomic_add(counters_ptr, count)
        fits = (count == 0) | ((base + count) <= rec_capacity)
        idx = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        w_finite = tl.abs(w.to(tl.float32)) < float("inf")  # False for NaN too
        out_finite = tl.abs(out.to(tl.float32)) < float("inf")
        n_new_inf = tl.sum(tl.sum((w_finite & ~out_finite & mask).to(tl.int32), axis=1), axis=0)
        if fits:
            tl.store(rec_idx_ptr + base + pos, idx, mask=bad)
            tl.store(rec_bits_ptr + base + pos, w_bits, mask=bad)
            tl.store(w_ptrs, out, mask=mask)
            tl.atomic_add(counters_ptr + 1, count)
            tl.atomic_add(counters_ptr + 3, n_new_inf)
        else:
            slot = tl.atomic_add(counters_ptr + 2, 1)
            tl.store(ovf_tiles_ptr + slot, tile)
    else:
        tl.store(w_ptrs, out, mask=mask)


def _launch(weight, lora_a, lora_b, scales, config, grid, exact=None, tile_ids=None):
    # one adapter: its rank and scale are kernel scalars; several: stacked along the rank with device tables
    a, b, rank_starts, scale_t = concat_adapters(weight, lora_a, lora_b, scales, device_tables=len(lora_a) > 1)
    N, K = weight.shape
    multi = rank_starts is not None
    dummy_i = torch.empty(1, dtype=torch.int32, device=weight.device)
    dummy_f = torch.empty(1, dtype=torch.float32, device=weight.device)
    counters, rec_idx, rec_bits, capacity, ovf = exact if exact is not None else (dummy_i, dummy_i, dummy_i, 0, dummy_i)
    _lora_merge_kernel[grid](
        weight, weight.stride(0), weight.stride(1), N, K,
        a, a.stride(0), a.stride(1),
        b, b.stride(0), b.stride(1),
        rank_starts if multi else dummy_i, scale_t if multi else dummy_f, len(lora_a),
        lora_a[0].shape[0], float(scales[0]),
        tile_ids if tile_ids is not None else dummy_i,
        counters, rec_idx, rec_bits, capacity, ovf,
        BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], BLOCK_R=BLOCK_R,
        MULTI=multi, EXACT=exact is not None, USE_TILE_LIST=tile_ids is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BITS_TYPE=tl.int32 if weight.dtype == torch.float32 else tl.int16,
        num_warps=config["num_warps"], num_stages=config["num_stages"], enable_fp_fusion=False,
    )


def _n_tiles(weight, config) -> int:
    N, K = weight.shape
    return triton.cdiv(N, config["BLOCK_N"]) * triton.cdiv(K, config["BLOCK_K"])


def merge_triton(weight, lora_a, lora_b, scales, config: Optional[dict] = None) -> None:
    """In place ``W ← round(W + Σᵢ sᵢ·Bᵢ·Aᵢ)`` (fp32 on chip, rounded once). Inputs were validated.

    weight [N, K] fp16/bf16/fp32, any strides without self-overlap; lora_a[i] [rᵢ, K]; lora_b[i] [N, rᵢ];
    scales: floats. ``config`` replays a recorded launch config (exact unmerge); default :func:`pick_config`.
    """
    if weight.numel() == 0:
        return
    config = config or pick_config(weight)
    _launch(weight, lora_a, lora_b, scales, config, (_n_tiles(weight, config),))


def merge_exact_triton(
    weight, lora_a, lora_b, scales, config: Optional[dict] = None, capacity: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor, int, dict]:
    """:func:`merge_triton` plus the repair list of the exact unmerge; one pass over W (two only for tiles
    that overflow the preallocated list). Synchronises once to read the list's length.

    Returns ``(index int32|int64 [n], bits int16|int32 [n], n_new_nonfinite, config)``: the logical
    indices ``n·K + k`` where ``round(W' − Δ) != W`` bitwise, and W's original bits there.
    """
    config = config or pick_config(weight)
    n_tiles = _n_tiles(weight, config)

    def run_pass(counters, rec_idx, rec_bits, ovf_tiles, tile_ids):
        grid = (n_tiles if tile_ids is None else tile_ids.numel(),)
        _launch(weight, lora_a, lora_b, scales, config, grid,
                exact=(counters, rec_idx, rec_bits, rec_idx.numel(), ovf_tiles), tile_ids=tile_ids)

    index, bits, n_nonfinite = collect_repair_list(weight, n_tiles, run_pass, "merge_exact_triton", capacity)
    return index, bits, n_nonfinite, config
