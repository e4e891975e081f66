"""Recovery time of a killed rank: burnin's supervisor against plain `torchrun --max-restarts 1`.

All run the same job, the bundled kill-rank scenario's: GPT tiny on 2 (and, with --ranks 2,4, 4)
gloo ranks, 30 steps, a checkpoint every 5 steps, rank 1 SIGKILLed right after step 12, one restart.

  burnin    the bundled `kill-rank` scenario through `burnin.harness.runner.run_scenario`, with its
            defaults: warm spare ranks take over, and the ranks resume from the in-memory snapshot
            of the last completed step; the breakdown is summary.json's faults[0].recovery
  burnin-cold  the same with `recovery.spares: false` (new processes, as before spares existed)
  burnin-fsdp  `burnin` with the model sharded by FSDP2 over every rank (`workload.parallel:
            {dp_shard: -1}`): snapshots of each rank's own shards, DCP checkpoints
  burnin-tp  the same with tensor parallel pairs (`{dp_shard: -1, tp: 2}`): FSDP2 over ranks/2
  torchrun  `torchrun --standalone --nproc-per-node 2 --max-restarts 1 benchmarks/_torchrun_train.py`
            (torch.save checkpoints, resume from the newest on start, rank 1 kills itself on the
            first attempt); the phases come from the ranks' timestamps and the agent's log lines

Phases, with burnin's names (all times from the kill to the end of the phase's last rank):
  detection_s        kill -> failure noticed (burnin: supervisor; torchrun: the agent sends SIGTERM
                     to the survivor, or logs the failure when the survivor was already gone)
  teardown_s         -> every process of the old group gone (torchrun: the agent's "failed (exitcode"
                     line, logged once the survivors have exited)
  restart_s          -> every new rank's process group formed (spawn, Python and torch import,
                     rendezvous; torchrun's re-rendezvous of its agents is in here too)
  checkpoint_load_s  -> checkpoint loaded (burnin also verifies SHA-256 sums; the torchrun script doesn't)
  first_step_s       -> first step after the resume done (DDP construction included in both)
A second split needs no log parsing and is measured the same way for both: kill -> first new
process started (`kill_to_spawn_s`), and process start -> process group formed (`spawn_to_pg_s`).

Each phase is reported as the median and p90 over --repeats kills; the spares' memory (resident and
proportional set size of one warm spare) is measured once.

torchrun is run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with its default shared store, the
restarted gloo group often fails to connect in this torch version (`--default-store-trials` kills
are run that way and counted, reported as `torchrun_default_store`). Repeats alternate burnin and
torchrun; medians are printed as JSON. Last, start-up probes time what a new rank does before it
can train: start Python, import torch, turn on deterministic algorithms, form the gloo group
(two processes at once, as a restart starts them).

    .venv/bin/python benchmarks/recovery.py [--repeats 10] [--ranks 2,4] [--keep] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import cpu_stall_us, machine, pressure  # benchmarks/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
PHASES = ("detection_s", "teardown_s", "restart_s", "checkpoint_load_s", "first_step_s", "total_s")
COMMON = ("kill_to_spawn_s", "spawn_to_pg_s", "checkpoint_load_s", "first_step_s", "total_s")
SYSTEMS = ("burnin", "burnin-cold", "burnin-fsdp", "burnin-tp", "torchrun")


def torchrun_args(ranks: int) -> list[str]:
    return ["--standalone", "--nproc-per-node", str(ranks), "--max-restarts", "1"]
_GLOG = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)(\.\d+) ")


# -- burnin ----------------------------------------------------------------------------------

def run_burnin(work: Path, spares: bool, ranks: int, parallel: dict[str, int] | None = None) -> dict[str, Any]:
    from burnin.core.events import read_events
    from burnin.harness.runner import run_scenario
    from burnin.scenarios.loader import load_scenario

    overrides: dict[str, Any] = {"recovery.spares": spares, "workload.ranks": ranks}
    if parallel is not None:  # FSDP2 (and tensor parallel): each rank holds its part, snapshots of its own shards
        overrides["workload.parallel"] = parallel
    sc = load_scenario("kill-rank", overrides=overrides)
    result = run_scenario(sc, out_dir=work / "burnin")
    fault = result.faults[0]
    if fault.recovery is None:
        raise RuntimeError(f"burnin kill-rank did not recover: {fault.outcome}; see {result.run_dir}")
    ev = read_events(Path(result.run_dir) / "events.jsonl")
    kill = fault.injected_at
    spawn = min(e["t"] for e in ev if e.get("event") == "rank_started" and e.get("attempt") == 1)
    common = _common(kill, spawn, ev, attempt=1)
    golden = json.loads((Path(result.run_dir) / "golden.json").read_text())
    return {"phases": _rounded(fault.recovery.to_dict(), PHASES), "common": common,
            "resumed_from_step": fault.recovery.resumed_from_step, "lost_steps": fault.lost_steps,
            "new_ranks": fault.recovery.new_ranks,
            "outcome": fault.outcome, "exact": result.exact, "final_state_hash": result.final_state_hash,
            "golden_state_hash": golden["state_hash"], "wall_s": round(result.wall_s, 2)}


# -- torchrun --------------------------------------------------------------------------------

def _job(ranks: int = 2) -> dict[str, Any]:
    """kill-rank's workload, checkpoint spacing and kill, for the torchrun script."""
    from burnin.scenarios.loader import load_scenario

    sc = load_scenario("kill-rank", overrides={"workload.ranks": ranks})
    kill = sc.faults[0]
    if kill.fault != "process.kill" or sc.workload.device != "cpu":
        raise RuntimeError(f"the bundled kill-rank scenario changed ({kill.fault}, {sc.workload.ranks} ranks): "
                           "update benchmarks/recovery.py")
    return {"workload": sc.workload.model_dump(mode="json"), "every": sc.checkpoint.every,
            "kill_rank": kill.rank, "kill_step": kill.step}


