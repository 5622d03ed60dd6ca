"""Distilled training with DistributedDataParallel: a body + HydraHead trained with the fused Hydra
loss, the batch split across processes (gloo on CPU, nccl on GPUs).

    torchrun --nproc_per_node=2 examples/ddp_distill.py [--steps 200]

Teachers here are M fixed random networks (the demo shows real ensembles); each process sees its own
shard of every batch through a DistributedSampler, DDP averages the gradients, and every process
ends with the same parameters.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fasthydra import HydraHead


class Student(nn.Module):
    """DDP wraps the module whose forward returns the loss, so the fused loss runs inside it."""

    def __init__(self, d_in, width, classes, heads):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.ReLU())
        self.head = HydraHead(width, classes, heads)

    def forward(self, x, teacher, temperature=2.0):
        return self.head.distill_loss(self.body(x), teacher, temperature)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")

    gen = torch.Generator().manual_seed(0)  # the same data and teachers on every rank
    x = torch.randn(4096, 32, generator=gen)
    teachers = torch.randn(args.heads, 32, 10, generator=gen)
    t = torch.einsum("nd,mdc->nmc", torch.tanh(x), teachers) * 2
    sampler = DistributedSampler(TensorDataset(x, t), num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(TensorDataset(x, t), batch_size=256 // world, sampler=sampler)

    torch.manual_seed(0)  # identical initial parameters on every rank
    model = DDP(Student(32, 64, 10, args.heads).to(device))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    step = 0
    while step < args.steps:
        sampler.set_epoch(step)
        for xb, tb in loader:
            loss = model(xb.to(device), tb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rank == 0 and step % 50 == 0:
                print(f"step {step:4d}  hydra loss {loss.item():.4f} (rank 0 shard, world {world})", flush=True)
            step += 1
            if step >= args.steps:
                break
    with torch.no_grad():
        checksum = torch.stack([p.double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"parameters identical on all {world} ranks: {same}")
    dist.barrier()  # nobody tears the group down while a peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
