"""A plain data-parallel training script, brought under burnin by the lines marked `# burnin`.

Run it alone (`torchrun --nproc-per-node 2 train.py`) and it trains; run it from a scenario
(`burnin run examples/ddp_plain/scenario.yaml`) and burnin resumes it after each fault, writes its
checkpoints through the script's own save/load, and judges the final state against a fault-free run.
With --nondeterministic every batch gets a little noise from the operating system's entropy, so no two
runs agree bit for bit (see scenario-nondeterministic.yaml: the tolerance mode).
"""

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import burnin.rank  # burnin


def batch(step: int, rank: int, noisy: bool, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and labels of one rank at one step: a pure function of (step, rank) unless noisy."""
    gen = torch.Generator().manual_seed(step * 1009 + rank)
    x = torch.randn(n, 16, generator=gen)
    y = (x[:, :4].sum(dim=1) > 0).long()
    if noisy:
        noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(7), "little"))
        x = x + 1e-4 * torch.randn(n, 16, generator=noise)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nondeterministic", action="store_true")
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 2))
    ddp = DDP(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    torch.manual_seed(1 + rank)  # each rank its own dropout masks

    def save(directory):  # the script's own checkpoint: one file, written by rank 0
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, directory / "train.pt")

    def load(directory):
        state = torch.load(directory / "train.pt", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    # burnin: the script's checkpoints go through its save/load; the scheduler is state the step changes
    session = burnin.rank.attach(ddp, optimizer, save=save, load=load, state={"scheduler": scheduler})
    for step in session.steps(args.steps):  # burnin (was: range(args.steps))
        x, y = batch(step, rank, args.nondeterministic)
        loss = nn.functional.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        session.step_done(loss)  # burnin
        if rank == 0 and step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: freeing DDP's reducer there can meet a gloo worker thread
    # still holding work, which ends the process with SIGABRT ("terminate called without an active
    # exception"; seen once in many runs, on a loaded machine). Everything is written by now.
    os._exit(0)


if __name__ == "__main__":
    main()
