"""End-to-end LoRA fine-tuning step benchmark behind ``lora-kernels bench --model ...``.

One training step = zero_grad, forward, loss, backward, AdamW step on the LoRA parameters. The same base
weights, the same LoRA init and the same inputs are run through up to three variants:

* ``peft``         — a transformers Llama + PEFT LoRA (PEFT's own forward; its default fp32 adapters over a
                     bf16 base, ``autocast_adapter_dtype=True``);
* ``peft+patch``   — the same PeftModel after :func:`lora_kernels.peft.patch` (fused ``lora_linear``);
* ``inject_lora``  — the plain base model with :func:`lora_kernels.inject_lora` (adapters in the base dtype).

Models (q/k/v/o/gate/up/down adapted):

* ``"llama-tiny"``: ``LlamaForCausalLM`` with hidden 128, 2 layers, vocab 256, LM loss on token ids. Runs on
  the CPU in seconds; a smoke test of the harness, not a performance claim.
* ``"llama-7b-layer"``: a stack of ``layers`` Llama-7B decoder layers (hidden 4096, intermediate 11008, 32
  heads) fed random ``inputs_embeds`` (seq 2048 by default), loss = mean square of the last hidden state;
  r=16, alpha=32. Needs a GPU (refused on the CPU unless ``device="cpu"`` is passed explicitly).

Timing: per-step wall clock with ``torch.cuda.synchronize()`` before and after, median over ``steps`` steps
after ``warmup`` steps; tokens/s = batch·seq / median. Memory: ``torch.cuda.max_memory_allocated`` over the
measured steps, peak reset after the model is built (so it includes weights, activations, grads and AdamW
state). Also reported: the largest |loss − loss_peft| over the measured steps (a parity check: exact-ish with
dropout 0, only statistical with dropout).
"""

from __future__ import annotations

import copy
import datetime as _dt
import gc
import json
import platform
import statistics
import time
from typing import Dict, Optional, Sequence, Union

import torch

MODELS = ("llama-tiny", "llama-7b-layer")
VARIANTS = ("peft", "peft+patch", "inject_lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}

_PRESETS = {
    # name: (model config, default seq, default batch, r, alpha)
    "llama-tiny": (dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256), 64, 8, 8, 16),
    "llama-7b-layer": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=128), 2048, 1, 16, 32),
}


def _versions() -> Dict[str, Optional[str]]:
    from .core import versions

    return versions("peft", "transformers")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_base(model: str, layers: Optional[int], seq: int, device, dtype):
    import transformers

    cfg_kw, _, _, _, _ = _PRESETS[model]
    cfg_kw = dict(cfg_kw)
    if layers is not None:
        cfg_kw["num_hidden_layers"] = int(layers)
    cfg = transformers.LlamaConfig(max_position_embeddings=max(seq, 128), tie_word_embeddings=False,
                                   attn_implementation="sdpa", **cfg_kw)
    torch.manual_seed(0)
    with torch.device(device):
        cls = transformers.LlamaForCausalLM if model == "llama-tiny" else transformers.LlamaModel
        base = cls(cfg).to(dtype)
    base.requires_grad_(False)
    return base, cfg


def _make_variant(variant: str, base, device, r: int, alpha: float, dropout: float, backend: Optional[str], lora_init):
    """A fresh copy of ``base`` on ``device``, adapted per ``variant``; LoRA A/B copied from ``lora_init``."""
    import lora_kernels
    import lora_kernels.peft
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    m = copy.deepcopy(base).to(device)
    if variant in ("peft", "peft+patch"):
        m = get_peft_model(m, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS))
        prefix = "base_model.model."
        layers = {n[len(prefix):]: mod for n, mod in m.named_modules() if isinstance(mod, LoraLayer)}
        with torch.no_grad():
            for path, mod in layers.items():
                a, b = lora_init[path]
                mod.lora_A["default"].weight.copy_(a)
                mod.lora_B["default"].weight.copy_(b)
        if variant == "peft+patch":
            lora_kernels.peft.patch(m, backend=backend, verbose=False)
    elif variant == "inject_lora":
        lora_kernels.inject_lora(m, TARGETS, r=r, alpha=alpha, dropout=dropout, backend=backend)
        with torch.no_grad():
            for path, mod in m.named_modules():
                if isinstance(mod, lora_kernels.LoRALinear):
                    a, b = lora_init[path]
                    mod.lora_A.copy_(a)
                    mod.lora_B.copy_(b)
    else:
        raise ValueError(f"run_model_bench: unknown variant {variant!r}; choose from {VARIANTS}")
    return m