def _torchrun(out: Path, kill_step: int, share_store: bool, timeout_s: float = 300,
              ranks: int = 2) -> tuple[int | None, list[tuple[float, str]], float]:
    """Run the script under torchrun; (exit code or None when killed at timeout_s, stderr lines with
    their arrival times, wall s)."""
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if not share_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    torchrun = Path(sys.executable).parent / "torchrun"
    job = _job(ranks)
    cmd = [str(torchrun), *torchrun_args(ranks), str(HERE / "_torchrun_train.py"), "--out", str(out),
           "--workload", json.dumps(job["workload"]), "--every", str(job["every"]),
           "--kill-rank", str(job["kill_rank"]), "--kill-step", str(kill_step)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    lines = []
    # On timeout, SIGKILL the agent we started and its workers; that ends the read loop.
    timer = threading.Timer(timeout_s, _kill_tree, (proc.pid,))
    timer.start()
    try:
        for raw in proc.stderr:  # torchrun's agent logs one line per event, flushed
            lines.append((time.time(), raw.decode(errors="replace").rstrip("\n")))
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.wait()
    (out / "torchrun.log").write_text("\n".join(text for _, text in lines))
    wall = time.time() - t0
    return (None if wall >= timeout_s and proc.returncode == -signal.SIGKILL else proc.returncode), lines, wall


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (torchrun starts each worker in a session of its own)."""
    def children(p: int) -> list[int]:
        found = []
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                found += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return found

    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children(p)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _line_time(arrived: float, text: str) -> float:
    """The time a glog-style line (`W1124 04:08:26.772000 ...`) states, else the time it arrived."""
    m = _GLOG.match(text)
    if not m:
        return arrived
    mon, day, hh, mm, ss, frac = m.groups()
    year = time.localtime(arrived).tm_year
    return time.mktime((year, int(mon), int(day), int(hh), int(mm), int(ss), 0, 0, -1)) + float(frac)


def _rank_events(out: Path) -> list[dict[str, Any]]:
    ev = []
    for path in sorted(out.glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        ev += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines() if line.strip()]
    return ev


def run_torchrun(work: Path, n: int, ranks: int = 2) -> dict[str, Any]:
    out = work / f"torchrun-{ranks}-{n}"
    rc, lines, wall = _torchrun(out, kill_step=_job(ranks)["kill_step"], share_store=False, ranks=ranks)
    ev = _rank_events(out)
    finished = [e for e in ev if e["event"] == "finished"]
    if rc != 0 or len(finished) != ranks:
        raise RuntimeError(f"torchrun run failed (exit {rc}); see {out}/torchrun.log")
    kill = next(e["t"] for e in ev if e["event"] == "kill")
    after = [(_line_time(t, s), s) for t, s in lines if _line_time(t, s) >= kill]
    failed = next(t for t, s in after if "failed (exitcode" in s)
    sigterm = next((t for t, s in after if "closing signal" in s and t <= failed), None)
    detected = sigterm if sigterm is not None else failed
    spawn = min(e["t_start"] for e in ev if e["event"] == "process_start" and e["attempt"] == 1)
    common = _common(kill, spawn, ev, attempt=1)
    pg = max(e["t"] for e in ev if e["event"] == "pg_ready" and e["attempt"] == 1)
    phases = {"detection_s": detected - kill, "teardown_s": failed - detected, "restart_s": pg - failed,
              "checkpoint_load_s": common["checkpoint_load_s"], "first_step_s": common["first_step_s"]}
    phases["total_s"] = sum(phases.values())
    resumed = next(e for e in ev if e["event"] == "resumed" and e["attempt"] == 1)
    killed_at = next(e["step"] for e in ev if e["event"] == "kill")
    return {"phases": _rounded(phases, PHASES), "common": common,
            "resumed_from_step": resumed["from_step"], "lost_steps": killed_at + 1 - resumed["from_step"],
            "survivor_got_sigterm": sigterm is not None,
            "final_state_hash": finished[0]["state_hash"], "wall_s": round(wall, 2)}


def torchrun_reference(work: Path, ranks: int = 2) -> str:
    """Final state hash of a fault-free torchrun run of the same script."""
    out = work / f"torchrun-fault-free-{ranks}"
    rc, _, _ = _torchrun(out, kill_step=-1, share_store=False, ranks=ranks)
    finished = [e for e in _rank_events(out) if e["event"] == "finished"]
    if rc != 0 or len(finished) != ranks:
        raise RuntimeError(f"fault-free torchrun run failed (exit {rc}); see {out}/torchrun.log")
    return finished[0]["state_hash"]


def torchrun_default_store(work: Path, trials: int, timeout_s: float) -> dict[str, Any]:
    """Does the kill recover under torchrun's defaults (rendezvous store shared with the workers)?"""
    recovered, errors = 0, []
    for n in range(trials):
        out = work / f"torchrun-default-store-{n}"
        rc, lines, _ = _torchrun(out, kill_step=_job()["kill_step"], share_store=True, timeout_s=timeout_s)
        finished = [e for e in _rank_events(out) if e["event"] == "finished"]
        if rc == 0 and len(finished) == 2:
            recovered += 1
            continue
        error = next((s.strip() for _, s in lines if "connectFullMesh failed" in s), None)
        error = error or next((s.strip() for _, s in reversed(lines) if "Error" in s), f"exit code {rc}")
        if rc is None:
            error = f"killed after {timeout_s:g} s without recovering; last error: {error}"
        errors.append(re.sub(r"\[127\.0\.0\.1\]:\d+", "[127.0.0.1]:PORT", error)[:300])
    return {"trials": trials, "recovered": recovered, "timeout_s": timeout_s, "errors": sorted(set(errors))}


# -- where a restart's time goes -------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PG = ("import os, torch, torch.distributed as dist; torch.use_deterministic_algorithms(True); "
       "dist.init_process_group('gloo', rank=int(os.environ['RANK']), world_size=2)")
