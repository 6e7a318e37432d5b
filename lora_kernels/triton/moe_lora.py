"""Triton kernels of the MoE LoRA ops: a grouped expert GEMM with the LoRA shrink / expand fused into it (training,
forward and backward) and the serving update over per-token adapter ids.

Semantics: :func:`lora_kernels.reference.moe_lora_linear_ref` / :func:`lora_kernels.reference.add_moe_lora_ref`
(pair p = t·k + j is token t's j-th expert e = topk_ids[t, j]; c_p its routing weight or 1)::

    forward   out[p] = c_p·(x_p·W[e]ᵀ + bias[e] + s·xa_p·B[e]ᵀ),  xa_p = x_p·A[e]ᵀ  (fp32, saved)
              y = out (one row per pair) or y[t] = Σ_j out[t·k + j] (combine)
    backward  g_p   = dy_p·W[e] + dxa_p·A[e],  dxa_p = s·dy_p·B[e]      (the unweighted input gradient)
              dx_p  = c_p·g_p  (dx[t] = Σ_j dx_p for token-row x),  dA[e] = Σ_p c_p·dxa_pᵀ·x_p,
              dB[e] = s·Σ_p c_p·dy_pᵀ·xa_p,  dc_p = g_p·x_p + dy_p·bias[e]
    serving   y[p] += c_p·scales[i]·(x_p·A[i, e, :r_i]ᵀ)·B[i, e, :, :r_i]ᵀ   for i = adapter of token t >= 0

with x_p = x[t] (token rows) or x[p] (pair rows) and dy_p = dy[t] (combine) or dy[p].

Kernels (launch order):
  forward  ``_moe_fwd_kernel`` (+ ``_moe_combine_kernel`` when combine and k > 1, except an fp32 atomic sum)
  backward ``_moe_bwd_kernel`` (+ ``_moe_combine_kernel`` for dx of token-row x when k > 1, likewise)
  serving  ``_moe_delta_kernel``, one launch per packed slice
The routing sum (a token's k pair rows summed into its row: y with combine, dx of token-row x) is formed one of three
ways, chosen by :func:`routing_sum` alone: a per-pair buffer in the output dtype that ``_moe_combine_kernel`` sums in
a fixed order (deterministic), fp32 atomic adds from the GEMM's epilogue into a zeroed [M, ·] accumulator that
``_moe_combine_kernel`` (k = 1) casts once (none for fp32, where the result itself is the accumulator), or atomic
adds in the 16-bit output dtype straight into the zeroed result (the default for 16-bit: fewest bytes).
Every kernel works on the tiles of a :class:`lora_kernels.ops.moe_lora.MoERouting`: pairs sorted by expert
(serving: by (adapter, expert)), cut into tiles of at most BLOCK_M pairs of one group; one program per (tile slot,
column block), so experts without tokens cost nothing and unused tile slots exit at once. Rows are gathered
through the sorted pair indices (x, dy, topk_weights) and scattered back to pair order (out, xa, dx), so nothing
is permuted in memory. Pairs without an expert form tiles of their own that write zero rows.

The LoRA branch is never merged into the weight: the forward computes ``xa = x·A[e]ᵀ`` in the K loop of the
expert GEMM from the x tiles it loads anyway (x is read once per column block, like the weight GEMM itself) and
adds ``s·xa·B[e]ᵀ`` in the epilogue; the backward forms ``dxa = s·dy·B[e]`` in the reduction loop of the dx GEMM
from the dy tiles it loads, so one kernel reads dy once and produces dx, dA (epilogue, from the x tile of its
output block), dB (the column-0 programs) and the routing-weight gradient (epilogue row dots).

Numerics: every product accumulates in fp32; fp32 inputs use TF32 unless ``LORA_KERNELS_FP32_PRECISION=ieee``
(as in ``triton/lora_linear.py``); bf16 meets the r-wide fp32 intermediates in bf16 (no fp32 x bf16 MMA), fp16
and fp32 keep them fp32. Routing sum through the buffer: each pair's weighted output is rounded to y's dtype and
the k rows of a token are summed in fp32 and rounded again; through fp32 atomics: the k fp32 rows are summed in fp32
and rounded once; through 16-bit atomics: each of the k rows is rounded to the output dtype as it is added (k
roundings, the eager MoE's own numerics); atomics add in the order the programs run (the last bits can differ
between runs). dA, dB and the
routing-weight gradient are fp32 atomic sums over tiles (their last bits can depend on the order of those
additions, whatever the routing sum).

The LoRA rank is held in one tile (BLOCK_R = the next power of two >= 16): ranks up to ``MAX_RANK`` = 128.
Launchers never read device data on the host and have no data-dependent grid (the grid is the routing's tile
capacity), so with a prebuilt routing they can be captured in a CUDA graph after a warm-up call.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._checks import LoRAInputError
from ..ops.moe_lora import MoERouting, pick_block_m
from ._common import INTERPRET, autotune_configs, grouped_pid
from .lora_linear import _input_precision

__all__ = ["moe_lora_fwd_triton", "moe_lora_bwd_triton", "add_moe_lora_triton", "MAX_RANK"]

MAX_RANK = 128


def _fwd(bn, bk, g, w, s):
    return dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g), w, s


# Untuned (no GPU has run them): plausible Hopper / Ampere tiles for a grouped GEMM whose M tile comes from the
# routing (BLOCK_M 16..64); the autotuner skips what does not fit a GPU's shared memory.
FWD_CONFIGS = autotune_configs(
    [
        _fwd(128, 64, 8, 8, 3),
        _fwd(128, 64, 8, 4, 4),
        _fwd(64, 64, 8, 4, 4),
        _fwd(256, 64, 8, 8, 3),
        _fwd(128, 32, 8, 4, 4),
        _fwd(64, 32, 8, 4, 2),  # lean: fits any GPU's shared memory with fp32 and 128-wide rank tiles
    ],
    _fwd(32, 32, 4, 1, 1),
)
# backward: BLOCK_N = the reduction (output features of the forward), BLOCK_K = the dx column block
BWD_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=8), 8, 3),
        (dict(BLOCK_N=64, BLOCK_K=64, GROUP_M=8), 4, 4),
        (dict(BLOCK_N=32, BLOCK_K=128, GROUP_M=8), 4, 3),
        (dict(BLOCK_N=32, BLOCK_K=64, GROUP_M=8), 4, 2),  # lean
    ],
    (dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=4), 1, 1),
)
COMBINE_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_T=16, BLOCK_N=256), 4, 2),
        (dict(BLOCK_T=32, BLOCK_N=128), 4, 2),
        (dict(BLOCK_T=8, BLOCK_N=512), 4, 2),
    ],
    (dict(BLOCK_T=16, BLOCK_N=64), 1, 1),
)
DELTA_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_N=128, BLOCK_K=64), 4, 3),
        (dict(BLOCK_N=64, BLOCK_K=128), 4, 3),
        (dict(BLOCK_N=256, BLOCK_K=64), 8, 2),
        (dict(BLOCK_N=64, BLOCK_K=64), 4, 2),
    ],
    (dict(BLOCK_N=32, BLOCK_K=32), 1, 1),
)


_SPLIT_ALIGN = max(c.kwargs["BLOCK_N"] for c in DELTA_CONFIGS)  # the serving kernel's column-split granularity


@triton.jit
def _tile_rows(sorted_ptr, tiles_ptr, stride_tiles, tile, BLOCK_M: tl.constexpr):
    """(group, pair indices [BLOCK_M] int64, row mask) of tile slot ``tile`` (group -1: unused slot)."""
    g = tl.load(tiles_ptr + tile)
    start = tl.load(tiles_ptr + stride_tiles + tile)
    end = tl.load(tiles_ptr + 2 * stride_tiles + tile)
    offs = start + tl.arange(0, BLOCK_M)
    m_ok = offs < end
    pair = tl.load(sorted_ptr + offs, mask=m_ok, other=0).to(tl.int64)
    return g, pair, m_ok


@triton.autotune(configs=FWD_CONFIGS, key=["N", "K", "BLOCK_R", "BLOCK_M", "X_PAIR", "HAS_LORA", "HAS_BIAS",
                                           "HAS_WEIGHTS", "ATOMIC_OUT"], reset_to_zero=["out_ptr"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["NUM_TILES"])
def _moe_fwd_kernel(
    out_ptr, xa_ptr, x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, tw_ptr, sorted_ptr, tiles_ptr,
    N, K, R, TOP_K, NUM_TILES, E,
    stride_om, stride_on, stride_xam, stride_xar, stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk, stride_be, stride_bn,
    stride_ae, stride_ar, stride_ak, stride_lbe, stride_lbn, stride_lbr,
    stride_twt, stride_twj, stride_tiles,
    scale,
    X_PAIR: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    ATOMIC_OUT: tl.constexpr, EPI_LOW: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    # Program (tile of expert e, column block): out[p, n-block] = c_p·(x_p·W[e]ᵀ + bias[e] + s·xa_p·B[e]ᵀ) for the
    # tile's pairs p, with xa_p = x_p·A[e]ᵀ accumulated in the same K loop from the x tiles (fp32; stored to xa by the
    # column-0 program). Reads the tile's pair indices, x rows (gathered), W[e] (read as W[e]ᵀ through its strides),
    # A[e], B[e], bias[e], the pairs' routing weights; writes out rows and xa rows (scattered to pair order). A tile
    # of pairs without an expert (e == E) writes zero rows. ATOMIC_OUT (the routing sum by atomics): out is the
    # zeroed [M, N] sum (fp32, or y itself in its own dtype) and each pair's row is atomically added, in out's dtype,
    # to its token's row t = p // k instead (a tile of pairs without an expert adds nothing).
    pid = tl.program_id(0)
    num_cols = tl.cdiv(N, BLOCK_N)
    tile, pid_n = grouped_pid(pid, NUM_TILES, num_cols, GROUP_M)
    e, pair, m_ok = _tile_rows(sorted_ptr, tiles_ptr, stride_tiles, tile, BLOCK_M)
    if e < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    if ATOMIC_OUT:
        out_row = pair // TOP_K
    else:
        out_row = pair
    out_ptrs = out_ptr + out_row[:, None] * stride_om + offs_n[None, :].to(tl.int64) * stride_on
    if e == E:
        if not ATOMIC_OUT:
            tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])
        if HAS_LORA:
            if pid_n == 0:
                tl.store(xa_ptr + pair[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                         tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), mask=m_ok[:, None] & r_ok[None, :])
        return
    e64 = e.to(tl.int64)
    if X_PAIR:
        xrow = pair
    else:
        xrow = pair // TOP_K
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + xrow[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + e64 * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        a_ptrs = a_ptr + e64 * stride_ae + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak  # A[e]ᵀ tile
        l_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            wt = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - k0
            xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)
        if HAS_LORA:
            if EVEN_K:
                at = tl.load(a_ptrs, mask=r_ok[None, :], other=0.0)
            else:
                at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            l_acc = tl.dot(xt, at, l_acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_LORA:
        if pid_n == 0:
            tl.store(xa_ptr + pair[:, None] * stride_xam + offs_r[None, :] * stride_xar, l_acc,
                     mask=m_ok[:, None] & r_ok[None, :])
        bt = tl.load(b_ptr + e64 * stride_lbe + offs_r[:, None] * stride_lbr + offs_n[None, :].to(tl.int64) * stride_lbn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # B[e]ᵀ tile [BLOCK_R, BLOCK_N]
        lt = l_acc * scale
        if EPI_LOW:
            lt = lt.to(bt.dtype)
        else:
            bt = bt.to(tl.float32)
        acc = tl.dot(lt, bt, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e64 * stride_be + offs_n * stride_bn, mask=n_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    if HAS_WEIGHTS:
        c = tl.load(tw_ptr + (pair // TOP_K) * stride_twt + (pair % TOP_K) * stride_twj, mask=m_ok, other=0.0)
        acc = acc * c.to(tl.float32)[:, None]
    if ATOMIC_OUT:
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=COMBINE_CONFIGS, key=["N", "TOP_K"])
@triton.jit(do_not_specialize=["M"])
def _moe_combine_kernel(
    y_ptr, buf_ptr, M, N, TOP_K,
    stride_ym, stride_yn, stride_bm, stride_bn,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # y[t, n-block] = Σ_j buf[t·k + j, n-block]: the k pair rows of each token summed in fp32, rounded once.
    # Reads buf [M·k, N] once, writes y [M, N] once.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_t < M)[:, None] & (offs_n < N)[None, :]
    rows = offs_t.to(tl.int64) * TOP_K
    cols = offs_n[None, :].to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(0, TOP_K):
        acc += tl.load(buf_ptr + (rows + j)[:, None] * stride_bm + cols * stride_bn, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_t.to(tl.int64)[:, None] * stride_ym + cols * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.autotune(configs=BWD_CONFIGS, key=["N", "K", "BLOCK_R", "BLOCK_M", "X_PAIR", "DY_PAIR", "HAS_LORA",
                                           "COMPUTE_DX", "COMPUTE_DA", "COMPUTE_DB", "COMPUTE_DW", "ATOMIC_DX"],
                 reset_to_zero=["dxp_ptr", "da_ptr", "db_ptr", "dw_ptr"])
@triton.jit(do_not_specialize=["NUM_TILES"])
def _moe_bwd_kernel(
    dxp_ptr, da_ptr, db_ptr, dw_ptr, dy_ptr, x_ptr, xa_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, tw_ptr, sorted_ptr, tiles_ptr,
    N, K, R, TOP_K, NUM_TILES, E,
    stride_dxm, stride_dxk, stride_dym, stride_dyn, stride_xm, stride_xk, stride_xam, stride_xar,
    stride_we, stride_wn, stride_wk, stride_be, stride_bn,
    stride_ae, stride_ar, stride_ak, stride_lbe, stride_lbn, stride_lbr,
    stride_twt, stride_twj, stride_tiles,
    scale,
    X_PAIR: tl.constexpr, DY_PAIR: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, COMPUTE_DB: tl.constexpr,
    COMPUTE_DW: tl.constexpr, ATOMIC_DX: tl.constexpr, EPI_LOW: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Program (tile of expert e, column block of the input features K). Loop over the output features N, one read of
    # the tile's dy rows (gathered): acc = dy·W[e] (the base part of g), l_acc = dy·B[e] (dxa = s·l_acc), and, in the
    # column-0 programs, dB[e] += s·dyᵀ·(c·xa) (fp32 atomics into the zeroed [E, N, R] buffer). Epilogue:
    # g = acc + dxa·A[e]; dxp[p] = c_p·g_p (scattered to pair order); with the x tile of this block (gathered)
    # dA[e] += (c·dxa)ᵀ·x (atomics into the zeroed [E, R, K] buffer) and dc[p] += g_p·x_p (+ dy_p·bias[e] in the
    # column-0 programs; atomics into the zeroed [M·k] buffer). Tiles of pairs without an expert write zero dxp rows.
    # ATOMIC_DX (token-row x, the routing sum by atomics): dxp is the zeroed [M, K] sum (fp32, or dx itself in its own
    # dtype) and c_p·g_p is atomically added, in dxp's dtype, to token row p // k instead (tiles of pairs without an
    # expert add nothing).
    pid = tl.program_id(0)
    if COMPUTE_DX or COMPUTE_DA or COMPUTE_DW:
        num_kb = tl.cdiv(K, BLOCK_K)
    else:
        num_kb = 1  # dB only: one program per tile
    tile, pid_k = grouped_pid(pid, NUM_TILES, num_kb, GROUP_M)
    e, pair, m_ok = _tile_rows(sorted_ptr, tiles_ptr, stride_tiles, tile, BLOCK_M)
    if e < 0:
        return
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    if ATOMIC_DX:
        dx_row = pair // TOP_K
    else:
        dx_row = pair
    dx_ptrs = dxp_ptr + dx_row[:, None] * stride_dxm + offs_k[None, :].to(tl.int64) * stride_dxk
    if e == E:
        if COMPUTE_DX and not ATOMIC_DX:
            tl.store(dx_ptrs, tl.zeros((BLOCK_M, BLOCK_K), dtype=dxp_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])
        return
    e64 = e.to(tl.int64)
    if DY_PAIR:
        dyrow = pair
    else:
        dyrow = pair // TOP_K
    if X_PAIR:
        xrow = pair
    else:
        xrow = pair // TOP_K
    if HAS_WEIGHTS:
        c = tl.load(tw_ptr + (pair // TOP_K) * stride_twt + (pair % TOP_K) * stride_twj, mask=m_ok, other=0.0).to(tl.float32)
    else:
        c = tl.where(m_ok, 1.0, 0.0)
    NEED_G: tl.constexpr = COMPUTE_DX or COMPUTE_DW
    NEED_DXA: tl.constexpr = HAS_LORA and (COMPUTE_DX or COMPUTE_DA or COMPUTE_DW)
    DO_DB: tl.constexpr = HAS_LORA and COMPUTE_DB
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    l_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    bias_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if DO_DB:
        xa_c = tl.load(xa_ptr + pair[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                       mask=m_ok[:, None] & r_ok[None, :], other=0.0) * c[:, None]
        if EPI_LOW:
            xa_c = xa_c.to(dy_ptr.dtype.element_ty)
    offs_n0 = tl.arange(0, BLOCK_N)
    dy_rows = dy_ptr + dyrow[:, None] * stride_dym
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + offs_n0
        n_ok = offs_n < N
        dyt = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if NEED_G:
            wt = tl.load(w_ptr + e64 * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
                         + offs_k[None, :].to(tl.int64) * stride_wk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(dyt, wt, acc, input_precision=INPUT_PRECISION)
            if COMPUTE_DW:
                if HAS_BIAS:
                    if pid_k == 0:
                        bv = tl.load(bias_ptr + e64 * stride_be + offs_n * stride_bn, mask=n_ok, other=0.0)
                        bias_dot += tl.sum(dyt.to(tl.float32) * bv.to(tl.float32)[None, :], axis=1)
        if NEED_DXA:
            bt = tl.load(b_ptr + e64 * stride_lbe + offs_n[:, None].to(tl.int64) * stride_lbn + offs_r[None, :] * stride_lbr,
                         mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            l_acc = tl.dot(dyt, bt.to(dyt.dtype), l_acc, input_precision=INPUT_PRECISION)
        if DO_DB:
            if pid_k == 0:
                if EPI_LOW:
                    part = tl.dot(tl.trans(dyt), xa_c, input_precision=INPUT_PRECISION)
                else:
                    part = tl.dot(tl.trans(dyt.to(tl.float32)), xa_c, input_precision=INPUT_PRECISION)
                tl.atomic_add(db_ptr + (e64 * N + offs_n[:, None]) * R + offs_r[None, :], part * scale,
                              mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
    if NEED_DXA:
        dxa = l_acc * scale
        if NEED_G:
            at = tl.load(a_ptr + e64 * stride_ae + offs_r[:, None] * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak,
                         mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            if EPI_LOW:
                acc = tl.dot(dxa.to(at.dtype), at, acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(dxa, at.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    if COMPUTE_DX:
        if ATOMIC_DX:
            tl.atomic_add(dx_ptrs, (acc * c[:, None]).to(dxp_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :],
                          sem="relaxed")
        else:
            tl.store(dx_ptrs, (acc * c[:, None]).to(dxp_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])
    DO_DA: tl.constexpr = HAS_LORA and COMPUTE_DA
    if DO_DA or COMPUTE_DW:
        xt = tl.load(x_ptr + xrow[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DO_DA:
            g_c = dxa * c[:, None]
            if EPI_LOW:
                part = tl.dot(tl.trans(g_c.to(xt.dtype)), xt, input_precision=INPUT_PRECISION)
            else:
                part = tl.dot(tl.trans(g_c), xt.to(tl.float32), input_precision=INPUT_PRECISION)
            tl.atomic_add(da_ptr + (e64 * R + offs_r[:, None]) * K + offs_k[None, :], part,
                          mask=r_ok[:, None] & k_ok[None, :], sem="relaxed")
        if COMPUTE_DW:
            d = tl.sum(acc * xt.to(tl.float32), axis=1) + bias_dot
            tl.atomic_add(dw_ptr + pair, d, mask=m_ok, sem="relaxed")


@triton.autotune(configs=DELTA_CONFIGS, key=["N", "K", "BLOCK_R", "BLOCK_M", "X_PAIR", "HAS_WEIGHTS", "HAS_RANKS"],
                 restore_value=["y_ptr"])
@triton.jit(do_not_specialize=["NUM_TILES", "col_offset"])
def _moe_delta_kernel(
    y_ptr, x_ptr, a_ptr, b_ptr, tw_ptr, scales_ptr, ranks_ptr, sorted_ptr, tiles_ptr,
    N, K, R_MAX, TOP_K, NUM_TILES, E, N_PER_SPLIT, col_offset,
    stride_ym, stride_yn, stride_xm, stride_xk,
    stride_al, stride_ae, stride_ar, stride_ak, stride_bl, stride_be, stride_bn, stride_br,
    stride_twt, stride_twj, stride_scale, stride_rank, stride_tiles,
    X_PAIR: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_RANKS: tl.constexpr, DOT_FP32: tl.constexpr,
    B_LOW: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (tile of (adapter i, expert e), column split): xa = x_p·A[i, e, :r_i]ᵀ for the tile's pairs (fp32, over
    # the whole K), then y[p, col_offset + n] += c_p·scales[i]·xa·B[i, e, n, :r_i]ᵀ for the split's column blocks, in
    # fp32 with y's old value, rounded once. Reads the tile's pair indices, x rows (gathered), A[i, e], B[i, e],
    # scales[i], ranks[i], the pairs' routing weights, y rows; writes y rows (pair order). A rank-0 adapter returns.
    tile = tl.program_id(0)
    split = tl.program_id(1)
    g, pair, m_ok = _tile_rows(sorted_ptr, tiles_ptr, stride_tiles, tile, BLOCK_M)
    if g < 0:
        return
    i = (g // E).to(tl.int64)
    e = (g % E).to(tl.int64)
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + i * stride_rank).to(tl.int32)
        rank = tl.minimum(tl.maximum(rank, 0), R_MAX)
    else:
        rank = R_MAX + tile * 0
    n_lo = split * N_PER_SPLIT
    if (rank > 0) & (n_lo < N):
        n_hi = tl.minimum(n_lo + N_PER_SPLIT, N)
        if X_PAIR:
            xrow = pair
        else:
            xrow = pair // TOP_K
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + xrow[:, None] * stride_xm + offs_k[None, :] * stride_xk
        a_ptrs = a_ptr + i * stride_al + e * stride_ae + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
        l_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            if DOT_FP32:
                l_acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), l_acc, input_precision=INPUT_PRECISION)
            else:
                l_acc = tl.dot(xt, at, l_acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
        s = tl.load(scales_ptr + i * stride_scale).to(tl.float32)
        l_acc = l_acc * s
        if HAS_WEIGHTS:
            c = tl.load(tw_ptr + (pair // TOP_K) * stride_twt + (pair % TOP_K) * stride_twj, mask=m_ok, other=0.0)
            l_acc = l_acc * c.to(tl.float32)[:, None]
        b_base = b_ptr + i * stride_bl + e * stride_be
        y_rows = y_ptr + pair[:, None] * stride_ym
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n_hi
            bt = tl.load(b_base + offs_r[:, None] * stride_br + offs_n[None, :].to(tl.int64) * stride_bn,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            if B_LOW:
                upd = tl.dot(l_acc.to(bt.dtype), bt, input_precision=INPUT_PRECISION)
            else:
                upd = tl.dot(l_acc, bt.to(tl.float32), input_precision=INPUT_PRECISION)
            y_ptrs = y_rows + (col_offset + offs_n)[None, :].to(tl.int64) * stride_yn
            mask = m_ok[:, None] & n_ok[None, :]
            y_old = tl.load(y_ptrs, mask=mask, other=0.0)
            tl.store(y_ptrs, (y_old.to(tl.float32) + upd).to(y_old.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialised buffer (tests replace this to poison outputs before kernels write them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _zeros(shape, device) -> torch.Tensor:
    """A zeroed fp32 accumulator for atomic sums (dA, dB, the routing-weight gradient); tests wrap this to name them."""
    return torch.zeros(shape, dtype=torch.float32, device=device)


def _zeroed(shape, dtype, device) -> torch.Tensor:
    """The zeroed result an atomic routing sum adds into in the result's own dtype (fp32 y / dx, or "atomic_out")."""
    return torch.zeros(shape, dtype=dtype, device=device)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


