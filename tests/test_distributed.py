"""lora_kernels.distributed on CPU with gloo: tensor-parallel LoRA (ColwiseLoRA / RowwiseLoRA, a tiny Llama block,
PEFT layers), FSDP2 and FSDP2 + TP merges, sharded serving slots, the DTensor rules of the custom ops, and the
bytes every collective moves.

Each group of checks runs in 2 or 4 processes spawned once per group (a module-scoped fixture, bounded by a
timeout); every check compares the sharded result with a single-process run of the same module in the same process
(deep copies built from the same seed), and, in fp32, with the float64 reference. One pytest test per check reports
that check's outcome on every rank.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
pytest.importorskip("torch.distributed.tensor")

import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from conftest import TOL, rel_err  # noqa: E402

GROUP_TIMEOUT_S = {2: 420, 4: 420}

# ----------------------------------------------------------------------------------------------
# Harness: checks registered per world size, run in spawned processes, results collected per rank
# ----------------------------------------------------------------------------------------------

CHECKS = {}  # name -> (world size, fn(rank, world) -> dict of measurements)


def check(world):
    def deco(fn):
        CHECKS[fn.__name__] = (world, fn)
        return fn

    return deco


def _worker(rank, world, port, names, outdir):
    os.environ["LORA_KERNELS_BACKEND"] = "torch"  # the CPU backend (a check below runs Triton explicitly)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    results = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            info = CHECKS[name][1](rank, world) or {}
            results[name] = {"ok": True, "info": info, "s": round(time.perf_counter() - t0, 2)}
        except BaseException:  # noqa: BLE001 — reported to the parent
            results[name] = {"ok": False, "error": traceback.format_exc(), "s": round(time.perf_counter() - t0, 2)}
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.barrier()  # keep the ranks in step between checks
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(world: int):
    names = [n for n, (w, _) in CHECKS.items() if w == world]
    outdir = tempfile.mkdtemp(prefix=f"lk_dist{world}_")
    ctx = mp.start_processes(_worker, args=(world, _free_port(), names, outdir), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.time() + GROUP_TIMEOUT_S[world]
    failure = None
    try:
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                failure = f"timed out after {GROUP_TIMEOUT_S[world]} s"
                break
    except Exception as e:  # a worker died
        failure = f"worker failed: {e}"
    if failure:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    per_rank = []
    for r in range(world):
        try:
            with open(os.path.join(outdir, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
        except FileNotFoundError:
            per_rank.append({})
    return {"names": names, "ranks": per_rank, "failure": failure}


@pytest.fixture(scope="module")
def group2():
    return _run_group(2)


@pytest.fixture(scope="module")
def group4():
    return _run_group(4)


def _assert_check(group, name):
    for r, res in enumerate(group["ranks"]):
        got = res.get(name)
        if got is None:
            pytest.fail(f"check {name} did not finish on rank {r} ({group['failure'] or 'no result'})")
        if not got["ok"]:
            pytest.fail(f"check {name} failed on rank {r}:\n{got['error']}")
    info = group["ranks"][0][name]["info"]
    if "skipped" in info:
        pytest.skip(info["skipped"])
    if info:
        print(f"\n{name} ({group['ranks'][0][name]['s']} s): {json.dumps(info)}")
    return info


# ----------------------------------------------------------------------------------------------
# Helpers used inside the workers
# ----------------------------------------------------------------------------------------------


def _tol(dt):
    return TOL[dt] if dt in (torch.float64, torch.float32) else TOL[torch.float16]


def _close(actual, expected, dt, what):
    from torch.distributed.tensor import DTensor

    if isinstance(actual, DTensor):
        actual = actual.full_tensor()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= _tol(dt), f"{what}: relative error {err:.3e} > {_tol(dt):.0e}"
    return err


def _mesh(world, shape=None, names=None):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape or (world,), mesh_dim_names=names)


def _lora_linear(K, N, r, dt, p=0.0, bias=True, seed=0):
    import lora_kernels as lk

    torch.manual_seed(seed)
    m = lk.LoRALinear(nn.Linear(K, N, bias=bias, dtype=dt), r=r, alpha=2.0 * r, dropout=p)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.5)  # a fresh B is zero: make the adapter matter
    if bias:
        m.bias.requires_grad_(True)
    return m


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def _local_chunk(t, world, rank, dim):
    return t.chunk(world, dim)[rank].contiguous()


def _ref64_linear(m, x, p, seed):
    """The float64 reference forward of a LoRALinear (autograd in fp64)."""
    from lora_kernels import reference as ref

    return ref.lora_linear_ref(x.double(), m.weight.double(), m.lora_A.double(), m.lora_B.double(), m.scale,
                               None if m.bias is None else m.bias.double(), p, seed)


def _run_layer(module, x_local, dy_local, seed):
    torch.manual_seed(seed)
    xi = x_local.clone().requires_grad_(True)
    y = module(xi)
    y.backward(dy_local)
    return y, xi.grad


# ----------------------------------------------------------------------------------------------
# 2 processes
# ----------------------------------------------------------------------------------------------


@check(2)
def colwise_lora_linear(rank, world):
    """ColwiseLoRA (A sharded by rank): y, dx, dA, dB, dbias equal the single-process layer (fp64, fp32; dropout
    off/on; replicated and sequence-parallel input), and the float64 reference in fp32."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.distributed import ColwiseLoRA

    mesh = _mesh(world)
    worst = {}
    for dt in (torch.float64, torch.float32):
        for p in (0.0, 0.15):
            for sp in (False, True):
                m = _lora_linear(24, 16, 4, dt, p)
                ref = copy.deepcopy(m)
                style = ColwiseLoRA(input_layouts=Shard(1), output_layouts=Replicate()) if sp else ColwiseLoRA()
                parallelize_module(m, mesh, style)
                torch.manual_seed(11)
                x = torch.randn(2, 6, 24, dtype=dt)
                dy = torch.randn(2, 6, 16, dtype=dt)
                x_loc = _local_chunk(x, world, rank, 1) if sp else x
                dy_loc = dy if sp else _local_chunk(dy, world, rank, -1)
                y, dx = _run_layer(m, x_loc, dy_loc, seed=5)
                yr, dxr = _run_layer(ref, x, dy, seed=5)
                tag = f"{str(dt)[6:]} p={p} sp={sp}"
                _close(y, yr if sp else _local_chunk(yr, world, rank, -1), dt, f"y {tag}")
                _close(dx, _local_chunk(dxr, world, rank, 1) if sp else dxr, dt, f"dx {tag}")
                gr = _grads(ref)
                for n, g in _grads(m).items():
                    _close(g, gr[n], dt, f"d{n} {tag}")
                assert set(_grads(m)) == {"lora_A", "lora_B", "bias"}
                if dt == torch.float32:  # against the float64 oracle
                    torch.manual_seed(5)
                    seed = int(torch.randint(0, 2**31 - 1, (1,))) if p else 0
                    y64 = _ref64_linear(ref, x, p, seed).detach()
                    y64 = y64 if sp else _local_chunk(y64, world, rank, -1)
                    worst["fp32_vs_fp64_ref"] = max(worst.get("fp32_vs_fp64_ref", 0), _close(y, y64, dt, f"y vs fp64 {tag}"))
    return {k: f"{v:.2e}" for k, v in worst.items()}


