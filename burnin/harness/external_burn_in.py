"""A burn-in of a job that recovers itself (`recovery.mode: external`, torchft): the replica groups train for
the stated time while faults arrive at random instants, and every rank gets a health verdict.

The schedule is a burn-in's (`burn_in.draw_schedule`: Poisson arrivals per kind from the seed, quiet at the
start and the end). Each arrival waits, as every fault of an external run does, until every group has
taken part in a few steps in a row since the fault before (`harness/external.py`): faults do not pile up
on a group that is still healing. When the time is up and the groups are settled, the launcher tells them
the step to stop at (`ranks/stop`); arrivals still waiting then never fire (`burn_in_stop` lists them).

The verdict is `burnin run`'s of an external run (`reports/external.py`): each fault recovered, degraded,
masked or failed, with its heal phases and the steps its group skipped; the invariants (the groups agree
bit for bit, no update outside the quorum, every group finishes, nothing left running), and the loss and
final state within tolerance of a fault-free run of as many steps, made afterwards (the golden run: a
second run as long as the burn-in's training, cached like any other).

Health per rank (`burn_in.assess`, the same thresholds): the straggler score on the rank's forward time
per step (in DDP no peer is waited for there), its trend over the burn-in, and the times its group left
the quorum that no injected fault explains (a drop is explained by the newest fault before it while that
fault's heal lasts, or, for a fault that caused no heal, until the group commits a later step with every
group).
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from burnin.core.events import EventWriter, read_events
from burnin.errors import UserError
from burnin.harness.burn_in import PHASE, conclude, draw_schedule, period_stats
from burnin.harness.external import ExternalRun
from burnin.harness.golden import get_golden
from burnin.harness.preflight import check_device, check_out_dir
from burnin.harness.runner import make_run_dir, new_run_id
from burnin.reports.external import INVARIANTS
from burnin.reports.metrics import Metrics
from burnin.reports.result import Failure
from burnin.reports.verdict import judge
from burnin.scenarios.burn_in import runtime_scenario
from burnin.scenarios.schema import Scenario

__all__ = ["run_external_burn_in", "rollups_of", "unexplained_drops"]

#: The health roll-up period, seconds (as a burn-in of burnin's own recovery).
PERIOD_S = 10.0


def run_external_burn_in(scenario: Scenario, out_dir: str | Path, *, duration_s: float, seed: int,
                         on_event: Callable[[dict[str, Any]], None] | None = None,
                         history: str | None = None) -> dict[str, Any]:
    """Run the burn-in; returns its summary (the shape of `burn_in.run_burn_in`'s, judged by invariants)."""
    schedule = draw_schedule(scenario, duration_s, seed)
    run_id = new_run_id(scenario.name)
    sc = runtime_scenario(scenario, schedule, duration_s)
    check_device(sc)
    run_dir = make_run_dir(check_out_dir(out_dir), run_id, scenario.model_dump_json(indent=1))
    (run_dir / "schedule-drawn.json").write_text(json.dumps({"seed": seed, "duration_s": duration_s,
                                                             "faults": schedule}, indent=1))
    metrics = Metrics()
    metrics.set_run(scenario.name, run_id)
    launcher = ExternalRun(sc, run_dir, run_id, on_event=on_event, metrics=metrics, burn_in_s=duration_s)
    t0 = time.time()
    interrupted = error = None
    try:
        launcher.run()
    except KeyboardInterrupt:
        interrupted = "interrupted by SIGINT: the verdict covers what ran"
    except Exception as exc:  # burnin's failure (the lighthouse did not start, ...): reported, judged as far as it got
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
    if launcher.usage_error is not None:  # bad input a rank found: one line, exit 2
        raise UserError(f"{scenario.workload.entry}: {launcher.usage_error} (run directory {run_dir})")
    events = read_events(run_dir / "events.jsonl")
    stop = next((e for e in reversed(events) if e.get("event") == "burn_in_stop"), None)
    golden = None
    if interrupted is None and stop is not None:
        # the reference: the same groups, fault-free, for as many steps as the burn-in trained
        reference = sc.model_copy(update={"workload": sc.workload.model_copy(update={"steps": stop["steps"]})})
        if on_event:
            on_event({"event": "golden_started", "steps": stop["steps"], "t": time.time()})
        try:
            golden, _ = get_golden(reference, on_event=on_event)
            (run_dir / "golden.json").write_text(golden.to_json())
        except KeyboardInterrupt:
            interrupted = "interrupted by SIGINT during the golden run: no tolerance verdict"
        except Exception as exc:
            error = error or f"the golden run failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    t_go = launcher.t_go or t0
    rollups = rollups_of(events, t_go)
    with EventWriter(run_dir / "events.jsonl") as log:  # the health over time, as any burn-in's log has it
        events += [log.emit("burn_in_rollup", source="supervisor", **r) for r in rollups]
        events.append(log.emit("burn_in_ended", source="supervisor", interrupted=interrupted))
    result = judge(events, sc, golden, run_id=run_id, run_dir=str(run_dir), config_hash="burn-in", error=error)
    result.failures = unexplained_drops(events, sc, result.faults)
    summary = _summary(scenario, sc, result, events, t_go, stop, time.time() - t_go, duration_s, seed, interrupted)
    return conclude(scenario, sc, summary, result, events, rollups, run_dir=run_dir, metrics=metrics,
                    history=history, started_at=t_go, sessions=1)


def rollups_of(events: list[dict[str, Any]], t_go: float) -> list[dict[str, Any]]:
    """Each rank's forward time per step, rolled up per 10-second period from the gang start (what a burn-in
    of burnin's own recovery rolls up live): n, median, min and max."""
    periods: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    last: dict[int, int] = {}
    for e in events:
        if e.get("event") == "step_done" and e.get("fwd_s") is not None and "rank" in e and e["t"] >= t_go:
            k = int((e["t"] - t_go) // PERIOD_S)
            periods[k][e["rank"]].append(e["fwd_s"])
            last[k] = max(last.get(k, -1), e["step"])
    out = []
    executed = 0
    for k in sorted(periods):
        ranks = periods[k]
        executed += len(ranks.get(0, []))
        out.append({"elapsed_s": (k + 1) * PERIOD_S, "last_step": last[k], "executed": executed,
                    "ranks": {str(r): period_stats(xs) for r, xs in sorted(ranks.items())}})
    return out


def unexplained_drops(events: list[dict[str, Any]], sc: Scenario, faults: list[Any]) -> list[Failure]:
    """The times a replica group left the quorum and came back (its ranks restarted, or it healed from a peer)
    that no injected fault explains, one Failure per rank of the group. A drop is the newest fault's before it
    (in any group: a fault in one group can stall the others) while that fault's heal lasts (its time to full
    participation, `faults`: the verdict's), or, for a fault that had no heal, until the group commits a later
    step with every group taking part."""
    groups = sc.recovery.external.replica_groups
    per = sc.workload.ranks // groups
    inj = {e["fault_index"]: e for e in events if e.get("event") == "fault_injected"}
    heals = {f.index: (f.details.get("heal") or {}).get("total_s") for f in faults}
    injected = sorted((e["t"], e.get("step", -1), i) for i, e in inj.items())
    full: dict[int, list[tuple[float, int]]] = defaultdict(list)  # group -> (time, step) of its steps with everyone
    signs: list[tuple[float, int, str]] = []
    for e in events:
        kind, rank = e.get("event"), e.get("rank")
        if kind == "step_done" and e.get("committed") and e.get("participants", 0) >= groups and rank is not None:
            full[rank // per].append((e["t"], e["step"]))
        elif kind == "rank_started" and e.get("attempt", 0) > 0:
            signs.append((e["t"], rank // per, "restarted by torchrun"))
        elif kind == "group_restarted":
            signs.append((e["t"], e["group"], "restarted by the scheduler"))
        elif kind == "ft_heal_started" and rank is not None:
            signs.append((e["t"], rank // per, "healed from a peer"))

    def explained(t: float, g: int) -> bool:
        before = [x for x in injected if x[0] <= t]
        if not before:
            return False
        tf, step, index = before[-1]
        if heals.get(index) is not None:
            return t <= tf + heals[index] + 1.0
        return not any(tf < tc < t and sc_ > step for tc, sc_ in full[g])

    out: list[Failure] = []
    seen: dict[int, float] = {}  # group -> the time of its newest unexplained drop (one per drop, not per sign)
    for t, g, how in sorted(signs):
        if explained(t, g):
            continue
        if g in seen and not any(seen[g] < tc < t for tc, _ in full[g]):
            continue  # the same drop, another sign of it
        seen[g] = t
        last = max((e["step"] for e in events if e.get("event") == "step_done" and e.get("committed")
                    and e["t"] < t), default=None)
        for r in range(g * per, (g + 1) * per):
            out.append(Failure(attempt=0, time=t, cause="left the quorum", rank=r, detector="torchft",
                               detail=f"replica group {g} {how} with no fault injected",
                               signature=f"replica group left the quorum ({how})", last_step=last, fault_index=None))
    return out


def _summary(scenario: Scenario, sc: Scenario, result: Any, events: list[dict[str, Any]], t_go: float,
             stop: dict[str, Any] | None, wall: float, duration_s: float, seed: int,
             interrupted: str | None) -> dict[str, Any]:
    groups = sc.recovery.external.replica_groups
    per = sc.workload.ranks // groups
    fired = {e["fault_index"]: e for e in events if e.get("event") == "fault_injected"}
    faults = []
    for f in result.faults:
        if not f.injected:
            continue
        ev = fired.get(f.index, {})
        heal = f.details.get("heal") or {}
        faults.append({"index": f.index, "fault": f.fault, "rank": f.rank, "group": f.rank // per,
                       "at_s": sc.faults[f.index].at_s, "fired_at_s": ev["t"] - t_go if ev else None,
                       "step": ev.get("step"), "point": ev.get("point"), "phase": PHASE.get(ev.get("point")),
                       "timed": False, "outcome": f.outcome, "expected": f.expected, "ok": f.ok,
                       "why": f.details.get("why"), "detected_by": f.detected_by, "lost_steps": f.lost_steps,
                       "recovery_s": heal.get("total_s"), "heal": heal or None})
    steps = stop["steps"] if stop else None
    # goodput: the share of the data-parallel work that reached the model, each group's part of each step
    committed = {(e["rank"] // per, e["step"]) for e in events if e.get("event") == "step_done"
                 and e.get("committed") and "rank" in e and e["rank"] % per == 0 and (steps is None or e["step"] < steps)}
    executed = steps * groups if steps else None
    by_outcome: dict[str, int] = defaultdict(int)
    for f in faults:
        by_outcome[f["outcome"]] += 1
    invariants = [{"name": e.name, "ok": e.ok, "message": e.message} for e in result.expectations
                  if e.name in INVARIANTS or e.name == "harness"]
    fault_free = [p["ranks"]["0"]["median_compute_s"] for p in
                  (e for e in events if e.get("event") == "burn_in_rollup") if "0" in p["ranks"]]
    return {
        "schema_version": 1, "kind": "burn-in", "scenario": scenario.name, "seed": seed, "duration_s": duration_s,
        "wall_s": wall, "interrupted": interrupted, "error": result.error, "comparison": "invariants",
        "system": sc.recovery.external.system, "replica_groups": groups,
        "steps": {"useful": len(committed), "executed": executed, "job_steps": steps,
                  "goodput_steps": len(committed) / executed if executed else None,
                  "useful_per_s": steps / wall if steps and wall else None, "unit": "group-steps"},
        "faults": {"scheduled": len(sc.faults), "fired": len(faults), "by_outcome": dict(by_outcome),
                   "unfired": len(stop["unfired"]) if stop else None,
                   "per_hour": len(faults) / wall * 3600 if wall else None, "list": faults},
        "restarts": result.restarts,
        "recovery": {"ok": all(f["ok"] for f in faults) and all(i["ok"] for i in invariants), "windows": [],
                     "invariants": invariants, "tolerance": result.tolerance},
        "step_time": {"fault_free_median_compute_s": statistics.median(fault_free) if fault_free else None,
                      "measure": "forward time per step"},
        "supervisor_usage": {},
    }
