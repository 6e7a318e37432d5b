"""CUDA-extension launcher of ``add_lora`` (kernels ``cuda_multi_lora_shrink`` / ``cuda_multi_lora_expand_``,
declared in ``ops/multi_lora.py``, implemented in ``csrc/multi_lora.cu`` + ``csrc/multi_lora_torch.cpp``)."""

from __future__ import annotations

import torch


# Tokens from which a batch with a LoRABatchMeta takes the grouped launch (tokens sorted by adapter, 8 of one
# adapter per block, so each adapter's weights are read once per 8 tokens) instead of one token per block.
# Untuned (see the README's status table).
GROUPED_MIN_TOKENS = 64


def add_lora_cuda(y, x, lora_a, lora_b, adapter_ids, scales, ranks, groups=None, *, magnitudes=None, bias=None):
    """add_lora_ on the CUDA extension: one shrink (fp32 xa) and one in-place expand per slice; grouped by
    adapter through ``groups`` = (sorted_token_ids, tiles, block_m) of a LoRABatchMeta of these ids, when it is
    given and the batch is long. DoRA (``magnitudes`` [L, N] fp32, ``bias`` [N]): the expand's epilogue rescales."""
    ops = torch.ops.lora_kernels
    scales32 = scales.to(torch.float32)
    grouped = (None, None, 0)
    if groups is not None and x.shape[0] >= GROUPED_MIN_TOKENS:
        grouped = tuple(groups)
    dora = () if magnitudes is None else (magnitudes, bias)
    col = 0
    for a, b in zip(lora_a, lora_b):
        xa = ops.cuda_multi_lora_shrink(x, a, adapter_ids, ranks, *grouped)
        ops.cuda_multi_lora_expand_(y, xa, b, adapter_ids, scales32, ranks, col, *grouped, *dora)
        col += b.shape[1]
