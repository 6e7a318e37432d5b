"""How the lora_kernels custom ops run on DTensor inputs: one rule per op, registered with DTensor's dispatcher.

Why not ``torch.distributed.tensor.experimental.register_sharding``: a registered strategy only maps input
placements to output placements around one local call of the op, and DTensor checks for plain ``torch.Tensor``
arguments (the "mixed torch.Tensor and DTensor" error) before any strategy is consulted. The fully sharded LoRA
schemes need a collective *inside* the op — between the shrink ``xa = drop(x)·Aᵀ`` and the expand ``s·xa·Bᵀ`` — and
a mixed call must be answered with a message that names the fix. So each op gets a DTensor op handler (the
mechanism torch's own ``loss_parallel`` and context parallel use): it checks the arguments, picks the scheme
from the parameters' placements (table below), redistributes *activations* when their layout differs from the
scheme's (as a strategy would), never a base weight, runs the local computation with the r-wide collective,
and wraps the outputs as DTensors with the placements the scheme defines. Any other layout raises
:class:`lora_kernels.LoRAInputError` naming what was received and how to fix it.

``lora_linear_fwd`` / ``lora_linear_bwd`` (x [M, K], W0 [N, K], A [r, K], B [N, r], bias [N]; 1-D mesh of p ranks):

=================  =====  =======  =======  =======  =========  ============================  ====================
scheme             x      W0       A        B        bias       forward collective            backward collective
=================  =====  =======  =======  =======  =========  ============================  ====================
replicated         R/S0   R        R        R        R          none                          none (grads Partial
                                                                                               for token-sharded x)
colwise            R      S0       S0       S0       S0         all-gather xa [M, r]          reduce-scatter dxa
                                                                                               [M, r]
colwise (A repl.)  R      S0       R        S0       S0         none                          none (dA Partial)
rowwise            S1     S1       S1       S0       R          all-reduce xa [M, r]          all-reduce dxa [M, r]
rowwise (B repl.)  S1     S1       S1       R        R          none (y, xa Partial)          none (dB Partial)
=================  =====  =======  =======  =======  =========  ============================  ====================

Outputs: colwise y is Shard(1) and dx Partial (the base layer's own backward all-reduce / reduce-scatter of dx
carries the LoRA term too); rowwise y is Partial — each rank's slice of the LoRA output is added into its partial
sum (the bias on the first rank only), so the base layer's all-reduce carries both.

Dropout masks are the hash of (seed, global row, global column), so a rank holding columns [k0, k1) of x uses
columns k0.. of the mask: sharded results equal the single-process ones when every rank of the group draws the
same seed (seed torch identically on every rank, as DTensor's random ops require too).

``merge_`` (plain merge, in place on W0): W0 sharded any way (TP, FSDP2, both); each rank merges its own block
with the matching rows of B and columns of A (adapters may be DTensors or plain full tensors). ``add_lora_``:
replicated, token-sharded, colwise (y Shard(1), B Shard(1), one output slice) and rowwise (y Partial, x Shard(1),
A Shard(2)) layouts; serving engines use :class:`lora_kernels.distributed.ShardedAdapterSlots` on local tensors.
Every other lora_kernels op refuses DTensor inputs with a message.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from .. import reference as ref
from .._checks import LoRAInputError
from ._comm import all_gather_cols, all_reduce, reduce_scatter_cols

__all__ = ["register", "keep_mask_window", "FIX_MIXED"]

_ops = torch.ops.lora_kernels

FIX_MIXED = (
    "A LoRA layer is sharded as a whole: put lora_kernels.distributed.ColwiseLoRA() / RowwiseLoRA() for it in the "
    "parallelize_module plan (after inject_lora or lora_kernels.peft.patch; torch's ColwiseParallel / RowwiseParallel "
    "shard only a plain nn.Linear and leave lora_A / lora_B as plain tensors), or make every tensor argument a DTensor "
    "on the same mesh (distribute_tensor), or call the op on the local shards (.to_local())"
)
_FIX_LAYOUT = (
    "Shard LoRA layers with lora_kernels.distributed.ColwiseLoRA() / RowwiseLoRA(), which place W0, bias, lora_A and "
    "lora_B consistently, or redistribute the parameters to one of the supported layouts"
)


# ----------------------------------------------------------------------------------------------
# Dropout mask for a window of x (global row / column offsets)
# ----------------------------------------------------------------------------------------------


def keep_mask_window(seed: int, row0: int, rows: int, col0: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Rows [row0, row0+rows) and columns [col0, col0+cols) of ``reference.dropout_keep_mask(seed, ·, ·, p)``,
    bool [rows, cols] (the same hash, evaluated at global coordinates; built in row blocks)."""
    seed_h = ref.dropout_seed_hash(int(seed))
    thr = ref.dropout_threshold(p)
    shift = 32 - ref.DROPOUT_HASH_BITS
    row_h = ref._mix32(torch.arange(row0, row0 + rows, dtype=torch.int64, device=device) + seed_h)
    k = torch.arange(col0, col0 + cols, dtype=torch.int64, device=device)
    out = torch.empty((rows, cols), dtype=torch.bool, device=device)
    step = max(1, (1 << 18) // max(cols, 1))
    for r in range(0, rows, step):
        h = ref._mix32(row_h[r:r + step, None] + k[None, :])
        out[r:r + step] = (h >> shift) >= thr
    return out


def _drop(t: torch.Tensor, p: float, seed: int, row0: int, col0: int, keep=None) -> torch.Tensor:
    """``t · keep / (1 − p)`` with the mask window at (row0, col0) (t itself when p == 0); ``keep``: that window of
    the mask, already computed (the local block of a ``lora_dropout_keep`` result)."""
    if p == 0.0:
        return t
    if keep is None:
        keep = keep_mask_window(seed, row0, t.shape[0], col0, t.shape[1], p, device=t.device)
    return t * keep.to(t.dtype) * (1.0 / (1.0 - p))


# ----------------------------------------------------------------------------------------------
# Argument handling
# ----------------------------------------------------------------------------------------------


def _bind(op, args, kwargs) -> Dict[str, object]:
    names = [a.name for a in op._schema.arguments]
    vals = dict(zip(names, args))
    vals.update(kwargs or {})
    for a in op._schema.arguments:
        if a.name not in vals:
            vals[a.name] = a.default_value if a.has_default_value() else None
    return vals


def _describe(t) -> str:
    if isinstance(t, DTensor):
        return f"DTensor{list(t.shape)} placements={tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh {tuple(t.device_mesh.shape)}"
    return f"torch.Tensor{list(t.shape)}"


def _check_all_dtensor(opname: str, named: Dict[str, Optional[torch.Tensor]]) -> None:
    present = {n: t for n, t in named.items() if isinstance(t, torch.Tensor)}
    plain = [n for n, t in present.items() if not isinstance(t, DTensor)]
    if plain and len(plain) < len(present):
        lines = ", ".join(f"{n}: {_describe(t)}" for n, t in present.items())
        raise LoRAInputError(
            f"lora_kernels.{opname}: got DTensor and plain torch.Tensor arguments together ({', '.join(plain)} "
            f"{'is' if len(plain) == 1 else 'are'} plain): {lines}. {FIX_MIXED}."
        )


def _mesh_of(opname: str, tensors: Sequence[Optional[torch.Tensor]]):
    dts = [t for t in tensors if isinstance(t, DTensor)]
    mesh = dts[0].device_mesh
    for t in dts[1:]:
        if t.device_mesh != mesh:
            raise LoRAInputError(
                f"lora_kernels.{opname}: DTensor arguments live on different device meshes ({mesh} and {t.device_mesh}); "
                "put every tensor of the layer on the same (tensor-parallel) mesh"
            )
    if mesh.ndim != 1:
        raise LoRAInputError(
            f"lora_kernels.{opname}: DTensor arguments on a {mesh.ndim}-D mesh {tuple(mesh.shape)}; the LoRA rules take a "
            "1-D (tensor-parallel) mesh. Parallelize with mesh['tp'] (FSDP2 on mesh['dp'] gathers its own dimension "
            "before the forward, so the op sees the 1-D TP mesh)"
        )
    return mesh


def _pl(t: Optional[torch.Tensor]):
    """Normalised placement on a 1-D mesh: 'R', 'P', ('S', dim) or None for a missing tensor."""
    if t is None:
        return None
    p = t.placements[0]
    if isinstance(p, Replicate):
        return "R"
    if isinstance(p, Partial):
        return "P"
    if isinstance(p, Shard):
        return ("S", p.dim % max(t.ndim, 1))
    return repr(p)  # _StridedShard and others: never matched


def _shard_range(size: int, mesh) -> Tuple[int, int]:
    """[start, stop) of this rank's Shard chunk of a dim of ``size`` elements (torch.chunk semantics, as DTensor)."""
    p, i = mesh.size(0), mesh.get_local_rank(0)
    chunk = -(-size // p) if size else 0
    start = min(i * chunk, size)
    return start, min(start + chunk, size)


def _wrap(local: torch.Tensor, mesh, placement, shape) -> DTensor:
    shape = tuple(shape)
    stride = torch.empty(shape, device="meta").stride() if len(shape) else ()
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=torch.Size(shape), stride=stride)


def _to(t: DTensor, placement) -> DTensor:
    """Redistribute an activation to the scheme's placement (a no-op when it already has it)."""
    if t.placements[0] == placement:
        return t
    return t.redistribute(t.device_mesh, [placement])


def _layout_error(opname: str, named: Dict[str, Optional[torch.Tensor]]) -> LoRAInputError:
    lines = "; ".join(f"{n}: {_describe(t)}" for n, t in named.items() if isinstance(t, torch.Tensor))
    return LoRAInputError(
        f"lora_kernels.{opname}: no sharding rule for this layout ({lines}). Supported (W0, lora_A, lora_B, bias): "
        "replicated (R, R, R, R), colwise (Shard(0), Shard(0) or R, Shard(0), Shard(0)), rowwise (Shard(1), Shard(1), "
        f"Shard(0) or R, R). {_FIX_LAYOUT}"
    )


def _scheme(W, A, B, bias) -> Optional[str]:
    w, a, b, c = _pl(W), _pl(A), _pl(B), _pl(bias)
    if w == "R" and a == "R" and b == "R" and c in (None, "R"):
        return "replicated"
    if w == ("S", 0) and b == ("S", 0) and c in (None, ("S", 0)):
        if a == ("S", 0):
            return "colwise"
        if a == "R":
            return "colwise_a_repl"
    if w == ("S", 1) and a == ("S", 1) and c in (None, "R"):
        if b == ("S", 0):
            return "rowwise"
        if b == "R":
            return "rowwise_b_repl"
    return None


_SEED_CHECKED = set()


def _check_seed_once(seed: int, p: float, mesh) -> None:
    """First dropout call on a group: warn if the ranks drew different seeds (results would then differ from a
    single-process run; they stay a consistent forward/backward pair either way). One 8-byte all-gather, once."""
    if p == 0.0 or torch.compiler.is_compiling():
        return
    key = id(mesh.get_group(0))
    if key in _SEED_CHECKED:
        return
    _SEED_CHECKED.add(key)
    group = mesh.get_group(0)
    t = torch.tensor([int(seed)], dtype=torch.int64, device=mesh.device_type if mesh.device_type != "cpu" else "cpu")
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    if len({int(o) for o in out}) > 1:
        import warnings

        warnings.warn(
            "lora_kernels.distributed: the ranks of a tensor-parallel group drew different LoRA dropout seeds; the "
            "dropout masks then differ from a single-process run. Seed torch identically on every rank "
            "(torch.manual_seed) or pass seed= explicitly.",
            RuntimeWarning,
            stacklevel=2,
        )


# ----------------------------------------------------------------------------------------------
# lora_linear_fwd / lora_linear_bwd
# ----------------------------------------------------------------------------------------------


def _acc(dtype):
    return ref.compute_dtype(dtype)


def _seed_of(v) -> int:
    seed_t = v.get("seed_tensor")
    if seed_t is None:
        return int(v["seed"])
    return int(seed_t.to_local() if isinstance(seed_t, DTensor) else seed_t)


def _keep_local(v, x_placement):
    """The local block of a ``keep`` mask argument when it is laid out like x (else None: regenerate)."""
    keep = v.get("keep")
    if isinstance(keep, DTensor) and keep.placements[0] == x_placement:
        return keep.to_local()
    return None


def _fwd_op(x, W, A, B, s, bias, p, seed, backend, keep=None):
    """The local fused op (``keep`` only when there is one: older schemas have no such argument)."""
    if keep is None:
        return _ops.lora_linear_fwd(x, W, A, B, s, bias, p, seed, backend)
    return _ops.lora_linear_fwd(x, W, A, B, s, bias, p, seed, backend, keep=keep)


def _bwd_op(dy, x, xa, W, A, B, s, p, seed, mask, backend, keep=None):
    if keep is None:
        return _ops.lora_linear_bwd(dy, x, xa, W, A, B, s, p, seed, mask, backend)
    return _ops.lora_linear_bwd(dy, x, xa, W, A, B, s, p, seed, mask, backend, keep=keep)


def _fwd_local_math(x, W, A, B, bias, s, p, seed, row0, col0, keep=None):
    """y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ on local tensors with the dropout window at (row0, col0)."""
    acc = _acc(x.dtype)
    xa = _drop(x, p, seed, row0, col0, keep).to(acc) @ A.to(acc).t()
    y = torch.nn.functional.linear(x, W, bias)
    y = (y.to(acc) + s * (xa @ B.to(acc).t())).to(x.dtype)
    return y, xa


def _bwd_local_math(dy, x, xa, W, A, B, s, p, seed, mask, row0, col0, dxa=None, keep=None):
    """(dx, dA, dB, dW) on local tensors; ``dxa`` given: use it instead of s·dy·B (the reduced one)."""
    need_dx, need_da, need_db, need_dw = mask
    acc = _acc(dy.dtype)
    dyc = dy.to(acc)
    if dxa is None and (need_dx or need_da):
        dxa = s * (dyc @ B.to(acc))
    dx = da = db = dw = None
    if need_db:
        db = (s * (dyc.t() @ xa.to(acc))).to(B.dtype)
    if need_da:
        da = (dxa.t() @ _drop(x, p, seed, row0, col0, keep).to(acc)).to(A.dtype)
    if need_dx:
        g = _drop(dxa @ A.to(acc), p, seed, row0, col0, keep)
        dx = ((dy @ W).to(acc) + g).to(dy.dtype)
    if need_dw:
        dw = (dy.t() @ x).to(W.dtype)
    return dx, da, db, dw


def _lora_linear_fwd_rule(op, args, kwargs):
    v = _bind(op, args, kwargs)
    x, W, A, B, bias = v["x"], v["weight"], v["lora_a"], v["lora_b"], v["bias"]
    named = {"x": x, "weight": W, "lora_a": A, "lora_b": B, "bias": bias}
    _check_all_dtensor("lora_linear", named)
    mesh = _mesh_of("lora_linear", list(named.values()))
    s, p, backend = float(v["scale"]), float(v["dropout_p"]), v["backend"]
    seed = _seed_of(v) if p > 0.0 else 0  # (no host read of a seed tensor when there is no dropout)
    scheme = _scheme(W, A, B, bias)
    if scheme is None:
        raise _layout_error("lora_linear", named)
    _check_seed_once(seed, p, mesh)
    M, K = x.shape
    N, r = W.shape[0], A.shape[0]
    group = mesh.get_group(0)
    tp, me = mesh.size(0), mesh.get_local_rank(0)
    Wl, Al, Bl = W.to_local(), A.to_local(), B.to_local()
    bl = bias.to_local() if bias is not None else None

    if scheme == "replicated":
        xp = _pl(x)
        if xp not in ("R", ("S", 0)):
            x = _to(x, Replicate())
            xp = "R"
        xl = x.to_local()
        keep = _keep_local(v, x.placements[0])
        row0 = _shard_range(M, mesh)[0] if xp == ("S", 0) else 0
        if p == 0.0 or row0 == 0:
            y, xa = _fwd_op(xl, Wl, Al, Bl, s, bl, p, seed, backend, keep)
        else:
            y, xa = _fwd_local_math(xl, Wl, Al, Bl, bl, s, p, seed, row0, 0, keep)
        out_pl = Replicate() if xp == "R" else Shard(0)
        return _wrap(y, mesh, out_pl, (M, N)), _wrap(xa, mesh, out_pl, (M, r))

    if scheme in ("colwise", "colwise_a_repl"):
        x = _to(x, Replicate())
        xl = x.to_local()
        keep = _keep_local(v, Replicate())
        if scheme == "colwise_a_repl":
            y, xa = _fwd_op(xl, Wl, Al, Bl, s, bl, p, seed, backend, keep)
        else:
            if r % tp:
                raise LoRAInputError(f"lora_kernels.lora_linear: colwise LoRA shards lora_A by rank: r={r} must be divisible "
                                     f"by the tensor-parallel size {tp}")
            R = r // tp
            own = slice(me * R, (me + 1) * R)
            # one fused call: base + bias + this rank's block of the rank dimension, and its shrink xa_own
            y, xa_own = _fwd_op(xl, Wl, Al, Bl[:, own].contiguous(), s, bl, p, seed, backend, keep)
            xa = all_gather_cols(xa_own, group)  # [M, r]: the r-wide collective
            if tp > 1:
                acc = xa.dtype
                others = [j for j in range(tp) if j != me]
                xa_o = xa.view(M, tp, R)[:, others].reshape(M, -1)
                b_o = Bl.view(Bl.shape[0], tp, R)[:, others].reshape(Bl.shape[0], -1)
                y = (y.to(acc) + s * (xa_o @ b_o.to(acc).t())).to(y.dtype)
        return _wrap(y, mesh, Shard(1), (M, N)), _wrap(xa, mesh, Replicate(), (M, r))

    # rowwise
    xl = _to(x, Shard(1)).to_local()
    k0 = _shard_range(K, mesh)[0]
    acc = _acc(xl.dtype)
    xa = _drop(xl, p, seed, 0, k0, _keep_local(v, Shard(1))).to(acc) @ Al.to(acc).t()  # partial over ranks
    y = torch.nn.functional.linear(xl, Wl, bl if me == 0 else None)  # the bias enters the partial sum once
    if scheme == "rowwise":
        xa = all_reduce(xa, group)  # the r-wide collective
        n0, n1 = _shard_range(N, mesh)
        y[:, n0:n1] = (y[:, n0:n1].to(acc) + s * (xa @ Bl.to(acc).t())).to(y.dtype)
        xa_pl = Replicate()
    else:
        y = (y.to(acc) + s * (xa @ Bl.to(acc).t())).to(y.dtype)  # partial xa times the full B: still a partial sum
        xa_pl = Partial()
    return _wrap(y, mesh, Partial(), (M, N)), _wrap(xa, mesh, xa_pl, (M, r))


def _empty_like_grads(mask, grads, templates, mesh):
    return tuple(
        g if want else _wrap(t.to_local().new_empty(0), mesh, Replicate(), (0,))
        for want, g, t in zip(mask, grads, templates)
    )


def _lora_linear_bwd_rule(op, args, kwargs):
    v = _bind(op, args, kwargs)
    dy, x, xa, W, A, B = v["dy"], v["x"], v["xa"], v["weight"], v["lora_a"], v["lora_b"]
    named = {"dy": dy, "x": x, "xa": xa, "weight": W, "lora_a": A, "lora_b": B}
    _check_all_dtensor("lora_linear (backward)", named)
    mesh = _mesh_of("lora_linear (backward)", list(named.values()))
    s, p, backend = float(v["scale"]), float(v["dropout_p"]), v["backend"]
    seed = _seed_of(v) if p > 0.0 else 0  # (no host read of a seed tensor when there is no dropout)
    mask = [bool(m) for m in v["output_mask"]]
    scheme = _scheme(W, A, B, None)
    if scheme is None:
        raise _layout_error("lora_linear (backward)", named)
    M, N = dy.shape
    K, r = W.shape[1], A.shape[0]
    group = mesh.get_group(0)
    tp, me = mesh.size(0), mesh.get_local_rank(0)
    Wl, Al, Bl = W.to_local(), A.to_local(), B.to_local()
    templates = (x if x is not None else dy, A, B, W)
    shapes = ((M, K), tuple(A.shape), tuple(B.shape), tuple(W.shape))

    def finish(local_grads, placements):
        out = []
        for want, g, pl, shp in zip(mask, local_grads, placements, shapes):
            out.append(_wrap(g, mesh, pl, shp) if want else None)
        return _empty_like_grads(mask, out, templates, mesh)

    if scheme == "replicated":
        tok = _pl(xa) == ("S", 0)
        want = Shard(0) if tok else Replicate()
        dyl = _to(dy, want).to_local()
        xl = _to(x, want).to_local() if x is not None else None
        xal = _to(xa, want).to_local()
        row0 = _shard_range(M, mesh)[0] if tok else 0
        keep = _keep_local(v, want)
        if p == 0.0 or row0 == 0:
            g = _bwd_op(dyl, xl, xal, Wl, Al, Bl, s, p, seed, mask, backend, keep)
        else:
            g = _bwd_local_math(dyl, xl, xal, Wl, Al, Bl, s, p, seed, mask, row0, 0, keep=keep)
        par = Partial() if tok else Replicate()
        return finish(g, (want, par, par, par))

    if scheme in ("colwise", "colwise_a_repl"):
        dyl = _to(dy, Shard(1)).to_local()
        xl = _to(x, Replicate()).to_local() if x is not None else None
        xal = _to(xa, Replicate()).to_local()
        keep = _keep_local(v, Replicate())
        if scheme == "colwise_a_repl":
            g = _bwd_op(dyl, xl, xal, Wl, Al, Bl, s, p, seed, mask, backend, keep)
            return finish(g, (Partial(), Partial(), Shard(0), Shard(0)))
        acc = _acc(dyl.dtype)
        dxa = None
        if mask[0] or mask[1]:
            dxa = reduce_scatter_cols(s * (dyl.to(acc) @ Bl.to(acc)), group)  # this rank's [M, r/p]: the r-wide collective
        g = _bwd_local_math(dyl, xl, xal, Wl, Al, Bl, s, p, seed, mask, 0, 0, dxa=dxa, keep=keep)
        return finish(g, (Partial(), Shard(0), Shard(0), Shard(0)))

    # rowwise
    dyl = _to(dy, Replicate()).to_local()
    xl = _to(x, Shard(1)).to_local() if x is not None else None
    k0 = _shard_range(K, mesh)[0]
    acc = _acc(dyl.dtype)
    keep = _keep_local(v, Shard(1))
    if scheme == "rowwise":
        xal = _to(xa, Replicate()).to_local()
        n0, n1 = _shard_range(N, mesh)
        dy_own = dyl[:, n0:n1]
        dxa = None
        if mask[0] or mask[1]:
            dxa = all_reduce(s * (dy_own.to(acc) @ Bl.to(acc)), group)  # [M, r]: the r-wide collective
        dx, da, _, dw = _bwd_local_math(dyl, xl, xal, Wl, Al, Bl, s, p, seed, [mask[0], mask[1], False, mask[3]], 0, k0,
                                        dxa=dxa, keep=keep)
        db = (s * (dy_own.to(acc).t() @ xal.to(acc))).to(Bl.dtype) if mask[2] else None
        return finish((dx, da, db, dw), (Shard(1), Shard(1), Shard(0), Shard(1)))
    xal = xa.to_local() if _pl(xa) == "P" else _to(xa, Replicate()).to_local()
    g = _bwd_local_math(dyl, xl, xal, Wl, Al, Bl, s, p, seed, mask, 0, k0, keep=keep)
    db_pl = Partial() if _pl(xa) == "P" else Replicate()
    return finish(g, (Shard(1), Shard(1), db_pl, Shard(1)))


def _dropout_keep_rule(op, args, kwargs):
    """The keep-mask of drop(x), laid out like x: each rank hashes its own block at global coordinates."""
    v = _bind(op, args, kwargs)
    x = v["x"]
    mesh = _mesh_of("lora_linear", [x])
    p, seed = float(v["dropout_p"]), _seed_of(v)
    M, K = x.shape
    if _pl(x) not in ("R", ("S", 0), ("S", 1)):
        x = _to(x, Replicate())
    row0 = _shard_range(M, mesh)[0] if _pl(x) == ("S", 0) else 0
    col0 = _shard_range(K, mesh)[0] if _pl(x) == ("S", 1) else 0
    xl = x.to_local()
    keep = keep_mask_window(seed, row0, xl.shape[0], col0, xl.shape[1], p, device=xl.device).to(torch.uint8)
    return _wrap(keep, mesh, x.placements[0], (M, K))


# ----------------------------------------------------------------------------------------------
# merge_ (plain merge, in place)
# ----------------------------------------------------------------------------------------------


def local_box(weight: torch.Tensor) -> Tuple[int, int, int, int]:
    """(row0, rows, col0, cols) of this rank's block of a 2-D DTensor weight, in global indices. Raises if the
    local block is not one contiguous rectangle of the global matrix."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    local = weight.to_local()
    if tuple(local.shape) != tuple(shape):
        raise LoRAInputError(
            f"lora_kernels: cannot locate this rank's block of a weight with placements {tuple(weight.placements)} "
            f"(local shape {list(local.shape)}, expected {list(shape)}); merge an unsharded copy instead"
        )
    return int(offset[0]), int(shape[0]), int(offset[1]), int(shape[1])


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The global tensor of a DTensor (gathered: r-wide adapters only), or t itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def adapter_block(weight: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]):
    """The columns of each A and rows of each B that this rank's block of ``weight`` (a DTensor) needs."""
    r0, nr, c0, nc = local_box(weight)
    a_loc = [full_tensor(a).detach()[:, c0:c0 + nc] for a in lora_a]
    b_loc = [full_tensor(b).detach()[r0:r0 + nr] for b in lora_b]
    return a_loc, b_loc


def _merge_rule(op, args, kwargs):
    v = _bind(op, args, kwargs)
    W, As, Bs = v["weight"], list(v["lora_a"]), list(v["lora_b"])
    if not isinstance(W, DTensor):
        raise LoRAInputError(
            "lora_kernels.merge_: the adapters are DTensors but the weight is a plain tensor; merge into the sharded "
            "weight (a DTensor) or pass plain full adapters (.full_tensor())"
        )
    a_loc, b_loc = adapter_block(W, As, Bs)
    Wl = W.to_local()
    _ops.merge_(Wl, [a.contiguous() for a in a_loc], [b.contiguous() for b in b_loc], list(v["scales"]), v["backend"])
    torch.autograd.graph.increment_version(W)
    return None


# ----------------------------------------------------------------------------------------------
# add_lora_ (serving, in place on y)
# ----------------------------------------------------------------------------------------------


def _small_local(t, M_rows: Optional[Tuple[int, int]] = None):
    """ids / scales / ranks / meta tensors: DTensor -> local (Replicate or, for ids, Shard(0)); plain -> itself,
    sliced to this rank's tokens when the batch is token-sharded."""
    if t is None:
        return None
    if isinstance(t, DTensor):
        return t.to_local() if _pl(t) in ("R", ("S", 0)) else t.full_tensor()
    if M_rows is not None:
        return t[M_rows[0]:M_rows[1]]
    return t


def _add_lora_rule(op, args, kwargs):
    v = _bind(op, args, kwargs)
    y, x, As, Bs = v["y"], v["x"], list(v["lora_a"]), list(v["lora_b"])
    named = {"y": y, "x": x, **{f"lora_a[{i}]": a for i, a in enumerate(As)}, **{f"lora_b[{i}]": b for i, b in enumerate(Bs)}}
    _check_all_dtensor("add_lora", named)
    mesh = _mesh_of("add_lora", list(named.values()))
    py, px = _pl(y), _pl(x)
    pa, pb = {_pl(a) for a in As}, {_pl(b) for b in Bs}
    ids, scales, ranks = v["adapter_ids"], v["scales"], v["ranks"]
    meta = ()
    if pa == {"R"} and pb == {"R"} and py == "R" and px == "R":
        rows = None
        meta = (v.get("sorted_token_ids"), v.get("tiles"), v.get("block_m") or 0)
    elif pa == {"R"} and pb == {"R"} and py == ("S", 0) and px == ("S", 0):
        rows = _shard_range(y.shape[0], mesh) if not isinstance(ids, DTensor) else None
    elif pa == {"R"} and pb == {("S", 1)} and py == ("S", 1) and px == "R" and len(Bs) == 1:
        rows = None
    elif pa == {("S", 2)} and pb == {"R"} and py == "P" and px == ("S", 1):
        rows = None
    else:
        raise LoRAInputError(
            f"lora_kernels.add_lora: no sharding rule for this layout ({'; '.join(f'{n}: {_describe(t)}' for n, t in named.items())}). "
            "Supported: everything replicated; token-sharded y and x (Shard(0)) with replicated adapters; colwise "
            "(y Shard(1), x replicated, lora_a replicated, lora_b Shard(1), one output slice); rowwise (y Partial, "
            "x Shard(1), lora_a Shard(2), lora_b replicated). Tensor-parallel serving engines use "
            "lora_kernels.distributed.ShardedAdapterSlots on local tensors (one r-wide collective per layer)"
        )
    yl, xl = y.to_local(), x.to_local()
    al = [a.to_local() for a in As]
    bl = [b.to_local() for b in Bs]
    extra = []
    if meta and meta[0] is not None:
        extra = [_small_local(meta[0]), _small_local(meta[1]), int(meta[2])]
    _ops.add_lora_(yl, xl, al, bl, _small_local(ids, rows), _small_local(scales), _small_local(ranks), v["backend"], *extra)
    torch.autograd.graph.increment_version(y)
    return None


# ----------------------------------------------------------------------------------------------
# Everything else: a clear refusal
# ----------------------------------------------------------------------------------------------


def _refuse(op, args, kwargs):
    name = op._schema.name.split("::")[-1]
    raise LoRAInputError(
        f"lora_kernels.{name}: DTensor arguments are not supported by this op. Run it on the local shards "
        "(.to_local()) with the collective your layout needs; for tensor-parallel serving use "
        "lora_kernels.distributed.ShardedAdapterSlots (lora_shrink / lora_expand_ on the local shard and one r-wide "
        "collective per layer)"
    )


_REGISTERED = False


def register() -> None:
    """Install the rules (idempotent). Called when ``lora_kernels.distributed`` is imported."""
    global _REGISTERED
    if _REGISTERED:
        return
    from ..ops import SCHEMAS

    handlers = getattr(getattr(DTensor, "_op_dispatcher", None), "_custom_op_handlers", None)
    if not isinstance(handlers, dict):  # pragma: no cover - a torch without DTensor's op-handler table
        raise ImportError("lora_kernels.distributed: this torch's DTensor has no custom op-handler table "
                          "(DTensor._op_dispatcher._custom_op_handlers, present in torch 2.5 - 2.13); the LoRA rules "
                          "cannot be registered")
    rules = {"lora_linear_fwd": _lora_linear_fwd_rule, "lora_linear_bwd": _lora_linear_bwd_rule,
             "lora_dropout_keep": _dropout_keep_rule, "merge_": _merge_rule, "add_lora_": _add_lora_rule}
    for name in SCHEMAS:
        handlers[getattr(torch.ops.lora_kernels, name).default] = rules.get(name, _refuse)
    _REGISTERED = True
