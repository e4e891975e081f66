"""What burnin costs a fault-free training step: the harness's rank worker against a bare DDP loop.

Variants, each a 2-rank gloo group of the same workload (burnin's default Workload: GPT tiny,
batch 8 x 64, seed 0, dropout 0.1, 1 thread per rank, deterministic algorithms; the loss's kernels
as --kernels says, the scenario default otherwise):

  bare          benchmarks/_bare_ddp.py: the training step and nothing else
  harness       the real `burnin.rank.worker` under the real Supervisor, a fault-free scenario:
                event stream, heartbeat thread, injector calls at every step point (one inside a
                DDP comm hook), the detector guard, the supervisor polling every 10 ms; no
                checkpoint until the last step, no in-memory snapshot (`memory_every: 0`)
  harness_snap  the same with an in-memory snapshot after every step (`memory_every: 1`)
  harness_ckpt  the defaults: a snapshot after every step, and a disk checkpoint every 5 steps
                (SHA-256 manifest, fsync)
The harness variants run with their warm spare ranks (the default): idle, blocked on a pipe.

All three groups are started once and stay alive. They take turns in blocks of `--steps` steps
(A B C, then C B A, ... for `--rounds` rounds); the groups not on turn are frozen with SIGSTOP
(every rank, and the harness's supervisor), so only one group computes at a time and a slow
minute of a shared machine hits every variant alike. The first window of each group (start-up
and `--warmup` steps) is not measured, nor the first 2 steps after each resume (the step caught
by the pause, and cold caches).

Per variant, rank 0's step times:
  dt        data + forward + backward/all-reduce + optimizer (in the harness also the injector
            calls, comm hook and guard), as the worker reports it in `step_done.dt`; the bare
            loop times the same span
  interval  one step's end to the next's: the whole loop, event logging and checkpoints included

Ratios are taken within this run only: of the pooled medians and p90s, and round by round (each
block's median against the bare block of the same round, so slow drift cancels), given as
quartiles. Every variant must end on the same loss bits (`same_loss_bits`), or they did not
compute the same thing. Prints JSON on stdout.

    .venv/bin/python benchmarks/overhead.py [--steps 10] [--rounds 40] [--warmup 5]
                                            [--kernels torch|triton] [--fsdp] [--keep] [--json-only]

With --fsdp every variant shards the model with FSDP2 over the two ranks (no DDP): the bare loop is a
bare FSDP2 loop, and the harness's checkpoints are DCP's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_stall_us, machine, pressure  # benchmarks/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
VARIANTS = ("bare", "harness", "harness_snap", "harness_ckpt")
#: (checkpoint.every, checkpoint.memory_every) of each harness variant
CHECKPOINTING = {"harness": (None, 0), "harness_snap": (None, 1), "harness_ckpt": (5, 1), "harness_gather": (None, 0)}
#: The detectors of each harness variant (harness_gather: only with --fsdp --gather-hash)
DETECTING = {"harness_gather": {"gather_hash": {}}}
NO_CHECKPOINT = 10**9  # checkpoint.every: only the final (unmeasured) step saves one
SKIP_AFTER_RESUME = 2
POLL_S = 0.005
WAIT_S = 600.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Group:
    """One 2-rank training run that can be frozen and thawed; remembers when it was on turn."""

    name: str
    clock: Any  # the clock its step end times are taken with

    def __init__(self) -> None:
        self.windows: list[tuple[float, float]] = []  # (resumed, paused) on self.clock
        self._resumed: float | None = None

    def pids(self) -> list[int]:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def last_step(self) -> int:
        raise NotImplementedError

    def pause(self) -> None:
        for pid in self.pids():
            os.kill(pid, signal.SIGSTOP)
        if self._resumed is not None:
            self.windows.append((self._resumed, self.clock()))
        self._resumed = None

    def resume(self, measured: bool = True) -> None:
        for pid in self.pids():
            os.kill(pid, signal.SIGCONT)
        self._resumed = self.clock() if measured else None

    def run_until(self, step: int) -> None:
        deadline = time.time() + WAIT_S
        while self.last_step() < step:
            if not self.alive():
                raise RuntimeError(f"{self.name} ended before step {step} (raise the step margin?)")
            if time.time() > deadline:
                raise RuntimeError(f"{self.name} did not reach step {step} within {WAIT_S:g} s")
            time.sleep(POLL_S)


class _Bare(_Group):
    clock = staticmethod(time.perf_counter)

    def __init__(self, name: str, workload: dict[str, Any], work: Path):
        super().__init__()
        self.name, self.work = name, work
        self.out = work / f"{name}.json"
        self.progress = work / f"{name}.progress"
        self.progress.write_bytes(struct.pack("<q", -1))
        port = _free_port()
        self.procs: list[subprocess.Popen] = []
        for rank in range(2):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            with open(work / f"{name}-rank{rank}.log", "wb") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(HERE / "_bare_ddp.py"), "--workload", json.dumps(workload),
                     "--steps", str(workload["steps"]), "--out", str(self.out), "--progress", str(self.progress)],
                    # A session per rank, as the supervisor and torchrun start ranks: with the
                    # kernel's autogroup scheduling a session is the unit that gets a fair CPU share.
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def last_step(self) -> int:
        return struct.unpack("<q", self.progress.read_bytes()[:8])[0]

    def finish(self) -> dict[str, Any]:
        self.resume(measured=False)
        deadline = time.time() + WAIT_S
        # A rank that dies leaves its peer waiting for it forever: stop at the first failure.
        while any(p.poll() is None for p in self.procs) and not any(p.poll() for p in self.procs):
            if time.time() > deadline:
                break
            time.sleep(0.05)
        self.kill()
        if any(p.returncode for p in self.procs):
            logs = "\n".join((self.work / f"{self.name}-rank{r}.log").read_text(errors="replace")[-1500:]
                             for r in range(2))
            raise RuntimeError(f"{self.name} failed: exits {[p.returncode for p in self.procs]}\n{logs}")
        rec = json.loads(self.out.read_text())
        return {"dt": dict(enumerate(rec["dt"])), "end": dict(enumerate(rec["end"])),
                "last_loss_bits": rec["last_loss_bits"]}

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _supervise(run_dir: str, workload: dict[str, Any], every: int, memory_every: int,
               detectors: dict[str, Any]) -> None:
    """The harness variant's process: one fault-free scenario under the real Supervisor."""
    from burnin.harness.supervisor import Supervisor
    from burnin.reports.metrics import Metrics
    from burnin.scenarios.schema import Checkpointing, Detectors, Scenario, Timeouts, Workload

    scenario = Scenario(
        name="bench-overhead",
        workload=Workload.model_validate(workload),
        detectors=Detectors.model_validate(detectors),
        checkpoint=Checkpointing(every=every, keep=3, memory_every=memory_every),
        # Frozen between blocks: the watchdogs must not call a pause a hang. Nothing in the step changes.
        timeouts=Timeouts(heartbeat_s=600, step_s=600),
    )
    ok = Supervisor(scenario, Path(run_dir), Path(run_dir).name, metrics=Metrics()).run()
    sys.exit(0 if ok else 1)


