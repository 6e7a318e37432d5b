"""Tooling: ahead-of-time GPU compilation of every Triton kernel, without a GPU (the test body is
``tests/test_triton_compile.py``; this module is its harness and a command-line tool).

The interpreter tests (``TRITON_INTERPRET=1``) never run Triton's GPU compiler, so they cannot see a kernel that
fails to lower for a real GPU (``tl.dot`` operand-type rules for bf16/fp16/fp32 and ``input_precision``, layouts of
small tiles, uint32 arithmetic, atomics, shared memory per config). This harness compiles the kernels of
``lora_kernels/triton/{lora_linear,multi_lora,merge,quant_linear,shrink_expand,moe_lora,dora,embedding}.py`` all the way to a cubin
(Triton's bundled ptxas) for sm_90 (H100) and sm_80 (A100) with ``triton.compile(ASTSource(...), target=GPUTarget(...))``.

How: one subprocess runs this file as a script with ``TRITON_INTERPRET=0`` (the kernel modules read that variable
at import to pick their GPU config lists, and ``@triton.jit`` only builds real ``JITFunction`` objects with the
interpreter off), a fresh ``TRITON_CACHE_DIR`` in a temp dir, and a process pool over the CPU cores. Every compile
gets the signature, ``tt.divisibility`` attributes and constexprs that Triton's own launcher binder
(``create_function_from_signature``) derives from the argument values the launchers pass for a typical contiguous
launch (16-aligned pointers and sizes, unit inner strides), plus one ragged launch per kernel (odd sizes,
non-unit strides). The subprocess reports JSON: per compile OK/error, shared memory (bytes), registers and spills
(parsed from the ptxas ``-v`` log).

Matrix levels (env ``LORA_KERNELS_COMPILE_LEVEL``, or ``--level`` of the script):
  * ``ci`` (default; ~120 compiles, ~55 s on 2 cores): every kernel x {bf16, fp16, fp32} x {sm_90, sm_80} on a
    representative config (lora_linear: the smallest-BLOCK_M config, the one a decode-sized M can be left with;
    others: the first of the list); for bf16 on sm_90 every constexpr variant the launchers use (bias on/off,
    dropout on/off, backward compute flags, rank tiles 16 and 128, mixed adapter dtype, HAS_RANKS, int32/int64
    ids and ranks, SGMV block_m 16/64/128, exact/multi/tile-list merge, int64 repair index), a ragged launch, and
    the FULL autotune config list of every kernel; for fp32 on sm_80 (largest elements, smallest shared memory)
    the small-M configs of lora_linear (rank tiles 16 and 128) and every merge config.
  * ``wide`` (~235 compiles, ~4-5 min): the variants for every dtype (fp32 with tf32 and ieee), config lists in full
    for bf16/sm_90 and the merge, small-M sets everywhere.
  * ``full`` (~4200 compiles; an hour on 2 cores): every config x dtype x target x variant cross product.
Variants are chosen so that every value of every flag appears at least once per kernel kind (``_ci_variants``);
``full`` takes the cross product.

Assertions: no compile error anywhere; shared memory within the target's per-block limit for every config that
must run unconditionally (merge configs, single-config kernels, the ``_prune_by_m`` fallback that a decode-sized
M leaves alone, where the autotuner does not benchmark and so cannot skip an oversized config); for autotuned
kernels at least one config of every prune outcome fits. Oversized autotune configs are legal: the autotuner
catches the ``OutOfResources`` of such a config and times it as infinite. Spills are reported, not asserted.

Run ``python tests/triton_aot.py [--level ci|wide|full] [--json PATH]`` to print the table directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Per-block shared memory (opt-in maximum) by target capability.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
TARGETS = (90, 80)
DTYPES = ("bf16", "fp16", "fp32")
LEVEL_ENV = "LORA_KERNELS_COMPILE_LEVEL"


# ----------------------------------------------------------------------------------------------------------------
# Worker side (runs in the subprocess with TRITON_INTERPRET=0)
# ----------------------------------------------------------------------------------------------------------------


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "i32": torch.int32,
            "i64": torch.int64, "i16": torch.int16, "u8": torch.uint8, "i8": torch.int8}[name]


def _t(name):
    """A stand-in tensor: the binder only reads its dtype and data_ptr (16-byte aligned)."""
    import torch

    return torch.empty(64, dtype=_torch_dtype(name))


def _raw_jit(kernel):
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _configs(kernel):
    """[(name, meta kwargs, options)] of an autotuned kernel (GPU config list)."""
    out = []
    for c in kernel.configs:
        opts = {k: v for k, v in c.all_kwargs().items() if k not in c.kwargs and v is not None}
        out.append((c.kwargs, opts))
    return out


def _heuristics(kernel):
    from triton.runtime.autotuner import Heuristics

    fn = kernel
    while hasattr(fn, "fn"):
        if isinstance(fn, Heuristics):
            return fn.values
        fn = fn.fn
    return {}


# Launch shapes. "main": a typical contiguous launch (sizes multiples of 16, unit inner strides). "ragged": odd
# sizes and non-unit inner strides (a transposed / sliced input), which changes specialisation and vectorisation.
_SHAPES = {"main": dict(M=4096, N=4096, K=4096), "ragged": dict(M=999, N=1001, K=1003)}


def _lora_linear_jobs(ll, dtype, variant, shape):
    """(kernel name, args, constexpr kwargs) for the lora_linear kernels, mirroring the launchers."""
    M, N, K = shape["M"], shape["N"], shape["K"]
    R = variant["R"]
    ragged = shape is _SHAPES["ragged"]
    block_r = min(128, max(16, 1 << (R - 1).bit_length()))
    prec = variant.get("prec", "tf32")
    epi_low = dtype == "bf16"
    xs = (1, M + 3) if ragged else (K, 1)  # x strides: column-major slice when ragged
    dyn = (1, M + 5) if ragged else (N, 1)
    seed = (-123456789, 1 << 23, 1.25)
    mb = 1 << min(16, (M - 1).bit_length())
    jobs = []
    kind = variant["kind"]
    # DoRA (lora_kernels/triton/dora.py): g fp32 [N] in the forward epilogue (COL_SCALE, SAVE_PRE: ypre stored) or
    # on the dy tiles of the backward (AOP_SCALE in the dx GEMM, DY_SCALE in the dy kernel); plain LoRA: all off
    dora = variant.get("dora", False)
    gp = (_t("fp32"), _t(dtype))  # g_ptr, pre_ptr
    if kind == "shrink":
        jobs.append(("_lora_shrink_kernel", (
            _t(dtype), _t(dtype), _t("fp32"), M, K, R, *xs, K, 1, R, 1, *seed, mb),
            dict(DROPOUT=variant["dropout"], BLOCK_R=block_r, INPUT_PRECISION=prec)))
    elif kind == "gemm_fwd":
        # FUSED_SHRINK: SA = A [r, K] (the shrink in the K loop), L = xa written by the kernel
        jobs.append(("_lora_gemm_kernel", (
            _t(dtype), _t(dtype), _t(dtype), _t("fp32"), _t(dtype), _t(dtype), _t(dtype), _t("fp32"), _t("fp32"),
            M, N, K, R, *xs, 1, K, N, 1, R, 1, 1, R, K, 1, R, 1, 2.0, 1.0, 0, 0, 1.0, mb, *gp),
            dict(HAS_BIAS=variant["bias"], DROPOUT=False, EPI_LOW=epi_low, FUSED_SHRINK=variant.get("fused", False),
                 COMPUTE_DB=False, BLOCK_R=block_r, INPUT_PRECISION=prec, COL_SCALE=dora,
                 SAVE_PRE=dora and variant.get("save_pre", True), AOP_SCALE=False)))
    elif kind == "gemm_dx":
        # dx = dy·W0 + drop'(dxa·A): Aop = dy [M, N], Bop = W0 [N, K], C = dx [M, K], L = dxa, Rt = A [r, K]
        # fused (no dropout, small rank): SA = B [N, r] read as SAᵀ[n, j], dxa stored, dB accumulated
        fused = variant.get("fused", False)
        jobs.append(("_lora_gemm_kernel", (
            _t(dtype), _t(dtype), _t(dtype), _t("fp32"), _t(dtype), _t(dtype), _t(dtype), _t("fp32"), _t("fp32"),
            M, K, N, R, *dyn, K, 1, K, 1, R, 1, K, 1, 1, R, R, 1, 1.0, 0.5, *seed, mb, *gp),
            dict(HAS_BIAS=False, DROPOUT=variant["dropout"], EPI_LOW=epi_low, FUSED_SHRINK=fused, COMPUTE_DB=fused,
                 BLOCK_R=block_r, INPUT_PRECISION=prec, COL_SCALE=False, SAVE_PRE=False, AOP_SCALE=dora)))
    elif kind == "dy":
        jobs.append(("_lora_dy_kernel", (
            _t(dtype), _t(dtype), _t("fp32"), _t("fp32"), _t("fp32"), M, N, R, *dyn, R, 1, R, 1, 2.0, mb, _t("fp32"),
            _t(dtype), _t("fp32"), N, 1),
            dict(COMPUTE_DXA=variant["dxa"], COMPUTE_DB=variant["db"], EPI_LOW=epi_low, BLOCK_R=block_r,
                 INPUT_PRECISION=prec, DY_SCALE=dora, COMPUTE_DM=dora)))
    elif kind == "da":
        jobs.append(("_lora_da_kernel", (
            _t("fp32"), _t(dtype), _t("fp32"), M, K, R, *xs, *seed, mb),
            dict(DROPOUT=variant["dropout"], EPI_LOW=epi_low, BLOCK_R=block_r, INPUT_PRECISION=prec)))
    return jobs


def _lora_linear_variants(dtype):
    precs = ("tf32", "ieee") if dtype == "fp32" else ("tf32",)
    out = []
    for prec in precs:
        for R in (16, 128):
            for dropout in (False, True):
                out.append(dict(kind="shrink", R=R, prec=prec, dropout=dropout))
                out.append(dict(kind="da", R=R, prec=prec, dropout=dropout))
                out.append(dict(kind="gemm_dx", R=R, prec=prec, dropout=dropout))
                if R <= 32 and not dropout:  # the launcher's fused backward
                    out.append(dict(kind="gemm_dx", R=R, prec=prec, dropout=False, fused=True))
            for bias in (False, True):
                out.append(dict(kind="gemm_fwd", R=R, prec=prec, bias=bias))
                if R <= 32:  # the launcher fuses the shrink for small ranks without dropout
                    out.append(dict(kind="gemm_fwd", R=R, prec=prec, bias=bias, fused=True))
            for dxa, db in ((True, True), (True, False), (False, True)):
                out.append(dict(kind="dy", R=R, prec=prec, dxa=dxa, db=db))
            # DoRA (triton/dora.py, no dropout): the same kernels with g in the epilogue / on the dy tiles
            for save_pre in (True, False):
                out.append(dict(kind="gemm_fwd", R=R, prec=prec, bias=True, dora=True, save_pre=save_pre))
            if R <= 32:
                out.append(dict(kind="gemm_fwd", R=R, prec=prec, bias=True, fused=True, dora=True))
            out.append(dict(kind="gemm_dx", R=R, prec=prec, dropout=False, dora=True))  # (never fused: launcher)
            out.append(dict(kind="dy", R=R, prec=prec, dxa=True, db=True, dora=True))
    return out


def _dora_jobs(dm, dtype, variant, shape):
    """DoRA's dm column reduction (triton/dora.py ``_dora_dm_kernel``): dy and ypre [M, N], any strides; and the
    dropout GEMM (``_dora_dropout_gemm_kernel``), mirroring ``_launch_drop_gemm``: the forward (x·W0ᵀ and
    (x⊙keep)·W0ᵀ, the shrink fused for r <= 32, ypre stored when the magnitude trains) and the dx GEMM."""
    M, N, K = shape["M"], shape["N"], shape["K"]
    ragged = shape is _SHAPES["ragged"]
    dyn = (1, M + 5) if ragged else (N, 1)
    mb = 1 << min(16, (M - 1).bit_length())
    kind = variant["kind"]
    if kind == "dm":
        return [("_dora_dm_kernel", (_t(dtype), _t(dtype), _t("fp32"), M, N, *dyn, N, 1, mb), {})]
    R = variant["R"]
    block_r = min(128, max(16, 1 << (R - 1).bit_length()))
    prec = variant.get("prec", "tf32")
    seed = (-123456789, 1 << 23, 1.25)
    # the r-wide epilogue reads xa / dxa in EPI_BLOCK_R chunks unless the forward fuses the shrink (r <= 32)
    epi_r = block_r if (kind == "drop_fwd" and variant["fused"]) else min(block_r, dm.EPI_BLOCK_R)
    common = dict(EPI_LOW=dtype == "bf16", BLOCK_R=epi_r, INPUT_PRECISION=prec)
    if kind == "drop_fwd":
        # Aop = x [M, K], Bop[k, n] = W0[n, k], C = y [M, N], L = xa fp32 [M, R], Rt[j, n] = B[n, j], SA = A [R, K]
        xs = (1, M + 3) if ragged else (K, 1)
        fused, save_pre = variant["fused"], variant["save_pre"]
        return [("_dora_dropout_gemm_kernel", (
            _t(dtype), _t(dtype), _t(dtype), _t("fp32"), _t(dtype), _t(dtype), _t(dtype), _t("fp32"), _t(dtype),
            M, N, K, R, *xs, 1, K, N, 1, R, 1, 1, R, *((K, 1) if fused else (0, 0)), *((N, 1) if save_pre else (0, 0)),
            2.0, *seed, mb),
            dict(FORWARD=True, HAS_BIAS=variant["bias"], FUSED_SHRINK=fused, SAVE_PRE=save_pre, **common))]
    # drop_dx: Aop = dy [M, N], Bop = W0 [N, K], C = dx [M, K], L = dxa fp32 [M, R], Rt = A [R, K]; GEMM K = N
    return [("_dora_dropout_gemm_kernel", (
        _t(dtype), _t(dtype), _t(dtype), _t("fp32"), _t(dtype), _t(dtype), _t(dtype), _t("fp32"), _t(dtype),
        M, K, N, R, *dyn, K, 1, K, 1, R, 1, K, 1, 0, 0, 0, 0, 1.0, *seed, mb),
        dict(FORWARD=False, HAS_BIAS=False, FUSED_SHRINK=False, SAVE_PRE=False, **common))]


def _dora_variants(dtype):
    out = [dict(kind="dm")]
    precs = ("tf32", "ieee") if dtype == "fp32" else ("tf32",)
    for prec in precs:
        for R in (16, 128):
            for save_pre in (True, False):
                # the launcher fuses the shrink for r <= 32 (FUSED_SHRINK_MAX_R), else lora_linear's shrink runs first
                out.append(dict(kind="drop_fwd", R=R, prec=prec, bias=save_pre, fused=R <= 32, save_pre=save_pre))
            out.append(dict(kind="drop_dx", R=R, prec=prec))
    return out


def _multi_lora_jobs(ml, dtype, variant, shape):
    M, N, K = shape["M"], shape["N"], shape["K"]
    ragged = shape is _SHAPES["ragged"]
    R = 64
    L = 8
    adt = variant.get("adt", dtype)
    xs = (1, M + 3) if ragged else (K, 1)
    ys = (1, M + 7) if ragged else (N, 1)
    ids = variant.get("ids", "i64")
    ranks = variant.get("ranks", "i32")
    slices = (_t(adt),) * 4 + (_t(adt),) * 4 + (N // 4, N // 4, N // 4, N - 3 * (N // 4))
    kind = variant["kind"]
    exact = dtype == "fp32"
    # DoRA epilogue (magnitudes [L, N] fp32, bias [N] in y's dtype) or the plain launch's never-read stand-ins
    dora = variant.get("dora", False)
    dora_args = (_t("fp32"), _t(dtype), N) if dora else (_t("fp32"), _t("fp32"), 1)
    dora_kw = dict(DORA=True, HAS_BIAS=variant.get("bias", True)) if dora else {}
    if kind == "bgmv":
        dot_fp32 = exact or adt != dtype
        splits, kps = 8, -(-K // 8)
        prec = "ieee" if exact else "tf32"
        return [
            ("_bgmv_shrink_kernel", (
                _t("fp32"), _t(dtype), _t(ids), _t(ranks), *slices, M, K, L, R, kps, 16, *xs, splits * M * R, M * R),
                dict(HAS_RANKS=variant["has_ranks"], DOT_FP32=dot_fp32, PRECISION=prec, BLOCK_M=ml.BGMV_BLOCK_M)),
            ("_bgmv_expand_kernel", (
                _t(dtype), _t("fp32"), _t(ids), _t("fp32"), _t(ranks), *slices, M, L, R, N - 3 * (N // 4), splits, 16,
                *ys, splits * M * R, M * R, *dora_args),
                dict(HAS_RANKS=variant["has_ranks"], PRECISION=prec, BLOCK_M=ml.BGMV_BLOCK_M, **dora_kw)),
        ]
    bm = variant["block_m"]
    cap, tiles = M, M // bm + L
    if kind == "shrink":
        dot_fp32 = exact or adt != dtype
        return [("_sgmv_shrink_kernel", (
            _t("fp32"), _t(dtype), _t("i32"), _t("i32"), _t(ranks), *slices, M, K, L, R, cap, tiles,
            *xs, cap * R, R),
            dict(HAS_RANKS=variant["has_ranks"], DOT_FP32=dot_fp32, PRECISION="ieee" if exact else "tf32",
                 BLOCK_M=bm))]
    return [("_sgmv_expand_kernel", (
        _t(dtype), _t("fp32"), _t("i32"), _t("i32"), _t("fp32"), _t(ranks), *slices, M, L, R,
        N - 3 * (N // 4), cap, tiles, *ys, cap * R, R, *dora_args),
        dict(HAS_RANKS=variant["has_ranks"], PRECISION="ieee" if exact else "tf32", BLOCK_M=bm, **dora_kw))]


def _multi_lora_variants(dtype):
    out = []
    adts = (dtype, "fp32") if dtype != "fp32" else ("fp32", "bf16")
    for has_ranks in (True, False):
        out.append(dict(kind="bgmv", has_ranks=has_ranks))
        for bm in (16, 64, 128):
            for adt in adts:
                out.append(dict(kind="shrink", has_ranks=has_ranks, block_m=bm, adt=adt))
            out.append(dict(kind="expand", has_ranks=has_ranks, block_m=bm))
    # index dtypes: adapter ids int32 and ranks int64 (the launcher passes the user's tensors as they are)
    out.append(dict(kind="bgmv", has_ranks=True, ids="i32", ranks="i64"))
    for adt in adts[1:]:
        out.append(dict(kind="bgmv", has_ranks=True, adt=adt))
    # DoRA epilogue (add_lora(..., magnitudes=, bias=)): with and without bias, both expand kernels
    for bias in (True, False):
        out.append(dict(kind="bgmv", has_ranks=True, dora=True, bias=bias))
        out.append(dict(kind="expand", has_ranks=True, block_m=64, dora=True, bias=bias))
    return out


def _merge_jobs(mg, dtype, variant, shape):
    import triton.language as tl

    N, K = shape["N"], shape["K"]
    ragged = shape is _SHAPES["ragged"]
    adt = variant.get("adt", dtype)
    ws = (1, N + 1) if ragged else (K, 1)
    exact = variant["exact"]
    idx = "i64" if variant.get("idx64") else "i32"
    bits = "i32" if dtype == "fp32" else "i16"
    return [("_lora_merge_kernel", (
        _t(dtype), *ws, N, K,
        _t(adt), K, 1,
        _t(adt), 48, 1,
        _t("i32"), _t("fp32"), 3,
        16, 0.5,
        _t("i32"),
        _t("i32"), _t(idx), _t(bits), 1 << 20, _t("i32")),
        dict(BLOCK_R=mg.BLOCK_R, MULTI=variant["multi"], EXACT=exact, USE_TILE_LIST=variant["tiles"],
             DOT_PRECISION="ieee" if adt == "fp32" else "tf32", BITS_TYPE=tl.int32 if dtype == "fp32" else tl.int16))]


def _merge_variants(dtype):
    out = []
    adts = (dtype, "fp32") if dtype != "fp32" else ("fp32",)
    for adt in adts:
        for multi in (False, True):
            out.append(dict(kind="merge", adt=adt, multi=multi, exact=False, tiles=False))
            out.append(dict(kind="merge", adt=adt, multi=multi, exact=True, tiles=False))
            out.append(dict(kind="merge", adt=adt, multi=multi, exact=True, tiles=True))
    out.append(dict(kind="merge", adt=dtype, multi=False, exact=True, tiles=False, idx64=True))
    return out


def _shrink_expand_jobs(se, dtype, variant, shape):
    """The per-token shrink / expand of triton/shrink_expand.py (lora_shrink / lora_expand_), as the launchers call
    them: x / y with any strides, A [L, r_max, K], B [L, N, r_max], 1-D ids / scales / ranks."""
    M, N, K = shape["M"], shape["N"], shape["K"]
    ragged = shape is _SHAPES["ragged"]
    L, R = 8, 64
    adt = variant.get("adt", dtype)
    ids, ranks = variant.get("ids", "i64"), variant.get("ranks", "i32")
    xs = (1, M + 3) if ragged else (K, 1)
    ys = (1, M + 7) if ragged else (N, 1)
    if variant["kind"] == "lshrink":
        return [("_shrink_kernel", (
            _t("fp32"), _t(dtype), _t(adt), _t(ids), _t(ranks), 0.5, M, K, L, R,
            *xs, R * K, K, 1, 1, 1, R, 1), dict(HAS_RANKS=variant["has_ranks"]))]
    return [("_expand_kernel", (
        _t(dtype), _t("fp32"), _t(adt), _t(ids), _t("fp32"), _t(ranks), M, N, L, R, 16,
        *ys, R, 1, N * R, R, 1, 1, 1, 1), dict(HAS_RANKS=variant["has_ranks"]))]


def _shrink_expand_variants(dtype):
    adts = (dtype, "fp32") if dtype != "fp32" else ("fp32",)
    out = []
    for kind in ("lshrink", "lexpand"):
        for has_ranks in (True, False):
            for adt in adts:
                out.append(dict(kind=kind, has_ranks=has_ranks, adt=adt))
        out.append(dict(kind=kind, has_ranks=True, ids="i32", ranks="i64"))
    return out


def _embedding_jobs(em, dtype, variant, shape):
    """The LoRA embedding kernels of triton/embedding.py, as their launchers call them: M tokens, a [V, D] table
    (V = K, D = N), A [r, V], B [D, r] (ragged: transposed storage of the table, A and dy); serving: stacked
    A [L, r_max, V] (ragged: vLLM's [L, V, r] as a transposed view) and B [L, D, r_max], 1-D ids / scales / ranks."""
    M, D, V = shape["M"], shape["N"], shape["K"]
    ragged = shape is _SHAPES["ragged"]
    R, L = variant.get("R", 16), 8
    ids = variant.get("ids", "i64")
    prec = variant.get("prec", "tf32")
    block_r = max(16, 1 << (R - 1).bit_length())
    ws = (1, V + 3) if ragged else (D, 1)  # table [V, D]
    as_ = (1, R) if ragged else (V, 1)  # A [R, V]
    dys = (1, M + 5) if ragged else (D, 1)
    kind = variant["kind"]
    if kind == "fwd":
        return [("_emb_fwd_kernel", (
            _t(dtype), _t(ids), _t(dtype), _t(dtype), _t(dtype), 0.5, M, D, V, R,
            1, *ws, *as_, R, 1, D, 1), dict(BLOCK_R=block_r, INPUT_PRECISION=prec))]
    if kind == "bwd":
        return [("_emb_da_kernel", (
            _t("fp32"), _t(dtype), _t(ids), _t(dtype), 0.5, 3, M, D, V, R,
            *dys, 1, R, 1), dict(BLOCK_R=block_r, INPUT_PRECISION=prec)),
                ("_emb_db_kernel", (
            _t("fp32"), _t(dtype), _t(ids), _t(dtype), 0.5, 512, M, D, V, R,
            *dys, 1, *as_), dict(BLOCK_R=block_r, INPUT_PRECISION=prec))]
    adt = variant.get("adt", dtype)
    a3 = (V * R, 1, R) if ragged else (R * V, V, 1)  # A [L, r_max, V]
    return [("_emb_serve_kernel", (
        _t(dtype), _t(ids), _t(adt), _t(adt), _t(ids), _t("fp32"), _t(variant.get("ranks", "i32")),
        M, D, L, V, R, D, 1, 1, *a3, D * R, R, 1, 1, 1, 1), dict(HAS_RANKS=variant.get("has_ranks", True)))]


def _embedding_variants(dtype):
    out = [dict(kind="fwd"), dict(kind="fwd", R=128), dict(kind="bwd"), dict(kind="bwd", R=128, ids="i32")]
    if dtype == "fp32":
        out += [dict(kind="fwd", prec="ieee"), dict(kind="bwd", prec="ieee")]
    for has_ranks in (True, False):
        out.append(dict(kind="serve", has_ranks=has_ranks))
    if dtype != "fp32":
        out.append(dict(kind="serve", adt="fp32", ids="i32", ranks="i64"))
    return out


def _moe_lora_jobs(mm, dtype, variant, shape):
    """The MoE LoRA kernels of triton/moe_lora.py, as their launchers call them: E = 8 experts, top-2, the grouped
    GEMM forward and backward over a routing's tiles (x token rows or pair rows; W [E, N, K] or stored transposed
    [E, K, N] as GPT-OSS does, B as a [E, N, r] tensor or PEFT's strided [N, r·E] view, A per expert or shared), the
    combine (and the cast of an fp32 atomic routing sum), the serving update over [L, E, r, K] slots. ``atomic``:
    the routing sum by atomics (forward: into the [M, N] sum; backward: dx of token-row x into [M, K]): True = fp32
    atomics, "out" = atomics in the output dtype itself (triton/moe_lora.py: routing_sum's "atomic_out")."""
    M, N, K = shape["M"], shape["N"], shape["K"]
    ragged = shape is _SHAPES["ragged"]
    E, k, L = 8, 2, 4
    P = M * k
    R = variant.get("R", 16)
    block_r = max(16, 1 << (R - 1).bit_length())
    bm = variant.get("block_m", 64)
    T = P // bm + E + 1
    prec = variant.get("prec", "tf32")
    xp = variant.get("x_pair", False)
    xs = (1, (P if xp else M) + 3) if ragged else (K, 1)
    peft = variant.get("peft_layout", False)
    ws = (N * K, 1, N) if peft else (N * K, K, 1)  # transposed storage [E, K, N] (GPT-OSS) with PEFT's lora_B layout
    a_s = (0 if variant.get("shared_a") else R * K, K, 1)
    b_s = (1, R * E, E) if peft else (N * R, R, 1)
    kind = variant["kind"]
    atomic = variant.get("atomic", False)
    acc_t = dtype if atomic == "out" else "fp32" if atomic else dtype  # the dtype of the buffer out / dx is written to
    if kind == "fwd":
        lora = variant.get("lora", True)
        return [("_moe_fwd_kernel", (
            _t(acc_t), _t("fp32"), _t(dtype), _t(dtype), _t(dtype), _t(dtype), _t(dtype), _t("fp32"),
            _t("i32"), _t("i32"),
            N, K, R if lora else 0, k, T, E,
            N, 1, R, 1, *xs, *ws, N, 1, *a_s, *b_s, k, 1, T, 0.5),
            dict(X_PAIR=xp, HAS_LORA=lora, HAS_BIAS=variant.get("bias", False), HAS_WEIGHTS=variant.get("weights", False),
                 ATOMIC_OUT=bool(atomic), EPI_LOW=dtype == "bf16", BLOCK_R=block_r, INPUT_PRECISION=prec, BLOCK_M=bm))]
    if kind == "bwd":
        dyn = (1, M + 5) if ragged else (N, 1)
        flags = {f: variant.get(f.lower(), True) for f in ("COMPUTE_DX", "COMPUTE_DA", "COMPUTE_DB", "COMPUTE_DW")}
        return [("_moe_bwd_kernel", (
            _t(acc_t), _t("fp32"), _t("fp32"), _t("fp32"), _t(dtype), _t(dtype), _t("fp32"),
            _t(dtype), _t(dtype), _t(dtype), _t(dtype), _t("fp32"), _t("i32"), _t("i32"),
            N, K, R, k, T, E,
            K, 1, *dyn, *xs, R, 1, *ws, N, 1, *a_s, *b_s, k, 1, T, 0.5),
            dict(X_PAIR=xp, DY_PAIR=variant.get("dy_pair", False), HAS_LORA=True, HAS_BIAS=variant.get("bias", False),
                 HAS_WEIGHTS=variant.get("weights", True), ATOMIC_DX=bool(atomic), EPI_LOW=dtype == "bf16", BLOCK_R=block_r,
                 INPUT_PRECISION=prec, BLOCK_M=bm, **flags))]
    if kind == "combine":
        if variant.get("cast"):  # the fp32 atomic sum [M, N] cast to the output dtype (k = 1)
            return [("_moe_combine_kernel", (_t(dtype), _t("fp32"), M, N, 1, N, 1, N, 1), {})]
        return [("_moe_combine_kernel", (_t(dtype), _t(dtype), M, N, k, N, 1, N, 1), {})]
    # serving update: one slice of [L, E, r_max, K] / [L, E, N, r_max] slots, ranks read in-kernel
    adt = variant.get("adt", dtype)
    ids_t = variant.get("ranks_dtype", "i32")
    return [("_moe_delta_kernel", (
        _t(dtype), _t(dtype), _t(adt), _t(adt), _t("fp32"), _t("fp32"), _t(ids_t), _t("i32"), _t("i32"),
        N, K, R, k, T, L * E, 256, 0,
        N, 1, *xs, E * R * K, R * K, K, 1, E * N * R, N * R, R, 1, k, 1, 1, 1, T),
        dict(X_PAIR=xp, HAS_WEIGHTS=variant.get("weights", False), HAS_RANKS=variant.get("has_ranks", True),
             DOT_FP32=dtype == "fp32" or adt != dtype, B_LOW=adt == "bf16", BLOCK_R=block_r,
             INPUT_PRECISION="ieee" if prec == "ieee" else "tf32", BLOCK_M=bm))]


def _moe_lora_variants(dtype):
    precs = ("tf32", "ieee") if dtype == "fp32" else ("tf32",)
    out = []
    for prec in precs:
        for R in (16, 128):
            out.append(dict(kind="fwd", R=R, prec=prec))
            out.append(dict(kind="bwd", R=R, prec=prec))
            out.append(dict(kind="delta", R=R, prec=prec))
    out += [
        dict(kind="fwd", x_pair=True, weights=True, bias=True, block_m=16),  # down projection, decode-sized tiles
        dict(kind="fwd", peft_layout=True, shared_a=True),  # transposed storage, PEFT's strided B, shared A
        dict(kind="fwd", lora=False),  # the plain grouped GEMM
        dict(kind="fwd", x_pair=True, weights=True, bias=True, atomic=True),  # down projection, atomic routing sum
        dict(kind="fwd", x_pair=True, weights=True, bias=True, atomic="out"),  # ... by atomics in y's own dtype
        dict(kind="bwd", x_pair=True, dy_pair=False, bias=True, block_m=16),
        dict(kind="bwd", peft_layout=True, shared_a=True, weights=False, compute_dw=False),
        dict(kind="bwd", compute_dx=False, compute_da=False, compute_dw=False),  # dB only (frozen A, no router grad)
        dict(kind="bwd", dy_pair=True, weights=False, compute_dw=False, atomic=True),  # gate/up: dx summed by atomics
        dict(kind="bwd", dy_pair=True, weights=False, compute_dw=False, atomic="out"),  # ... in dx's own dtype
        dict(kind="combine"),
        dict(kind="combine", cast=True),
        dict(kind="delta", x_pair=True, weights=True, has_ranks=False, block_m=16, ranks_dtype="fp32"),
        dict(kind="delta", adt="fp32" if dtype != "fp32" else "bf16", ranks_dtype="i64"),  # adapters in another dtype
    ]
    return out


def _quant_linear_jobs(ql, dtype, variant, shape):
    """The quantised-base kernels (triton/quant_linear.py), mirroring its launchers: the fused GEMM forward (W0
    read transposed) and dx (W0 as stored), and the scratch strategy's dequantisation kernel."""
    M, N, K = shape["M"], shape["N"], shape["K"]
    ragged = shape is _SHAPES["ragged"]
    fmt = variant["fmt"]
    fid = {"nf4": 0, "int8": 1, "fp8": 2, "fp8t": 2}[fmt]
    q = {"nf4": "u8", "int8": "i8", "fp8": "u8", "fp8t": "u8"}[fmt]
    stride_qn = 0 if fid == 0 else K
    const = dict(FMT=fid, BLOCKSIZE=64 if fid == 0 else 1, SCALE_ONE=fmt == "fp8t", FLAT64=variant.get("flat64", False))
    kind = variant["kind"]
    if kind == "dequant":
        bn, bk = ql.DEQUANT_BLOCK
        return [("_dequant_kernel", (_t(q), _t("fp32"), _t("fp32"), _t(dtype), N, K, stride_qn, K), const)]
    R = variant["R"]
    block_r = min(128, max(16, 1 << (R - 1).bit_length()))
    prec = variant.get("prec", "tf32")
    mb = 1 << min(16, (M - 1).bit_length())
    xs = (1, M + 3) if ragged else (K, 1)
    dyn = (1, M + 5) if ragged else (N, 1)
    seed = (-123456789, 1 << 23, 1.25)
    ptrs = (_t(dtype), _t(q), _t("fp32"), _t("fp32"), _t(dtype), _t("fp32"), _t(dtype), _t(dtype))
    epi_low = dtype == "bf16"
    if kind == "gemm_fwd":
        return [("_quant_gemm_kernel", (*ptrs, M, N, K, R, K, *xs, stride_qn, N, 1, R, 1, 1, R, 2.0, 0, 0, 1.0, mb),
                 dict(const, W_T=True, HAS_BIAS=variant["bias"], DROPOUT=False, EPI_LOW=epi_low, BLOCK_R=block_r,
                      INPUT_PRECISION=prec))]
    return [("_quant_gemm_kernel", (*ptrs, M, K, N, R, K, *dyn, stride_qn, K, 1, R, 1, K, 1, 1.0, *seed, mb),
             dict(const, W_T=False, HAS_BIAS=False, DROPOUT=variant["dropout"], EPI_LOW=epi_low, BLOCK_R=block_r,
                  INPUT_PRECISION=prec))]


def _quant_linear_variants(dtype):
    precs = ("tf32", "ieee") if dtype == "fp32" else ("tf32",)
    out = []
    for fmt in ("nf4", "int8", "fp8", "fp8t"):
        for prec in precs:
            for R in (16, 128):
                for bias in (False, True):
                    out.append(dict(kind="gemm_fwd", fmt=fmt, R=R, prec=prec, bias=bias))
                for dropout in (False, True):
                    out.append(dict(kind="gemm_dx", fmt=fmt, R=R, prec=prec, dropout=dropout))
        out.append(dict(kind="dequant", fmt=fmt))
    out.append(dict(kind="gemm_fwd", fmt="nf4", R=16, bias=False, flat64=True))  # N·K >= 2^31: int64 flat index
    out.append(dict(kind="dequant", fmt="nf4", flat64=True))
    return out


def _modules():
    from lora_kernels.triton import dora, lora_linear, merge, moe_lora, multi_lora, quant_linear, shrink_expand

    return {"lora_linear": lora_linear, "multi_lora": multi_lora, "merge": merge, "quant_linear": quant_linear,
            "shrink_expand": shrink_expand, "moe_lora": moe_lora, "dora": dora}


# kernels launched with one fixed config (every config must fit, like the merge's)
_NOT_AUTOTUNED = ("_lora_merge_kernel", "_dequant_kernel")


def _kernel_table(mods):
    """kernel name -> (module name, kernel object, config list [(meta, options)], fallback config index or None)."""
    ll, ml, mg = mods["lora_linear"], mods["multi_lora"], mods["merge"]
    table = {}
    for name in ("_lora_shrink_kernel", "_lora_gemm_kernel", "_lora_dy_kernel", "_lora_da_kernel"):
        k = getattr(ll, name)
        cfgs = _configs(k)
        fallback = min(range(len(cfgs)), key=lambda i: cfgs[i][0]["BLOCK_M"])
        table[name] = ("lora_linear", k, cfgs, fallback)
    for name in ("_bgmv_shrink_kernel", "_bgmv_expand_kernel", "_sgmv_shrink_kernel", "_sgmv_expand_kernel"):
        k = getattr(ml, name)
        table[name] = ("multi_lora", k, _configs(k), None)
    merge_cfgs = []
    for c in mg.MERGE_CONFIGS:
        meta = {k: v for k, v in c.items() if k.startswith("BLOCK")}
        opts = {k: v for k, v in c.items() if not k.startswith("BLOCK")}
        opts["enable_fp_fusion"] = False
        merge_cfgs.append((meta, opts))
    table["_lora_merge_kernel"] = ("merge", mg._lora_merge_kernel, merge_cfgs, None)
    ql = mods["quant_linear"]
    cfgs = _configs(ql._quant_gemm_kernel)
    table["_quant_gemm_kernel"] = ("quant_linear", ql._quant_gemm_kernel, cfgs,
                                   min(range(len(cfgs)), key=lambda i: cfgs[i][0]["BLOCK_M"]))
    bn, bk = ql.DEQUANT_BLOCK
    table["_dequant_kernel"] = ("quant_linear", ql._dequant_kernel,
                                [(dict(BLOCK_N=bn, BLOCK_K=bk), dict(num_warps=4, num_stages=3))], None)
    se = mods["shrink_expand"]
    for name in ("_shrink_kernel", "_expand_kernel"):
        table[name] = ("shrink_expand", getattr(se, name), _configs(getattr(se, name)), None)
    from lora_kernels.triton import embedding as em  # LoRA embedding kernels

    mods.setdefault("embedding", em)
    for name in ("_emb_fwd_kernel", "_emb_da_kernel", "_emb_db_kernel", "_emb_serve_kernel"):
        table[name] = ("embedding", getattr(em, name), _configs(getattr(em, name)), None)
    mm = mods["moe_lora"]
    for name in ("_moe_fwd_kernel", "_moe_bwd_kernel", "_moe_combine_kernel", "_moe_delta_kernel"):
        table[name] = ("moe_lora", getattr(mm, name), _configs(getattr(mm, name)), None)
    table["_dora_dm_kernel"] = ("dora", mods["dora"]._dora_dm_kernel, _configs(mods["dora"]._dora_dm_kernel), None)
    cfgs = _configs(mods["dora"]._dora_dropout_gemm_kernel)
    table["_dora_dropout_gemm_kernel"] = ("dora", mods["dora"]._dora_dropout_gemm_kernel, cfgs,
                                          min(range(len(cfgs)), key=lambda i: cfgs[i][0]["BLOCK_M"]))
    return table


def _small_m_set(cfgs):
    """Indices of the configs that ``_prune_by_m`` keeps for the smallest M (BLOCK_M <= 32): every larger M keeps
    a superset, so one of these has to fit for every launch to find a runnable config."""
    return [i for i, (meta, _) in enumerate(cfgs) if meta["BLOCK_M"] <= 32]


def _ci_variants(variants):
    """A subset of a kernel family's variants covering every value of every flag at least once per kind (the
    first variant of each kind is the main one and always included)."""
    chosen, seen = [], set()
    for v in variants:
        new = {(v["kind"], k, json.dumps(val)) for k, val in v.items()} - seen
        if new:
            chosen.append(v)
            seen |= new
    return chosen


def _picks(level, kname, cfgs, prune_by_m, dtype, target, shape_name, main_kind, main, worst=False, large=False):
    """Config indices compiled for one (kernel, dtype, target, variant, shape) at a matrix level. ``large``: a
    variant whose large-M configs must be compiled too (the fused-shrink GEMMs, the common r <= 32 path)."""
    if level == "full":
        return set(range(len(cfgs)))
    small = set(_small_m_set(cfgs)) if prune_by_m else set()
    # representative config: the small-M fallback for lora_linear (the config a decode launch can be left with),
    # the first of the list otherwise
    rep = min(small, key=lambda i: cfgs[i][0]["BLOCK_M"]) if small else 0
    if shape_name == "ragged":
        return {rep} if target == 90 else set()
    picks = set()
    if level == "wide":
        picks = {0} if (main_kind or target == 90) else set()
        if main:
            picks |= small
            if kname in _NOT_AUTOTUNED or (dtype == "bf16" and target == 90):
                picks |= set(range(len(cfgs)))
        return picks
    # ci
    if large and dtype == "bf16" and target == 90:
        picks |= {i for i, (meta, _) in enumerate(cfgs) if meta.get("BLOCK_M", 0) >= 64}
    if worst and dtype == "fp32" and target == 80:
        picks |= small  # 128-wide rank tiles in fp32 on A100: the largest shared memory a small-M launch needs
    if main:
        picks.add(rep)
        if dtype == "bf16" and target == 90:
            picks |= set(range(len(cfgs)))
        if dtype == "fp32" and target == 80:
            # the largest elements on the smallest shared memory: the worst case of the small-M set and of the
            # merge configs (which must all fit: pick_config can return any of them)
            picks |= set(range(len(cfgs))) if kname in _NOT_AUTOTUNED else small
    elif dtype == "bf16" and target == 90:
        picks.add(rep)
    return picks


LEVELS = ("ci", "wide", "full")


def build_jobs(level: str):
    """Every compile of the matrix at ``level`` (ci | wide | full): [(job dict, args, constexprs)], deduplicated."""
    assert level in LEVELS, level
    mods = _modules()
    table = _kernel_table(mods)
    groups = [
        ("lora_linear", _lora_linear_variants, _lora_linear_jobs),
        ("multi_lora", _multi_lora_variants, _multi_lora_jobs),
        ("merge", _merge_variants, _merge_jobs),
        ("quant_linear", _quant_linear_variants, _quant_linear_jobs),
        ("embedding", _embedding_variants, _embedding_jobs),
        ("shrink_expand", _shrink_expand_variants, _shrink_expand_jobs),
        ("moe_lora", _moe_lora_variants, _moe_lora_jobs),
        ("dora", _dora_variants, _dora_jobs),
    ]
    jobs = {}

    def add(modname, kname, dtype, target, variant, shape_name, ci, args, constexprs):
        meta, opts = table[kname][2][ci]
        key = json.dumps([kname, dtype, target, variant, shape_name, ci], sort_keys=True)
        jobs[key] = (dict(module=modname, kernel=kname, dtype=dtype, target=target, variant=variant,
                          shape=shape_name, config=ci, meta=meta, opts=opts, n_configs=len(table[kname][2]),
                          autotuned=kname not in _NOT_AUTOTUNED, prune_by_m=table[kname][3] is not None,
                          n_small_m=len(_small_m_set(table[kname][2])) if table[kname][3] is not None else 0),
                     args, constexprs)

    for modname, variants_fn, jobs_fn in groups:
        mod = mods[modname]
        for dtype in DTYPES:
            variants = variants_fn(dtype)
            if level != "full":
                variants = _ci_variants(variants)
            kinds_seen, kernels_seen, worst_seen = set(), set(), set()
            for variant in variants:
                main_kind = variant["kind"] not in kinds_seen
                kinds_seen.add(variant["kind"])
                for shape_name, shape in _SHAPES.items():
                    if shape_name == "ragged" and not (level == "full" or (main_kind and dtype == "bf16")):
                        continue
                    for kname, args, constexprs in jobs_fn(mod, dtype, variant, shape):
                        # main: the first variant of the kernel (e.g. the forward GEMM, not the dx GEMM)
                        main = kname not in kernels_seen
                        worst = (variant.get("R") == 128 and variant.get("prec") == "tf32" and shape_name == "main"
                                 and kname not in worst_seen)
                        if shape_name == "main":
                            kernels_seen.add(kname)
                            if worst:
                                worst_seen.add(kname)
                        cfgs, prune = table[kname][2], table[kname][3] is not None
                        for target in TARGETS:
                            picks = _picks(level, kname, cfgs, prune, dtype, target, shape_name, main_kind, main, worst,
                                           large=variant.get("fused", False) and shape_name == "main")
                            for ci in sorted(picks):
                                add(modname, kname, dtype, target, variant, shape_name, ci, args, constexprs)
    return list(jobs.values())


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _compile_one(item):
    job, args, constexprs = item
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    mods = _modules()
    table = _kernel_table(mods)
    _, kernel, cfgs, _ = table[job["kernel"]]
    meta, opts = cfgs[job["config"]]
    fn = _raw_jit(kernel)
    target = GPUTarget("cuda", job["target"], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(constexprs, **meta)
    named = dict(zip(fn.arg_names, args), **kwargs)
    for name, rule in _heuristics(kernel).items():
        kwargs[name] = rule(named)
    t0 = time.time()
    res = dict(job)
    res.pop("opts")
    res["num_warps"] = opts.get("num_warps")
    res["num_stages"] = opts.get("num_stages")
    try:
        bound, spec, call_opts = binder(*args, **kwargs, **opts)
        options, signature, cexprs, attrs = fn._pack_args(backend, call_opts, bound, spec, call_opts)
        src = ASTSource(fn, signature, cexprs, attrs)
        log = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
        assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0, "no cubin produced"
        res["ok"] = True
        res["shared"] = int(compiled.metadata.shared)
        text = log.getvalue()
        for k, rx in _PTXAS_RE.items():
            m = rx.search(text)
            res[k] = int(m.group(1)) if m else None
    except Exception as e:  # noqa: BLE001 - every failure is reported
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {str(e)[-3000:]}"
    res["seconds"] = round(time.time() - t0, 2)
    return res


def run_worker(level: str, procs: int, jsonl: str):
    """Compile the matrix (this process must have the interpreter off), appending one JSON line per compile."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the compile worker must run with the interpreter off"
    items = build_jobs(level)
    # heaviest kernels first so the pool's tail is short
    weight = {"_lora_gemm_kernel": 0, "_quant_gemm_kernel": 0, "_dora_dropout_gemm_kernel": 0, "_lora_shrink_kernel": 1,
              "_lora_dy_kernel": 1}
    items.sort(key=lambda it: weight.get(it[0]["kernel"], 2))
    with open(jsonl, "a") as f:
        if procs <= 1:
            it = map(_compile_one, items)
        else:
            import multiprocessing as mp

            pool = mp.get_context("fork").Pool(procs)
            it = pool.imap_unordered(_compile_one, items, chunksize=1)
        for res in it:
            f.write(json.dumps(res) + "\n")
            f.flush()


# ----------------------------------------------------------------------------------------------------------------
# Analysis (shared by the test and the script)
# ----------------------------------------------------------------------------------------------------------------


def _variant_key(r):
    return (r["kernel"], r["dtype"], r["target"], json.dumps(r["variant"], sort_keys=True), r["shape"])


def check_results(results):
    """Problems: compile errors, and launches that would find no config fitting the target's shared memory.

    * merge (not autotuned; ``pick_config`` may return any ``MERGE_CONFIGS`` entry): every config must fit;
    * lora_linear (``_prune_by_m``): the configs with BLOCK_M <= 32 are what a decode-sized M keeps (larger M keep
      supersets); one of them must fit, and if there is only one it must fit (the autotuner does not benchmark a
      single config, so it cannot skip it);
    * any autotuned kernel: of a fully compiled config list, at least one config must fit;
    * lora_linear and DoRA's dropout GEMM: no register spills in a config the autotuner can pick at M >= LARGE_M
      (BLOCK_M >= LARGE_M_MIN_BLOCK_M of triton/lora_linear.py).
    """
    from lora_kernels.triton.lora_linear import LARGE_M_MIN_BLOCK_M

    problems = []
    for r in results:
        if not r["ok"]:
            problems.append(f"compile error: {_label(r)}: {r['error']}")
        elif ((r["module"] == "lora_linear" or r["kernel"] == "_dora_dropout_gemm_kernel")
              and r["meta"]["BLOCK_M"] >= LARGE_M_MIN_BLOCK_M
              and (r.get("spill_stores") or r.get("spill_loads"))):
            problems.append(f"spills {r.get('spill_stores')} B in a large-M config: {_label(r)}")
    groups = {}
    for r in results:
        if r["ok"]:
            groups.setdefault(_variant_key(r), {})[r["config"]] = r
    for key, per_cfg in groups.items():
        any_r = next(iter(per_cfg.values()))
        limit = SHARED_LIMIT[any_r["target"]]
        fits = {ci: r["shared"] <= limit for ci, r in per_cfg.items()}
        if not any_r["autotuned"]:
            problems += [f"shared memory {r['shared']} > {limit}: {_label(r)} (merge configs are not autotuned)"
                         for ci, r in per_cfg.items() if not fits[ci]]
            continue
        if len(per_cfg) == any_r["n_configs"] and not any(fits.values()):
            problems.append(f"no config fits {limit} bytes of shared memory: {_label(any_r)}")
        if any_r["prune_by_m"]:
            small = {ci: r for ci, r in per_cfg.items() if r["meta"]["BLOCK_M"] <= 32}
            if small and len(small) == any_r.get("n_small_m", len(small)) and not any(fits[ci] for ci in small):
                problems.append(f"no BLOCK_M <= 32 config fits {limit} bytes of shared memory (small-M launches "
                                f"would fail): {_label(any_r)}")
    return problems


def _label(r):
    v = ",".join(f"{k}={val}" for k, val in sorted(r["variant"].items()) if k != "kind")
    return (f"{r['kernel']}[{r['variant']['kind']}] {r['dtype']} sm_{r['target']} {r['shape']} cfg#{r['config']} "
            f"{r['meta']} w{r['num_warps']}s{r['num_stages']} ({v})")


def format_table(results):
    lines = [f"{'kernel':22} {'kind':9} {'dt':4} {'sm':3} {'shape':6} {'cfg':3} {'meta':52} {'w/s':5} "
             f"{'ok':3} {'smem KB':>8} {'regs':>4} {'spill':>5} {'s':>5}  variant"]
    for r in sorted(results, key=lambda r: (r["kernel"], r["dtype"], r["target"], r["shape"], str(r["variant"]), r["config"])):
        meta = ",".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in r["meta"].items())
        v = ",".join(f"{k}={val}" for k, val in sorted(r["variant"].items()) if k != "kind")
        smem = f"{r['shared'] / 1024:.1f}" if r["ok"] else "-"
        spill = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) if r["ok"] else "-"
        lines.append(f"{r['kernel']:22} {r['variant']['kind']:9} {r['dtype']:4} {r['target']:<3} {r['shape']:6} "
                     f"{r['config']:<3} {meta:52} {r['num_warps']}/{r['num_stages']:<3} {'OK' if r['ok'] else 'ERR':3} "
                     f"{smem:>8} {str(r.get('regs', '-')):>4} {str(spill):>5} {r['seconds']:5.1f}  {v}")
    return "\n".join(lines)


def run_subprocess(level: str, timeout: float = 3600):
    """Run the worker in a fresh interpreter-free subprocess; return (results, wall seconds)."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory(prefix="lk_triton_aot_") as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        out = os.path.join(tmp, "results.jsonl")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--json", out, "--level", level]
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        wall = time.time() - t0
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"compile worker failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        return load_jsonl(out), wall


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def nvidia_backend_available() -> bool:
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception:  # noqa: BLE001 - no (usable) triton: skip
        return False
    return "nvidia" in backends


def main(argv):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true", help="compile in this process (needs TRITON_INTERPRET=0)")
    p.add_argument("--level", default="ci", choices=LEVELS, help="matrix size (see the module docstring)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    if a.worker:
        run_worker(a.level, a.procs, a.json)
        return 0
    results, wall = run_subprocess(a.level)
    print(format_table(results))
    problems = check_results(results)
    print(f"\n{len(results)} compiles in {wall:.1f} s; {sum(not r['ok'] for r in results)} errors")
    for msg in problems:
        print("PROBLEM:", msg)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
