"""Triton kernels of the LoRA embedding family (semantics: ``reference.lora_embedding_ref`` /
``reference.add_lora_embedding_ref``; W [V, D], A [r, V], B [D, r], ids [M])::

    forward  (m-block, n-block):  y[m, n] = W[ids[m], n] + s · Σ_j A[j, ids[m]]·B[n, j]     A gathered by id, B expanded
    dA       (m-block, r-block):  dAᵀ[ids[m], j] += s · Σ_n dy[m, n]·B[n, j]                atomics into fp32 [V, r]
    dB       (n-block, r-block, m-split): dB[n, j] += s · Σ_m dy[m, n]·A[j, ids[m]]         atomics into fp32 [D, r]
    serving  (t, n-block):        y[t] += scales[i] · Σ_j A[i, j, tok[t]]·B[i, n, j]          i = adapter_ids[t] >= 0

The shrink of an embedding is a gather: the forward loads the r-wide column ``A[:, ids[m]]`` of each token in its
tile straight from A (any strides) and multiplies it into B inside the same program, together with the base row
``W[ids[m]]`` it adds to, so neither xa nor the base rows make a round trip through memory, and the result is
rounded once. Token ids outside [0, V) give a zero row (forward) or are skipped (backward, serving); the API
checks the range before any kernel runs. Every tensor is read through its strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune_configs
from .lora_linear import _block_r, _input_precision
from .shrink_expand import _token_adapter

_FWD_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_M=16, BLOCK_N=128), 4, 2),
        (dict(BLOCK_M=32, BLOCK_N=128), 4, 3),
        (dict(BLOCK_M=64, BLOCK_N=128), 4, 3),
        (dict(BLOCK_M=64, BLOCK_N=256), 8, 3),
    ],
    (dict(BLOCK_M=16, BLOCK_N=32), 1, 1),
)
_DA_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_M=32, BLOCK_N=64), 4, 3),
        (dict(BLOCK_M=64, BLOCK_N=64), 4, 3),
        (dict(BLOCK_M=64, BLOCK_N=128), 8, 3),
    ],
    (dict(BLOCK_M=16, BLOCK_N=32), 1, 1),
)
_DB_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_M=64, BLOCK_N=64), 4, 3),
        (dict(BLOCK_M=64, BLOCK_N=128), 4, 3),
        (dict(BLOCK_M=128, BLOCK_N=64), 8, 3),
    ],
    (dict(BLOCK_M=16, BLOCK_N=32), 1, 1),
)
_SERVE_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_N=128, BLOCK_R=16), 4, 2),
        (dict(BLOCK_N=256, BLOCK_R=16), 4, 2),
        (dict(BLOCK_N=256, BLOCK_R=32), 8, 2),
    ],
    (dict(BLOCK_N=64, BLOCK_R=16), 1, 1),
)


@triton.autotune(configs=_FWD_CONFIGS, key=["D", "R"])
@triton.jit(do_not_specialize=["M", "V"])
def _emb_fwd_kernel(
    y_ptr, ids_ptr, w_ptr, a_ptr, b_ptr, scale,
    M, D, V, R,
    stride_id, stride_wv, stride_wd, stride_ar, stride_av, stride_bd, stride_br, stride_ym, stride_yd,
    BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (m-block, n-block): y[m-block, n-block] = W[ids, n-block] + scale · A[:, ids]ᵀ·B[n-block, :]ᵀ, the sum
    # in fp32 and rounded once. Reads ids[m-block], A[:, ids] (r values per token), B[n-block, :], W[ids, n-block];
    # writes y[m-block, n-block] in full (0 for a token outside [0, V)).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    tok = tl.load(ids_ptr + offs_m.to(tl.int64) * stride_id, mask=m_ok, other=0).to(tl.int64)
    ok = m_ok & (tok >= 0) & (tok < V)
    tok = tl.where(ok, tok, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        xa = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * stride_ar + tok[:, None] * stride_av,
                     mask=ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] = A[r, ids]ᵀ
        bt = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * stride_bd + offs_r[:, None].to(tl.int64) * stride_br,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_N] = B[n, r]ᵀ
        acc = tl.dot(xa, bt, acc, input_precision=INPUT_PRECISION)
    w = tl.load(w_ptr + tok[:, None] * stride_wv + offs_n[None, :].to(tl.int64) * stride_wd,
                mask=ok[:, None] & n_ok[None, :], other=0.0)
    out = w.to(tl.float32) + scale * acc
    out = tl.where(ok[:, None], out, 0.0)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :].to(tl.int64) * stride_yd,
             out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_DA_CONFIGS, key=["D", "R"], reset_to_zero=["dat_ptr"])
@triton.jit(do_not_specialize=["M", "V", "padding_idx"])
def _emb_da_kernel(
    dat_ptr, dy_ptr, ids_ptr, b_ptr, scale, padding_idx,
    M, D, V, R,
    stride_dym, stride_dyd, stride_id, stride_bd, stride_br,
    BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (m-block, r-block): dxa = scale · dy[m-block, :]·B[:, r-block] in fp32, scattered with atomics into the
    # zeroed fp32 dAᵀ [V, R] (contiguous) at the rows ids[m-block]; tokens equal to padding_idx (>= 0) or outside
    # [0, V) add nothing. Reads dy[m-block, :], B[:, r-block], ids[m-block]; writes dAᵀ by atomics.
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    tok = tl.load(ids_ptr + offs_m.to(tl.int64) * stride_id, mask=m_ok, other=0).to(tl.int64)
    ok = m_ok & (tok >= 0) & (tok < V) & (tok != padding_idx)
    tok = tl.where(ok, tok, 0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    dxa = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        dyt = tl.load(dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyd,
                      mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bd + offs_r[None, :].to(tl.int64) * stride_br,
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        dxa = tl.dot(dyt, bt, dxa, input_precision=INPUT_PRECISION)
    tl.atomic_add(dat_ptr + tok[:, None] * R + offs_r[None, :], dxa * scale, mask=ok[:, None] & r_ok[None, :])


@triton.autotune(configs=_DB_CONFIGS, key=["D", "R"], reset_to_zero=["db_ptr"])
@triton.jit(do_not_specialize=["M", "V", "m_per_split"])
def _emb_db_kernel(
    db_ptr, dy_ptr, ids_ptr, a_ptr, scale, m_per_split,
    M, D, V, R,
    stride_dym, stride_dyd, stride_id, stride_ar, stride_av,
    BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (n-block, r-block, m-split): dB[n-block, r-block] += scale · dy[rows, n-block]ᵀ·A[r-block, ids[rows]]ᵀ
    # over the split's rows, in fp32, added with atomics into the zeroed fp32 dB [D, R] (contiguous). Reads
    # dy[rows, n-block], ids[rows], A[r-block, ids[rows]]; writes dB by atomics.
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    m_start = pid_s * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        tok = tl.load(ids_ptr + offs_m.to(tl.int64) * stride_id, mask=m_ok, other=0).to(tl.int64)
        ok = m_ok & (tok >= 0) & (tok < V)
        tok = tl.where(ok, tok, 0)
        dyt = tl.load(dy_ptr + offs_n[:, None].to(tl.int64) * stride_dyd + offs_m.to(tl.int64)[None, :] * stride_dym,
                      mask=n_ok[:, None] & ok[None, :], other=0.0)  # dyᵀ tile [BLOCK_N, BLOCK_M]
        xa = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * stride_ar + tok[:, None] * stride_av,
                     mask=ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
        acc = tl.dot(dyt, xa, acc, input_precision=INPUT_PRECISION)
    tl.atomic_add(db_ptr + offs_n[:, None].to(tl.int64) * R + offs_r[None, :], acc * scale,
                  mask=n_ok[:, None] & r_ok[None, :])


@triton.autotune(configs=_SERVE_CONFIGS, key=["D", "R_MAX"], restore_value=["y_ptr"])
@triton.jit(do_not_specialize=["M", "L", "V"])
def _emb_serve_kernel(
    y_ptr, tok_ptr, a_ptr, b_ptr, ids_ptr, scales_ptr, ranks_ptr,
    M, D, L, V, R_MAX,
    stride_ym, stride_yd, stride_tok, stride_al, stride_ar, stride_av, stride_bl, stride_bd, stride_br,
    stride_id, stride_scale, stride_rank,
    HAS_RANKS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Program (t, n-block): y[t, n-block] += scales[i] · A[i, :rank_i, tok[t]]·B[i, n-block, :rank_i]ᵀ in fp32 with y's
    # old value, rounded once; returns at once for a token without an adapter (or a token id outside [0, V)).
    # Reads ids[t], tok[t], scales/ranks[i], A[i, :rank_i, tok[t]], B[i, n-block, :rank_i], y[t, n-block].
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    i, valid, rank = _token_adapter(ids_ptr, stride_id, ranks_ptr, stride_rank, t, L, R_MAX, HAS_RANKS)
    tok = tl.load(tok_ptr + t * stride_tok).to(tl.int64)
    valid = valid & (tok >= 0) & (tok < V)
    if valid & (rank > 0):
        scale = tl.load(scales_ptr + i * stride_scale).to(tl.float32)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        a_col = a_ptr + i * stride_al + tok * stride_av
        b_rows = b_ptr + i * stride_bl + offs_n[:, None].to(tl.int64) * stride_bd
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            xa = tl.load(a_col + offs_r.to(tl.int64) * stride_ar, mask=r_ok, other=0.0).to(tl.float32)
            bv = tl.load(b_rows + offs_r[None, :].to(tl.int64) * stride_br, mask=n_ok[:, None] & r_ok[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(bv * xa[None, :], axis=1)
        y_ptrs = y_ptr + t * stride_ym + offs_n.to(tl.int64) * stride_yd
        y_old = tl.load(y_ptrs, mask=n_ok, other=0.0)
        tl.store(y_ptrs, (y_old.to(tl.float32) + scale * acc).to(y_old.dtype), mask=n_ok)


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer (tests replace this to poison outputs before kernels write them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _same(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def lora_embedding_fwd_triton(ids, weight, lora_a, lora_b, scale):
    """y [M, D] in weight.dtype (inputs validated; M, D > 0; A and B are cast to weight's dtype for tl.dot)."""
    M = ids.shape[0]
    V, D = weight.shape
    R = lora_a.shape[0]
    a, b = _same(lora_a, weight.dtype), _same(lora_b, weight.dtype)
    y = _alloc((M, D), weight.dtype, weight.device)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(D, META["BLOCK_N"]))  # noqa: E731
    _emb_fwd_kernel[grid](
        y, ids, weight, a, b, float(scale),
        M, D, V, R,
        ids.stride(0), weight.stride(0), weight.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        y.stride(0), y.stride(1),
        BLOCK_R=_block_r(R), INPUT_PRECISION=_input_precision(weight.dtype),
    )
    return y


