"""Benchmark: one LoRA linear layer (``lora_kernels.lora_linear``), forward and forward+backward, bf16.

Shapes: M tokens ∈ {512, 2048, 8192} × (K, N) ∈ {(4096, 4096), (4096, 14336), (14336, 4096)} × rank r ∈ {16, 64}
× LoRA dropout p ∈ {0, 0.1}; no bias; scale 2.0; W0 frozen; x, A, B require grad.

Variants (all on the same tensors):

* ``floor``  — the frozen-base ``torch.nn.functional.linear(x, W0)`` (cuBLAS); its backward computes dx only.
               Every ratio ``vs_floor`` divides by this variant's time in the same mode.
* ``torch``  — ``lora_linear(..., backend="torch")`` (the reference path: unfused PyTorch ops);
* ``triton`` — ``lora_linear(..., backend="triton")``;
* ``cuda``   — ``lora_linear(..., backend="cuda")`` when ``lora_kernels.resolve_backend`` allows it;
* ``peft``   — PEFT's LoRA ``Linear`` (``get_peft_model`` on a one-layer module, same W0/A/B/scale), when peft
               imports. Its dropout draws its own mask, so its output is compared only at p = 0.

Modes: ``fwd`` = one forward with autograd recording (training forward); ``fwd+bwd`` = forward then
``torch.autograd.grad`` w.r.t. (x, A, B) (x only for the floor). Reported per row: median time from
``triton.testing.do_bench`` (L2 flushed between repetitions, after a warm-up that also runs Triton's autotuner),
achieved TFLOP/s of the useful work (base GEMM + LoRA products) and its fraction of H100 dense bf16 (989 TFLOP/s),
ratio to the floor and to PEFT, the peak memory delta (``torch.cuda.max_memory_allocated`` over one call, minus what
was allocated before it), and the output's relative error vs an fp32 reference (same dropout seed).

    python benchmarks/bench_lora_linear.py [--quick] [--out FILE] [--variants floor,torch,triton,cuda,peft]

JSON goes to ``--out`` (default ``$OUT/bench_lora_linear.json`` when $OUT is set, else
``benchmarks/results/bench_lora_linear.json``). On a machine without a CUDA GPU it prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

from lora_kernels.benchmarking.core import make_timer, versions

ALL_VARIANTS = ("floor", "torch", "triton", "cuda", "peft")
MODES = ("fwd", "fwd+bwd")
H100_BF16_TFLOPS = 989.0
SCALE = 2.0
SEED = 1234


def _default_out() -> str:
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], "bench_lora_linear.json")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_lora_linear.json")


def build_cases(quick: bool) -> List[dict]:
    """(M, K, N, r, p) grid; --quick keeps a representative subset."""
    if quick:
        grid = [(2048, 4096, 4096, 16, p) for p in (0.0, 0.1)]
        grid += [(8192, 4096, 4096, 16, p) for p in (0.0, 0.1)]
        grid += [(8192, 4096, 14336, 64, 0.0)]
    else:
        grid = [
            (M, K, N, r, p)
            for M in (512, 2048, 8192)
            for (K, N) in ((4096, 4096), (4096, 14336), (14336, 4096))
            for r in (16, 64)
            for p in (0.0, 0.1)
        ]
    return [dict(M=M, K=K, N=N, r=r, p=p) for M, K, N, r, p in grid]


def useful_flops(M: int, K: int, N: int, r: int, mode: str, lora: bool) -> float:
    """2·(multiply-adds) of the work each variant must do (the floor: base GEMM only)."""
    fwd = 2.0 * M * K * N + (2.0 * M * K * r + 2.0 * M * r * N if lora else 0.0)
    if mode == "fwd":
        return fwd
    # backward: dx = dy·W0 (+ dxa = dy·B, dB = dyᵀ·xa, dA = dxaᵀ·x, dx += dxa·A)
    bwd = 2.0 * M * N * K + (4.0 * M * N * r + 4.0 * M * r * K if lora else 0.0)
    return fwd + bwd


def _timer():
    return make_timer("cuda")


def _peak_mem_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak allocated bytes during one call of fn, above what was allocated before it (None off CUDA)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _make_peft_layer(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, p: float):
    """PEFT LoRA Linear wrapping nn.Linear(K, N) with W0 = W, lora_A = A, lora_B = B, scaling = SCALE; or a reason."""
    try:
        import peft
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import Linear as PeftLoraLinear
    except Exception as e:  # noqa: BLE001 - any import problem means "no PEFT row"
        return None, f"peft unavailable ({type(e).__name__}: {e})"
    N, K = W.shape
    r = A.shape[0]

    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(K, N, bias=False)

        def forward(self, x):
            return self.proj(x)

    cfg = LoraConfig(r=r, lora_alpha=SCALE * r, lora_dropout=p, target_modules=["proj"], bias="none")
    model = get_peft_model(OneLayer(), cfg).to(device=W.device, dtype=W.dtype)
    model.train()
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    if len(layers) != 1:
        return None, f"peft {peft.__version__}: expected one LoRA Linear, found {len(layers)}"
    layer = layers[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(W)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)  # non-zero B: never time a zero adapter
    if abs(float(layer.scaling["default"]) - SCALE) > 1e-6:
        return None, f"peft scaling {layer.scaling['default']} != {SCALE}"
    return layer, ""


def run_case(case: dict, variants, timer, device_peak: Optional[float], device: str = "cuda", dtype=torch.bfloat16) -> List[dict]:
    """Time every variant on one (M, K, N, r, p) case; returns one row per (variant, mode)."""
    import lora_kernels
    from lora_kernels import reference as ref

    M, K, N, r, p = case["M"], case["K"], case["N"], case["r"], case["p"]
    dt, dev = dtype, device
    gen = torch.Generator(device=dev).manual_seed(M * 7 + K + N + r)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * scale).to(dt)

    x = rnd(M, K).requires_grad_(True)
    W = rnd(N, K, scale=K**-0.5)  # frozen
    A = rnd(r, K, scale=K**-0.5).requires_grad_(True)
    B = rnd(N, r, scale=0.1).requires_grad_(True)
    dy = rnd(M, N)
    with torch.no_grad():
        y_ref = ref.lora_linear_ref(x.float(), W.float(), A.float(), B.float(), SCALE, None, p, SEED)

    # variant -> (forward thunk returning y, inputs for autograd.grad, note)
    fns: Dict[str, tuple] = {}
    notes: Dict[str, str] = {}
    for v in variants:
        if v == "floor":
            fns[v] = (lambda: torch.nn.functional.linear(x, W), [x])
        elif v in ("torch", "triton", "cuda"):
            try:
                be = lora_kernels.resolve_backend("lora_linear", x, W, A, B, backend=v)
            except Exception as e:  # noqa: BLE001 - BackendUnavailableError or a failed extension load
                notes[v] = f"skipped: {e}"
                continue
            fns[v] = (
                (lambda be=be: lora_kernels.lora_linear(x, W, A, B, SCALE, None, dropout_p=p, seed=SEED, backend=be)),
                [x, A, B],
            )
        elif v == "peft":
            layer, why = _make_peft_layer(W, A.detach(), B.detach(), p)
            if layer is None:
                notes[v] = f"skipped: {why}"
                continue
            pa, pb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            fns[v] = ((lambda layer=layer: layer(x)), [x, pa, pb])

    rows: List[dict] = []
    for v in variants:
        if v not in fns:
            rows.append(dict(case, variant=v, mode="-", median_us=None, note=notes.get(v, "")))
            continue
        fwd, inputs = fns[v]

        def step(fwd=fwd, inputs=inputs):
            y = fwd()
            return torch.autograd.grad(y, inputs, dy)

        err = None
        try:
            with torch.no_grad():
                y = fwd()
            if v != "floor" and not (v == "peft" and p > 0):
                err = _rel_err(y, y_ref)
            del y
            for mode, fn in (("fwd", fwd), ("fwd+bwd", step)):
                fn()  # warm-up (Triton autotuning, extension kernels' first launch)
                if dev == "cuda":
                    torch.cuda.synchronize()
                us = timer(fn)
                mem = _peak_mem_bytes(fn)
                flops = useful_flops(M, K, N, r, mode, lora=(v != "floor"))
                tflops = flops / (us * 1e-6) / 1e12
                rows.append(
                    dict(
                        case,
                        variant=v,
                        mode=mode,
                        median_us=us,
                        tflops=tflops,
                        pct_of_h100_peak=100.0 * tflops / H100_BF16_TFLOPS,
                        pct_of_device_peak=(100.0 * tflops / device_peak) if device_peak else None,
                        peak_mem_mib=None if mem is None else mem / 2**20,
                        rel_err_vs_fp32_ref=err,
                        note=notes.get(v, ""),
                    )
                )
        except Exception as e:  # noqa: BLE001 - report the failure in the table, keep benchmarking
            rows.append(dict(case, variant=v, mode="-", median_us=None, note=f"failed: {type(e).__name__}: {e}"))
        if dev == "cuda":
            torch.cuda.empty_cache()

    # ratios within the case: to the floor and to PEFT, per mode
    for mode in MODES:
        base = {row["variant"]: row["median_us"] for row in rows if row["mode"] == mode and row["median_us"]}
        for row in rows:
            if row["mode"] != mode or not row["median_us"]:
                continue
            row["vs_floor"] = row["median_us"] / base["floor"] if "floor" in base else None
            row["vs_peft"] = row["median_us"] / base["peft"] if "peft" in base else None
    return rows


def _fmt(v, spec):
    if v is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width) if width else 1)
    return format(v, spec)


def print_table(rows: List[dict]) -> None:
    hdr = f"{'M':>5} {'K':>6} {'N':>6} {'r':>3} {'p':>4} {'variant':>7} {'mode':>8} {'µs':>9} {'TFLOP/s':>8} {'%989':>5} " \
          f"{'×floor':>7} {'×peft':>6} {'mem MiB':>8} {'rel err':>8}  note"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['M']:>5} {r['K']:>6} {r['N']:>6} {r['r']:>3} {r['p']:>4.2f} {r['variant']:>7} {r['mode']:>8} "
            f"{_fmt(r.get('median_us'), '9.1f')} {_fmt(r.get('tflops'), '8.1f')} {_fmt(r.get('pct_of_h100_peak'), '5.1f')} "
            f"{_fmt(r.get('vs_floor'), '7.3f')} {_fmt(r.get('vs_peft'), '6.3f')} {_fmt(r.get('peak_mem_mib'), '8.1f')} "
            f"{_fmt(r.get('rel_err_vs_fp32_ref'), '8.1e')}  {r.get('note', '')}"
        )


def _versions() -> dict:
    return versions("peft")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a representative subset of the grid")
    ap.add_argument("--out", default=None, help="JSON output path (default: $OUT/bench_lora_linear.json or benchmarks/results/)")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma-separated subset of {ALL_VARIANTS}")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ALL_VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {ALL_VARIANTS}")
    if "floor" not in variants:
        variants.insert(0, "floor")  # every ratio needs it

    if not torch.cuda.is_available():
        print("bench_lora_linear: no CUDA GPU visible to torch; this benchmark times bf16 GPU kernels. Nothing to do.")
        return 0

    device_name = torch.cuda.get_device_name()
    device_peak = 989.0 if ("H100" in device_name or "H200" in device_name) else (312.0 if "A100" in device_name else None)
    timer = _timer()
    cases = build_cases(args.quick)
    print(f"bench_lora_linear on {device_name}: {len(cases)} cases × variants {variants}, bf16, scale {SCALE}", flush=True)
    rows: List[dict] = []
    for case in cases:
        case_rows = run_case(case, variants, timer, device_peak)
        rows.extend(case_rows)
        print_table(case_rows)
        print(flush=True)

    result = {
        "benchmark": "lora_linear",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "device_peak_bf16_tflops": device_peak,
        "h100_peak_bf16_tflops": H100_BF16_TFLOPS,
        "versions": _versions(),
        "dtype": "bfloat16",
        "scale": SCALE,
        "quick": args.quick,
        "variants": variants,
        "timing": "triton.testing.do_bench median (L2 flushed), after warm-up/autotune",
        "rows": rows,
    }
    out = args.out or _default_out()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("all cases:")
    print_table(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