@check(2)
def rowwise_lora_linear(rank, world):
    """RowwiseLoRA (B sharded by output): y, dx, dA, dB, dbias equal the single-process layer (fp64, fp32; dropout
    off/on — the mask is hashed at global columns; replicated and sequence-parallel output)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.distributed import RowwiseLoRA

    mesh = _mesh(world)
    for dt in (torch.float64, torch.float32):
        for p in (0.0, 0.15):
            for sp in (False, True):
                m = _lora_linear(24, 16, 4, dt, p)
                ref = copy.deepcopy(m)
                parallelize_module(m, mesh, RowwiseLoRA(output_layouts=Shard(1)) if sp else RowwiseLoRA())
                torch.manual_seed(12)
                x = torch.randn(2, 6, 24, dtype=dt)
                dy = torch.randn(2, 6, 16, dtype=dt)
                y, dx = _run_layer(m, _local_chunk(x, world, rank, -1), _local_chunk(dy, world, rank, 1) if sp else dy, 5)
                yr, dxr = _run_layer(ref, x, dy, 5)
                tag = f"{str(dt)[6:]} p={p} sp={sp}"
                _close(y, _local_chunk(yr, world, rank, 1) if sp else yr, dt, f"y {tag}")
                _close(dx, _local_chunk(dxr, world, rank, -1), dt, f"dx {tag}")
                gr = _grads(ref)
                for n, g in _grads(m).items():
                    _close(g, gr[n], dt, f"d{n} {tag}")
                assert set(_grads(m)) == {"lora_A", "lora_B", "bias"}


@check(2)
def replicated_adapter_variants_train(rank, world):
    """ColwiseLoRA(shard_lora_a=False) / RowwiseLoRA(shard_lora_b=False): no LoRA collective in the forward; the
    replicated factor's gradient comes back Partial and an optimizer step on it matches the single-process step
    (three SGD steps of a colwise -> rowwise MLP, fp64, dropout on)."""
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.distributed import ColwiseLoRA, RowwiseLoRA

    mesh = _mesh(world)
    dt = torch.float64
    for shard in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(_lora_linear(16, 24, 4, dt, 0.1, seed=1), nn.GELU(), _lora_linear(24, 16, 4, dt, 0.1, seed=2))
        ref = copy.deepcopy(model)
        parallelize_module(model, mesh, {"0": ColwiseLoRA(shard_lora_a=shard), "2": RowwiseLoRA(shard_lora_b=shard)})
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        opt_r = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05)
        for step in range(3):
            torch.manual_seed(100 + step)
            x = torch.randn(3, 5, 16, dtype=dt)
            torch.manual_seed(7 + step)
            loss = model(x).pow(2).mean()
            loss.backward()
            torch.manual_seed(7 + step)
            loss_r = ref(x).pow(2).mean()
            loss_r.backward()
            _close(loss.detach(), loss_r.detach(), dt, f"loss step {step} shard={shard}")
            opt.step(); opt.zero_grad(); opt_r.step(); opt_r.zero_grad()
        pr = dict(ref.named_parameters())
        for n, p_ in model.named_parameters():
            _close(p_.detach(), pr[n].detach(), dt, f"{n} after 3 steps shard={shard}")


@check(2)
def llama_block_tp(rank, world):
    """A tiny Llama decoder layer (built from a transformers LlamaConfig, no download) with LoRA on q/k/v/o and the
    MLP, sharded Megatron-style (q/k/v/gate/up ColwiseLoRA, o/down RowwiseLoRA): output, input gradient and every
    LoRA gradient equal the single-process layer, then again after an AdamW step (fp64, dropout 0.1)."""
    from torch.distributed.tensor.parallel import parallelize_module
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    import lora_kernels as lk
    from lora_kernels.distributed import ColwiseLoRA, RowwiseLoRA

    mesh = _mesh(world)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    cfg._attn_implementation = "sdpa"
    dt = torch.float64
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(dt)
    lk.inject_lora(layer, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4, alpha=8,
                   dropout=0.1)
    for mod in layer.modules():
        if isinstance(mod, lk.LoRALinear):
            torch.nn.init.normal_(mod.lora_B, std=0.3)
    lk.mark_only_lora_as_trainable(layer)
    ref = copy.deepcopy(layer)
    plan = {"self_attn.q_proj": ColwiseLoRA(), "self_attn.k_proj": ColwiseLoRA(), "self_attn.v_proj": ColwiseLoRA(),
            "self_attn.o_proj": RowwiseLoRA(), "mlp.gate_proj": ColwiseLoRA(), "mlp.up_proj": ColwiseLoRA(),
            "mlp.down_proj": RowwiseLoRA()}
    parallelize_module(layer, mesh, plan)
    rope = LlamaRotaryEmbedding(cfg).to(dt)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    opt_r = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    n_lora = 0
    for step in range(2):
        torch.manual_seed(20 + step)
        x = torch.randn(2, 5, 32, dtype=dt)
        cos, sin = rope(x, torch.arange(5)[None].expand(2, 5))
        outs = []
        for mod in (layer, ref):
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(3 + step)
            out = mod(xi, position_embeddings=(cos, sin))
            out = out[0] if isinstance(out, tuple) else out
            out.pow(2).sum().backward()
            outs.append((out.detach(), xi.grad))
        _close(outs[0][0], outs[1][0], dt, f"output step {step}")
        _close(outs[0][1], outs[1][1], dt, f"dx step {step}")
        gr = _grads(ref)
        g = _grads(layer)
        assert set(g) == set(gr) and len(g) == 14, sorted(g)
        for n in g:
            _close(g[n], gr[n], dt, f"d{n} step {step}")
        n_lora = len(g)
        opt.step(); opt.zero_grad(); opt_r.step(); opt_r.zero_grad()
    return {"lora_params_compared": n_lora}


@check(2)
def peft_layers_tp(rank, world):
    """PEFT lora.Linear layers: patched by lora_kernels.peft.patch (fused path, our DTensor rules) and unpatched
    (PEFT's forward on DTensors), sharded with ColwiseLoRA / RowwiseLoRA: outputs and LoRA gradients equal the
    single-process PEFT model."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.tensor.parallel import parallelize_module

    import lora_kernels.peft as lkp
    from lora_kernels.distributed import ColwiseLoRA, RowwiseLoRA

    mesh = _mesh(world)
    dt = torch.float64
    for patched in (True, False):
        torch.manual_seed(0)
        base = nn.Sequential()
        base.add_module("up", nn.Linear(16, 32, dtype=dt))
        base.add_module("act", nn.ReLU())
        base.add_module("down", nn.Linear(32, 16, dtype=dt))
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"],
                                                lora_dropout=0.1 if patched else 0.0))
        for n, p_ in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p_, std=0.3)
        if patched:
            assert lkp.patch(model, verbose=False).num_patched == 2
        ref = copy.deepcopy(model)
        inner = model.base_model.model
        parallelize_module(inner, mesh, {"up": ColwiseLoRA(), "down": RowwiseLoRA()})
        torch.manual_seed(4)
        x = torch.randn(3, 16, dtype=dt)
        res = []
        for mod in (model, ref):
            torch.manual_seed(9)
            y = mod(x)
            y.pow(2).sum().backward()
            res.append(y.detach())
        _close(res[0], res[1], dt, f"y patched={patched}")
        gr = _grads(ref)
        g = _grads(model)
        assert set(g) == set(gr) and len(g) == 4, sorted(g)
        for n in g:
            _close(g[n], gr[n], dt, f"d{n} patched={patched}")