def _split_m(M: int, n_programs: int, device: torch.device) -> int:
    """Rows per m-split of the dB kernel: about two programs per SM (4 splits at most under the interpreter)."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    splits = max(1, min(triton.cdiv(M, 64), target // max(n_programs, 1)))
    return triton.cdiv(M, splits)


def lora_embedding_bwd_triton(dy, ids, lora_a, lora_b, scale, padding_idx, scale_grad_by_freq, need_da, need_db):
    """(dA [r, V] in lora_a.dtype or None, dB [D, r] in lora_b.dtype or None); M, D > 0."""
    M, D = dy.shape
    R, V = lora_a.shape
    block_r = _block_r(R)
    precision = _input_precision(dy.dtype)
    da = db = None
    if need_da:
        b = _same(lora_b, dy.dtype)
        dat = torch.zeros((V, R), dtype=torch.float32, device=dy.device)
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(R, block_r))  # noqa: E731
        _emb_da_kernel[grid](
            dat, dy, ids, b, float(scale), int(padding_idx),
            M, D, V, R,
            dy.stride(0), dy.stride(1), ids.stride(0), b.stride(0), b.stride(1),
            BLOCK_R=block_r, INPUT_PRECISION=precision,
        )
        if scale_grad_by_freq:
            counts = torch.bincount(ids.to(torch.int64), minlength=V).to(torch.float32)
            dat.mul_(torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))[:, None])
        da = dat.t().contiguous().to(lora_a.dtype)
    if need_db:
        a = _same(lora_a, dy.dtype)
        db32 = torch.zeros((D, R), dtype=torch.float32, device=dy.device)
        r_blocks = triton.cdiv(R, block_r)
        per = _split_m(M, triton.cdiv(D, 64) * r_blocks, dy.device)  # one split size for every config
        grid = lambda META: (triton.cdiv(D, META["BLOCK_N"]), r_blocks, triton.cdiv(M, per))  # noqa: E731
        _emb_db_kernel[grid](
            db32, dy, ids, a, float(scale), per,
            M, D, V, R,
            dy.stride(0), dy.stride(1), ids.stride(0), a.stride(0), a.stride(1),
            BLOCK_R=block_r, INPUT_PRECISION=precision,
        )
        db = db32.to(lora_b.dtype)
    return da, db


def add_lora_embedding_triton(y, token_ids, lora_a, lora_b, adapter_ids, scales, ranks):
    """In place on y [M, D] (inputs validated; M, D, r_max > 0)."""
    M, D = y.shape
    L, r_max, V = lora_a.shape
    has_ranks = ranks is not None
    ranks_arg = ranks if has_ranks else adapter_ids  # never read when HAS_RANKS is False
    grid = lambda META: (M, triton.cdiv(D, META["BLOCK_N"]))  # noqa: E731
    _emb_serve_kernel[grid](
        y, token_ids, lora_a, lora_b, adapter_ids, scales, ranks_arg,
        M, D, L, V, r_max,
        y.stride(0), y.stride(1), token_ids.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), adapter_ids.stride(0), scales.stride(0),
        ranks_arg.stride(0),
        HAS_RANKS=has_ranks,
    )
