"""Triton kernels for batched multi-adapter LoRA (``add_lora``; Punica BGMV / SGMV, S-LoRA mixed ranks).

Semantics (see ``reference.add_lora_ref``), in place on y::

    y[t, slice s] += scales[i] · (x[t] · A_s[i, :rank_i]ᵀ) · B_s[i, :, :rank_i]ᵀ     for i = adapter_ids[t] >= 0

Two strategies, picked by :func:`choose_strategy` (override with ``strategy=`` or the env var
``LORA_KERNELS_MULTI_LORA_STRATEGY`` = ``bgmv`` | ``sgmv`` | ``auto``):

* ``bgmv`` (decode): tiles of 16 tokens in arrival order, no batch metadata. Launch 1 (shrink) splits K over
  programs (token tile, K-split, slice) and writes fp32 partial sums of ``xa``; launch 2 (expand) sums the
  partials in a fixed order and adds ``scale · xa · Bᵀ`` over (token tile, N-block, slice). Inside a tile both
  loop over the tile's distinct adapters, so each adapter's A and B are read once per tile that uses it — not
  once per token and per N-block (the fused one-launch kernel this replaced re-read A 8-112x the byte floor at
  M <= 16; tests/test_traffic.py holds the ceilings).
* ``sgmv`` (prefill): tokens grouped by adapter (``LoRABatchMeta``: stable sorted-token indirection and a
  fixed-capacity tile table of (adapter, start, end) segments of at most BLOCK_M tokens). Launch 1 (shrink)
  writes ``xa`` into an fp32 [S, capacity, r_max] buffer with ``tl.dot`` tiles over (tile, rank-block, slice);
  launch 2 (expand) adds ``scale · xa · Bᵀ`` tiles over (tile, N-block, slice) into y's gathered rows.

DoRA (``magnitudes`` given; constexpr ``DORA``, so the plain kernels are compiled without it): both expand
kernels end with ``y = g·(y_old + lora) + (1 − g)·bias`` in fp32 before the one rounding, g read from the
[L, N] fp32 factor table at the token's adapter row (``HAS_BIAS``: bias [N] read once per N-block); a rank-0
adapter still rescales its rows. A plain adapter in such a batch has a row of ones, which gives ``y_old + lora``
bit for bit (g·v = v, (1 − g)·bias = 0): one table read per output element, no per-slot flag to branch on.

Both loop over the rank only up to the adapter's own rank (``ranks[i]`` is read in-kernel; a rank-0 adapter
does no work), skip ids outside [0, L) without reading anything indexed by them, handle every slice in the
same launch (up to ``MAX_SLICES`` per launch) and take x / y with arbitrary strides. Launchers never read
device data on the host (no ``.item()``/``.tolist()``), allocate through torch on the current stream and have
no data-dependent shapes, so a call can be captured in a CUDA graph (after a warm-up call, which also runs the
autotuner; replays reuse the tuned config).
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..ops.multi_lora import LoRABatchMeta
from ._common import INTERPRET, autotune_configs

STRATEGY_ENV = "LORA_KERNELS_MULTI_LORA_STRATEGY"
STRATEGIES = ("bgmv", "sgmv")
MAX_SLICES = 4  # slices handled per launch; more slices are processed in groups of MAX_SLICES

# Decode (bgmv) token tile, and how the decode shrink splits K: at least BGMV_MIN_K_SPLIT columns per program
# (small under the interpreter so that the tests' small K still exercise several splits), at most BGMV_MAX_SPLITS.
BGMV_BLOCK_M = 16
BGMV_MIN_K_SPLIT_GPU = 512
BGMV_MIN_K_SPLIT = 64 if INTERPRET else BGMV_MIN_K_SPLIT_GPU
BGMV_MAX_SPLITS = 8

# BGMV (decode) is chosen when M * r_max <= this (untuned: needs GPU measurements). The decode kernels read each
# adapter's A and B once per 16-token tile that uses it and need no batch metadata; SGMV reads them once per
# BLOCK_M-token segment of sorted tokens, which pays off when many tokens share an adapter.
BGMV_MAX_TOKENS_X_RANK = 256


def choose_strategy(num_tokens: int, num_adapters: int, r_max: int, strategy: Optional[str] = None) -> str:
    """Pick "bgmv" or "sgmv" from static sizes only (no device data, so it is graph- and compile-safe).

    Rule: explicit ``strategy`` > env ``LORA_KERNELS_MULTI_LORA_STRATEGY`` > auto, where auto is "bgmv" when
    ``num_tokens * r_max <= BGMV_MAX_TOKENS_X_RANK`` or when every token can have its own adapter and the batch is
    tiny (``num_tokens <= 8``), else "sgmv". ``num_adapters`` only matters through the tile table capacity.
    """
    req = strategy if strategy is not None else os.environ.get(STRATEGY_ENV)
    if req is not None:
        req = req.lower()
        if req in STRATEGIES:
            return req
        if req != "auto":
            raise ValueError(f"unknown multi-LoRA strategy {req!r}; choose one of {STRATEGIES} or 'auto'")
    if num_tokens <= 8 or num_tokens * max(r_max, 1) <= BGMV_MAX_TOKENS_X_RANK:
        return "bgmv"
    return "sgmv"


# ----------------------------------------------------------------------------------------------
# Autotune configs (one list per kernel; the interpreter gets a single small config)
# ----------------------------------------------------------------------------------------------

# Hopper and Ampere alike: these kernels are bandwidth-bound GEMV / skinny GEMMs, so the space is small.
# Decode: token tiles of BGMV_BLOCK_M; the shrink is split over K (K_PER_SPLIT columns per program).
_BGMV_SHRINK_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_K=128, BLOCK_R=16), 4, 3),
        (dict(BLOCK_K=256, BLOCK_R=16), 4, 2),
        (dict(BLOCK_K=64, BLOCK_R=32), 4, 4),
        (dict(BLOCK_K=128, BLOCK_R=64), 8, 2),
    ],
    (dict(BLOCK_K=32, BLOCK_R=16), 1, 1),
)
_BGMV_EXPAND_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_N=128, BLOCK_R=16), 4, 2),
        (dict(BLOCK_N=256, BLOCK_R=16), 4, 2),
        (dict(BLOCK_N=64, BLOCK_R=32), 4, 3),
        (dict(BLOCK_N=128, BLOCK_R=64), 8, 2),
    ],
    (dict(BLOCK_N=32, BLOCK_R=16), 1, 1),
)
_SHRINK_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_K=64, BLOCK_R=16), 4, 4),
        (dict(BLOCK_K=128, BLOCK_R=16), 4, 3),
        (dict(BLOCK_K=64, BLOCK_R=32), 4, 4),
        (dict(BLOCK_K=128, BLOCK_R=64), 8, 3),
    ],
    (dict(BLOCK_K=32, BLOCK_R=16), 1, 1),
)
_EXPAND_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_N=64, BLOCK_R=16), 4, 3),
        (dict(BLOCK_N=128, BLOCK_R=16), 4, 3),
        (dict(BLOCK_N=128, BLOCK_R=32), 8, 3),
        (dict(BLOCK_N=256, BLOCK_R=16), 8, 2),
    ],
    (dict(BLOCK_N=64, BLOCK_R=16), 1, 1),
)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _slice_params(pid_s, a0, a1, a2, a3, b0, b1, b2, b3, n0, n1, n2, n3):
    """(A pointer, B pointer, width N_s, first column in y) of slice pid_s of this launch."""
    a_ptr = a0
    b_ptr = b0
    n_s = n0
    col = n0 * 0
    if pid_s == 1:
        a_ptr = a1
        b_ptr = b1
        n_s = n1
        col = n0
    elif pid_s == 2:
        a_ptr = a2
        b_ptr = b2
        n_s = n2
        col = n0 + n1
    elif pid_s == 3:
        a_ptr = a3
        b_ptr = b3
        n_s = n3
        col = n0 + n1 + n2
    return a_ptr, b_ptr, n_s, col


@triton.jit
def _adapter_rank(ranks_ptr, i, R_MAX, HAS_RANKS: tl.constexpr):
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + i).to(tl.int32)
        rank = tl.minimum(tl.maximum(rank, 0), R_MAX)
    else:
        rank = R_MAX + tl.program_id(0) * 0
    return rank


@triton.jit
def _next_adapter(ids):
    """The smallest adapter id left in the tile's id vector (L, the "done" mark, when none is left)."""
    return tl.min(ids, axis=0)