def _check_rank(r: int) -> None:
    if r > MAX_RANK:
        raise LoRAInputError(f"lora_kernels.moe_lora: rank {r} > {MAX_RANK}: the Triton MoE kernels hold the rank in one "
                             "tile; use backend='torch' for larger ranks")


@functools.lru_cache(maxsize=None)
def _target_programs(device_index) -> int:
    """Programs wanted in flight (about two per SM); the serving kernel splits N to reach it."""
    if INTERPRET or device_index is None:
        return 4
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _expert_groups(topk_ids, E, groups):
    if groups is not None:
        return groups
    M, k = topk_ids.shape
    return MoERouting(topk_ids, E, block_m=pick_block_m(M * k, E)).expert_groups


def _tw_strides(tw):
    return (tw.stride(0), tw.stride(1)) if tw is not None else (0, 0)


def _combine(y, buf, M, k):
    """y = Σ_j buf[t·k + j] in fp32, rounded once (k = 1: the cast of an fp32 sum to y's dtype)."""
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_T"]), triton.cdiv(y.shape[1], meta["BLOCK_N"]))  # noqa: E731
    _moe_combine_kernel[grid](y, buf, M, y.shape[1], k, y.stride(0), y.stride(1), buf.stride(0), buf.stride(1))


SUM_ENV = "LORA_KERNELS_MOE_SUM"
SUM_MODES = ("auto", "fp32", "buffer")


