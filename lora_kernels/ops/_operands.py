"""Host-side pieces shared by the merge launchers of every backend: operand packing and the exact merge's
repair-list protocol (no kernel code here)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def concat_adapters(
    weight: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scales: Sequence[float]
):
    """Stack n adapters along the rank for a one-pass weighted merge.

    Returns (A [R, K], B [N, R], rank_starts int32 [n+1], scales fp32 [n]) with R = Σ rᵢ, adapter i owning
    ranks [rank_starts[i], rank_starts[i+1]). One common dtype (fp32 if the adapters' dtypes differ; the
    cast is exact). A single adapter is passed through without a copy.
    """
    dts = {t.dtype for t in list(lora_a) + list(lora_b)}
    common = dts.pop() if len(dts) == 1 else torch.float32
    if len(lora_a) == 1:
        a, b = lora_a[0].to(common), lora_b[0].to(common)
    else:
        a = torch.cat([t.to(common) for t in lora_a], dim=0)
        b = torch.cat([t.to(common) for t in lora_b], dim=1)
    starts = [0]
    for t in lora_a:
        starts.append(starts[-1] + t.shape[0])
    rank_starts = small_tensor(starts, torch.int32, weight.device)
    scale_t = small_tensor([float(s) for s in scales], torch.float32, weight.device)
    return a, b, rank_starts, scale_t


def small_tensor(values: Sequence, dtype: torch.dtype, device, *, by_fill: Optional[bool] = None) -> torch.Tensor:
    """A few host scalars as a tensor on ``device``, safe inside CUDA-graph capture.

    Normally one host-to-device copy (``torch.tensor``). While the current stream is capturing, such a copy from
    pageable host memory is an error (or would replay from a freed host buffer), so each value is written by
    its own fill kernel instead, whose scalar the graph records. ``by_fill`` forces either path (tests).
    """
    device = torch.device(device)
    if by_fill is None:
        by_fill = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not by_fill:
        return torch.tensor(values, dtype=dtype, device=device)
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, v in enumerate(values):
        out[i].fill_(v)
    return out


# Raw-bits dtype of each weight dtype (the repair list stores W's original bits).
BITS_DTYPE = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def collect_repair_list(
    weight: torch.Tensor,
    n_tiles: int,
    run_pass: Callable,
    who: str,
    capacity: Optional[int] = None,
):
    """The exact merge's repair-list protocol, shared by its Triton and CUDA launchers.

    ``run_pass(counters, rec_idx, rec_bits, ovf_tiles, tile_ids)`` launches one exact-merge pass over every tile
    (``tile_ids`` None) or over the listed tiles only, with counters int32 [4] = (claimed, stored, overflowed
    tiles, new non-finite). Pass 1 stores up to ``capacity`` entries and lists the tiles whose entries did not fit
    (those tiles are left unwritten); after one host read of the counters, pass 2 reruns exactly those tiles into
    a list of the right size. Returns ``(index int32|int64 [n], bits int16|int32 [n], n_new_nonfinite)``.
    """
    dev = weight.device
    numel = weight.numel()
    idx_dtype = torch.int32 if numel < 2**31 else torch.int64
    bits_dtype = BITS_DTYPE[weight.dtype]
    if numel == 0:
        return torch.empty(0, dtype=idx_dtype, device=dev), torch.empty(0, dtype=bits_dtype, device=dev), 0
    capacity = capacity or max(4096, numel // 32)
    counters = torch.zeros(4, dtype=torch.int32, device=dev)
    rec_idx = torch.empty(capacity, dtype=idx_dtype, device=dev)
    rec_bits = torch.empty(capacity, dtype=bits_dtype, device=dev)
    ovf = torch.empty(n_tiles, dtype=torch.int32, device=dev)
    run_pass(counters, rec_idx, rec_bits, ovf, None)
    claimed, stored, n_ovf, n_nonfinite = (int(v) for v in counters.tolist())
    parts_idx, parts_bits = [rec_idx[:stored]], [rec_bits[:stored]]
    if n_ovf:
        need = claimed - stored
        counters2 = torch.zeros(4, dtype=torch.int32, device=dev)
        idx2 = torch.empty(max(need, 1), dtype=idx_dtype, device=dev)
        bits2 = torch.empty(max(need, 1), dtype=bits_dtype, device=dev)
        ovf2 = torch.empty(n_ovf, dtype=torch.int32, device=dev)
        run_pass(counters2, idx2, bits2, ovf2, ovf[:n_ovf].clone())
        c2 = [int(v) for v in counters2.tolist()]
        assert c2[2] == 0 and c2[1] == need, f"{who}: second pass stored {c2[1]} of {need} entries"
        n_nonfinite += c2[3]
        parts_idx.append(idx2[:need])
        parts_bits.append(bits2[:need])
    return torch.cat(parts_idx).clone(), torch.cat(parts_bits).clone(), n_nonfinite
