"""A torchft training loop: replica groups that drop out and heal from a live peer, observed by burnin.

Each replica group is one torchrun job (its ranks train data-parallel with PyTorch DDP on the group's
own process group); the groups average their gradients through torchft's Manager, which asks the
lighthouse for a quorum every step and heals a group that comes back (a restart, a stall, a cut link)
from a peer's live state. burnin launches the lighthouse and one torchrun per group, injects faults and
judges what torchft did (`recovery.mode: external`); it never restarts or restores anything itself.

    burnin run examples/torchft/scenario.yaml

Without burnin (a lighthouse on 127.0.0.1:29510, one torchrun per group with REPLICA_GROUP_ID set):

    torchft_lighthouse --min_replicas 1 --join_timeout_ms 5000 --bind 127.0.0.1:29510 &
    TORCHFT_LIGHTHOUSE=http://127.0.0.1:29510 REPLICA_GROUP_ID=0 torchrun --nproc-per-node 2 \
        --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29600 --max-restarts 3 train.py &
    TORCHFT_LIGHTHOUSE=http://127.0.0.1:29510 REPLICA_GROUP_ID=1 torchrun --nproc-per-node 2 \
        --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29601 --max-restarts 3 train.py

A hung rank is ended by torchelastic's watchdog (each step runs under `expires()` when torchrun's
file timer is on, TORCHELASTIC_ENABLE_FILE_TIMER=1), so torchrun restarts the group and torchft heals it.

`--break skip-heal` makes a group that comes back ignore the state its peer sends (a bug in the loop's
load_state_dict): judged failed by "replica groups agree" (examples/torchft/broken.yaml). `--break
commit-alone` steps the optimizer even when torchft votes not to commit: judged failed by "no update
outside the quorum" once a step is refused (a kill at point ft_all_reduce makes the peers' all-reduce fail).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
import burnin.rank

VOCAB, WIDTH, CONTEXT = 256, 192, 32


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(self.norm(h + self.mlp(h)))


def batch(seed: int, step: int, group: int, rank: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch of `step`: a sequence that follows a fixed rule (next = 5 * token + 3 mod VOCAB)
    with a little noise, drawn from (seed, step, group, rank) alone, so a healed group reads what it would
    have read."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 257 + group) * 1031 + rank)
    start = torch.randint(0, VOCAB, (size, 1), generator=g)
    seq = [start]
    for _ in range(CONTEXT):
        nxt = (5 * seq[-1] + 3) % VOCAB
        noise = torch.rand(size, 1, generator=g) < 0.1
        seq.append(torch.where(noise, torch.randint(0, VOCAB, (size, 1), generator=g), nxt))
    tokens = torch.cat(seq, dim=1)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


@contextlib.contextmanager
def watchdog(seconds: float):
    """torchelastic's file timer: the agent SIGKILLs this rank if the step is not done in `seconds`."""
    if not os.environ.get("TORCHELASTIC_TIMER_FILE"):
        yield
        return
    from torch.distributed.elastic.timer import expires

    with expires(after=seconds):
        yield


