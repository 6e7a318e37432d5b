"""Benchmark (not a test): the ``torch`` backend vs PEFT on the CPU, one thread, interleaved, thread CPU time.

Two parts, each printing ours ÷ PEFT as the median of per-round ratios with its spread:

* **layer** — one LoRA linear layer, K = N = 1024, r = 16, no bias, scale 2, for fp32 and bf16 (adapters in the
  same dtype as the base: PEFT with ``autocast_adapter_dtype=False``), LoRA dropout 0 and 0.1, modes ``fwd`` (a
  training forward: x, A, B require grad) and ``fwd+bwd`` (forward, then ``torch.autograd.grad`` w.r.t. x, A, B
  for a fixed dy), M = 256 / 1024 / 2048 tokens. Variants: ``peft`` (PEFT's ``lora.Linear`` in train mode) and
  ``ours`` (``lora_kernels.LoRALinear`` wrapping the same ``nn.Linear``, same A/B, ``backend`` as given; seeds drawn
  per call). Every round runs each variant once (order alternating); ``--rounds`` rounds per cell.
* **llama** — the tiny-Llama LoRA training step of ``lora-kernels bench --model llama-tiny`` (hidden 128, 2 layers,
  q/k/v/o/gate/up/down adapted, r = 8, α = 16, batch 4 × seq 32, fp32 on the CPU, AdamW), variants ``peft``,
  ``peft+patch`` (``lora_kernels.peft.patch``) and ``inject_lora``, dropout 0 and 0.1; each round runs one step of
  every variant (order rotated), thread CPU time per step.
* **dropout** (not in the default parts) — what LoRA dropout costs per layer at the tiny-Llama's sizes, ours split
  into the mask hash and the rest (see :func:`dropout_cell`).
* **overhead** — the fixed per-call cost at a tiny shape (M=4, K=N=16, r=4): one fwd+bwd of ``nn.Linear``, of
  PEFT's layer, of a patched PEFT layer, of ``LoRALinear`` and of ``lora_kernels.lora_linear`` (``backend`` as
  given, plus the patched layer and ``LoRALinear`` with the default ``backend=None``, i.e. the auto choice made
  on every call); each minus ``nn.Linear``'s is that path's per-layer overhead.

    python benchmarks/bench_cpu.py [--parts layer,llama,overhead] [--rounds 9] [--dtypes fp32,bf16]
        [--M 256,1024,2048] [--backend torch] [--out benchmarks/results/cpu_<date>.json] [--md FILE]

Writes JSON (every sample) and a markdown table. Timing figures depend on the machine: the JSON records it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from lora_kernels.benchmarking.core import Stats, interleaved, paired_ratios, thread_time_s, versions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
K = N = 1024
R = 16
SCALE = 2.0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _peft_layer(base: nn.Linear, A: torch.Tensor, B: torch.Tensor, p: float, dtype):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as PeftLoraLinear

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    cfg = LoraConfig(r=A.shape[0], lora_alpha=SCALE * A.shape[0], lora_dropout=p, target_modules=["proj"], bias="none")
    model = get_peft_model(One(), cfg, autocast_adapter_dtype=False).to(dtype)
    model.train()
    layer = next(m for m in model.modules() if isinstance(m, PeftLoraLinear))
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    assert abs(float(layer.scaling["default"]) - SCALE) < 1e-9
    assert layer.lora_A["default"].weight.dtype == dtype
    return layer


def layer_cell(dtype, p: float, M: int, backend: Optional[str], rounds: int, max_s: Optional[float] = None) -> Dict[str, dict]:
    """Both modes of one (dtype, p, M) cell: {mode: {variant: samples µs, ...}}."""
    import lora_kernels as lk

    g = torch.Generator().manual_seed(M + int(p * 100))
    base = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(N, K, generator=g) / K**0.5)
    base = base.to(dtype).requires_grad_(False)
    A = (torch.randn(R, K, generator=g) / K**0.5).to(dtype)
    B = (torch.randn(N, R, generator=g) * 0.1).to(dtype)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(M, N, generator=g).to(dtype)

    peft_layer = _peft_layer(base, A, B, p, dtype)
    ours = lk.LoRALinear(base, r=R, alpha=SCALE * R, dropout=p, backend=backend)
    with torch.no_grad():
        ours.lora_A.copy_(A)
        ours.lora_B.copy_(B)
    ours.train()
    assert ours.weight is peft_layer.base_layer.weight  # the very same frozen W0
    pa, pb = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight

    if p == 0.0:  # same math: check the two outputs agree before timing them
        with torch.no_grad():
            err = float((ours(x).float() - peft_layer(x).float()).norm() / peft_layer(x).float().norm())
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), f"ours vs peft output mismatch {err:.2e}"

    fns = {
        "fwd": {"peft": lambda: peft_layer(x), "ours": lambda: ours(x)},
        "fwd+bwd": {
            "peft": lambda: torch.autograd.grad(peft_layer(x), (x, pa, pb), dy),
            "ours": lambda: torch.autograd.grad(ours(x), (x, ours.lora_A, ours.lora_B), dy),
        },
    }
    out = {}
    for mode, f in fns.items():
        out[mode] = interleaved(f, rounds=rounds, warmup=1, target_s=0.0, max_s=max_s)
    return out


def _llama_variants(dropout: float, backend: Optional[str]):
    from lora_kernels.benchmarking import e2e

    base, cfg = e2e._build_base("llama-tiny", None, 32, "cpu", torch.float32)
    _, _, _, r, alpha = e2e._PRESETS["llama-tiny"]
    init = e2e._lora_init(base, r)
    models = {v: e2e._make_variant(v, base, "cpu", r, alpha, dropout, backend, init) for v in ("peft", "peft+patch", "inject_lora")}
    return models, cfg


def llama_cell(dropout: float, backend: Optional[str], rounds: int, batch: int = 4, seq: int = 32) -> Dict[str, List[float]]:
    from lora_kernels.benchmarking import e2e

    models, cfg = _llama_variants(dropout, backend)
    fns = {}
    for name, m in models.items():
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        inputs = e2e._inputs("llama-tiny", cfg, batch, seq, "cpu", torch.float32, 0)

        def step(m=m, opt=opt, inputs=inputs):
            opt.zero_grad(set_to_none=True)
            loss = m(**inputs).loss
            loss.backward()
            opt.step()

        fns[name] = step
    return interleaved(fns, rounds=rounds, warmup=2, target_s=0.0)


def overhead_cell(rounds: int, backend: Optional[str]) -> Dict[str, List[float]]:
    """Per-call fwd+bwd µs at a tiny shape, where fixed costs dominate."""
    import lora_kernels as lk
    import lora_kernels.peft as lkp
    from peft import LoraConfig, get_peft_model

    k = n = 16
    torch.manual_seed(0)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(k, n)

        def forward(self, x):
            return self.lin(x)

    lin = nn.Linear(k, n).requires_grad_(False)
    cfg = dict(target_modules=["lin"], r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    peft_m = get_peft_model(One(), LoraConfig(**cfg))
    patched = get_peft_model(One(), LoraConfig(**cfg))
    lkp.patch(patched, backend=backend, verbose=False)
    patched_auto = get_peft_model(One(), LoraConfig(**cfg))
    lkp.patch(patched_auto, backend=None, verbose=False)
    ours = lk.LoRALinear(nn.Linear(k, n), r=4, alpha=8, backend=backend)
    ours.bias.requires_grad_(False)  # frozen like PEFT's base bias (mark_only_lora_as_trainable does this)
    ours_auto = lk.LoRALinear(nn.Linear(k, n), r=4, alpha=8, backend=None)
    ours_auto.bias.requires_grad_(False)
    A = torch.randn(4, k, requires_grad=True)
    B = torch.randn(n, 4, requires_grad=True)
    x = torch.randn(4, k, requires_grad=True)
    dy = torch.randn(4, n)

    def fb(f, params):
        return lambda: torch.autograd.grad(f(x), (x, *params), dy)

    fns = {
        "nn.Linear": fb(lin, ()),
        "peft": fb(peft_m.base_model.model.lin, (peft_m.base_model.model.lin.lora_A["default"].weight,)),
        "peft+patch": fb(patched.base_model.model.lin, (patched.base_model.model.lin.lora_A["default"].weight,)),
        "LoRALinear": fb(ours, (ours.lora_A,)),
        "lk.lora_linear": fb(lambda t: lk.lora_linear(t, lin.weight, A, B, 2.0, lin.bias, backend=backend), (A,)),
    }
    if backend is not None:  # the default (backend=None): resolve_backend runs its auto choice on every call
        fns["peft+patch (auto)"] = fb(patched_auto.base_model.model.lin,
                                      (patched_auto.base_model.model.lin.lora_A["default"].weight,))
        fns["LoRALinear (auto)"] = fb(ours_auto, (ours_auto.lora_A,))
    return interleaved(fns, rounds=rounds, warmup=3, target_s=2e-2)


def dropout_cell(K_: int, N_: int, rounds: int, M: int = 128, r: int = 8) -> Dict[str, List[float]]:
    """What dropout costs per layer at the tiny-Llama's sizes (M = 4·32 tokens, fp32, r = 8): fwd+bwd of PEFT's layer
    and of LoRALinear at p = 0 and 0.1, of LoRALinear at 0.1 with the mask hash replaced by a precomputed mask (the
    rest of our dropout path), and of F.dropout alone (PEFT's dropout, forward + backward)."""
    import lora_kernels as lk
    from lora_kernels.ops import lora_linear as opl

    g = torch.Generator().manual_seed(K_ + N_)
    base = nn.Linear(K_, N_, bias=False).requires_grad_(False)
    A = torch.randn(r, K_, generator=g) / K_**0.5
    B = torch.randn(N_, r, generator=g) * 0.01
    layers = {}
    for p in (0.0, 0.1):
        pl = _peft_layer(base, A, B, p, torch.float32)
        ours = lk.LoRALinear(base, r=r, alpha=2.0 * r, dropout=p, backend="torch").train()
        with torch.no_grad():
            ours.lora_A.copy_(A)
            ours.lora_B.copy_(B)
        layers[p] = (pl, ours)
    x = torch.randn(4, M // 4, K_, generator=g, requires_grad=True)
    dy = torch.randn(4, M // 4, N_, generator=g)
    dx_like = torch.randn(4, M // 4, K_, generator=g)
    keep = opl.call_dropout_keep(x.detach().reshape(-1, K_), 0.1, 5)
    real = opl.call_dropout_keep

    def peft_step(p):
        pl = layers[p][0]
        return lambda: torch.autograd.grad(pl(x), (x, pl.lora_A["default"].weight, pl.lora_B["default"].weight), dy)

    def ours_step(p):
        o = layers[p][1]
        return lambda: torch.autograd.grad(o(x), (x, o.lora_A, o.lora_B), dy)

    def ours_premasked():
        opl.call_dropout_keep = lambda *a, **k: keep
        try:
            return ours_step(0.1)()
        finally:
            opl.call_dropout_keep = real

    fns = {"peft p=0": peft_step(0.0), "peft p=0.1": peft_step(0.1), "ours p=0": ours_step(0.0),
           "ours p=0.1": ours_step(0.1), "ours p=0.1, mask precomputed": ours_premasked,
           "F.dropout fwd+bwd": lambda: torch.autograd.grad(nn.functional.dropout(x, 0.1, True), (x,), dx_like)}
    return interleaved(fns, rounds=rounds, warmup=3, target_s=2e-2)


def _summ(samples: List[float]) -> dict:
    st = Stats.of(samples)
    return {"median": st.median, "min": st.min, "max": st.max, "q1": st.q1, "q3": st.q3, "n": st.n}


def _ratio(num: List[float], den: List[float]) -> dict:
    rs = Stats.of(paired_ratios(num, den))
    d = {"median": rs.median, "min": rs.min, "max": rs.max, "q1": rs.q1, "q3": rs.q3, "n": rs.n,
         "of_medians": statistics.median(num) / statistics.median(den), "noise": rs.ratio_noisy()}
    return d


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


def fmt_ratio(d: dict) -> str:
    """median (interquartile range) [min–max] of the per-round ratios, 'noise' when flagged."""
    return (f"{d['median']:.2f} ({d['q1']:.2f}–{d['q3']:.2f}) [{d['min']:.2f}–{d['max']:.2f}]"
            + (" noise" if d["noise"] else ""))


def _fmt_load(v) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "?"


def markdown(res: dict) -> str:
    meta = res["meta"]
    lines = [
        f"# CPU: torch backend vs PEFT ({meta['date'][:10]})",
        "",
        f"Machine: {meta['cpu']} ({meta['logical_cpus']} logical CPUs), {meta['threads']} torch thread, "
        f"timer: {meta['timer']}. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + f"; git {meta['git']}.",
        f"Command: `{meta['command']}` ({meta['wall_s']:.0f} s). Load average (1/5/15 min) at start "
        f"{_fmt_load(meta.get('load_average_at_start'))}, at end {_fmt_load(meta.get('load_average_at_end'))}: other "
        "processes shared the cores, which thread CPU time does not count but their cache and memory traffic does.",
        "",
        "Ours ÷ PEFT: median of the per-round ratios (interquartile range) [min–max over rounds]; < 1 means ours is "
        "faster. 'noise' = the middle half of the ratios straddles 1.0 or spans > 10 %.",
    ]
    if res.get("layer"):
        lines += ["", f"## One layer, K = N = {K}, r = {R}, no bias (up to {meta['rounds']} rounds per cell, "
                  f"at least 5; rounds actually run are in the JSON)", ""]
        Ms = sorted({c["M"] for c in res["layer"]})
        lines.append("| case | " + " | ".join(f"M={m}" for m in Ms) + " |")
        lines.append("|---|" + "---|" * len(Ms))
        keys = []
        for c in res["layer"]:
            for mode in c["modes"]:
                k = (c["dtype"], c["dropout"], mode)
                if k not in keys:
                    keys.append(k)
        for dt, p, mode in keys:
            cells = []
            for m in Ms:
                c = next((c for c in res["layer"] if (c["dtype"], c["dropout"], c["M"]) == (dt, p, m)), None)
                cells.append(fmt_ratio(c["modes"][mode]["ratio"]) if c else "—")
            lines.append(f"| {dt}, dropout {p:g}, {mode} | " + " | ".join(cells) + " |")
        lines += ["", "Medians (ms per call), peft / ours:", ""]
        for c in res["layer"]:
            for mode, d in c["modes"].items():
                lines.append(f"- {c['dtype']} p={c['dropout']:g} M={c['M']} {mode}: "
                             f"{d['peft']['median'] / 1e3:.1f} / {d['ours']['median'] / 1e3:.1f}")
    if res.get("llama"):
        lines += ["", "## Tiny-Llama LoRA training step (fp32, batch 4 × seq 32, r 8, 14 adapted Linear layers)", "",
                  "| dropout | peft ms | peft+patch ÷ peft | inject_lora ÷ peft |", "|---|---|---|---|"]
        for c in res["llama"]:
            lines.append(f"| {c['dropout']:g} | {c['samples_stats']['peft']['median'] / 1e3:.2f} | "
                         f"{fmt_ratio(c['ratio']['peft+patch'])} | {fmt_ratio(c['ratio']['inject_lora'])} |")
    if res.get("dropout"):
        lines += ["", "## What dropout costs per layer at the tiny-Llama's sizes (fwd+bwd, fp32, M = 128 tokens, r = 8)",
                  "", "µs per call, medians; 'dropout cost' = p=0.1 minus p=0 of the same side.", "",
                  "| K×N | peft p=0 | peft p=0.1 | peft dropout cost | ours p=0 | ours p=0.1 | ours dropout cost | "
                  "of which the mask hash | F.dropout fwd+bwd alone |", "|---|---|---|---|---|---|---|---|---|"]
        for c in res["dropout"]:
            m = {k: v["median"] for k, v in c["stats"].items()}
            lines.append(f"| {c['K']}×{c['N']} | {m['peft p=0']:.0f} | {m['peft p=0.1']:.0f} | "
                         f"{m['peft p=0.1'] - m['peft p=0']:.0f} | {m['ours p=0']:.0f} | {m['ours p=0.1']:.0f} | "
                         f"{m['ours p=0.1'] - m['ours p=0']:.0f} | {m['ours p=0.1'] - m['ours p=0.1, mask precomputed']:.0f} | "
                         f"{m['F.dropout fwd+bwd']:.0f} |")
    if res.get("overhead"):
        o = res["overhead"]
        lines += ["", "## Fixed per-call cost (fwd+bwd, M=4, K=N=16, r=4), µs per call, median [min–max]", "",
                  "| path | µs | minus nn.Linear |", "|---|---|---|"]
        base = o["stats"]["nn.Linear"]["median"]
        for k, st in o["stats"].items():
            lines.append(f"| {k} | {st['median']:.1f} [{st['min']:.1f}–{st['max']:.1f}] | {st['median'] - base:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="layer,llama,overhead", help="any of layer,llama,overhead,dropout")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--dropouts", default="0,0.1")
    ap.add_argument("--M", default="256,1024,2048")
    ap.add_argument("--rounds", type=int, default=25, help="rounds per layer cell (at most)")
    ap.add_argument("--max-cell-s", type=float, default=60.0,
                    help="stop a layer cell's rounds after this many CPU seconds (at least 5 rounds)")
    ap.add_argument("--llama-rounds", type=int, default=61)
    ap.add_argument("--overhead-rounds", type=int, default=25)
    ap.add_argument("--backend", default="torch", help="lora_kernels backend for ours ('auto' = resolve per call)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--from-json", default=None, help="only re-render the markdown of a saved JSON result")
    a = ap.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            md = markdown(json.load(f))
        print(md)
        if a.md:
            with open(a.md, "w") as f:
                f.write(md)
        return 0
    backend = None if a.backend == "auto" else a.backend
    torch.set_num_threads(1)
    parts = a.parts.split(",")
    date = datetime.datetime.now(datetime.timezone.utc)
    res: dict = {
        "meta": {
            "date": date.isoformat(timespec="seconds"),
            "cpu": _cpu_name(),
            "logical_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "timer": "thread CPU time (time.thread_time), variants interleaved per round",
            "versions": versions("peft", "transformers"),
            "git": _git_rev(),
            "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
            "backend": a.backend,
            "rounds": a.rounds,
            "max_cell_s": a.max_cell_s,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "shape": {"K": K, "N": N, "r": R, "scale": SCALE, "bias": False},
        }
    }
    t_start = time.time()
    if "layer" in parts:
        res["layer"] = []
        for dname in a.dtypes.split(","):
            for p in (float(v) for v in a.dropouts.split(",")):
                for M in (int(v) for v in a.M.split(",")):
                    s = layer_cell(DTYPES[dname], p, M, backend, a.rounds, a.max_cell_s)
                    cell = {"dtype": dname, "dropout": p, "M": M, "modes": {}}
                    for mode, samp in s.items():
                        cell["modes"][mode] = {"peft": _summ(samp["peft"]), "ours": _summ(samp["ours"]),
                                               "ratio": _ratio(samp["ours"], samp["peft"]), "samples": samp}
                        print(f"{dname} p={p:g} M={M:5d} {mode:8s} ours/peft {fmt_ratio(cell['modes'][mode]['ratio'])}"
                              f"   (peft {cell['modes'][mode]['peft']['median'] / 1e3:.1f} ms, "
                              f"ours {cell['modes'][mode]['ours']['median'] / 1e3:.1f} ms)  [{time.time() - t_start:.0f}s]",
                              flush=True)
                    res["layer"].append(cell)
                    gc.collect()
    if "llama" in parts:
        res["llama"] = []
        for p in (float(v) for v in a.dropouts.split(",")):
            s = llama_cell(p, backend, a.llama_rounds)
            c = {"dropout": p, "samples": s, "samples_stats": {k: _summ(v) for k, v in s.items()},
                 "ratio": {k: _ratio(s[k], s["peft"]) for k in ("peft+patch", "inject_lora")}}
            print(f"llama-tiny step p={p:g}: peft {c['samples_stats']['peft']['median'] / 1e3:.2f} ms; "
                  f"peft+patch/peft {fmt_ratio(c['ratio']['peft+patch'])}; inject_lora/peft {fmt_ratio(c['ratio']['inject_lora'])}"
                  f"  [{time.time() - t_start:.0f}s]", flush=True)
            res["llama"].append(c)
    if "dropout" in parts:
        res["dropout"] = []
        for K_, N_ in ((128, 128), (128, 344), (344, 128)):
            s = dropout_cell(K_, N_, a.llama_rounds)
            c = {"K": K_, "N": N_, "samples": s, "stats": {k: _summ(v) for k, v in s.items()}}
            res["dropout"].append(c)
            print(f"dropout {K_}x{N_}: " + ", ".join(f"{k} {v['median']:.0f}" for k, v in c["stats"].items()), flush=True)
    if "overhead" in parts:
        s = overhead_cell(a.overhead_rounds, backend)
        res["overhead"] = {"samples": s, "stats": {k: _summ(v) for k, v in s.items()}}
        base = res["overhead"]["stats"]["nn.Linear"]["median"]
        for k, st in res["overhead"]["stats"].items():
            print(f"overhead {k:15s} {st['median']:8.1f} µs [{st['min']:.1f}–{st['max']:.1f}]  (+{st['median'] - base:.1f} vs nn.Linear)")
    res["meta"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    res["meta"]["wall_s"] = time.time() - t_start
    md = markdown(res)
    print()
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}")
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
        print(f"wrote {a.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
