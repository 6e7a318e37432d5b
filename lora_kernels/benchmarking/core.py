"""Op-level benchmark behind ``lora-kernels bench``: every available backend, the core ops, one table.

On CUDA: bf16, realistic shapes, medians from ``triton.testing.do_bench`` (CUDA events) after warm-up.
On the CPU: fp32, smaller shapes, medians of wall-clock repeats (a smoke-level comparison of the reference
paths; the Triton interpreter is skipped unless asked for, it is a correctness tool, not a fast path).
Each row reports median µs, achieved TFLOP/s (GEMM-like ops) or GB/s (byte-bound ops), and the ratio to
the op's floor measured in the same run (frozen-base GEMM for lora_linear, one read+write of the bytes for
add_lora / merge).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import lora_kernels as lk
from lora_kernels._backend import BackendUnavailableError, resolve_backend

BACKENDS = ("cuda", "triton", "torch")


@dataclass
class Row:
    op: str
    shape: str
    backend: str
    median_us: Optional[float]
    metric: str = ""
    value: Optional[float] = None
    vs_floor: Optional[float] = None
    note: str = ""


@dataclass
class Case:
    op: str
    shape: Dict[str, int]
    flops: float = 0.0  # useful multiply-adds × 2
    bytes: float = 0.0  # minimal bytes moved
    run: Dict[str, Callable[[], object]] = field(default_factory=dict)  # backend -> thunk
    floor: Optional[Callable[[], object]] = None
    floor_name: str = ""


def make_timer(device: str):
    """``fn -> median µs``: ``triton.testing.do_bench`` on CUDA (CUDA events, L2 flushed, after warm-up),
    CUDA events if Triton is missing, wall-clock medians on the CPU. Shared by every benchmark script."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3
        except ImportError:
            def cuda_events(fn, reps=50):
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
                times = []
                for _ in range(reps):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    fn()
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e) * 1e3)
                return statistics.median(times)

            return cuda_events

    def cpu(fn, reps=7):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)

    return cpu


def _peak_tflops(device: str) -> Optional[float]:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        return 989.0
    if "A100" in name:
        return 312.0
    return None


