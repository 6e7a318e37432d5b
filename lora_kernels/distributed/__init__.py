"""Scale-out on torch.distributed: tensor-parallel LoRA (training and serving), sharded merges, DTensor rules.

* :class:`ColwiseLoRA` / :class:`RowwiseLoRA` — ``ParallelStyle``s for torch's ``parallelize_module`` plans that
  shard a :class:`lora_kernels.LoRALinear` (or a PEFT ``lora.Linear``): W0, bias, lora_A and lora_B, with only an
  r-wide collective added by the adapter (``styles.py``).
* DTensor rules for the lora_kernels ops (``_rules.py``): DTensor inputs run sharded with the scheme their
  placements define, or fail with a :class:`lora_kernels.LoRAInputError` that names the fix.
* :func:`merge_exact_sharded_` / :func:`unmerge_exact_sharded_` — each rank merges its own block of a TP- or
  FSDP2-sharded weight, bit-exactly reversible (``merge.py``); ``LoRALinear.merge()`` / ``unmerge()`` and
  ``lora_kernels.merge_exact_`` use them for DTensor weights.
* :class:`ShardedAdapterSlots` — serving: adapter slots sharded over a TP group, one r-wide collective per layer
  (``serving.py``).
* :class:`CollectiveBytes` — a dispatch mode recording every collective and its payload (``_comm.py``).

Importing this module registers the DTensor rules (``import lora_kernels`` alone does not import
torch.distributed). Requires torch >= 2.5 (the public ``torch.distributed.tensor``).

This package uses the public API through ``import lora_kernels`` (not ``lora_kernels.modules`` /
``lora_kernels.exact_merge``), because ``lora_kernels.exact_merge`` imports it lazily for DTensor weights.
"""

from __future__ import annotations

import torch.distributed as _dist

if not _dist.is_available():  # pragma: no cover
    raise ImportError("lora_kernels.distributed needs a torch build with torch.distributed")
try:
    import torch.distributed.tensor  # noqa: F401
except ImportError as e:  # pragma: no cover
    raise ImportError(f"lora_kernels.distributed needs torch >= 2.5 (torch.distributed.tensor): {e}") from e

from . import _rules
from ._comm import CollectiveBytes, CollectiveCall
from .merge import ShardedMergeRecord, merge_exact_sharded_, unmerge_exact_sharded_
from .serving import ShardedAdapterSlots
from .styles import ColwiseLoRA, RowwiseLoRA

_rules.register()

__all__ = [
    "ColwiseLoRA",
    "RowwiseLoRA",
    "ShardedAdapterSlots",
    "ShardedMergeRecord",
    "merge_exact_sharded_",
    "unmerge_exact_sharded_",
    "CollectiveBytes",
    "CollectiveCall",
]
