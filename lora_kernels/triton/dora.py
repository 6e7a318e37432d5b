"""Triton launchers of the DoRA linear layer: without dropout lora_linear's fused GEMM kernels with DoRA's per-column
factor g = m / ‖W0 + s·B·A‖ in them, plus one column-reduction kernel for dm; with dropout one two-accumulator GEMM
kernel of its own (below) next to lora_linear's dy and dA kernels.

Semantics: :func:`lora_kernels.reference.dora_linear_fwd_ref` / :func:`~lora_kernels.reference.dora_linear_bwd_ref`
with dropout_p = 0 (x [M, K], W0 [N, K], A [r, K], B [N, r], g fp32 [N])::

    forward   xa = x·Aᵀ; ypre = x·W0ᵀ + s·xa·Bᵀ; y = g⊙ypre + bias      lora_linear's forward kernels, the GEMM epilogue
                                                                      multiplying column n by g[n] (COL_SCALE) and,
                                                                      when the magnitude trains, storing ypre first
                                                                      (SAVE_PRE)
    backward  dx, dA, dB = lora_linear's backward with dy' = dy⊙g       every kernel scales the dy tiles it loads
                                                                      (AOP_SCALE in the dx GEMM, DY_SCALE in the dy
                                                                      kernel): dy' is never stored
              dm = Σ_t dy⊙ypre / norm                                in the same pass of lora_linear's dy kernel over
                                                                      dy (COMPUTE_DM); ``_dora_dm_kernel`` when that
                                                                      kernel does not run (A, B and x frozen)

With dropout (public op ``dora_linear_dropout``; PEFT applies W0 twice, to x and to the dropped x): keep = the seeded
hash mask of lora_linear (regenerated in-kernel, never stored), xk = x⊙keep (exact), inv = 1/(1−p)::

    forward   xa = inv·xk·Aᵀ; zd = inv·xk·W0ᵀ; ypre = zd + s·xa·Bᵀ     ``_dora_dropout_gemm_kernel`` (FORWARD): one
              y = (x·W0ᵀ − zd) + g⊙ypre + bias                         pass over x and W0; each x tile is masked in
                (= x·W0ᵀ + bias + (g−1)⊙zd + g⊙s·xa·Bᵀ)                 registers and feeds two fp32 accumulators
                                                                     (x·W0ᵀ, xk·W0ᵀ) and, for r <= 32, the shrink
                                                                     (xk·Aᵀ); wider ranks: lora_linear's dropout
                                                                     shrink kernel first (x read twice)
    backward  dxa = s·dy'·B, dB = s·dy'ᵀ·xa, dm = Σ_t dy⊙ypre / norm  lora_linear's dy kernel (DY_SCALE, COMPUTE_DM):
                                                                     one pass over dy
              dx = dy·W0 + keep⊙inv·((dy⊙(g−1))·W0 + dxa·A)        ``_dora_dropout_gemm_kernel`` (not FORWARD): one
                                                                     pass over dy and W0, two accumulators, the mask
                                                                     in the epilogue
              dA = inv·dxaᵀ·xk                                      lora_linear's dA kernel (DROPOUT)
              dW0 = dyᵀ·x + (dy⊙(g−1))ᵀ·(inv·xk)                     torch (only when W0 requires grad)

Numerics as lora_linear's Triton kernels (fp32 accumulation; TF32 for fp32 inputs unless
LORA_KERNELS_FP32_PRECISION=ieee). dy' (and with dropout dy⊙(g−1)) is formed in fp32 and rounded to dy's dtype for
the tensor-core products (a 16-bit dy' carries one extra rounding, 2^-9 relative for bf16). With dropout x·W0ᵀ and
xk·W0ᵀ stay fp32 until the final y (the torch backend rounds xk·W0ᵀ to x's dtype first) and 1/(1−p) is applied to
fp32 sums, never to x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import lora_linear as tll
from ._common import autotune_configs, dropout_args, grouped_pid, keep_mask

__all__ = [
    "dora_linear_fwd_triton", "dora_linear_bwd_triton", "dora_dropout_fwd_triton", "dora_dropout_bwd_triton",
]


def _mn(bm, bn, w, s):
    return dict(BLOCK_M=bm, BLOCK_N=bn), w, s


DM_CONFIGS = autotune_configs(
    [
        # (BLOCK_M, BLOCK_N, num_warps, num_stages): a memory-bound column reduction over two M×N tensors
        _mn(64, 128, 4, 3),
        _mn(32, 256, 4, 3),
        _mn(128, 64, 4, 3),
        _mn(16, 128, 4, 2),
    ],
    _mn(16, 32, 4, 1),
)


@triton.autotune(configs=DM_CONFIGS, key=["m_bucket", "N"], reset_to_zero=["dm_ptr"])
@triton.jit
def _dora_dm_kernel(
    dy_ptr, pre_ptr, dm_ptr,
    M, N,
    stride_dym, stride_dyn,
    stride_pm, stride_pn,
    m_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # dm[n] += Σ_{m in this program's row blocks} dy[m, n]·ypre[m, n]   (fp32).
    # Reads dy [M, N] and ypre [M, N] once; accumulates into zeroed fp32 dm [N] with atomics.
    # Grid: (column blocks, splits of the row blocks).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    m_blocks = tl.cdiv(M, BLOCK_M)
    per_split = tl.cdiv(m_blocks, tl.num_programs(1))
    mb_start = pid_s * per_split
    mb_end = min(mb_start + per_split, m_blocks)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m0 = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for mb in range(mb_start, mb_end):
        offs_m = mb * BLOCK_M + offs_m0
        rows = offs_m.to(tl.int64)[:, None]
        mask = (offs_m < M)[:, None] & n_ok[None, :]
        d = tl.load(dy_ptr + rows * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(pre_ptr + rows * stride_pm + offs_n[None, :] * stride_pn, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(d * p, axis=0)
    tl.atomic_add(dm_ptr + offs_n, acc, mask=n_ok, sem="relaxed")


def _gemm(bm, bn, bk, g, w, s):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g), w, s


# Two fp32 [BLOCK_M, BLOCK_N] accumulators live across the K loop (plus the [BLOCK_M, BLOCK_R] shrink in the
# forward): a tile does twice the tensor-core work per loaded byte of a one-accumulator tile of its size, so 128x64 /
# 64x128 tiles here have the arithmetic intensity of lora_linear's 128x128 ones. 128x128 tiles spilled registers on
# sm_90 (255 registers + spills with bf16, more with fp32), as did 128x64 with 4 warps, and for fp32 on sm_80 so did
# 128x64 and 64x64 tiles with BLOCK_K = 64 (the masked copy of the x tile is a second register-resident operand there);
# tests/triton_aot.py checks that no config the autotuner can pick at large M spills.
DROP_GEMM_CONFIGS = autotune_configs(
    [
        # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
        _gemm(64, 128, 64, 8, 8, 3),  # Hopper / Ampere, large M
        _gemm(128, 64, 32, 8, 8, 4),
        _gemm(64, 128, 32, 8, 8, 4),
        _gemm(64, 64, 32, 8, 4, 4),  # mid M
        _gemm(32, 64, 64, 8, 4, 4),  # small M
        _gemm(16, 128, 64, 8, 4, 3),  # M <= 16
        _gemm(32, 64, 32, 8, 4, 2),  # lean: fits any GPU's shared memory for fp32
    ],
    _gemm(32, 32, 32, 4, 4, 1),
)
# Rank chunk of the r-wide epilogue product when xa / dxa is read (not fused): 32 keeps that product's fp32 operand
# tiles small next to the two accumulators (128-wide chunks needed over 227 KB of shared memory for fp32 on sm_90).
EPI_BLOCK_R = 32


@triton.autotune(
    configs=DROP_GEMM_CONFIGS,
    key=["m_bucket", "N", "K", "R", "BLOCK_R", "FORWARD", "HAS_BIAS", "FUSED_SHRINK", "SAVE_PRE"],
    prune_configs_by={"early_config_prune": tll._prune_by_m},
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["seed_hash", "threshold"])
def _dora_dropout_gemm_kernel(
    a_ptr, b_ptr, c_ptr, l_ptr, rt_ptr, sa_ptr, bias_ptr, g_ptr, pre_ptr,
    M, N, K, R,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cm, stride_cn,
    stride_lm, stride_lr,
    stride_rtr, stride_rtn,
    stride_sar, stride_sak,
    stride_pm, stride_pn,
    l_scale, seed_hash, threshold, keep_scale, m_bucket,
    FORWARD: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED_SHRINK: tl.constexpr, SAVE_PRE: tl.constexpr,
    EPI_LOW: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # DoRA with dropout, one pass over Aop and Bop: every Aop tile and Bop tile is loaded once and feeds two fp32
    # accumulators, acc = Aop·Bop and acc2 = Aop2·Bop, Aop2 formed from the Aop tile in registers.
    # FORWARD (Aop = x [M, K], Bop = W0ᵀ, C = y [M, N], Rt = Bᵀ [r, N], g fp32 [N]): Aop2 = x⊙keep (mask at (m, k)),
    #   zd = keep_scale·acc2; xa = keep_scale·(x⊙keep)·Aᵀ; ypre = zd + l_scale·xa·Bᵀ;
    #   y = (acc − zd) + g⊙ypre + bias; SAVE_PRE also stores ypre (pre_ptr, x's dtype).
    #   FUSED_SHRINK (R <= BLOCK_R): xa is accumulated in the K loop from the masked x tiles (SA = A [r, K]) and the
    #   programs of the first column tile store it to l_ptr (fp32 [M, r]); else l_ptr holds xa (read, r in chunks).
    # not FORWARD, the dx GEMM (Aop = dy [M, N_layer], Bop = W0 [N_layer, K_layer], C = dx [M, K_layer],
    #   L = dxa fp32 [M, r], Rt = A [r, K_layer], g indexed by the GEMM's K): Aop2 = dy⊙(g−1),
    #   dx = acc + keep⊙keep_scale·(acc2 + L·Rt), the mask regenerated at (m, n) in the epilogue.
    # Reads Aop and Bop once per tile pair, L or SA, Rt, g, bias; writes C (and xa, ypre).
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
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSED_SHRINK:
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        sa_ptrs = sa_ptr + offs_r[None, :] * stride_sar + offs_k[:, None] * stride_sak  # Aᵀ tile [BLOCK_K, BLOCK_R]
        l_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            at = tl.load(a_ptrs)
            bt = tl.load(b_ptrs)
        else:
            at = tl.load(a_ptrs, mask=kk[None, :] < K, other=0.0)
            bt = tl.load(b_ptrs, mask=kk[:, None] < K, other=0.0)
        if FORWARD:
            keep = keep_mask(seed_hash, offs_m, kk, threshold)
            at2 = tl.where(keep, at, tl.zeros_like(at))  # x⊙keep: exact in x's dtype
            if FUSED_SHRINK:
                if EVEN_K:
                    st = tl.load(sa_ptrs, mask=r_ok[None, :], other=0.0)
                else:
                    st = tl.load(sa_ptrs, mask=r_ok[None, :] & (kk[:, None] < K), other=0.0)
                l_acc = tl.dot(at2, st, l_acc, input_precision=INPUT_PRECISION)
                sa_ptrs += BLOCK_K * stride_sak
        else:
            gq = tl.load(g_ptr + kk, mask=kk < K, other=1.0) - 1.0
            at2 = (at.to(tl.float32) * gq[None, :]).to(at.dtype)  # dy⊙(g−1), rounded once to dy's dtype
        acc = tl.dot(at, bt, acc, input_precision=INPUT_PRECISION)
        acc2 = tl.dot(at2, bt, acc2, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ok = m_ok[:, None] & n_ok[None, :]
    if FORWARD:
        acc2 = acc2 * keep_scale  # zd = drop(x)·W0ᵀ
        acc = acc - acc2  # (x − drop(x))·W0ᵀ
        if FUSED_SHRINK:
            l_acc = l_acc * keep_scale  # xa = drop(x)·Aᵀ
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
            acc2 = tl.dot(lt, rt, acc2, input_precision=INPUT_PRECISION)
        else:
            acc2 = tll._lora_tile(acc2, l_ptr, rt_ptr, offs_m, offs_n, m_ok, n_ok, R, stride_lm, stride_lr, stride_rtr,
                                  stride_rtn, l_scale, EPI_LOW, BLOCK_R, INPUT_PRECISION)
        # acc2 = ypre
        if SAVE_PRE:
            p_offs = offs_m.to(tl.int64)[:, None] * stride_pm + offs_n.to(tl.int64)[None, :] * stride_pn
            tl.store(pre_ptr + p_offs, acc2.to(pre_ptr.dtype.element_ty), mask=c_ok)
        gn = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)
        acc += acc2 * gn[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            acc += bias[None, :]
    else:
        acc2 = tll._lora_tile(acc2, l_ptr, rt_ptr, offs_m, offs_n, m_ok, n_ok, R, stride_lm, stride_lr, stride_rtr,
                              stride_rtn, l_scale, EPI_LOW, BLOCK_R, INPUT_PRECISION)
        keep = keep_mask(seed_hash, offs_m, offs_n, threshold)
        acc += tl.where(keep, acc2 * keep_scale, 0.0)
    c_offs = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


def _g32(g: torch.Tensor) -> torch.Tensor:
    return g if (g.dtype == torch.float32 and g.is_contiguous()) else g.to(torch.float32).contiguous()


def dora_linear_fwd_triton(x, weight, lora_a, lora_b, scale, bias, g, save_pre):
    """(y [M, N] x.dtype, xa [M, r] fp32, ypre [M, N] x.dtype or an empty [0] tensor)."""
    y, xa, pre = tll.fwd(x, weight, lora_a, lora_b, scale, bias, 0.0, 0, g=_g32(g), save_pre=bool(save_pre))
    return y, xa, (pre if pre is not None else x.new_empty(0))


def launch_dm(dy: torch.Tensor, ypre: torch.Tensor) -> torch.Tensor:
    """Σ_t dy[t, n]·ypre[t, n] as a new fp32 [N] tensor (dy and ypre [M, N], any strides)."""
    M, N = dy.shape
    dm = torch.zeros(N, dtype=torch.float32, device=dy.device)
    if M == 0 or N == 0:
        return dm
    target = tll._target(dy)

    def grid(meta):
        n_blocks = triton.cdiv(N, meta["BLOCK_N"])
        m_blocks = triton.cdiv(M, meta["BLOCK_M"])
        return (n_blocks, max(1, min(m_blocks, target // n_blocks)))

    with tll._device_ctx(dy):
        _dora_dm_kernel[grid](dy, ypre, dm, M, N, dy.stride(0), dy.stride(1), ypre.stride(0), ypre.stride(1),
                              tll._m_bucket(M))
    return dm


def dora_linear_bwd_triton(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm, output_mask):
    """(dx, dA, dB, dm, dW0), None for a gradient not in ``output_mask``; dm fp32 [N]."""
    need_dx, need_da, need_db, need_dm, need_dw = (bool(v) for v in output_mask)
    M, N = dy.shape
    dm = None
    if need_dm and (ypre is None or ypre.numel() != dy.numel()):
        raise ValueError("dora_linear backward: dm was requested but ypre was not saved")
    # dm rides on lora_linear's dy kernel (one pass over dy for dxa, dB and dm) whenever that kernel runs
    with_dy_kernel = M > 0 and N > 0 and (need_dx or need_da or need_db)
    if need_dm:
        dm = torch.zeros(N, dtype=torch.float32, device=dy.device) if with_dy_kernel else \
            launch_dm(tll._safe_2d(dy), tll._safe_2d(ypre))
    dx = da = db = dw = None
    if need_dx or need_da or need_db or need_dw:
        dx, da, db, dw = tll.lora_linear_bwd_triton(dy, x, xa, weight, lora_a, lora_b, scale, 0.0, 0,
                                                    (need_dx, need_da, need_db, need_dw), g=_g32(g),
                                                    dm=(tll._safe_2d(ypre), dm) if (need_dm and with_dy_kernel) else None)
    if dm is not None:
        dm.div_(norm.to(torch.float32))
    return dx, da, db, dm, dw


# ----------------------------------------------------------------------------------------------
# DoRA with dropout (public op dora_linear_dropout)
# ----------------------------------------------------------------------------------------------


def _launch_drop_gemm(a, b, c, l, rt, *, M, N, K, R, stride_b, stride_rt, l_scale, drop, precision, block_r, m_bucket,
                      forward, g, sa=None, bias=None, pre=None):
    """One ``_dora_dropout_gemm_kernel`` launch. ``sa`` = A [r, K] for the fused shrink (then ``l`` = xa is written);
    ``pre`` (same layout rules as ``c``) receives ypre (forward only)."""
    _, seed_hash, threshold, keep_scale = drop
    sa_t, stride_sar, stride_sak = (sa, sa.stride(0), sa.stride(1)) if sa is not None else (rt, 0, 0)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _dora_dropout_gemm_kernel[grid](
        a, b, c, l, rt, sa_t, bias if bias is not None else c, g, pre if pre is not None else c,
        M, N, K, R,
        a.stride(0), a.stride(1),
        stride_b[0], stride_b[1],
        c.stride(0), c.stride(1),
        l.stride(0), l.stride(1),
        stride_rt[0], stride_rt[1],
        stride_sar, stride_sak,
        pre.stride(0) if pre is not None else 0, pre.stride(1) if pre is not None else 0,
        float(l_scale), seed_hash, threshold, keep_scale, m_bucket,
        FORWARD=forward, HAS_BIAS=bias is not None, FUSED_SHRINK=sa is not None, SAVE_PRE=pre is not None,
        EPI_LOW=c.dtype == torch.bfloat16, BLOCK_R=block_r if sa is not None else min(block_r, EPI_BLOCK_R),
        INPUT_PRECISION=precision,
    )


def dora_dropout_fwd_triton(x, weight, lora_a, lora_b, scale, bias, g, dropout_p, seed, save_pre, keep=None):
    """dora_linear_fwd with dropout_p > 0: (y [M, N] x.dtype, xa [M, r] fp32, ypre [M, N] x.dtype or an empty [0]
    tensor). ``keep`` (the torch backend's stored mask) is ignored: the kernels regenerate the mask from the seed.

    Passes: r <= 32 (FUSED_SHRINK_MAX_R): one ``_dora_dropout_gemm_kernel`` launch, x and W0 read once (A, B, g and
    bias once per tile); wider ranks: lora_linear's dropout shrink kernel (reads x, writes xa) and then the GEMM
    (reads x, W0 and xa), x read twice."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_a.shape[0]
    y = tll._alloc((M, N), x.dtype, x.device)
    xa = tll._alloc((M, R), torch.float32, x.device)
    pre = tll._alloc((M, N), x.dtype, x.device) if save_pre else None
    if M == 0:
        return y, xa, (pre if pre is not None else x.new_empty(0))
    if lora_a.dtype != x.dtype:
        lora_a = lora_a.to(x.dtype)
    if lora_b.dtype != x.dtype:
        lora_b = lora_b.to(x.dtype)
    x = tll._safe_2d(x)
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias with unit stride
    precision = tll._input_precision(x.dtype)
    drop = dropout_args(dropout_p, seed)
    block_r = tll._block_r(R)
    m_bucket = tll._m_bucket(M)
    fused = N > 0 and R <= min(block_r, tll.FUSED_SHRINK_MAX_R)
    with tll._device_ctx(x):
        if not fused:
            _, seed_hash, threshold, keep_scale = drop
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r))  # noqa: E731
            tll._lora_shrink_kernel[grid](
                x, lora_a, xa,
                M, K, R,
                x.stride(0), x.stride(1),
                lora_a.stride(0), lora_a.stride(1),
                xa.stride(0), xa.stride(1),
                seed_hash, threshold, keep_scale, m_bucket,
                DROPOUT=drop[0], BLOCK_R=block_r, INPUT_PRECISION=precision,
            )
        if N > 0:
            _launch_drop_gemm(
                x, weight, y, xa, lora_b,
                M=M, N=N, K=K, R=R,
                stride_b=(weight.stride(1), weight.stride(0)),  # Bop[k, n] = W0[n, k]
                stride_rt=(lora_b.stride(1), lora_b.stride(0)),  # Rt[j, n] = B[n, j]
                l_scale=scale, drop=drop, precision=precision, block_r=block_r, m_bucket=m_bucket,
                forward=True, g=_g32(g), sa=lora_a if fused else None, bias=bias, pre=pre,
            )
    return y, xa, (pre if pre is not None else x.new_empty(0))