_PROBE_END = "\nimport os, sys, time; sys.stdout.write(repr(time.time())); sys.stdout.flush(); os._exit(0)"
PROBES = {
    "python_start": "pass",
    "import_torch": "import torch",
    "plus_deterministic_algorithms": "import torch; torch.use_deterministic_algorithms(True)",
    "plus_init_process_group": _PG,
}


def startup_probes(repeats: int) -> dict[str, dict[str, float]]:
    """Time from spawn to the end of each first stage of a rank's start (wall, and CPU of the slower
    process), two processes at once as a restart starts them. The process ends there with os._exit:
    interpreter teardown (torch's, dynamo's) is no part of a restart. The probes take turns, so a
    busy moment of the machine does not hit one alone."""
    wall: dict[str, list[float]] = {name: [] for name in PROBES}
    cpu: dict[str, list[float]] = {name: [] for name in PROBES}
    for _ in range(repeats):
        for name, code in PROBES.items():
            port, t0 = _free_port(), time.time()
            procs = [subprocess.Popen([sys.executable, "-c", code + _PROBE_END], stdout=subprocess.PIPE,
                                      env={**os.environ, "RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                                           "TRITON_INTERPRET": "1"})
                     for r in range(2)]
            ends, used = [], []
            for p in procs:
                ends.append(float(p.stdout.read() or "nan"))
                p.stdout.close()
                _, status, usage = os.wait4(p.pid, 0)
                p.returncode = os.waitstatus_to_exitcode(status)
                used.append(usage.ru_utime + usage.ru_stime)
            if any(p.returncode for p in procs) or any(e != e for e in ends):
                raise RuntimeError(f"start-up probe {name} failed")
            wall[name].append(max(ends) - t0)
            cpu[name].append(max(used))
    return {name: {"wall_s": round(statistics.median(wall[name]), 3), "cpu_s": round(statistics.median(cpu[name]), 3)}
            for name in PROBES}


# -- common ----------------------------------------------------------------------------------

def _common(kill: float, spawn: float, ev: list[dict[str, Any]], attempt: int) -> dict[str, float]:
    """The worker-side split: same definitions for both, from each rank's own timestamps."""
    mine = [e for e in ev if e.get("attempt") == attempt]
    pg = max(e["t"] for e in mine if e["event"] == "pg_ready")
    loaded = max(e["t"] for e in mine if e["event"] == "resumed")
    first: dict[int, float] = {}
    for e in sorted((e for e in mine if e["event"] == "step_done"), key=lambda e: e["t"]):
        first.setdefault(e["rank"], e["t"])
    first_step = max(first.values())
    return _rounded({"kill_to_spawn_s": spawn - kill, "spawn_to_pg_s": pg - spawn,
                     "checkpoint_load_s": loaded - pg, "first_step_s": first_step - loaded,
                     "total_s": first_step - kill}, COMMON)


def _rounded(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: round(float(d[k]), 4) for k in keys}


def _median(runs: list[dict[str, Any]], part: str, keys: tuple[str, ...]) -> dict[str, float]:
    return {k: round(statistics.median(r[part][k] for r in runs), 4) for k in keys}


def _p90(runs: list[dict[str, Any]], part: str, keys: tuple[str, ...]) -> dict[str, float]:
    """The 90th percentile (linear between order statistics; the maximum with fewer than 10 runs)."""
    def q(values: list[float]) -> float:
        return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]
    return {k: round(q([r[part][k] for r in runs]), 4) for k in keys}


def _mem(pid: int) -> dict[str, float]:
    fields = {}
    for path in (f"/proc/{pid}/status", f"/proc/{pid}/smaps_rollup"):
        for line in Path(path).read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "Pss"):
                fields[key] = int(rest.split()[0]) / 1024
    return {"rss_mib": round(fields["VmRSS"], 1), "pss_mib": round(fields["Pss"], 1)}


