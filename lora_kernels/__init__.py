"""lora_kernels: fused LoRA kernels (Triton and CUDA C++) for PyTorch, with a pure-PyTorch reference.

Public API:
    lora_linear, LoRALinearFunction, LoRALinear, inject_lora, mark_only_lora_as_trainable, lora_state_dict,
    add_lora, merge_, unmerge_, merge_exact_, unmerge_exact_, resolve_backend, load_extension.
"""

from ._backend import BackendUnavailableError, backend_report, resolve_backend
from ._checks import LoRAInputError
from ._ext import load as load_extension
from . import functional as _functional
from .functional import *  # noqa: F401,F403  (the functional API: every name in functional.__all__)
from .exact_merge import MergeOverflowError, MergeRecord, merge_exact_, unmerge_exact_
from .modules import LoRALinear, inject_lora, lora_state_dict, mark_only_lora_as_trainable
from .embedding import LoRAEmbedding
from .conv import LoRAConv2d
from .named_adapters import (add_adapter, add_weighted_adapter, delete_adapter, disable_adapters, enable_adapters,
                             set_adapter)
from .unload import merge_and_unload, unload
from .reference import lora_scale

__version__ = "0.1.0"

__all__ = [
    *_functional.__all__,
    "LoRALinear",
    "LoRAEmbedding",
    "LoRAConv2d",
    "inject_lora",
    "mark_only_lora_as_trainable",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "add_weighted_adapter",
    "merge_and_unload",
    "unload",
    "lora_state_dict",
    "merge_exact_",
    "unmerge_exact_",
    "MergeRecord",
    "MergeOverflowError",
    "lora_scale",
    "resolve_backend",
    "backend_report",
    "load_extension",
    "BackendUnavailableError",
    "LoRAInputError",
    "__version__",
]
