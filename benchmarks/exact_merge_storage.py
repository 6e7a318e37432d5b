"""Side storage of the bit-exact merge (lora_kernels.merge_exact_): how many weights need a repair entry.

Not a timing benchmark: the size of the repair list depends only on the data (which merged values cannot be
undone by re-rounding), so it is measured on the CPU with the torch backend. The GPU kernels form Δ in fp32
with another summation order, which changes which elements land on a rounding boundary, not how many.

Weights W ~ N(0, w_std²); adapters scaled so that ‖ΔW‖_F / ‖W‖_F is the given ratio (realistic LoRA updates:
~0.7–7 %). For each (shape, rank, dtype, ratio) it reports the fraction of elements in the repair list, its
bytes as a fraction of W's bytes, and checks the round trip is bit-exact.

    python benchmarks/exact_merge_storage.py [--quick] [--out results/exact_merge_storage_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time

import torch

import lora_kernels as lk

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def adapter(N, K, r, ratio, w_std, dtype, gen):
    """A, B with ‖B·A‖_F ≈ ratio · w_std · sqrt(N·K) (the norm of W)."""
    a = torch.randn(r, K, generator=gen, dtype=torch.float32)
    b = torch.randn(N, r, generator=gen, dtype=torch.float32)
    target = ratio * w_std * math.sqrt(N * K)
    b *= target / (b @ a).norm().item()
    return a.to(dtype), b.to(dtype)


def measure(N, K, r, dtype, ratio, w_std=0.02, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=gen) * w_std).to(dtype)
    a, b = adapter(N, K, r, ratio, w_std, dtype, gen)
    w0 = w.clone()
    t = time.perf_counter()
    rec = lk.merge_exact_(w, a, b, 1.0, backend="torch", snapshot=False)
    lk.unmerge_exact_(w, rec)
    exact = bool(torch.equal(w.view(torch.int16), w0.view(torch.int16)))
    return dict(N=N, K=K, r=r, dtype=str(dtype).replace("torch.", ""), delta_ratio=ratio, w_std=w_std,
                repairs=rec.n_repairs, repair_fraction=rec.repair_fraction, repair_bytes=rec.repair_nbytes(),
                repair_bytes_vs_w=rec.repair_nbytes() / rec.weight_nbytes(), round_trip_bit_exact=exact,
                seconds=round(time.perf_counter() - t, 2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="only 4096x4096")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    print(f"{'W':>12} {'r':>3} {'dtype':>8} {'|dW|/|W|':>9} {'repairs':>9} {'% elems':>8} {'list B':>10} {'% of W':>7} exact")
    for N, K in shapes:
        for r in (16, 64):
            for dtype in (torch.bfloat16, torch.float16):
                for ratio in (0.007, 0.02, 0.07):
                    d = measure(N, K, r, dtype, ratio)
                    rows.append(d)
                    print(f"{N:>6}x{K:<5} {r:>3} {d['dtype']:>8} {100 * ratio:>8.1f}% {d['repairs']:>9} "
                          f"{100 * d['repair_fraction']:>7.2f}% {d['repair_bytes']:>10} {100 * d['repair_bytes_vs_w']:>6.2f}% "
                          f"{d['round_trip_bit_exact']}")
    out = dict(what="exact merge repair-list size (CPU, torch backend)", date=datetime.date.today().isoformat(),
               machine=platform.machine(), python=platform.python_version(), torch=torch.__version__,
               lora_kernels=getattr(lk, "__version__", "?"), rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print("wrote", args.out)
    return 0 if all(r["round_trip_bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