def _dw_dropout(dy, x, weight, g, dropout_p, seed) -> torch.Tensor:
    """dW0 = dyᵀ·x + (dy⊙(g−1))ᵀ·drop(x) by torch in fp32 (W0 trainable only; M×N and M×K fp32 temporaries, as on the
    torch backend)."""
    from ..torch.lora_linear import keep_mask_rows

    M, K = x.shape
    p = float(dropout_p)
    dyc = dy.float()
    xk = torch.mul(x, keep_mask_rows(int(seed), 0, M, K, p, x.device)).float().mul_(1.0 / (1.0 - p))
    dw = torch.mm(dyc.t(), x.float())
    dw.addmm_((dyc * (g - 1.0)).t(), xk)
    return dw.to(weight.dtype)


def dora_dropout_bwd_triton(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm, dropout_p, seed, output_mask,
                            keep=None):
    """dora_linear_bwd with dropout_p > 0: (dx, dA, dB, dm, dW0), None for a gradient not in ``output_mask``; dm fp32
    [N]. ``keep`` is ignored (the kernels regenerate the mask).

    Passes: lora_linear's dy kernel (reads dy, and ypre for dm, once: dxa, dB, dm) whenever dx, dA or dB is asked
    for, else ``_dora_dm_kernel`` for dm alone; ``_dora_dropout_gemm_kernel`` for dx (dy and W0 read once);
    lora_linear's dA kernel (reads dxa and x); dW0 by torch (:func:`_dw_dropout`)."""
    need_dx, need_da, need_db, need_dm, need_dw = (bool(v) for v in output_mask)
    M, N = dy.shape
    R, K = lora_a.shape
    if (need_da or need_dw) and x is None:
        raise ValueError("dora_linear backward: dA or dW0 was requested but x was not saved")
    if need_dm and (ypre is None or ypre.numel() != dy.numel()):
        raise ValueError("dora_linear backward: dm was requested but ypre was not saved")
    dev = dy.device
    g32 = _g32(g)
    dx = da = db = dm = dw = None
    if M == 0:
        return (
            torch.empty((0, K), dtype=dy.dtype, device=dev) if need_dx else None,
            torch.zeros((R, K), dtype=lora_a.dtype, device=dev) if need_da else None,
            torch.zeros((N, R), dtype=lora_b.dtype, device=dev) if need_db else None,
            torch.zeros(N, dtype=torch.float32, device=dev) if need_dm else None,
            torch.zeros((N, K), dtype=weight.dtype, device=dev) if need_dw else None,
        )
    a_op = lora_a if lora_a.dtype == dy.dtype else lora_a.to(dy.dtype)
    b_op = lora_b if lora_b.dtype == dy.dtype else lora_b.to(dy.dtype)
    dy = tll._safe_2d(dy)
    if xa.dtype != torch.float32:
        xa = xa.float()
    precision = tll._input_precision(dy.dtype)
    drop = dropout_args(dropout_p, seed)
    block_r = tll._block_r(R)
    m_bucket = tll._m_bucket(M)
    need_dxa = need_dx or need_da
    with_dy_kernel = N > 0 and (need_dxa or need_db)
    with tll._device_ctx(dy):
        if need_dm:
            dm = torch.zeros(N, dtype=torch.float32, device=dev) if with_dy_kernel else \
                launch_dm(dy, tll._safe_2d(ypre))
        dxa = torch.zeros((M, R), dtype=torch.float32, device=dev) if need_dxa else None
        db32 = torch.zeros((N, R), dtype=torch.float32, device=dev) if need_db else None
        if with_dy_kernel:
            tll.launch_dy(dy, b_op, xa, dxa, db32, scale, block_r=block_r, m_bucket=m_bucket, precision=precision,
                          g=g32, dm=(tll._safe_2d(ypre), dm) if need_dm else None)
        if need_dx:
            dx = tll._alloc((M, K), dy.dtype, dev)
            if K > 0:
                _launch_drop_gemm(
                    dy, weight, dx, dxa, a_op,
                    M=M, N=K, K=N, R=R,
                    stride_b=(weight.stride(0), weight.stride(1)),  # Bop[n, k] = W0[n, k]
                    stride_rt=(a_op.stride(0), a_op.stride(1)),  # Rt[j, k] = A[j, k]
                    l_scale=1.0, drop=drop, precision=precision, block_r=block_r, m_bucket=m_bucket,
                    forward=False, g=g32,
                )
        if need_da:
            da = tll.launch_da(dxa, x, drop, block_r=block_r, m_bucket=m_bucket, precision=precision).to(lora_a.dtype)
        if need_db:
            db = db32.to(lora_b.dtype)
        if need_dw:
            dw = _dw_dropout(dy, x, weight, g32, dropout_p, seed)
    if dm is not None:
        dm.div_(norm.to(torch.float32))
    return dx, da, db, dm, dw
