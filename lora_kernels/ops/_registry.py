"""The operator library and the one dispatch table.

* ``lib``: the ``torch.library.Library("lora_kernels", "DEF")`` every op family (``ops/<family>.py``) defines its
  schemas, implementations and fakes on.
* ``TABLE``: ``(op, backend) -> "module:function"`` of the launcher, filled by each family's ``LAUNCHERS`` rows
  when ``lora_kernels.ops`` is imported. ``lora_kernels._backend`` reads it to decide what a backend implements;
  launchers are imported lazily on first call (Triton and the CUDA extension load only when used).
* ``PUBLIC_OPS``: public op name -> the launchers it needs (``lora_linear`` = forward + backward; the exact merge
  needs the plain merge too, which its unmerge replays). ``resolve_backend`` takes these names.

This module imports nothing from lora_kernels: it sits at the bottom of the import graph.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Iterable, Mapping, Tuple

import torch

lib = torch.library.Library("lora_kernels", "DEF")

SCHEMAS: Dict[str, str] = {}  # op name -> schema, every op defined on lib
TABLE: Dict[Tuple[str, str], str] = {}
PUBLIC_OPS: Dict[str, Tuple[str, ...]] = {}
_resolved: Dict[Tuple[str, str], Callable] = {}


def define(schemas: Iterable[str]) -> None:
    for schema in schemas:
        lib.define(schema)
        SCHEMAS[schema.split("(", 1)[0]] = schema


def impl_all_devices(name: str, fn: Callable) -> None:
    """Register ``fn`` as the CPU and CUDA implementation of op ``name`` (it routes by its ``backend`` argument)."""
    for key in ("CPU", "CUDA"):
        lib.impl(name, fn, key)


def mark_written(*tensors: torch.Tensor) -> None:
    """Bump the version counter of tensors a launcher wrote in place. Kernels write through raw pointers, which
    autograd does not see; without this, autograd's saved-tensor checks and ``MergeRecord``'s "modified since
    the merge" check would miss the write. Every op that mutates an argument calls it once per call."""
    for t in tensors:
        torch.autograd.graph.increment_version(t)


def add_rows(rows: Mapping[Tuple[str, str], str], public: Mapping[str, Tuple[str, ...]]) -> None:
    """Add a family's launcher rows and its public op names (each with the launchers it needs)."""
    for key, target in rows.items():
        if key in TABLE:
            raise RuntimeError(f"lora_kernels: two launchers registered for {key}")
        TABLE[key] = target
    for name, needed in public.items():
        if name in PUBLIC_OPS:
            raise RuntimeError(f"lora_kernels: public op {name!r} registered twice")
        PUBLIC_OPS[name] = tuple(needed)


def implements(op: str, backend: str) -> bool:
    """Whether ``backend`` has a launcher for every part of public op ``op`` (False for an unknown op)."""
    return op in PUBLIC_OPS and all((p, backend) in TABLE for p in PUBLIC_OPS[op])


def implemented_ops(backend: str) -> list:
    """Public op names ``backend`` implements, from the table."""
    return sorted(n for n in PUBLIC_OPS if implements(n, backend))


def launcher(op: str, backend: str) -> Callable:
    """The launcher of ``op`` on ``backend`` (imported on first use)."""
    key = (op, backend)
    fn = _resolved.get(key)
    if fn is None:
        target = TABLE.get(key)
        if target is None:
            raise NotImplementedError(f"lora_kernels.{op} has no {backend!r} launcher")
        mod, name = target.split(":")
        fn = _resolved[key] = getattr(importlib.import_module(mod), name)
    return fn