def _extra_calls(lora_calls, base_calls):
    """The collectives of the LoRA run that the base layer's run does not issue (multiset difference)."""
    rest = [(c.kind, c.payload_bytes) for c in lora_calls]
    for c in base_calls:
        rest.remove((c.kind, c.payload_bytes))
    return rest


@check(2)
def collective_bytes(rank, world):
    """Bytes of every collective of one training step (forward + backward) of a LoRA layer vs the same base layer
    under torch's ColwiseParallel / RowwiseParallel: the LoRA adds exactly two collectives of M·r·4 bytes (fp32
    xa / dxa), independent of N, never an M×N one (plain and sequence-parallel layouts)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lora_kernels.distributed import CollectiveBytes, ColwiseLoRA, RowwiseLoRA

    mesh = _mesh(world)
    dt = torch.float32
    B, S, K, r = 2, 32, 128, 8
    M = B * S
    out = {}
    cases = [
        ("colwise", lambda: ColwiseLoRA(), lambda: ColwiseParallel(), "all_gather", "reduce_scatter", None, None),
        ("colwise_sp", lambda: ColwiseLoRA(input_layouts=Shard(1), output_layouts=Shard(1)),
         lambda: ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(1)), "all_gather", "reduce_scatter", 1, 1),
        ("rowwise", lambda: RowwiseLoRA(), lambda: RowwiseParallel(), "all_reduce", "all_reduce", -1, None),
        ("rowwise_sp", lambda: RowwiseLoRA(output_layouts=Shard(1)), lambda: RowwiseParallel(output_layouts=Shard(1)),
         "all_reduce", "all_reduce", -1, 1),
    ]
    for N in (256, 512):
        for name, lora_style, base_style, fwd_kind, bwd_kind, x_dim, y_dim in cases:
            torch.manual_seed(0)
            base = nn.Linear(K, N, dtype=dt)
            lin = copy.deepcopy(base)
            lin.weight.requires_grad_(False)
            lora = _lora_linear(K, N, r, dt, bias=True)
            lora.bias.requires_grad_(False)
            parallelize_module(lin, mesh, base_style())
            parallelize_module(lora, mesh, lora_style())
            x = torch.randn(B, S, K, dtype=dt)
            x = _local_chunk(x, world, rank, x_dim) if x_dim is not None else x
            calls = []
            for mod in (lin, lora):
                xi = x.clone().requires_grad_(True)
                with CollectiveBytes() as cb:
                    mod(xi).sum().backward()
                calls.append(cb.calls)
            extra = _extra_calls(calls[1], calls[0])
            assert sorted(extra) == sorted([(fwd_kind, M * r * 4), (bwd_kind, M * r * 4)]), (name, N, extra)
            out[f"{name} N={N}"] = {
                "lora_extra": [f"{k} {b} B" for k, b in extra],
                "M*r*4": M * r * 4, "M*N*4": M * N * 4,
                "base_layer": [f"{c.kind} {c.payload_bytes} B" for c in calls[0]],
            }
    return out


@check(2)
def dtensor_rules(rank, world):
    """The DTensor rules of the custom ops: mixed Tensor/DTensor arguments and unsupported layouts raise a
    LoRAInputError naming the fix (never DTensor's "mixed torch.Tensor and DTensor"); supported layouts of
    lora_linear, merge_ and add_lora run sharded and equal the unsharded op."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import lora_kernels as lk
    from lora_kernels import LoRAInputError
    from lora_kernels.distributed import ColwiseLoRA  # noqa: F401  (registers the rules)

    mesh = _mesh(world)
    dt = torch.float64
    msgs = {}

    # 1. torch's ColwiseParallel first, then inject_lora: the adapter is plain, W0 a DTensor
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(16, 24, dtype=dt))
    parallelize_module(seq, mesh, {"0": ColwiseParallel()})
    lk.inject_lora(seq, ["0"], r=4, alpha=8)
    with pytest.raises(LoRAInputError) as ei:
        seq(torch.randn(3, 16, dtype=dt))
    msg = str(ei.value)
    assert "ColwiseLoRA" in msg and "mixed torch.Tensor and DTensor" not in msg and "plain" in msg, msg
    msgs["tp_then_inject"] = msg[:160]

    # 2. lora_linear on DTensors: supported layouts equal the unsharded op
    torch.manual_seed(1)
    x, W, A, B, bias = (torch.randn(5, 16, dtype=dt), torch.randn(24, 16, dtype=dt), torch.randn(4, 16, dtype=dt),
                        torch.randn(24, 4, dtype=dt), torch.randn(24, dtype=dt))
    layouts = {
        "replicated": ([Replicate()], [Replicate()], [Replicate()], [Replicate()], [Replicate()]),
        "token_sharded": ([Shard(0)], [Replicate()], [Replicate()], [Replicate()], [Replicate()]),
        "colwise": ([Replicate()], [Shard(0)], [Shard(0)], [Shard(0)], [Shard(0)]),
        "colwise_a_repl": ([Replicate()], [Shard(0)], [Replicate()], [Shard(0)], [Shard(0)]),
        "rowwise": ([Shard(1)], [Shard(1)], [Shard(1)], [Shard(0)], [Replicate()]),
        "rowwise_b_repl": ([Shard(1)], [Shard(1)], [Shard(1)], [Replicate()], [Replicate()]),
    }
    for (name, pls), p in [(item, p) for item in layouts.items() for p in (0.0, 0.25)]:
        dts = [distribute_tensor(t, mesh, pl) for t, pl in zip((x, W, A, B, bias), pls)]
        dx_, dW_, dA_, dB_, db_ = dts
        for t in (dx_, dA_, dB_, db_):
            t.requires_grad_(True)
        y = lk.lora_linear(dx_, dW_, dA_, dB_, 0.5, db_, dropout_p=p, seed=123)
        y.full_tensor().pow(2).sum().backward()
        xr, Ar, Br, br = (t.clone().requires_grad_(True) for t in (x, A, B, bias))
        y_ref = lk.lora_linear(xr, W, Ar, Br, 0.5, br, dropout_p=p, seed=123)
        y_ref.pow(2).sum().backward()
        _close(y, y_ref.detach(), dt, f"lora_linear {name} p={p}")
        for got, want, n in ((dx_.grad, xr.grad, "dx"), (dA_.grad, Ar.grad, "dA"), (dB_.grad, Br.grad, "dB"),
                             (db_.grad, br.grad, "dbias")):
            _close(got, want, dt, f"{n} {name} p={p}")

    # 3. mixed arguments and unsupported layouts
    Wd = distribute_tensor(W, mesh, [Shard(0)])
    with pytest.raises(LoRAInputError, match="plain") as ei:
        lk.lora_linear(x, Wd, A, B, 0.5)
    assert "ColwiseLoRA" in str(ei.value)
    bad = [distribute_tensor(t, mesh, pl) for t, pl in zip((x, W, A, B), ([Replicate()], [Shard(1)], [Shard(0)], [Shard(0)]))]
    with pytest.raises(LoRAInputError, match="no sharding rule") as ei:
        lk.lora_linear(*bad, 0.5)
    msgs["bad_layout"] = str(ei.value)[:160]
    mesh2 = _mesh(world, (1, world))
    two_d = [distribute_tensor(t, mesh2, [Replicate(), Replicate()]) for t in (x, W, A, B)]
    with pytest.raises(LoRAInputError, match="1-D"):
        lk.lora_linear(*two_d, 0.5)

    # 4. plain merge_ / unmerge_ on a sharded weight (both axes), adapters as DTensors or plain full tensors
    for wpl in (Shard(0), Shard(1)):
        Wm = W.clone()
        lk.merge_(Wm, A, B, 0.5)
        Wd = distribute_tensor(W.clone(), mesh, [wpl])
        lk.merge_(Wd, distribute_tensor(A, mesh, [Shard(0)]), B, 0.5)
        _close(Wd, Wm, dt, f"merge_ on {wpl}")
        msgs[f"merge_ {wpl}: elements differing from the unsharded merge_"] = int((Wd.full_tensor() != Wm).sum())
        lk.unmerge_(Wd, A, B, 0.5)
        _close(Wd, W, dt, f"unmerge_ on {wpl}")

    # 5. add_lora on DTensors: replicated, colwise and rowwise layouts
    L, rm = 3, 4
    xs = torch.randn(6, 16, dtype=dt)
    la, lb = torch.randn(L, rm, 16, dtype=dt), torch.randn(L, 24, rm, dtype=dt)
    ids = torch.tensor([0, 2, -1, 1, 1, 0])
    sc = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float32)
    y0 = torch.randn(6, 24, dtype=dt)
    want = lk.add_lora(y0.clone(), xs, la, lb, ids, sc)
    yd = distribute_tensor(y0.clone(), mesh, [Replicate()])
    lk.add_lora(yd, distribute_tensor(xs, mesh, [Replicate()]), distribute_tensor(la, mesh, [Replicate()]),
                distribute_tensor(lb, mesh, [Replicate()]), ids, sc)
    _close(yd, want, dt, "add_lora replicated")
    yd = distribute_tensor(y0.clone(), mesh, [Shard(1)])
    lk.add_lora(yd, distribute_tensor(xs, mesh, [Replicate()]), distribute_tensor(la, mesh, [Replicate()]),
                distribute_tensor(lb, mesh, [Shard(1)]), ids, sc)
    _close(yd, want, dt, "add_lora colwise")
    y_part = DTensor.from_local(y0.clone() if rank == 0 else torch.zeros_like(y0), mesh, [Partial()])
    lk.add_lora(y_part, distribute_tensor(xs, mesh, [Shard(1)]), distribute_tensor(la, mesh, [Shard(2)]),
                distribute_tensor(lb, mesh, [Replicate()]), ids, sc)
    _close(y_part, want, dt, "add_lora rowwise")
    yd = distribute_tensor(y0.clone(), mesh, [Shard(0)])
    lk.add_lora(yd, distribute_tensor(xs, mesh, [Shard(0)]), distribute_tensor(la, mesh, [Replicate()]),
                distribute_tensor(lb, mesh, [Replicate()]), ids, sc)
    _close(yd, want, dt, "add_lora token-sharded")

    # 6. an op without a rule refuses DTensors with a message
    with pytest.raises(LoRAInputError, match="ShardedAdapterSlots"):
        lk.lora_shrink(distribute_tensor(xs, mesh, [Replicate()]), distribute_tensor(la, mesh, [Replicate()]), ids)
    return msgs


