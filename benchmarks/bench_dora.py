"""Benchmark (not a test): DoRA training step of one linear layer, lora_kernels vs PEFT's DoRA, same run.

CPU part (always): the torch backend, one torch thread, thread CPU time, variants interleaved per round (the order
rotated every round), fwd+bwd = forward in training mode, then ``torch.autograd.grad`` w.r.t. x and the adapter
parameters for a fixed dy. Variants:

* ``base``      — the frozen ``nn.Linear`` alone (forward + dx): the floor.
* ``lora``      — ``LoRALinear`` (plain LoRA, same A/B).
* ``dora``      — ``LoRALinear(use_dora=True)`` (grads to x, A, B, magnitude).
* ``peft_dora`` — PEFT 0.21's ``lora.Linear`` with ``use_dora=True`` (same W0, A, B, magnitude), train mode.

Cells: M tokens × K = N, rank r, dtype, LoRA dropout p (PEFT's ``nn.Dropout`` vs lora_kernels' hashed mask: same
distribution, different masks). Reported: median ms per step over the rounds, and per-round ratios to ``peft_dora``
(median, interquartile range).

Model part (``--llama-rounds N``): one AdamW training step of a tiny Llama (hidden 128, 2 layers, DoRA r = 8 on the
seven projections, batch 4 × 32) per sample: PEFT DoRA, PEFT DoRA after ``lora_kernels.peft.patch``, and
``inject_lora(use_dora=True)``, interleaved; every layer's code runs as it does in a model (a single-layer loop
times each call with its code and data cold).

GPU part (only when CUDA is available; not run on a CPU-only machine): bf16, M = 8192, K = N = 4096, r = 16, the
same four variants with ``backend="triton"``, CUDA-event timing (median of ``--gpu-iters`` steps after warm-up),
plus ``dora`` ÷ ``base`` (issue 15's target: ≤ 1.15) and ``peft_dora`` ÷ ``dora`` (target ≥ 2).

    python benchmarks/bench_dora.py [--M 512] [--K 1024] [--r 16] [--dtype fp32] [--dropout 0,0.1] [--rounds 15]
        [--md FILE] [--gpu-iters 50] [--llama-rounds 31]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
from typing import Callable, Dict, List

import torch
from torch import nn

from lora_kernels.benchmarking.core import interleaved, paired_ratios, versions
from lora_kernels.modules import LoRALinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALPHA_OVER_R = 2.0


def _layers(M: int, K: int, N: int, r: int, dtype, p: float, device: str, backend: str):
    """(x, dy, {variant: (module, params to differentiate)}) with the same W0, A, B and magnitude everywhere."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(K, N, bias=True).to(device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    peft_model = get_peft_model(nn.Sequential(nn.Linear(K, N, bias=True)).to(device=device, dtype=dtype),
                                LoraConfig(r=r, lora_alpha=ALPHA_OVER_R * r, target_modules=["0"], use_dora=True,
                                           lora_dropout=p, init_lora_weights=False),
                                autocast_adapter_dtype=False)
    peft = peft_model.base_model.model[0]
    with torch.no_grad():
        peft.base_layer.weight.copy_(base.weight)
        peft.base_layer.bias.copy_(base.bias)
        peft.lora_magnitude_vector["default"].weight.mul_(
            0.5 + torch.rand(N, device=device, dtype=torch.float32).to(dtype))
    peft.train()
    a = peft.lora_A["default"].weight
    b = peft.lora_B["default"].weight
    m = peft.lora_magnitude_vector["default"].weight
    lora = LoRALinear(base, r, ALPHA_OVER_R * r, dropout=p, backend=backend)
    dora = LoRALinear(base, r, ALPHA_OVER_R * r, dropout=p, backend=backend, use_dora=True)
    with torch.no_grad():
        for layer in (lora, dora):
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        dora.lora_magnitude.copy_(m)
    lora.train()
    dora.train()
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(M, N, generator=g).to(device=device, dtype=dtype)
    variants = {
        "base": (base, []),
        "lora": (lora, [lora.lora_A, lora.lora_B]),
        "dora": (dora, [dora.lora_A, dora.lora_B, dora.lora_magnitude]),
        "peft_dora": (peft, [a, b, m]),
    }
    return x, dy, variants


def _step(mod, params, x, dy) -> Callable[[], object]:
    def run():
        y = mod(x)
        return torch.autograd.grad(y, [x, *params], dy)

    return run


def _quartiles(v: List[float]):
    q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3
    return q[0], statistics.median(v), q[2]


