"""Triton kernels of ``lora_shrink`` / ``lora_expand_`` (semantics: ``reference.lora_shrink_ref`` /
``reference.lora_expand_ref``): the two halves of the multi-adapter op with the r-wide intermediate in the
caller's hands, one program per (token, block)::

    shrink:  xa[t, :rank_i]            = scale · x[t]·A[i, :rank_i]ᵀ                (fp32 out; other entries 0)
    expand:  y[t, col : col + N]      += scales[i] · xa[t, :rank_i]·B[i, :, :rank_i]ᵀ   (rows with i = -1 untouched)

with i = adapter_ids[t]. Every tensor is read through its strides (x, A, xa, B, y, ids, scales, ranks), so
vLLM's stacked ``[L, 1, r, K]`` weights, column slices of a packed output and transposed views need no copy.
Each program loops over the rank only up to its adapter's own rank (``ranks[i]`` read in-kernel); ids outside
[0, L) are never used to index anything. Launchers read no device data on the host and allocate through torch,
so they can be captured in a CUDA graph after a warm-up call (which also runs the autotuner).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import autotune_configs

# GEMV-shaped (one token per program): bandwidth-bound, so few warps and modest tiles.
_SHRINK_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_R=16, BLOCK_K=128), 4, 2),
        (dict(BLOCK_R=16, BLOCK_K=256), 4, 2),
        (dict(BLOCK_R=32, BLOCK_K=128), 4, 3),
        (dict(BLOCK_R=64, BLOCK_K=64), 4, 3),
    ],
    (dict(BLOCK_R=16, BLOCK_K=128), 1, 1),  # interpreter: few, wide programs (numpy does the work per program)
)
_EXPAND_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_N=128, BLOCK_R=16), 4, 2),
        (dict(BLOCK_N=256, BLOCK_R=16), 4, 2),
        (dict(BLOCK_N=256, BLOCK_R=32), 8, 2),
        (dict(BLOCK_N=512, BLOCK_R=16), 8, 2),
    ],
    (dict(BLOCK_N=128, BLOCK_R=16), 1, 1),
)


@triton.jit
def _token_adapter(ids_ptr, stride_id, ranks_ptr, stride_rank, t, L, R_MAX, HAS_RANKS: tl.constexpr):
    """(adapter i as int64, its rank clamped to [0, R_MAX]); rank 0 when the id is outside [0, L)."""
    i = tl.load(ids_ptr + t * stride_id).to(tl.int64)
    valid = (i >= 0) & (i < L)
    i = tl.where(valid, i, 0)
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + i * stride_rank).to(tl.int32)
        rank = tl.minimum(tl.maximum(rank, 0), R_MAX)
    else:
        rank = R_MAX + tl.program_id(0) * 0
    rank = tl.where(valid, rank, 0)
    return i, valid, rank


@triton.autotune(configs=_SHRINK_CONFIGS, key=["K", "R_MAX"])
@triton.jit(do_not_specialize=["M", "L"])
def _shrink_kernel(
    xa_ptr, x_ptr, a_ptr, ids_ptr, ranks_ptr, scale,
    M, K, L, R_MAX,
    stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_id, stride_rank, stride_xam, stride_xar,
    HAS_RANKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (t, r-block): xa[t, r-block] = scale · x[t]·A[i, r-block]ᵀ in fp32 for the rank columns below rank_i,
    # 0 for the rest (and for the whole row when id t has no adapter). Reads x[t], A[i, r-block, :], ids[t],
    # ranks[i]; writes xa[t, r-block] in full (the output is uninitialised).
    t = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    i, valid, rank = _token_adapter(ids_ptr, stride_id, ranks_ptr, stride_rank, t, L, R_MAX, HAS_RANKS)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    out_mask = offs_r < R_MAX
    r_mask = offs_r < rank
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if pid_r * BLOCK_R < rank:
        a_rows = a_ptr + i * stride_al + offs_r[:, None].to(tl.int64) * stride_ar
        x_row = x_ptr + t * stride_xm
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xv = tl.load(x_row + offs_k.to(tl.int64) * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
            av = tl.load(a_rows + offs_k[None, :].to(tl.int64) * stride_ak, mask=r_mask[:, None] & k_mask[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(av * xv[None, :], axis=1)
    acc = tl.where(r_mask, acc * scale, 0.0)
    tl.store(xa_ptr + t * stride_xam + offs_r.to(tl.int64) * stride_xar, acc, mask=out_mask)


@triton.autotune(configs=_EXPAND_CONFIGS, key=["N", "R_MAX"], restore_value=["y_ptr"])
@triton.jit(do_not_specialize=["M", "L", "col_offset"])
def _expand_kernel(
    y_ptr, xa_ptr, b_ptr, ids_ptr, scales_ptr, ranks_ptr,
    M, N, L, R_MAX, col_offset,
    stride_ym, stride_yn, stride_xam, stride_xar, stride_bl, stride_bn, stride_br, stride_id, stride_scale, stride_rank,
    HAS_RANKS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Program (t, n-block): y[t, col_offset + n-block] += scales[i] · xa[t, :rank_i]·B[i, n-block, :rank_i]ᵀ, the sum in
    # fp32 together with y's old value and rounded once; returns at once for a token without an adapter.
    # Reads ids[t], scales/ranks[i], xa[t, :rank_i], B[i, n-block, :rank_i], y[t, n-block]; writes y[t, n-block].
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    i, valid, rank = _token_adapter(ids_ptr, stride_id, ranks_ptr, stride_rank, t, L, R_MAX, HAS_RANKS)
    if valid & (rank > 0):
        scale = tl.load(scales_ptr + i * stride_scale).to(tl.float32)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        b_rows = b_ptr + i * stride_bl + offs_n[:, None].to(tl.int64) * stride_bn
        xa_row = xa_ptr + t * stride_xam
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            xv = tl.load(xa_row + offs_r.to(tl.int64) * stride_xar, mask=r_mask, other=0.0).to(tl.float32)
            bv = tl.load(b_rows + offs_r[None, :].to(tl.int64) * stride_br, mask=n_mask[:, None] & r_mask[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(bv * xv[None, :], axis=1)
        y_ptrs = y_ptr + t * stride_ym + (col_offset + offs_n).to(tl.int64) * stride_yn
        y_old = tl.load(y_ptrs, mask=n_mask, other=0.0)
        tl.store(y_ptrs, (y_old.to(tl.float32) + scale * acc).to(y_old.dtype), mask=n_mask)


def _new_xa(M: int, r_max: int, device) -> torch.Tensor:
    """The shrink's output buffer, uninitialised (the kernel writes every element; tests swap in a NaN-filled one)."""
    return torch.empty((M, r_max), dtype=torch.float32, device=device)


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, adapter_ids: torch.Tensor, scale: float,
                       ranks: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 xa [M, r_max] (inputs already validated; M > 0 and r_max > 0)."""
    M, K = x.shape
    L, r_max = lora_a.shape[0], lora_a.shape[1]
    xa = _new_xa(M, r_max, x.device)
    has_ranks = ranks is not None
    ranks_arg = ranks if has_ranks else adapter_ids  # never read when HAS_RANKS is False
    grid = lambda META: (M, triton.cdiv(r_max, META["BLOCK_R"]))  # noqa: E731
    _shrink_kernel[grid](
        xa, x, lora_a, adapter_ids, ranks_arg, float(scale),
        M, K, L, r_max,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), adapter_ids.stride(0),
        ranks_arg.stride(0), xa.stride(0), xa.stride(1),
        HAS_RANKS=has_ranks,
    )
    return xa


def lora_expand_triton(y: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, adapter_ids: torch.Tensor,
                       scales: torch.Tensor, ranks: Optional[torch.Tensor], col_offset: int) -> None:
    """In place on y's columns [col_offset, col_offset + N) (inputs already validated; M, N, r_max > 0)."""
    M = y.shape[0]
    L, N, r_max = lora_b.shape
    has_ranks = ranks is not None
    ranks_arg = ranks if has_ranks else adapter_ids  # never read when HAS_RANKS is False
    grid = lambda META: (M, triton.cdiv(N, META["BLOCK_N"]))  # noqa: E731
    _expand_kernel[grid](
        y, xa, lora_b, adapter_ids, scales, ranks_arg,
        M, N, L, r_max, int(col_offset),
        y.stride(0), y.stride(1), xa.stride(0), xa.stride(1), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        adapter_ids.stride(0), scales.stride(0), ranks_arg.stride(0),
        HAS_RANKS=has_ranks,
    )
