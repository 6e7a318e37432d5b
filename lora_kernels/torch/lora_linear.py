"""The LoRA linear layer on the torch backend: an efficient composition of PyTorch ops in the input dtype.

Semantics are :func:`lora_kernels.reference.lora_linear_fwd_ref` / :func:`~lora_kernels.reference.lora_linear_bwd_ref`
(x [M, K], W0 [N, K], A [r, K], B [N, r], s = scale, acc = fp64 for fp64 inputs, else fp32)::

    forward   y  = x·W0ᵀ + bias                     one GEMM in x's dtype (torch.addmm, as nn.Linear does)
              xa = drop(x)·Aᵀ                       fp32 (acc) [M, r], saved for the backward
              y += s·xa·Bᵀ                          fp32 (acc) product, added into y
    backward  dxa = s·dy·B,  dB = s·dyᵀ·xa          fp32 (acc)
              dA  = dxaᵀ·drop(x)                    fp32 (acc)
              dx  = dy·W0 (x's dtype) + drop'(dxa·A)  (the r-wide term in fp32, added into dx)
              dW0 = dyᵀ·x                           x's dtype, only when asked

Unlike the reference (the float64-faithful oracle) nothing here upcasts the frozen weight: W0 is read in place
by the GEMMs (no N×K copy or temporary), only A, B (r×K, N×r) are cast to the accumulation dtype.

Numerics, by dtype:

* fp64 and fp32: every product in the input precision; ``addmm_`` accumulates the LoRA term straight into y
  (and dxa·A into dx) inside the GEMM, so y and dx are the base result rounded, then rounded again after the
  r-wide term is added (the reference, in fp32, rounds each op the same way).
* bf16 / fp16: the base GEMMs (x·W0ᵀ + bias, dy·W0) run in the 16-bit dtype, accumulated as torch's GEMM does for
  nn.Linear (fp32 on the CPU), and are rounded once by the GEMM; the LoRA term is formed in fp32 (xa, dxa·A) and added in fp32, and the sum is rounded
  again: **y and dx are rounded twice** (the reference rounds once), at most half an ulp of extra error, as in the
  CUDA backend. xa, dxa, dA, dB are fp32 products of the 16-bit inputs (upcast block by block), rounded once to the
  parameter dtype at the end. On the CPU the row block of x (or dy) upcast to fp32 is at most ``_BLOCK_ELEMS``
  elements, so no M×K fp32 copy of x is made.
* ``drop(x)·Aᵀ`` is computed as ``((x ∘ keep)·Aᵀ) · 1/(1−p)`` (the mask zeroes exactly, the 1/(1−p) is applied to the
  r-wide product instead of to every element of x); same value as the reference's up to fp32 rounding.

Dropout mask: the reference's counter hash (``reference.dropout_keep_mask``) in 32-bit arithmetic, bit for bit the
same mask as the reference, Triton and CUDA, as uint8 0/1 (multiplying by it is exact). On the CPU it runs in numpy
uint32 (native wrap-around multiplication and logical shifts; a numpy call costs about a µs where a torch op costs
several, which is most of the mask's cost at small sizes); on other devices in torch int32 ops (multiplication wraps
modulo 2^32 like uint32, a logical right shift is the arithmetic one masked to the low bits, the unsigned threshold
test is a signed comparison after flipping the sign bit). Both work in row blocks whose 32-bit temporaries stay in
cache. In training (when dx or dA needs the mask) the autograd function has it hashed once per step
(:func:`lora_dropout_keep_torch`, op ``lora_dropout_keep``) and saves it for the backward: M×K bytes, less than what
PEFT's ``nn.Dropout`` + ``lora_A`` keep (a bool mask plus the dropped x). Without a saved mask (inference, or a
direct call of a launcher) each launcher hashes it itself, block by block; the backward then hashes it once for dA
and dx together.

Small inputs (M·max(K, N) up to ``_BLOCK_ELEMS``) and every non-CPU device take one block: whole-tensor ops, no
slicing; on a GPU the 16-bit paths then upcast x (or dy) to fp32 whole, as a transient temporary.

On the CPU, when oneDNN has no kernel for the 16-bit dtype (no AVX512-BF16 / AMX / AVX512-FP16), torch's fallback
GEMM is several times faster for ``dy·W0`` with dy in column-major order: the backward then copies dy (M×N, an
activation-sized temporary, never the weight) to column-major first. Everywhere else the GEMMs take their
operands as they are.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch

from .. import reference as ref

__all__ = ["lora_linear_fwd_torch", "lora_linear_bwd_torch", "lora_dropout_keep_torch", "keep_mask_rows",
           "dropout_keep_mask_fast"]

# Elements per row block of the blocked loops on the CPU (fp32/int32 temporaries of 256 KiB stay in L2).
_BLOCK_ELEMS = 1 << 16
# Row blocks for the dropout hash alone (int32 work buffers; measured best on a 2-core x86 CPU).
_HASH_BLOCK_ELEMS = 1 << 17

_C1 = 0x7FEB352D
_C2 = 0x846CA68B - (1 << 32)  # the same 32 bits as a signed int32
_INT_MIN = -(1 << 31)
_LOWP = (torch.float16, torch.bfloat16)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_rows(M: int, K: int, device: torch.device, elems: Optional[int] = None) -> int:
    """Rows per block: cache-sized on the CPU; one block elsewhere (each op is a kernel launch there)."""
    if device.type != "cpu":
        return max(M, 1)
    return max(1, (_BLOCK_ELEMS if elems is None else elems) // max(K, 1))


# ----------------------------------------------------------------------------------------------
# Dropout mask: reference.dropout_keep_mask in 32-bit arithmetic
# ----------------------------------------------------------------------------------------------

try:  # a dependency of lora_kernels; the torch int32 path below covers its absence
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None


def _mix32_(h: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """lowbias32 finaliser in place on int32 ``h`` (uint32 bit patterns); ``tmp`` is a scratch of h's shape.
    Multiplication wraps like uint32; a logical right shift is the arithmetic one masked to the low bits."""
    torch.bitwise_right_shift(h, 16, out=tmp)
    tmp.bitwise_and_(0xFFFF)
    h.bitwise_xor_(tmp)
    h.mul_(_C1)
    torch.bitwise_right_shift(h, 15, out=tmp)
    tmp.bitwise_and_(0x1FFFF)
    h.bitwise_xor_(tmp)
    h.mul_(_C2)
    torch.bitwise_right_shift(h, 16, out=tmp)
    tmp.bitwise_and_(0xFFFF)
    h.bitwise_xor_(tmp)
    return h


def _np_mix32_(h, tmp):
    """lowbias32 finaliser in place on a numpy uint32 array (native wrap-around and logical shifts)."""
    _np.right_shift(h, 16, out=tmp)
    _np.bitwise_xor(h, tmp, out=h)
    _np.multiply(h, _NP_C1, out=h)
    _np.right_shift(h, 15, out=tmp)
    _np.bitwise_xor(h, tmp, out=h)
    _np.multiply(h, _NP_C2, out=h)
    _np.right_shift(h, 16, out=tmp)
    _np.bitwise_xor(h, tmp, out=h)
    return h


if _np is not None:
    _NP_C1, _NP_C2 = _np.uint32(_C1), _np.uint32(_C2 & 0xFFFFFFFF)


class _KeepMask:
    """Generator of the keep-mask rows of one call: ``keep(r0, r1)`` = rows row0+r0 .. row0+r1-1 of
    ``reference.dropout_keep_mask(seed, ·, cols, p)`` as uint8 0/1 [r1 - r0, cols] (multiplying a float block by it
    is exact), for 0 <= r0 <= r1 <= rows. The result is a view of a buffer reused by the next call.

    On the CPU the hash runs in numpy uint32 (native wrap-around and logical shifts, ~1 µs per op call instead of
    several for a torch op: most of the cost at small sizes); elsewhere in torch int32 ops on the tensors' device.
    Both are bit for bit the reference's mask (tests/test_torch_backend.py)."""

    def __init__(self, seed: int, p: float, rows: int, cols: int, device: torch.device, max_rows: int, row0: int = 0):
        thr = ref.dropout_threshold(p)
        self.none_kept = thr >= (1 << ref.DROPOUT_HASH_BITS)
        seed_h = ref.dropout_seed_hash(seed)
        n = max(1, min(rows, max_rows))
        self.numpy = device.type == "cpu" and _np is not None
        if self.numpy:
            # keep iff (h >> 8) >= thr  <=>  h >= thr << 8 (uint32, thr < 2^24 here): one comparison, no shift
            self.bound_u32 = _np.uint32(min(thr, 0xFFFFFF) << (32 - ref.DROPOUT_HASH_BITS))
            row_h = _np.arange(row0, row0 + rows, dtype=_np.uint32)  # rows < 2^32 (a tensor's row count)
            _np.add(row_h, _np.uint32(seed_h), out=row_h)
            self.row_h = _np_mix32_(row_h, _np.empty_like(row_h))[:, None]
            self.k = _np.arange(cols, dtype=_np.uint32)[None, :]
            self._h = _np.empty((n, cols), dtype=_np.uint32)
            self._t = _np.empty((n, cols), dtype=_np.uint32)
        else:
            # keep iff (h >> 8) >= thr as uint32  <=>  (h ^ INT_MIN) >= (thr << 8) + INT_MIN as int32
            self.bound = (thr << (32 - ref.DROPOUT_HASH_BITS)) + _INT_MIN
            m = torch.arange(row0, row0 + rows, dtype=torch.int64, device=device)
            row_h = ref._mix32(m + seed_h)  # M values: int64 with masking
            self.row_h = (row_h - ((row_h >> 31) << 32)).to(torch.int32)[:, None]  # the same bits as int32
            self.k = torch.arange(cols, dtype=torch.int32, device=device)
            self._h = torch.empty((n, cols), dtype=torch.int32, device=device)
            self._t = torch.empty((n, cols), dtype=torch.int32, device=device)
        self._keep = None
        self._shape, self._device = (n, cols), device

    def keep(self, r0: int, r1: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = r1 - r0
        if out is None:
            if self._keep is None:
                self._keep = torch.empty(self._shape, dtype=torch.uint8, device=self._device)
            out = self._keep[:n]
        keep = out
        if self.none_kept:
            return keep.fill_(0)
        if self.numpy:
            h, t = self._h[:n], self._t[:n]
            _np.add(self.row_h[r0:r1], self.k, out=h)  # k + mix32(m + mix32(seed)), wrapping
            _np_mix32_(h, t)
            _np.greater_equal(h, self.bound_u32, out=keep.numpy().view(_np.bool_))
            return keep
        h, t = self._h[:n], self._t[:n]
        torch.add(self.row_h[r0:r1], self.k, out=h)  # k + mix32(m + mix32(seed)), wrapping like uint32
        _mix32_(h, t)
        h.bitwise_xor_(_INT_MIN)
        return torch.ge(h, self.bound, out=keep)


def keep_mask_rows(seed: int, row0: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Rows row0 .. row0+rows-1 of ``reference.dropout_keep_mask(seed, ·, cols, p)`` as uint8 0/1 [rows, cols]
    (``.view(torch.bool)`` gives the reference's bool mask without a copy)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    if rows == 0 or cols == 0:
        return out
    if p == 0.0:
        return out.fill_(1)
    br = _block_rows(rows, cols, device, _HASH_BLOCK_ELEMS)
    gen = _KeepMask(seed, p, rows, cols, device, br, row0=row0)
    for r0 in range(0, rows, br):
        r1 = min(rows, r0 + br)
        gen.keep(r0, r1, out=out[r0:r1] if (r0 or r1 < rows) else out)
    return out


def dropout_keep_mask_fast(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """``reference.dropout_keep_mask`` bit for bit (bool), in blocked 32-bit arithmetic (several times faster)."""
    return keep_mask_rows(seed, 0, rows, cols, p, device).view(torch.bool)


def lora_dropout_keep_torch(x: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """The keep-mask of ``drop(x)`` for 2-D x [M, K] as uint8 0/1 [M, K] (what the forward saves for the backward
    when dropout is on, so that the mask is hashed once per training step)."""
    return keep_mask_rows(int(seed), 0, x.shape[0], x.shape[1], float(dropout_p), x.device)


# ----------------------------------------------------------------------------------------------
# GEMM layout choice for dy·W0
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _onednn_has(dtype: torch.dtype) -> bool:
    """Whether torch's CPU GEMM for this 16-bit dtype goes to oneDNN (else: ATen's fallback kernels)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        pass
    return False


def _mm_dy_w(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dy·W0`` [M, K] in dy's dtype, without copying W0."""
    if dy.device.type == "cpu" and dy.dtype in _LOWP and dy.shape[0] > 1 and not _onednn_has(dy.dtype):
        dy = dy.t().contiguous().t()  # column-major dy: ATen's fallback 16-bit GEMM is fast for this layout
    return torch.mm(dy, weight)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_linear = torch.nn.functional.linear
_zeros = {}


def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached 0-d zero: the ignored ``input`` of ``addmm(·, beta=0, alpha=s)``, which scales a product in the GEMM."""
    z = _zeros.get((dtype, device))
    if z is None:
        z = _zeros[(dtype, device)] = torch.zeros((), dtype=dtype, device=device)
    return z


def lora_linear_fwd_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor],
    dropout_p: float,
    seed: int,
    keep: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """lora_linear_fwd on 2-D x [M, K]: returns (y [M, N] in x.dtype, xa [M, r] in fp32, fp64 for fp64 x).
    ``keep``: the dropout keep-mask (uint8 0/1 [M, K], :func:`lora_dropout_keep_torch`) when the caller already
    has it; otherwise it is hashed block by block here."""
    M, K = x.shape
    acc = _acc(x.dtype)
    a = lora_a if lora_a.dtype == acc else lora_a.to(acc)
    b = lora_b if lora_b.dtype == acc else lora_b.to(acc)
    y = _linear(x, weight, bias)  # x·W0ᵀ + bias in x's dtype (addmm, as nn.Linear)
    p = float(dropout_p)
    lowp = x.dtype != acc
    if not lowp and p == 0.0:
        xa = _linear(x, a)
        y.addmm_(xa, b.t(), alpha=scale)
        return y, xa

    # Row blocks (one on a GPU or for small inputs): the fp32 copy of x (16-bit inputs), the masked x and the fp32
    # LoRA term of y exist one block at a time.
    br = _block_rows(M, max(K, y.shape[1]), x.device)
    drop = None
    if p > 0.0 and keep is None and M > 0:
        drop = _KeepMask(seed, p, M, K, x.device, br)
    inv_keep = 1.0 / (1.0 - p)
    zero = _zero(acc, x.device)
    bt = b.t()
    if M <= br:
        xa = _shrink(x, a, acc, lowp, keep if drop is None else drop.keep(0, M), inv_keep, zero)
        if lowp:
            y.add_(torch.mm(xa, bt), alpha=scale)  # fp32 sum, rounded to y's dtype
        else:
            y.addmm_(xa, bt, alpha=scale)
        return y, xa
    xa = torch.empty((M, a.shape[0]), dtype=acc, device=x.device)
    for r0 in range(0, M, br):
        r1 = min(M, r0 + br)
        kb = None if p == 0.0 else (keep[r0:r1] if drop is None else drop.keep(r0, r1))
        xab = xa[r0:r1]
        xab.copy_(_shrink(x[r0:r1], a, acc, lowp, kb, inv_keep, zero))
        if lowp:
            y[r0:r1].add_(torch.mm(xab, bt), alpha=scale)
    if not lowp:
        y.addmm_(xa, bt, alpha=scale)
    return y, xa


def _shrink(xb, a, acc, lowp: bool, kb: Optional[torch.Tensor], inv_keep: float, zero) -> torch.Tensor:
    """``drop(xb)·aᵀ`` in acc: the mask (if any) zeroes elements of the acc copy of xb, 1/(1−p) scales the product."""
    if kb is None:
        return _linear(xb.to(acc) if lowp else xb, a)
    xs = xb.to(acc).mul_(kb) if lowp else torch.mul(xb, kb)
    return torch.addmm(zero, xs, a.t(), beta=0, alpha=inv_keep)


def lora_linear_bwd_torch(
    dy: torch.Tensor,
    x: Optional[torch.Tensor],
    xa: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    output_mask: Sequence[bool] = (True, True, True, False),
    keep: Optional[torch.Tensor] = None,
) -> Tuple[Optional[torch.Tensor], ...]:
    """lora_linear_bwd on 2-D tensors: (dx, dA, dB, dW0), None for a gradient not in ``output_mask``.
    x may be None when neither dA nor dW0 is requested. ``keep``: the forward's dropout keep-mask (uint8 0/1 [M, K])
    if it was saved; otherwise it is hashed again, block by block (once for dA and dx together)."""
    need_dx, need_da, need_db, need_dw = output_mask
    if (need_da or need_dw) and x is None:
        raise ValueError("lora_linear backward: dA or dW0 was requested but x was not saved")
    M, N = dy.shape
    K = weight.shape[1]
    acc = _acc(dy.dtype)
    lowp = dy.dtype != acc
    p = float(dropout_p)
    dx = da = db = dw = None
    if need_dw:
        dw = torch.mm(dy.t(), x).to(weight.dtype)
    if need_dx:
        dx = _mm_dy_w(dy, weight)  # dy·W0 in dy's dtype
    if not (need_dx or need_da or need_db):
        return dx, da, db, dw
    a = lora_a if lora_a.dtype == acc else lora_a.to(acc)
    b = lora_b if lora_b.dtype == acc else lora_b.to(acc)
    xa = xa if xa.dtype == acc else xa.to(acc)
    zero = _zero(acc, dy.device)
    inv_keep = 1.0 / (1.0 - p)
    s_dxa = scale * inv_keep  # dxa / (1 − p): drop'(dxa·A) = keep ∘ ((dxa/(1−p))·A), dA = (dxa/(1−p))ᵀ·(keep ∘ x)

    if not lowp and p == 0.0:
        # fp32 / fp64: whole-tensor GEMMs (scales folded into them), the r-wide term accumulated into dx in the GEMM
        dxa = torch.addmm(zero, dy, b, beta=0, alpha=scale)
        if need_db:
            db = torch.addmm(zero, dy.t(), xa, beta=0, alpha=scale)
        if need_da:
            da = torch.mm(dxa.t(), x)
        if need_dx:
            dx.addmm_(dxa, a)
    else:
        br = _block_rows(M, max(K, N), dy.device)
        drop = None
        if p > 0.0 and keep is None and M > 0 and (need_da or need_dx):
            drop = _KeepMask(seed, p, M, K, dy.device, br)
        if not lowp:
            dxa = torch.addmm(zero, dy, b, beta=0, alpha=s_dxa)
            if need_db:
                db = torch.addmm(zero, dy.t(), xa, beta=0, alpha=scale)
        if M == 0:  # (empty products below would still need their shapes)
            da = torch.zeros(a.shape, dtype=acc, device=dy.device) if need_da else None
            db = torch.zeros(b.shape, dtype=acc, device=dy.device) if (need_db and lowp) else db
        for r0 in range(0, M, br):
            r1 = min(M, r0 + br)
            whole = r0 == 0 and r1 == M
            sl = slice(r0, r1)
            if lowp:
                dyb = (dy if whole else dy[sl]).to(acc)
                dxab = torch.addmm(zero, dyb, b, beta=0, alpha=s_dxa)
                if need_db:
                    xab = xa if whole else xa[sl]
                    if db is None:
                        db = torch.addmm(zero, dyb.t(), xab, beta=0, alpha=scale)
                    else:
                        db.addmm_(dyb.t(), xab, alpha=scale)
            else:
                dxab = dxa if whole else dxa[sl]
            if not (need_da or need_dx):
                continue
            kb = None
            if p > 0.0:
                kb = (keep if whole else keep[sl]) if drop is None else drop.keep(r0, r1)
            if need_da:
                xb = x if whole else x[sl]
                if kb is not None:
                    xs = xb.to(acc).mul_(kb) if lowp else torch.mul(xb, kb)
                else:
                    xs = xb.to(acc)
                if da is None:
                    da = torch.mm(dxab.t(), xs)
                else:
                    da.addmm_(dxab.t(), xs)
            if need_dx:
                dxb = dx if whole else dx[sl]
                if kb is None and not lowp:
                    dxb.addmm_(dxab, a)
                elif kb is None:
                    dxb.add_(torch.mm(dxab, a))  # fp32 sum, rounded to dx's dtype
                else:
                    dxb.addcmul_(torch.mm(dxab, a), kb)  # dx += keep ∘ (dxa/(1−p))·A, in fp32, rounded once
    if da is not None and da.dtype != lora_a.dtype:
        da = da.to(lora_a.dtype)
    if db is not None and db.dtype != lora_b.dtype:
        db = db.to(lora_b.dtype)
    return dx, da, db, dw
