"""Triton kernels for LoRA on a quantised frozen base (QLoRA): NF4 / FP4 (bitsandbytes layout, nested absmax
decoded per call), int8 (bitsandbytes CB / SCB) and float8_e4m3fn (per-tensor or per-row scale).

Semantics: :func:`lora_kernels.reference.quant_lora_linear_fwd_ref` / ``quant_lora_linear_bwd_ref``, i.e.
``lora_linear`` with ``W0 = W̃ = (decode(q)·scale)`` rounded once to x.dtype (``lora_kernels.quant``)::

    forward:   xa = drop(x)·Aᵀ                      (fp32, saved)     _lora_shrink_kernel (lora_linear's)
               y  = x·W̃ᵀ + bias + s·xa·Bᵀ                             _quant_gemm_kernel (W_T) | scratch
    backward:  dxa = s·dy·B,  dB = s·dyᵀ·xa                           lora_linear's launch_dy
               dx  = dy·W̃ + drop'(dxa·A)                              _quant_gemm_kernel | scratch
               dA  = dxaᵀ·drop(x)                                     lora_linear's launch_da

Two strategies for the W̃ products (``choose_strategy``, per call; override with the ``strategy=`` argument or
``$LORA_KERNELS_QUANT_STRATEGY``):

* ``fused``: ``_quant_gemm_kernel`` decodes each W0 tile in the GEMM's operand load (packed nibbles → code →
  ×absmax, or int8 / fp8 bits → ×scale, in fp32; rounded once to x.dtype) straight into registers
  feeding ``tl.dot``; the dx GEMM reads the same storage transposed (W0ᵀ on the fly). Nothing of W̃ is written to
  memory. Every row tile of x decodes the whole weight again, so its decode work grows with M / BLOCK_M.
* ``scratch``: ``_dequant_kernel`` writes W̃ (in x.dtype) to a per-call scratch buffer, then the 16-bit
  ``lora_linear`` kernels run on it; the buffer is freed when the call returns (nothing is kept across calls).
  Decode work is once per call, at the price of writing and reading 2 bytes per weight (bf16).

The auto rule is ``fused`` for ``M <= FUSED_MAX_M`` (decode / short prefill: one or two row tiles, so each weight is
decoded about as often as the scratch would and 2·N·K bytes of scratch traffic are saved), ``scratch`` above. The
threshold is NOT measured: no GPU has run these kernels (README status). ``benchmarks/bench_qlora.py`` measures
both strategies on a GPU; the rule should be set from its output.

The double-quantised absmax (uint8 codes + fp32 absmax2 + offset) is decoded per call by torch into an fp32
buffer of N·K/blocksize elements (``quant.block_absmax``: the same two fp32 operations as bitsandbytes, so the
result is bit-identical; a kernel would be free to contract them into an FMA). It is freed after the call.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import quant as Q
from ._common import INTERPRET, autotune_configs, dropout_args, grouped_pid, keep_mask
from .lora_linear import (
    _block_r,
    _device_ctx,
    _input_precision,
    _lora_shrink_kernel,
    _lora_tile,
    _m_bucket,
    _prune_by_m,
    _safe_2d,
    launch_da,
    launch_dy,
    lora_linear_bwd_triton,
    lora_linear_fwd_triton,
)

__all__ = ["quant_lora_linear_fwd_triton", "quant_lora_linear_bwd_triton", "choose_strategy", "dequantize_triton"]

ENV_STRATEGY = "LORA_KERNELS_QUANT_STRATEGY"
STRATEGIES = ("auto", "fused", "scratch")
# Largest M that the auto rule sends to the fused kernel (unmeasured; see the module docstring).
FUSED_MAX_M = 256

FMT_4BIT, FMT_INT8, FMT_FP8 = 0, 1, 2
_FMT_ID = {"nf4": FMT_4BIT, "fp4": FMT_4BIT, "int8": FMT_INT8, "fp8_e4m3fn": FMT_FP8}
DEQUANT_BLOCK = (16, 32) if INTERPRET else (32, 128)  # (rows, columns) of W0 per _dequant_kernel program


def _gemm(bm, bn, bk, g, w, s):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g), w, s


# The fused GEMM decodes a BLOCK_K x BLOCK_N weight tile per step in registers (index, byte, nibble, scale per
# element), so its tiles are narrower in K than lora_linear's: the 128-wide K steps of lora_linear's small-M configs
# spilled registers in the ahead-of-time compile (tests/triton_aot.py, sm_90 / sm_80). Speed: unmeasured.
QUANT_GEMM_CONFIGS = autotune_configs(
    [
        # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
        _gemm(128, 256, 32, 8, 8, 3),  # large M (the scratch strategy is the default there; for strategy="fused")
        _gemm(128, 128, 64, 8, 8, 3),
        _gemm(128, 128, 32, 8, 4, 4),
        _gemm(64, 128, 64, 8, 4, 4),
        _gemm(64, 64, 64, 8, 4, 4),
        _gemm(32, 128, 64, 8, 4, 3),  # small M (decode / short prefill: the fused strategy's range)
        _gemm(32, 64, 64, 8, 4, 3),
        _gemm(16, 128, 32, 8, 4, 4),
        _gemm(16, 64, 64, 8, 4, 3),
    ],
    _gemm(32, 32, 32, 4, 4, 1),
)


def choose_strategy(strategy, M: int) -> str:
    """'fused' or 'scratch': the ``strategy`` argument > ``$LORA_KERNELS_QUANT_STRATEGY`` > the auto rule
    (``fused`` when M <= FUSED_MAX_M)."""
    s = strategy if strategy not in (None, "auto") else (os.environ.get(ENV_STRATEGY, "auto").strip().lower() or "auto")
    if s not in STRATEGIES:
        raise ValueError(f"${ENV_STRATEGY} must be one of {STRATEGIES}, got {s!r}")
    if s == "auto":
        return "fused" if M <= FUSED_MAX_M else "scratch"
    return s


# ----------------------------------------------------------------------------------------------
# Device helpers: decode a [rows, cols] tile of W0 (any layout of the index tensors) to fp32
# ----------------------------------------------------------------------------------------------


@triton.jit
def _decode_fp8_e4m3fn(b):
    # float8_e4m3fn bits (int32 in [0, 255]) -> fp32, exactly: sign, 4 exponent bits (bias 7), 3 mantissa bits;
    # exponent 0 is subnormal (m·2^-9); 0x7F / 0xFF are NaN (no infinities)
    u = b.to(tl.uint32)
    sign = (u >> 7) & 1
    e = (u >> 3) & 15
    m = u & 7
    normal = ((sign << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    sub = tl.where(sign == 1, -sub, sub)
    v = tl.where(e == 0, sub, normal)
    nan = tl.full(v.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    return tl.where((u & 0x7F) == 0x7F, nan, v)


@triton.jit
def _dequant(q_ptr, s_ptr, code_ptr, wr, wc, mask, WK, stride_qn,
             FMT: tl.constexpr, BLOCKSIZE: tl.constexpr, SCALE_ONE: tl.constexpr, FLAT64: tl.constexpr):
    # W̃[wr, wc] of W0 [N, WK] in fp32 (wr, wc: broadcastable int index tensors; masked-off elements read as 0);
    # the caller rounds it once to the dtype it uses.
    if FMT == 0:  # nf4 / fp4: element f = n·K + k -> byte f >> 1, high nibble for even f; absmax per BLOCKSIZE
        if FLAT64:
            f = wr.to(tl.int64) * WK + wc
        else:
            f = wr * WK + wc
        byte = tl.load(q_ptr + (f >> 1), mask=mask, other=0).to(tl.int32)
        nib = tl.where((f & 1) == 0, byte >> 4, byte & 15)
        v = tl.load(code_ptr + nib)
        s = tl.load(s_ptr + f // BLOCKSIZE, mask=mask, other=0.0)
        w = v * s
    elif FMT == 1:  # int8 CB [N, K], SCB [N]: (CB·SCB)·(1/127)
        cb = tl.load(q_ptr + wr.to(tl.int64) * stride_qn + wc, mask=mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + wr, mask=mask, other=0.0)
        w = (cb * s) * 0.007874015718698502
    else:  # float8_e4m3fn bits [N, K] · scale (per tensor or per row)
        b = tl.load(q_ptr + wr.to(tl.int64) * stride_qn + wc, mask=mask, other=0).to(tl.int32)
        if SCALE_ONE:
            s = tl.load(s_ptr)
        else:
            s = tl.load(s_ptr + wr, mask=mask, other=0.0)
        w = _decode_fp8_e4m3fn(b) * s
    return w


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.autotune(
    configs=QUANT_GEMM_CONFIGS,
    key=["m_bucket", "NC", "KR", "R", "BLOCK_R", "HAS_BIAS", "DROPOUT", "FMT", "W_T", "BLOCKSIZE"],
    prune_configs_by={"early_config_prune": _prune_by_m},
)
@triton.heuristics({"EVEN_K": lambda args: args["KR"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["seed_hash", "threshold"])
def _quant_gemm_kernel(
    a_ptr, q_ptr, s_ptr, code_ptr, c_ptr, l_ptr, rt_ptr, bias_ptr,
    M, NC, KR, R, WK,
    stride_am, stride_ak, stride_qn,
    stride_cm, stride_cn,
    stride_lm, stride_lr,
    stride_rtr, stride_rtn,
    l_scale, seed_hash, threshold, keep_scale, m_bucket,
    FMT: tl.constexpr, W_T: tl.constexpr, BLOCKSIZE: tl.constexpr, SCALE_ONE: tl.constexpr,
    FLAT64: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EPI_LOW: tl.constexpr,
    BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # C[m, c] = Σ_j Aop[m, j]·Wop[j, c] + bias[c] + drop'_{m,c}(l_scale · Σ_r L[m, r]·Rt[r, c]), one store, where
    # Wop is W̃ decoded tile by tile from the quantised storage (never written anywhere):
    #   forward (W_T):  Aop = x [M, K],  Wop[k, n] = W̃[n, k], C = y [M, N],  L = xa, Rt = Bᵀ (no mask)
    #   dx (not W_T):   Aop = dy [M, N], Wop[n, k] = W̃[n, k], C = dx [M, K], L = dxa, Rt = A, mask at (m, k)
    # Reads Aop, the quantised W0 (q, scales, code), L [M, r] fp32, Rt [r, NC], bias; writes C.
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(NC, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < NC
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DROPOUT:
        # the masked r-wide term first, in the accumulator the main loop then adds to (no second fp32 tile held
        # across the loop)
        acc = _lora_tile(acc, l_ptr, rt_ptr, offs_m, offs_n, m_ok, n_ok, R, stride_lm, stride_lr, stride_rtr,
                         stride_rtn, l_scale, EPI_LOW, BLOCK_R, INPUT_PRECISION)
        keep = keep_mask(seed_hash, offs_m, offs_n, threshold)
        acc = tl.where(keep, acc * keep_scale, 0.0)
    # Out-of-range rows/columns wrap onto valid ones (their results are never stored).
    offs_am = (offs_m % M).to(tl.int64)
    offs_bn = offs_n % NC
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    for k0 in range(0, KR, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            at = tl.load(a_ptrs)
            k_ok = kk[:, None] >= 0
        else:
            at = tl.load(a_ptrs, mask=offs_k[None, :] < KR - k0, other=0.0)
            k_ok = kk[:, None] < KR
        if W_T:
            w = _dequant(q_ptr, s_ptr, code_ptr, offs_bn[None, :], kk[:, None], k_ok, WK, stride_qn,
                         FMT, BLOCKSIZE, SCALE_ONE, FLAT64)
        else:
            w = _dequant(q_ptr, s_ptr, code_ptr, kk[:, None], offs_bn[None, :], k_ok, WK, stride_qn,
                         FMT, BLOCKSIZE, SCALE_ONE, FLAT64)
        acc = tl.dot(at, w.to(at.dtype), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
    if not DROPOUT:
        # epilogue: the r-wide LoRA product on tensor cores
        acc = _lora_tile(acc, l_ptr, rt_ptr, offs_m, offs_n, m_ok, n_ok, R, stride_lm, stride_lr, stride_rtr,
                         stride_rtn, l_scale, EPI_LOW, BLOCK_R, INPUT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_kernel(
    q_ptr, s_ptr, code_ptr, out_ptr,
    N, K, stride_qn, stride_on,
    FMT: tl.constexpr, BLOCKSIZE: tl.constexpr, SCALE_ONE: tl.constexpr, FLAT64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[n, k] = W̃[n, k] in out's dtype (the scratch strategy's buffer, or a dequantised copy).
    # Reads the quantised W0; writes out [N, K]. Grid: (row blocks, column blocks).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = _dequant(q_ptr, s_ptr, code_ptr, offs_n[:, None], offs_k[None, :], mask, K, stride_qn,
                 FMT, BLOCKSIZE, SCALE_ONE, FLAT64)
    out = out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + offs_k[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer (tests replace this to poison outputs before kernels write them)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _code_on(fmt: str, device: torch.device) -> torch.Tensor:
    return Q.CODES[fmt].to(device)


def _quant_args(qw):
    """(q, scale, code, constexpr dict) of a QuantWeight for _dequant."""
    fid = _FMT_ID[qw.fmt]
    N, K = qw.shape
    if fid == FMT_4BIT:
        q, s, code = qw.qdata, Q.block_absmax(qw), _code_on(qw.fmt, qw.device)
        stride_qn, blocksize = 0, qw.blocksize
    else:
        q = qw.qdata if fid == FMT_INT8 else qw.qdata.view(torch.uint8)
        s, code = qw.absmax.reshape(-1), qw.absmax  # code unused
        stride_qn, blocksize = q.stride(0), 1
    const = dict(FMT=fid, BLOCKSIZE=blocksize, SCALE_ONE=(fid == FMT_FP8 and s.numel() == 1 and N != 1),
                 FLAT64=N * K + 2 * K >= 2**31)
    return q, s, code, stride_qn, const


def dequantize_triton(qw, dtype: torch.dtype) -> torch.Tensor:
    """W̃.to(dtype) [N, K] by ``_dequant_kernel`` (a new tensor; the scratch strategy's first step)."""
    N, K = qw.shape
    out = _alloc((N, K), dtype, qw.device)
    if N == 0 or K == 0:
        return out
    q, s, code, stride_qn, const = _quant_args(qw)
    bn, bk = DEQUANT_BLOCK
    with _device_ctx(q):
        _dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
            q, s, code, out, N, K, stride_qn, out.stride(0), **const, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return out


def _launch_quant_gemm(a, qw, c, l, rt, bias, *, M, NC, KR, R, w_t, stride_rt, l_scale, dropout, precision,
                       block_r, m_bucket):
    q, s, code, stride_qn, const = _quant_args(qw)
    drop, seed_hash, threshold, keep_scale = dropout
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(NC, meta["BLOCK_N"]),)  # noqa: E731
    _quant_gemm_kernel[grid](
        a, q, s, code, c, l, rt, bias if bias is not None else c,
        M, NC, KR, R, qw.shape[1],
        a.stride(0), a.stride(1), stride_qn,
        c.stride(0), c.stride(1),
        l.stride(0), l.stride(1),
        stride_rt[0], stride_rt[1],
        l_scale, seed_hash, threshold, keep_scale, m_bucket,
        W_T=w_t, **const,
        HAS_BIAS=bias is not None, DROPOUT=drop, EPI_LOW=(c.dtype == torch.bfloat16),
        BLOCK_R=block_r, INPUT_PRECISION=precision,
    )


