"""Tooling: the bytes a Triton kernel moves, counted exactly under the interpreter with the real GPU launch configs.

Every masked load, store and atomic the interpreter executes is recorded (the addresses whose mask is true and the
element size). Addresses are attributed to named operands by their storage ranges; anything else (buffers a
launcher allocates, e.g. the fp32 ``xa``) is reported as ``(temporaries)``.

* ``req``  — every byte a kernel asks of memory (what the load/store units and L2 must serve);
* ``uniq`` — distinct bytes touched per operand and per kernel launch, summed over launches (a lower bound on DRAM
  traffic: an operand two kernels read counts twice);
* ``floor`` — each named operand read once and/or written once (an in-place operand counts twice).

The kernels run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py without a GPU), so the launch configs must be
forced: :func:`force_config` replaces an autotuner's list with one GPU config, and :func:`gpu_programs` makes the
split-reduction kernels size their grids for an H100 (132 SMs) instead of the interpreter's small default.

Used by tests/test_traffic.py (ceilings checked in CI) and runnable as ``python tests/traffic.py`` for the table.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import torch

H100_SMS = 132


@dataclass
class OperandTraffic:
    nbytes: int
    load: int = 0
    store: int = 0
    atomic: int = 0
    _loads: List[np.ndarray] = field(default_factory=list, repr=False)
    _stores: List[np.ndarray] = field(default_factory=list, repr=False)
    uniq_load: int = 0
    uniq_store: int = 0
    elem: int = 1

    @property
    def req(self) -> int:
        return self.load + self.store + self.atomic

    @property
    def uniq(self) -> int:
        return self.uniq_load + self.uniq_store

    @property
    def floor(self) -> int:
        return self.nbytes * ((self.load + self.atomic > 0) + (self.store + self.atomic > 0))


class Traffic:
    """Context manager recording the memory traffic of every Triton kernel launched inside it.

    ``Traffic(x=x, weight=w, y=y)``: the named tensors are the operands (their bytes define the floor)."""

    TEMP = "(temporaries)"

    def __init__(self, **operands: torch.Tensor):
        self.operands = {k: v for k, v in operands.items() if v is not None}
        self.stats: Dict[str, OperandTraffic] = {}
        self._patches = []

    # -- recording: raw records during the run, attributed to operands at exit (so outputs that a launcher
    #    allocates can be named after it returns: ``tr.operands.update(y=y)`` inside the ``with`` block)
    def _record(self, kind: str, ptrs, mask, bits: int):
        addrs = np.asarray(ptrs, dtype=np.uint64)
        if mask is not None:
            addrs = addrs[np.broadcast_to(np.asarray(mask, dtype=bool), addrs.shape)]
        addrs = addrs.reshape(-1)
        if addrs.size:
            self._raw.append((kind, addrs, max(bits // 8, 1), self._launch))

    def _attribute(self):
        rows = []
        for name, t in self.operands.items():
            if t is None or t.numel() == 0:
                continue
            lo = t.data_ptr()
            span = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
            rows.append((lo, lo + span * t.element_size(), name))
        rows.sort()
        starts = np.array([r[0] for r in rows], dtype=np.uint64)
        ends = np.array([r[1] for r in rows], dtype=np.uint64)
        for kind, addrs, elem, launch in self._raw:
            idx = np.searchsorted(starts, addrs, side="right") - 1
            inside = (idx >= 0) & (addrs < ends[np.maximum(idx, 0)]) if len(rows) else np.zeros(addrs.shape, bool)
            for j in np.unique(idx[inside]):
                self._add(rows[j][2], kind, addrs[inside & (idx == j)], elem, launch)
            self._add(self.TEMP, kind, addrs[~inside], elem, launch)
        self._raw = []

    def _add(self, name, kind, addrs, elem, launch):
        if addrs.size == 0:
            return
        st = self.stats.get(name)
        if st is None:
            t = self.operands.get(name)
            st = self.stats[name] = OperandTraffic(nbytes=0 if t is None else t.numel() * t.element_size(), elem=elem)
        n = int(addrs.size) * elem
        tagged = (launch, addrs)
        if kind == "load":
            st.load += n
            st._loads.append(tagged)
        elif kind == "store":
            st.store += n
            st._stores.append(tagged)
        else:  # atomic read-modify-write: one request, both a read and a write of the location
            st.atomic += n
            st._loads.append(tagged)
            st._stores.append(tagged)

    def __enter__(self):
        from triton.runtime import interpreter as I

        self._raw = []
        self._launch = 0
        B = I.InterpreterBuilder
        me = self

        def next_launch(*grid):
            me._launch += 1

        def wrap(name, fn):
            orig = getattr(B, name)

            def patched(builder, *args):
                fn(*args)
                return orig(builder, *args)

            setattr(B, name, patched)
            self._patches.append((name, orig))

        wrap("set_grid_dim", next_launch)  # called once per kernel launch
        bits = lambda h: h.get_element_ty().primitive_bitwidth  # noqa: E731
        wrap("create_masked_load", lambda ptrs, mask, *a: me._record("load", ptrs.data, mask.data, bits(ptrs)))
        wrap("create_masked_store", lambda ptrs, val, mask, *a: me._record("store", ptrs.data, mask.data, bits(ptrs)))
        wrap("create_atomic_rmw", lambda op, ptr, val, mask, *a: me._record("atomic", ptr.data, mask.data, bits(ptr)))
        wrap("create_atomic_cas", lambda ptr, *a: me._record("atomic", ptr.data, None, bits(ptr)))
        return self

    def __exit__(self, *exc):
        from triton.runtime import interpreter as I

        for name, orig in reversed(self._patches):
            setattr(I.InterpreterBuilder, name, orig)
        self._patches.clear()
        self._attribute()
        for st in self.stats.values():
            st.uniq_load, st.uniq_store = _uniq(st._loads) * st.elem, _uniq(st._stores) * st.elem
            st._loads, st._stores = [], []
        return False

    # -- results ---------------------------------------------------------------------------
    @property
    def floor(self) -> int:
        return sum(st.floor for name, st in self.stats.items() if name != self.TEMP)

    @property
    def req(self) -> int:
        return sum(st.req for st in self.stats.values())

    @property
    def uniq(self) -> int:
        return sum(st.uniq for st in self.stats.values())

    def ratios(self):
        """(req / floor, uniq / floor)."""
        return self.req / self.floor, self.uniq / self.floor

    def table(self) -> str:
        lines = [f"{'operand':<16}{'bytes':>11}{'req':>12}{'uniq':>12}{'req/bytes':>10}"]
        for name, st in sorted(self.stats.items()):
            lines.append(f"{name:<16}{st.nbytes:>11}{st.req:>12}{st.uniq:>12}"
                         f"{(st.req / st.nbytes if st.nbytes else float('nan')):>10.2f}")
        r, u = self.ratios()
        lines.append(f"{'total':<16}{self.floor:>11}{self.req:>12}{self.uniq:>12}   req/floor {r:.2f}  uniq/floor {u:.2f}")
        return "\n".join(lines)


def _uniq(tagged) -> int:
    """Distinct addresses per launch, summed over launches."""
    by_launch: Dict[int, list] = {}
    for launch, addrs in tagged:
        by_launch.setdefault(launch, []).append(addrs)
    return sum(int(np.unique(np.concatenate(parts)).size) for parts in by_launch.values())


@contextlib.contextmanager
def force_config(kernel, config):
    """Run an autotuned kernel with exactly ``config`` (a ``triton.Config``), as the autotuner would on a GPU."""
    saved = kernel.configs
    kernel.configs = [config]
    try:
        yield
    finally:
        kernel.configs = saved


@contextlib.contextmanager
def gpu_programs(sms: int = H100_SMS):
    """Size the launchers' interpreter-dependent work splits as on a GPU with ``sms`` SMs: the split-reduction grids
    of triton/lora_linear.py and the decode shrink's K split of triton/multi_lora.py."""
    from lora_kernels.triton import lora_linear as tll
    from lora_kernels.triton import multi_lora as tml

    saved = tll._target_programs, tml.BGMV_MIN_K_SPLIT
    tll._target_programs = lambda device_index: 2 * sms
    tml.BGMV_MIN_K_SPLIT = tml.BGMV_MIN_K_SPLIT_GPU
    try:
        yield
    finally:
        tll._target_programs, tml.BGMV_MIN_K_SPLIT = saved