@check(2)
def style_errors(rank, world):
    """The styles refuse what they cannot shard, with messages that say what to do."""
    from torch.distributed.tensor.parallel import parallelize_module

    import lora_kernels as lk
    from lora_kernels import LoRAInputError
    from lora_kernels.distributed import ColwiseLoRA, RowwiseLoRA

    mesh = _mesh(world)
    with pytest.raises(LoRAInputError, match="ColwiseParallel"):
        parallelize_module(nn.Linear(4, 4), mesh, ColwiseLoRA())
    with pytest.raises(LoRAInputError, match="divisible"):
        parallelize_module(_lora_linear(8, 8, 3, torch.float32), mesh, ColwiseLoRA())
    parallelize_module(_lora_linear(8, 8, 3, torch.float32), mesh, ColwiseLoRA(shard_lora_a=False))  # fine replicated
    m = _lora_linear(8, 8, 2, torch.float32)
    m.merge()
    with pytest.raises(LoRAInputError, match="unmerge"):
        parallelize_module(m, mesh, RowwiseLoRA())
    mesh2 = _mesh(world, (1, world), ("dp", "tp"))
    with pytest.raises(LoRAInputError, match="mesh\\['tp'\\]"):
        ColwiseLoRA()._apply(_lora_linear(8, 8, 2, torch.float32), mesh2)
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    emb[1].weight = emb[0].weight
    lk.inject_lora(emb, ["1"], r=2, alpha=4)
    with pytest.raises(LoRAInputError, match="tied"):
        parallelize_module(emb, mesh, {"1": ColwiseLoRA()})


