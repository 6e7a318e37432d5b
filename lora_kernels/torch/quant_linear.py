"""torch backend of the quantised-base LoRA linear layer (semantics: ``reference.quant_lora_linear_fwd_ref``).

The base GEMM walks W0 in chunks of rows: each chunk is dequantised (``quant.decode_rows``, bit-exact with the
format's library) into a scratch of at most :data:`CHUNK_ELEMS` elements, multiplied, and dropped, so the largest
full-precision piece of W0 alive at any time is one chunk (the double-quantised absmax is decoded once per call,
1/blocksize of the weight's elements). ``strategy`` is accepted for symmetry with the Triton launcher and ignored:
this path always dequantises chunks.

Numerics: the chunk GEMMs run in x's dtype (accumulation by torch's matmul: fp32 for 16-bit inputs on CPU and on
GPUs' tensor cores), the LoRA terms in fp32 (fp64 for fp64 x), and y / dx are rounded once to x's dtype after
their fp32 sum for fp32 / fp64 x; for 16-bit x the chunk GEMM's result is rounded to x's dtype before the LoRA
term is added (one extra 16-bit rounding, covered by the tests' FlashAttention rule).
"""

from __future__ import annotations

import torch

from .. import quant as Q
from .. import reference as ref

# Largest number of W0 elements dequantised at once (16 MiB of fp32 scratch).
CHUNK_ELEMS = 1 << 22


def _row_chunks(N: int, K: int):
    rows = max(1, CHUNK_ELEMS // max(K, 1))
    for n0 in range(0, N, rows):
        yield n0, min(N, n0 + rows)


def _chunk(qw, n0, n1, absmax, dtype):
    """Rows [n0, n1) of W̃, rounded once to ``dtype``."""
    return Q.decode_rows(qw, n0, n1, absmax).to(dtype)


def _absmax(qw):
    return Q.block_absmax(qw) if qw.fmt in Q.FOUR_BIT else None


def quant_lora_linear_fwd_torch(x, qw, lora_a, lora_b, scale, bias, dropout_p, seed, strategy="auto"):
    M, K = x.shape
    N = qw.shape[0]
    acc = ref.compute_dtype(x.dtype)
    xa = ref.lora_dropout(x, dropout_p, seed).to(acc) @ lora_a.to(acc).t()
    y = torch.zeros((M, N), dtype=acc, device=x.device)
    if M and N:
        am = _absmax(qw)
        for n0, n1 in _row_chunks(N, K):
            y[:, n0:n1] = x @ _chunk(qw, n0, n1, am, x.dtype).t()
    if bias is not None:
        y = y + bias.to(acc)
    y = y + scale * (xa @ lora_b.to(acc).t())
    return y.to(x.dtype), xa


def quant_lora_linear_bwd_torch(dy, x, xa, qw, lora_a, lora_b, scale, dropout_p, seed, output_mask, strategy="auto"):
    need_dx, need_da, need_db = (bool(v) for v in output_mask)
    M, N = dy.shape
    K = qw.shape[1]
    acc = ref.compute_dtype(dy.dtype)
    dy_c = dy.to(acc)
    dxa = scale * (dy_c @ lora_b.to(acc))
    dx = da = db = None
    if need_db:
        db = (scale * (dy_c.t() @ xa.to(acc))).to(lora_b.dtype)
    if need_da:
        if x is None:
            raise ValueError("quant_lora_linear backward: dA was requested but x was not saved")
        da = (dxa.t() @ ref.lora_dropout(x, dropout_p, seed).to(acc)).to(lora_a.dtype)
    if need_dx:
        g = dxa @ lora_a.to(acc)
        if dropout_p != 0.0:
            keep = ref.dropout_keep_mask(seed, M, K, dropout_p, device=g.device)
            g = g * keep.to(acc) * (1.0 / (1.0 - dropout_p))
        if M and N:
            am = _absmax(qw)
            for n0, n1 in _row_chunks(N, K):
                g += (dy[:, n0:n1] @ _chunk(qw, n0, n1, am, dy.dtype)).to(acc)
        dx = g.to(dy.dtype)
    return dx, da, db
