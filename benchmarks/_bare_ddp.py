"""A bare DDP (or FSDP2) training loop: the baseline benchmarks/overhead.py holds burnin's rank worker against.

Started by overhead.py as one process per rank with an env:// rendezvous (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), given the harness's workload config as JSON (--workload: model, seed,
batch, sequence length, optimizer, dropout, threads, loss kernels), built and seeded as burnin's
worker does, with deterministic algorithms and gloo. The same step, and nothing else: no event
stream, no heartbeat, no injector, no comm hook, no checkpoints, no loss read back per step.
Rank 0 publishes the number of its last finished step in --progress (8 bytes, mmap'ed: about a
microsecond per step, so the benchmark can pause it between blocks) and writes its timings to
--out as JSON at the end.
"""

import argparse
import json
import mmap
import os
import struct
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from burnin.rank.workload import GPT, MarkovData, gpt_config, make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", required=True, help="burnin Workload fields, JSON")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--progress", required=True, help="an 8-byte file: rank 0 writes its last finished step")
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    w = json.loads(args.workload)

    if w["kernels"] == "triton":  # interpreted on the CPU; the mode must be set before triton is imported
        from burnin.kernels import _runtime

        _runtime.prepare("cpu")
    torch.set_num_threads(w["threads"])
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))

    # Built and seeded as burnin's worker builds a fresh run, so both variants compute the same bits.
    cfg = gpt_config(w["model"], w["seq_len"], w["dropout"], w["kernels"])
    torch.manual_seed(w["seed"])
    model = GPT(cfg)
    if w.get("parallel"):  # FSDP2: fully_shard per block, then the root, over the same mesh as burnin's
        from burnin.rank.sharding import shard_model

        shard_model(model, w["parallel"], world, "cpu")
    optimizer = make_optimizer(model, w["lr"], w["weight_decay"])
    data = MarkovData(w["seed"], cfg.vocab_size)
    torch.manual_seed(w["seed"] * 1_000_003 + 1 + rank)
    ddp = model if w.get("parallel") else DDP(model)

    with open(args.progress, "r+b") as fh:
        progress = mmap.mmap(fh.fileno(), 8)
    dts, ends = [], []
    for step in range(args.steps):
        t_step = time.perf_counter()
        x, y = data.batch(step, rank, w["batch_size"], w["seq_len"])
        _, loss = ddp(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        now = time.perf_counter()
        dts.append(now - t_step)
        ends.append(now)
        if rank == 0:
            progress[:8] = struct.pack("<q", step)

    if rank == 0:
        bits = loss.detach().reshape(1).view(torch.int32).item().to_bytes(4, "big", signed=True).hex()
        with open(args.out, "w") as fh:
            json.dump({"dt": dts, "end": ends, "last_loss_bits": bits}, fh)
    # Leave now, DDP and all: freeing DDP's reducer can deadlock (~ProcessGroupGloo joins
    # a gloo thread that waits for the GIL), and nothing is left to do.
    os._exit(0)


if __name__ == "__main__":
    main()
