"""Triton launchers of the DoRA linear layer (no dropout): lora_linear's fused GEMM kernels with DoRA's per-column
factor g = m / ‖W0 + s·B·A‖ in them, plus one column-reduction kernel for dm.

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

Numerics as lora_linear's Triton kernels (fp32 accumulation; TF32 for fp32 inputs unless
LORA_KERNELS_FP32_PRECISION=ieee). dy' is formed in fp32 and rounded to dy's dtype for the tensor-core products (a
16-bit dy' carries one extra rounding, 2^-9 relative for bf16). With dropout PEFT applies W0 twice (to x and to the
dropped x); that path has no Triton launcher (public op ``dora_linear_dropout``: torch only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import lora_linear as tll
from ._common import autotune_configs

__all__ = ["dora_linear_fwd_triton", "dora_linear_bwd_triton"]


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
