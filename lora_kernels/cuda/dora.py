"""CUDA-extension launchers of the DoRA linear layer (public op ``dora_linear``, no dropout), composed from the
extension's existing kernel ops; no DoRA-specific kernel.

Semantics: :func:`lora_kernels.reference.dora_linear_fwd_ref` / :func:`~lora_kernels.reference.dora_linear_bwd_ref`
with dropout_p = 0 (x [M, K], W0 [N, K], A [r, K], B [N, r], s = scale, g = m / ‖W0 + s·B·A‖ fp32 [N] given by the
API). Contracts as ``torch/dora.py`` and ``triton/dora.py``. The composition, pass by pass ("M×N pass": a kernel
that reads and/or writes a whole [M, N] activation)::

    forward, magnitude frozen (save_pre False)                      M×N passes: the same 2 as plain LoRA's forward
      xa = x·Aᵀ                  cuda_multi_lora_shrink (one adapter: ids all 0; M >= 64: a one-adapter tile
                                 table, the 8-tokens-per-block launch lora_linear's single-adapter shrink uses)
      y  = x·W0ᵀ (+ bias)        cuBLAS (at::mm / at::addmm through torch), rounded to x.dtype   [writes y]
      y  = g⊙(y + s·xa·Bᵀ) + (1 − g)⊙bias = g⊙ypre + bias
                                 cuda_multi_lora_expand_ with magnitudes = g[None] and bias: the rescale and the
                                 bias correction are the expand kernel's DoRA epilogue, in fp32   [reads+writes y]
    forward, magnitude trains (save_pre True)                       M×N passes: plain LoRA's 2 + 1 torch pass
      ypre, xa = cuda_lora_linear_fwd(x, W0, A, B, s)   shrink + cuBLAS + expand (lora_linear's own composition)
      y = g⊙ypre + bias          ONE torch elementwise pass (addcmul / mul with out=y: computed in fp32, rounded
                                 once to x.dtype) [reads ypre, writes y]; ypre must be stored un-scaled, and no
                                 kernel of the extension writes two outputs
    backward                                                        extra M×N passes over lora_linear's backward
      dy' = dy⊙g                 ONE torch elementwise pass (mul with out=: fp32 math, rounded once to dy.dtype;
                                 a 16-bit dy' carries one extra rounding, as on the torch and Triton backends)
                                 [reads dy, writes dy'], only when dx, dA, dB or dW0 is asked for
      dx, dA, dB, dW0 = cuda_lora_linear_bwd(dy', x, xa, W0, A, B, s)   (its shrink / cuBLAS / expand composition)
      dm = Σ_t dy⊙ypre / norm    torch passes, fp32 (exact products: a 16-bit product is exact in fp32): fp32
                                 inputs multiply + column sum (2 passes); 16-bit inputs widen dy + multiply by
                                 ypre + column sum (3 passes over fp32 row chunks of at most 64 MiB); only when dm
                                 is asked for. (The Triton backend folds dm into its dy kernel; the extension has
                                 no kernel that could carry it.)

Numerics: fp32 accumulation in every kernel; 16-bit y is rounded twice on the no-save_pre path (cuBLAS rounds
x·W0ᵀ + bias, the expand epilogue rounds the result: at most half an ulp more than the reference, as
``cuda_lora_linear_fwd``), once more on the save_pre path (ypre is rounded to x.dtype before the rescale, as on
the torch and Triton backends). fp32 is exact fp32 arithmetic unless the user enabled TF32 for cuBLAS.

Dropout (``dora_linear_dropout``: PEFT applies W0 a second time, to the dropped x) has no CUDA launcher:
``why_not("cuda", "dora_linear_dropout", ...)`` says so and the API runs the torch backend with a warning.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["dora_linear_fwd_cuda", "dora_linear_bwd_cuda"]

# Tokens from which the one-adapter shrink / expand take the grouped (tile-table) launch: 8 tokens per block, each
# chunk of A and B read once per 8 tokens, the configuration lora_linear's single-adapter launch picks at M >= 64
# (csrc/multi_lora.cu, launch_multi_lora_shrink / _expand). Below it the per-token launch, also as lora_linear's.
GROUPED_MIN_TOKENS = 64
TILE_TOKENS = 64  # tokens per tile of the one-adapter tile table (any multiple of 8 does the same work)

# fp32 bytes of one row chunk of dm's widened product (16-bit inputs), as the extension's backward chunks.
_DM_CHUNK_BYTES = 64 << 20


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Output buffers this module allocates itself (tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _g32(g: torch.Tensor) -> torch.Tensor:
    return g if (g.dtype == torch.float32 and g.is_contiguous()) else g.to(torch.float32).contiguous()


def _one_adapter(M: int, device: torch.device):
    """(adapter_ids [M] int32 of zeros, (sorted_token_ids, tiles, block_m)) for a one-adapter launch of the
    multi-adapter kernels; the tile table is (None, None, 0) below GROUPED_MIN_TOKENS (per-token launch)."""
    ids = torch.zeros(M, dtype=torch.int32, device=device)
    if M < GROUPED_MIN_TOKENS:
        return ids, (None, None, 0)
    sorted_ids = torch.arange(M, dtype=torch.int32, device=device)
    first = torch.arange(0, M, TILE_TOKENS, dtype=torch.int32, device=device)
    tiles = torch.stack([torch.zeros_like(first), first, (first + TILE_TOKENS).clamp_(max=M)]).contiguous()
    return ids, (sorted_ids, tiles, TILE_TOKENS)


def dora_linear_fwd_cuda(x, weight, lora_a, lora_b, scale, bias, g, save_pre):
    """dora_linear_fwd without dropout on 2-D x [M, K]: (y [M, N] x.dtype, xa [M, r] fp32, ypre [M, N] x.dtype or
    an empty [0] tensor)."""
    ops = torch.ops.lora_kernels
    g32 = _g32(g)
    if save_pre:
        ypre, xa = ops.cuda_lora_linear_fwd(x, weight, lora_a, lora_b, float(scale), None, 0.0, 0)
        y = _alloc(ypre.shape, x.dtype, x.device)
        if bias is not None:
            torch.addcmul(bias, ypre, g32, out=y)  # fp32 math (g is fp32), one rounding to x.dtype
        else:
            torch.mul(ypre, g32, out=y)
        return y, xa, ypre
    M = x.shape[0]
    ids, groups = _one_adapter(M, x.device)
    xa = ops.cuda_multi_lora_shrink(x, lora_a[None], ids, None, *groups)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    scales = torch.full((1,), float(scale), dtype=torch.float32, device=x.device)
    ops.cuda_multi_lora_expand_(y, xa, lora_b[None], ids, scales, None, 0, *groups, g32[None], bias)
    return y, xa, x.new_empty(0)


def _col_dot(dy: torch.Tensor, ypre: torch.Tensor) -> torch.Tensor:
    """``Σ_t dy[t, n]·ypre[t, n]`` for every column n, fp32 [N] (products exact in fp32 for 16-bit inputs)."""
    M, N = dy.shape
    if dy.dtype == torch.float32 and ypre.dtype == torch.float32:
        return torch.mul(dy, ypre).sum(0)
    out = torch.zeros(N, dtype=torch.float32, device=dy.device)
    rows = max(1, _DM_CHUNK_BYTES // (4 * max(N, 1)))
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        out += dy[r0:r1].to(torch.float32).mul_(ypre[r0:r1]).sum(0)
    return out


def dora_linear_bwd_cuda(dy, x, xa, ypre, weight, lora_a, lora_b, scale, g, norm,
                         output_mask: Sequence[bool] = (True, True, True, True, False)):
    """dora_linear_bwd without dropout: (dx, dA, dB, dm, dW0), None for a gradient not in ``output_mask``; dm fp32 [N]
    (divided by norm). x may be None when neither dA nor dW0 is asked for; ypre is needed only for dm."""
    need_dx, need_da, need_db, need_dm, need_dw = (bool(v) for v in output_mask)
    dm: Optional[torch.Tensor] = None
    if need_dm:
        if ypre is None or ypre.numel() != dy.numel():
            raise ValueError("dora_linear backward: dm was requested but ypre was not saved")
        dm = _col_dot(dy, ypre.reshape(dy.shape)).div_(norm.to(torch.float32))
    dx = da = db = dw = None
    if need_dx or need_da or need_db or need_dw:
        dyg = _alloc(dy.shape, dy.dtype, dy.device)
        torch.mul(dy, _g32(g), out=dyg)  # fp32 math, one rounding to dy.dtype
        mask = [need_dx, need_da, need_db, need_dw]
        grads = torch.ops.lora_kernels.cuda_lora_linear_bwd(dyg, x, xa, weight, lora_a, lora_b, float(scale), 0.0, 0,
                                                            mask)
        dx, da, db, dw = (gr if want else None for gr, want in zip(grads, mask))
    return dx, da, db, dm, dw
