"""Pieces every Triton kernel module shares: the interpreter switch, the autotune-config builder and the
dropout hash (device side and its per-call host constants)."""

from __future__ import annotations

from typing import Sequence, Tuple

import triton
import triton.language as tl

from .. import reference as ref
from .._backend import triton_interpreting

# Read once at import: the autotune config lists below depend on it (the tests set it before importing kernels).
INTERPRET = triton_interpreting()


class ConfigList(list):
    """The configs a kernel autotunes over here, with the GPU list kept as ``.gpu`` (the traffic harness,
    tests/traffic.py, replays GPU configs under the interpreter)."""

    gpu: list


def autotune_configs(specs: Sequence[Tuple[dict, int, int]], interpreter_spec: Tuple[dict, int, int]) -> ConfigList:
    """``triton.Config`` list from (meta-parameters, num_warps, num_stages) entries; under the interpreter only
    ``interpreter_spec`` (autotuning there is very slow and the GPU tile shapes are too big for test shapes)."""
    gpu = [triton.Config(dict(kw), num_warps=w, num_stages=s) for kw, w, s in specs]
    out = ConfigList([triton.Config(dict(interpreter_spec[0]), num_warps=interpreter_spec[1],
                                    num_stages=interpreter_spec[2])] if INTERPRET else gpu)
    out.gpu = gpu
    return out


def dropout_args(dropout_p: float, seed: int):
    """(DROPOUT, seed_hash as int32, threshold, keep_scale) for kernels that regenerate the dropout mask."""
    p = float(dropout_p)
    if p == 0.0:
        return False, 0, 0, 1.0
    h = ref.dropout_seed_hash(seed)
    if h >= 1 << 31:
        h -= 1 << 32  # the kernel bitcasts it back to uint32
    return True, h, ref.dropout_threshold(p), 1.0 / (1.0 - p)


@triton.jit
def grouped_pid(pid, num_rows, num_cols, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: GROUP_M row tiles sweep the column tiles
    together, so a column tile of the right-hand operand (a weight) stays in L2 while those row tiles read it."""
    num_pid_in_group = GROUP_M * num_cols
    first = (pid // num_pid_in_group) * GROUP_M
    group_size = tl.minimum(num_rows - first, GROUP_M)
    row = first + (pid % num_pid_in_group) % group_size
    col = (pid % num_pid_in_group) // group_size
    return row, col


@triton.jit
def _mix32(h):
    # lowbias32 finaliser; h is uint32, so the multiplications wrap modulo 2^32 like the reference's masks.
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    h = h ^ (h >> 16)
    return h


@triton.jit
def keep_mask(seed_hash, offs_m, offs_k, threshold):
    """keep[m, k] = (mix32(k + mix32(m + mix32(seed))) >> 8) >= threshold, for a [len(m), len(k)] tile
    (reference.dropout_keep_mask bit for bit). seed_hash is mix32(seed) reinterpreted as int32 (host side)."""
    seed_u = seed_hash.to(tl.uint32, bitcast=True)
    row_h = _mix32(offs_m.to(tl.uint32) + seed_u)
    h = _mix32(row_h[:, None] + offs_k.to(tl.uint32)[None, :])
    return (h >> 8).to(tl.int32) >= threshold