def cpu_cells(Ms, K, r, dtype_name, dropouts, rounds) -> List[dict]:
    torch.set_num_threads(1)
    out = []
    for M in Ms:
        for p in dropouts:
            x, dy, variants = _layers(M, K, K, r, DTYPES[dtype_name], p, "cpu", "torch")
            fns = {k: _step(mod, params, x, dy) for k, (mod, params) in variants.items()}
            samples = interleaved(fns, rounds=rounds, warmup=2, target_s=1e-3)
            cell = {"M": M, "K": K, "N": K, "r": r, "dtype": dtype_name, "dropout": p, "samples_us": samples}
            cell["median_ms"] = {k: statistics.median(v) / 1e3 for k, v in samples.items()}
            cell["ratio_to_peft_dora"] = {k: _quartiles(paired_ratios(samples[k], samples["peft_dora"]))
                                          for k in samples if k != "peft_dora"}
            out.append(cell)
            print(_cell_line(cell), flush=True)
    return out


def _cell_line(cell) -> str:
    med = cell["median_ms"]
    rat = cell["ratio_to_peft_dora"]
    parts = [f"M={cell['M']} K=N={cell['K']} r={cell['r']} {cell['dtype']} p={cell['dropout']}:"]
    for k in ("base", "lora", "dora", "peft_dora"):
        s = f"{k} {med[k]:.2f} ms"
        if k in rat:
            lo, mid, hi = rat[k]
            s += f" ({mid:.2f}x peft_dora, IQR {lo:.2f}-{hi:.2f})"
        parts.append(s)
    return "  ".join(parts)


def _llama_dora_models(dropout: float, backend: str):
    """Tiny Llama (hidden 128, 2 layers; lora_kernels.benchmarking.e2e's "llama-tiny") with DoRA on the seven
    projections: PEFT DoRA, PEFT DoRA patched by ``lora_kernels.peft.patch``, and ``inject_lora(use_dora=True)``;
    same W0, A, B (non-zero B) and magnitude (‖W0‖ per row, both libraries' init) everywhere."""
    import copy

    import lora_kernels
    import lora_kernels.peft
    from lora_kernels.benchmarking import e2e
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    base, cfg = e2e._build_base("llama-tiny", None, 32, "cpu", torch.float32)
    _, _, _, r, alpha = e2e._PRESETS["llama-tiny"]
    init = e2e._lora_init(base, r)
    models = {}
    for variant in ("peft_dora", "peft_dora+patch"):
        m = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                           target_modules=e2e.TARGETS, use_dora=True))
        with torch.no_grad():
            for n, mod in m.named_modules():
                if isinstance(mod, LoraLayer):
                    a, b = init[n[len("base_model.model."):]]
                    mod.lora_A["default"].weight.copy_(a)
                    mod.lora_B["default"].weight.copy_(b)
        if variant.endswith("+patch"):
            lora_kernels.peft.patch(m, backend=backend, verbose=False)
        models[variant] = m
    m = copy.deepcopy(base)
    lora_kernels.inject_lora(m, e2e.TARGETS, r=r, alpha=alpha, dropout=dropout, backend=backend, use_dora=True)
    with torch.no_grad():
        for n, mod in m.named_modules():
            if isinstance(mod, lora_kernels.LoRALinear):
                mod.lora_A.copy_(init[n][0])
                mod.lora_B.copy_(init[n][1])
    models["dora"] = m
    return models, cfg


def llama_cells(dropouts, rounds: int, batch: int = 4, seq: int = 32) -> List[dict]:
    """One AdamW training step of the tiny Llama with DoRA adapters per sample (one thread, thread CPU time, variants
    interleaved): every layer's Python and kernels run as in a model, not one layer in a loop."""
    from lora_kernels.benchmarking import e2e

    torch.set_num_threads(1)
    out = []
    for p in dropouts:
        models, cfg = _llama_dora_models(p, "torch")
        fns = {}
        for name, m in models.items():
            m.train()
            opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
            inputs = e2e._inputs("llama-tiny", cfg, batch, seq, "cpu", torch.float32, 0)

            def step(m=m, opt=opt, inputs=inputs):
                opt.zero_grad(set_to_none=True)
                m(**inputs).loss.backward()
                opt.step()

            fns[name] = step
        samples = interleaved(fns, rounds=rounds, warmup=2, target_s=0.0)
        cell = {"model": "llama-tiny", "batch": batch, "seq": seq, "dropout": p, "samples_us": samples,
                "median_ms": {k: statistics.median(v) / 1e3 for k, v in samples.items()},
                "ratio_to_peft_dora": {k: _quartiles(paired_ratios(samples[k], samples["peft_dora"]))
                                       for k in samples if k != "peft_dora"}}
        med, rat = cell["median_ms"], cell["ratio_to_peft_dora"]
        print(f"llama-tiny DoRA step p={p}: " + "  ".join(
            f"{k} {med[k]:.2f} ms" + (f" ({rat[k][1]:.2f}x peft_dora, IQR {rat[k][0]:.2f}-{rat[k][2]:.2f})"
                                      if k in rat else "") for k in med), flush=True)
        out.append(cell)
    return out


