"""Fine-tune a tiny Llama with PEFT LoRA twice — PEFT's own forward vs lora_kernels — and compare the loss curves.

The model is built from a transformers ``LlamaConfig`` (random init, nothing downloaded). Both copies start from
the same base weights and the same LoRA init (q/k/v/o/gate/up/down adapted), see the same synthetic token
batches and use the same AdamW; the only difference is the LoRA linear layers' implementation:

* ``--mode patch`` (default): the second copy is the same PeftModel with ``lora_kernels.peft.patch`` applied;
* ``--mode inject``: the second copy is the plain base model with ``lora_kernels.inject_lora`` and the PEFT
  copy's initial A/B copied in.

With ``--dropout 0`` (default) the curves should agree to float rounding; with dropout the two use different
masks (PEFT: nn.Dropout; lora_kernels: a seeded hash), so they only agree statistically.

    python examples/finetune_llama_tiny.py                    # CPU, ~1 minute or less
    python examples/finetune_llama_tiny.py --device cuda --dtype bf16 --steps 500
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

try:
    import transformers
    from peft import LoraConfig, get_peft_model
except ImportError as e:  # pragma: no cover
    raise SystemExit(f"this example needs the interop extras: pip install 'lora_kernels[interop]' ({e})")

import lora_kernels
import lora_kernels.peft as lk_peft

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(args) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(128, args.seq),
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(cfg)


def synthetic_batches(args, device):
    """Token streams from a fixed random 'next token' table with 10% noise, so there is something to learn."""
    g = torch.Generator().manual_seed(args.seed + 1)
    table = torch.randperm(args.vocab, generator=g)
    for _ in range(args.steps):
        ids = torch.empty(args.batch, args.seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, args.vocab, (args.batch,), generator=g)
        for t in range(1, args.seq):
            noise = torch.rand(args.batch, generator=g) < 0.1
            ids[:, t] = torch.where(noise, torch.randint(0, args.vocab, (args.batch,), generator=g), table[ids[:, t - 1]])
        yield ids.to(device)


def make_pair(args, device, dtype):
    base = build_base(args).to(device=device, dtype=dtype)
    fresh = copy.deepcopy(base)
    lcfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=TARGETS)
    peft_model = get_peft_model(base, lcfg, autocast_adapter_dtype=False)
    if args.mode == "patch":
        ours = copy.deepcopy(peft_model)
        report = lk_peft.patch(ours, backend=args.backend)
        print(report)
    else:
        ours = lora_kernels.inject_lora(fresh, TARGETS, r=args.r, alpha=args.alpha, dropout=args.dropout, backend=args.backend)
        lora_kernels.mark_only_lora_as_trainable(ours)
        with torch.no_grad():
            for name, mod in ours.named_modules():
                if isinstance(mod, lora_kernels.LoRALinear):
                    src = peft_model.base_model.model.get_submodule(name)
                    mod.lora_A.copy_(src.lora_A["default"].weight)
                    mod.lora_B.copy_(src.lora_B["default"].weight)
        print(f"inject_lora: {sum(isinstance(m, lora_kernels.LoRALinear) for m in ours.modules())} LoRALinear modules")
    return peft_model, ours


def train(args) -> dict:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    peft_model, ours = make_pair(args, device, dtype)
    models = {"peft": peft_model, "lora_kernels": ours}
    opts = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
        for k, m in models.items()
    }
    for m in models.values():
        m.train()
    losses = {k: [] for k in models}
    seconds = {k: 0.0 for k in models}
    for step, ids in enumerate(synthetic_batches(args, device)):
        for k, m in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            out = m(input_ids=ids, labels=ids)
            out.loss.backward()
            opts[k].step()
            losses[k].append(out.loss.item())  # .item() synchronises
            seconds[k] += time.perf_counter() - t0
        if step % args.log_every == 0 or step == args.steps - 1:
            a, b = losses["peft"][-1], losses["lora_kernels"][-1]
            print(f"step {step:4d}  loss peft {a:.5f}  lora_kernels {b:.5f}  |diff| {abs(a - b):.2e}")
    diffs = [abs(a - b) for a, b in zip(losses["peft"], losses["lora_kernels"])]
    result = {
        "mode": args.mode,
        "device": str(device),
        "dtype": args.dtype,
        "steps": args.steps,
        "dropout": args.dropout,
        "first_loss": losses["peft"][0],
        "final_loss": {k: v[-1] for k, v in losses.items()},
        "max_abs_loss_diff": max(diffs),
        "mean_step_ms": {k: 1e3 * s / args.steps for k, s in seconds.items()},
        "losses": losses,
    }
    print(f"max |loss_peft - loss_lora_kernels| over {args.steps} steps: {max(diffs):.3e}")
    print(f"loss {result['first_loss']:.4f} -> peft {result['final_loss']['peft']:.4f}, "
          f"lora_kernels {result['final_loss']['lora_kernels']:.4f}")
    print("mean ms/step: " + ", ".join(f"{k} {v:.1f}" for k, v in result["mean_step_ms"].items()))
    return result


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for k, v in result["losses"].items():
        ax1.plot(v, label=k, linestyle="-" if k == "peft" else "--")
    ax1.set_ylabel("training loss")
    ax1.set_title(f"tiny Llama LoRA fine-tune: PEFT vs lora_kernels ({result['mode']}, {result['device']}, {result['dtype']})")
    ax1.legend()
    ax2.semilogy([abs(a - b) + 1e-12 for a, b in zip(*result["losses"].values())])
    ax2.set_ylabel("|Δ loss|")
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--mode", default="patch", choices=["patch", "inject"])
    p.add_argument("--backend", default=None, help="lora_kernels backend (default: auto)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: tiny matmuls gain nothing from more, and lose a lot on a busy machine)")
    p.add_argument("--png", default="finetune_llama_tiny.png", help="loss-curve plot ('' to skip)")
    p.add_argument("--json", default="", help="write the losses and summary here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA GPU")
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    result = train(args)
    if args.png:
        plot(result, args.png)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
