"""A sharded training script written the torchtitan way (a device mesh, FSDP2's `fully_shard` per
block and then the root, AdamW over the DTensor parameters), brought under burnin by the lines marked
`# burnin`: the same four as a DDP script's.

Alone: `torchrun --nproc-per-node 2 train.py` (FSDP over 2 ranks), or `torchrun --nproc-per-node 4
train.py --replicate 2` (HSDP: 2 replicas of 2 shards). From a scenario (`burnin run
examples/fsdp2/scenario-hsdp.yaml`), burnin resumes it after each fault from the in-memory snapshot of
each rank's shards or from DCP checkpoints under its manifest, and judges every rank's shards against a
fault-free run, bit for bit.
"""

import argparse
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import burnin.rank  # burnin


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


class Model(nn.Module):
    def __init__(self, dim: int = 32, n_layers: int = 2, classes: int = 4):
        super().__init__()
        self.inp = nn.Linear(16, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(n_layers))
        self.out = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


def batch(step: int, rank: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's inputs and labels at one step: a pure function of (step, rank)."""
    gen = torch.Generator().manual_seed(step * 1009 + rank)
    x = torch.randn(n, 16, generator=gen)
    return x, (x[:, :4].sum(dim=1) > 0).long() + 2 * (x[:, 4] > 0).long()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--replicate", type=int, default=1, help="replicas of each shard (HSDP when > 1)")
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.replicate > 1:
        mesh = init_device_mesh("cpu", (args.replicate, world // args.replicate),
                                mesh_dim_names=("dp_replicate", "dp_shard"))
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    torch.manual_seed(0)
    model = Model()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    torch.manual_seed(1 + rank)  # each rank its own dropout masks

    session = burnin.rank.attach(model, optimizer)  # burnin: checkpoints are DCP, snapshots of the shards
    for step in session.steps(args.steps):  # burnin (was: range(args.steps))
        x, y = batch(step, rank)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        session.step_done(loss)  # burnin
        if rank == 0 and step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
