"""Benchmark: LoRA on MoE expert weights (``lora_kernels.moe_lora_linear`` / ``add_moe_lora`` / ``moe.experts_serve``).

Not run yet: the sessions that wrote it had no GPU. On an H100/H200 it measures what the MoE issue's GPU targets ask:

* **training layer** (bf16, fwd + bwd of a whole MoE MLP: gate/up projection, SwiGLU, down projection with the
  routing sum; the gradients of the LoRA factors, of x and of the routing weights):
    - ``grouped``       lora_kernels' grouped expert GEMMs without LoRA (the no-LoRA baseline of the target
                        "MoE-LoRA layer fwd+bwd <= 1.15x the no-LoRA grouped GEMM");
    - ``ours``          the same with LoRA (r = 16) on both projections, fused (``experts_forward``), default routing
                        sum (16-bit atomics); ``ours_sum_fp32`` / ``ours_sum_buffer``: with LORA_KERNELS_MOE_SUM=fp32
                        / buffer (which routing sum is fastest is a GPU question);
    - ``hf``            Transformers' own ``grouped_mm`` experts implementation, no LoRA;
    - ``peft``          PEFT ``target_parameters`` LoRA on Transformers' ``grouped_mm`` (W + s·B·A every forward);
* **serving** (bf16, inference, CUDA graph after a warm-up): the whole experts module for a batch of tokens
  spread over L adapters (``experts_serve``) vs the same grouped GEMMs without adapters (target: >= 90 % of the
  no-LoRA throughput), and the LoRA update of the gate/up projection alone (``add_moe_lora``). (A comparison with
  vLLM's ``fused_moe_lora`` needs vLLM's CUDA build next to this package; not included.)

Shapes: Mixtral-8x7B experts (E = 8, top-2, H = 4096, I = 14336) and Qwen3-30B-A3B experts (E = 128, top-8,
H = 2048, I = 768) at M tokens ∈ {16, 512, 4096} (training: {1024, 4096}).

Every timing is ``triton.testing.do_bench`` (median ms, L2 flushed), with the device, versions, shapes and date in the
JSON written to ``$OUT/bench_moe_lora.json`` (else ``benchmarks/results/``).

    python benchmarks/bench_moe_lora.py [--quick] [--out FILE]
    python benchmarks/bench_moe_lora.py --smoke     # tiny shapes on the CPU: checks the script runs, times nothing

On a machine without a CUDA GPU (and without --smoke) it prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys

import torch

SHAPES = {
    "mixtral-8x7b": dict(E=8, k=2, H=4096, I=14336),
    "qwen3-30b-a3b": dict(E=128, k=8, H=2048, I=768),
}
SMOKE = {"smoke": dict(E=4, k=2, H=32, I=24)}


def _experts_module(E, k, H, I, dtype, device):
    """A Transformers-v5 experts module (MixtralExperts: gate_up [E, 2I, H], down [E, H, I]) with N(0, 0.02²) weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = "grouped_mm"
    m = MixtralExperts(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02)
    return m


def _routing(M, E, k, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(M, E, generator=g).to(device)
    w, ids = torch.topk(logits.softmax(-1), k)
    return (w / w.sum(-1, keepdim=True)), ids


def _timer(smoke):
    if smoke:
        def run(fn):
            fn()
            return None
        return run
    import triton.testing

    return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100))


def bench_training(name, shape, M, r, dtype, device, smoke):
    import peft

    import lora_kernels.moe as lkmoe

    E, k, H, I = shape["E"], shape["k"], shape["H"], shape["I"]
    base = _experts_module(E, k, H, I, dtype, device)
    ours = lkmoe.LoRAExperts(copy.deepcopy(base), r=r, alpha=2 * r)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(base)
    pm = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                                                      target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    hf = copy.deepcopy(base)
    x = torch.randn(M, H, device=device, dtype=dtype, requires_grad=True)
    w, ids = _routing(M, E, k, device)
    w = w.to(dtype).requires_grad_()
    be = "torch" if smoke else None

    def step(fn):
        def run():
            y = fn()
            y.backward(torch.ones_like(y))
        return run

    def ours_step():
        if smoke:
            lora = {n: (ours.lora_A[n], ours.lora_B[n], ours.lora_scale) for n in ours.lora_A}
            return lkmoe.experts_forward(ours, x, ids, w, lora, backend=be)
        return ours(x, ids, w)

    def with_sum(mode, fn):  # the routing sum (triton/moe_lora.py: routing_sum) under $LORA_KERNELS_MOE_SUM=mode
        def run():
            prev = os.environ.get("LORA_KERNELS_MOE_SUM")
            os.environ["LORA_KERNELS_MOE_SUM"] = mode
            try:
                fn()
            finally:
                if prev is None:
                    os.environ.pop("LORA_KERNELS_MOE_SUM")
                else:
                    os.environ["LORA_KERNELS_MOE_SUM"] = prev
        return run

    variants = {
        "grouped": step(lambda: lkmoe.experts_forward(base, x, ids, w, {}, backend=be)),
        "ours": step(ours_step),  # default routing sum (16-bit atomics for bf16)
        "ours_sum_fp32": with_sum("fp32", step(ours_step)),
        "ours_sum_buffer": with_sum("buffer", step(ours_step)),
        "hf": step(lambda: hf(x, ids, w)),
        "peft": step(lambda: pm.base_model.model.experts(x, ids, w)),
    }
    time_it = _timer(smoke)
    rows = []
    for v, fn in variants.items():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = time_it(fn)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        rows.append(dict(part="training", shape=name, M=M, r=r, variant=v, ms=ms, peak_bytes=peak))
    return rows


