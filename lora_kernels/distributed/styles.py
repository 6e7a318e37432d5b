"""ParallelStyles for LoRA layers: ``ColwiseLoRA`` and ``RowwiseLoRA`` for torch's ``parallelize_module`` plans.

They are torch's ``ColwiseParallel`` / ``RowwiseParallel`` (same input / output layout handling, so sequence
parallelism composes exactly as with torch's styles) with a partition function that also shards the adapter:

==========  =========  =========  ======================  ==================  ==========================
style       W0 [N, K]  bias [N]   lora_A [r, K]           lora_B [N, r]       collective the LoRA adds
==========  =========  =========  ======================  ==================  ==========================
colwise     Shard(0)   Shard(0)   Shard(0): by rank       Shard(0)            all-gather xa [M, r] (fwd),
                                  (Replicate with                             reduce-scatter dxa (bwd)
                                  ``shard_lora_a=False``)                     (none when A is replicated)
rowwise     Shard(1)   Replicate  Shard(1)                Shard(0): by output  all-reduce xa [M, r] (fwd),
                                                          (Replicate with      all-reduce dxa (bwd)
                                                          ``shard_lora_b=False``) (none when B is replicated)
==========  =========  =========  ======================  ==================  ==========================

The layer's own forward is unchanged: it calls the lora_kernels ops with DTensor parameters and DTensor's
dispatcher runs them with the rules of ``lora_kernels.distributed._rules`` (the vLLM / S-LoRA fully sharded
scheme). Works for :class:`lora_kernels.LoRALinear` and for PEFT ``lora.Linear`` layers (patched by
``lora_kernels.peft.patch`` for the fused path; unpatched ones run PEFT's forward on DTensors, whose
collectives DTensor chooses). Apply the styles after ``inject_lora`` / ``peft.patch`` and with the adapter
unmerged.
"""

from __future__ import annotations

from functools import partial
from typing import List, Tuple

import torch
from torch import nn
from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

import lora_kernels as _lk  # the public API (LoRALinear), not lora_kernels.modules: see distributed/__init__.py

from .._checks import LoRAInputError

__all__ = ["ColwiseLoRA", "RowwiseLoRA", "lora_parameters"]


def _is_peft_lora_linear(module: nn.Module) -> bool:
    return (
        hasattr(module, "base_layer")
        and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
    )


def lora_parameters(module: nn.Module, who: str) -> List[Tuple[nn.Module, str, str]]:
    """(owner module, parameter name, role) of every parameter a LoRA style places; role is one of
    "weight", "bias", "lora_A", "lora_B". Raises LoRAInputError for modules the styles cannot shard."""
    if isinstance(module, _lk.LoRALinear):
        if module.merged:
            raise LoRAInputError(f"{who}: the LoRALinear is merged; unmerge() before parallelizing (or parallelize, then merge)")
        if module.tied_to:
            raise LoRAInputError(
                f"{who}: the LoRALinear's weight is tied to {', '.join(module.tied_to)}; a tied weight cannot be sharded "
                "for one of its users only. Untie it first (module.weight = nn.Parameter(module.weight.detach().clone()))"
            )
        out = [(module, "weight", "weight"), (module, "lora_A", "lora_A"), (module, "lora_B", "lora_B")]
        if module.bias is not None:
            out.append((module, "bias", "bias"))
        return out
    if _is_peft_lora_linear(module):
        base = module.base_layer
        if type(base) is not nn.Linear:
            raise LoRAInputError(f"{who}: the PEFT layer's base layer is {type(base).__name__}, not a plain nn.Linear")
        if getattr(module, "fan_in_fan_out", False):
            raise LoRAInputError(f"{who}: fan_in_fan_out=True PEFT layers are not supported")
        if any(getattr(module, "use_dora", {}).values()):
            raise LoRAInputError(f"{who}: DoRA adapters are not supported by the tensor-parallel LoRA styles")
        if getattr(module, "merged_adapters", None):
            raise LoRAInputError(f"{who}: the PEFT layer has merged adapters; unmerge before parallelizing")
        out = [(base, "weight", "weight")]
        if base.bias is not None:
            out.append((base, "bias", "bias"))
        for name in module.lora_A:
            a, b = module.lora_A[name], module.lora_B[name]
            if getattr(b, "bias", None) is not None:
                raise LoRAInputError(f"{who}: adapter {name!r} has a lora_B bias (lora_bias=True), which is not supported")
            out.append((a, "weight", "lora_A"))
            out.append((b, "weight", "lora_B"))
        return out
    raise LoRAInputError(
        f"{who} shards a lora_kernels.LoRALinear or a PEFT lora.Linear, got {type(module).__module__}.{type(module).__name__}; "
        "use torch's ColwiseParallel / RowwiseParallel for a plain nn.Linear"
    )


def _check_mesh(device_mesh: DeviceMesh, who: str) -> None:
    if device_mesh.ndim != 1:
        raise LoRAInputError(
            f"{who}: needs a 1-D (tensor-parallel) device mesh, got a {device_mesh.ndim}-D mesh {tuple(device_mesh.shape)}; "
            "pass the TP dimension, e.g. mesh['tp'] (and FSDP2's fully_shard(..., mesh=mesh['dp']))"
        )