@check(2)
def tp_merge_exact(rank, world):
    """LoRALinear.merge() / unmerge() on tensor-parallel shards (colwise and rowwise; bf16 and fp32): the merged
    layer's output equals the unmerged one, the merged shards equal a single-process merge of the whole weight
    (elements differing at all are counted), and unmerge() restores every shard bit for bit, three cycles."""
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.distributed import ColwiseLoRA, RowwiseLoRA, ShardedMergeRecord

    mesh = _mesh(world)
    out = {}
    for dt in (torch.bfloat16, torch.float32):
        for name, style in (("colwise", ColwiseLoRA), ("rowwise", RowwiseLoRA)):
            m = _lora_linear(48, 32, 8, dt)
            with torch.no_grad():
                m.lora_B.normal_(0, 2.0)  # a large update: many elements cross binades (the repair list is used)
            ref = copy.deepcopy(m)
            parallelize_module(m, mesh, style(use_local_output=False))
            x = torch.randn(4, 48, dtype=dt)
            x_in = x if name == "colwise" else _local_chunk(x, world, rank, -1)
            with torch.no_grad():
                y_unmerged = m(x_in).full_tensor()
            w0 = m.weight.to_local().clone()
            ref.merge()
            repairs = 0
            for cycle in range(3):
                m.merge()
                rec = m._merge_record
                assert isinstance(rec, ShardedMergeRecord)
                repairs = rec.n_repairs
                with torch.no_grad():
                    y_merged = m(x_in).full_tensor()
                _close(y_merged, y_unmerged, dt, f"merged vs unmerged output {name} {dt}")
                full = m.weight.full_tensor()
                diff = int((full != ref.weight).sum())
                _close(full, ref.weight.detach(), dt, f"merged W vs single-process merge {name} {dt}")
                m.unmerge()
                assert torch.equal(m.weight.to_local().view(torch.int8), w0.view(torch.int8)), f"unmerge not bitwise {name} {dt}"
            out[f"{name} {str(dt)[6:]}"] = {"repairs_on_rank0_shard": repairs, "elements_differing_from_1proc_merge": diff}

    # overflow on one shard only (fp16, the last rank's rows near the fp16 maximum): every rank raises and every
    # shard is restored bit for bit, so the ranks never disagree on whether the layer is merged
    import lora_kernels as lk

    m = _lora_linear(16, 8, 2, torch.float16)
    with torch.no_grad():
        m.weight[-1].fill_(65000.0)
        m.lora_B.fill_(1000.0)  # Δ = 2·(1000·1·2) = 4000: 65000 + 4000 overflows fp16
        m.lora_A.fill_(1.0)
    parallelize_module(m, mesh, ColwiseLoRA())
    w0 = m.weight.to_local().clone()
    with pytest.raises(lk.MergeOverflowError, match="over all shards"):
        m.merge()
    assert not m.merged and torch.equal(m.weight.to_local().view(torch.int16), w0.view(torch.int16))
    return out


def _fsdp_model(dt, seed=0, p=0.0):
    torch.manual_seed(seed)
    m = nn.Sequential(_lora_linear(16, 32, 4, dt, p, seed=seed), nn.ReLU(), _lora_linear(32, 8, 4, dt, p, seed=seed + 1))
    return m