def quant_lora_linear_fwd_triton(x, qw, lora_a, lora_b, scale, bias, dropout_p, seed, strategy="auto"):
    """Forward. x [M, K] (any strides), qw: QuantWeight [N, K], lora_a [r, K], lora_b [N, r], bias [N] or None.
    Returns ``(y [M, N] x.dtype, xa [M, r] fp32)``."""
    M, K = x.shape
    N = qw.shape[0]
    R = lora_a.shape[0]
    if lora_a.dtype != x.dtype:
        lora_a = lora_a.to(x.dtype)
    if lora_b.dtype != x.dtype:
        lora_b = lora_b.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if M == 0 or choose_strategy(strategy, M) == "scratch":
        w = dequantize_triton(qw, x.dtype) if M else x.new_empty((N, K))
        return lora_linear_fwd_triton(x, w, lora_a, lora_b, scale, bias, dropout_p, seed)
    y = _alloc((M, N), x.dtype, x.device)
    xa = _alloc((M, R), torch.float32, x.device)
    x = _safe_2d(x)
    if bias is not None:
        bias = bias.contiguous()
    precision = _input_precision(x.dtype)
    dropout, seed_hash, threshold, keep_scale = dropout_args(dropout_p, seed)
    block_r = _block_r(R)
    m_bucket = _m_bucket(M)
    with _device_ctx(x):
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
            _launch_quant_gemm(
                x, qw, y, xa, lora_b, bias, M=M, NC=N, KR=K, R=R, w_t=True,
                stride_rt=(lora_b.stride(1), lora_b.stride(0)),  # Rt[j, n] = B[n, j]
                l_scale=float(scale), dropout=(False, 0, 0, 1.0), precision=precision,
                block_r=block_r, m_bucket=m_bucket,
            )
    return y, xa


