"""The LoRA embedding op family: A gathered by token id, B expanded, added into the gathered base rows.

* ``lora_embedding_fwd`` / ``lora_embedding_bwd``: the training layer (``LoRAEmbedding``, PEFT's ``lora.Embedding``
  layout: W [V, D], A [r, V], B [D, r]); forward ``y[m] = W[ids[m]] + s·A[:, ids[m]]ᵀ·Bᵀ`` with the gather fused
  into the shrink (no [M, V] one-hot, no x·Aᵀ GEMM: xa is a column gather of A); backward dA is a scatter-add of
  ``s·dy·B`` over the ids (tokens equal to ``padding_idx`` contribute nothing), dB = ``s·dyᵀ·A[:, ids]ᵀ``.
* ``add_lora_embedding_``: serving, many adapters in one batch (per-token adapter ids, -1 = none) in place on
  the gathered embedding rows.

Semantics: :func:`lora_kernels.reference.lora_embedding_ref` / :func:`lora_kernels.reference.add_lora_embedding_ref`.
Launchers: ``torch/embedding.py``, ``triton/embedding.py``.
"""

from __future__ import annotations

import torch

from .._checks import (
    INDEX_DTYPES,
    check_float,
    check_same_device,
    check_scale,
    data_checks_enabled,
    fail,
    has_internal_overlap,
    memory_overlaps,
    shape_str,
)
from ._registry import add_rows, define, impl_all_devices, launcher, lib, mark_written

OP = "lora_embedding"
SERVE = "add_lora_embedding"

__all__ = ["check_lora_embedding", "check_add_lora_embedding", "check_token_ids"]

define([
    # y [M, D] (weight.dtype) = W[ids] + scale · A[:, ids]ᵀ·Bᵀ; ids [M] int32/int64 in [0, V) (an id outside gives a
    # zero row on the kernel backends; the API checks the range first). A, B in weight's dtype.
    "lora_embedding_fwd(Tensor ids, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, str backend) -> Tensor",
    # (dA [r, V], dB [D, r]) in the adapters' dtype; padding_idx -1 = none; scale_grad_by_freq divides each column of
    # dA by its id's count in the batch (nn.Embedding's option); a gradient not in output_mask is an empty tensor
    "lora_embedding_bwd(Tensor dy, Tensor ids, Tensor lora_a, Tensor lora_b, float scale, int padding_idx, "
    "bool scale_grad_by_freq, bool[] output_mask, str backend) -> (Tensor, Tensor)",
    # y[t] += scales[i] · lora_a[i, :rank_i, token_ids[t]]·lora_b[i, :, :rank_i]ᵀ for i = adapter_ids[t] >= 0, in place
    # (fp32 accumulation with y's old value, one rounding); rows with id -1 untouched
    "add_lora_embedding_(Tensor(a!) y, Tensor token_ids, Tensor lora_a, Tensor lora_b, Tensor adapter_ids, "
    "Tensor scales, Tensor? ranks, str backend) -> ()",
])

add_rows(
    {
        ("lora_embedding_fwd", "torch"): "lora_kernels.torch.embedding:lora_embedding_fwd_torch",
        ("lora_embedding_bwd", "torch"): "lora_kernels.torch.embedding:lora_embedding_bwd_torch",
        ("lora_embedding_fwd", "triton"): "lora_kernels.triton.embedding:lora_embedding_fwd_triton",
        ("lora_embedding_bwd", "triton"): "lora_kernels.triton.embedding:lora_embedding_bwd_triton",
        ("add_lora_embedding", "torch"): "lora_kernels.torch.embedding:add_lora_embedding_torch",
        ("add_lora_embedding", "triton"): "lora_kernels.triton.embedding:add_lora_embedding_triton",
    },
    public={OP: ("lora_embedding_fwd", "lora_embedding_bwd"), SERVE: ("add_lora_embedding",)},
)


