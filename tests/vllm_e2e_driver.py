"""Helpers of tests/test_vllm_e2e.py (not a test module): a tiny Llama with four PEFT adapters, HF transformers +
PEFT greedy decoding as the reference, and a vLLM run of the same requests in a fresh process.

    python tests/vllm_e2e_driver.py serve WORKDIR OUT.json [--fully-sharded] [--backends torch,triton]

runs the requests of WORKDIR/requests.json through one ``vllm.LLM`` (the CPU engine spawns workers, hence a
script with a ``__main__`` guard), once per lora_kernels backend (switched in the workers' environment between
runs, which the wrapper reads at every call), and writes the greedy tokens of each run plus, from every worker,
the PunicaWrapper class vLLM built, the calls our wrapper counted and the slot ranks it read off the weights.
Whether our plugin is on is up to the environment (LORA_KERNELS_VLLM).
"""

from __future__ import annotations

import json
import os
import sys
import time

HIDDEN, LAYERS, VOCAB, HEADS, KV_HEADS = 128, 2, 1000, 4, 2  # head_dim 32 (the CPU attention needs >= 32)
MAX_TOKENS = 4
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (name, rank, alpha, target modules): ranks 4..16, every projection; a3 also adapts embed_tokens and lm_head.
ADAPTERS = [
    ("a0", 4, 8, ALL_PROJ),
    ("a1", 8, 16, ALL_PROJ),
    ("a2", 16, 16, ["q_proj", "v_proj", "o_proj", "down_proj"]),
    ("a3", 8, 32, ALL_PROJ + ["embed_tokens", "lm_head"]),
]
# One batch: every adapter (so every one of the max_loras=4 slots is in use) and three requests without one.
REQUEST_ADAPTERS = [None, "a0", "a1", None, "a2", "a3", "a0", None]


def build(workdir: str) -> dict:
    """Save the base model and the adapters under workdir; return the request list (also written to
    workdir/requests.json): [{"prompt": [token ids], "adapter": name or None}]."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                      max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base = LlamaForCausalLM(cfg).float()
    base.save_pretrained(os.path.join(workdir, "base"))
    for j, (name, r, alpha, targets) in enumerate(ADAPTERS):
        torch.manual_seed(100 + j)
        model = LlamaForCausalLM.from_pretrained(os.path.join(workdir, "base"), dtype=torch.float32)
        # init_lora_weights=False: random A and B (PEFT's default B = 0 would make every adapter a no-op)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                      init_lora_weights=False))
        peft_model.save_pretrained(os.path.join(workdir, name), save_embedding_layers=False)
    requests = [{"prompt": [3 + (7 * i + 5 * k) % (VOCAB - 10) for k in range(5 + i)], "adapter": a}
                for i, a in enumerate(REQUEST_ADAPTERS)]
    with open(os.path.join(workdir, "requests.json"), "w") as f:
        json.dump(requests, f)
    return {"requests": requests}


def hf_greedy(workdir: str, requests) -> dict:
    """Greedy tokens of each request with HF transformers + PEFT (fp32), and the smallest top-1/top-2 logit gap
    seen (how far every step is from a tie)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(os.path.join(workdir, "base"), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, os.path.join(workdir, ADAPTERS[0][0]), adapter_name=ADAPTERS[0][0])
    for name, *_ in ADAPTERS[1:]:
        model.load_adapter(os.path.join(workdir, name), adapter_name=name)
    tokens, gap = [], float("inf")
    with torch.no_grad():
        for req in requests:
            ids = torch.tensor([req["prompt"]])
            out = []
            for _ in range(MAX_TOKENS):
                if req["adapter"] is None:
                    with model.disable_adapter():
                        logits = model(input_ids=ids).logits[0, -1]
                else:
                    model.set_adapter(req["adapter"])
                    logits = model(input_ids=ids).logits[0, -1]
                top = logits.topk(2)
                gap = min(gap, float(top.values[0] - top.values[1]))
                out.append(int(top.indices[0]))
                ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
            tokens.append(out)
    return {"tokens": tokens, "min_gap": gap}


def _wrapper_info(worker):
    """Runs on each vLLM worker (collective_rpc): the PunicaWrapper(s) its LoRA manager built."""
    manager = worker.model_runner.lora_manager._adapter_manager
    return {key: {"class": f"{type(w).__module__}.{type(w).__qualname__}",
                  "mro": [c.__name__ for c in type(w).__mro__],
                  "calls": dict(getattr(w, "lk_calls", {})),
                  "full_steps_with_base_rows": getattr(w, "lk_full_steps_with_base_rows", None),
                  "slot_ranks": sorted({tuple(v[1].tolist()) for v in getattr(w, "_lk_rank_cache", {}).values()})}
            for key, w in manager.punica_wrapper_mapping.items()}


def _use_backend(worker, backend):
    """Runs on each vLLM worker: the lora_kernels backend of the following calls."""
    os.environ["LORA_KERNELS_BACKEND"] = backend
    return backend


def serve(workdir: str, out_path: str, fully_sharded: bool, backends) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    with open(os.path.join(workdir, "requests.json")) as f:
        requests = json.load(f)
    t0 = time.time()
    llm = LLM(model=os.path.join(workdir, "base"), enable_lora=True, max_loras=len(ADAPTERS), max_lora_rank=16,
              fully_sharded_loras=fully_sharded, enforce_eager=True, skip_tokenizer_init=True, dtype="float32",
              max_model_len=64, max_num_seqs=len(requests), kv_cache_memory_bytes=64 * 2**20, seed=0)
    t1 = time.time()
    ids = {name: j + 1 for j, (name, *_) in enumerate(ADAPTERS)}
    loras = [None if r["adapter"] is None else LoRARequest(r["adapter"], ids[r["adapter"]],
                                                           os.path.join(workdir, r["adapter"]))
             for r in requests]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    result = {"init_s": round(t1 - t0, 1), "runs": {}}
    for backend in backends:
        if backend != "default":
            llm.collective_rpc(_use_backend, args=(backend,))
        t2 = time.time()
        outs = llm.generate([{"prompt_token_ids": r["prompt"]} for r in requests], params, lora_request=loras,
                            use_tqdm=False)
        result["runs"][backend] = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                   "generate_s": round(time.time() - t2, 1)}
    result["wrappers"] = llm.collective_rpc(_wrapper_info)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "serve":
        opts = sys.argv[4:]
        backends = opts[opts.index("--backends") + 1].split(",") if "--backends" in opts else ["default"]
        serve(sys.argv[2], sys.argv[3], "--fully-sharded" in opts, backends)
    else:
        sys.exit(__doc__)
