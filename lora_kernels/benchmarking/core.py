"""Op-level benchmark behind ``lora-kernels bench``: every available backend, the core ops, one table.

On CUDA: bf16, realistic shapes, medians from ``triton.testing.do_bench`` (CUDA events) after warm-up.
On the CPU: fp32, smaller shapes, and noise-aware timing (:func:`interleaved`): every variant of a case (the floor
and each backend) runs once per round, in an order rotated every round, for many rounds; each sample is the
thread CPU time of enough back-to-back calls to last about a millisecond. Each row reports min / median / max,
and its ratio to the floor is the median of the per-round ratios (never one run of each side), with its spread
and a ``noise`` flag when the spread makes the figure unreliable. The Triton interpreter is skipped unless asked
for (it is a correctness tool, not a fast path).
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
from typing import Callable, Dict, List, Optional, Sequence

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
    min_us: Optional[float] = None
    max_us: Optional[float] = None
    vs_floor_min: Optional[float] = None  # spread of the per-round ratios (CPU)
    vs_floor_max: Optional[float] = None
    samples: int = 0


# ----------------------------------------------------------------------------------------------
# Noise-aware CPU timing
# ----------------------------------------------------------------------------------------------

# A figure is flagged as noise when its samples' interquartile range exceeds this fraction of the median (or, for a
# ratio, when the middle half of the per-round ratios straddles 1.0 or spans more than this fraction).
NOISE_IQR = 0.10


@dataclass
class Stats:
    """Summary of timing samples (µs per call) or of per-round ratios."""

    min: float
    median: float
    max: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stats":
        v = sorted(float(t) for t in values)
        if not v:
            raise ValueError("Stats.of: no samples")
        q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
        return cls(v[0], statistics.median(v), v[-1], q[0], q[2], len(v))

    @property
    def iqr_rel(self) -> float:
        return (self.q3 - self.q1) / self.median if self.median else float("inf")

    @property
    def noisy(self) -> bool:
        return self.iqr_rel > NOISE_IQR

    def ratio_noisy(self) -> bool:
        """For per-round ratios: the middle half straddles 1.0 (which side is faster is undecided) or is wide."""
        return (self.q1 < 1.0 < self.q3) or self.noisy

    def fmt(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} [{self.min:.{digits}f}–{self.max:.{digits}f}]"


def thread_time_s() -> float:
    """CPU time of the calling thread, in seconds (not disturbed by other processes' load on the box)."""
    return time.thread_time()


def calibrate(fn: Callable[[], object], target_s: float = 1e-3, clock: Callable[[], float] = thread_time_s) -> int:
    """Calls of ``fn`` per sample so that one sample lasts at least about ``target_s`` (1 for slow calls)."""
    n = 1
    while True:
        t0 = clock()
        for _ in range(n):
            fn()
        dt = clock() - t0
        if dt >= target_s or n >= 1 << 16:
            return n
        n = min(1 << 16, max(2 * n, int(n * 1.5 * target_s / max(dt, 1e-9))))


def interleaved(
    fns: Dict[str, Callable[[], object]],
    rounds: int = 15,
    warmup: int = 2,
    target_s: float = 1e-3,
    max_s: Optional[float] = None,
    clock: Callable[[], float] = thread_time_s,
) -> Dict[str, List[float]]:
    """Time the variants ``fns`` against each other: ``warmup`` untimed rounds, then ``rounds`` rounds in which each
    variant gives one sample (µs per call, the mean over a calibrated number of back-to-back calls), the order
    rotated every round so that no variant always runs first or after the same neighbour. Stops early (keeping at
    least 5 rounds) once ``max_s`` seconds of the clock have passed. Returns ``{name: [µs per call, ...]}``."""
    names = list(fns)
    for _ in range(max(0, warmup)):
        for k in names:
            fns[k]()
    inner = {k: calibrate(fns[k], target_s, clock) for k in names}
    out: Dict[str, List[float]] = {k: [] for k in names}
    start = clock()
    for i in range(rounds):
        order = names[i % len(names):] + names[: i % len(names)]
        if i % 2:
            order.reverse()
        for k in order:
            n = inner[k]
            t0 = clock()
            for _ in range(n):
                fns[k]()
            out[k].append((clock() - t0) / n * 1e6)
        if max_s is not None and i >= 4 and clock() - start > max_s:
            break
    return out


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> List[float]:
    """Per-round ratios num[i] / den[i] of two variants timed in the same rounds."""
    return [a / b for a, b in zip(num, den) if b > 0]


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
    CUDA events if Triton is missing, and on the CPU the median of calibrated thread-CPU-time samples. To compare
    variants on the CPU use :func:`interleaved` (rounds of every variant, rotated), not two calls of this."""
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

    def cpu(fn, rounds=15):
        # one variant alone: median of calibrated thread-CPU-time samples (use interleaved() to compare variants)
        return Stats.of(interleaved({"fn": fn}, rounds=rounds)["fn"]).median

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
        progress: bool = True, rounds: Optional[int] = None, threads: Optional[int] = None) -> dict:
    """Time every available backend on the core ops; print the table, write JSON, return the result dict.

    CPU: ``threads`` intra-op threads (default 1, timed with the thread's CPU time; with more threads, wall clock),
    and per case the floor and every backend interleaved over ``rounds`` rounds (default 15; 25 with ``full``)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backends = tuple(backends) if backends else (BACKENDS if device == "cuda" else ("torch",))
    peak = _peak_tflops(device)
    prev_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(int(threads or 1))
    try:
        cases = build_cases(device, dtype, full)
        total = sum(1 + len(backends) for _ in cases)
        bar = _progress(total, progress)
        if device == "cpu":
            rows, timer = _run_cpu(cases, backends, dtype, rounds or (25 if full else 15), bar)
        else:
            rows, timer = _run_cuda(cases, backends, device, dtype, peak, bar), "triton.testing.do_bench median (CUDA events)"
        bar.close()
        result = {
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
            "dtype": str(dtype),
            "threads": torch.get_num_threads(),
            "versions": versions(),
            "timer": timer,
            "rows": [asdict(r) for r in rows],
        }
    finally:
        torch.set_num_threads(prev_threads)
    print(format_table(rows))
    if device == "cpu":
        print(f"CPU timing: {timer}. µs columns: median [min–max]; '× floor' is the median of per-round ratios "
              f"[min–max]; 'noise' = the middle half of the samples spans > {NOISE_IQR:.0%} of the median (or the "
              "ratios straddle 1.0): do not read a difference into that row.")
    if out_json:
        os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out_json}")
    return result


def _throughput(row: Row, case: Case, us: float) -> None:
    if case.bytes:
        row.metric, row.value = "GB/s", case.bytes / (us * 1e-6) / 1e9
    elif case.flops:
        row.metric, row.value = "TFLOP/s", case.flops / (us * 1e-6) / 1e12


def _run_cuda(cases: List[Case], backends, device: str, dtype, peak, bar) -> List[Row]:
    time_fn = make_timer(device)
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
            _throughput(row, case, us)
            if floor_us:
                row.vs_floor = us / floor_us
            if peak and row.metric == "TFLOP/s":
                row.note = f"{100 * row.value / peak:.0f}% of {peak:.0f} TFLOP/s peak"
            rows.append(row)
            bar.update(1)
    return rows


def _run_cpu(cases: List[Case], backends, dtype, rounds: int, bar):
    """Per case: the floor and every available backend interleaved (see :func:`interleaved`)."""
    one_thread = torch.get_num_threads() == 1
    clock = thread_time_s if one_thread else time.perf_counter
    timer = (f"{'thread CPU time' if one_thread else 'wall clock'}, {rounds} interleaved rounds (order rotated), "
             "each sample ≥ 1 ms of back-to-back calls")
    rows: List[Row] = []
    for case in cases:
        shape = " ".join(f"{k}={v}" for k, v in case.shape.items())
        fns: Dict[str, Callable[[], object]] = {}
        if case.floor:
            fns["floor"] = case.floor
        skipped: List[Row] = []
        for be in backends:
            reason = _unavailable_reason(case.op, be, "cpu", dtype)
            if reason:
                skipped.append(Row(case.op, shape, be, None, note=f"unavailable: {reason}"))
            else:
                fns[be] = case.run[be]
        samples = interleaved(fns, rounds=rounds, clock=clock)
        bar.update(1 + len(backends))
        per_pass = 2.0 if case.op == "merge" else 1.0  # merge runs merge + unmerge per call
        if "floor" in samples:
            st = Stats.of(samples["floor"])
            rows.append(Row(case.op, shape, case.floor_name, st.median, note="floor" + ("; noise" if st.noisy else ""),
                            min_us=st.min, max_us=st.max, samples=st.n))
        for be in backends:
            if be not in samples:
                continue
            st = Stats.of([t / per_pass for t in samples[be]])
            row = Row(case.op, shape, be, st.median, min_us=st.min, max_us=st.max, samples=st.n)
            _throughput(row, case, st.median)
            notes = []
            if "floor" in samples:
                rs = Stats.of(paired_ratios([t / per_pass for t in samples[be]], samples["floor"]))
                row.vs_floor, row.vs_floor_min, row.vs_floor_max = rs.median, rs.min, rs.max
                if rs.noisy:
                    notes.append("noise: ratio spread")
            if st.noisy:
                notes.append("noise: time spread")
            row.note = "; ".join(notes)
            rows.append(row)
        rows.extend(skipped)
    return rows, timer


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
    spread = any(r.min_us is not None for r in rows)
    w_us = 30 if spread else 11
    head = f"{'op':<20} {'shape':<26} {'backend':<18} {'median µs':>{w_us}} {'throughput':>16} {'× floor':>{20 if spread else 8}}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.median_us is None:
            us = f"{'—':>{w_us}}"
        elif spread and r.min_us is not None:
            us = f"{r.median_us:10.1f} [{r.min_us:.1f}–{r.max_us:.1f}]".rjust(w_us)
        else:
            us = f"{r.median_us:{w_us}.1f}"
        tp = f"{r.value:9.4g} {r.metric:<6}" if r.value is not None else f"{'':>16}"
        if r.vs_floor is None:
            vf = f"{'':>{20 if spread else 8}}"
        elif spread and r.vs_floor_min is not None:
            vf = f"{r.vs_floor:6.2f} [{r.vs_floor_min:.2f}–{r.vs_floor_max:.2f}]".rjust(20)
        else:
            vf = f"{r.vs_floor:{20 if spread else 8}.2f}"
        lines.append(f"{r.op:<20} {r.shape:<26} {r.backend:<18} {us} {tp} {vf}  {r.note}")
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