class _Harness(_Group):
    clock = staticmethod(time.time)

    def __init__(self, name: str, workload: dict[str, Any], every: int, memory_every: int, work: Path,
                 detectors: dict[str, Any] | None = None):
        super().__init__()
        from burnin.core.events import Tail

        self.name = name
        self.run_dir = work / name
        self.proc = multiprocessing.get_context("fork").Process(
            target=_supervise, args=(str(self.run_dir), workload, every, memory_every, detectors or {}), name=name)
        self.proc.start()
        self._tails = [Tail(self.run_dir / "ranks" / f"rank{r}.jsonl") for r in range(2)]
        self._rank_pids: dict[int, int] = {}
        self._last = -1

    def _read(self) -> None:
        for rank, tail in enumerate(self._tails):
            for ev in tail.read():
                if ev.get("event") == "rank_started":
                    self._rank_pids[rank] = ev["pid"]
                elif ev.get("event") == "step_done" and rank == 0:
                    self._last = ev["step"]

    def pids(self) -> list[int]:
        self._read()
        return [self.proc.pid, *self._rank_pids.values()]

    def alive(self) -> bool:
        return self.proc.is_alive()

    def last_step(self) -> int:
        self._read()
        return self._last

    def finish(self) -> dict[str, Any]:
        from burnin.core.events import read_events

        self.resume(measured=False)
        self.proc.join(WAIT_S)
        if self.proc.exitcode != 0:
            self.kill()
            raise RuntimeError(f"{self.name} failed; see {self.run_dir}/events.jsonl")
        events = read_events(self.run_dir / "events.jsonl")
        failures = [ev for ev in events if ev.get("event") == "failure_detected"]
        if failures:  # recovered, but then replayed steps would be measured twice
            raise RuntimeError(f"{self.name} restarted: {failures[0].get('detail')}")
        steps = [ev for ev in events if ev.get("event") == "step_done" and ev.get("rank") == 0]
        return {"dt": {ev["step"]: ev["dt"] for ev in steps}, "end": {ev["step"]: ev["t"] for ev in steps},
                "last_loss_bits": steps[-1]["loss_bits"]}

    def kill(self) -> None:
        if self.proc.is_alive():
            for pid in self.pids():
                os.kill(pid, signal.SIGCONT)
            self.proc.terminate()  # the ranks die with their supervisor (parent-death signal)
            self.proc.join(30)


