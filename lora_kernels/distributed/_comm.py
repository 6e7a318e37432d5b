"""The collectives the sharded LoRA paths call, and a dispatch mode that measures what every collective moves.

Every collective in ``lora_kernels.distributed`` goes through the three helpers below (r-wide activations only:
the shrink output ``xa`` [M, r] or its gradient), so what the LoRA branch adds to a tensor-parallel layer is
visible in one place. :class:`CollectiveBytes` counts *all* collectives issued while it is active — ours, the ones
DTensor issues to redistribute the base layer's inputs and outputs, FSDP2's — with the bytes of the logical tensor
each one gathers or reduces (``payload_bytes``: the gathered result of an all-gather, the reduced input of a
reduce-scatter or all-reduce). A ring implementation sends about ``(p-1)/p`` of that per rank for an all-gather or
reduce-scatter and ``2(p-1)/p`` for an all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as _fc
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["all_gather_cols", "reduce_scatter_cols", "all_reduce", "CollectiveBytes", "CollectiveCall"]

# Functional collectives (torch.distributed._functional_collectives): the same c10d collectives, but traceable by
# torch.compile; in eager they return a tensor that waits for the collective on first use.
_fc_all_gather = getattr(_fc, "all_gather_single", None) or _fc.all_gather_tensor
_fc_reduce_scatter = getattr(_fc, "reduce_scatter_single", None) or _fc.reduce_scatter_tensor


def _wait(t: torch.Tensor) -> torch.Tensor:
    return _fc.wait_tensor(t)


def all_gather_cols(t: torch.Tensor, group) -> torch.Tensor:
    """[M, c] on each of the p ranks -> [M, p·c], rank i's block in columns [i·c, (i+1)·c)."""
    p = dist.get_world_size(group)
    if p == 1:
        return t
    M, c = t.shape
    out = _wait(_fc_all_gather(t.contiguous(), 0, group))  # [p·M, c]
    return out.view(p, M, c).permute(1, 0, 2).reshape(M, p * c)


def reduce_scatter_cols(t: torch.Tensor, group) -> torch.Tensor:
    """[M, p·c] partial sums on each rank -> this rank's column block [M, c] of the sum over ranks."""
    p = dist.get_world_size(group)
    if p == 1:
        return t
    M, pc = t.shape
    c = pc // p
    inp = t.reshape(M, p, c).permute(1, 0, 2).reshape(p * M, c)  # rows [i·M, (i+1)·M) go to rank i
    return _wait(_fc_reduce_scatter(inp, "sum", 0, group))


def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks; returns the sum (a new tensor: functional collectives do not write their input)."""
    if dist.get_world_size(group) > 1:
        t = _wait(_fc.all_reduce(t, "sum", group))
    return t


# ----------------------------------------------------------------------------------------------
# Measuring collectives
# ----------------------------------------------------------------------------------------------

_GATHER = {"_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_", "all_gather_into_tensor",
           "all_gather_into_tensor_coalesced", "allgather_coalesced_"}
_REDUCE_SCATTER = {"_reduce_scatter_base_", "reduce_scatter_", "reduce_scatter_tensor_coalesced_",
                   "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"}
_ALL_REDUCE = {"allreduce_", "allreduce_coalesced_", "all_reduce", "all_reduce_coalesced"}
_OTHER = {"broadcast_", "broadcast", "alltoall_", "alltoall_base_", "all_to_all_single", "gather_", "scatter_",
          "reduce_"}
_NAMESPACES = {"c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"}


@dataclass
class CollectiveCall:
    kind: str  # "all_gather" | "reduce_scatter" | "all_reduce" | "other"
    op: str  # the dispatcher op, e.g. "c10d._allgather_base_"
    payload_bytes: int  # bytes of the full tensor gathered / reduced (see the module docstring)
    shape: tuple  # shape of that tensor
    dtype: torch.dtype


def _tensors(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


class CollectiveBytes(TorchDispatchMode):
    """Records every collective issued while active (``calls``), with its payload in bytes.

    Example::

        with CollectiveBytes() as comm:
            loss = model(x).sum(); loss.backward()
        print(comm.summary())       # one line per collective
        comm.total()                # bytes over all collectives

    Works with DTensor (it lets DTensor desugar an op first, like torch's ``CommDebugMode``) and with plain
    ``torch.distributed`` calls.
    """

    def __init__(self):
        super().__init__()
        self.calls: List[CollectiveCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(getattr(t, "__name__", "") == "DTensor" for t in types):
            return NotImplemented  # let DTensor run; the collectives it issues come back here
        out = func(*args, **kwargs)
        ns = getattr(func, "namespace", "")
        name = func._overloadpacket.__name__ if hasattr(func, "_overloadpacket") else str(func)
        if ns in _NAMESPACES and (name in _GATHER or name in _REDUCE_SCATTER or name in _ALL_REDUCE or name in _OTHER):
            ins = [t for a in args for t in _tensors(a)]
            outs = _tensors(out)
            biggest = max(ins + outs, key=lambda t: t.numel() * t.element_size()) if (ins or outs) else None
            if name in _GATHER:
                kind = "all_gather"
            elif name in _REDUCE_SCATTER:
                kind = "reduce_scatter"
            elif name in _ALL_REDUCE:
                kind = "all_reduce"
            else:
                kind = "other"
            if biggest is not None:
                self.calls.append(CollectiveCall(kind, f"{ns}.{name}", biggest.numel() * biggest.element_size(),
                                                 tuple(biggest.shape), biggest.dtype))
        return out

    def total(self, kind: Optional[str] = None) -> int:
        return sum(c.payload_bytes for c in self.calls if kind is None or c.kind == kind)

    def summary(self) -> str:
        return "\n".join(f"{c.kind:15s} {c.payload_bytes:>12d} B  {list(c.shape)} {str(c.dtype).replace('torch.', '')}"
                         f"  ({c.op})" for c in self.calls)
