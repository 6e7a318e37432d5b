"""Registered torch operators (``torch.ops.lora_kernels.*``); see ``_library.py``."""

from . import _library  # noqa: F401  (registers the schemas, fakes and backend routing)
