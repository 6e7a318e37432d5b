"""Registered torch operators (``torch.ops.lora_kernels.*``), one module per op family.

Each ``<family>.py`` holds the family's input validation, schemas, fake kernels, routing to the chosen backend
and its rows of the dispatch table (``_registry.TABLE``). Importing this package registers them all; it never
imports Triton or the CUDA extension (launchers load on first use).
"""

from . import lora_linear, merge, multi_lora, shrink_expand  # noqa: F401  (registers each family)
from . import quant_linear  # noqa: F401  (quantised-base LoRA linear: QLoRA)
from . import moe_lora  # noqa: F401  (LoRA on mixture-of-experts expert weights)
from . import dora  # noqa: F401  (DoRA: weight-decomposed LoRA linear)
from . import embedding  # noqa: F401  (LoRA on embedding tables: training and serving)
from ._registry import PUBLIC_OPS, SCHEMAS, TABLE, implemented_ops, implements, launcher  # noqa: F401
