"""Tensor-parallel LoRA fine-tuning with torch's own parallelize_module plan, then a merge for inference.

    torchrun --nproc-per-node 2 examples/tp_lora_torchrun.py            # CPU (gloo) or one GPU per rank (nccl)
    torchrun --nproc-per-node 2 examples/tp_lora_torchrun.py --steps 20 --rank 16

A small transformer-style MLP stack gets LoRA on every Linear (``inject_lora``); each block's up projection is
sharded column-wise and its down projection row-wise (``ColwiseLoRA`` / ``RowwiseLoRA``: W0, bias, lora_A and
lora_B are all sharded; the adapter adds only [tokens × r] collectives). Every rank also keeps an unsharded copy of
the model and trains it on the same batches, so the script can print how far the tensor-parallel run is from a
single-process run (it should be rounding noise), and how many bytes each collective of one step moved.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import parallelize_module

import lora_kernels as lk
from lora_kernels.distributed import CollectiveBytes, ColwiseLoRA, RowwiseLoRA


class Block(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (a multiple of the number of processes)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per batch (batch 4 x seq tokens/4)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))

    torch.manual_seed(0)  # the same seed on every rank: same initial weights and the same LoRA dropout masks
    model = nn.Sequential(*[Block(args.dim, 4 * args.dim) for _ in range(2)]).to(device)
    lk.inject_lora(model, ["up", "down"], r=args.rank, alpha=2 * args.rank, dropout=0.05)
    lk.mark_only_lora_as_trainable(model)
    for m in model.modules():  # B starts at zero (LoRA init); make it non-zero so that the adapter matters at step 0
        if isinstance(m, lk.LoRALinear):
            nn.init.normal_(m.lora_B, std=0.02)
    single = copy.deepcopy(model)  # the single-process reference, kept whole on every rank

    plan = {}
    for i in range(len(model)):
        plan[f"{i}.up"] = ColwiseLoRA()
        plan[f"{i}.down"] = RowwiseLoRA()
    parallelize_module(model, mesh, plan)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt_single = torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=1e-3)
    batch, seq = 4, max(1, args.tokens // 4)
    for step in range(args.steps):
        torch.manual_seed(1000 + step)
        x = torch.randn(batch, seq, args.dim, device=device)
        target = torch.randn(batch, seq, args.dim, device=device)
        losses = []
        for net, o in ((model, opt), (single, opt_single)):
            torch.manual_seed(step)  # the dropout seed of this step (drawn from torch's generator)
            with CollectiveBytes() as comm:
                loss = torch.nn.functional.mse_loss(net(x), target)
                loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if net is model and step == 0 and rank == 0:
                print(f"collectives of one training step ({batch * seq} tokens, r={args.rank}, {world} ranks):")
                print(comm.summary())
        if rank == 0:
            print(f"step {step}: loss TP {losses[0]:.6f}  single-process {losses[1]:.6f}  "
                  f"|diff| {abs(losses[0] - losses[1]):.2e}")

    # inference: merge every adapter into its (sharded) base weight; each rank merges its own block
    model.eval()
    single.eval()
    x = torch.randn(batch, seq, args.dim, device=device)
    with torch.no_grad():
        y_unmerged = model(x)
        for m in model.modules():
            if isinstance(m, lk.LoRALinear):
                m.merge()
        y_merged = model(x)
        y_single = single(x)
    if rank == 0:
        print(f"merged vs unmerged output: max |diff| {(y_merged - y_unmerged).abs().max().item():.2e}; "
              f"vs single process {(y_merged - y_single).abs().max().item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
