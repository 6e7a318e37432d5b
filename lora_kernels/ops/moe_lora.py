"""The mixture-of-experts LoRA op family: a grouped expert GEMM with the LoRA shrink / expand fused (training:
forward and backward), the serving update over per-token adapter ids and ``[L, E, ...]`` slots, the routing
metadata both group their work by, validation, schemas, fakes, routing to a backend and dispatch-table rows.

Semantics: :func:`lora_kernels.reference.moe_lora_linear_ref` (training) and
:func:`lora_kernels.reference.add_moe_lora_ref` (serving). Launchers: ``torch/moe_lora.py``, ``triton/moe_lora.py``.

:class:`MoERouting` lives here, beside the ops that read it: built from ``topk_ids`` on their device with no host
synchronisation and no data-dependent shape (fixed capacities), it sorts the (token, expert) pairs by expert
(and by (adapter, expert) for serving) and cuts each group into tiles of at most ``block_m`` pairs. The kernels
launch one program per tile slot of the fixed-capacity tile table; an expert with no tokens has no tile, so it
costs nothing, and unused slots exit at once. ``update_`` recomputes every buffer in place between CUDA-graph
replays.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._checks import (
    INDEX_DTYPES,
    LoRAInputError,
    check_float,
    check_same_device,
    check_scale,
    data_checks_enabled,
    fail,
    has_internal_overlap,
    memory_overlaps,
    shape_str,
)
from ._registry import add_rows, define, impl_all_devices, launcher, lib, mark_written

OP = "moe_lora_linear"
SERVE_OP = "add_moe_lora"

__all__ = ["MoERouting", "check_moe_lora_linear", "check_add_moe_lora", "DEFAULT_BLOCK_M", "pick_block_m"]

# Pairs per tile (the M tile of the grouped GEMMs) of a routing built without an explicit block_m.
DEFAULT_BLOCK_M = 64


def pick_block_m(num_pairs: int, num_experts: int) -> int:
    """Tile height for a batch of ``num_pairs`` pairs over ``num_experts`` experts (static sizes only): the power of
    two (16..64) nearest above the mean pairs per expert, so decode-sized batches do not pad every expert's tile
    to 64 rows. Not tuned on a GPU."""
    mean = num_pairs / max(num_experts, 1)
    bm = 16
    while bm < 64 and bm < mean:
        bm *= 2
    return bm


def _tile_capacity(pairs: int, groups: int, block_m: int) -> int:
    """Upper bound on Σ_g ceil(count_g / block_m) over groups with count_g > 0 and Σ count_g <= pairs."""
    active = min(groups, pairs)
    return min(pairs, (pairs + active * (block_m - 1)) // block_m)


def _check_int(who: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise LoRAInputError(f"{who}: {name} must be an int, got {v!r}")
    return v


def _check_topk_ids(who: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in INDEX_DTYPES or t.dim() != 2:
        got = f"{t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise LoRAInputError(f"{who}: topk_ids must be a 2-D int32 or int64 tensor [M, k], got {got}")
    if t.shape[1] < 1:
        raise LoRAInputError(f"{who}: topk_ids must have k >= 1 columns, got shape {list(t.shape)}")


def _build_groups(key: torch.Tensor, tiled_groups: int, block_m: int, sorted_out: torch.Tensor,
                  tiles_out: torch.Tensor) -> torch.Tensor:
    """Stable sort of the pairs by ``key`` (groups 0..tiled_groups-1 get tiles; larger keys sort last and get none)
    into ``sorted_out``, and the tile table (group, start, end) into ``tiles_out`` (unused slots: group -1).
    Device ops only. Returns the per-group counts [tiled_groups] (int64)."""
    dev = key.device
    G = tiled_groups
    counts = torch.zeros((G + 1,), dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key.clamp(max=G), torch.ones_like(key))
    ends = torch.cumsum(counts, 0)
    _, order = torch.sort(key, stable=True)
    sorted_out.copy_(order)
    T = tiles_out.shape[1]
    if T > 0 and G > 0:
        c = counts[:G]
        starts = ends[:G] - c
        tiles_per = (c + (block_m - 1)) // block_m
        tile_cum = torch.cumsum(tiles_per, 0)
        j = torch.arange(T, dtype=torch.int64, device=dev)
        owner = torch.searchsorted(tile_cum, j, right=True)  # first group whose cumulative tiles exceed j
        used = owner < G
        g = owner.clamp(max=G - 1)
        within = j - (tile_cum[g] - tiles_per[g])
        t_start = starts[g] + within * block_m
        t_end = torch.minimum(t_start + block_m, ends[g])
        tiles_out[0].copy_(torch.where(used, g, torch.full_like(g, -1)))
        tiles_out[1].copy_(torch.where(used, t_start, torch.zeros_like(g)))
        tiles_out[2].copy_(torch.where(used, t_end, torch.zeros_like(g)))
    elif T > 0:
        tiles_out.fill_(-1)
    return counts[:G]


class MoERouting:
    """The (token, expert) pairs of one batch grouped for the grouped kernels; built once per MoE layer call (or
    once per batch and step for serving, shared by every layer with the same routing) on ``topk_ids``' device,
    with no host synchronisation and no data-dependent shape.

    Pair p = t·k + j is token t's j-th expert ``topk_ids[t, j]``. Buffers (token capacity C = ``max_tokens``,
    P = C·k pair slots)::

        topk_ids         [C, k]    int32  the ids; rows past the current batch are padding
        expert_sorted    [P]       int32  pair indices stably sorted by expert; pairs whose id is outside [0, E)
                                          next (group E), padding last
        expert_tiles     [3, T]    int32  (expert, start, end) in sorted positions, at most ``block_m`` pairs each;
                                          group E (pairs without an expert) gets tiles too, which the kernels
                                          fill with zeros; unused slots have expert -1
        expert_counts    [E + 1]   int64  pairs per expert (+ pairs without one)
      with ``adapter_ids`` (serving, L = ``num_adapters``):
        adapter_ids      [C]       int32  one adapter per token, -1 = none (padding: -1)
        lora_sorted      [P]       int32  pairs stably sorted by (adapter, expert); pairs with no adapter or no
                                          expert last
        lora_tiles       [3, T']   int32  (adapter·E + expert, start, end) tiles; no tiles for pairs without
                                          adapter or expert

    ``block_m`` is fixed at construction (the tile tables depend on it). Metadata only accelerates the kernel
    backends: results never depend on whether it is given.
    """

    def __init__(
        self,
        topk_ids: torch.Tensor,
        num_experts: int,
        *,
        adapter_ids: Optional[torch.Tensor] = None,
        num_adapters: Optional[int] = None,
        max_tokens: Optional[int] = None,
        block_m: int = DEFAULT_BLOCK_M,
    ):
        who = "MoERouting"
        _check_topk_ids(who, topk_ids)
        M, k = topk_ids.shape
        num_experts = _check_int(who, "num_experts", num_experts)
        if num_experts < 1:
            raise LoRAInputError(f"{who}: num_experts must be >= 1, got {num_experts}")
        capacity = M if max_tokens is None else _check_int(who, "max_tokens", max_tokens)
        if capacity < M:
            raise LoRAInputError(f"{who}: max_tokens={capacity} is smaller than the batch ({M} tokens)")
        block_m = _check_int(who, "block_m", block_m)
        if block_m < 16 or block_m & (block_m - 1):
            raise LoRAInputError(f"{who}: block_m must be a power of two >= 16, got {block_m}")
        if (adapter_ids is None) != (num_adapters is None):
            raise LoRAInputError(f"{who}: pass adapter_ids and num_adapters together (serving), or neither")
        dev = topk_ids.device
        self.num_experts, self.top_k, self.capacity, self.block_m = num_experts, k, capacity, block_m
        self.num_tokens = M
        P = capacity * k
        i32 = dict(dtype=torch.int32, device=dev)
        self.topk_ids = torch.full((capacity, k), -1, **i32)
        self.expert_sorted = torch.zeros((P,), **i32)
        self.expert_tiles = torch.full((3, _tile_capacity(P, num_experts + 1, block_m)), -1, **i32)
        self.expert_counts = torch.zeros((num_experts + 1,), dtype=torch.int64, device=dev)
        self.num_adapters = None
        if adapter_ids is not None:
            num_adapters = _check_int(who, "num_adapters", num_adapters)
            if num_adapters < 0:
                raise LoRAInputError(f"{who}: num_adapters must be >= 0, got {num_adapters}")
            self.num_adapters = num_adapters
            self.adapter_ids = torch.full((capacity,), -1, **i32)
            self.lora_sorted = torch.zeros((P,), **i32)
            self.lora_tiles = torch.full((3, _tile_capacity(P, num_adapters * num_experts, block_m)), -1, **i32)
        self.update_(topk_ids, adapter_ids)

    @property
    def device(self) -> torch.device:
        return self.expert_sorted.device

    @property
    def num_pairs(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def expert_groups(self):
        """``(expert_sorted, expert_tiles, block_m)``: what the grouped GEMMs read."""
        return self.expert_sorted, self.expert_tiles, self.block_m

    @property
    def lora_groups(self):
        """``(lora_sorted, lora_tiles, block_m)``: what the serving update reads (needs ``adapter_ids``)."""
        if self.num_adapters is None:
            raise LoRAInputError("MoERouting: built without adapter_ids, so it has no (adapter, expert) groups")
        return self.lora_sorted, self.lora_tiles, self.block_m

    def update_(self, topk_ids: torch.Tensor, adapter_ids: Optional[torch.Tensor] = None) -> "MoERouting":
        """Recompute every buffer in place for a new batch (``topk_ids`` [M', k] with M' <= capacity; serving:
        ``adapter_ids`` [M'] too). Device ops only: safe between CUDA-graph replays or inside a capture."""
        who = "MoERouting.update_"
        _check_topk_ids(who, topk_ids)
        M, k = topk_ids.shape
        if k != self.top_k or M > self.capacity:
            raise LoRAInputError(f"{who}: topk_ids must be [M <= {self.capacity}, k={self.top_k}], got {list(topk_ids.shape)}")
        if topk_ids.device != self.device:
            raise LoRAInputError(f"{who}: topk_ids is on {topk_ids.device}, the routing on {self.device}")
        if (adapter_ids is None) != (self.num_adapters is None):
            raise LoRAInputError(f"{who}: adapter_ids must be given exactly when the routing was built with them")
        if adapter_ids is not None:
            if (not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in INDEX_DTYPES
                    or adapter_ids.dim() != 1 or adapter_ids.shape[0] != M):
                raise LoRAInputError(f"{who}: adapter_ids must be a 1-D int32/int64 tensor [M={M}], got "
                                     f"{shape_str(adapter_ids) if isinstance(adapter_ids, torch.Tensor) else type(adapter_ids).__name__}")
            if adapter_ids.device != self.device:
                raise LoRAInputError(f"{who}: adapter_ids is on {adapter_ids.device}, the routing on {self.device}")
        E, C, BM = self.num_experts, self.capacity, self.block_m
        dev = self.device
        self.num_tokens = M
        self.topk_ids[:M].copy_(topk_ids)
        if M < C:
            self.topk_ids[M:].fill_(-1)
        ex = self.topk_ids.reshape(-1).to(torch.int64)
        real = torch.arange(C * k, device=dev) < M * k
        valid = (ex >= 0) & (ex < E)
        # experts 0..E-1, then pairs without an expert (E: zero-filled by the kernels), then padding (E + 1)
        key = torch.where(valid, ex, torch.full_like(ex, E))
        key = torch.where(real, key, torch.full_like(ex, E + 1))
        self.expert_counts.copy_(_build_groups(key, E + 1, BM, self.expert_sorted, self.expert_tiles))
        if adapter_ids is not None:
            L = self.num_adapters
            self.adapter_ids[:M].copy_(adapter_ids)
            if M < C:
                self.adapter_ids[M:].fill_(-1)
            ad = self.adapter_ids.to(torch.int64).repeat_interleave(k)
            ok = valid & real & (ad >= 0) & (ad < L)
            G = L * E
            lkey = torch.where(ok, ad * E + ex, torch.full_like(ex, G))
            _build_groups(lkey, G, BM, self.lora_sorted, self.lora_tiles)
        return self

    def check(self, topk_ids: torch.Tensor, num_experts: int, op: str, adapter_ids=None, num_adapters=None) -> None:
        """Raise if this routing cannot describe ``topk_ids`` (shapes, experts, device; values in the op's one host
        read, see ``data_checks_enabled``)."""
        if not isinstance(self, MoERouting):  # pragma: no cover - defensive
            raise LoRAInputError(f"lora_kernels.{op}: routing must be a MoERouting")
        if self.num_experts != num_experts:
            fail(op, f"routing was built for E={self.num_experts} experts but the weights have E={num_experts}")
        if tuple(topk_ids.shape) != (self.num_tokens, self.top_k):
            fail(op, f"routing describes {self.num_tokens} tokens x k={self.top_k} (capacity {self.capacity}) but "
                     f"topk_ids has shape {shape_str(topk_ids)} (call routing.update_(topk_ids))")
        if topk_ids.device != self.device:
            fail(op, f"routing is on {self.device} but topk_ids is on {topk_ids.device}")
        if adapter_ids is not None:
            if self.num_adapters is None:
                fail(op, "routing was built without adapter_ids; build it with adapter_ids=..., num_adapters=L")
            if self.num_adapters != num_adapters:
                fail(op, f"routing was built for L={self.num_adapters} adapters but the weights have L={num_adapters}")

    def same_ids(self, topk_ids: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        """A 0-d int64 device tensor: 1 when the routing's ids equal these (for the callers' single host read)."""
        M = self.num_tokens
        same = (self.topk_ids[:M] == topk_ids.to(torch.int32)).all()
        if adapter_ids is not None:
            same = same & (self.adapter_ids[:M] == adapter_ids.to(torch.int32)).all()
        return same.to(torch.int64)

    def __repr__(self) -> str:
        extra = f", num_adapters={self.num_adapters}" if self.num_adapters is not None else ""
        return (f"MoERouting(num_tokens={self.num_tokens}, top_k={self.top_k}, num_experts={self.num_experts}{extra}, "
                f"capacity={self.capacity}, block_m={self.block_m}, device={self.device})")


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _check_topk(op, topk_ids, topk_weights, x_rows, what="x"):
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in INDEX_DTYPES or topk_ids.dim() != 2:
        fail(op, f"topk_ids must be a 2-D int32 or int64 tensor [M, k], got "
                 f"{(str(topk_ids.dtype) + ' ' + shape_str(topk_ids)) if isinstance(topk_ids, torch.Tensor) else type(topk_ids).__name__}")
    M, k = topk_ids.shape
    if k < 1:
        fail(op, f"topk_ids must have k >= 1 columns, got shape {shape_str(topk_ids)}")
    if x_rows not in (M, M * k):
        fail(op, f"{what} must have M={M} rows (one per token) or M·k={M * k} rows (one per (token, expert) pair), "
                 f"got {x_rows} (topk_ids {shape_str(topk_ids)})")
    if topk_weights is not None:
        check_float(op, "topk_weights", topk_weights)
        if tuple(topk_weights.shape) != (M, k):
            fail(op, f"topk_weights must be [M={M}, k={k}] like topk_ids, got shape {shape_str(topk_weights)}")
    return M, k


def check_moe_lora_linear(x, weight, lora_a, lora_b, scale, topk_ids, topk_weights=None, bias=None, combine=False,
                          routing=None) -> float:
    """Validate moe_lora_linear inputs (see reference.moe_lora_linear_ref); returns the scale as a float. Reads no
    device data (every topk id is legal: ids outside [0, E) mean "no expert"), except that a given ``routing`` is
    checked against ``topk_ids`` in one host read when data checks are on."""
    op = OP
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if x.dim() != 2:
        fail(op, f"x must be 2-D [M, K] or [M·k, K], got shape {shape_str(x)}")
    if weight.dim() != 3:
        fail(op, f"weight must be 3-D [E, N, K] (one nn.Linear-layout matrix per expert; a [E, K, N] storage is "
                 f"weight.transpose(1, 2)), got shape {shape_str(weight)}")
    E, N, K = weight.shape
    if x.shape[1] != K:
        fail(op, f"x has {x.shape[1]} features but weight is {shape_str(weight)} [E, N, K] (expects K={K})")
    if weight.dtype != x.dtype:
        fail(op, f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    if (lora_a is None) != (lora_b is None):
        fail(op, "lora_a and lora_b must be given together (or both None for the plain grouped GEMM)")
    if lora_a is not None:
        check_float(op, "lora_a", lora_a)
        check_float(op, "lora_b", lora_b)
        if lora_a.dim() != 3 or lora_a.shape[0] != E or lora_a.shape[2] != K:
            fail(op, f"lora_a must be [E={E}, r, K={K}] (expand a shared [r, K] A over the experts), got shape "
                     f"{shape_str(lora_a)}")
        r = lora_a.shape[1]
        if r < 1:
            fail(op, "rank must be at least 1")
        if lora_b.dim() != 3 or lora_b.shape[0] != E or lora_b.shape[1] != N:
            fail(op, f"lora_b must be [E={E}, N={N}, r], got shape {shape_str(lora_b)}")
        if lora_b.shape[2] != r:
            fail(op, f"rank mismatch: lora_a has r={r} but lora_b has {lora_b.shape[2]} rank columns")
        if lora_a.dtype != lora_b.dtype:
            fail(op, f"lora_a dtype {lora_a.dtype} and lora_b dtype {lora_b.dtype} must match")
    if bias is not None:
        check_float(op, "bias", bias)
        if tuple(bias.shape) != (E, N):
            fail(op, f"bias must be [E={E}, N={N}], got shape {shape_str(bias)}")
        if bias.dtype != x.dtype:
            fail(op, f"bias dtype {bias.dtype} must equal x dtype {x.dtype}")
    _check_topk(op, topk_ids, topk_weights, x.shape[0])
    if not isinstance(combine, bool):
        fail(op, f"combine must be a bool, got {type(combine).__name__}")
    scale = check_scale(op, scale)
    check_same_device(op, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias, topk_ids=topk_ids,
                      topk_weights=topk_weights)
    if routing is not None:
        routing.check(topk_ids, E, op)
        if data_checks_enabled(x) and not int(routing.same_ids(topk_ids)):
            fail(op, "routing was built from different topk_ids (call routing.update_(topk_ids))")
    return scale


def check_add_moe_lora(y, x, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], topk_ids, topk_weights,
                       adapter_ids, scales, ranks, routing=None) -> None:
    """Validate add_moe_lora inputs (see reference.add_moe_lora_ref). An inference op on every backend: with grad
    mode on, an input that requires grad is an error. Value checks (ids in [-1, L), ranks in [0, r_max], finite
    scales, the routing's ids) share one host read, skipped while compiling or capturing a CUDA graph."""
    op = SERVE_OP
    check_float(op, "y", y)
    check_float(op, "x", x)
    for name, t in (("adapter_ids", adapter_ids), ("scales", scales), ("ranks", ranks), ("topk_ids", topk_ids)):
        if t is not None and not isinstance(t, torch.Tensor):
            fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if len(lora_a) == 0 or len(lora_a) != len(lora_b):
        fail(op, f"lora_a and lora_b must be non-empty lists of equal length (one per slice), got {len(lora_a)} and "
                 f"{len(lora_b)}")
    if torch.is_grad_enabled():
        for name, t in (("y", y), ("x", x), ("scales", scales), ("topk_weights", topk_weights),
                        *((f"lora_a[{s}]", a) for s, a in enumerate(lora_a)),
                        *((f"lora_b[{s}]", b) for s, b in enumerate(lora_b))):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                fail(op, f"{name} requires grad, but add_moe_lora is an inference op (not differentiable on any "
                         "backend); call it under torch.no_grad() or torch.inference_mode(), or use moe_lora_linear "
                         "to train")
    if x.dim() != 2:
        fail(op, f"x must be 2-D [M, K] or [M·k, K], got shape {shape_str(x)}")
    M, k = _check_topk(op, topk_ids, topk_weights, x.shape[0])
    K = x.shape[1]
    a0 = lora_a[0]
    if not isinstance(a0, torch.Tensor) or a0.dim() != 4:
        fail(op, f"lora_a must be [L, E, r_max, K], got {shape_str(a0) if isinstance(a0, torch.Tensor) else type(a0).__name__}")
    L, E, r_max = a0.shape[0], a0.shape[1], a0.shape[2]
    widths = []
    for s, (a, b) in enumerate(zip(lora_a, lora_b)):
        check_float(op, f"lora_a[{s}]", a)
        check_float(op, f"lora_b[{s}]", b)
        if a.dim() != 4 or tuple(a.shape) != (L, E, r_max, K):
            fail(op, f"lora_a[{s}] must be [L={L}, E={E}, r_max={r_max}, K={K}], got shape {shape_str(a)}")
        if b.dim() != 4 or b.shape[0] != L or b.shape[1] != E or b.shape[3] != r_max:
            fail(op, f"lora_b[{s}] must be [L={L}, E={E}, N_s, r_max={r_max}], got shape {shape_str(b)} "
                     "(rank mismatch with lora_a?)")
        if a.dtype != a0.dtype or b.dtype != a0.dtype:
            fail(op, f"all lora_a/lora_b must share one dtype: lora_a[0] is {a0.dtype}, slice {s} has {a.dtype}/{b.dtype}")
        widths.append(b.shape[2])
    if y.dim() != 2 or y.shape[0] != M * k:
        fail(op, f"y must be 2-D [M·k={M * k}, N] (one row per (token, expert) pair), got shape {shape_str(y)}")
    if sum(widths) != y.shape[1]:
        fail(op, f"slice widths {widths} sum to {sum(widths)} but y has {y.shape[1]} columns")
    if x.dtype != y.dtype:
        fail(op, f"x dtype {x.dtype} must equal y dtype {y.dtype}")
    if adapter_ids is None or adapter_ids.dtype not in INDEX_DTYPES or adapter_ids.dim() != 1 or adapter_ids.shape[0] != M:
        fail(op, f"adapter_ids must be a 1-D int32/int64 tensor [M={M}] (one adapter per token, -1 = none), got "
                 f"{'None' if adapter_ids is None else str(adapter_ids.dtype) + ' ' + shape_str(adapter_ids)}")
    if scales is None or scales.dim() != 1 or scales.shape[0] != L:
        fail(op, f"scales must be a 1-D tensor [L={L}], got {'None' if scales is None else shape_str(scales)}")
    check_float(op, "scales", scales)
    if ranks is not None and (ranks.dtype not in INDEX_DTYPES or ranks.dim() != 1 or ranks.shape[0] != L):
        fail(op, f"ranks must be a 1-D int32/int64 tensor [L={L}], got {ranks.dtype} {shape_str(ranks)}")
    tensors = dict(y=y, x=x, topk_ids=topk_ids, topk_weights=topk_weights, adapter_ids=adapter_ids, scales=scales,
                   ranks=ranks)
    tensors.update({f"lora_a[{s}]": a for s, a in enumerate(lora_a)})
    tensors.update({f"lora_b[{s}]": b for s, b in enumerate(lora_b)})
    check_same_device(op, **tensors)
    if has_internal_overlap(y):
        fail(op, f"y (shape {shape_str(y)}, strides {list(y.stride())}) has elements that share memory; it is updated "
                 "in place, so every element must be stored once (pass a contiguous y)")
    for name, t in tensors.items():
        if name != "y" and t is not None and memory_overlaps(y, t):
            fail(op, f"y overlaps {name} in memory (y is updated in place while {name} is read); pass separate tensors")
    if routing is not None:
        routing.check(topk_ids, E, op, adapter_ids, L)
    if data_checks_enabled(x):
        dev = scales.device
        stats = [torch.isfinite(scales).all().to(torch.int64),
                 routing.same_ids(topk_ids, adapter_ids) if routing is not None
                 else torch.ones((), dtype=torch.int64, device=dev)]
        if M > 0:
            stats += [adapter_ids.min().to(torch.int64), adapter_ids.max().to(torch.int64)]
        if ranks is not None and L > 0:
            stats += [ranks.min().to(torch.int64), ranks.max().to(torch.int64)]
        vals = torch.stack(stats).tolist()  # the one host read
        finite, same, rest = vals[0], vals[1], vals[2:]
        if M > 0:
            lo, hi, rest = rest[0], rest[1], rest[2:]
            if lo < -1 or hi >= L:
                fail(op, f"adapter id out of range: adapter_ids must be in [-1, L={L}), got min {lo}, max {hi}")
        if not finite:
            fail(op, f"scales must be finite, got {scales.tolist() if L <= 16 else 'non-finite values'}")
        if rest:
            rlo, rhi = rest
            if rlo < 0 or rhi > r_max:
                fail(op, f"ranks must be in [0, r_max={r_max}], got min {rlo}, max {rhi}")
        if not same:
            fail(op, "routing was built from different topk_ids / adapter_ids (call routing.update_(...))")


# ----------------------------------------------------------------------------------------------
# Schemas, routing to the launchers, fakes
# ----------------------------------------------------------------------------------------------

define([
    # Training forward (reference.moe_lora_linear_ref): y = [M·k, N] per pair (combine=False) or [M, N] summed over
    # each token's k experts (combine=True), in x's dtype; xa = x_row(p)·A[e]ᵀ per pair, fp32 [M·k, r] (fp64 for
    # fp64 inputs; [M·k, 0] without LoRA), 0 for pairs without an expert. sorted_pairs / tiles / block_m: a
    # MoERouting's expert groups (an acceleration structure for the kernel backends; built by them when absent).
    "moe_lora_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_a, Tensor? lora_b, float scale, Tensor topk_ids, "
    "Tensor? topk_weights, bool combine, str backend, Tensor? sorted_pairs=None, Tensor? tiles=None, int block_m=0) "
    "-> (Tensor, Tensor)",
    # Backward: (dx, dA, dB, dtopk_weights) per output_mask; a gradient not asked for is an empty tensor. The expert
    # weights and biases are frozen here (their gradients, when asked for, are formed by the autograd function).
    "moe_lora_bwd(Tensor dy, Tensor x, Tensor xa, Tensor weight, Tensor? bias, Tensor? lora_a, Tensor? lora_b, float scale, "
    "Tensor topk_ids, Tensor? topk_weights, bool combine, bool[] output_mask, str backend, Tensor? sorted_pairs=None, "
    "Tensor? tiles=None, int block_m=0) -> (Tensor, Tensor, Tensor, Tensor)",
    # Serving (reference.add_moe_lora_ref): y [M·k, N_total] += per pair c·scales[i]·(x_row·A_s[i, e, :r_i]ᵀ)·
    # B_s[i, e, :, :r_i]ᵀ, in place; sorted_pairs / tiles / block_m: a MoERouting's (adapter, expert) groups.
    "add_moe_lora_(Tensor(a!) y, Tensor x, Tensor[] lora_a, Tensor[] lora_b, Tensor topk_ids, Tensor? topk_weights, "
    "Tensor adapter_ids, Tensor scales, Tensor? ranks, str backend, Tensor? sorted_pairs=None, Tensor? tiles=None, "
    "int block_m=0) -> ()",
])

# Launcher signatures (groups: None or (sorted_pairs, tiles, block_m)):
#   fwd   (x, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights, combine, groups) -> (y, xa)
#   bwd   (dy, x, xa, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights, combine, output_mask, groups)
#         -> (dx, dA, dB, dtopk_weights), None for what output_mask does not ask
#   add   (y, x, lora_a list, lora_b list, topk_ids, topk_weights, adapter_ids, scales, ranks, groups) -> None
add_rows({
    ("moe_lora_fwd", "torch"): "lora_kernels.torch.moe_lora:moe_lora_fwd_torch",
    ("moe_lora_bwd", "torch"): "lora_kernels.torch.moe_lora:moe_lora_bwd_torch",
    ("moe_lora_fwd", "triton"): "lora_kernels.triton.moe_lora:moe_lora_fwd_triton",
    ("moe_lora_bwd", "triton"): "lora_kernels.triton.moe_lora:moe_lora_bwd_triton",
    ("add_moe_lora", "torch"): "lora_kernels.torch.moe_lora:add_moe_lora_torch",
    ("add_moe_lora", "triton"): "lora_kernels.triton.moe_lora:add_moe_lora_triton",
}, public={OP: ("moe_lora_fwd", "moe_lora_bwd"), SERVE_OP: ("add_moe_lora",)})


def _groups(sorted_pairs, tiles, block_m):
    return None if sorted_pairs is None else (sorted_pairs, tiles, int(block_m))


def _acc(dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _out_rows(topk_ids, combine):
    M, k = topk_ids.shape
    return M if combine else M * k


def _moe_lora_fwd(x, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights, combine, backend,
                  sorted_pairs=None, tiles=None, block_m=0):
    M, k = topk_ids.shape
    N = weight.shape[1]
    r = 0 if lora_a is None else lora_a.shape[1]
    if M == 0:
        return (x.new_zeros((_out_rows(topk_ids, combine), N)),
                torch.zeros((0, r), dtype=_acc(x.dtype), device=x.device))
    return launcher("moe_lora_fwd", backend)(x, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights, combine,
                                             _groups(sorted_pairs, tiles, block_m))


def _moe_lora_bwd(dy, x, xa, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights, combine, output_mask, backend,
                  sorted_pairs=None, tiles=None, block_m=0):
    M, k = topk_ids.shape
    templates = (x, lora_a if lora_a is not None else x, lora_b if lora_b is not None else x,
                 topk_weights if topk_weights is not None else dy)
    if M == 0:
        grads = (torch.zeros_like(x), None if lora_a is None else torch.zeros_like(lora_a),
                 None if lora_b is None else torch.zeros_like(lora_b),
                 None if topk_weights is None else torch.zeros_like(topk_weights))
    else:
        grads = launcher("moe_lora_bwd", backend)(dy, x, xa, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights,
                                                  combine, list(output_mask), _groups(sorted_pairs, tiles, block_m))
    return tuple(g if (want and g is not None) else templates[i].new_empty(0)
                 for i, (want, g) in enumerate(zip(output_mask, grads)))


def _add_moe_lora_(y, x, lora_a, lora_b, topk_ids, topk_weights, adapter_ids, scales, ranks, backend,
                   sorted_pairs=None, tiles=None, block_m=0):
    if y.shape[0] == 0 or lora_a[0].shape[0] == 0 or lora_a[0].shape[2] == 0:
        return
    launcher("add_moe_lora", backend)(y, x, lora_a, lora_b, topk_ids, topk_weights, adapter_ids, scales, ranks,
                                      _groups(sorted_pairs, tiles, block_m))
    mark_written(y)


impl_all_devices("moe_lora_fwd", _moe_lora_fwd)
impl_all_devices("moe_lora_bwd", _moe_lora_bwd)
impl_all_devices("add_moe_lora_", _add_moe_lora_)


@torch.library.register_fake("lora_kernels::moe_lora_fwd", lib=lib)
def _moe_lora_fwd_fake(x, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights, combine, backend,
                       sorted_pairs=None, tiles=None, block_m=0):
    M, k = topk_ids.shape
    r = 0 if lora_a is None else lora_a.shape[1]
    return (x.new_empty((_out_rows(topk_ids, combine), weight.shape[1])),
            x.new_empty((M * k, r), dtype=_acc(x.dtype)))


@torch.library.register_fake("lora_kernels::moe_lora_bwd", lib=lib)
def _moe_lora_bwd_fake(dy, x, xa, weight, bias, lora_a, lora_b, scale, topk_ids, topk_weights, combine, output_mask, backend,
                       sorted_pairs=None, tiles=None, block_m=0):
    like = (x, lora_a, lora_b, topk_weights)
    return tuple(dy.new_empty(tuple(t.shape) if (want and t is not None) else (0,),
                              dtype=t.dtype if t is not None else dy.dtype)
                 for want, t in zip(output_mask, like))


@torch.library.register_fake("lora_kernels::add_moe_lora_", lib=lib)
def _add_moe_lora_fake(y, x, lora_a, lora_b, topk_ids, topk_weights, adapter_ids, scales, ranks, backend,
                       sorted_pairs=None, tiles=None, block_m=0):
    return None