def routing_sum(M: int, k: int, N: int, dtype: torch.dtype) -> str:
    """How a token's k pair rows [M·k, N] are summed into its row of the [M, N] result (y of the forward with
    combine; dx of token-row x in the backward, N = K there); the one place this is chosen:

    * ``"direct"``: k == 1, the kernel writes the result itself;
    * ``"buffer"``: each pair's row is written in ``dtype`` to a [M·k, N] buffer that ``_moe_combine_kernel`` sums
      per token in fp32 in a fixed order (bitwise reproducible);
    * ``"atomic"``: each pair's row is added by fp32 atomics into a zeroed fp32 [M, N] accumulator (the result itself
      when ``dtype`` is fp32), then cast once by ``_moe_combine_kernel`` (k = 1);
    * ``"atomic_out"`` (16-bit ``dtype``): each pair's row is added by atomics in ``dtype`` into the zeroed result
      itself: k roundings to ``dtype`` per element, as the model's own eager MoE makes (Transformers sums expert
      outputs with ``index_add_`` in the model dtype), against one for the fp32 sums.
    Atomic sums add in the order the programs run, so their last bits can differ between runs.

    Bytes beyond the result's own write (b = ``dtype``'s element size): buffer 2·b·M·k·N (written once, read back
    once); atomic 8·M·N for b = 4 (the zeroing, the atomics' read), 16·M·N otherwise (the accumulator's zeroing 4·M·N,
    the atomics' read and write 8·M·N, the cast's read 4·M·N); atomic_out 2·b·M·N (the zeroing, the atomics' read).

    Rule: ``torch.use_deterministic_algorithms(True)`` (warn_only included) or ``$LORA_KERNELS_MOE_SUM=buffer``: the
    buffer. ``$LORA_KERNELS_MOE_SUM=fp32``: the fp32 sum moving fewer bytes (buffer or atomic; a tie keeps the
    buffer). ``auto`` (default): the fewest bytes of all three, i.e. atomic_out for 16-bit results from k = 2 on
    (4·M·N against the buffer's 4·M·k·N) and atomic for fp32 ones."""
    if k == 1:
        return "direct"
    mode = os.environ.get(SUM_ENV, "auto").strip().lower() or "auto"
    if mode not in SUM_MODES:
        raise LoRAInputError(f"${SUM_ENV}={os.environ.get(SUM_ENV)!r}: choose one of {SUM_MODES}")
    if mode == "buffer" or torch.are_deterministic_algorithms_enabled():
        return "buffer"
    b = dtype.itemsize
    if b == 4:
        return "atomic" if 8 * M * N < 2 * b * M * k * N else "buffer"
    if mode == "auto":
        return "atomic_out"
    return "atomic" if 16 * M * N < 2 * b * M * k * N else "buffer"