def _lora_init(base, r: int, seed: int = 1):
    """Same LoRA init for every variant: A ~ N(0, 1/K), B ~ N(0, 1e-3) (non-zero so the step-0 losses differ from
    the base model's and the parity check is meaningful)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, mod in base.named_modules():
        if isinstance(mod, torch.nn.Linear) and path.rpartition(".")[2] in TARGETS:
            n, k = mod.weight.shape
            out[path] = (torch.randn(r, k, generator=g) / k**0.5, torch.randn(n, r, generator=g) * 1e-3)
    return out


def _inputs(model: str, cfg, batch: int, seq: int, device, dtype, step: int):
    g = torch.Generator().manual_seed(1000 + step)
    if model == "llama-tiny":
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
        return {"input_ids": ids, "labels": ids}
    return {"inputs_embeds": torch.randn(batch, seq, cfg.hidden_size, generator=g).to(device=device, dtype=dtype)}


def _loss(model_name: str, out):
    if model_name == "llama-tiny":
        return out.loss
    return out.last_hidden_state.float().square().mean()


def run_model_bench(
    model: str = "llama-tiny",
    device: Union[str, torch.device, None] = None,
    steps: Optional[int] = None,
    seq: Optional[int] = None,
    batch: Optional[int] = None,
    dtype: Union[str, torch.dtype, None] = None,
    out_json: Optional[str] = None,
    out_png: Optional[str] = None,
    *,
    layers: Optional[int] = None,
    warmup: Optional[int] = None,
    variants: Sequence[str] = VARIANTS,
    dropout: float = 0.0,
    backend: Optional[str] = None,
    verbose: bool = True,
) -> dict:
    """Benchmark LoRA fine-tuning steps of ``model`` for PEFT vs lora_kernels; returns (and optionally writes) a dict.

    Args:
        model: "llama-tiny" or "llama-7b-layer" (see the module docstring).
        device: default "cuda" when available, else "cpu" ("llama-7b-layer" is skipped on an implicit CPU).
        steps: measured steps (default 20 on CUDA, 5 on the CPU); ``warmup`` steps before (default 3 / 1).
        seq, batch: default 64×8 (llama-tiny) or 2048×1 (llama-7b-layer); CPU llama-tiny defaults to 32×4.
        dtype: default bf16 on CUDA, fp32 on the CPU ("bf16" | "fp16" | "fp32" or a torch dtype).
        layers: decoder layers (default 2 for llama-tiny; 4 for llama-7b-layer, i.e. 0.8 B bf16 weights =
            1.6 GB, plus activations for seq 2048 — estimated to fit well within 80 GB, not yet measured).
        variants: any of "peft", "peft+patch", "inject_lora" (the peft variant is the baseline for ratios).
        dropout: LoRA dropout for every variant (parity across variants is only statistical when > 0).
        backend: lora_kernels backend for the patched / injected layers (None: auto).
        out_json / out_png: where to write the result dict / a bar plot (tokens/s and peak memory).

    Returns a dict with "meta" (device, versions, date, config) and "results" {variant: {median_step_ms,
    tokens_per_s, peak_mem_gib, speedup_vs_peft, mem_vs_peft, max_abs_loss_diff_vs_peft, losses}}, or
    {"skipped": reason} when the model cannot run here.
    """
    if model not in MODELS:
        raise ValueError(f"run_model_bench: unknown model {model!r}; choose from {MODELS}")
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        msg = f"run_model_bench needs the interop extras (pip install 'lora_kernels[interop]'): {e}"
        if verbose:
            print(msg)
        return {"skipped": msg}
    implicit_device = device is None
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run_model_bench: device cuda requested but torch sees no CUDA GPU")
    if model == "llama-7b-layer" and device.type != "cuda" and implicit_device:
        msg = ("run_model_bench: llama-7b-layer (hidden 4096, seq 2048) needs a CUDA GPU; none is visible. "
               "Pass device='cpu' explicitly (with a small seq/layers) to run it anyway.")
        if verbose:
            print(msg)
        return {"skipped": msg}
    on_gpu = device.type == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if on_gpu else torch.float32
    elif isinstance(dtype, str):
        dtype = _DTYPES[dtype.lower()]
    _, d_seq, d_batch, r, alpha = _PRESETS[model]
    if model == "llama-tiny" and not on_gpu:
        d_seq, d_batch = 32, 4
    seq = int(seq or d_seq)
    batch = int(batch or d_batch)
    steps = int(steps or (20 if on_gpu else 5))
    warmup = int(warmup if warmup is not None else (3 if on_gpu else 1))
    variants = list(variants)
    if "peft" in variants:
        variants.remove("peft")
        variants.insert(0, "peft")

    base, cfg = _build_base(model, layers, seq, device, dtype)
    base = base.to("cpu")  # each variant gets its own device copy; peak memory then counts that variant alone
    lora_init = _lora_init(base, r)
    results: Dict[str, dict] = {}
    for variant in variants:
        m = _make_variant(variant, base, device, r, alpha, dropout, backend, lora_init)
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        if on_gpu:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for step in range(warmup + steps):
            inputs = _inputs(model, cfg, batch, seq, device, dtype, step)
            torch.manual_seed(step)  # same dropout seeds per step across runs of a variant
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, m(**inputs))
            loss.backward()
            opt.step()
            _sync(device)
            dt = time.perf_counter() - t0
            if step >= warmup:
                times.append(dt)
                losses.append(float(loss.detach()))
        med = statistics.median(times)
        results[variant] = {
            "median_step_ms": med * 1e3,
            "min_step_ms": min(times) * 1e3,
            "tokens_per_s": batch * seq / med,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
            "trainable_params": sum(p.numel() for p in params),
            "lora_param_dtype": str(params[0].dtype).replace("torch.", "") if params else None,
            "losses": losses,
        }
        del m, opt, params
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    ref = results.get("peft")
    for variant, res in results.items():
        if ref is not None:
            res["speedup_vs_peft"] = res["tokens_per_s"] / ref["tokens_per_s"]
            res["mem_vs_peft"] = (res["peak_mem_gib"] / ref["peak_mem_gib"]) if on_gpu else None
            res["max_abs_loss_diff_vs_peft"] = max(abs(a - b) for a, b in zip(res["losses"], ref["losses"]))
    out = {
        "meta": {
            "kind": "e2e-lora-finetune-step",
            "model": model,
            "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({platform.processor() or platform.machine()})",
            "dtype": str(dtype).replace("torch.", ""),
            "seq": seq,
            "batch": batch,
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size,
            "r": r,
            "alpha": alpha,
            "dropout": dropout,
            "targets": TARGETS,
            "steps": steps,
            "warmup": warmup,
            "backend": backend or "auto",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
        },
        "results": results,
    }
    del base
    if verbose:
        print(format_table(out))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(out, f, indent=1)
        if verbose:
            print(f"wrote {out_json}")
    if out_png:
        plot(out, out_png, verbose=verbose)
    return out


def format_table(out: dict) -> str:
    m = out["meta"]
    lines = [
        f"{m['model']} on {m['device']}, {m['dtype']}, batch {m['batch']} × seq {m['seq']}, {m['layers']} layer(s), "
        f"r={m['r']}, dropout={m['dropout']}, median of {m['steps']} steps after {m['warmup']} warm-up",
        f"{'variant':<12} {'step ms':>9} {'tokens/s':>11} {'peak GiB':>9} {'× peft':>7} {'mem × peft':>10} {'max|Δloss|':>11}",
    ]
    for v, r in out["results"].items():
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        memr = f"{r['mem_vs_peft']:.3f}" if r.get("mem_vs_peft") is not None else "-"
        sp = f"{r['speedup_vs_peft']:.3f}" if "speedup_vs_peft" in r else "-"
        dl = f"{r['max_abs_loss_diff_vs_peft']:.2e}" if "max_abs_loss_diff_vs_peft" in r else "-"
        lines.append(f"{v:<12} {r['median_step_ms']:>9.2f} {r['tokens_per_s']:>11.0f} {mem:>9} {sp:>7} {memr:>10} {dl:>11}")
    return "\n".join(lines)


def plot(out: dict, path: str, verbose: bool = True) -> Optional[str]:
    """Bar plot of tokens/s (and peak memory on CUDA) per variant. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if verbose:
            print("matplotlib is not installed: no plot")
        return None
    res = out["results"]
    names = list(res)
    has_mem = all(res[n]["peak_mem_gib"] is not None for n in names)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(10 if has_mem else 5.5, 4))
    axes = list(axes) if has_mem else [axes]
    colors = ["#888888", "#1f77b4", "#2ca02c"][: len(names)]
    tps = [res[n]["tokens_per_s"] for n in names]
    bars = axes[0].bar(names, tps, color=colors)
    axes[0].set_ylabel("training tokens / s (median step)")
    for b, n in zip(bars, names):
        label = f"{res[n]['tokens_per_s']:.0f}" + (f"\n×{res[n]['speedup_vs_peft']:.2f}" if "speedup_vs_peft" in res[n] else "")
        axes[0].annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    if has_mem:
        mem = [res[n]["peak_mem_gib"] for n in names]
        bars = axes[1].bar(names, mem, color=colors)
        axes[1].set_ylabel("peak allocated GiB")
        for b, v in zip(bars, mem):
            axes[1].annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    m = out["meta"]
    fig.suptitle(f"{m['model']}: {m['device']}, {m['dtype']}, {m['batch']}×{m['seq']} tokens, r={m['r']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    if verbose:
        print(f"wrote {path}")
    return path


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="End-to-end LoRA fine-tuning step benchmark: PEFT vs lora_kernels")
    p.add_argument("--model", default="llama-tiny", choices=MODELS)
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES))
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--backend", default=None)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    run_model_bench(a.model, a.device, a.steps, a.seq, a.batch, a.dtype, a.json, a.png, layers=a.layers,
                    warmup=a.warmup, variants=a.variants.split(","), dropout=a.dropout, backend=a.backend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