# ----------------------------------------------------------------------------------------------
# The cases of the CI ceilings (tests/test_traffic.py) and of the command-line table
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gpu_launches(kernel_configs=None):
    """:func:`gpu_programs` plus :func:`force_config` for each ``{kernel: triton.Config}``: launches sized and tiled as
    on an H100."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(gpu_programs())
        for kern, cfg in (kernel_configs or {}).items():
            stack.enter_context(force_config(kern, cfg))
        yield


def _rand(*shape, dtype=torch.float16, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def add_lora_case(M, L, r, K, N, ids=None, dtype=torch.float16):
    x = _rand(M, K, dtype=dtype, seed=1)
    A = _rand(L, r, K, dtype=dtype, scale=K**-0.5, seed=2)
    B = _rand(L, N, r, dtype=dtype, seed=3)
    y = _rand(M, N, dtype=dtype, seed=4)
    if ids is None:
        ids = torch.arange(M, dtype=torch.int32) % L
    scales = torch.full((L,), 0.5)
    return dict(y=y, x=x, A=A, B=B, ids=ids.to(torch.int32), scales=scales)


def measure_add_lora(case, strategy, kernel_configs=None):
    """Traffic of one add_lora call (Triton launcher, given strategy); ``kernel_configs``: {kernel: triton.Config}."""
    from lora_kernels.ops.multi_lora import LoRABatchMeta
    from lora_kernels.triton import multi_lora as tml

    c = case
    groups = LoRABatchMeta(c["ids"], c["A"].shape[0]).groups if strategy == "sgmv" else None
    y = c["y"].clone()
    with gpu_launches(kernel_configs):
        with Traffic(y=y, x=c["x"], A=c["A"], B=c["B"], ids=c["ids"], scales=c["scales"]) as tr:
            tml.add_lora_triton(y, c["x"], [c["A"]], [c["B"]], c["ids"], c["scales"], None, groups=groups,
                                strategy=strategy)
    return tr


def linear_case(M, K, N, r, dtype=torch.float16):
    return dict(x=_rand(M, K, dtype=dtype, seed=1), w=_rand(N, K, dtype=dtype, scale=K**-0.5, seed=2),
                a=_rand(r, K, dtype=dtype, scale=K**-0.5, seed=3), b=_rand(N, r, dtype=dtype, seed=4),
                dy=_rand(M, N, dtype=dtype, seed=5))


def measure_lora_linear(case, kernel_configs=None, dropout_p=0.0, backward=False):
    from lora_kernels.triton import lora_linear as tll

    c = case
    with gpu_launches(kernel_configs):
        if not backward:
            with Traffic(x=c["x"], weight=c["w"], lora_a=c["a"], lora_b=c["b"]) as tr:
                y, xa = tll.lora_linear_fwd_triton(c["x"], c["w"], c["a"], c["b"], 0.5, None, dropout_p, 7)
                tr.operands.update(y=y, xa=xa)
            return tr
        _, xa = tll.lora_linear_fwd_triton(c["x"], c["w"], c["a"], c["b"], 0.5, None, dropout_p, 7)
        with Traffic(dy=c["dy"], x=c["x"], xa=xa, weight=c["w"], lora_a=c["a"], lora_b=c["b"]) as tr:
            dx, da, db, _ = tll.lora_linear_bwd_triton(c["dy"], c["x"], xa, c["w"], c["a"], c["b"], 0.5, dropout_p, 7,
                                                       (True, True, True, False))
            tr.operands.update(dx=dx, da=da, db=db)
    return tr


def measure_merge(weight, lora_a, lora_b, config):
    """Traffic of one plain merge (Triton launcher) with the given merge config dict."""
    from lora_kernels.triton import merge as tm

    w = weight.clone()
    with Traffic(weight=w, lora_a=lora_a, lora_b=lora_b) as tr:
        tm.merge_triton(w, [lora_a], [lora_b], [0.5], config=dict(config))
    return tr


def interpreting() -> bool:
    from lora_kernels._backend import triton_interpreting

    return triton_interpreting()


def main() -> None:
    """Run the CI traffic cases (``python tests/traffic.py``; tests/test_traffic.py holds the ceilings)."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    import pytest

    raise SystemExit(pytest.main([os.path.join(os.path.dirname(__file__), "test_traffic.py"), "-q", "-s"]))


if __name__ == "__main__":
    main()
