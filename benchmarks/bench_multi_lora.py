"""Benchmark: batched multi-adapter LoRA (``lora_kernels.add_lora``) per layer, inside a CUDA graph.

Shapes: bf16, K = N = 4096 (one projection), M tokens ∈ {1, 16, 64, 128, 512, 2048} × L adapters ∈ {1, 8, 32,
128} × rank ∈ {8, 16, 64}, plus a mixed-rank case (ranks 8/16/32/64 under r_max = 64) and a q/k/v packed case
(slices 4096/1024/1024). Token → adapter ids are uniform random over the L adapters (fixed seed).

Variants (each captured once in a CUDA graph after a warm-up that also runs the autotuner, then the replay is timed
with ``triton.testing.do_bench``, median, L2 flushed between replays):

* ``gather_bmm``   — plain torch baseline: gather A[ids], B[ids] per token and two bmm's (pads every adapter to
                     r_max, materialises M·r·(K+N) weights);
* ``torch``        — ``add_lora(backend="torch")`` (the fp32 reference);
* ``triton``       — ``add_lora(backend="triton", meta=meta)``, strategy auto, one LoRABatchMeta shared by layers
                     (its build is timed separately as ``meta_build``: once per batch, not per layer);
* ``triton:bgmv`` / ``triton:sgmv`` — the strategy forced (to tune ``multi_lora.BGMV_MAX_TOKENS_X_RANK``);
* ``cuda``         — ``add_lora(backend="cuda", meta=meta)`` when ``resolve_backend`` allows it (grouped by adapter
                     from 64 tokens on, one token per block below);
* ``cuda:token``   — ``add_lora(backend="cuda")`` without meta: always one token per block (the grouped path's baseline).

Reported per row: median µs per layer, achieved GB/s against the byte floor (adapter weight bytes actually touched
= Σ over the distinct adapters in the batch of rank_i·(K + ΣN_s) elements, + x + 2×y), the fraction of the chip's
HBM bandwidth that represents, and the relative error of the variant's output vs the fp32 reference.

    python benchmarks/bench_multi_lora.py [--quick] [--out FILE] [--variants triton,cuda,...]

On a machine without a CUDA GPU it prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from typing import Callable, Dict, List, Optional

import torch

ALL_VARIANTS = ("gather_bmm", "torch", "triton", "triton:bgmv", "triton:sgmv", "cuda", "cuda:token")
# HBM bandwidth in GB/s by device-name substring; H100 SXM is the reference the project reports against.
HBM_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}
H100_GBPS = 3350.0


def _default_out() -> str:
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], "bench_multi_lora.json")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_multi_lora.json")


def build_cases(quick: bool) -> List[dict]:
    """Each case: M, L, r_max, ranks (list or None), widths (slice widths), K, name."""
    K, N = 4096, 4096
    cases = []
    Ms = [1, 64, 512] if quick else [1, 16, 64, 128, 512, 2048]
    Ls = [8, 128] if quick else [1, 8, 32, 128]
    rs = [16] if quick else [8, 16, 64]
    for r in rs:
        for L in Ls:
            for M in Ms:
                cases.append(dict(name="uniform", M=M, L=L, r_max=r, ranks=None, widths=[N], K=K))
    for M in ([64] if quick else [16, 64, 512, 2048]):
        cases.append(dict(name="mixed_rank", M=M, L=32, r_max=64, ranks=[(8, 16, 32, 64)[i % 4] for i in range(32)], widths=[N], K=K))
    for M in ([64] if quick else [1, 16, 128, 512, 2048]):
        cases.append(dict(name="qkv_packed", M=M, L=32, r_max=16, ranks=None, widths=[4096, 1024, 1024], K=K))
    return cases


def make_inputs(case: dict, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    M, L, r, K, widths = case["M"], case["L"], case["r_max"], case["K"], case["widths"]

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype).to(device)

    x = rnd(M, K)
    A = [rnd(L, r, K, std=1.0 / math.sqrt(K)) for _ in widths]
    B = [rnd(L, n, r, std=1.0 / math.sqrt(r)) for n in widths]
    ids = torch.randint(0, L, (M,), generator=gen, dtype=torch.int32).to(device)
    scales = (torch.rand(L, generator=gen) * 0.5 + 0.25).to(device)
    ranks = None if case["ranks"] is None else torch.tensor(case["ranks"], dtype=torch.int32, device=device)
    if case["ranks"] is not None:  # zero the padding past each rank, as a serving engine's slots hold it
        for i, ri in enumerate(case["ranks"]):
            for a, b in zip(A, B):
                a[i, ri:] = 0
                b[i, :, ri:] = 0
    y0 = rnd(M, sum(widths))
    return dict(x=x, A=A, B=B, ids=ids, scales=scales, ranks=ranks, y0=y0)


def floor_bytes(case: dict, inp: dict, elt: int) -> int:
    """Bytes the op must move at minimum: distinct adapters' rank_i·(K + ΣN_s) weights, x once, y read + written."""
    K, widths, M = case["K"], case["widths"], case["M"]
    used = torch.unique(inp["ids"]).cpu().tolist()  # host read during setup only, never inside the timed region
    ranks = case["ranks"] or [case["r_max"]] * case["L"]
    w = sum(ranks[i] * (K + sum(widths)) for i in used if i >= 0)
    return elt * (w + M * K + 2 * M * sum(widths))