def moe_lora_fwd_triton(x, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights, combine, groups=None):
    """(y, xa); see the module docstring. Inputs validated (ops/moe_lora.py), M > 0."""
    M, k = topk_ids.shape
    E, N, K = weight.shape
    P = M * k
    lora = lora_a is not None
    R = lora_a.shape[1] if lora else 0
    _check_rank(R)
    if lora and lora_a.dtype != x.dtype:
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    xa = _alloc((P, R), torch.float32, x.device)
    if N == 0:
        return _alloc((M if combine else P, 0), x.dtype, x.device), xa.zero_()
    how = routing_sum(M, k, N, x.dtype) if combine else "direct"
    if how == "atomic_out" or (how == "atomic" and x.dtype == torch.float32):
        y = out = _zeroed((M, N), x.dtype, x.device)  # the atomics add into the result itself
    else:
        y = _alloc((M if combine else P, N), x.dtype, x.device)
        if how == "direct":
            out = y
        elif how == "buffer":
            out = _alloc((P, N), x.dtype, x.device)  # each pair's row, summed per token by _moe_combine_kernel
        else:
            out = _zeros((M, N), x.device)  # the fp32 sum the atomics add into, cast to y afterwards
    sorted_pairs, tiles, bm = _expert_groups(topk_ids, E, groups)
    T = tiles.shape[1]
    a_ = lora_a if lora else weight
    b_ = lora_b if lora else weight
    tw = topk_weights
    grid = lambda meta: (T * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _moe_fwd_kernel[grid](
        out, xa if lora else out, x, weight, bias if bias is not None else weight, a_, b_,
        tw if tw is not None else weight, sorted_pairs, tiles,
        N, K, R, k, T, E,
        out.stride(0), out.stride(1), xa.stride(0) if lora else 0, xa.stride(1) if lora else 0, x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        a_.stride(0), a_.stride(1), a_.stride(2), b_.stride(0), b_.stride(1), b_.stride(2),
        *_tw_strides(tw), tiles.stride(0),
        float(scale),
        X_PAIR=x.shape[0] == P, HAS_LORA=lora, HAS_BIAS=bias is not None, HAS_WEIGHTS=tw is not None,
        ATOMIC_OUT=how in ("atomic", "atomic_out"), EPI_LOW=x.dtype == torch.bfloat16, BLOCK_R=_block_r(R),
        INPUT_PRECISION=_input_precision(x.dtype), BLOCK_M=bm,
    )
    if how == "buffer":
        _combine(y, out, M, k)
    elif out is not y:  # atomic into the fp32 accumulator: one cast to y's dtype
        _combine(y, out, M, 1)
    return y, xa


def moe_lora_bwd_triton(dy, x, xa, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights, combine, output_mask,
                        groups=None):
    """(dx, dA, dB, dtopk_weights), None for what ``output_mask`` does not ask; see the module docstring."""
    M, k = topk_ids.shape
    E, N, K = weight.shape
    P = M * k
    lora = lora_a is not None
    R = lora_a.shape[1] if lora else 0
    _check_rank(R)
    need_dx, need_da, need_db, need_dw = (bool(v) for v in output_mask)
    need_da, need_db = need_da and lora, need_db and lora
    need_dw = need_dw and topk_weights is not None
    dev = dy.device
    a_op = lora_a if (not lora or lora_a.dtype == dy.dtype) else lora_a.to(dy.dtype)
    b_op = lora_b if (not lora or lora_b.dtype == dy.dtype) else lora_b.to(dy.dtype)
    x_pair = x.shape[0] == P
    da32 = _zeros((E, R, K), dev) if need_da else None
    db32 = _zeros((E, N, R), dev) if need_db else None
    dw32 = _zeros((P,), dev) if need_dw else None
    if N == 0 or not (need_dx or need_da or need_db or need_dw):
        return (torch.zeros((x.shape[0], K), dtype=dy.dtype, device=dev) if need_dx else None,
                da32.to(lora_a.dtype) if need_da else None, db32.to(lora_b.dtype) if need_db else None,
                dw32.view(M, k).to(topk_weights.dtype) if need_dw else None)
    # dx of token-row x sums each token's k pair gradients: the routing sum, chosen as in the forward
    how = routing_sum(M, k, K, dy.dtype) if (need_dx and not x_pair) else "direct"
    dx = dxp = None
    if how == "atomic_out" or (how == "atomic" and dy.dtype == torch.float32):
        dx = dxp = _zeroed((M, K), dy.dtype, dev)  # the atomics add into dx itself
    elif need_dx:
        dx = _alloc((x.shape[0], K), dy.dtype, dev)
        if how == "direct":
            dxp = dx
        elif how == "buffer":
            dxp = _alloc((P, K), dy.dtype, dev)  # c_p·g_p per pair, summed per token by _moe_combine_kernel
        else:
            dxp = _zeros((M, K), dev)  # the fp32 sum the atomics add into, cast to dx afterwards
    sorted_pairs, tiles, bm = _expert_groups(topk_ids, E, groups)
    T = tiles.shape[1]
    tw = topk_weights
    per_col = need_dx or need_da or need_dw
    if lora and xa.dtype != torch.float32:
        xa = xa.float()
    a_, b_ = (a_op, b_op) if lora else (weight, weight)
    xa_ = xa if lora else dy
    # the autotuner zeroes the four output pointers while it times configs: a pointer the kernel does not use gets a
    # buffer that is zeroed or fully written anyway (never dy or another input)
    spare = next(t for t in (dxp, da32, db32, dw32) if t is not None)
    dxp_, da_, db_, dw_ = (t if t is not None else spare for t in (dxp, da32, db32, dw32))
    grid = lambda meta: (T * (triton.cdiv(K, meta["BLOCK_K"]) if per_col else 1),)  # noqa: E731
    _moe_bwd_kernel[grid](
        dxp_, da_, db_, dw_, dy, x, xa_, weight,
        bias if bias is not None else weight, a_, b_, tw if tw is not None else weight, sorted_pairs, tiles,
        N, K, R, k, T, E,
        *(dxp.stride() if need_dx else (0, 0)), dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        xa_.stride(0), xa_.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        a_.stride(0), a_.stride(1), a_.stride(2), b_.stride(0), b_.stride(1), b_.stride(2),
        *_tw_strides(tw), tiles.stride(0),
        float(scale),
        X_PAIR=x_pair, DY_PAIR=not combine, HAS_LORA=lora, HAS_BIAS=bias is not None, HAS_WEIGHTS=tw is not None,
        COMPUTE_DX=need_dx, COMPUTE_DA=need_da, COMPUTE_DB=need_db, COMPUTE_DW=need_dw, ATOMIC_DX=how in ("atomic", "atomic_out"),
        EPI_LOW=dy.dtype == torch.bfloat16, BLOCK_R=_block_r(R), INPUT_PRECISION=_input_precision(dy.dtype), BLOCK_M=bm,
    )
    if how == "buffer":
        _combine(dx, dxp, M, k)
    elif dxp is not dx:  # atomic into the fp32 accumulator: one cast to dx's dtype
        _combine(dx, dxp, M, 1)
    return (dx, da32.to(lora_a.dtype) if need_da else None, db32.to(lora_b.dtype) if need_db else None,
            dw32.view(M, k).to(topk_weights.dtype) if need_dw else None)


def add_moe_lora_triton(y, x, lora_a, lora_b, topk_ids, topk_weights, adapter_ids, scales, ranks, groups=None) -> None:
    """In place on y [M·k, N_total] (inputs validated; one launch per packed slice). ``groups``: a MoERouting's
    (adapter, expert) groups; built here (device ops, no host read) when absent."""
    M, k = topk_ids.shape
    L, E, r_max = lora_a[0].shape[0], lora_a[0].shape[1], lora_a[0].shape[2]
    _check_rank(r_max)
    P = M * k
    if groups is None:
        groups = MoERouting(topk_ids, E, adapter_ids=adapter_ids, num_adapters=L,
                            block_m=pick_block_m(P, L * E)).lora_groups
    sorted_pairs, tiles, bm = groups
    T = tiles.shape[1]
    if T == 0:
        return
    K = x.shape[1]
    tw = topk_weights
    has_ranks = ranks is not None
    ranks_ = ranks if has_ranks else scales
    target = _target_programs(y.device.index if y.device.type == "cuda" else None)
    col = 0
    for a, b in zip(lora_a, lora_b):
        N = b.shape[2]
        if N == 0:
            continue

        # Column splits when the tile slots alone do not fill the GPU (decode): each split recomputes the shrink
        # (x and A read once more per split); split widths are multiples of every config's BLOCK_N.
        splits = max(1, min(triton.cdiv(N, _SPLIT_ALIGN), triton.cdiv(target, T)))
        nps = triton.cdiv(triton.cdiv(N, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
        _moe_delta_kernel[lambda meta, N=N, nps=nps: (T, triton.cdiv(N, nps))](
            y, x, a, b, tw if tw is not None else scales, scales, ranks_, sorted_pairs, tiles,
            N, K, r_max, k, T, E, nps, col,
            y.stride(0), y.stride(1), x.stride(0), x.stride(1),
            a.stride(0), a.stride(1), a.stride(2), a.stride(3), b.stride(0), b.stride(1), b.stride(2), b.stride(3),
            *_tw_strides(tw), scales.stride(0), ranks_.stride(0), tiles.stride(0),
            X_PAIR=x.shape[0] == P, HAS_WEIGHTS=tw is not None, HAS_RANKS=has_ranks,
            DOT_FP32=(x.dtype == torch.float32 or a.dtype != x.dtype), B_LOW=b.dtype == torch.bfloat16,
            BLOCK_R=_block_r(r_max), INPUT_PRECISION=_input_precision(torch.float32 if a.dtype != x.dtype else x.dtype),
            BLOCK_M=bm,
        )
        col += N