@check(2)
def fsdp2_train_merge_state_dict(rank, world):
    """FSDP2 (fully_shard) on LoRALinear layers: two training steps equal single-process training on the whole batch
    (fp32); merge() / unmerge() on the sharded parameters (bf16: each rank merges its rows, round trip bit-exact);
    the merged model's full state dict loads into an unsharded LoRA model and into a plain base model whose outputs
    equal the merged single-process model; plain lora_kernels.merge_ / unmerge_ on a sharded weight."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    import lora_kernels as lk

    out = {}
    # training equivalence (fp32): each rank holds half of the batch; FSDP2 averages the gradients
    dt = torch.float32
    model, ref = _fsdp_model(dt, p=0.1), _fsdp_model(dt, p=0.1)
    lk.mark_only_lora_as_trainable(model)
    lk.mark_only_lora_as_trainable(ref)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt_r = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        torch.manual_seed(50 + step)
        X = torch.randn(world, 6, 16, dtype=dt)
        torch.manual_seed(70 + rank)  # each rank its own dropout seed, as in data parallelism
        model(X[rank]).pow(2).mean().backward()
        total = 0.0
        for r_ in range(world):
            torch.manual_seed(70 + r_)
            total = total + ref(X[r_]).pow(2).mean()
        (total / world).backward()
        gr = _grads(ref)
        for n, g in _grads(model).items():
            _close(g, gr[n], dt, f"FSDP2 d{n} step {step}")
        opt.step(); opt.zero_grad(); opt_r.step(); opt_r.zero_grad()

    # merge / unmerge on shards (bf16), merged state dict -> unsharded models
    dt = torch.bfloat16
    model, ref = _fsdp_model(dt, seed=3), _fsdp_model(dt, seed=3)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    x = torch.randn(5, 16, dtype=dt)
    with torch.no_grad():
        model(x)  # a forward first: merge happens between steps, on the resharded parameters
    shards = [model[i].weight.to_local().clone() for i in (0, 2)]
    for i in (0, 2):
        model[i].merge()
        ref[i].merge()
    with torch.no_grad():
        y_sharded_merged = model(x)
        y_ref_merged = ref(x)
    _close(y_sharded_merged, y_ref_merged, dt, "FSDP2 merged output")
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    fresh = _fsdp_model(dt, seed=99)
    fresh.load_state_dict(sd, strict=True)
    diffs = {}
    for i in (0, 2):
        diffs[f"layer{i}"] = int((fresh[i].weight != ref[i].weight).sum())
        _close(fresh[i].weight.detach(), ref[i].weight.detach(), dt, f"state-dict W layer {i}")
        assert torch.equal(fresh[i].lora_A, ref[i].lora_A) and torch.equal(fresh[i].lora_B, ref[i].lora_B)
    plain = nn.Sequential(nn.Linear(16, 32, dtype=dt), nn.ReLU(), nn.Linear(32, 8, dtype=dt))
    plain.load_state_dict({k: v for k, v in sd.items() if "lora_" not in k}, strict=True)
    with torch.no_grad():
        _close(plain(x), y_ref_merged, dt, "plain base model from the merged state dict")
    repairs = [model[i]._merge_record.n_repairs for i in (0, 2)]
    for i in (0, 2):
        model[i].unmerge()
    for i, w0 in zip((0, 2), shards):
        assert torch.equal(model[i].weight.to_local().view(torch.int16), w0.view(torch.int16)), f"unmerge layer {i}"
    # plain merge_ / unmerge_ on the sharded weight: the rows of a single-process merge_
    w_full = model[0].weight.full_tensor()
    want = w_full.clone()
    lk.merge_(want, ref[0].lora_A.detach(), ref[0].lora_B.detach(), ref[0].scale)
    lk.merge_(model[0].weight, model[0].lora_A, model[0].lora_B, model[0].scale)
    plain_diff = int((model[0].weight.full_tensor() != want).sum())
    _close(model[0].weight, want, dt, "plain merge_ on FSDP2 shards")
    lk.unmerge_(model[0].weight, model[0].lora_A, model[0].lora_B, model[0].scale)
    _close(model[0].weight, w_full, dt, "plain unmerge_ on FSDP2 shards")
    out.update({"repairs_rank0": repairs, "state_dict_W_elements_differing_from_1proc_merge": diffs,
                "plain_merge_elements_differing": plain_diff})

    # reshard_after_forward=False: after a forward the module holds unsharded copies; merge() reshards first, so the
    # merge lands in the sharded parameters (it survives the next reshard) and unmerge() restores them exactly
    layer, ref1 = _lora_linear(16, 8, 4, dt, seed=5), _lora_linear(16, 8, 4, dt, seed=5)
    fully_shard(layer, reshard_after_forward=False)
    with torch.no_grad():
        layer(x)
    w0 = layer.weight.to_local().clone() if hasattr(layer.weight, "to_local") else None
    layer.merge()
    ref1.merge()
    layer.reshard()
    with torch.no_grad():
        _close(layer(x), ref1(x), dt, "merged output after a reshard (reshard_after_forward=False)")
    layer.unmerge()
    layer.reshard()
    assert w0 is None or torch.equal(layer.weight.to_local().view(torch.int16), w0.view(torch.int16))
    ref1.unmerge()
    with torch.no_grad():
        _close(layer(x), ref1(x), dt, "unmerged output after a reshard")
    return out


@check(2)
def serving_sharded_slots(rank, world):
    """ShardedAdapterSlots: colwise (q/k/v packed) and rowwise, fully sharded (one r-wide collective per layer) and
    not (add_lora on the local shard, no collective), mixed ranks and -1 ids: the layer's output equals the
    single-process AdapterSlots; the collective's payload is M·S·r_max·4 bytes."""
    from lora_kernels.distributed import CollectiveBytes, ShardedAdapterSlots
    from lora_kernels.serving import AdapterSlots

    dt = torch.float32
    L, r_max, K, M = 4, 8, 32, 10
    out = {}
    for style, widths in (("colwise", [32, 16, 16]), ("rowwise", [32])):
        torch.manual_seed(0)
        W = [torch.randn(w, K, dtype=dt) / K ** 0.5 for w in widths]
        adapters = []
        for slot, r in enumerate((8, 4, 6)):
            adapters.append(([torch.randn(r, K, dtype=dt) for _ in widths], [torch.randn(w, r, dtype=dt) for w in widths],
                             0.5 + slot))
        if style == "colwise":  # slot 3: k left out, q and v of ranks 3 and 5 with their own scales (fill_slices)
            adapters.append(([torch.randn(3, K, dtype=dt), None, torch.randn(5, K, dtype=dt)],
                             [torch.randn(widths[0], 3, dtype=dt), None, torch.randn(widths[2], 5, dtype=dt)],
                             [1.5, None, 0.25]))
        full = AdapterSlots(L, r_max, K, widths, dtype=dt, device="cpu")
        for slot, (As, Bs, s) in enumerate(adapters):
            full.load(slot, As, Bs, s, name=f"a{slot}")
        x = torch.randn(M, K, dtype=dt)
        ids = torch.tensor([0, 1, 2, -1, 3, 2, 1, 0, 0, -1], dtype=torch.int32)
        y_full = torch.cat([x @ w.t() for w in W], dim=1)
        full.apply(y_full, x, ids)
        for fully in (True, False):
            sh = ShardedAdapterSlots(L, r_max, K, widths, style=style, fully_sharded=fully, dtype=dt, device="cpu",
                                     group=_mesh(world) if style == "rowwise" else None)
            for slot, (As, Bs, s) in enumerate(adapters):
                sh.load(slot, As, Bs, s, name=f"a{slot}")
            if style == "colwise":
                y_loc = torch.cat([x @ _local_chunk(w, world, rank, 0).t() for w in W], dim=1)
                with CollectiveBytes() as cb:
                    sh.apply(y_loc, x, ids)
                want = torch.cat([_local_chunk(c, world, rank, 1) for c in y_full.split(widths, dim=1)], dim=1)
                _close(y_loc, want, dt, f"{style} fully={fully}")
            else:
                x_loc = _local_chunk(x, world, rank, 1)
                y_part = x_loc @ _local_chunk(W[0], world, rank, 1).t()
                with CollectiveBytes() as cb:
                    sh.apply(y_part, x_loc, ids)
                dist.all_reduce(y_part)  # the engine's own all-reduce of the row-parallel output
                _close(y_part, y_full, dt, f"{style} fully={fully}")
            calls = [(c.kind, c.payload_bytes) for c in cb.calls]
            if fully:
                kind = "all_gather" if style == "colwise" else "all_reduce"
                assert calls == [(kind, M * len(widths) * r_max * 4)], calls
            else:
                assert calls == [], calls
            out[f"{style} fully_sharded={fully}"] = calls

    from lora_kernels import LoRAInputError

    with pytest.raises(LoRAInputError, match="r_max=3 must be divisible"):
        ShardedAdapterSlots(L, 3, K, [32], style="colwise")
    ShardedAdapterSlots(L, 3, K, [32], style="colwise", fully_sharded=False)  # A whole: any rank
    with pytest.raises(LoRAInputError, match="divisible"):
        ShardedAdapterSlots(L, r_max, K, [33], style="colwise")
    with pytest.raises(LoRAInputError, match="in_features must be divisible"):
        ShardedAdapterSlots(L, r_max, 33, [32], style="rowwise")
    with pytest.raises(LoRAInputError, match="style"):
        ShardedAdapterSlots(L, r_max, K, [32], style="diagonal")
    sh = ShardedAdapterSlots(L, r_max, K, [32], style="colwise", dtype=dt, device="cpu")
    with pytest.raises(LoRAInputError, match="full"):
        sh.load(0, torch.randn(4, K // 2), torch.randn(32, 4), 1.0)  # a shard instead of the full adapter
    with pytest.raises(LoRAInputError, match="y must be"):
        sh.apply(torch.zeros(M, 32), torch.zeros(M, K), torch.zeros(M, dtype=torch.int32))
    return out


@check(2)
def triton_backend_under_tp(rank, world):
    """The sharded rules pass the layer's backend to the local fused op: ColwiseLoRA (A replicated: the whole layer is
    one local fused call) and the fully sharded colwise forward with backend='triton' (CPU interpreter, fp32) equal the
    torch backend."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return {"skipped": "TRITON_INTERPRET is not set"}
    pytest.importorskip("triton")
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.distributed import ColwiseLoRA

    mesh = _mesh(world)
    dt = torch.float32
    for shard in (True, False):
        m = _lora_linear(32, 16, 4, dt)
        m.backend = "triton"
        ref = copy.deepcopy(m)
        ref.backend = "torch"
        parallelize_module(m, mesh, ColwiseLoRA(shard_lora_a=shard, use_local_output=False))
        x = torch.randn(8, 32, dtype=dt)
        with torch.no_grad():
            err = _close(m(x), ref(x), dt, f"triton colwise shard_lora_a={shard}")
    return {"triton_vs_torch_rel_err": f"{err:.1e}"}


# ----------------------------------------------------------------------------------------------
# 4 processes
# ----------------------------------------------------------------------------------------------


@check(4)
def tp4_mlp_and_bytes(rank, world):
    """tp = 4: a colwise -> rowwise LoRA MLP (fp64, dropout) equals the single-process MLP (output, dx, LoRA grads);
    the LoRA's collectives in one step are two all-gather/reduce-scatter and two all-reduce of M·r·4 bytes."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lora_kernels.distributed import CollectiveBytes, ColwiseLoRA, RowwiseLoRA

    mesh = _mesh(world)
    dt = torch.float64
    model = nn.Sequential(_lora_linear(16, 32, 8, dt, 0.1, seed=1), nn.GELU(), _lora_linear(32, 16, 8, dt, 0.1, seed=2))
    ref = copy.deepcopy(model)
    parallelize_module(model, mesh, {"0": ColwiseLoRA(), "2": RowwiseLoRA()})
    torch.manual_seed(3)
    x = torch.randn(3, 4, 16, dtype=dt)
    res = []
    for mod in (model, ref):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(8)
        y = mod(xi)
        y.pow(2).sum().backward()
        res.append((y.detach(), xi.grad))
    _close(res[0][0], res[1][0], dt, "tp4 y")
    _close(res[0][1], res[1][1], dt, "tp4 dx")
    gr = _grads(ref)
    for n, g in _grads(model).items():
        _close(g, gr[n], dt, f"tp4 d{n}")
    # bytes, fp32, no dropout
    dt = torch.float32
    base = nn.Sequential(nn.Linear(16, 32, dtype=dt), nn.GELU(), nn.Linear(32, 16, dtype=dt))
    lora = nn.Sequential(_lora_linear(16, 32, 8, dt), nn.GELU(), _lora_linear(32, 16, 8, dt))
    parallelize_module(base, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    parallelize_module(lora, mesh, {"0": ColwiseLoRA(), "2": RowwiseLoRA()})
    x = torch.randn(3, 4, 16, dtype=dt)
    calls = []
    for mod in (base, lora):
        with CollectiveBytes() as cb:
            mod(x.clone().requires_grad_(True)).sum().backward()
        calls.append(cb.calls)
    extra = _extra_calls(calls[1], calls[0])
    M, r = 12, 8
    assert sorted(extra) == sorted([("all_gather", M * r * 4), ("reduce_scatter", M * r * 4), ("all_reduce", M * r * 4),
                                    ("all_reduce", M * r * 4)]), extra
    return {"lora_extra": extra, "M*r*4": M * r * 4}


@check(4)
def fsdp2_tp_2d(rank, world):
    """FSDP2 + TP on a 2x2 (dp, tp) mesh: ColwiseLoRA / RowwiseLoRA on mesh['tp'], fully_shard on mesh['dp']; a
    training step's LoRA gradients equal single-process training on the global batch (fp64, dropout on); merge() /
    unmerge() on the 2-D shards: merged output equals the single-process merged model, round trip bit-exact."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    import lora_kernels as lk
    from lora_kernels.distributed import ColwiseLoRA, RowwiseLoRA

    mesh = _mesh(world, (2, 2), ("dp", "tp"))
    dt = torch.float64
    model = nn.Sequential(_lora_linear(16, 24, 4, dt, 0.1, seed=1), nn.ReLU(), _lora_linear(24, 8, 4, dt, 0.1, seed=2))
    ref = copy.deepcopy(model)
    lk.mark_only_lora_as_trainable(model)
    lk.mark_only_lora_as_trainable(ref)
    parallelize_module(model, mesh["tp"], {"0": ColwiseLoRA(), "2": RowwiseLoRA()})
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    dp = mesh.get_local_rank("dp")
    torch.manual_seed(5)
    X = torch.randn(2, 6, 16, dtype=dt)
    torch.manual_seed(40 + dp)  # the two TP ranks of a dp replica share the dropout seed
    model(X[dp]).pow(2).mean().backward()
    total = 0.0
    for i in range(2):
        torch.manual_seed(40 + i)
        total = total + ref(X[i]).pow(2).mean()
    (total / 2).backward()
    gr = _grads(ref)
    g = _grads(model)
    assert len(g) == 4
    placements = {}
    for n in g:
        _close(g[n], gr[n], dt, f"2-D d{n}")
        placements[n] = str(tuple(dict(model.named_parameters())[n].placements))
    w0 = [model[i].weight.to_local().clone() for i in (0, 2)]
    model.eval(); ref.eval()
    x = torch.randn(5, 16, dtype=dt)
    for i in (0, 2):
        model[i].merge()
        ref[i].merge()
    with torch.no_grad():
        _close(model(x), ref(x), dt, "2-D merged output")
    for i in (0, 2):
        model[i].unmerge()
        assert torch.equal(model[i].weight.to_local(), w0[i // 2]), f"2-D unmerge layer {i}"
    return {"param_placements": placements}


# ----------------------------------------------------------------------------------------------
# pytest entry points: one test per check, plus in-process tests
# ----------------------------------------------------------------------------------------------

_NAMES2 = [n for n, (w, _) in CHECKS.items() if w == 2]
_NAMES4 = [n for n, (w, _) in CHECKS.items() if w == 4]


@pytest.mark.parametrize("name", _NAMES2)
def test_two_processes(group2, name):
    _assert_check(group2, name)


@pytest.mark.parametrize("name", _NAMES4)
def test_four_processes(group4, name):
    _assert_check(group4, name)


def test_keep_mask_window_is_a_window_of_the_global_mask():
    from lora_kernels import reference as ref
    from lora_kernels.distributed._rules import keep_mask_window

    full = ref.dropout_keep_mask(1234, 37, 53, 0.3)
    for r0, nr, c0, nc in ((0, 37, 0, 53), (5, 11, 17, 20), (36, 1, 52, 1), (0, 37, 26, 27)):
        assert torch.equal(keep_mask_window(1234, r0, nr, c0, nc, 0.3), full[r0:r0 + nr, c0:c0 + nc])
    assert not torch.equal(keep_mask_window(1234, 0, 37, 1, 52, 0.3), full[:, :52])  # the offset matters


def test_import_lora_kernels_does_not_import_the_distributed_package():
    import subprocess
    import sys

    code = "import sys, lora_kernels; assert 'lora_kernels.distributed' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_collective_bytes_counts_plain_collectives_without_a_process_group_of_many():
    """CollectiveBytes on a 1-process gloo group: a plain all_reduce is recorded with its payload."""
    from lora_kernels.distributed import CollectiveBytes

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        t = torch.ones(7, 3)
        with CollectiveBytes() as cb:
            dist.all_reduce(t)
        assert [(c.kind, c.payload_bytes) for c in cb.calls] == [("all_reduce", 7 * 3 * 4)]
    finally:
        dist.destroy_process_group()


def test_readme_torchrun_example_runs_as_written():
    """README "Scaling out": `torchrun --nproc-per-node 2 examples/tp_lora_torchrun.py` (gloo on the CPU) runs, and
    its tensor-parallel losses equal the single-process replica's."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "LORA_KERNELS_"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(root / "examples" / "tp_lora_torchrun.py")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    diffs = [float(d) for d in re.findall(r"step \d+: .*\|diff\| ([0-9.e+-]+)", out.stdout)]
    assert len(diffs) == 5 and max(diffs) < 1e-5, out.stdout
    assert "reduce_scatter" in out.stdout and "merged vs unmerged output" in out.stdout, out.stdout