def spare_memory() -> dict[str, Any]:
    """What the pool costs per rank slot: the warm zygote's resident and proportional set size (MiB), and
    one spare forked from it (its pages shared with the zygote until written: PSS is the fair cost), with
    the zygote's warm-up and the time from the fork command to a ready spare."""
    from burnin.harness.spares import ForkedProc, become_subreaper

    if not become_subreaper():
        raise RuntimeError("PR_SET_CHILD_SUBREAPER refused: no spares on this kernel")
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        proc = subprocess.Popen([sys.executable, "-m", "burnin.rank.worker", "--zygote", "cpu", "1", "triton"],
                                stdin=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                            "BURNIN_SPARE_READY": str(ready),
                                                            "BURNIN_SUPERVISOR_PID": str(os.getpid())})
        spare = None
        try:
            deadline = time.time() + 120
            while not ready.exists() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
            if not ready.exists():
                raise RuntimeError("the zygote did not warm up")
            zygote = _mem(proc.pid)
            fifo, pid_file, spare_ready = (Path(tmp) / n for n in ("fifo", "pid", "spare-ready"))
            os.mkfifo(fifo)
            stdin = os.fdopen(os.open(fifo, os.O_RDWR), "wb", buffering=0)
            t0 = time.time()
            proc.stdin.write((json.dumps({"fifo": str(fifo), "pid_file": str(pid_file), "ready": str(spare_ready),
                                          "log": str(Path(tmp) / "spare.log")}) + "\n").encode())
            proc.stdin.flush()
            while not spare_ready.exists() and time.time() < deadline:
                time.sleep(0.001)
            fork_s = time.time() - t0
            spare = ForkedProc(int(pid_file.read_text()), stdin)
            time.sleep(0.5)  # let the fork settle (copy-on-write faults of its first steps)
            return {"zygote": zygote, "spare": _mem(spare.pid), "warm_up_s": float(ready.read_text()),
                    "fork_to_ready_s": round(fork_s, 4)}
        finally:
            if spare is not None:
                spare.stdin.close()
                spare.wait(timeout=30)
            proc.stdin.close()
            proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10, help="kills measured per system and rank count (default 10)")
    ap.add_argument("--ranks", default="2", help="rank counts to measure, comma-separated (default 2; e.g. 2,4)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"which to run (default {','.join(SYSTEMS)})")
    ap.add_argument("--no-exact-check", action="store_true",
                    help="skip the fault-free torchrun run that checks the resume is bit-exact")
    ap.add_argument("--default-store-trials", type=int, default=0,
                    help="kills run under torchrun's default (shared) rendezvous store, to count how many "
                         "recover within 45 s each (default 0: skipped)")
    ap.add_argument("--probe-repeats", type=int, default=0,
                    help="times each start-up probe (python, import torch, ...) is run (default 0: skipped)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (runs, logs) and say where")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON result")
    args = ap.parse_args(argv)
    try:
        rank_counts = [int(x) for x in args.ranks.split(",")]
    except ValueError:
        ap.error(f"--ranks {args.ranks!r}: give numbers such as 2,4")
    systems = [x for x in args.systems.split(",") if x]
    if args.repeats < 1 or any(n < 2 for n in rank_counts) or not set(systems) <= set(SYSTEMS) or not systems:
        ap.error(f"--repeats >= 1, --ranks >= 2 each, --systems from {', '.join(SYSTEMS)}")

    def say(msg: str) -> None:
        if not args.json_only:
            print(msg, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="burnin-bench-recovery-"))
    os.environ["BURNIN_CACHE_DIR"] = str(work / "cache")  # a fresh golden record, outside the user's cache
    started, load_before, stall_before = time.time(), os.getloadavg(), cpu_stall_us()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {str(n): {s: [] for s in systems} for n in rank_counts}
    extra: dict[str, Any] = {}
    try:
        extra["spare_memory"] = spare_memory()
        say(f"one warm spare: {extra['spare_memory']}")
        for n in rank_counts:
            for i in range(args.repeats):
                # Rotate the order, so a busy moment of the machine does not always hit the same system.
                order = systems[i % len(systems):] + systems[:i % len(systems)]
                for system in order:
                    if system == "torchrun":
                        r = run_torchrun(work, i, n)
                    else:
                        r = run_burnin(work, spares=system != "burnin-cold", ranks=n,
                                       parallel={"burnin-fsdp": {"dp_shard": -1},
                                                 "burnin-tp": {"dp_shard": -1, "tp": 2}}.get(system))
                    runs[str(n)][system].append(r)
                    say(f"{n} ranks, repeat {i + 1}/{args.repeats} {system:11s} total {r['phases']['total_s']:6.2f} s"
                        f"  lost {r['lost_steps']}  " + "  ".join(f"{k} {v:.3f}" for k, v in r["phases"].items()
                                                                   if k != "total_s"))
            if "torchrun" in systems and not args.no_exact_check:
                extra.setdefault("torchrun_fault_free_state_hash", {})[str(n)] = torchrun_reference(work, n)
        if args.default_store_trials > 0:
            d = torchrun_default_store(work, args.default_store_trials, timeout_s=45)
            extra["torchrun_default_store"] = d
            say(f"torchrun with its default store: {d['recovered']}/{d['trials']} recovered")
        if args.probe_repeats > 0:
            extra["startup_probes"] = startup_probes(args.probe_repeats)
            say(f"start-up probes: {extra['startup_probes']}")
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    by_ranks: dict[str, Any] = {}
    for n, per_system in runs.items():
        out: dict[str, Any] = {}
        for system, rs in per_system.items():
            entry: dict[str, Any] = {
                "phases_median": _median(rs, "phases", PHASES), "phases_p90": _p90(rs, "phases", PHASES),
                "common_median": _median(rs, "common", COMMON),
                "lost_steps": sorted({r["lost_steps"] for r in rs}),
                "resumed_from_step": sorted({r["resumed_from_step"] for r in rs}),
            }
            if system == "torchrun":
                ref = extra.get("torchrun_fault_free_state_hash", {}).get(n)
                if ref is not None:
                    entry["exact"] = [r["final_state_hash"] == ref for r in rs]
            else:
                entry["exact"] = [r["exact"] for r in rs]
                entry["outcomes"] = sorted({r["outcome"] for r in rs})
                entry["new_ranks"] = sorted({r["new_ranks"] or "-" for r in rs})
            out[system] = entry
        if "torchrun" in out:
            # The same definitions for all: kill -> first step after the resume, from the ranks' own timestamps.
            out["ratio_over_torchrun"] = {
                system: {k: round(out[system]["common_median"][k] / out["torchrun"]["common_median"][k], 3)
                         for k in COMMON if out["torchrun"]["common_median"][k] > 0}
                for system in out if system != "torchrun"}
        by_ranks[n] = out

    job = _job()
    result = {
        "benchmark": "recovery",
        "date": time.strftime("%Y-%m-%d", time.localtime(started)),
        "command": "python benchmarks/recovery.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "job": {"checkpoint_every": job["every"], "kill_rank": job["kill_rank"], "kill_after_step": job["kill_step"],
                "workload": {k: v for k, v in job["workload"].items() if k != "ranks"}, "backend": "gloo"},
        "repeats": args.repeats,
        "machine": {**machine(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    # Share of the run's wall time in which some task waited for a CPU (ours included).
                    "cpu_pressure_pct": pressure(stall_before, started)},
        "torchrun": {"command": "torchrun --standalone --nproc-per-node N --max-restarts 1 "
                                "benchmarks/_torchrun_train.py --out DIR",
                     "env": {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}},
        "by_ranks": by_ranks,
        "phase_mapping": {
            "detection_s": "torchrun: kill -> agent sends SIGTERM to the survivor (or logs the failure if it had "
                           "already died); the agent polls every --monitor-interval (0.1 s)",
            "teardown_s": "torchrun: -> agent logs 'failed (exitcode ...)' after the survivors exited; burnin: "
                          "includes the 0.25 s in which the supervisor gathers evidence of the cause",
            "restart_s": "torchrun: also holds the agent's re-rendezvous; burnin has none. burnin: with spares, "
                         "handing the ranks to warm processes, then the process group",
            "checkpoint_load_s": "burnin verifies checksums (memory snapshot or SHA-256 of the disk checkpoint) and "
                                 "broadcasts the choice; the torchrun script trusts the newest complete checkpoint",
            "kill": "burnin: the supervisor's fault_injected event, just before os.kill; torchrun: rank 1 logs, "
                    "then kills itself",
            "process start": "burnin: the worker's rank_started event (after its light imports; for a spare, when "
                             "it takes the assignment); torchrun: the first line of the script (before argparse)",
        },
        "runs": runs,
        **{k: extra[k] for k in ("spare_memory", "torchrun_default_store", "startup_probes") if k in extra},
        "wall_s": round(time.time() - started, 1),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
