"""``add_lora`` on the torch backend (semantics: :func:`lora_kernels.reference.add_lora_ref`)."""

from __future__ import annotations

from .. import reference as ref


def add_lora_torch(y, x, lora_a, lora_b, adapter_ids, scales, ranks, groups=None) -> None:
    """In place on y; ``groups`` (a LoRABatchMeta's buffers) only accelerates the kernel backends and is unused here."""
    ref.add_lora_ref(y, x, lora_a, lora_b, adapter_ids, scales, ranks)