def quant_lora_linear_bwd_triton(dy, x, xa, qw, lora_a, lora_b, scale, dropout_p, seed, output_mask, strategy="auto"):
    """Backward. dy [M, N], x [M, K] or None (LoRA-FA), xa [M, r] fp32. ``output_mask`` selects (dx, dA, dB);
    the others come back as None."""
    need_dx, need_da, need_db = (bool(v) for v in output_mask)
    M, N = dy.shape
    R, K = lora_a.shape
    if (need_da) and x is None:
        raise ValueError("quant_lora_linear backward: dA was requested but x was not saved")
    if not need_dx or M == 0 or choose_strategy(strategy, M) == "scratch":
        w = dequantize_triton(qw, dy.dtype) if (need_dx and M) else dy.new_empty((N, K))
        dx, da, db, _ = lora_linear_bwd_triton(dy, x, xa, w, lora_a, lora_b, scale, dropout_p, seed,
                                               (need_dx, need_da, need_db, False))
        return dx, da, db
    dev = dy.device
    a_op = lora_a if lora_a.dtype == dy.dtype else lora_a.to(dy.dtype)
    b_op = lora_b if lora_b.dtype == dy.dtype else lora_b.to(dy.dtype)
    dy = _safe_2d(dy)
    if xa.dtype != torch.float32:
        xa = xa.float()
    precision = _input_precision(dy.dtype)
    drop_args = dropout_args(dropout_p, seed)
    block_r = _block_r(R)
    m_bucket = _m_bucket(M)
    da = db = None
    with _device_ctx(dy):
        dxa = torch.zeros((M, R), dtype=torch.float32, device=dev)
        db32 = torch.zeros((N, R), dtype=torch.float32, device=dev) if need_db else None
        if N > 0:
            launch_dy(dy, b_op, xa, dxa, db32, scale, block_r=block_r, m_bucket=m_bucket, precision=precision)
        dx = _alloc((M, K), dy.dtype, dev)
        if K > 0:
            _launch_quant_gemm(
                dy, qw, dx, dxa, a_op, None, M=M, NC=K, KR=N, R=R, w_t=False,
                stride_rt=(a_op.stride(0), a_op.stride(1)),  # Rt[j, k] = A[j, k]
                l_scale=1.0, dropout=drop_args, precision=precision, block_r=block_r, m_bucket=m_bucket,
            )
        if need_da:
            da = launch_da(dxa, x, drop_args, block_r=block_r, m_bucket=m_bucket, precision=precision).to(lora_a.dtype)
        if need_db:
            db = db32.to(lora_b.dtype)
    return dx, da, db