def build_cases(device: str, dtype: torch.dtype, full: bool) -> List[Case]:
    """The benchmark grid: realistic on CUDA, small on the CPU."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    cases: List[Case] = []
    if device == "cuda":
        lin_shapes = [(M, 4096, 4096, r) for M in ((512, 2048, 8192) if full else (2048, 8192)) for r in ((16, 64) if full else (16,))]
        if full:
            lin_shapes += [(8192, 4096, 14336, 16), (8192, 14336, 4096, 16)]
        multi_shapes = [(M, 4096, 4096, L, r) for (M, L) in ((1, 1), (16, 1), (128, 128), (512, 32)) for r in ((8, 16, 64) if full else (16,))]
        merge_shapes = [(4096, 4096, 16), (14336, 4096, 16)] + ([(4096, 14336, 64)] if full else [])
    else:
        lin_shapes = [(256, 512, 512, 16)] + ([(1024, 1024, 1024, 16)] if full else [])
        multi_shapes = [(1, 512, 512, 1, 16), (64, 512, 512, 8, 16)]
        merge_shapes = [(512, 512, 16)]

    for M, K, N, r in lin_shapes:
        x, W, b = rnd(M, K), rnd(N, K, scale=K**-0.5), rnd(N)
        A, B = rnd(r, K, scale=K**-0.5), rnd(N, r, scale=0.1)
        A.requires_grad_(True)
        B.requires_grad_(True)
        xg = x.clone().requires_grad_(True)
        dy = rnd(M, N)
        s = 2.0
        c_f = Case("lora_linear fwd", dict(M=M, K=K, N=N, r=r), flops=2.0 * M * (N * K + r * K + r * N),
                   floor=lambda x=x, W=W, b=b: torch.nn.functional.linear(x, W, b), floor_name="base GEMM")
        c_fb = Case("lora_linear fwd+bwd", dict(M=M, K=K, N=N, r=r), flops=2.0 * M * (2 * N * K + 3 * r * K + 3 * r * N),
                    floor=lambda xg=xg, W=W, b=b, dy=dy: torch.nn.functional.linear(xg, W, b).backward(dy), floor_name="base GEMM fwd+bwd")
        for be in BACKENDS:
            c_f.run[be] = lambda be=be, x=x, W=W, A=A, B=B, b=b: lk.lora_linear(x, W, A, B, s, b, backend=be)
            c_fb.run[be] = lambda be=be, xg=xg, W=W, A=A, B=B, b=b, dy=dy: lk.lora_linear(xg, W, A, B, s, b, backend=be).backward(dy)
        cases += [c_f, c_fb]

    for M, K, N, L, r in multi_shapes:
        x, y = rnd(M, K), rnd(M, N)
        A, B = rnd(L, r, K, scale=K**-0.5), rnd(L, N, r, scale=0.1)
        ids = (torch.arange(M) % L).to(device)
        scales = torch.full((L,), 0.5, device=device)
        touched = min(L, M)
        nbytes = (touched * r * (K + N) + M * K + 2 * M * N) * x.element_size()
        c = Case("add_lora", dict(M=M, K=K, N=N, L=L, r=r), flops=2.0 * M * r * (K + N), bytes=float(nbytes),
                 floor=lambda y=y: y.add_(0.0), floor_name="y read+write")
        for be in BACKENDS:
            c.run[be] = lambda be=be, y=y, x=x, A=A, B=B, ids=ids, scales=scales: lk.add_lora(y, x, A, B, ids, scales, backend=be)
        cases.append(c)

    for N, K, r in merge_shapes:
        W = rnd(N, K)
        A, B = rnd(r, K, scale=0.01), rnd(N, r, scale=0.01)
        nbytes = (2 * N * K + r * (N + K)) * W.element_size()
        c = Case("merge", dict(N=N, K=K, r=r), flops=2.0 * N * K * r, bytes=float(nbytes),
                 floor=lambda W=W: W.add_(0.0), floor_name="W read+write")
        for be in BACKENDS:
            # merge then unmerge: two passes; the reported time is per pass
            c.run[be] = lambda be=be, W=W, A=A, B=B: (lk.merge_(W, A, B, 1.0, backend=be), lk.unmerge_(W, A, B, 1.0, backend=be))
        cases.append(c)
    return cases


def _unavailable_reason(op: str, be: str, device: str, dtype) -> Optional[str]:
    """Why backend ``be`` cannot run ``op`` here (None: it can)."""
    probe = torch.empty(1, device=device, dtype=dtype)
    name = op.split()[0]
    try:
        resolve_backend(name, probe, backend=be)
    except BackendUnavailableError as e:
        return str(e).split(": ", 1)[-1]
    return None


def run(device: Optional[str] = None, full: bool = False, backends=None, out_json: Optional[str] = None,
        progress: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backends = tuple(backends) if backends else (BACKENDS if device == "cuda" else ("torch",))
    time_fn = make_timer(device)
    peak = _peak_tflops(device)
    cases = build_cases(device, dtype, full)
    total = sum(1 + len(backends) for _ in cases)
    bar = _progress(total, progress)
    rows: List[Row] = []
    for case in cases:
        shape = " ".join(f"{k}={v}" for k, v in case.shape.items())
        floor_us = time_fn(case.floor) if case.floor else None
        bar.update(1)
        rows.append(Row(case.op, shape, case.floor_name, floor_us, note="floor"))
        for be in backends:
            reason = _unavailable_reason(case.op, be, device, dtype)
            if reason:
                rows.append(Row(case.op, shape, be, None, note=f"unavailable: {reason}"))
                bar.update(1)
                continue
            us = time_fn(case.run[be])
            if case.op == "merge":
                us /= 2.0
            row = Row(case.op, shape, be, us)
            if case.bytes:
                row.metric, row.value = "GB/s", case.bytes / (us * 1e-6) / 1e9
            elif case.flops:
                row.metric, row.value = "TFLOP/s", case.flops / (us * 1e-6) / 1e12
            if floor_us:
                row.vs_floor = us / floor_us
            if peak and row.metric == "TFLOP/s":
                row.note = f"{100 * row.value / peak:.0f}% of {peak:.0f} TFLOP/s peak"
            rows.append(row)
            bar.update(1)
    bar.close()
    result = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "dtype": str(dtype),
        "versions": versions(),
        "timer": "triton.testing.do_bench median (CUDA events)" if device == "cuda" else "wall-clock median of 7",
        "rows": [asdict(r) for r in rows],
    }
    print(format_table(rows))
    if out_json:
        os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out_json}")
    return result


def versions(*extra: str) -> dict:
    """Versions for a benchmark's JSON: python, torch, CUDA, triton, lora_kernels, plus ``extra`` modules."""
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "lora_kernels": lk.__version__}
    for mod in ("triton",) + extra:
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = None
    return v


def format_table(rows: List[Row]) -> str:
    head = f"{'op':<20} {'shape':<34} {'backend':<20} {'median µs':>11} {'throughput':>16} {'× floor':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        us = f"{r.median_us:11.1f}" if r.median_us is not None else f"{'—':>11}"
        tp = f"{r.value:9.4g} {r.metric:<6}" if r.value is not None else f"{'':>16}"
        vf = f"{r.vs_floor:8.2f}" if r.vs_floor is not None else f"{'':>8}"
        lines.append(f"{r.op:<20} {r.shape:<34} {r.backend:<20} {us} {tp} {vf}  {r.note}")
    return "\n".join(lines)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="lora-kernels bench", unit="run", leave=False)
    except ImportError:
        class _Simple(_NoBar):
            def __init__(self):
                self.done = 0

            def update(self, n=1):
                self.done += n
                print(f"\r[{self.done}/{total}]", end="", flush=True)

            def close(self):
                print()

        return _Simple()