def bench_serving(name, shape, M, L, r, dtype, device, smoke):
    import lora_kernels as lk
    import lora_kernels.moe as lkmoe

    E, k, H, I = shape["E"], shape["k"], shape["H"], shape["I"]
    experts = _experts_module(E, k, H, I, dtype, device)
    slots = {"gate_up_proj": lkmoe.MoEAdapterSlots(L, E, r, H, 2 * I, dtype=dtype, device=device),
             "down_proj": lkmoe.MoEAdapterSlots(L, E, r, I, H, dtype=dtype, device=device)}
    g = torch.Generator(device="cpu").manual_seed(1)
    for s in range(L):
        for proj, sl in slots.items():
            n_in, n_out = sl.in_features, sl.out_features[0]
            sl.load(s, (torch.randn(E, r, n_in, generator=g) / n_in ** 0.5).to(device, dtype),
                    (torch.randn(E, n_out, r, generator=g) * 0.02).to(device, dtype), 2.0)
    x = torch.randn(M, H, device=device, dtype=dtype)
    w, ids = _routing(M, E, k, device)
    aid = torch.randint(0, L, (M,), generator=g).to(device)
    routing = lk.MoERouting(ids, E, adapter_ids=aid, num_adapters=L, max_tokens=M)
    be = "torch" if smoke else None
    variants = {
        "no_lora": lambda: lkmoe.experts_forward(experts, x, ids, w, {}, backend=be),
        "serve": lambda: lkmoe.experts_serve(experts, x, ids, w, slots, aid, routing=routing, backend=be),
    }
    h = torch.randn(M * k, 2 * I, device=device, dtype=dtype)
    variants["add_moe_lora_w13"] = lambda: slots["gate_up_proj"].apply(h, x, ids, aid, routing=routing, backend=be)
    time_it = _timer(smoke)
    rows = []
    with torch.no_grad():
        for v, fn in variants.items():
            if not smoke:
                fn()  # warm-up (autotuning) before capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                ms = time_it(graph.replay)
            else:
                ms = time_it(fn)
            rows.append(dict(part="serving", shape=name, M=M, L=L, r=r, variant=v, ms=ms))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (torch backend): the script runs")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not a.smoke and not torch.cuda.is_available():
        print("bench_moe_lora: no CUDA GPU here; nothing measured (use --smoke to check the script on the CPU)")
        return 0
    device = "cpu" if a.smoke else "cuda"
    dtype = torch.float32 if a.smoke else torch.bfloat16
    shapes = SMOKE if a.smoke else SHAPES
    train_M = [16] if a.smoke else ([1024] if a.quick else [1024, 4096])
    serve_M = [16] if a.smoke else ([16, 512] if a.quick else [16, 512, 4096])
    rows = []
    for name, shape in shapes.items():
        for M in train_M:
            rows += bench_training(name, shape, M, 16, dtype, device, a.smoke)
        for M in serve_M:
            rows += bench_serving(name, shape, M, 4 if a.smoke else 16, 16, dtype, device, a.smoke)
    for r in rows:
        print(r)
    if a.smoke:
        print(f"bench_moe_lora --smoke: {len(rows)} rows ran (no timings on the CPU)")
        return 0
    import lora_kernels
    import triton

    out = a.out or os.path.join(os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                      "results"), "bench_moe_lora.json")
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, lora_kernels=lora_kernels.__version__,
                python=platform.python_version())
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
