"""The same kill under three recoveries: torchft's heal, burnin's warm spares, and torchrun's restart.

One job, examples/torchft/train.py (a small language model, 4 gloo ranks, the steps paced to
--step-time), with rank 2 SIGKILLed between steps --kill-step and the next:

  torchft   2 replica groups of 2 ranks (`recovery.mode: external`): burnin starts the lighthouse and a
            torchrun per group; torchrun restarts the killed group, which heals from the live group while
            the live group goes on alone. Time: the kill to the group's first step with every group
            taking part again (faults[0].details.heal.total_s, in phases). Steps lost: the steps the
            killed group did not train (the job itself re-trains none).
  spares    one DDP job over the 4 ranks (`train.py --plain 2`: each rank reads the batch it reads in
            its replica group), burnin's default recovery: warm spare ranks take over and resume from
            the in-memory snapshot of the last step. Time: faults[0].recovery.total_s. Steps lost: the
            steps the job trained again.
  torchrun  the same DDP job under `torchrun --standalone --nproc-per-node 4 --max-restarts 1 -m
            burnin.rank`: torchrun restarts all 4 ranks, which resume from burnin's newest checkpoint
            on disk (every 5 steps); judged by `burnin report`.

Each also reports what the fault cost the job's training: rank 0's span from its first step to its last
against that span at the pace of its steps before the fault, and goodput = that ratio (start-up, which
a warm pool shortens, does not count). Runs alternate the modes --repeats times; medians printed as JSON.

    .venv/bin/python benchmarks/external.py [--repeats 1] [--steps 200] [--step-time 0.15] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_stall_us, machine, pressure  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "torchft" / "train.py"


def _scenario(mode: str, args: argparse.Namespace) -> str:
    pace = ["--step-time", str(args.step_time)]
    kill = f"  - {{fault: process.kill, rank: 2, step: {args.kill_step}, expect: recovered}}\n"
    if mode == "torchft":
        return (f"name: bench-torchft\nworkload:\n  entry: train.py\n  args: {json.dumps(pace)}\n  ranks: 4\n"
                f"  steps: {args.steps}\n  tolerance: {{window: 20, loss_rtol: 0.1, state_rtol: 0.05}}\n"
                "recovery:\n  mode: external\n  external:\n    replica_groups: 2\n"
                "    lighthouse: {min_replicas: 1, join_timeout_ms: 6000, heartbeat_timeout_ms: 2000}\n"
                f"timeouts: {{run_s: 900}}\nfaults:\n{kill}")
    plain = json.dumps(["--plain", "2", *pace])
    return (f"name: bench-plain\nworkload:\n  entry: train.py\n  args: {plain}\n  ranks: 4\n  steps: {args.steps}\n"
            f"timeouts: {{run_s: 900}}\nfaults:\n{kill}")


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def _cost(run_dir: Path) -> dict[str, float | None]:
    """What the fault cost the job, from the run's own event log: the span from its first step to its last
    (under torchft, each step when the first group committed it; otherwise rank 0's last execution of it),
    against that span at the pace of the steps before the first fault (the median gap), so start-up (a
    warm pool or not, a golden run's cold start) does not count."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    t_fault = min((e["t"] for e in events if e.get("event") == "fault_injected"), default=None)
    done: dict[int, float] = {}
    for e in events:
        if e.get("event") != "step_done":
            continue
        if "committed" in e:  # torchft: the job is past a step once any group committed it (rank 0 may be out)
            if e["committed"]:
                done[e["step"]] = min(done.get(e["step"], e["t"]), e["t"])
        elif e.get("rank") == 0:
            done[e["step"]] = e["t"]  # a replayed step: its last execution counts
    times = [done[s] for s in sorted(done)]
    before = [b - a for a, b in zip(times, times[1:]) if t_fault is None or b < t_fault]
    if len(times) < 2 or not before:
        return {"fault_cost_s": None, "goodput": None}
    span, pace = times[-1] - times[0], statistics.median(before)
    expected = pace * (len(times) - 1)
    return {"fault_cost_s": round(span - expected, 2), "goodput": round(expected / span, 3), "pace_s": round(pace, 4)}


def run_burnin(mode: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from burnin.harness.runner import run_scenario
    from burnin.scenarios import load_scenario

    (work / f"{mode}.yaml").write_text(_scenario(mode, args))
    result = run_scenario(load_scenario(work / f"{mode}.yaml"), work / f"out-{mode}")
    run_dir = Path(result.run_dir)
    s, f = _summary(run_dir), _summary(run_dir)["faults"][0]
    if mode == "torchft":
        heal = f["details"].get("heal", {})
        kill_to_full, phases = heal.get("total_s"), {k: heal.get(k) for k in (
            "detection_s", "return_s", "transfer_s", "rejoin_s")}
    else:
        rec = f["recovery"] or {}
        kill_to_full, phases = rec.get("total_s"), {k: rec.get(k) for k in (
            "detection_s", "teardown_s", "restart_s", "checkpoint_load_s", "first_step_s")}
    return {"ok": s["ok"] and not s.get("error"), "outcome": f["outcome"], "kill_to_full_s": kill_to_full,
            "lost_steps": f["lost_steps"], "phases": phases, "wall_s": s["wall_s"], **_cost(run_dir),
            "run_dir": str(run_dir)}


def run_torchrun(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from burnin.harness.runner import rebuild_reports

    scenario = work / "torchrun.yaml"
    scenario.write_text(_scenario("plain", args))
    run_dir = work / f"out-torchrun-{time.time_ns()}"
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # the shared store's restart fails (recovery.py)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                           "--max-restarts", "1", "--monitor-interval", "0.1", "-m", "burnin.rank", str(scenario),
                           "--run-dir", str(run_dir)], capture_output=True, text=True, env=env, timeout=900,
                          cwd=str(work))
    wall = time.time() - t0
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-2000:]}
    result = rebuild_reports(run_dir)
    f = result.faults[0]
    rec = f.recovery.to_dict() if f.recovery else {}
    return {"ok": result.ok, "outcome": f.outcome, "kill_to_full_s": rec.get("total_s"), "lost_steps": f.lost_steps,
            "phases": {k: rec.get(k) for k in ("detection_s", "teardown_s", "restart_s", "checkpoint_load_s",
                                               "first_step_s")},
            "wall_s": wall, **_cost(run_dir), "run_dir": str(run_dir)}


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-time", type=float, default=0.15)
    ap.add_argument("--kill-step", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="burnin-bench-external-"))
    shutil.copy(TRAIN, work / "train.py")
    stall, started = cpu_stall_us(), time.time()
    rows: dict[str, list[dict[str, Any]]] = {"torchft": [], "spares": [], "torchrun": []}
    try:
        for i in range(args.repeats):
            for mode in rows:
                row = run_torchrun(work, args) if mode == "torchrun" else run_burnin(mode, work, args)
                rows[mode].append(row)
                if not args.json_only:
                    print(f"[{i + 1}/{args.repeats}] {mode}: kill -> full participation {row.get('kill_to_full_s')} s, "
                          f"lost steps {row.get('lost_steps')}, the fault cost {row.get('fault_cost_s')} s of training "
                          f"(goodput {row.get('goodput')}), {row.get('outcome')}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out: dict[str, Any] = {"benchmark": "external", "machine": machine(), "cpu_pressure_pct": pressure(stall, started),
                           "steps": args.steps, "step_time_s": args.step_time, "repeats": args.repeats, "modes": {}}
    for mode, rs in rows.items():
        cost = [r["fault_cost_s"] for r in rs if r.get("fault_cost_s") is not None]
        good = [r["goodput"] for r in rs if r.get("goodput") is not None]
        out["modes"][mode] = {
            "all_ok": all(r.get("ok") for r in rs), "kill_to_full_s": _median(rs, "kill_to_full_s"),
            "lost_steps": _median(rs, "lost_steps"), "fault_cost_s": round(statistics.median(cost), 2) if cost else None,
            "goodput": round(statistics.median(good), 3) if good else None,
            "phases": {k: round(statistics.median([r["phases"][k] for r in rs if r.get("phases", {}).get(k) is not None]), 3)
                       for k in (rs[0].get("phases") or {}) if any(r.get("phases", {}).get(k) is not None for r in rs)},
            "runs": rs if args.keep else None}
    ref = out["modes"]["spares"]["kill_to_full_s"]
    for mode, m in out["modes"].items():
        m["vs_spares"] = round(m["kill_to_full_s"] / ref, 2) if ref and m["kill_to_full_s"] else None
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