def gpu_cells(iters: int) -> List[dict]:
    """bf16, M = 8192, K = N = 4096, r = 16 on the GPU (Triton backend), CUDA-event timing."""
    M, K, r = 8192, 4096, 16
    x, dy, variants = _layers(M, K, K, r, torch.bfloat16, 0.0, "cuda", "triton")
    res = {}
    for k, (mod, params) in variants.items():
        fn = _step(mod, params, x, dy)
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        res[k] = statistics.median(times)
    cell = {"M": M, "K": K, "N": K, "r": r, "dtype": "bf16", "median_ms": res, "device": torch.cuda.get_device_name(),
            "dora_over_base": res["dora"] / res["base"], "peft_dora_over_dora": res["peft_dora"] / res["dora"]}
    print(f"GPU {cell['device']}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in res.items())
          + f"; dora/base {cell['dora_over_base']:.2f}, peft_dora/dora {cell['peft_dora_over_dora']:.2f}")
    return [cell]


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def markdown(cells, gpu, argv, llama=()) -> str:
    v = versions("peft", "transformers")
    lines = [f"# DoRA layer fwd+bwd: lora_kernels vs PEFT DoRA ({datetime.date.today()})", "",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
             f"thread CPU time, variants interleaved per round. Versions: "
             + ", ".join(f"{k} {val}" for k, val in v.items() if val) + f"; git {_git()}.",
             f"Command: `python benchmarks/bench_dora.py {' '.join(argv)}`", "",
             "| cell | base (nn.Linear) ms | LoRA ms | DoRA ms | PEFT DoRA ms | DoRA ÷ PEFT DoRA (IQR) | DoRA ÷ base |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        med, rat = c["median_ms"], c["ratio_to_peft_dora"]
        lo, mid, hi = rat["dora"]
        lines.append(f"| M={c['M']} K=N={c['K']} r={c['r']} {c['dtype']} p={c['dropout']} | {med['base']:.2f} | "
                     f"{med['lora']:.2f} | {med['dora']:.2f} | {med['peft_dora']:.2f} | {mid:.2f} ({lo:.2f}–{hi:.2f}) | "
                     f"{med['dora'] / med['base']:.2f} |")
    lines.append("")
    if llama:
        lines += ["Tiny Llama (hidden 128, 2 layers, DoRA r = 8 on the seven projections, batch 4 × 32 tokens, one AdamW "
                  "step per sample):", "",
                  "| dropout | PEFT DoRA ms | PEFT DoRA + patch ms (÷ PEFT DoRA, IQR) | inject_lora(use_dora) ms (÷ PEFT DoRA, IQR) |",
                  "|---|---|---|---|"]
        for c in llama:
            med, rat = c["median_ms"], c["ratio_to_peft_dora"]
            cols = [f"{med[k]:.2f} ({rat[k][1]:.2f}, {rat[k][0]:.2f}–{rat[k][2]:.2f})" for k in ("peft_dora+patch", "dora")]
            lines.append(f"| {c['dropout']} | {med['peft_dora']:.2f} | {cols[0]} | {cols[1]} |")
        lines.append("")
    if gpu:
        for c in gpu:
            lines.append(f"GPU ({c['device']}), bf16 M={c['M']} K=N={c['K']} r={c['r']}: "
                         + ", ".join(f"{k} {val:.3f} ms" for k, val in c["median_ms"].items())
                         + f"; DoRA ÷ base {c['dora_over_base']:.2f}, PEFT DoRA ÷ DoRA {c['peft_dora_over_dora']:.2f}")
    else:
        lines.append("GPU part not run (no CUDA device).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="512")
    ap.add_argument("--K", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--dropout", default="0,0.1")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--gpu-iters", type=int, default=50)
    ap.add_argument("--md", default=None)
    ap.add_argument("--llama-rounds", type=int, default=0, help="also the tiny-Llama DoRA step, this many rounds")
    a = ap.parse_args(argv)
    dropouts = [float(p) for p in a.dropout.split(",")]
    cells = cpu_cells([int(m) for m in a.M.split(",")], a.K, a.r, a.dtype, dropouts, a.rounds)
    llama = llama_cells(dropouts, a.llama_rounds) if a.llama_rounds > 0 else []
    gpu = gpu_cells(a.gpu_iters) if torch.cuda.is_available() else []
    md = markdown(cells, gpu, argv, llama)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
