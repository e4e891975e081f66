"""The kill-rank scenario as a plain torchrun job: what burnin's recovery is compared against.

Run by benchmarks/recovery.py under `torchrun --standalone --nproc-per-node 2 --max-restarts 1`,
given kill-rank's workload config as JSON (--workload: GPT tiny, seed, batch, steps, optimizer,
dropout, threads, loss kernels), built and seeded as burnin's worker does, with deterministic
algorithms and gloo. A checkpoint every --every steps written with torch.save, and a resume from
the newest complete checkpoint on every start. Rank --kill-rank SIGKILLs itself right after step
--kill-step on the first attempt only (TORCHELASTIC_RESTART_COUNT == 0), as burnin's process.kill
does at `between_steps`.

Each rank appends timestamps (unix time, JSON lines) to <out>/rank<N>.jsonl: process start, process
group ready, checkpoint loaded, every step done, the kill, and the final state hash.
"""

import time

T_START = time.time()  # before anything heavy: the import of torch is part of what a restart costs

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402


def _log(path: Path, event: str, **fields) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps({"t": time.time(), "event": event, **fields}) + "\n")


def _newest_complete(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step_*") if (p / "COMPLETE").is_file())
    return done[-1] if done else None


def _save(ckpt_dir: Path, step: int, rank: int, model, optimizer) -> None:
    import torch
    import torch.distributed as dist

    path = ckpt_dir / f"step_{step:08d}"
    path.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path / "model.tmp")
        os.replace(path / "model.tmp", path / "model.pt")
    # Each rank draws its own dropout masks: its torch RNG is part of the state.
    torch.save({"torch_rng": torch.get_rng_state()}, path / f"rank{rank}.tmp")
    os.replace(path / f"rank{rank}.tmp", path / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (path / "COMPLETE").touch()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="directory for checkpoints and timestamp logs")
    ap.add_argument("--workload", required=True, help="burnin Workload fields, JSON")
    ap.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    ap.add_argument("--kill-step", type=int, default=12, help="step after which --kill-rank SIGKILLs itself; -1: never")
    ap.add_argument("--kill-rank", type=int, default=1)
    args = ap.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    log = out / f"rank{rank}.jsonl"
    _log(log, "process_start", t_start=T_START, rank=rank, attempt=attempt, pid=os.getpid())

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from burnin.rank.state import state_hash  # the fingerprint only: compares with burnin's golden run
    from burnin.rank.workload import GPT, MarkovData, gpt_config, make_optimizer

    w = json.loads(args.workload)
    if w["kernels"] == "triton":  # interpreted on the CPU; the mode must be set before triton is imported
        from burnin.kernels import _runtime

        _runtime.prepare("cpu")
    torch.set_num_threads(w["threads"])
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))  # env:// from torchrun
    _log(log, "pg_ready", attempt=attempt)

    cfg = gpt_config(w["model"], w["seq_len"], w["dropout"], w["kernels"])
    torch.manual_seed(w["seed"])
    model = GPT(cfg)
    optimizer = make_optimizer(model, w["lr"], w["weight_decay"])
    data = MarkovData(w["seed"], cfg.vocab_size)

    start = 0
    ckpt = _newest_complete(ckpt_dir)
    if ckpt is not None:
        state = torch.load(ckpt / "model.pt", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(torch.load(ckpt / f"rank{rank}.pt", weights_only=True)["torch_rng"])
        start = int(ckpt.name.split("_")[1])
    else:
        torch.manual_seed(w["seed"] * 1_000_003 + 1 + rank)  # burnin's per-rank dropout seed
    _log(log, "resumed", attempt=attempt, from_step=start if ckpt is not None else None)

    ddp = DDP(model)
    for step in range(start, w["steps"]):
        x, y = data.batch(step, rank, w["batch_size"], w["seq_len"])
        _, loss = ddp(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _log(log, "step_done", attempt=attempt, step=step)
        if (step + 1) % args.every == 0:
            _save(ckpt_dir, step + 1, rank, model, optimizer)
        if step == args.kill_step and rank == args.kill_rank and attempt == 0:
            _log(log, "kill", attempt=attempt, step=step)
            os.kill(os.getpid(), signal.SIGKILL)

    _log(log, "finished", attempt=attempt, state_hash=state_hash(model, optimizer))
    dist.barrier()
    # Leave now, DDP and all: freeing DDP's reducer can deadlock (~ProcessGroupGloo joins
    # a gloo thread that waits for the GIL), and the agent would wait for this process forever.
    os._exit(0)


if __name__ == "__main__":
    main()
