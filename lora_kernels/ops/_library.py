"""Every lora_kernels operator: schema, fake (meta) kernel and backend routing, declared in one place.

Public ops take a resolved ``backend`` string ("torch" | "triton" | "cuda"; chosen by
``lora_kernels._backend.resolve_backend``) and route to the backend's launcher. The ``cuda_*`` ops are
the CUDA extension's kernels: their schema and fake live here, their only implementation is the C++
``TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m)`` in ``csrc/``, so importing this module never needs the
extension, ``torch.library.opcheck`` works, and ``torch.compile`` traces every op as one node.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .. import reference as ref

lib = torch.library.Library("lora_kernels", "DEF")

# ----------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------
SCHEMAS = {
    # y [M, N] (x.dtype), xa [M, r] (fp32; fp64 for fp64 inputs)
    "lora_linear_fwd": "lora_linear_fwd(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
    "Tensor? bias, float dropout_p, SymInt seed, str backend) -> (Tensor, Tensor)",
    # (dx, dA, dB, dW0); a gradient not asked for by output_mask comes back as an empty tensor
    "lora_linear_bwd": "lora_linear_bwd(Tensor dy, Tensor? x, Tensor xa, Tensor weight, Tensor lora_a, "
    "Tensor lora_b, float scale, float dropout_p, SymInt seed, bool[] output_mask, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "add_lora_": "add_lora_(Tensor(a!) y, Tensor x, Tensor[] lora_a, Tensor[] lora_b, Tensor adapter_ids, "
    "Tensor scales, Tensor? ranks, str backend) -> ()",
    # add_lora_ with precomputed batch metadata (lora_kernels.serving.LoRABatchMeta: sorted token ids [C] int32,
    # tile table [3, T] int32, tokens per tile); an acceleration structure only: same result as add_lora_
    "add_lora_meta_": "add_lora_meta_(Tensor(a!) y, Tensor x, Tensor[] lora_a, Tensor[] lora_b, Tensor adapter_ids, "
    "Tensor scales, Tensor? ranks, Tensor sorted_token_ids, Tensor tiles, int block_m, str backend) -> ()",
    "merge_": "merge_(Tensor(a!) weight, Tensor[] lora_a, Tensor[] lora_b, float[] scales, str backend) -> ()",
    # --- CUDA extension kernels (C++ implementation only) ---
    # xa[m, :ranks[i]] = x[m] · lora_a[i, :ranks[i]]ᵀ for i = adapter_ids[m] >= 0; other entries 0. fp32 [M, r_max]
    # (with sorted_token_ids + tiles of a serving.LoRABatchMeta: the grouped launch, adapters taken from the tiles)
    "cuda_multi_lora_shrink": "cuda_multi_lora_shrink(Tensor x, Tensor lora_a, Tensor adapter_ids, Tensor? ranks, "
    "Tensor? sorted_token_ids=None, Tensor? tiles=None, int block_m=0) -> Tensor",
    # y[m, col_offset + n] += scales[i] · Σ_j<ranks[i] xa[m, j] · lora_b[i, n, j]   for i = adapter_ids[m] >= 0
    "cuda_multi_lora_expand_": "cuda_multi_lora_expand_(Tensor(a!) y, Tensor xa, Tensor lora_b, Tensor adapter_ids, "
    "Tensor scales, Tensor? ranks, int col_offset, Tensor? sorted_token_ids=None, Tensor? tiles=None, int block_m=0) -> ()",
    # lora_linear_fwd on the extension (x [M, K] 2-D): (y [M, N] x.dtype, xa [M, r] fp32)
    "cuda_lora_linear_fwd": "cuda_lora_linear_fwd(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
    "Tensor? bias, float dropout_p, int seed) -> (Tensor, Tensor)",
    # lora_linear_bwd on the extension: (dx, dA, dB, dW0); one not asked for by output_mask is an empty [0] tensor
    "cuda_lora_linear_bwd": "cuda_lora_linear_bwd(Tensor dy, Tensor? x, Tensor xa, Tensor weight, Tensor lora_a, "
    "Tensor lora_b, float scale, float dropout_p, int seed, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
    # drop(x) = x · keep / (1 − p) in fp32 [M, K], keep = reference.dropout_keep_mask(seed, M, K, p)
    "cuda_lora_dropout": "cuda_lora_dropout(Tensor x, float dropout_p, int seed) -> Tensor",
    # weight[N, K] <- round(weight + Σᵢ scales[i]·lora_b[:, rs[i]:rs[i+1]]·lora_a[rs[i]:rs[i+1]]) with rs = rank_starts
    # (adapters concatenated along the rank; rank_starts int32 [n+1], scales fp32 [n], both on the device)
    "cuda_merge_": "cuda_merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, Tensor rank_starts, Tensor scales) -> ()",
    # cuda_merge_ + repair list of the exact unmerge (lora_kernels/exact_merge.py): counters int32 [4] =
    # (claimed, stored, overflowed tiles, new non-finite); tiles listed in tile_ids only (None: all tiles)
    "cuda_merge_exact_": "cuda_merge_exact_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, Tensor rank_starts, "
    "Tensor scales, Tensor(b!) counters, Tensor(c!) repair_index, Tensor(d!) repair_bits, Tensor(e!) overflow_tiles, "
    "Tensor? tile_ids) -> ()",
}
for _schema in SCHEMAS.values():
    lib.define(_schema)

# (op, backend) -> "module:function" of the launcher: the one table of which backend implements what.
# Launchers are imported lazily (Triton / the extension load only when used); an entry counts as
# available once its module exists. "torch" always goes to the reference.
_LAUNCHERS = {
    ("lora_linear_fwd", "triton"): "lora_kernels.triton.lora_linear:lora_linear_fwd_triton",
    ("lora_linear_bwd", "triton"): "lora_kernels.triton.lora_linear:lora_linear_bwd_triton",
    ("add_lora", "triton"): "lora_kernels.triton.multi_lora:add_lora_triton",
    ("merge", "triton"): "lora_kernels.triton.merge:merge_triton",
    ("lora_linear_fwd", "cuda"): "lora_kernels.ops.cuda_impl:lora_linear_fwd_cuda",
    ("lora_linear_bwd", "cuda"): "lora_kernels.ops.cuda_impl:lora_linear_bwd_cuda",
    ("add_lora", "cuda"): "lora_kernels.ops.cuda_impl:add_lora_cuda",
    ("merge", "cuda"): "lora_kernels.ops.cuda_merge:merge_cuda",
}
# Public op name (as passed to resolve_backend) -> the launcher entries it needs.
_OP_PARTS = {"lora_linear": ("lora_linear_fwd", "lora_linear_bwd")}


def _launcher_defined(target: str) -> bool:
    mod, fn = target.split(":")
    try:
        spec = importlib.util.find_spec(mod)
    except ModuleNotFoundError:
        return False
    if spec is None or spec.origin is None:
        return False
    with open(spec.origin) as f:
        return f"def {fn}(" in f.read()


# Computed once at import (without importing Triton or the extension), so that resolve_backend stays a
# pure table lookup that Dynamo can trace.
_AVAILABLE = {key: _launcher_defined(target) for key, target in _LAUNCHERS.items()}


def has_launcher(op: str, backend: str) -> bool:
    """Whether ``backend`` implements public op ``op`` (its launcher module exists and defines it)."""
    return all(_AVAILABLE.get((part, backend), False) for part in _OP_PARTS.get(op, (op,)))


def _launcher(op: str, backend: str):
    target = _LAUNCHERS.get((op, backend))
    if target is None:
        raise NotImplementedError(f"lora_kernels.{op} has no {backend!r} kernel")
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


# ----------------------------------------------------------------------------------------------
# Implementations (one Python function per op, registered for CPU and CUDA)
# ----------------------------------------------------------------------------------------------


def _lora_linear_fwd(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, backend):
    if backend == "torch":
        return ref.lora_linear_fwd_ref(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed)
    return _launcher("lora_linear_fwd", backend)(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed)


def _empty_like_grads(dy, x, weight, lora_a, lora_b, output_mask, grads):
    templates = (x if x is not None else dy, lora_a, lora_b, weight)
    return tuple(
        g if (want and g is not None) else templates[i].new_empty(0) for i, (want, g) in enumerate(zip(output_mask, grads))
    )


def _lora_linear_bwd(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask, backend):
    if backend == "torch":
        grads = ref.lora_linear_bwd_ref(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask)
    else:
        grads = _launcher("lora_linear_bwd", backend)(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask)
    return _empty_like_grads(dy, x, weight, lora_a, lora_b, output_mask, grads)


def _add_lora_(y, x, lora_a, lora_b, adapter_ids, scales, ranks, backend):
    if x.shape[0] == 0:
        return
    if backend == "torch":
        ref.add_lora_ref(y, x, lora_a, lora_b, adapter_ids, scales, ranks)
    else:
        _launcher("add_lora", backend)(y, x, lora_a, lora_b, adapter_ids, scales, ranks)


def _add_lora_meta_(y, x, lora_a, lora_b, adapter_ids, scales, ranks, sorted_token_ids, tiles, block_m, backend):
    if x.shape[0] == 0:
        return
    if backend == "torch":
        ref.add_lora_ref(y, x, lora_a, lora_b, adapter_ids, scales, ranks)
    else:
        from ..serving import LoRABatchMeta

        meta = LoRABatchMeta.from_buffers(sorted_token_ids, tiles, block_m)
        _launcher("add_lora", backend)(y, x, lora_a, lora_b, adapter_ids, scales, ranks, meta=meta)


def _merge_(weight, lora_a, lora_b, scales, backend):
    if backend == "torch":
        ref.merge_ref(weight, lora_a, lora_b, scales)
    else:
        _launcher("merge", backend)(weight, lora_a, lora_b, scales)


for _name, _fn in (
    ("lora_linear_fwd", _lora_linear_fwd),
    ("lora_linear_bwd", _lora_linear_bwd),
    ("add_lora_", _add_lora_),
    ("add_lora_meta_", _add_lora_meta_),
    ("merge_", _merge_),
):
    for _key in ("CPU", "CUDA"):
        lib.impl(_name, _fn, _key)

# ----------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and devices only
# ----------------------------------------------------------------------------------------------


@torch.library.register_fake("lora_kernels::lora_linear_fwd", lib=lib)
def _lora_linear_fwd_fake(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, backend):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    xa = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=ref.compute_dtype(x.dtype))
    return y, xa


@torch.library.register_fake("lora_kernels::lora_linear_bwd", lib=lib)
def _lora_linear_bwd_fake(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask, backend):
    shapes = (
        (dy.shape[0], weight.shape[1]),
        tuple(lora_a.shape),
        tuple(lora_b.shape),
        tuple(weight.shape),
    )
    dtypes = (dy.dtype, lora_a.dtype, lora_b.dtype, weight.dtype)
    return tuple(
        dy.new_empty(shape if want else (0,), dtype=dt) for want, shape, dt in zip(output_mask, shapes, dtypes)
    )


@torch.library.register_fake("lora_kernels::add_lora_", lib=lib)
def _add_lora_fake(y, x, lora_a, lora_b, adapter_ids, scales, ranks, backend):
    return None


@torch.library.register_fake("lora_kernels::add_lora_meta_", lib=lib)
def _add_lora_meta_fake(y, x, lora_a, lora_b, adapter_ids, scales, ranks, sorted_token_ids, tiles, block_m, backend):
    return None


@torch.library.register_fake("lora_kernels::merge_", lib=lib)
def _merge_fake(weight, lora_a, lora_b, scales, backend):
    return None


@torch.library.register_fake("lora_kernels::cuda_multi_lora_shrink", lib=lib)
def _cuda_multi_lora_shrink_fake(x, lora_a, adapter_ids, ranks, sorted_token_ids=None, tiles=None, block_m=0):
    return x.new_empty((x.shape[0], lora_a.shape[1]), dtype=torch.float32)


@torch.library.register_fake("lora_kernels::cuda_multi_lora_expand_", lib=lib)
def _cuda_multi_lora_expand_fake(y, xa, lora_b, adapter_ids, scales, ranks, col_offset, sorted_token_ids=None, tiles=None,
                                 block_m=0):
    return None


@torch.library.register_fake("lora_kernels::cuda_lora_linear_fwd", lib=lib)
def _cuda_lora_linear_fwd_fake(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    xa = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32)
    return y, xa


@torch.library.register_fake("lora_kernels::cuda_lora_linear_bwd", lib=lib)
def _cuda_lora_linear_bwd_fake(dy, x, xa, weight, lora_a, lora_b, scale, dropout_p, seed, output_mask):
    shapes = ((dy.shape[0], weight.shape[1]), tuple(lora_a.shape), tuple(lora_b.shape), tuple(weight.shape))
    dtypes = (dy.dtype, lora_a.dtype, lora_b.dtype, weight.dtype)
    return tuple(
        dy.new_empty(shape if want else (0,), dtype=dt) for want, shape, dt in zip(output_mask, shapes, dtypes)
    )


@torch.library.register_fake("lora_kernels::cuda_lora_dropout", lib=lib)
def _cuda_lora_dropout_fake(x, dropout_p, seed):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.register_fake("lora_kernels::cuda_merge_", lib=lib)
def _cuda_merge_fake(weight, lora_a, lora_b, rank_starts, scales):
    return None


@torch.library.register_fake("lora_kernels::cuda_merge_exact_", lib=lib)
def _cuda_merge_exact_fake(weight, lora_a, lora_b, rank_starts, scales, counters, repair_index, repair_bits,
                           overflow_tiles, tile_ids):
    return None
