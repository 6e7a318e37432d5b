"""Triton kernels for the fused LoRA linear layer (forward and backward).

Semantics are exactly :func:`lora_kernels.reference.lora_linear_fwd_ref` /
:func:`lora_kernels.reference.lora_linear_bwd_ref` (x [M, K], W0 [N, K], A [r, K], B [N, r], s = scale)::

    forward:   xa = drop(x)·Aᵀ                      (fp32 [M, r], saved for backward)
               y  = x·W0ᵀ + bias + s·xa·Bᵀ          (fp32 accumulation, one rounding to x.dtype)
    backward:  dxa = s·dy·B   and   dB = s·dyᵀ·xa    (one kernel, one read of dy)
               dA  = dxaᵀ·drop(x)
               dx  = dy·W0 + drop'(dxa·A)           (the r-wide term fused into the dx GEMM epilogue)
               dW0 = dyᵀ·x                          (torch.matmul, only when requested)

Kernels (launch order):
  forward  ``_lora_gemm_kernel`` alone for r <= FUSED_SHRINK_MAX_R without dropout (xa = x·Aᵀ computed in its
           K loop from the x tiles it loads anyway: x is read once); else ``_lora_shrink_kernel`` ->
           ``_lora_gemm_kernel``
  backward ``_lora_gemm_kernel`` (dx, which then also forms dxa and dB from the dy tiles it loads: dy is read
           once) -> ``_lora_da_kernel`` under the same condition; else ``_lora_dy_kernel`` (dxa, dB) ->
           ``_lora_gemm_kernel`` (dx) -> ``_lora_da_kernel``
The dx GEMM with dropout forms the masked r-wide term first, in the accumulator the K loop then adds to (one fp32
tile live, not two). Byte traffic of each path: tests/test_traffic.py.

Dropout: the keep-mask is never stored. Every kernel that needs it regenerates it from
``(seed, row of the 2-D x, column)`` with the counter hash of ``reference.dropout_keep_mask`` in uint32
wrap-around arithmetic, so forward, backward and the reference agree bit for bit.

Numerics:
  * Every product accumulates in fp32.
  * fp32 inputs use TF32 tensor cores by default (Triton feeds fp32 to TF32 MMA without rounding the
    13 dropped mantissa bits: ~8e-4 relative error on random data). Set ``LORA_KERNELS_FP32_PRECISION=ieee``
    for exact fp32 products (``tl.dot(..., input_precision="ieee")``; much slower). The variable is read
    on every call ("tf32" or "ieee"; anything else raises). 16-bit inputs are unaffected by it.
  * The r-wide fp32 intermediates (xa, dxa) meet the 16-bit weights on tensor cores. For bf16 inputs
    they are rounded to bf16 first (bf16 has fp32's range; the rounding, 2^-9 relative, is of the same
    order as the final bf16 rounding of y/dx). For fp16 and fp32 inputs they stay fp32 (TF32 / IEEE
    products), so nothing can overflow fp16's range.
  * dA, dB and dxa are accumulated with fp32 atomics across the program blocks that split their
    reduction (M for dA and dB, N for dxa, sized to fill the GPU); their last bits can depend on the
    order of those additions (run-to-run non-determinism at the fp32 rounding level).

Autotuning: each kernel has one config list (Hopper and Ampere tile shapes together; configs that do not
fit the GPU's shared memory are skipped by the autotuner), keyed on M rounded up to a power of two, the
other dimensions and the rank tile. Under ``TRITON_INTERPRET=1`` each kernel has a single small config.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, autotune_configs, dropout_args, grouped_pid, keep_mask

__all__ = ["lora_linear_fwd_triton", "lora_linear_bwd_triton"]

ENV_FP32_PRECISION = "LORA_KERNELS_FP32_PRECISION"
# Widest rank chunk held in one tile. Small under the interpreter so that the tests' ranks 64/128 exercise
# the multi-chunk paths that large ranks (> 128) take on a GPU.
_MAX_BLOCK_R = 32 if INTERPRET else 128
# Widest rank whose shrink the forward GEMM computes in its K loop (one extra [BLOCK_M, BLOCK_R] fp32 accumulator,
# r/BLOCK_N more tensor-core work per tile) instead of a separate shrink kernel that reads x a second time.
FUSED_SHRINK_MAX_R = 32


# ----------------------------------------------------------------------------------------------
# Autotune configurations: one list per kernel, Hopper (H100) and Ampere (A100) shapes together.
# ----------------------------------------------------------------------------------------------


def _gemm(bm, bn, bk, g, w, s):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g), w, s


def _mk(bm, bk, w, s):
    return dict(BLOCK_M=bm, BLOCK_K=bk), w, s


def _mn(bm, bn, w, s):
    return dict(BLOCK_M=bm, BLOCK_N=bn), w, s


GEMM_CONFIGS = autotune_configs(
    [
        # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
        _gemm(128, 256, 64, 8, 8, 3),  # Hopper: large tiles, deep enough pipeline for wgmma
        _gemm(256, 128, 64, 8, 8, 3),  # Hopper
        _gemm(128, 128, 64, 8, 8, 4),  # Hopper / Ampere
        _gemm(128, 128, 64, 8, 4, 4),
        _gemm(128, 128, 32, 8, 4, 4),  # Ampere
        _gemm(128, 64, 32, 8, 4, 4),  # Ampere
        _gemm(64, 128, 32, 8, 4, 4),  # Ampere, mid M
        _gemm(64, 128, 64, 8, 4, 4),  # small M (decode / short prefill)
        _gemm(32, 64, 64, 8, 4, 5),  # small M
        _gemm(16, 128, 128, 8, 4, 4),  # M <= 16
        _gemm(32, 64, 64, 8, 4, 2),  # lean: fits any GPU's shared memory for fp32 with 128-wide rank tiles
    ],
    _gemm(32, 32, 32, 4, 4, 1),
)
SHRINK_CONFIGS = autotune_configs(
    [
        # (BLOCK_M, BLOCK_K, num_warps, num_stages); memory-bound: enough rows in flight, wide K steps
        _mk(128, 128, 8, 3),
        _mk(64, 128, 4, 4),
        _mk(64, 64, 4, 4),
        _mk(32, 128, 4, 4),
        _mk(16, 256, 4, 3),
        _mk(32, 64, 4, 2),  # lean: fits any GPU's shared memory for fp32 with 128-wide rank tiles
    ],
    _mk(32, 32, 4, 1),
)
DY_CONFIGS = autotune_configs(
    [
        # (BLOCK_M, BLOCK_N, num_warps, num_stages); large BLOCK_M = fewer dB atomics per element
        _mn(256, 64, 8, 3),
        _mn(128, 128, 8, 3),
        _mn(128, 64, 4, 4),
        _mn(64, 128, 4, 4),
        _mn(32, 128, 4, 4),
        _mn(16, 256, 4, 3),
        _mn(16, 64, 4, 2),  # lean: fits any GPU's shared memory for fp32 with 128-wide rank tiles
    ],
    _mn(32, 32, 4, 1),
)
DA_CONFIGS = autotune_configs(
    [
        # (BLOCK_M, BLOCK_K, num_warps, num_stages)
        _mk(128, 128, 8, 3),
        _mk(64, 128, 4, 4),
        _mk(128, 64, 4, 4),
        _mk(64, 64, 4, 4),
        _mk(32, 128, 4, 4),
    ],
    _mk(32, 32, 4, 1),
)


# From LARGE_M rows on, the autotuner only considers row tiles of at least LARGE_M_MIN_BLOCK_M (the narrow tiles
# are for decode-sized M: at large M they re-read the weight every 16-32 rows, and some spill registers on Hopper).
# tests/test_triton_compile.py checks that no config these leave spills.
LARGE_M = 2048
LARGE_M_MIN_BLOCK_M = 64


def _prune_by_m(configs, named_args, **kwargs):
    """Drop row tiles far wider than M (decode-sized M would waste most of each tile), and narrow ones at large M."""
    m_bucket = int(named_args["m_bucket"])
    cap = max(32, m_bucket * 2)
    lo = LARGE_M_MIN_BLOCK_M if m_bucket >= LARGE_M else 0
    kept = [c for c in configs if lo <= c.kwargs["BLOCK_M"] <= cap]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=SHRINK_CONFIGS, key=["m_bucket", "K", "BLOCK_R", "DROPOUT"], prune_configs_by={"early_config_prune": _prune_by_m})
@triton.jit(do_not_specialize=["seed_hash", "threshold"])
def _lora_shrink_kernel(
    x_ptr, a_ptr, xa_ptr,
    M, K, R,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_xam, stride_xar,
    seed_hash, threshold, keep_scale, m_bucket,
    DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # xa[m, j] = keep_scale · Σ_k keep[m, k]·x[m, k]·A[j, k]   (fp32 out).
    # Reads x [M, K] and A [r, K]; writes xa [M, r]. Grid: (row blocks, rank chunks).
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    r_ok = offs_r < R
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + offs_r.to(tl.int64)[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            keep = keep_mask(seed_hash, offs_m, kk, threshold)
            xt = tl.where(keep, xt, tl.zeros_like(xt))
        at = tl.load(a_cols + kk[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=INPUT_PRECISION)
    if DROPOUT:
        acc = acc * keep_scale  # 1/(1-p) applied once, on the fp32 sum
    out = xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r[None, :] * stride_xar
    tl.store(out, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_tile(acc, l_ptr, rt_ptr, offs_m, offs_n, m_ok, n_ok, R, stride_lm, stride_lr, stride_rtr, stride_rtn, l_scale,
               EPI_LOW: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + l_scale·L[m-tile, :R]·Rt[:R, n-tile] on tensor cores, the rank in BLOCK_R chunks (masked, never padded
    in memory). EPI_LOW: L meets Rt in Rt's 16-bit dtype (bf16, where fp32 x bf16 has no MMA); else in fp32."""
    l_rows = l_ptr + offs_m.to(tl.int64)[:, None] * stride_lm
    rt_cols = rt_ptr + offs_n.to(tl.int64)[None, :] * stride_rtn
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        r_ok = rr < R
        lt = tl.load(l_rows + rr[None, :] * stride_lr, mask=m_ok[:, None] & r_ok[None, :], other=0.0) * l_scale
        rt = tl.load(rt_cols + rr[:, None] * stride_rtr, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if EPI_LOW:
            lt = lt.to(rt.dtype)
        else:
            rt = rt.to(tl.float32)
        acc = tl.dot(lt, rt, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.autotune(
    configs=GEMM_CONFIGS,
    key=["m_bucket", "N", "K", "R", "BLOCK_R", "HAS_BIAS", "DROPOUT", "FUSED_SHRINK", "COL_SCALE", "AOP_SCALE"],
    prune_configs_by={"early_config_prune": _prune_by_m},
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["seed_hash", "threshold"])
def _lora_gemm_kernel(
    a_ptr, b_ptr, c_ptr, l_ptr, rt_ptr, bias_ptr, sa_ptr, xa_ptr, db_ptr,
    M, N, K, R,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cm, stride_cn,
    stride_lm, stride_lr,
    stride_rtr, stride_rtn,
    stride_sar, stride_sak,
    stride_xam, stride_xar,
    l_scale, shrink_scale, seed_hash, threshold, keep_scale, m_bucket,
    g_ptr, pre_ptr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EPI_LOW: tl.constexpr, FUSED_SHRINK: tl.constexpr,
    COMPUTE_DB: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    COL_SCALE: tl.constexpr, SAVE_PRE: tl.constexpr, AOP_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # C[m, n] = Σ_k Aop[m, k]·Bop[k, n] + bias[n] + drop'_{m,n}(l_scale · Σ_j L[m, j]·Rt[j, n]), one store.
    # Forward: Aop = x, Bop = W0ᵀ, L = xa, Rt = Bᵀ (no mask). Backward dx: Aop = dy, Bop = W0, L = dxa,
    # Rt = A, mask regenerated at (m, n). Reads Aop, Bop, L [M, r] fp32, Rt [r, N], bias; writes C.
    # FUSED_SHRINK (no dropout, R <= BLOCK_R): L is not read but computed in the K loop from the Aop tiles already
    # loaded, L = shrink_scale·Aop·SAᵀ, and the programs of the first column tile store it. Forward: SA = A [R, K],
    # L = xa (x read once). Backward dx: SA = B [N, R], shrink_scale = s, L = dxa (dy read once). COMPUTE_DB (dx with
    # FUSED_SHRINK): those programs also add s·Aopᵀ·XA (XA = xa [M, R] fp32) into the zeroed fp32 dB [N, R]
    # with atomics, one partial sum per row tile, so no other kernel reads dy.
    # DoRA (g: fp32 [N] per-output-column factor, lora_kernels/triton/dora.py), all off for plain LoRA:
    # COL_SCALE (forward): C = g[n]·(Aop·Bop + l_scale·L·Rt)[m, n] + bias[n], and SAVE_PRE stores the un-scaled sum
    # (ypre, C's dtype and strides) to pre_ptr first. AOP_SCALE (backward dx): every Aop tile is read as dy⊙g,
    # g indexed by the GEMM's K (N of the layer), so dx, the fused dxa and dB all see dy' = dy⊙g.
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns wrap onto valid ones (their results are never stored): unmasked loads.
    offs_am = (offs_m % M).to(tl.int64)
    offs_bn = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSED_SHRINK:
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        sa_ptrs = sa_ptr + offs_r[None, :] * stride_sar + offs_k[:, None] * stride_sak  # SAᵀ tile [BLOCK_K, BLOCK_R]
        l_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if COMPUTE_DB:
            # xa rows past M are zero, so the wrapped rows of the Aop tiles add nothing to dB
            xa_t = tl.load(xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                           mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            if EPI_LOW:
                xa_t = xa_t.to(a_ptr.dtype.element_ty)
    if DROPOUT:
        # The masked r-wide term first, in the one accumulator the main loop then adds to: a second full fp32
        # tile held across the K loop spilled on Hopper's large tiles.
        acc = _lora_tile(acc, l_ptr, rt_ptr, offs_m, offs_n, m_ok, n_ok, R, stride_lm, stride_lr, stride_rtr, stride_rtn,
                         l_scale, EPI_LOW, BLOCK_R, INPUT_PRECISION)
        keep = keep_mask(seed_hash, offs_m, offs_n, threshold)
        acc = tl.where(keep, acc * keep_scale, 0.0)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            at = tl.load(a_ptrs)
            bt = tl.load(b_ptrs)
        else:
            k_left = K - k0
            at = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            bt = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if AOP_SCALE:
            gk = tl.load(g_ptr + k0 + offs_k, mask=(k0 + offs_k) < K, other=0.0)
            at = (at.to(tl.float32) * gk[None, :]).to(at.dtype)
        if FUSED_SHRINK:
            if EVEN_K:
                st = tl.load(sa_ptrs, mask=r_ok[None, :], other=0.0)
            else:
                st = tl.load(sa_ptrs, mask=r_ok[None, :] & (offs_k[:, None] < k_left), other=0.0)
            l_acc = tl.dot(at, st, l_acc, input_precision=INPUT_PRECISION)
            sa_ptrs += BLOCK_K * stride_sak
            if COMPUTE_DB:
                if pid_n == 0:
                    if EPI_LOW:
                        part = tl.dot(tl.trans(at), xa_t, input_precision=INPUT_PRECISION)
                    else:
                        part = tl.dot(tl.trans(at).to(tl.float32), xa_t, input_precision=INPUT_PRECISION)
                    kk = k0 + offs_k
                    tl.atomic_add(db_ptr + kk.to(tl.int64)[:, None] * R + offs_r[None, :], part * shrink_scale,
                                  mask=(kk[:, None] < K) & r_ok[None, :], sem="relaxed")
        acc = tl.dot(at, bt, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if FUSED_SHRINK:
        l_acc = l_acc * shrink_scale
        if pid_n == 0:
            l_out = l_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + offs_r[None, :] * stride_lr
            tl.store(l_out, l_acc, mask=m_ok[:, None] & r_ok[None, :])
        rt = tl.load(rt_ptr + offs_n.to(tl.int64)[None, :] * stride_rtn + offs_r[:, None] * stride_rtr,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        lt = l_acc * l_scale
        if EPI_LOW:
            lt = lt.to(rt.dtype)
        else:
            rt = rt.to(tl.float32)
        acc = tl.dot(lt, rt, acc, input_precision=INPUT_PRECISION)
    elif not DROPOUT:
        # Epilogue: the r-wide LoRA product on tensor cores, rank padded to BLOCK_R (chunks when r > BLOCK_R).
        acc = _lora_tile(acc, l_ptr, rt_ptr, offs_m, offs_n, m_ok, n_ok, R, stride_lm, stride_lr, stride_rtr, stride_rtn,
                         l_scale, EPI_LOW, BLOCK_R, INPUT_PRECISION)
    c_offs = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    if SAVE_PRE:
        tl.store(pre_ptr + c_offs, acc.to(pre_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if COL_SCALE:
        gn = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)
        acc = acc * gn[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(
    configs=DY_CONFIGS,
    key=["m_bucket", "N", "R", "BLOCK_R", "COMPUTE_DXA", "COMPUTE_DB", "DY_SCALE", "COMPUTE_DM"],
    reset_to_zero=["dxa_ptr", "db_ptr", "dm_ptr"],
    prune_configs_by={"early_config_prune": _prune_by_m},
)
@triton.jit
def _lora_dy_kernel(
    dy_ptr, b_ptr, xa_ptr, dxa_ptr, db_ptr,
    M, N, R,
    stride_dym, stride_dyn,
    stride_bn, stride_br,
    stride_xam, stride_xar,
    scale, m_bucket, g_ptr, pre_ptr, dm_ptr, stride_pm, stride_pn,
    COMPUTE_DXA: tl.constexpr, COMPUTE_DB: tl.constexpr, EPI_LOW: tl.constexpr,
    BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr, DY_SCALE: tl.constexpr, COMPUTE_DM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One pass over dy: dxa[m, j] += s·Σ_n dy[m, n]·B[n, j] and dB[n, j] += s·Σ_m dy[m, n]·xa[m, j].
    # Reads dy [M, N] once, B [N, r], xa [M, r] fp32; accumulates into zeroed fp32 dxa [M, r] and dB [N, r]
    # with atomics. Grid: (row blocks, splits of the column blocks, rank chunks).
    # DY_SCALE (DoRA): dy is read as dy⊙g, g fp32 [N] (one factor per column). COMPUTE_DM (DoRA): the programs of
    # the first rank chunk also add Σ_m dy[m, n]·ypre[m, n] (the un-scaled dy, ypre [M, N]) into the zeroed fp32
    # dm [N] with atomics, so no other kernel reads dy for dm.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    n_blocks = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_blocks, tl.num_programs(1))
    nb_start = pid_s * per_split
    nb_end = min(nb_start + per_split, n_blocks)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    r_ok = offs_r < R
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    if COMPUTE_DB:
        xa_t = tl.load(xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                       mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        if EPI_LOW:
            xa_t = xa_t.to(dy_ptr.dtype.element_ty)
    if COMPUTE_DXA:
        dxa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for nb in range(nb_start, nb_end):
        offs_n = nb * BLOCK_N + offs_n0
        n_ok = offs_n < N
        dyt = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if COMPUTE_DM:
            if pid_r == 0:
                pt = tl.load(pre_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                             mask=m_ok[:, None] & n_ok[None, :], other=0.0)
                part_m = tl.sum(dyt.to(tl.float32) * pt.to(tl.float32), axis=0)
                tl.atomic_add(dm_ptr + offs_n, part_m, mask=n_ok, sem="relaxed")
        if DY_SCALE:
            gn = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)
            dyt = (dyt.to(tl.float32) * gn[None, :]).to(dyt.dtype)
        if COMPUTE_DXA:
            bt = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_r[None, :] * stride_br,
                         mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            dxa = tl.dot(dyt, bt.to(dyt.dtype), dxa, input_precision=INPUT_PRECISION)
        if COMPUTE_DB:
            if EPI_LOW:
                part = tl.dot(tl.trans(dyt), xa_t, input_precision=INPUT_PRECISION)
            else:
                part = tl.dot(tl.trans(dyt.to(tl.float32)), xa_t, input_precision=INPUT_PRECISION)
            db_ptrs = db_ptr + offs_n.to(tl.int64)[:, None] * R + offs_r[None, :]
            tl.atomic_add(db_ptrs, part * scale, mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
    if COMPUTE_DXA:
        dxa_ptrs = dxa_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
        tl.atomic_add(dxa_ptrs, dxa * scale, mask=m_ok[:, None] & r_ok[None, :], sem="relaxed")


@triton.autotune(
    configs=DA_CONFIGS,
    key=["m_bucket", "K", "R", "BLOCK_R", "DROPOUT"],
    reset_to_zero=["da_ptr"],
    prune_configs_by={"early_config_prune": _prune_by_m},
)
@triton.jit(do_not_specialize=["seed_hash", "threshold"])
def _lora_da_kernel(
    dxa_ptr, x_ptr, da_ptr,
    M, K, R,
    stride_xm, stride_xk,
    seed_hash, threshold, keep_scale, m_bucket,
    DROPOUT: tl.constexpr, EPI_LOW: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dA[j, k] += keep_scale · Σ_m dxa[m, j]·keep[m, k]·x[m, k]  over this program's row blocks.
    # Reads dxa [M, r] fp32 (contiguous) and x [M, K]; accumulates into zeroed fp32 dA [r, K] with atomics.
    # Grid: (column blocks of K, splits of the row blocks, rank chunks).
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    m_blocks = tl.cdiv(M, BLOCK_M)
    per_split = tl.cdiv(m_blocks, tl.num_programs(1))
    mb_start = pid_s * per_split
    mb_end = min(mb_start + per_split, m_blocks)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m0 = tl.arange(0, BLOCK_M)
    k_ok = offs_k < K
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for mb in range(mb_start, mb_end):
        offs_m = mb * BLOCK_M + offs_m0
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)
        # dxaᵀ tile [BLOCK_R, BLOCK_M], loaded transposed (dxa is our contiguous [M, R] buffer)
        gt = tl.load(dxa_ptr + rows[None, :] * R + offs_r[:, None], mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            keep = keep_mask(seed_hash, offs_m, offs_k, threshold)
            xt = tl.where(keep, xt, tl.zeros_like(xt))
        if EPI_LOW:
            acc = tl.dot(gt.to(xt.dtype), xt, acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(gt, xt.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    if DROPOUT:
        acc = acc * keep_scale
    da_ptrs = da_ptr + offs_r.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.atomic_add(da_ptrs, acc, mask=r_ok[:, None] & k_ok[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer (tests replace this to poison outputs before kernels write them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: "tf32" (default) or "ieee" from $LORA_KERNELS_FP32_PRECISION, for fp32
    inputs. 16-bit inputs always pass "tf32" (it only affects their fp32 LoRA-side products)."""
    v = os.environ.get(ENV_FP32_PRECISION, "tf32").strip().lower()
    if v not in ("tf32", "ieee"):
        raise ValueError(f"${ENV_FP32_PRECISION} must be 'tf32' or 'ieee', got {v!r}")
    return v if dtype == torch.float32 else "tf32"


def _block_r(r: int) -> int:
    return min(_MAX_BLOCK_R, max(16, triton.next_power_of_2(r)))


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


@functools.lru_cache(maxsize=None)
def _target_programs(device_index) -> int:
    """Programs wanted in flight for the split-reduction kernels (about two per SM)."""
    if INTERPRET or device_index is None:
        return 4  # small, but > 1 split on test shapes so the atomic paths are exercised
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _target(t: torch.Tensor) -> int:
    return _target_programs(t.device.index if t.device.type == "cuda" else None)


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _safe_2d(t: torch.Tensor) -> torch.Tensor:
    """Keep strided views, unless a non-unit column stride could overflow int32 column offsets."""
    if t.stride(1) != 1 and t.shape[1] * abs(t.stride(1)) >= 2**31:
        return t.contiguous()
    return t


def lora_linear_fwd_triton(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed):
    """Fused forward. x [M, K] (any strides), weight [N, K], lora_a [r, K], lora_b [N, r], bias [N] or None.

    Returns ``(y [M, N] in x.dtype, xa [M, r] fp32)``; see the module docstring."""
    y, xa, _ = fwd(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed)
    return y, xa


def fwd(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, g=None, save_pre=False):
    """:func:`lora_linear_fwd_triton`, and DoRA's forward when ``g`` (fp32 [N], contiguous) is given: the GEMM epilogue
    multiplies column n by g[n] before adding the bias, and with ``save_pre`` first stores the un-scaled result.
    Returns ``(y, xa, ypre or None)``."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_a.shape[0]
    y = _alloc((M, N), x.dtype, x.device)
    xa = _alloc((M, R), torch.float32, x.device)
    pre = _alloc((M, N), x.dtype, x.device) if save_pre else None
    if M == 0:
        return y, xa, pre
    if lora_a.dtype != x.dtype:
        lora_a = lora_a.to(x.dtype)
    if lora_b.dtype != x.dtype:
        lora_b = lora_b.to(x.dtype)
    x = _safe_2d(x)
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias with unit stride
    precision = _input_precision(x.dtype)
    dropout, seed_hash, threshold, keep_scale = dropout_args(dropout_p, seed)
    block_r = _block_r(R)
    m_bucket = _m_bucket(M)
    # x·Aᵀ inside the GEMM's K loop (x read once) for small ranks without dropout; otherwise a shrink kernel first
    # (the dropout hash would be recomputed by every column tile, and wide ranks would hold a wide extra accumulator).
    fused = N > 0 and not dropout and R <= min(block_r, FUSED_SHRINK_MAX_R)
    with _device_ctx(x):
        if not fused:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r))  # noqa: E731
            _lora_shrink_kernel[grid](
                x, lora_a, xa,
                M, K, R,
                x.stride(0), x.stride(1),
                lora_a.stride(0), lora_a.stride(1),
                xa.stride(0), xa.stride(1),
                seed_hash, threshold, keep_scale, m_bucket,
                DROPOUT=dropout, BLOCK_R=block_r, INPUT_PRECISION=precision,
            )
        if N > 0:
            _launch_gemm(
                x, weight, y, xa, lora_b, bias,
                M=M, N=N, K=K, R=R,
                stride_b=(weight.stride(1), weight.stride(0)),  # Bop[k, n] = W0[n, k]
                stride_rt=(lora_b.stride(1), lora_b.stride(0)),  # Rt[j, n] = B[n, j]
                l_scale=float(scale), dropout=(False, 0, 0, 1.0), precision=precision,
                block_r=block_r, m_bucket=m_bucket,
                shrink=(lora_a, lora_a.stride(0), lora_a.stride(1)) if fused else None,
                g=g, pre=pre,
            )
    return y, xa, pre


def _launch_gemm(a, b, c, l, rt, bias, *, M, N, K, R, stride_b, stride_rt, l_scale, dropout, precision, block_r, m_bucket,
                 shrink=None, shrink_scale=1.0, db=None, g=None, pre=None, aop_scale=False):
    """``shrink``: (SA, stride over r, stride over the GEMM's K) for FUSED_SHRINK (then ``l`` is an output, written
    by the kernel); ``db``: (xa, dB fp32 zeroed) for COMPUTE_DB. DoRA: ``g`` (fp32 contiguous) scales the output
    columns (COL_SCALE; ``pre``, same layout as c, receives the un-scaled result), or with ``aop_scale`` the Aop
    columns (AOP_SCALE: dy⊙g in the dx GEMM)."""
    drop, seed_hash, threshold, keep_scale = dropout
    sa, stride_sar, stride_sak = shrink if shrink is not None else (rt, 0, 0)
    xa, db32 = db if db is not None else (l, l)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _lora_gemm_kernel[grid](
        a, b, c, l, rt, bias if bias is not None else c, sa, xa, db32,
        M, N, K, R,
        a.stride(0), a.stride(1),
        stride_b[0], stride_b[1],
        c.stride(0), c.stride(1),
        l.stride(0), l.stride(1),
        stride_rt[0], stride_rt[1],
        stride_sar, stride_sak,
        xa.stride(0), xa.stride(1),
        l_scale, float(shrink_scale), seed_hash, threshold, keep_scale, m_bucket,
        g if g is not None else c, pre if pre is not None else c,
        HAS_BIAS=bias is not None, DROPOUT=drop, EPI_LOW=(c.dtype == torch.bfloat16),
        FUSED_SHRINK=shrink is not None, COMPUTE_DB=db is not None, BLOCK_R=block_r, INPUT_PRECISION=precision,
        COL_SCALE=g is not None and not aop_scale, SAVE_PRE=pre is not None, AOP_SCALE=g is not None and aop_scale,
    )


def launch_dy(dy, b_op, xa, dxa, db32, scale, *, block_r, m_bucket, precision, g=None, dm=None) -> None:
    """One pass over dy [M, N]: dxa += s·dy·B into the zeroed fp32 ``dxa`` [M, R] and dB += s·dyᵀ·xa into the zeroed
    fp32 ``db32`` [N, R] (either may be None), split over N so about two programs per SM are in flight. DoRA: with
    ``g`` (fp32 [N] contiguous) dy is read as dy⊙g; with ``dm`` = (ypre [M, N], zeroed fp32 dm [N]) the same pass adds
    Σ_m dy⊙ypre into dm."""
    M, N = dy.shape
    R = b_op.shape[1]
    r_chunks = triton.cdiv(R, block_r)
    target = _target(dy)

    def grid(meta):
        m_blocks = triton.cdiv(M, meta["BLOCK_M"])
        n_blocks = triton.cdiv(N, meta["BLOCK_N"])
        return (m_blocks, max(1, min(n_blocks, target // (m_blocks * r_chunks))), r_chunks)

    _lora_dy_kernel[grid](
        dy, b_op, xa, dxa if dxa is not None else db32, db32 if db32 is not None else dxa,
        M, N, R,
        dy.stride(0), dy.stride(1),
        b_op.stride(0), b_op.stride(1),
        xa.stride(0), xa.stride(1),
        float(scale), m_bucket, g if g is not None else xa,
        dm[0] if dm is not None else dy, dm[1] if dm is not None else (dxa if dxa is not None else db32),
        dm[0].stride(0) if dm is not None else 0, dm[0].stride(1) if dm is not None else 0,
        COMPUTE_DXA=dxa is not None, COMPUTE_DB=db32 is not None, EPI_LOW=dy.dtype == torch.bfloat16,
        BLOCK_R=block_r, INPUT_PRECISION=precision, DY_SCALE=g is not None, COMPUTE_DM=dm is not None,
    )


def launch_da(dxa, x, drop_args, *, block_r, m_bucket, precision) -> torch.Tensor:
    """dA = dxaᵀ·drop(x) as a new fp32 [R, K] tensor (dxa fp32 [M, R] contiguous, x [M, K] any strides), split over
    M so about two programs per SM are in flight."""
    M, R = dxa.shape
    K = x.shape[1]
    da32 = torch.zeros((R, K), dtype=torch.float32, device=dxa.device)
    if K == 0 or M == 0:
        return da32
    xs = _safe_2d(x)
    drop, seed_hash, threshold, keep_scale = drop_args
    r_chunks = triton.cdiv(R, block_r)
    target = _target(xs)

    def grid(meta):
        k_blocks = triton.cdiv(K, meta["BLOCK_K"])
        m_blocks = triton.cdiv(M, meta["BLOCK_M"])
        return (k_blocks, max(1, min(m_blocks, target // (k_blocks * r_chunks))), r_chunks)

    _lora_da_kernel[grid](
        dxa, xs, da32,
        M, K, R,
        xs.stride(0), xs.stride(1),
        seed_hash, threshold, keep_scale, m_bucket,
        DROPOUT=drop, EPI_LOW=xs.dtype == torch.bfloat16, BLOCK_R=block_r, INPUT_PRECISION=precision,
    )
    return da32


def lora_linear_bwd_triton(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask, g=None, dm=None):
    """Fused backward. dy [M, N] (any strides), x [M, K] or None (LoRA-FA), xa [M, r] fp32 from the forward.

    ``output_mask`` selects (dx, dA, dB, dW0); the others come back as None. Gradients are in their
    parameter's dtype (dx in dy.dtype); see the module docstring. DoRA (no dropout): with ``g`` (fp32 [N]
    contiguous) every kernel reads dy as dy⊙g (the dx GEMM's Aop tiles, the dy kernel's tiles) and the backward takes
    the unfused path, whose dy kernel runs whenever M > 0, N > 0 and dx, dA or dB is asked for; ``dm`` = (ypre,
    zeroed fp32 dm [N]): that dy kernel also accumulates Σ_m dy⊙ypre into dm."""
    need_dx, need_da, need_db, need_dw = (bool(v) for v in output_mask)
    M, N = dy.shape
    R, K = lora_a.shape
    if (need_da or need_dw) and x is None:
        raise ValueError("lora_linear backward: dA / dW0 were requested but x was not saved")
    dev = dy.device
    if M == 0:
        return (
            torch.empty((0, K), dtype=dy.dtype, device=dev) if need_dx else None,
            torch.zeros((R, K), dtype=lora_a.dtype, device=dev) if need_da else None,
            torch.zeros((N, R), dtype=lora_b.dtype, device=dev) if need_db else None,
            torch.zeros((N, K), dtype=weight.dtype, device=dev) if need_dw else None,
        )
    a_op = lora_a if lora_a.dtype == dy.dtype else lora_a.to(dy.dtype)
    b_op = lora_b if lora_b.dtype == dy.dtype else lora_b.to(dy.dtype)
    dy = _safe_2d(dy)
    if xa.dtype != torch.float32:
        xa = xa.float()
    precision = _input_precision(dy.dtype)
    drop_args = dropout_args(dropout_p, seed)
    block_r = _block_r(R)
    m_bucket = _m_bucket(M)
    need_dxa = need_dx or need_da
    # As in the forward: without dropout and for small ranks the dx GEMM also forms dxa = s·dy·B in its K loop and
    # dB = s·dyᵀ·xa from the dy tiles it loads, so dy is read once and the dy kernel does not run.
    # DoRA (g) takes the unfused path: with AOP_SCALE the fused dx GEMM spilled registers on Hopper's large tiles
    # (tests/triton_aot.py), the unfused one does not; the cost is one more read of dy (by the dy kernel).
    fused = (need_dx and K > 0 and N > 0 and not drop_args[0] and R <= min(block_r, FUSED_SHRINK_MAX_R)
             and g is None)
    dx = da = db = dw = None
    with _device_ctx(dy):
        if fused:
            dxa = _alloc((M, R), torch.float32, dev)
        else:
            dxa = torch.zeros((M, R), dtype=torch.float32, device=dev) if need_dxa else None
        db32 = torch.zeros((N, R), dtype=torch.float32, device=dev) if need_db else None
        if (need_dxa or need_db) and N > 0 and not fused:
            launch_dy(dy, b_op, xa, dxa, db32, scale, block_r=block_r, m_bucket=m_bucket, precision=precision, g=g,
                      dm=dm)
        if need_dx:
            dx = _alloc((M, K), dy.dtype, dev)
            if K > 0:
                _launch_gemm(
                    dy, weight, dx, dxa, a_op, None,
                    M=M, N=K, K=N, R=R,
                    stride_b=(weight.stride(0), weight.stride(1)),  # Bop[n, k] = W0[n, k]
                    stride_rt=(a_op.stride(0), a_op.stride(1)),  # Rt[j, k] = A[j, k]
                    l_scale=1.0, dropout=drop_args, precision=precision,
                    block_r=block_r, m_bucket=m_bucket,
                    shrink=(b_op, b_op.stride(1), b_op.stride(0)) if fused else None,  # SAᵀ[n, j] = B[n, j]
                    shrink_scale=float(scale), db=(xa, db32) if (fused and need_db) else None,
                    g=g, aop_scale=True,
                )
        if need_da:
            da = launch_da(dxa, x, drop_args, block_r=block_r, m_bucket=m_bucket, precision=precision).to(lora_a.dtype)
        if need_db:
            db = db32.to(lora_b.dtype)
        if need_dw:
            dyw = dy if g is None else (dy.float() * g).to(dy.dtype)
            dw = torch.matmul(dyw.t(), x.to(dy.dtype)).to(weight.dtype)
    return dx, da, db, dw
