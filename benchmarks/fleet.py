"""How well a fleet burn-in names defective nodes, on a host busy with something else.

Runs --fleets local fleets (`burnin fleet run --local N`, the bundled `fleet` scenario, --duration each)
one after the other while --load CPU hogs spin beside them (outside the nodes' cgroups: the host is busy,
the nodes are not told). In each fleet, one node is planted slow (--slow-fraction of a node's CPU quota)
and one with the simulated silent defect (every --every calls, on rank 1), the rest healthy; which node
gets which rotates. Each fleet is scored against its sealed plant file (`burnin fleet score`), and then
judged again (`burnin fleet report`) to check that the verdicts are the same.

Prints JSON: per fleet the verdicts and the score, and in all: defective nodes found / planted, false
alarms / healthy node-runs, the silent defects' first divergent step against the first flip the rank
logged, re-judged verdicts identical, wall time per fleet.

    .venv/bin/python benchmarks/fleet.py [--fleets 5] [--nodes 6] [--duration 60] [--load 1] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_stall_us, machine, pressure  # benchmarks/ is on sys.path when run as a script

BURNIN = [sys.executable, "-m", "burnin"]


def one_fleet(k: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    names = [f"node-{i}" for i in range(1, args.nodes + 1)]
    slow, silent = names[k % args.nodes], names[(k + 1) % args.nodes]
    plant = work / f"plant-{k}.yaml"
    plant.write_text(f"{slow}: {{slow: {{cpu_fraction: {args.slow_fraction}}}}}\n"
                     f"{silent}: {{silent: \"every={args.every},bit=10,rank=1\"}}\n")
    out = work / f"fleet-{k}"
    t0 = time.time()
    run = subprocess.run([*BURNIN, "fleet", "run", "--local", str(args.nodes), "--duration", f"{args.duration}s",
                          "--seed", str(k), "--out", str(out), "--plant", str(plant), "--quiet",
                          "--history", str(work / "history.sqlite")], capture_output=True, text=True)
    wall = time.time() - t0
    fleet = json.loads((out / "fleet.json").read_text())
    first = (out / "fleet.json").read_text()
    subprocess.run([*BURNIN, "fleet", "report", str(out), "--history", str(work / "history.sqlite")],
                   capture_output=True, text=True)
    same = (out / "fleet.json").read_text() == first
    score = subprocess.run([*BURNIN, "fleet", "score", str(out)], capture_output=True, text=True)
    scored = json.loads((out / "score.json").read_text())
    logs = "".join(p.read_text(errors="replace") for p in (out / "nodes" / silent).glob("*/ranks/*.log"))
    flips = sorted(int(m) for m in re.findall(r"SIMULATED DEFECT on rank 1: .* \(step (\d+)\)", logs))
    q = fleet["nodes"][silent]["quorum"] or {}
    return {"fleet": k, "exit": run.returncode, "wall_s": round(wall, 1), "slow": slow, "silent": silent,
            "verdicts": {n: v["verdict"] for n, v in fleet["nodes"].items()},
            "slow_score": fleet["nodes"][slow]["speed"]["score"] if fleet["nodes"][slow]["speed"] else None,
            "healthy_scores": sorted(round(v["speed"]["score"], 3) for n, v in fleet["nodes"].items()
                                     if n not in (slow, silent) and v["speed"] and v["speed"]["score"]),
            "silent_step": q.get("step"), "silent_ranks": q.get("ranks"), "flips": flips,
            "found": len(scored["found"]), "missed": [m["node"] for m in scored["missed"]],
            "false_alarms": [f["node"] for f in scored["false_alarms"]], "score_exit": score.returncode,
            "rejudged_identical": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleets", type=int, default=5)
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--duration", type=int, default=60)
    ap.add_argument("--slow-fraction", type=float, default=0.85)
    ap.add_argument("--every", type=int, default=60)
    ap.add_argument("--load", type=int, default=1, help="CPU hogs spinning beside the fleets (the busy host)")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    stall, t0 = cpu_stall_us(), time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="burnin-fleet-bench-") as tmp:
            rows = []
            for k in range(args.fleets):
                rows.append(one_fleet(k, args, Path(tmp)))
                if not args.json_only:
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    planted = 2 * len(rows)
    healthy_runs = (args.nodes - 2) * len(rows)
    out = {"machine": machine(), "cpu_pressure": pressure(stall, t0), "args": vars(args),
           "found": sum(r["found"] for r in rows), "planted": planted,
           "false_alarms": sum(len(r["false_alarms"]) for r in rows), "healthy_node_runs": healthy_runs,
           "silent_named_at_a_flip": sum(1 for r in rows if r["silent_step"] in r["flips"] and r["silent_ranks"] == [1]),
           "rejudged_identical": all(r["rejudged_identical"] for r in rows),
           "wall_s_per_fleet": [r["wall_s"] for r in rows], "fleets": rows}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
