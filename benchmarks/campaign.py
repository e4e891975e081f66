"""Campaign throughput (trials per minute on the tiny model) and the per-step cost of each detector.

Detector cost: fault-free runs of the real worker, one per detector configuration, alternated over
rounds so drift hits every configuration alike; the median step time of each, as a ratio to the run
with no detectors. Throughput: one campaign of --trials trials, wall time from start to summary.
Prints JSON. Usage: python benchmarks/campaign.py [--trials 60] [--rounds 2] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_stall_us, machine, pressure  # benchmarks/ is on sys.path when run as a script

from burnin.harness.campaign import run_campaign
from burnin.core.events import read_events
from burnin.harness.supervisor import Supervisor
from burnin.scenarios import load_scenario
from burnin.scenarios.schema import Scenario

CONFIGS = {
    "none": {},
    "nonfinite": {"nonfinite": {}},
    "loss_spike": {"loss_spike": {}},
    "grad_norm_spike": {"grad_norm_spike": {}},
    "update_rms_spike": {"update_rms_spike": {}},
    "fingerprint_every_1": {"fingerprint": {"every": 1}},
    "recompute_every_4": {"recompute": {"every": 4}},
}


def step_times(detectors: dict, steps: int, work: Path, tag: str) -> list[float]:
    sc = Scenario.model_validate({"name": f"bench-{tag}", "workload": {"steps": steps},
                                  "checkpoint": {"every": 10_000}, "detectors": detectors,
                                  "recovery": {"mode": "rollback"}})
    run_dir = work / f"{tag}-{time.time_ns()}"
    if not Supervisor(sc, run_dir, run_dir.name).run():
        raise SystemExit(f"benchmark run {tag} failed; see {run_dir}")
    dts = [e["dt"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "step_done" and e["rank"] == 0]
    return dts[5:]  # warm-up steps out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    started, stall_before = time.time(), cpu_stall_us()
    work = Path(tempfile.mkdtemp(prefix="burnin-bench-"))
    os.environ.setdefault("BURNIN_CACHE_DIR", str(work / "cache"))

    samples: dict[str, list[float]] = {k: [] for k in CONFIGS}
    for r in range(args.rounds):
        order = list(CONFIGS) if r % 2 == 0 else list(reversed(CONFIGS))
        for name in order:
            samples[name] += step_times(CONFIGS[name], args.steps, work, name)
    base = statistics.median(samples["none"])
    detectors = {name: {"median_step_s": statistics.median(v), "ratio_to_bare": statistics.median(v) / base,
                        "steps": len(v)} for name, v in samples.items()}

    scenario = load_scenario("sdc-campaign")
    t0 = time.time()
    summary = run_campaign(scenario, work / "campaign", trials=args.trials)
    wall = time.time() - t0
    print(json.dumps({
        "machine": machine(),
        "cpu_pressure_pct": pressure(stall_before, started),
        "date": time.strftime("%Y-%m-%d"),
        "detector_step_cost": detectors,
        "campaign": {"scenario": "sdc-campaign", "trials": args.trials, "wall_s": wall,
                     "trials_per_minute": args.trials / wall * 60,
                     "projected_1000_trials_min": 1000 / (args.trials / wall) / 60,
                     "outcomes": {k: v["count"] for k, v in summary["outcomes"].items()}},
    }, indent=1))


if __name__ == "__main__":
    sys.exit(main())