@triton.autotune(configs=_BGMV_SHRINK_CONFIGS, key=["K", "R_MAX", "M_BUCKET", "DOT_FP32"])
@triton.jit(do_not_specialize=["n0", "n1", "n2", "n3", "M"])
def _bgmv_shrink_kernel(
    part_ptr, x_ptr, ids_ptr, ranks_ptr,
    a0, a1, a2, a3, b0, b1, b2, b3, n0, n1, n2, n3,
    M, K, L, R_MAX, K_PER_SPLIT, M_BUCKET,
    stride_xm, stride_xk, stride_ps, stride_pk,
    HAS_RANKS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Decode shrink, split over K: program (token tile, k-split, slice) writes the partial sums
    # part[s, split, t, :rank_i] = Σ_{k in split} x[t, k]·A_s[i, :rank_i, k] for every token t of the tile, looping
    # over the distinct adapters i of the tile, so each A_s[i] column block is read once per tile (not per token,
    # not per N-block). Reads ids, ranks, x rows, A_s; writes part (fp32 [S, splits, M, R_MAX]; rows with no
    # adapter and ranks past rank_i are left unwritten).
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    a_ptr, b_ptr, n_s, col = _slice_params(pid_s, a0, a1, a2, a3, b0, b1, b2, b3, n0, n1, n2, n3)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ids = tl.load(ids_ptr + offs_m, mask=m_ok, other=-1).to(tl.int32)
    ids = tl.where(m_ok & (ids >= 0) & (ids < L), ids, L)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    p_rows = part_ptr + pid_s * stride_ps + pid_k * stride_pk + offs_m.to(tl.int64)[:, None] * R_MAX
    cur = _next_adapter(ids)
    while cur < L:
        sel = ids == cur
        rank = _adapter_rank(ranks_ptr, cur, R_MAX, HAS_RANKS)
        a_base = a_ptr + cur.to(tl.int64) * R_MAX * K
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < k_hi
                xv = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=sel[:, None] & k_ok[None, :], other=0.0)
                av = tl.load(a_base + offs_r[None, :] * K + offs_k[:, None], mask=r_ok[None, :] & k_ok[:, None],
                             other=0.0)
                if DOT_FP32:
                    acc = tl.dot(xv.to(tl.float32), av.to(tl.float32), acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(xv, av.to(xv.dtype), acc)
            tl.store(p_rows + offs_r[None, :], acc, mask=sel[:, None] & r_ok[None, :])
        ids = tl.where(sel, L, ids)
        cur = _next_adapter(ids)


@triton.autotune(configs=_BGMV_EXPAND_CONFIGS, key=["N_MAX", "R_MAX", "M_BUCKET"], restore_value=["y_ptr"])
@triton.jit(do_not_specialize=["n0", "n1", "n2", "n3", "M"])
def _bgmv_expand_kernel(
    y_ptr, part_ptr, ids_ptr, scales_ptr, ranks_ptr,
    a0, a1, a2, a3, b0, b1, b2, b3, n0, n1, n2, n3,
    M, L, R_MAX, N_MAX, SPLITS, M_BUCKET,
    stride_ym, stride_yn, stride_ps, stride_pk,
    g_ptr, bias_ptr, stride_gl,
    HAS_RANKS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DORA: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
):
    # Decode expand: program (token tile, n-block, slice) sums the K-split partials of xa (fixed order: the result
    # is deterministic) and adds scales[i]·xa[t, :rank_i]·B_s[i, n-block, :rank_i]ᵀ into y[t, col + n-block], with
    # fp32 accumulation and one rounding, looping over the tile's distinct adapters (each B_s[i] block read once
    # per tile). Reads ids, scales, ranks, part, B_s, y rows with an adapter; writes those y rows.
    # DORA: y = g[i]·(y_old + update) + (1 - g[i])·bias, g gathered per token row (g [L, N] fp32, bias [N]).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    a_ptr, b_ptr, n_s, col = _slice_params(pid_s, a0, a1, a2, a3, b0, b1, b2, b3, n0, n1, n2, n3)
    if pid_n * BLOCK_N >= n_s:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ids = tl.load(ids_ptr + offs_m, mask=m_ok, other=-1).to(tl.int32)
    ids = tl.where(m_ok & (ids >= 0) & (ids < L), ids, L)
    active = ids < L
    row_ids = ids
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_s
    p_rows = part_ptr + pid_s * stride_ps + offs_m.to(tl.int64)[:, None] * R_MAX
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    cur = _next_adapter(ids)
    while cur < L:
        sel = ids == cur
        rank = _adapter_rank(ranks_ptr, cur, R_MAX, HAS_RANKS)
        scale = tl.load(scales_ptr + cur).to(tl.float32)
        b_base = b_ptr + cur.to(tl.int64) * n_s * R_MAX
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            xa = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for sp in range(0, SPLITS):
                xa += tl.load(p_rows + sp * stride_pk + offs_r[None, :], mask=sel[:, None] & r_ok[None, :], other=0.0)
            bv = tl.load(b_base + offs_n[None, :] * R_MAX + offs_r[:, None], mask=r_ok[:, None] & n_ok[None, :],
                         other=0.0)
            acc = tl.dot(xa * scale, bv.to(tl.float32), acc, input_precision=PRECISION)
        ids = tl.where(sel, L, ids)
        cur = _next_adapter(ids)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + (col + offs_n)[None, :] * stride_yn
    mask = active[:, None] & n_ok[None, :]
    y_old = tl.load(y_ptrs, mask=mask, other=0.0)
    if DORA:
        g_rows = tl.where(active, row_ids, 0).to(tl.int64)
        gv = tl.load(g_ptr + g_rows[:, None] * stride_gl + (col + offs_n)[None, :], mask=mask, other=1.0)
        val = (y_old.to(tl.float32) + acc) * gv
        if HAS_BIAS:
            bv = tl.load(bias_ptr + col + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            val += (1.0 - gv) * bv[None, :]
        tl.store(y_ptrs, val.to(y_old.dtype), mask=mask)
    else:
        tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=mask)


@triton.autotune(configs=_SHRINK_CONFIGS, key=["K", "R_MAX", "BLOCK_M"])
@triton.jit(do_not_specialize=["n0", "n1", "n2", "n3", "M"])
def _sgmv_shrink_kernel(
    xa_ptr, x_ptr, sorted_ptr, tiles_ptr, ranks_ptr,
    a0, a1, a2, a3, b0, b1, b2, b3, n0, n1, n2, n3,
    M, K, L, R_MAX, CAPACITY, NUM_TILES,
    stride_xm, stride_xk, stride_xas, stride_xam,
    HAS_RANKS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Prefill shrink: program (tile, rank-block, slice) computes xa[s, p, r-block] = x[tok(p)]·A_s[i, r-block]ᵀ in
    # fp32 for the sorted positions p of the tile (one adapter i per tile), skipping rank-blocks past rank_i.
    # Reads the tile table, sorted token ids, x rows, A_s[i]; writes xa[s, tile rows, :rank_i] only.
    tile = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    a_ptr, b_ptr, n_s, col = _slice_params(pid_s, a0, a1, a2, a3, b0, b1, b2, b3, n0, n1, n2, n3)
    i = tl.load(tiles_ptr + tile)
    if (i < 0) | (i >= L):
        return
    rank = _adapter_rank(ranks_ptr, i, R_MAX, HAS_RANKS)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:
        return
    start = tl.load(tiles_ptr + NUM_TILES + tile)
    end = tl.minimum(tl.load(tiles_ptr + 2 * NUM_TILES + tile), CAPACITY)
    offs_p = start + tl.arange(0, BLOCK_M)
    p_mask = (offs_p < end) & (offs_p >= 0)
    tok = tl.load(sorted_ptr + offs_p, mask=p_mask, other=0)
    m_mask = p_mask & (tok >= 0) & (tok < M)
    tok = tl.where(m_mask, tok, 0).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_base = a_ptr + i.to(tl.int64) * R_MAX * K
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xv = tl.load(
            x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :], other=0.0,
        )
        av = tl.load(a_base + offs_r[None, :] * K + offs_k[:, None], mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        if DOT_FP32:
            acc = tl.dot(xv.to(tl.float32), av.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(xv, av.to(xv.dtype), acc)
    xa_ptrs = xa_ptr + pid_s * stride_xas + offs_p[:, None].to(tl.int64) * stride_xam + offs_r[None, :]
    tl.store(xa_ptrs, acc, mask=p_mask[:, None] & r_mask[None, :])


@triton.autotune(configs=_EXPAND_CONFIGS, key=["N_MAX", "R_MAX", "BLOCK_M"], restore_value=["y_ptr"])
@triton.jit(do_not_specialize=["n0", "n1", "n2", "n3", "M"])
def _sgmv_expand_kernel(
    y_ptr, xa_ptr, sorted_ptr, tiles_ptr, scales_ptr, ranks_ptr,
    a0, a1, a2, a3, b0, b1, b2, b3, n0, n1, n2, n3,
    M, L, R_MAX, N_MAX, CAPACITY, NUM_TILES,
    stride_ym, stride_yn, stride_xas, stride_xam,
    g_ptr, bias_ptr, stride_gl,
    HAS_RANKS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DORA: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
):
    # Prefill expand: program (tile, n-block, slice) adds scales[i]·xa[s, tile rows, :rank_i]·B_s[i, n-block, :rank_i]ᵀ
    # (fp32 accumulation, one rounding) into y[tok(p), col + n-block] for the tile's tokens.
    # Reads the tile table, sorted token ids, xa, B_s[i], scales/ranks[i], y rows; writes those y rows.
    # DORA: y = g[i]·(y_old + update) + (1 - g[i])·bias (g row [N] fp32 of the tile's adapter, bias [N]); a rank-0
    # adapter's tiles still run (to rescale).
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    a_ptr, b_ptr, n_s, col = _slice_params(pid_s, a0, a1, a2, a3, b0, b1, b2, b3, n0, n1, n2, n3)
    if pid_n * BLOCK_N >= n_s:
        return
    i = tl.load(tiles_ptr + tile)
    if (i < 0) | (i >= L):
        return
    rank = _adapter_rank(ranks_ptr, i, R_MAX, HAS_RANKS)
    if not DORA:
        if rank <= 0:
            return
    i = i.to(tl.int64)
    scale = tl.load(scales_ptr + i).to(tl.float32)
    start = tl.load(tiles_ptr + NUM_TILES + tile)
    end = tl.minimum(tl.load(tiles_ptr + 2 * NUM_TILES + tile), CAPACITY)
    offs_p = start + tl.arange(0, BLOCK_M)
    p_mask = (offs_p < end) & (offs_p >= 0)
    tok = tl.load(sorted_ptr + offs_p, mask=p_mask, other=0)
    m_mask = p_mask & (tok >= 0) & (tok < M)
    tok = tl.where(m_mask, tok, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_s
    b_base = b_ptr + i * n_s * R_MAX
    xa_base = xa_ptr + pid_s * stride_xas + offs_p[:, None].to(tl.int64) * stride_xam
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        xav = tl.load(xa_base + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        bv = tl.load(b_base + offs_n[None, :] * R_MAX + offs_r[:, None], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(xav, bv.to(tl.float32), acc, input_precision=PRECISION)
    y_ptrs = y_ptr + tok[:, None] * stride_ym + (col + offs_n)[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y_old = tl.load(y_ptrs, mask=mask, other=0.0)
    if DORA:
        gv = tl.load(g_ptr + i * stride_gl + col + offs_n, mask=n_mask, other=1.0)
        val = (y_old.to(tl.float32) + scale * acc) * gv[None, :]
        if HAS_BIAS:
            bv = tl.load(bias_ptr + col + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            val += ((1.0 - gv) * bv)[None, :]
        tl.store(y_ptrs, val.to(y_old.dtype), mask=mask)
    else:
        tl.store(y_ptrs, (y_old.to(tl.float32) + scale * acc).to(y_old.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _slice_groups(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]):
    """Yield (first column, [(A, B), ...] up to MAX_SLICES) with A/B contiguous (weights normally already are)."""
    col = 0
    pairs = [(a.contiguous(), b.contiguous()) for a, b in zip(lora_a, lora_b)]
    for g in range(0, len(pairs), MAX_SLICES):
        group = pairs[g : g + MAX_SLICES]
        yield col, group
        col += sum(b.shape[1] for _, b in group)


def _slice_args(group):
    """Flat (a0..a3, b0..b3, n0..n3) kernel arguments; unused slots repeat slice 0 with width 0."""
    a = [p[0] for p in group] + [group[0][0]] * (MAX_SLICES - len(group))
    b = [p[1] for p in group] + [group[0][1]] * (MAX_SLICES - len(group))
    n = [p[1].shape[1] for p in group] + [0] * (MAX_SLICES - len(group))
    return (*a, *b, *n)


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Scratch buffer the kernels write before reading (tests replace this to poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _k_per_split(K: int) -> int:
    """Columns of x per decode-shrink program: a multiple of BGMV_MIN_K_SPLIT (itself a multiple of every
    config's BLOCK_K), with at most BGMV_MAX_SPLITS splits (the expand reads every split's partial xa once per
    N-block)."""
    return triton.cdiv(triton.cdiv(K, BGMV_MAX_SPLITS), BGMV_MIN_K_SPLIT) * BGMV_MIN_K_SPLIT


def _precisions(x: torch.Tensor, a: torch.Tensor):
    """(shrink uses fp32 dot?, shrink precision, expand precision). fp32 data gets exact IEEE dots; 16-bit data
    multiplies natively in the shrink and uses tf32 for the fp32-xa expand (xa keeps 10 mantissa bits, more than
    the bf16/fp16 output holds)."""
    exact = x.dtype == torch.float32
    dot_fp32 = exact or x.dtype != a.dtype
    shrink_prec = "ieee" if exact else "tf32"
    expand_prec = "ieee" if exact else "tf32"
    return dot_fp32, shrink_prec, expand_prec


def add_lora_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: List[torch.Tensor],
    lora_b: List[torch.Tensor],
    adapter_ids: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor],
    groups=None,
    strategy: Optional[str] = None,
    *,
    magnitudes: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> None:
    """In-place ``add_lora`` on Triton (inputs already validated; see the module docstring).

    ``groups``: optional ``(sorted_token_ids, tiles, block_m)`` of a :class:`LoRABatchMeta` built from the same
    adapter_ids (``meta.groups``, reused across layers); a meta is built here when the SGMV path needs one and none
    is given. ``strategy``: "bgmv" | "sgmv" | None (env var, then :func:`choose_strategy`). ``magnitudes`` [L, N]
    fp32 / ``bias`` [N]: DoRA (see the module docstring).
    """
    M, K = x.shape
    if M == 0:
        return
    L, r_max = lora_a[0].shape[0], lora_a[0].shape[1]
    dora = magnitudes is not None
    if L == 0 or (r_max == 0 and not dora):
        return
    # rank 0 everywhere (DoRA only rescales): the decode kernels, whose shrink loops are empty
    strat = choose_strategy(M, L, r_max, strategy) if r_max > 0 else "bgmv"
    if dora:
        magnitudes = magnitudes.contiguous()
        bias = bias.contiguous() if bias is not None else None
    g_arg = magnitudes if dora else scales  # never read unless DORA
    b_arg = bias if bias is not None else g_arg  # never read unless HAS_BIAS
    dora_kw = dict(DORA=True, HAS_BIAS=bias is not None) if dora else {}
    # The kernels index ids, scales and ranks with unit stride ([M] / [L]: a copy costs nothing next to a launch).
    adapter_ids, scales = adapter_ids.contiguous(), scales.contiguous()
    ranks = ranks.contiguous() if ranks is not None else None
    has_ranks = ranks is not None
    ranks_arg = ranks if has_ranks else scales  # never read when HAS_RANKS is False
    n_max = max(b.shape[1] for b in lora_b)

    if strat == "bgmv":
        dot_fp32, shrink_prec, expand_prec = _precisions(x, lora_a[0])
        k_per_split = _k_per_split(K)
        splits = triton.cdiv(K, k_per_split)
        m_tiles = triton.cdiv(M, BGMV_BLOCK_M)
        m_bucket = min(triton.next_power_of_2(M), 1 << 12)
        for col, group in _slice_groups(lora_a, lora_b):
            y_g = y[:, col:]
            S = len(group)
            args = _slice_args(group)
            part = _alloc((S, splits, M, max(r_max, 1)), torch.float32, x.device)
            _bgmv_shrink_kernel[(m_tiles, splits, S)](
                part, x, adapter_ids, ranks_arg, *args,
                M, K, L, r_max, k_per_split, m_bucket,
                x.stride(0), x.stride(1), part.stride(0), part.stride(1),
                HAS_RANKS=has_ranks, DOT_FP32=dot_fp32, PRECISION=shrink_prec, BLOCK_M=BGMV_BLOCK_M,
            )
            grid = lambda META: (m_tiles, triton.cdiv(n_max, META["BLOCK_N"]), S)  # noqa: E731
            _bgmv_expand_kernel[grid](
                y_g, part, adapter_ids, scales, ranks_arg, *args,
                M, L, r_max, n_max, splits, m_bucket,
                y_g.stride(0), y_g.stride(1), part.stride(0), part.stride(1),
                g_arg[:, col:] if dora else g_arg, b_arg[col:] if bias is not None else b_arg, g_arg.stride(0),
                HAS_RANKS=has_ranks, PRECISION=expand_prec, BLOCK_M=BGMV_BLOCK_M, **dora_kw,
            )
        return

    if groups is None:
        groups = LoRABatchMeta(adapter_ids, L).groups
    sorted_ids, tiles, block_m = groups
    capacity, num_tiles = sorted_ids.shape[0], tiles.shape[1]
    if num_tiles == 0:
        return
    dot_fp32, shrink_prec, expand_prec = _precisions(x, lora_a[0])
    for col, group in _slice_groups(lora_a, lora_b):
        y_g = y[:, col:]
        S = len(group)
        xa = _alloc((S, capacity, r_max), torch.float32, x.device)
        args = _slice_args(group)
        shrink_grid = lambda META: (num_tiles, triton.cdiv(r_max, META["BLOCK_R"]), S)  # noqa: E731
        _sgmv_shrink_kernel[shrink_grid](
            xa, x, sorted_ids, tiles, ranks_arg, *args,
            M, K, L, r_max, capacity, num_tiles,
            x.stride(0), x.stride(1), xa.stride(0), xa.stride(1),
            HAS_RANKS=has_ranks, DOT_FP32=dot_fp32, PRECISION=shrink_prec, BLOCK_M=block_m,
        )
        expand_grid = lambda META: (num_tiles, triton.cdiv(n_max, META["BLOCK_N"]), S)  # noqa: E731
        _sgmv_expand_kernel[expand_grid](
            y_g, xa, sorted_ids, tiles, scales, ranks_arg, *args,
            M, L, r_max, n_max, capacity, num_tiles,
            y_g.stride(0), y_g.stride(1), xa.stride(0), xa.stride(1),
            g_arg[:, col:] if dora else g_arg, b_arg[col:] if bias is not None else b_arg, g_arg.stride(0),
            HAS_RANKS=has_ranks, PRECISION=expand_prec, BLOCK_M=block_m, **dora_kw,
        )
