"""Benchmark: in-place LoRA merge / unmerge (plain and exact) vs the byte floor and PyTorch merges.

    python benchmarks/bench_merge.py [--out FILE] [--ranks 16 64] [--backends triton cuda] [--iters 30]

bf16 weights 4096×4096, 14336×4096, 4096×14336, r ∈ {16, 64}. For each: the byte floor (read + write W once at
the H100's ~3.35 TB/s), the achievable floor measured as ``W.add_(1)`` and ``W2.copy_(W)``, the naive PyTorch merge
``W += s·(B@A)`` (bf16 product, rounds twice), an fp32-accurate PyTorch merge (``reference.merge_ref``), and the
lora_kernels merge_ / unmerge_ / merge_exact_ / unmerge_exact_ per backend. Times are medians over CUDA-event
timed iterations with the L2 flushed between them; merge and unmerge alternate, so W stays the same weight.
Prints a table and writes JSON (default ``$OUT/bench_merge.json`` if OUT is set, else benchmarks/results/).
Exits 0 with a message on a machine without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

H100_BYTES_PER_S = 3.35e12
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def _flush_buffer():
    return torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")


def time_pair(first, second, iters, flush):
    """Median µs of ``first`` and of ``second`` (called alternately, each timed alone, L2 flushed before each)."""
    t1, t2 = [], []
    for i in range(iters + 3):
        flush.zero_()
        s0, e0 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s0.record()
        ctx = first()
        e0.record()
        flush.zero_()
        s1, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s1.record()
        second(ctx)
        e1.record()
        torch.cuda.synchronize()
        if i >= 3:  # warm-up
            t1.append(s0.elapsed_time(e0) * 1e3)
            t2.append(s1.elapsed_time(e1) * 1e3)
    return statistics.median(t1), statistics.median(t2)


def time_one(fn, iters, flush):
    return time_pair(lambda: fn(), lambda _ctx: None, iters, flush)[0]


def run(args) -> dict:
    import triton

    import lora_kernels as lk
    from lora_kernels.reference import merge_ref

    flush = _flush_buffer()
    backends = []
    for be in args.backends:
        if be == "cuda" and not lk.load_extension():
            print("cuda backend skipped: extension not loaded", file=sys.stderr)
            continue
        backends.append(be)
    rows = []
    for N, K in (SHAPES[:1] if args.quick else SHAPES):
        for r in args.ranks:
            g = torch.Generator(device="cuda").manual_seed(0)
            W = (torch.randn(N, K, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
            A = (torch.randn(r, K, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
            B = (torch.randn(N, r, device="cuda", generator=g) * 0.004).to(torch.bfloat16)
            s = 2.0
            W2 = torch.empty_like(W)
            w_bytes = 2 * W.numel() * W.element_size()
            floor_us = w_bytes / H100_BYTES_PER_S * 1e6

            def row(name, us, extra=None):
                d = dict(name=name, N=N, K=K, r=r, median_us=round(us, 2), gb_per_s=round(w_bytes / us / 1e3, 1),
                         ratio_to_byte_floor=round(us / floor_us, 3))
                d.update(extra or {})
                rows.append(d)
                return d

            add_us = time_one(lambda: W.add_(1.0), args.iters, flush)
            W.sub_(1.0)
            copy_us = time_one(lambda: W2.copy_(W), args.iters, flush)
            row("floor: read+write W at 3.35 TB/s", floor_us)
            row("W.add_(1)", add_us)
            row("W2.copy_(W)", copy_us)
            base = rows[-2]["median_us"]
            naive = time_pair(lambda: W.add_(s * (B @ A)), lambda _: W.sub_(s * (B @ A)), args.iters, flush)
            row("torch naive W += s*(B@A) (bf16)", naive[0])
            fp32 = time_pair(lambda: merge_ref(W, [A], [B], [s]), lambda _: merge_ref(W, [A], [B], [-s]), args.iters, flush)
            row("torch fp32-accurate merge (merge_ref)", fp32[0])
            W.copy_(W2)  # undo the drift of the non-exact round trips above
            for be in backends:
                m, u = time_pair(lambda: lk.merge_(W, A, B, s, backend=be), lambda _: lk.unmerge_(W, A, B, s, backend=be),
                                 args.iters, flush)
                row(f"{be} merge_", m)
                row(f"{be} unmerge_", u)
                W.copy_(W2)
                recs = []

                def exact_merge():
                    rec = lk.merge_exact_(W, A, B, s, backend=be)
                    recs.append(rec)
                    return rec

                m, u = time_pair(exact_merge, lambda rec: lk.unmerge_exact_(W, rec), args.iters, flush)
                rec = recs[-1]
                info = dict(repair_fraction=round(rec.repair_fraction, 6), repair_bytes=rec.repair_nbytes(),
                            snapshot_bytes=rec.adapter_nbytes())
                row(f"{be} merge_exact_ (syncs once)", m, info)
                row(f"{be} unmerge_exact_", u, info)
                assert torch.equal(W.view(torch.int16), W2.view(torch.int16)), "exact round trip failed"
            for d in rows:
                if d["N"] == N and d["K"] == K and d["r"] == r:
                    d["ratio_to_add_floor"] = round(d["median_us"] / base, 3)
    return dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        dtype="bfloat16",
        iters=args.iters,
        byte_floor_bandwidth_bytes_per_s=H100_BYTES_PER_S,
        rows=rows,
    )


def print_table(result: dict) -> None:
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}  ({result['date']})")
    hdr = f"{'shape':>12} {'r':>3}  {'what':<40} {'µs':>9} {'GB/s':>7} {'/floor':>7} {'/add_':>6}  repairs"
    print(hdr)
    print("-" * len(hdr))
    for d in result["rows"]:
        rep = f"{100 * d['repair_fraction']:.2f}%" if "repair_fraction" in d else ""
        print(f"{d['N']:>5}x{d['K']:<6} {d['r']:>3}  {d['name']:<40} {d['median_us']:>9.1f} {d['gb_per_s']:>7.0f} "
              f"{d['ratio_to_byte_floor']:>7.2f} {d.get('ratio_to_add_floor', float('nan')):>6.2f}  {rep}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--backends", nargs="+", default=["triton", "cuda"])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="only the 4096×4096 weight")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_merge: no CUDA GPU visible; nothing measured (run this on an H100/A100).")
        return 0
    result = run(args)
    print_table(result)
    out = args.out
    if out is None:
        out = os.path.join(os.environ["OUT"], "bench_merge.json") if os.environ.get("OUT") else str(
            Path(__file__).resolve().parent / "results" / "bench_merge.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
