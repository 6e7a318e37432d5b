"""``lora-kernels`` command line (also ``python -m lora_kernels``).

    lora-kernels info                      versions, GPU, which backends are available and why not
    lora-kernels bench [--full] [--json F] time every available backend on the core ops (on the CPU: the floor and
                                           the backends interleaved, min/median/max, noise flagged)
    lora-kernels bench --model llama-tiny  end-to-end training-step throughput / VRAM vs PEFT
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional


def _info() -> int:
    import torch

    import lora_kernels as lk

    print(f"lora_kernels {lk.__version__}  (python {platform.python_version()}, {platform.machine()})")
    print(f"torch        {torch.__version__}  (CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton

        print(f"triton       {triton.__version__}")
    except ImportError:
        print("triton       not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"GPU {i}        {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("GPU          none visible to torch")
    env = {k: v for k, v in os.environ.items() if k.startswith("LORA_KERNELS_") or k == "TRITON_INTERPRET"}
    if env:
        print("environment  " + ", ".join(f"{k}={v}" for k, v in sorted(env.items())))
    print("backends:")
    for name, status in lk.backend_report().items():
        print(f"  {name:<7} {status}")
    return 0


def _bench(args) -> int:
    if args.model:
        try:
            from .benchmarking.e2e import run_model_bench
        except ImportError as e:
            print(f"lora-kernels bench --model needs the interop extras (pip install lora_kernels[interop]): {e}", file=sys.stderr)
            return 2
        kwargs = dict(model=args.model, device=args.device, out_json=args.json, out_png=args.png)
        if args.steps:
            kwargs["steps"] = args.steps
        run_model_bench(**kwargs)
        return 0
    from .benchmarking import core

    out = args.json
    if out is None:
        base = os.environ.get("OUT") or "."
        out = os.path.join(base, "lora_kernels_bench.json")
    core.run(device=args.device, full=args.full, backends=args.backends, out_json=out, progress=not args.no_progress,
             rounds=args.rounds, threads=args.threads)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="lora-kernels", description="Fused LoRA kernels for PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, GPU and backend availability")
    b = sub.add_parser("bench", help="time every available backend on the core ops (or a model with --model)")
    b.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    b.add_argument("--full", action="store_true", help="the full shape grid (slower)")
    b.add_argument("--backends", nargs="+", choices=["cuda", "triton", "torch"], default=None,
                   help="default: all on CUDA, torch only on the CPU")
    b.add_argument("--json", default=None, help="where to write JSON (default $OUT/ or ./lora_kernels_bench.json)")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--rounds", type=int, default=None,
                   help="CPU: interleaved timing rounds per case (default 15, 25 with --full)")
    b.add_argument("--threads", type=int, default=None,
                   help="CPU: intra-op threads while timing (default 1, timed with thread CPU time)")
    b.add_argument("--model", choices=["llama-tiny", "llama-7b-layer"], default=None,
                   help="end-to-end training-step benchmark vs PEFT instead of op-level")
    b.add_argument("--steps", type=int, default=None, help="--model: timed steps")
    b.add_argument("--png", default=None, help="--model: where to write the plot")
    args = p.parse_args(argv)
    if args.cmd == "info":
        return _info()
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
