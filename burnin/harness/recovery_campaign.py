"""Process-fault campaigns: many kills, hangs, exceptions and damaged checkpoints, each recovered for real.

A data-fault campaign (`burnin.rank.campaign_worker`) replays one window in one process group,
because a bit flip leaves the processes standing. A process fault does not: each trial here is a
whole supervised run of the scenario's workload with one drawn fault, the real fault (SIGKILL,
SIGSTOP, an exception in the step, a damaged checkpoint followed by a kill so a restart has to read
it), the real detection and restart, judged by the same verdict as `burnin run` against one golden
run. What makes hundreds of them cheap is the spare pool (`burnin.harness.spares`), which lives as
long as the campaign: every rank of every trial is a fork of a warm zygote, so no trial pays
Python's and torch's start-up, neither for its first attempt nor for its restart.

Each finished trial is one line of `trials.jsonl` (an interrupted campaign resumes after the last
one), and keeps its own directory under `trials/` with its event log and reports (its checkpoints
are removed once it is judged; a report.html with plots only when the trial failed). The summary
gives outcome rates with Wilson intervals, the exact rate, recovery time per fault and phase as
p50/p90/p99, and lost steps.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

from burnin.core.events import read_events
from burnin.harness import cleanup
from burnin.harness.external import ExternalRun
from burnin.harness.golden import get_golden, golden_key
from burnin.harness.runner import run_judged
from burnin.harness.spares import open_pool
from burnin.reports.trials import CAMPAIGN_SCHEMA_VERSION, outcome_rates, wilson
from burnin.reports.verdict import judge
from burnin.reports.writers import write_reports
from burnin.scenarios.campaign import trial_scenario
from burnin.scenarios.schema import TRIAL_OUTCOMES, Scenario

__all__ = ["run_trials",
           "summarize", "PHASES"]

PHASES = ("detection_s", "teardown_s", "restart_s", "checkpoint_load_s", "first_step_s", "total_s")


def run_trials(scenario: Scenario, run_dir: Path, run_id: str, plan: list[dict[str, Any]], done: dict[int, Any],
               record: Callable[[dict[str, Any]], None], on_event: Callable[[dict[str, Any]], None] | None,
               metrics: Any) -> None:
    """Run the trials of `plan` not in `done`, one supervised run each, over one spare pool."""
    external = scenario.recovery.mode == "external"  # each trial the system under test, launched anew
    pool = None if external else open_pool(scenario, run_dir, run_id)[0]
    goldens: dict[str, Any] = {}
    try:
        for trial in plan:
            k = trial["trial"]
            if k in done:
                continue
            sc = trial_scenario(scenario, trial)
            key = golden_key(sc)
            if key not in goldens:
                goldens[key], _ = get_golden(sc, on_event=on_event, pool=pool)
            golden = goldens[key]
            tdir = run_dir / "trials" / f"{k:04d}"
            if tdir.exists():  # a trial cut short by an interruption runs again from the start
                shutil.rmtree(tdir)
            tdir.mkdir(parents=True)
            (tdir / "scenario.json").write_text(sc.model_dump_json(indent=1))
            if on_event:
                on_event({"event": "trial_started", "trial": k, "t": time.time()})
            t0 = time.time()
            if external:
                ExternalRun(sc, tdir, f"{run_id}-{k:04d}", metrics=metrics).run()
                events = read_events(tdir / "events.jsonl")
                result = judge(events, sc, golden, run_id=f"{run_id}/trials/{k:04d}", run_dir=str(tdir),
                               config_hash=key)
            else:
                result, events = run_judged(sc, tdir, run_id, golden=golden, pool=pool, metrics=metrics,
                                            judged_as=f"{run_id}/trials/{k:04d}")
            wall = time.time() - t0
            if metrics is not None:
                metrics.from_result(result)
            # a page of plots per trial would double a trial's cost: only a trial that failed gets one
            write_reports(result, tdir, html=not (result.ok and result.error is None), events=events, golden=golden)
            shutil.rmtree(tdir / "checkpoints", ignore_errors=True)
            rec = _trial_record(trial, result, events, wall)
            record(rec)
            if on_event:
                on_event({"event": "trial_done", "trial": k, "outcome": rec["outcome"], "exact": rec["exact"],
                          "t": time.time()})
    finally:
        if pool is not None:
            pool.close()

        cleanup.unregister(run_id)


def _trial_record(trial: dict[str, Any], result: Any, events: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    main = result.faults[0]
    recovery = next((f.recovery for f in result.faults if f.recovery is not None), None)
    resumed = [e for e in events if e.get("event") == "resumed" and e.get("attempt", 0) > 0 and e.get("rank") == 0]
    unexplained = [f.signature for f in result.failures if f.fault_index is None]
    return {"trial": trial["trial"], "template": trial["template"], "fault": trial["faults"][0],
            "faults": trial["faults"], "kind": "recovery",
            "outcome": main.outcome if main.injected else "failed", "injected": main.injected,
            "outcomes": [f.outcome for f in result.faults], "exact": result.exact, "ok": result.ok,
            "failed_expectations": [e.name for e in result.expectations if not e.ok],
            "finished": result.finished, "restarts": result.restarts, "error": result.error,
            "detected_by": main.detected_by, "cause": main.cause,
            "recovery": recovery.to_dict() if recovery is not None else None,
            "lost_steps": max((f.lost_steps for f in result.faults if f.lost_steps is not None), default=None),
            "tier": resumed[0].get("tier") if resumed else None,
            "unexplained": unexplained, "diverged_at_step": result.diverged_at_step, "wall_s": wall_s}


def _percentiles(xs: list[float]) -> dict[str, float | None]:
    import numpy as np  # lazy: numpy

    if not xs:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(np.asarray(xs, dtype=float), [50, 90, 99])
    return {"n": len(xs), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(max(xs))}


def summarize(scenario: Scenario, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Outcome and exact rates with Wilson intervals, recovery percentiles per fault and phase, lost steps."""
    trials = sorted(trials, key=lambda t: t["trial"])

    def block(ts: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(ts)
        exact = sum(bool(t["exact"]) for t in ts)
        lost = [t["lost_steps"] for t in ts if t["lost_steps"] is not None]
        recs = [t["recovery"] for t in ts if t["recovery"]]
        return {
            "trials": n,
            "outcomes": outcome_rates([t["outcome"] for t in ts]),
            "exact": {"count": exact, "rate": exact / n if n else 0.0, "ci95": list(wilson(exact, n))},
            "recovery_s": {p: _percentiles([r[p] for r in recs if r.get(p) is not None]) for p in PHASES},
            "lost_steps": {"n": len(lost), "max": max(lost, default=None),
                           "mean": sum(lost) / len(lost) if lost else None,
                           "histogram": {str(k): v for k, v in sorted(Counter(lost).items())}},
            "new_ranks": dict(Counter(r.get("new_ranks") or "?" for r in recs)),
            "tiers": dict(Counter(t["tier"] or "none" for t in ts)),
            "unexplained_failures": sum(len(t["unexplained"]) for t in ts),
            "wall_s": _percentiles([t["wall_s"] for t in ts]),
        }

    by_fault: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        by_fault[t["fault"]["fault"]].append(t)
    return {
        "schema_version": CAMPAIGN_SCHEMA_VERSION,
        "kind": "recovery",
        "scenario": scenario.name,
        "seed": scenario.campaign.seed if scenario.campaign else None,
        # external recovery: judged by the invariants, never bit-exact (the console and pages say so)
        "comparison": "invariants" if scenario.recovery.mode == "external" else "exact",
        **block(trials),
        "by_fault": {f: block(ts) for f, ts in sorted(by_fault.items())},
        "failed_expectations": sum(not t["ok"] for t in trials),
        "errors": [{"trial": t["trial"], "error": t["error"]} for t in trials if t.get("error")],
    }


def markdown(summary: dict[str, Any], run_dir: Path) -> str:
    lines = [f"# Recovery campaign {summary['scenario']}: {summary['trials']} trials (seed {summary['seed']})", ""]
    if not summary.get("complete", True):
        lines += [f"**Incomplete**: resume with `burnin campaign --resume {run_dir}`", ""]
    ex = summary["exact"]
    exactness = ("Judged by the invariants of a system that recovers itself (recovery.mode: external), in "
                 "tolerance: never bit-exact." if summary.get("comparison") == "invariants" else
                 f"Bit-exact against the golden run: {ex['count']}/{summary['trials']} "
                 f"(95 % CI {ex['ci95'][0]:.3f}–{ex['ci95'][1]:.3f}).")
    lines += [f"{exactness} Unexplained failures: {summary['unexplained_failures']}.", "",
              "| fault | trials | " + " | ".join(TRIAL_OUTCOMES) + " | exact | lost steps (max) |",
              "|---|---|" + "---|" * len(TRIAL_OUTCOMES) + "---|---|"]
    for name, b in summary["by_fault"].items():
        o = b["outcomes"]
        lost = b["lost_steps"]
        lines.append(f"| {name} | {b['trials']} | " + " | ".join(
            f"{o[k]['count']} ({o[k]['ci95'][0]:.2f}–{o[k]['ci95'][1]:.2f})" if o[k]["count"] else "0"
            for k in TRIAL_OUTCOMES) + f" | {b['exact']['count']} | {lost['max'] if lost['max'] is not None else '–'} |")
    lines += ["", "## Recovery time (seconds: p50 / p90 / p99)", "",
              "| fault | " + " | ".join(p[:-2] for p in PHASES) + " |", "|---|" + "---|" * len(PHASES)]
    for name, b in summary["by_fault"].items():
        cells = []
        for p in PHASES:
            v = b["recovery_s"][p]
            cells.append("–" if v["p50"] is None else f"{v['p50']:.3f} / {v['p90']:.3f} / {v['p99']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Phases: detection (fault to failure detected), teardown (old group gone), restart (new ranks up, "
                  "group formed), checkpoint_load, first_step (first step after resume); total is their sum.", ""]
    return "\n".join(lines)