def gather_bmm_(y, x, A, B, ids, scales, ranks):
    """Baseline in plain torch: per-token gather of the padded adapters + two batched GEMVs per slice."""
    safe = ids.clamp(min=0).long()
    s = (scales[safe] * (ids >= 0)).to(torch.float32)[:, None]
    col = 0
    for a, b in zip(A, B):
        n = b.shape[1]
        xa = torch.bmm(a[safe], x[:, :, None])  # [M, r, 1]
        upd = torch.bmm(b[safe], xa)[:, :, 0]  # [M, n]
        cols = y[:, col : col + n]
        cols.copy_((cols.float() + s * upd.float()).to(y.dtype))
        col += n


def _capture(fn: Callable[[], None]):
    """CUDA graph of fn (after two warm-up calls on a side stream). Returns (graph or None, error or None)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            fn()
    except Exception as e:  # noqa: BLE001 - report and fall back to eager timing
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {e}"
    return g, None


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def variant_fn(variant: str, inp: dict, y: torch.Tensor, meta) -> Optional[Callable[[], None]]:
    import lora_kernels
    from lora_kernels.triton import multi_lora

    x, A, B, ids, sc, rk = inp["x"], inp["A"], inp["B"], inp["ids"], inp["scales"], inp["ranks"]
    if variant == "gather_bmm":
        return lambda: gather_bmm_(y, x, A, B, ids, sc, rk)
    if variant == "torch":
        return lambda: lora_kernels.add_lora(y, x, A, B, ids, sc, rk, backend="torch")
    if variant == "triton":
        return lambda: lora_kernels.add_lora(y, x, A, B, ids, sc, rk, backend="triton", meta=meta)
    if variant.startswith("triton:"):
        strat = variant.split(":", 1)[1]
        # the launcher directly: same kernels as add_lora(backend="triton") minus validation, strategy forced
        return lambda: multi_lora.add_lora_triton(y, x, A, B, ids, sc, rk, groups=meta.groups, strategy=strat)
    if variant == "cuda":
        return lambda: lora_kernels.add_lora(y, x, A, B, ids, sc, rk, backend="cuda", meta=meta)
    if variant == "cuda:token":
        return lambda: lora_kernels.add_lora(y, x, A, B, ids, sc, rk, backend="cuda")
    raise ValueError(variant)


def variant_unavailable(variant: str, inp: dict, case: dict) -> Optional[str]:
    from lora_kernels import BackendUnavailableError, resolve_backend

    if variant in ("triton", "triton:bgmv", "triton:sgmv", "cuda", "cuda:token"):
        be = "cuda" if variant.startswith("cuda") else "triton"
        try:
            resolve_backend("add_lora", inp["y0"], inp["x"], *inp["A"], *inp["B"], backend=be)
        except BackendUnavailableError as e:
            return str(e)
    if variant == "triton:bgmv" and case["M"] > 512:
        return "skipped: the decode kernel is not meant for batches this large"
    if variant == "torch" and case["M"] * case["r_max"] * (case["K"] + max(case["widths"])) * 4 > 6e9:
        return "skipped: fp32 gather would need > 6 GB"
    return None


def bench_case(case: dict, variants, dtype, peak_gbps: float, warmup: int, rep: int) -> List[dict]:
    import triton.testing

    from lora_kernels.serving import LoRABatchMeta

    inp = make_inputs(case, dtype, "cuda")
    elt = torch.finfo(dtype).bits // 8
    fb = floor_bytes(case, inp, elt)
    base = dict(case=case["name"], M=case["M"], L=case["L"], r_max=case["r_max"], K=case["K"],
                widths=case["widths"], ranks=case["ranks"], floor_bytes=fb)
    rows = []
    # reference output once (fp32 math), for a correctness column
    import lora_kernels

    y_ref = inp["y0"].clone()
    lora_kernels.add_lora(y_ref, inp["x"], inp["A"], inp["B"], inp["ids"], inp["scales"], inp["ranks"], backend="torch")
    torch.cuda.synchronize()

    meta = LoRABatchMeta(inp["ids"], case["L"])
    g_meta, err = _capture(lambda: meta.update_(inp["ids"]))
    if g_meta is not None:
        ms = triton.testing.do_bench(g_meta.replay, warmup=warmup, rep=rep, return_mode="median")
        rows.append(dict(base, variant="meta_build", us=ms * 1e3, graph=True, gbps=None, frac_peak=None, rel_err=None))
        del g_meta

    for v in variants:
        why = variant_unavailable(v, inp, case)
        if why:
            rows.append(dict(base, variant=v, us=None, skipped=why))
            continue
        y = inp["y0"].clone()
        try:
            fn = variant_fn(v, inp, y, meta)
            fn()  # correctness on a fresh y (also compiles / autotunes)
            torch.cuda.synchronize()
            err_v = _rel_err(y, y_ref)
            g, cap_err = _capture(fn)
            timed = g.replay if g is not None else fn
            ms = triton.testing.do_bench(timed, warmup=warmup, rep=rep, return_mode="median")
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the sweep
            rows.append(dict(base, variant=v, us=None, error=f"{type(e).__name__}: {e}"[:500]))
            torch.cuda.synchronize()
            continue
        us = ms * 1e3
        gbps = fb / (us * 1e-6) / 1e9
        row = dict(base, variant=v, us=us, graph=g is not None, gbps=gbps, frac_peak=gbps / peak_gbps,
                   frac_h100=gbps / H100_GBPS, rel_err=err_v)
        if cap_err:
            row["graph_error"] = cap_err[:300]
        rows.append(row)
        del g
    del inp, meta
    torch.cuda.empty_cache()
    return rows


def format_table(rows: List[dict]) -> str:
    hdr = f"{'case':<11}{'M':>6}{'L':>5}{'r':>4}  {'variant':<12}{'µs':>10}{'GB/s':>9}{'%HBM':>7}{'rel_err':>10}  note"
    out = [hdr, "-" * len(hdr)]
    for r in rows:
        us = f"{r['us']:.2f}" if r.get("us") is not None else "-"
        gb = f"{r['gbps']:.0f}" if r.get("gbps") is not None else "-"
        fr = f"{100 * r['frac_peak']:.1f}" if r.get("frac_peak") is not None else "-"
        er = f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else "-"
        note = r.get("skipped") or r.get("error") or ("eager (graph capture failed)" if r.get("graph") is False else "")
        out.append(f"{r['case']:<11}{r['M']:>6}{r['L']:>5}{r['r_max']:>4}  {r['variant']:<12}{us:>10}{gb:>9}{fr:>7}{er:>10}  {note[:60]}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small subset of the sweep")
    p.add_argument("--out", default=None, help="JSON output path (default $OUT/bench_multi_lora.json or benchmarks/results/)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma list from {ALL_VARIANTS}")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measurement time (ms)")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_multi_lora: no CUDA GPU available; nothing to benchmark (exiting cleanly).")
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ALL_VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {ALL_VARIANTS}")
    if args.quick and args.variants == ",".join(ALL_VARIANTS):
        variants = ["gather_bmm", "triton", "triton:bgmv", "triton:sgmv", "cuda"]

    import triton

    dtype = torch.bfloat16
    dev_name = torch.cuda.get_device_name()
    peak = next((bw for key, bw in HBM_GBPS.items() if key in dev_name), H100_GBPS)
    cases = build_cases(args.quick)
    print(f"bench_multi_lora on {dev_name} (HBM peak used: {peak:.0f} GB/s), {len(cases)} cases × {len(variants)} variants")
    rows: List[dict] = []
    for i, case in enumerate(cases):
        rows.extend(bench_case(case, variants, dtype, peak, args.warmup, args.rep))
        print(f"  [{i + 1}/{len(cases)}] {case['name']} M={case['M']} L={case['L']} r={case['r_max']}", flush=True)
    print(format_table(rows))

    out = args.out or _default_out()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = dict(
        benchmark="bench_multi_lora",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=dev_name,
        hbm_peak_gbps=peak,
        h100_reference_gbps=H100_GBPS,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        python=platform.python_version(),
        dtype=str(dtype),
        quick=args.quick,
        timing="CUDA-graph replay, triton.testing.do_bench median (L2 flushed), per layer",
        floor="bytes = distinct adapters' rank_i*(K+sum N_s) + M*K + 2*M*sum N_s, times the element size",
    )
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