def _clean(rec: dict[str, Any], windows: list[tuple[float, float]]) -> tuple[list[list[float]], list[list[float]]]:
    """Per measured window: (dt, interval) of the steps that ran wholly inside it, resume effects excluded."""
    dt: list[list[float]] = [[] for _ in windows]
    interval: list[list[float]] = [[] for _ in windows]
    for i, (a, b) in enumerate(windows):
        inside = sorted(s for s, end in rec["end"].items() if a < end <= b)
        for s in inside[SKIP_AFTER_RESUME:]:
            dt[i].append(rec["dt"][s])
            if s - 1 in inside:
                interval[i].append(rec["end"][s] - rec["end"][s - 1])
    return dt, interval


def _quartiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [round(q[0], 3), round(statistics.median(xs), 3), round(q[2], 3)]


def _p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[8]


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median_ms": round(1e3 * statistics.median(xs), 3), "p90_ms": round(1e3 * _p90(xs), 3),
            "mean_ms": round(1e3 * statistics.fmean(xs), 3), "n": len(xs)}








def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="steps per block, one turn of a variant (default 10)")
    ap.add_argument("--rounds", type=int, default=40, help="turns of every variant, order alternating (default 40)")
    ap.add_argument("--warmup", type=int, default=5, help="steps each run takes before measuring (default 5)")
    ap.add_argument("--kernels", choices=("torch", "triton"), default=None,
                    help="the loss's kernels, in every variant (default: the scenario default)")
    ap.add_argument("--fsdp", action="store_true",
                    help="shard the model with FSDP2 over the 2 ranks (workload.parallel: {dp_shard: 2}), in the "
                         "bare loop and the harness alike: the harness then checkpoints with DCP")
    ap.add_argument("--gather-hash", action="store_true",
                    help="with --fsdp: one more harness variant, with the gather_hash detector (what it costs a step)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (runs, logs) and say where")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON result")
    args = ap.parse_args(argv)
    if args.steps <= SKIP_AFTER_RESUME or args.warmup < 1 or args.rounds < 1:
        ap.error(f"need --steps > {SKIP_AFTER_RESUME}, --warmup >= 1, --rounds >= 1")
    if args.gather_hash and not args.fsdp:
        ap.error("--gather-hash compares all-gathers: it needs --fsdp")
    variants = VARIANTS + (("harness_gather",) if args.gather_hash else ())

    def say(msg: str) -> None:
        if not args.json_only:
            print(msg, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="burnin-bench-overhead-"))
    os.environ["BURNIN_CACHE_DIR"] = str(work / "cache")
    # Each turn runs --steps steps and the one caught by the pause; what is left runs unmeasured at the end.
    total = args.warmup + args.rounds * (args.steps + 2) + 5
    from burnin.scenarios.schema import Workload

    workload = Workload(model="tiny", ranks=2, steps=total, threads=1, device="cpu",
                        **({"kernels": args.kernels} if args.kernels else {}),
                        **({"parallel": {"dp_shard": 2}} if args.fsdp else {})).model_dump(mode="json")
    started, load_before, stall_before = time.time(), os.getloadavg(), cpu_stall_us()
    groups: dict[str, _Group] = {}
    recs: dict[str, dict[str, Any]] = {}
    try:
        for v in variants:  # started one at a time: each starts up and warms up alone
            t0 = time.time()
            if v == "bare":
                groups[v] = _Bare(v, workload, work)
            else:
                every, memory_every = CHECKPOINTING[v]
                groups[v] = _Harness(v, workload, every or NO_CHECKPOINT, memory_every, work, DETECTING.get(v))
            groups[v].run_until(args.warmup - 1)
            groups[v].pause()
            say(f"{v}: started and warmed up in {time.time() - t0:.1f} s")
        for rnd in range(args.rounds):
            for v in (variants if rnd % 2 == 0 else variants[::-1]):
                g = groups[v]
                g.resume()
                g.run_until(g.last_step() + args.steps)
                g.pause()
            if (rnd + 1) % 5 == 0:
                say(f"round {rnd + 1}/{args.rounds}")
        for v in variants:  # one at a time again, through the unmeasured margin to the end
            recs[v] = groups[v].finish()
    finally:
        for g in groups.values():
            g.kill()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    dt: dict[str, list[float]] = {}
    interval: dict[str, list[float]] = {}
    block_dt: dict[str, list[float]] = {}  # median dt of each block, one block per round
    for v in variants:
        per_block, per_block_iv = _clean(recs[v], groups[v].windows)
        dt[v] = [x for b in per_block for x in b]
        interval[v] = [x for b in per_block_iv for x in b]
        block_dt[v] = [statistics.median(b) if b else float("nan") for b in per_block]

    def ratio(a: list[float], b: list[float], f) -> float:
        return round(f(a) / f(b), 3)

    ratios = {f"{v}/bare": {"dt_median": ratio(dt[v], dt["bare"], statistics.median),
                            "dt_p90": ratio(dt[v], dt["bare"], _p90),
                            "interval_median": ratio(interval[v], interval["bare"], statistics.median),
                            "interval_p90": ratio(interval[v], interval["bare"], _p90),
                            # Each round's block against the bare block of the same round: drift cancels.
                            "dt_per_round_quartiles": _quartiles([h / b for h, b in zip(block_dt[v], block_dt["bare"])
                                                                  if h == h and b == b])}
              for v in variants[1:]}
    result = {
        "benchmark": "overhead",
        "date": time.strftime("%Y-%m-%d", time.localtime(started)),
        "config": {"workload": {k: workload[k] for k in workload if k != "steps"}, "backend": "gloo",
                   "steps_per_block": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                   "skip_after_resume": SKIP_AFTER_RESUME, "steps_per_run": total,
                   "order": "blocks alternating " + " ".join(variants) + ", then reversed; others SIGSTOPped"},
        "machine": {**machine(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    # Share of the run's wall time in which some task waited for a CPU (ours included).
                    "cpu_pressure_pct": pressure(stall_before, started)},
        "variants": {v: {"dt": _stats(dt[v]), "interval": _stats(interval[v])} for v in variants},
        "ratios": ratios,
        # Same seed and steps: every variant must end on the same loss bits, or it measured something else.
        "same_loss_bits": len({r["last_loss_bits"] for r in recs.values()}) == 1,
        "last_loss_bits": {v: r["last_loss_bits"] for v, r in recs.items()},
        "wall_s": round(time.time() - started, 1),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