def main() -> None:
    p = argparse.ArgumentParser(description="a torchft loop under burnin (see the module's docstring)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--timeout", type=float, default=3.0, help="torchft's collective and commit timeout, seconds")
    p.add_argument("--group-timeout", type=float, default=5.0,
                   help="the group's own process group (DDP inside the group): a rank whose peer in the group hangs "
                        "gives up after this long, so the group's manager stops heartbeating and the other groups "
                        "get a quorum without it (the lighthouse waits for more than half of the heartbeating groups)")
    p.add_argument("--watchdog", type=float, default=20.0, help="a step longer than this is killed (file timer); "
                                                               "well over --timeout, which a peer of a failed rank waits out, plus a quorum change")
    p.add_argument("--step-time", type=float, default=0.0,
                   help="pace the loop: a step takes at least this long (what a larger model or a data loader "
                        "would add), so the groups' restarts take tens of steps, not hundreds")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the model over each replica group's ranks with FSDP2 (fully_shard) instead of DDP; "
                        "torchft then averages each rank's gradient shard with the same shard of the other groups, "
                        "and heals a rank from its peer of the same shard")
    p.add_argument("--break", dest="broken", choices=["skip-heal", "commit-alone"], help="a bug, on purpose")
    p.add_argument("--plain", type=int, metavar="GROUPS", default=0,
                   help="no torchft: the same job as GROUPS replica groups, as one DDP job over all the ranks "
                        "(each rank reads the batch it would read in its group), recovered by burnin or torchrun "
                        "(benchmarks/external.py compares them)")
    args = p.parse_args()
    if args.plain:
        plain(args)
        return

    from torchft import Manager, Optimizer, ProcessGroupGloo

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    group, rank = int(os.environ["REPLICA_GROUP_ID"]), int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.group_timeout))  # the group's own ranks
    if os.environ.get("TORCHELASTIC_TIMER_FILE"):
        from torch.distributed.elastic.timer import FileTimerClient, configure

        configure(FileTimerClient(os.environ["TORCHELASTIC_TIMER_FILE"]))

    model = TinyLM()
    if args.fsdp:  # within the group: each rank holds a shard of every layer (the MLP its own unit, then the root)
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.mlp)
        fully_shard(model)
    # The sharded parameters, by name, taken now: torchft calls state_dict from its quorum thread while the
    # loop runs forward, when FSDP2 has the unsharded parameters registered in their place (a heal then gets
    # a whole tensor where a shard belongs: "The size of tensor a (128) must match the size of tensor b (256)").
    params = dict(model.named_parameters())
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def state_dict() -> dict:
        if args.fsdp:
            return sharded_state(params, inner)
        return {"model": model.state_dict(), "optim": inner.state_dict()}

    def load_state_dict(sd: dict) -> None:
        if args.broken == "skip-heal":
            return
        if args.fsdp:
            load_sharded_state(params, inner, sd)
            return
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["optim"])

    # The collectives across groups time out after --timeout; the manager's calls (should_commit above all)
    # wait twice that: a rank whose peer in the group is still waiting out a collective's timeout reaches
    # should_commit that much later, and with one timeout for both, its peer's should_commit raises
    # TimeoutError, the group crashes, and with the other group down too the job starts over from step 0.
    timeout = timedelta(seconds=args.timeout)
    manager = Manager(pg=ProcessGroupGloo(timeout=timeout), min_replica_size=1, load_state_dict=load_state_dict,
                      state_dict=state_dict, replica_id=f"group{group}", timeout=2 * timeout,
                      quorum_timeout=timedelta(seconds=30), connect_timeout=timedelta(seconds=30),
                      # Every group starts from the same seeded weights. torchft's sync at step 0 would heal
                      # each group rank from a primary of its own (group 1 for rank 0, group 0 for rank 1): the
                      # two ranks of a group would then average different gradients in step 0 and their DDP
                      # replicas part for good (burnin's cross-group fingerprint shows it; docs/external.md).
                      init_sync=False)
    # averages within the group (FSDP2: its reduce-scatter, already)
    ddp = model if args.fsdp else nn.parallel.DistributedDataParallel(model)
    optimizer = Optimizer(manager, inner)
    obs = burnin.rank.observe(ddp, optimizer, manager)

    for step in obs.steps(args.steps):
        t_step = time.monotonic()
        with watchdog(args.watchdog):
            x, y = batch(args.seed, step, group, rank)
            optimizer.zero_grad()  # torchft starts the step's quorum here
            loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
            loss.backward()
            # across the groups: one flat buffer, averaged over the groups in the quorum (FSDP2: this rank's
            # shard of each gradient, with the same shard of the other groups)
            grads = [local(q.grad) for q in params.values()]
            flat = torch.cat([g.flatten() for g in grads])
            manager.allreduce(flat).wait()
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            if args.broken == "commit-alone":
                manager.should_commit()
                inner.step()  # the bug: the update is applied whatever the quorum voted
            else:
                optimizer.step()
            obs.step_done(loss)
            time.sleep(max(0.0, args.step_time - (time.monotonic() - t_step)))
    dist.destroy_process_group()


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2), a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def sharded_state(params: dict[str, torch.Tensor], inner: torch.optim.Optimizer) -> dict:
    """What this rank sends a peer of the same shard that heals: its shard of every parameter (`params`: the
    sharded ones, by name) and of the optimizer's state."""
    return {"model": {n: local(p).detach() for n, p in params.items()},
            "optim": {n: {k: local(v) for k, v in inner.state[p].items()} for n, p in params.items() if p in inner.state}}


def load_sharded_state(params: dict[str, torch.Tensor], inner: torch.optim.Optimizer, sd: dict) -> None:
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for n, p in params.items():
            local(p).copy_(sd["model"][n])
            inner.state.pop(p, None)
            for k, v in sd["optim"].get(n, {}).items():  # (a DTensor moment again, on the parameter's mesh)
                inner.state[p][k] = (DTensor.from_local(v.clone(), p.device_mesh, p.placements, run_check=False,
                                                       shape=p.shape, stride=p.stride())
                                     if isinstance(p, DTensor) and v.dim() else v.clone())


def plain(args: argparse.Namespace) -> None:
    """The same training without torchft: one DDP job over every rank, attached with burnin.rank.attach
    (burnin's recovery: warm spares and snapshots; or torchrun's restart from burnin's checkpoints)."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    per = world // args.plain
    model = TinyLM()
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ddp = nn.parallel.DistributedDataParallel(model)
    session = burnin.rank.attach(ddp, inner)
    for step in session.steps(args.steps):
        t_step = time.monotonic()
        x, y = batch(args.seed, step, rank // per, rank % per)
        inner.zero_grad()
        loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
        loss.backward()
        inner.step()
        session.step_done(loss)
        time.sleep(max(0.0, args.step_time - (time.monotonic() - t_step)))
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        # Fail fast: torchft's threads (a quorum still waiting for a hung peer of this group) would hold the
        # interpreter's exit for the quorum timeout, and this group's manager would go on heartbeating to
        # the lighthouse meanwhile, holding the other groups' quorum back.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
