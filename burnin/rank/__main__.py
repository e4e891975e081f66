"""The rank entry for torchrun: `torchrun ... -m burnin.rank SCENARIO --run-dir DIR`.

Beyond one machine burnin rides on the launcher users already run. torch.distributed.elastic starts
this module once per rank on every node, with its torchrun environment (RANK, WORLD_SIZE, GROUP_RANK,
MASTER_ADDR, MASTER_PORT, ...), and restarts the whole group when a rank fails (`--max-restarts`). There
is no burnin supervisor: each rank reads the fault schedule from the scenario and applies its own faults
(a kill is the rank SIGKILLing itself at the scheduled point, a hang SIGSTOP, a damaged checkpoint
damaged by the rank), resumes from the newest valid checkpoint in `DIR/checkpoints` (a directory every
node sees), and writes its events to `DIR/ranks/rank<R>.node<G>.jsonl`. `burnin report DIR` judges the
whole run afterwards against a golden run. See docs/torchrun.md for the recipe.

Attempts: torchrun's TORCHELASTIC_RESTART_COUNT counts the restarts of one agent only (an agent that
restarts its workers because another node's failed does not count it), so the ranks number their
attempt themselves: once the process group is formed, rank 0 reads the event streams of the attempts
before and broadcasts the next number and the faults already fired (which must not fire again).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from burnin.core.events import EventWriter, read_events
from burnin.errors import BurninError
from burnin.rank.session import RunContext
from burnin.rank.worker import run_rank
from burnin.scenarios import load_scenario

SUPERVISOR_ONLY = ("network.partition", "network.throttle", ".simulated", "storage.snapshot_corrupt")
NODE_NIC = ("network.link_down", "network.blackhole")  # with --node-interface: the whole node's link


def _fail(message: str) -> None:
    print(f"burnin.rank: {message}", file=sys.stderr)
    sys.exit(2)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m burnin.rank",
                                description="a burnin rank under torchrun (see docs/torchrun.md)")
    p.add_argument("scenario", help="scenario file or bundled name")
    p.add_argument("--run-dir", required=True, help="the run's directory, seen by every node (checkpoints, events)")
    p.add_argument("--node-interface", metavar="NAME",
                   help="this node's network interface, for NIC faults (network.link_down, network.blackhole): "
                        "a fault on any of the node's ranks acts on it (needs root; name it to opt in)")
    return p.parse_args(argv)


def prior_attempts(run_dir: Path) -> tuple[int, list[int]]:
    """(next attempt number, faults fired in earlier attempts) from the run's event streams."""
    last, fired = -1, set()
    for path in sorted((run_dir / "ranks").glob("rank*.node*.jsonl")):
        for ev in read_events(path):
            if isinstance(ev.get("attempt"), int):
                last = max(last, ev["attempt"])
            if ev.get("event") == "fault_injected":
                fired.add(ev["fault_index"])
    return last + 1, sorted(fired)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    t_start = time.time()
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        _fail(f"{', '.join(missing)} not set: start this module with torchrun "
              f"(torchrun ... -m burnin.rank {args.scenario} --run-dir DIR)")

    try:
        scenario = load_scenario(args.scenario)
    except BurninError as exc:
        _fail(str(exc))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    node = int(os.environ.get("GROUP_RANK", "0"))
    if world != scenario.workload.ranks:
        _fail(f"{args.scenario}: workload.ranks is {scenario.workload.ranks} but torchrun started {world} ranks "
              f"(--nnodes x --nproc-per-node); make them equal")
    for i, f in enumerate(scenario.faults):
        if any(part in f.fault for part in SUPERVISOR_ONLY) or f.at_s is not None:
            _fail(f"{args.scenario}: faults.{i}: {f.fault} needs the burnin supervisor (`burnin run`); under "
                  f"torchrun the ranks apply only their own faults")
        if f.fault in NODE_NIC and not args.node_interface:
            _fail(f"{args.scenario}: faults.{i}: {f.fault} acts on this node's network interface: name it with "
                  f"--node-interface NAME")
    if args.node_interface is not None and (not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", args.node_interface)
                                            or args.node_interface in (".", "..")
                                            or not (Path("/sys/class/net") / args.node_interface).exists()):
        _fail(f"--node-interface: no interface {args.node_interface!r} in this node's network namespace; "
              f"see `ip link`")
    if scenario.campaign is not None:
        _fail(f"{args.scenario}: campaign: a campaign runs under `burnin campaign`, not torchrun")
    run_dir = Path(args.run_dir).resolve()
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (run_dir / "torchrun.json").exists():
        (run_dir / "scenario.json").write_text(scenario.model_dump_json(indent=1))
        (run_dir / "torchrun.json").write_text(json.dumps({
            "launcher": "torchrun", "scenario": scenario.name, "ranks": world,
            "run_id": os.environ.get("TORCHELASTIC_RUN_ID"), "started": t_start}, indent=1))

    if args.node_interface is not None:  # the ranks talk over the NIC the faults act on
        os.environ.setdefault("GLOO_SOCKET_IFNAME", args.node_interface)
    spec: dict[str, Any] = {
        "scenario": scenario.model_dump(mode="json"), "run_dir": str(run_dir),
        "checkpoint_dir": str(run_dir / "checkpoints"), "attempt": None, "fired": [],
        "heartbeat_period_s": 0.5, "snapshot_dir": None, "node_interface": args.node_interface,
    }
    ctx = RunContext(spec, rank, world, events=None, self_inflicted=True)
    ctx.extra["on_pg"] = lambda: _open_stream(ctx, run_dir, node, t_start)
    _terminate_on_sigterm(ctx)

    run_rank(spec, ctx)
    return 0


def _open_stream(ctx: Any, run_dir: Path, node: int, t_start: float) -> None:
    """Once the group is formed: agree on the attempt and the faults fired before, open this rank's
    event stream, and say when this process started."""
    import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

    choice: list[Any] = [prior_attempts(run_dir) if ctx.rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    attempt, fired = choice[0]
    ctx.spec["attempt"], ctx.spec["fired"] = attempt, fired
    ctx.events = EventWriter(run_dir / "ranks" / f"rank{ctx.rank}.node{node}.jsonl", rank=ctx.rank, attempt=attempt,
                             node=node)
    ctx.events.write({"t": t_start, "event": "rank_started", "rank": ctx.rank, "attempt": attempt, "node": node,
                      "pid": os.getpid(), "host": socket.gethostname(), "spare": False,
                      "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))})


def _terminate_on_sigterm(ctx: Any) -> None:
    """torchrun's agent ends the surviving ranks of a failed group with SIGTERM. A Python handler would
    wait for the main thread to leave a blocked collective, so SIGTERM is blocked in every thread and a
    thread of its own waits for it: it records when the agent acted (the failure's detection, as far as
    the ranks can tell) and ends the process at once."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        signal.sigwait({signal.SIGTERM})
        if ctx.events is not None:
            ctx.events.emit("rank_terminated", signal="SIGTERM")
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait, name="burnin-sigterm", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
