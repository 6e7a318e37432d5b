"""Benchmark: a QLoRA layer (NF4 base with double-quantised absmax, bf16 activations and adapters), forward+backward.

Needs a CUDA GPU and bitsandbytes with its CUDA backend; on a machine without a GPU it prints a message and exits 0.
No figure from this script is quoted anywhere until it has run on a GPU (README, "Quantized base (QLoRA)").

Variants, on the same base and adapters (x [M, K] bf16, W0 [N, K] NF4 blocksize 64 + double quant, r = 16):

* ``floor``   — ``F.linear(x, W_bf16)`` with a bf16 copy of the dequantised weight (cuBLAS), backward dx only:
                the issue's target is QLoRA fwd+bwd <= 1.3x this;
* ``fused``   — ``lk.quant_lora_linear(..., strategy="fused")`` (dequantisation in the GEMM's operand load);
* ``scratch`` — ``strategy="scratch"`` (dequantise to a per-call bf16 buffer, then the 16-bit LoRA GEMMs);
* ``auto``    — the rule in ``triton/quant_linear.choose_strategy`` (what users get);
* ``peft``    — PEFT's ``peft.tuners.lora.bnb.Linear4bit`` over the same bitsandbytes ``Linear4bit`` (the
                issue's target: fused >= 2x faster than this).

Modes: ``fwd+bwd`` = forward then ``torch.autograd.grad`` w.r.t. (x, A, B) (x only for the floor). Per row: median
time (``triton.testing.do_bench``, L2 flushed), ratios to the floor and to PEFT, peak memory over one call minus what
was allocated before it. The M sweep (decode to prefill) is what ``FUSED_MAX_M`` (the auto rule's threshold) should
be set from: ``crossover`` in the JSON is the largest M at which ``fused`` beat ``scratch``.

    python benchmarks/bench_qlora.py [--quick] [--out FILE]

JSON goes to ``--out`` (default ``$OUT/bench_qlora.json`` when $OUT is set, else
``benchmarks/results/bench_qlora.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

SCALE = 2.0


def _default_out() -> str:
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], "bench_qlora.json")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_qlora.json")


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "bitsandbytes", "peft", "lora_kernels"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            out[mod] = None
    return out


def _timed(fn):
    from triton.testing import do_bench

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return ms * 1e3, peak


def run_case(M, K, N, r):
    import bitsandbytes as bnb

    import lora_kernels as lk
    from lora_kernels import quant as Q
    from lora_kernels.triton.quant_linear import choose_strategy

    dev = "cuda"
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit((torch.randn(N, K) * 0.02).to(torch.bfloat16), requires_grad=False,
                                    compress_statistics=True, quant_type="nf4")
    base = base.to(dev)
    qw = Q.from_module(base)
    w16 = Q.dequantize(qw, torch.bfloat16)  # only for the floor
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(r, K, device=dev) * 0.01).to(torch.bfloat16).requires_grad_(True)
    b = (torch.randn(N, r, device=dev) * 0.01).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)

    def ours(strategy):
        def step():
            y = lk.quant_lora_linear(x, qw, a, b, SCALE, strategy=strategy, backend="triton")
            torch.autograd.grad(y, (x, a, b), dy)
        return step

    def floor():
        y = torch.nn.functional.linear(x, w16)
        torch.autograd.grad(y, (x,), dy)

    variants = {"floor": floor, "fused": ours("fused"), "scratch": ours("scratch"), "auto": ours(None)}
    try:
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

        layer = PeftLinear4bit(base, "default", r=r, lora_alpha=SCALE * r, init_lora_weights=False)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
        layer.to(dev)
        pa, pb = layer.lora_A["default"].weight, layer.lora_B["default"].weight

        def peft_step():
            y = layer(x)
            torch.autograd.grad(y, (x, pa, pb), dy)

        variants["peft"] = peft_step
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        print(f"peft variant unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    rows = []
    for name, fn in variants.items():
        us, peak = _timed(fn)
        rows.append(dict(M=M, K=K, N=N, r=r, variant=name, median_us=us, peak_bytes=peak,
                         strategy=choose_strategy(None, M) if name == "auto" else None))
    t = {row["variant"]: row["median_us"] for row in rows}
    for row in rows:
        row["vs_floor"] = row["median_us"] / t["floor"]
        row["vs_peft"] = row["median_us"] / t["peft"] if "peft" in t else None
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="M in {16, 8192} only")
    p.add_argument("--out", default=_default_out())
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_qlora: no CUDA GPU here; nothing measured")
        return 0
    ms = (16, 8192) if args.quick else (1, 16, 64, 256, 1024, 2048, 8192)
    rows = []
    for M in ms:
        rows += run_case(M, 4096, 4096, 16)
        for row in rows[-6:]:
            if row["M"] == M:
                print(f"M={M:5d} {row['variant']:8s} {row['median_us']:10.1f} us  x floor {row['vs_floor']:.2f}  "
                      f"x peft {row['vs_peft'] if row['vs_peft'] is None else round(row['vs_peft'], 2)}  "
                      f"peak {row['peak_bytes'] / 2**20:.1f} MiB")
    by_m = {}
    for row in rows:
        by_m.setdefault(row["M"], {})[row["variant"]] = row["median_us"]
    wins = [m for m, t in by_m.items() if t["fused"] <= t["scratch"]]
    result = dict(benchmark="bench_qlora", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  device=torch.cuda.get_device_name(), versions=_versions(), rows=rows,
                  crossover=max(wins) if wins else None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"fused beats scratch up to M = {result['crossover']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
