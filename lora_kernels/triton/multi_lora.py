"""Triton kernels for batched multi-adapter LoRA (``add_lora``; Punica BGMV / SGMV, S-LoRA mixed ranks).

Semantics (see ``reference.add_lora_ref``), in place on y::

    y[t, slice s] += scales[i] · (x[t] · A_s[i, :rank_i]ᵀ) · B_s[i, :, :rank_i]ᵀ     for i = adapter_ids[t] >= 0

Two strategies, picked by :func:`choose_strategy` (override with ``strategy=`` or the env var
``LORA_KERNELS_MULTI_LORA_STRATEGY`` = ``bgmv`` | ``sgmv`` | ``auto``):

* ``bgmv`` (decode): ONE launch, one program per (token, N-block, slice). Each program computes its token's
  r-wide ``xa`` (fp32, GEMV over K) and immediately expands it into its N-block, so there is no xa buffer and
  no second launch; the price is that ``xa`` is recomputed once per N-block (A is re-read from L2).
* ``sgmv`` (prefill): tokens grouped by adapter (``LoRABatchMeta``: stable sorted-token indirection and a
  fixed-capacity tile table of (adapter, start, end) segments of at most BLOCK_M tokens). Launch 1 (shrink)
  writes ``xa`` into an fp32 [S, capacity, r_max] buffer with ``tl.dot`` tiles over (tile, rank-block, slice);
  launch 2 (expand) adds ``scale · xa · Bᵀ`` tiles over (tile, N-block, slice) into y's gathered rows.

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
from ._common import autotune_configs

STRATEGY_ENV = "LORA_KERNELS_MULTI_LORA_STRATEGY"
STRATEGIES = ("bgmv", "sgmv")
MAX_SLICES = 4  # slices handled per launch; more slices are processed in groups of MAX_SLICES

# BGMV (decode) is chosen when M * r_max <= this. The fused kernel re-reads A[i] (K·r elements) once per
# N-block per token, so its L2 traffic grows like M·r·K·(N/BLOCK_N) while SGMV reads each adapter once plus an
# fp32 xa round trip and pays a second launch. Provisional threshold: tune with benchmarks/bench_multi_lora.py.
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
_BGMV_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_N=256, BLOCK_K=128, BLOCK_R=16), 4, 2),
        (dict(BLOCK_N=512, BLOCK_K=128, BLOCK_R=16), 8, 2),
        (dict(BLOCK_N=128, BLOCK_K=256, BLOCK_R=16), 4, 2),
        (dict(BLOCK_N=256, BLOCK_K=64, BLOCK_R=32), 4, 3),
    ],
    (dict(BLOCK_N=64, BLOCK_K=32, BLOCK_R=16), 1, 1),
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


@triton.autotune(configs=_BGMV_CONFIGS, key=["N_MAX", "K", "R_MAX"], restore_value=["y_ptr"])
@triton.jit(do_not_specialize=["n0", "n1", "n2", "n3", "M"])
def _bgmv_fused_kernel(
    y_ptr, x_ptr, ids_ptr, scales_ptr, ranks_ptr,
    a0, a1, a2, a3, b0, b1, b2, b3, n0, n1, n2, n3,
    M, K, L, R_MAX, N_MAX,
    stride_xm, stride_xk, stride_ym, stride_yn,
    HAS_RANKS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Decode: program (t, n-block, slice) computes xa = x[t]·A_s[i, :rank]ᵀ (fp32, GEMV over K) one rank-block at
    # a time and expands it at once: y[t, col+n-block] += scales[i]·xa·B_s[i, n-block, :rank]ᵀ.
    # Reads x[t], A_s[i, :rank], B_s[i, n-block, :rank], scales/ranks[i], y[t, n-block]; writes y[t, n-block].
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    a_ptr, b_ptr, n_s, col = _slice_params(pid_s, a0, a1, a2, a3, b0, b1, b2, b3, n0, n1, n2, n3)
    if pid_n * BLOCK_N >= n_s:
        return
    i = tl.load(ids_ptr + t).to(tl.int32)
    if (i < 0) | (i >= L):
        return
    rank = _adapter_rank(ranks_ptr, i, R_MAX, HAS_RANKS)
    i = i.to(tl.int64)
    scale = tl.load(scales_ptr + i).to(tl.float32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_s
    a_base = a_ptr + i * R_MAX * K
    b_base = b_ptr + i * n_s * R_MAX
    x_row = x_ptr + t * stride_xm
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        xa = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xv = tl.load(x_row + offs_k * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
            av = tl.load(
                a_base + offs_r[:, None] * K + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0
            ).to(tl.float32)
            xa += tl.sum(av * xv[None, :], axis=1)
        bv = tl.load(
            b_base + offs_n[:, None] * R_MAX + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(bv * xa[None, :], axis=1)
    y_ptrs = y_ptr + t * stride_ym + (col + offs_n) * stride_yn
    y_old = tl.load(y_ptrs, mask=n_mask, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + scale * acc).to(y_old.dtype), mask=n_mask)


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
    HAS_RANKS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Prefill expand: program (tile, n-block, slice) adds scales[i]·xa[s, tile rows, :rank_i]·B_s[i, n-block, :rank_i]ᵀ
    # (fp32 accumulation, one rounding) into y[tok(p), col + n-block] for the tile's tokens.
    # Reads the tile table, sorted token ids, xa, B_s[i], scales/ranks[i], y rows; writes those y rows.
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
) -> None:
    """In-place ``add_lora`` on Triton (inputs already validated; see the module docstring).

    ``groups``: optional ``(sorted_token_ids, tiles, block_m)`` of a :class:`LoRABatchMeta` built from the same
    adapter_ids (``meta.groups``, reused across layers); a meta is built here when the SGMV path needs one and none
    is given. ``strategy``: "bgmv" | "sgmv" | None (env var, then :func:`choose_strategy`).
    """
    M, K = x.shape
    if M == 0:
        return
    L, r_max = lora_a[0].shape[0], lora_a[0].shape[1]
    if L == 0 or r_max == 0:
        return
    strat = choose_strategy(M, L, r_max, strategy)
    # The kernels index ids, scales and ranks with unit stride ([M] / [L]: a copy costs nothing next to a launch).
    adapter_ids, scales = adapter_ids.contiguous(), scales.contiguous()
    ranks = ranks.contiguous() if ranks is not None else None
    has_ranks = ranks is not None
    ranks_arg = ranks if has_ranks else scales  # never read when HAS_RANKS is False
    n_max = max(b.shape[1] for b in lora_b)

    if strat == "bgmv":
        for col, group in _slice_groups(lora_a, lora_b):
            y_g = y[:, col:]
            grid = lambda META: (M, triton.cdiv(n_max, META["BLOCK_N"]), len(group))  # noqa: E731
            _bgmv_fused_kernel[grid](
                y_g, x, adapter_ids, scales, ranks_arg, *_slice_args(group),
                M, K, L, r_max, n_max,
                x.stride(0), x.stride(1), y_g.stride(0), y_g.stride(1),
                HAS_RANKS=has_ranks,
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
        xa = torch.empty((S, capacity, r_max), dtype=torch.float32, device=x.device)
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
            HAS_RANKS=has_ranks, PRECISION=expand_prec, BLOCK_M=block_m,
        )