def check_token_ids(op: str, name: str, ids, V: int, device=None) -> None:
    """ids: an int32/int64 tensor whose values are in [0, V) (the value check is one device->host read, skipped
    while compiling / capturing, as every data check)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in INDEX_DTYPES:
        fail(op, f"{name} must be an int32 or int64 tensor, got "
                 f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.numel() and data_checks_enabled(ids):
        lo, hi = torch.stack([ids.min().to(torch.int64), ids.max().to(torch.int64)]).tolist()
        if lo < 0 or hi >= V:
            fail(op, f"{name} out of range: token ids must be in [0, V={V}) (the embedding has {V} rows), got min {lo}, "
                     f"max {hi}")


def check_lora_embedding(ids, weight, lora_a, lora_b, scale) -> float:
    """Validate lora_embedding inputs (ids any shape); returns the scale as a finite float."""
    for n, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check_float(OP, n, t)
    if weight.dim() != 2:
        fail(OP, f"weight must be 2-D [V, D] (nn.Embedding layout), got shape {shape_str(weight)}")
    V, D = weight.shape
    if lora_a.dim() != 2 or lora_a.shape[1] != V:
        fail(OP, f"lora_a must be [r, V={V}] (PEFT's lora_embedding_A), got shape {shape_str(lora_a)}")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or lora_b.shape[0] != D:
        fail(OP, f"lora_b must be [D={D}, r] (PEFT's lora_embedding_B), got shape {shape_str(lora_b)}")
    if lora_b.shape[1] != r:
        fail(OP, f"rank mismatch: lora_a has r={r} rows but lora_b has {lora_b.shape[1]} columns")
    if r < 1:
        fail(OP, "rank must be at least 1")
    if lora_a.dtype != lora_b.dtype:
        fail(OP, f"lora_a dtype {lora_a.dtype} and lora_b dtype {lora_b.dtype} must match")
    scale = check_scale(OP, scale)
    check_same_device(OP, ids=ids if isinstance(ids, torch.Tensor) else None, weight=weight, lora_a=lora_a,
                      lora_b=lora_b)
    check_token_ids(OP, "ids", ids, V)
    return scale


def check_add_lora_embedding(y, token_ids, lora_a, lora_b, adapter_ids, scales, ranks) -> None:
    """Validate add_lora_embedding_ inputs (see reference.add_lora_embedding_ref)."""
    from .shrink_expand import _check_ids_and_ranks, _check_no_grad, _check_values

    op = SERVE
    check_float(op, "y", y)
    check_float(op, "lora_a", lora_a)
    check_float(op, "lora_b", lora_b)
    _check_no_grad(op, y=y, lora_a=lora_a, lora_b=lora_b, scales=scales)
    if y.dim() != 2:
        fail(op, f"y must be 2-D [M, D] (the gathered embedding rows), got shape {shape_str(y)}")
    M, D = y.shape
    if lora_b.dim() != 3 or lora_b.shape[1] != D:
        fail(op, f"lora_b must be [L, D={D}, r_max] (D from y {shape_str(y)}), got shape {shape_str(lora_b)}")
    L, _, r_max = lora_b.shape
    if lora_a.dim() != 3 or lora_a.shape[0] != L or lora_a.shape[1] != r_max:
        fail(op, f"lora_a must be [L={L}, r_max={r_max}, V] (stacked lora_embedding_A; a [L, V, r] tensor is "
                 f"passed as .transpose(1, 2)), got shape {shape_str(lora_a)}")
    V = lora_a.shape[2]
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1 or token_ids.shape[0] != M:
        fail(op, f"token_ids must be [M={M}], got "
                 f"{shape_str(token_ids) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__}")
    check_token_ids(op, "token_ids", token_ids, V)
    _check_ids_and_ranks(op, adapter_ids, M, ranks, L)
    if not isinstance(scales, torch.Tensor) or scales.dim() != 1 or scales.shape[0] != L:
        fail(op, f"scales must be a 1-D tensor [L={L}], got "
                 f"{shape_str(scales) if isinstance(scales, torch.Tensor) else type(scales).__name__}")
    check_float(op, "scales", scales)
    tensors = dict(y=y, token_ids=token_ids, lora_a=lora_a, lora_b=lora_b, adapter_ids=adapter_ids, scales=scales,
                   ranks=ranks)
    check_same_device(op, **tensors)
    if has_internal_overlap(y):
        fail(op, f"y (shape {shape_str(y)}, strides {list(y.stride())}) has elements that share memory; it is updated "
                 "in place, so every element must be stored once (pass a contiguous y)")
    for name, t in tensors.items():
        if name != "y" and t is not None and memory_overlaps(y, t):
            fail(op, f"y overlaps {name} in memory (y is updated in place while {name} is read); pass separate tensors")
    _check_values(op, y, adapter_ids, ranks, L, r_max, scales)


# ----------------------------------------------------------------------------------------------
# Implementations: route to the chosen backend's launcher
# ----------------------------------------------------------------------------------------------


def _fwd(ids, weight, lora_a, lora_b, scale, backend):
    if ids.shape[0] == 0 or weight.shape[1] == 0:
        return weight.new_empty((ids.shape[0], weight.shape[1]))
    return launcher("lora_embedding_fwd", backend)(ids, weight, lora_a, lora_b, scale)


def _bwd(dy, ids, lora_a, lora_b, scale, padding_idx, scale_grad_by_freq, output_mask, backend):
    need_da, need_db = bool(output_mask[0]), bool(output_mask[1])
    if ids.shape[0] == 0 or dy.shape[1] == 0:
        da = torch.zeros_like(lora_a) if need_da else lora_a.new_empty(0)
        db = torch.zeros_like(lora_b) if need_db else lora_b.new_empty(0)
        return da, db
    da, db = launcher("lora_embedding_bwd", backend)(dy, ids, lora_a, lora_b, scale, padding_idx, scale_grad_by_freq,
                                                     need_da, need_db)
    return (da if need_da else lora_a.new_empty(0)), (db if need_db else lora_b.new_empty(0))


def _serve(y, token_ids, lora_a, lora_b, adapter_ids, scales, ranks, backend):
    if y.shape[0] == 0 or y.shape[1] == 0 or lora_b.shape[2] == 0:
        return
    launcher("add_lora_embedding", backend)(y, token_ids, lora_a, lora_b, adapter_ids, scales, ranks)
    mark_written(y)


impl_all_devices("lora_embedding_fwd", _fwd)
impl_all_devices("lora_embedding_bwd", _bwd)
impl_all_devices("add_lora_embedding_", _serve)


@torch.library.register_fake("lora_kernels::lora_embedding_fwd", lib=lib)
def _fwd_fake(ids, weight, lora_a, lora_b, scale, backend):
    return weight.new_empty((ids.shape[0], weight.shape[1]))


@torch.library.register_fake("lora_kernels::lora_embedding_bwd", lib=lib)
def _bwd_fake(dy, ids, lora_a, lora_b, scale, padding_idx, scale_grad_by_freq, output_mask, backend):
    return (lora_a.new_empty(tuple(lora_a.shape) if output_mask[0] else (0,)),
            lora_b.new_empty(tuple(lora_b.shape) if output_mask[1] else (0,)))


@torch.library.register_fake("lora_kernels::add_lora_embedding_", lib=lib)
def _serve_fake(y, token_ids, lora_a, lora_b, adapter_ids, scales, ranks, backend):
    return None