def _place(module: nn.Module, layout: dict, device_mesh: DeviceMesh, src_data_rank) -> None:
    for owner, pname, role in lora_parameters(module, "lora_kernels.distributed"):
        param = getattr(owner, pname)
        placement = layout[role]
        dist_param = nn.Parameter(
            distribute_tensor(param.detach(), device_mesh, [placement], src_data_rank=src_data_rank),
            requires_grad=param.requires_grad,
        )
        owner.register_parameter(pname, dist_param)


class ColwiseLoRA(ColwiseParallel):
    """Column-wise tensor parallelism for a LoRA layer (``ColwiseParallel`` for LoRALinear / PEFT lora.Linear).

    W0, bias and lora_B are sharded by output features; lora_A by rank (``shard_lora_a=True``, the vLLM / S-LoRA
    fully sharded scheme: each rank shrinks with its r/p rows of A, the [M, r] shrink output is all-gathered, each
    rank expands its own output columns) or replicated (``shard_lora_a=False``: no collective in the forward, dA
    reduced in the backward). Keyword arguments as ``ColwiseParallel``: ``input_layouts`` (default Replicate;
    ``Shard(1)`` for a sequence-parallel input), ``output_layouts`` (default ``Shard(-1)``), ``use_local_output``.
    """

    def __init__(self, *, input_layouts=None, output_layouts=None, use_local_output: bool = True, shard_lora_a: bool = True):
        super().__init__(input_layouts=input_layouts, output_layouts=output_layouts, use_local_output=use_local_output)
        self.shard_lora_a = bool(shard_lora_a)

    def _layout(self):
        return {"weight": Shard(0), "bias": Shard(0), "lora_A": Shard(0) if self.shard_lora_a else Replicate(),
                "lora_B": Shard(0)}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        who = "ColwiseLoRA"
        _check_mesh(device_mesh, who)
        params = lora_parameters(module, who)
        tp = device_mesh.size(0)
        for owner, pname, role in params:
            t = getattr(owner, pname)
            if role == "lora_A" and self.shard_lora_a and t.shape[0] % tp:
                raise LoRAInputError(
                    f"{who}: lora_A has rank r={t.shape[0]}, not divisible by the tensor-parallel size {tp}; the fully "
                    f"sharded scheme splits the rank evenly. Use a rank that is a multiple of {tp}, or "
                    "ColwiseLoRA(shard_lora_a=False) to replicate lora_A"
                )
        layout = self._layout()
        return distribute_module(
            module,
            device_mesh,
            lambda name, sub, mesh: _place(module, layout, mesh, self.src_data_rank) if sub is module else None,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )

    def __repr__(self) -> str:
        return (f"ColwiseLoRA(input_layouts={self.input_layouts}, output_layouts={self.output_layouts}, "
                f"use_local_output={self.use_local_output}, shard_lora_a={self.shard_lora_a})")


class RowwiseLoRA(RowwiseParallel):
    """Row-wise tensor parallelism for a LoRA layer (``RowwiseParallel`` for LoRALinear / PEFT lora.Linear).

    W0 and lora_A are sharded by input features, the bias replicated (added once); lora_B is sharded by output
    features (``shard_lora_b=True``, the vLLM / S-LoRA fully sharded scheme: the [M, r] partial shrink outputs are
    all-reduced and each rank adds its slice of the LoRA output into its partial sum, so the base layer's
    all-reduce / reduce-scatter carries both) or replicated (``shard_lora_b=False``: each rank expands its partial
    shrink over all outputs, no collective in the forward, dB reduced in the backward). Keyword arguments as
    ``RowwiseParallel``: ``input_layouts`` (default ``Shard(-1)``), ``output_layouts`` (default Replicate;
    ``Shard(1)`` for a sequence-parallel output), ``use_local_output``.
    """

    def __init__(self, *, input_layouts=None, output_layouts=None, use_local_output: bool = True, shard_lora_b: bool = True):
        super().__init__(input_layouts=input_layouts, output_layouts=output_layouts, use_local_output=use_local_output)
        self.shard_lora_b = bool(shard_lora_b)

    def _layout(self):
        return {"weight": Shard(1), "bias": Replicate(), "lora_A": Shard(1),
                "lora_B": Shard(0) if self.shard_lora_b else Replicate()}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        who = "RowwiseLoRA"
        _check_mesh(device_mesh, who)
        lora_parameters(module, who)
        self.desired_input_layouts = (Shard(-1),)
        layout = self._layout()
        return distribute_module(
            module,
            device_mesh,
            lambda name, sub, mesh: _place(module, layout, mesh, self.src_data_rank) if sub is module else None,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )

    def __repr__(self) -> str:
        return (f"RowwiseLoRA(input_layouts={self.input_layouts}, output_layouts={self.output_layouts}, "
                f"use_local_output={self.use_local_output}, shard_lora_b={self.shard_lora_b})")
