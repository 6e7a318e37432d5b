"""Exact merge / unmerge of sharded weights (tensor parallel, FSDP2, or both): each rank merges its own block.

A DTensor weight's local block covers global rows [r0, r0+n) and columns [c0, c0+k); its share of
``Δ = Σᵢ sᵢ·Bᵢ·Aᵢ`` needs only rows [r0, r0+n) of every B and columns [c0, c0+k) of every A, which each rank takes
from the gathered adapters (r·(N + K) elements per adapter, once per merge — never the N×K weight). The local
block is then merged with :func:`lora_kernels.merge_exact_`, whose record (repair list + adapter snapshot) restores
it bit for bit; the ranks agree on overflow (one 8-byte all-reduce) so that either every shard merges or none
does. ``lora_kernels.merge_exact_`` / ``unmerge_exact_`` (and so ``LoRALinear.merge()`` / ``unmerge()``) call
these for DTensor weights; the plain ``lora_kernels.merge_`` / ``unmerge_`` reach the same per-block merge
through the ``merge_`` op's DTensor rule.

FSDP2: merge when the model is resharded (the state between optimizer steps, where each parameter is a sharded
DTensor); the merged shards are what FSDP2 all-gathers in the next forward and what its state dict returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import lora_kernels as _lk  # the public API (not lora_kernels.exact_merge: exact_merge calls into this module)

from .._checks import LoRAInputError
from ._rules import adapter_block, full_tensor, local_box

__all__ = ["ShardedMergeRecord", "merge_exact_sharded_", "unmerge_exact_sharded_"]


@dataclass(eq=False)
class ShardedMergeRecord:
    """The record of one rank's block of a sharded exact merge (``local``) plus what identifies the block.

    ``lora_a`` / ``lora_b`` / ``scales`` are the full adapters as merged (plain tensors), so a plain unmerge of the
    whole weight (``lora_kernels.unmerge_(weight, record.lora_a, record.lora_b, record.scales)``) remains possible."""

    local: "_lk.MergeRecord"
    placements: Tuple
    mesh_shape: Tuple[int, ...]
    box: Tuple[int, int, int, int]  # (row0, rows, col0, cols) of the local block in the global weight
    global_shape: Tuple[int, ...]
    lora_a: List[torch.Tensor]
    lora_b: List[torch.Tensor]
    scales: Tuple[float, ...]

    @property
    def consumed(self) -> bool:
        return self.local.consumed

    @property
    def backend(self) -> str:
        return self.local.backend

    @property
    def n_repairs(self) -> int:
        return self.local.n_repairs

    def nbytes(self) -> int:
        return self.local.nbytes()

    def summary(self) -> str:
        r0, n, c0, k = self.box
        return (f"ShardedMergeRecord W{list(self.global_shape)} {self.placements} block rows [{r0}, {r0 + n}) cols "
                f"[{c0}, {c0 + k}): {self.local.summary()}")


def _as_list(t) -> list:
    return [t] if isinstance(t, torch.Tensor) else list(t)


def _mesh_sum(value: int, mesh) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64, device="cpu" if mesh.device_type == "cpu" else mesh.device_type)
    for d in range(mesh.ndim):
        g = mesh.get_group(d)
        if dist.get_world_size(g) > 1:
            dist.all_reduce(t, group=g)
    return int(t.item())


def merge_exact_sharded_(
    weight: torch.Tensor,
    lora_a,
    lora_b,
    scale: Union[float, Sequence[float]],
    *,
    backend: Optional[str] = None,
    snapshot: bool = True,
    on_overflow: str = "raise",
):
    """:func:`lora_kernels.merge_exact_` for a DTensor weight (or DTensor adapters): every rank merges its own block.

    Returns a :class:`ShardedMergeRecord` (a plain ``MergeRecord`` when only the adapters were DTensors). Collective:
    every rank of the weight's mesh must call it."""
    As, Bs = _as_list(lora_a), _as_list(lora_b)
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(As)
    if not isinstance(weight, DTensor):  # sharded adapters, plain weight: gather the (r-wide) adapters
        return _lk.merge_exact_(weight, [full_tensor(a) for a in As], [full_tensor(b) for b in Bs], scales, backend=backend,
                            snapshot=snapshot, on_overflow=on_overflow)
    if on_overflow not in ("raise", "keep"):
        raise LoRAInputError(f"lora_kernels.merge_exact_: on_overflow must be 'raise' or 'keep', got {on_overflow!r}")
    if weight.dim() != 2:
        raise LoRAInputError(f"lora_kernels.merge_exact_: weight must be 2-D [N, K], got shape {list(weight.shape)}")
    N, K = weight.shape
    if not As or not (len(As) == len(Bs) == len(scales)):
        raise LoRAInputError(f"lora_kernels.merge_exact_: need one scale per adapter and non-empty lists: got {len(As)} "
                             f"lora_a, {len(Bs)} lora_b, {len(scales)} scales")
    for i, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != 2 or a.shape[1] != K:
            raise LoRAInputError(f"lora_kernels.merge_exact_: lora_a[{i}] must be [r, K={K}], got shape {list(a.shape)}")
        if b.dim() != 2 or b.shape[0] != N or b.shape[1] != a.shape[0]:
            raise LoRAInputError(f"lora_kernels.merge_exact_: lora_b[{i}] must be [N={N}, r={a.shape[0]}], got shape "
                                 f"{list(b.shape)}")
    with torch.no_grad():
        box = local_box(weight)
        a_loc, b_loc = adapter_block(weight, As, Bs)
        wl = weight.to_local()
        rec = _lk.merge_exact_(wl, a_loc, b_loc, scales, backend=backend, snapshot=snapshot, on_overflow="keep")
        torch.autograd.graph.increment_version(weight)
        n_bad = _mesh_sum(rec.n_nonfinite, weight.device_mesh)
        if n_bad and on_overflow == "raise":
            _lk.unmerge_exact_(wl, rec)
            raise _lk.MergeOverflowError(
                f"lora_kernels.merge_exact_: the merged weight would have {n_bad} non-finite element(s) (over all shards) "
                f"where W was finite (overflow of {weight.dtype}); every shard was restored bit-for-bit. Pass "
                "on_overflow='keep' to merge anyway (the exact unmerge still restores W)."
            )
        full_a = [full_tensor(a).detach().clone() for a in As]
        full_b = [full_tensor(b).detach().clone() for b in Bs]
    return ShardedMergeRecord(local=rec, placements=tuple(weight.placements), mesh_shape=tuple(weight.device_mesh.shape),
                              box=box, global_shape=tuple(weight.shape), lora_a=full_a, lora_b=full_b,
                              scales=tuple(float(s) for s in rec.scales))


def unmerge_exact_sharded_(weight: torch.Tensor, record, *, backend: Optional[str] = None) -> torch.Tensor:
    """:func:`lora_kernels.unmerge_exact_` for a DTensor weight: each rank restores its block bit for bit."""
    if not isinstance(record, ShardedMergeRecord):
        raise LoRAInputError(
            "lora_kernels.unmerge_exact_: the weight is a DTensor but the record comes from an unsharded merge; unmerge "
            "where it was merged (the record describes one tensor), or use the plain unmerge_"
        )
    if not isinstance(weight, DTensor):
        raise LoRAInputError("lora_kernels.unmerge_exact_: this record comes from a sharded merge; pass the same DTensor weight")
    if tuple(weight.placements) != record.placements or tuple(weight.shape) != record.global_shape:
        raise LoRAInputError(
            f"lora_kernels.unmerge_exact_: the weight is now {list(weight.shape)} with placements {tuple(weight.placements)}, "
            f"the record was made for {list(record.global_shape)} with {record.placements}; unmerge before resharding"
        )
    with torch.no_grad():
        _lk.unmerge_exact_(weight.to_local(), record.local, backend=backend)
        torch.autograd.graph.increment_version(weight)
    return weight
