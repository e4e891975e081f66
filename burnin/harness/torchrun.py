"""A torchrun run's event log, assembled from its ranks' streams, so the usual verdict can judge it.

Under torchrun (`python -m burnin.rank`) no supervisor watches the ranks: each node's ranks write
`ranks/rank<R>.node<G>.jsonl` and torchrun's agents restart the group. This module writes the
`events.jsonl` a supervisor would have written, from what the ranks recorded:

- an attempt is one generation of the group (the ranks number it themselves, burnin/rank/__main__.py);
- an attempt that did not end with every rank finished failed. Its evidence: a rank's error
  (classified as the supervisor classifies it), a rank's self-inflicted kill or hang (its last event),
  ranks that never said more; the faults it explains follow the supervisor's attribution rule;
- detection is when torchrun's agent acted, as far as the ranks can tell: the first SIGTERM a surviving
  rank received (`rank_terminated`), else the last word of the attempt. Teardown ends when the next
  attempt's first process started; restart, load and first step are timed from the ranks' own events,
  as in a supervised run. The recovery breakdown of a torchrun run therefore counts the agent's
  detection and re-rendezvous in `teardown_s`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from burnin.reports.attribution import Candidate, Evidence, explained_by
from burnin.harness.classify import classify_error, signature
from burnin.core.events import read_events

__all__ = ["is_torchrun_run", "assemble"]


def is_torchrun_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "torchrun.json").is_file()


def _rank_events(run_dir: Path) -> list[dict[str, Any]]:
    events = []
    for path in sorted((run_dir / "ranks").glob("rank*.node*.jsonl")):
        events += read_events(path)
    return sorted(events, key=lambda e: e["t"])


def assemble(run_dir: str | Path, scenario: Any) -> list[dict[str, Any]]:
    """Write `events.jsonl` of a torchrun run from its ranks' streams; returns the events."""
    run_dir = Path(run_dir)
    ranks_ev = _rank_events(run_dir)
    meta = json.loads((run_dir / "torchrun.json").read_text())
    faults = [f.build() for f in scenario.faults]
    n = scenario.workload.ranks
    by_attempt: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ev in ranks_ev:
        if isinstance(ev.get("attempt"), int):
            by_attempt[ev["attempt"]].append(ev)
    out: list[dict[str, Any]] = []

    def emit(t: float, event: str, **fields: Any) -> None:
        out.append({"t": t, "event": event, "source": "torchrun", **fields})

    t0 = min([meta.get("started") or float("inf")] + [e["t"] for e in ranks_ev]) if ranks_ev else meta.get("started", 0)
    emit(t0, "run_started", scenario=scenario.name, run_id=run_dir.name, golden=False, ranks=n,
         steps=scenario.workload.steps, launcher="torchrun", scenario_json=scenario.model_dump(mode="json"))
    attempts = sorted(by_attempt)
    finished = False
    explained: set[int] = set()
    restarts = 0
    for k, attempt in enumerate(attempts):
        evs = by_attempt[attempt]
        emit(min(e["t"] for e in evs) - 1e-6, "attempt_started", attempt=attempt)
        out.extend(evs)
        done = {e["rank"] for e in evs if e["event"] == "rank_finished"}
        if len(done) == n:
            finished = True
            break
        nxt = by_attempt[attempts[k + 1]] if k + 1 < len(attempts) else None
        _failure(emit, attempt, evs, faults, scenario, explained)
        if nxt is None:
            break
        restarts += 1
        start_next = min(e["t"] for e in nxt if e["event"] == "rank_started") if any(
            e["event"] == "rank_started" for e in nxt) else min(e["t"] for e in nxt)
        emit(start_next - 2e-6, "teardown_done", attempt=attempt)
        emit(start_next - 1.5e-6, "restart", attempt=attempts[k + 1])
    end = max((e["t"] for e in out), default=t0)
    emit(end, "run_finished", finished=finished, restarts=restarts)
    out.sort(key=lambda e: e["t"])
    with open(run_dir / "events.jsonl", "w", encoding="utf-8") as fh:
        for ev in out:
            fh.write(json.dumps(ev) + "\n")
    return out


def _failure(emit: Any, attempt: int, evs: list[dict[str, Any]], faults: list[Any], scenario: Any,
             explained: set[int]) -> None:
    """The failure_detected event of a failed attempt, with the faults its evidence explains."""
    evidence: list[Evidence] = []
    last: dict[int, dict[str, Any]] = {}
    steps: dict[int, int] = {}
    for e in evs:
        if e["event"] not in ("rank_terminated",):
            last[e["rank"]] = e
        if e["event"] == "step_done":
            steps[e["rank"]] = e["step"]
    for e in evs:
        if e["event"] == "rank_error":
            cause = classify_error(e.get("error_type", ""), e.get("message", ""))
            evidence.append(Evidence("exit", e["rank"], cause, f"{e.get('error_type')}: {e.get('message', '')}", e["t"]))
    for rank, e in last.items():
        if e["event"] == "fault_injected" and e.get("fault") == "process.kill":
            evidence.append(Evidence("exit_signal", rank, "killed", "SIGKILL (self-inflicted)", e["t"]))
        elif e["event"] == "fault_injected" and e.get("fault") == "process.hang":
            evidence.append(Evidence("torchrun", rank, "hang", "SIGSTOP (self-inflicted); the agent ended it", e["t"]))
    terminated = [e["t"] for e in evs if e["event"] == "rank_terminated"]
    if not evidence:
        evidence.append(Evidence("torchrun", None, "exited", "the attempt ended without every rank finishing "
                                 "(no rank said why)", max(e["t"] for e in evs)))
    evidence.sort(key=lambda x: x.time)
    root = evidence[0]
    detected = min(terminated) if terminated else max(e["t"] for e in evs)
    detected = max(detected, root.time)
    t = scenario.timeouts
    cands = [Candidate(e["fault_index"], scenario.faults[e["fault_index"]].step, scenario.faults[e["fault_index"]].rank,
                       faults[e["fault_index"]].effects, faults[e["fault_index"]].effect_scope, e["t"],
                       faults[e["fault_index"]].effect_window_s(t))
             for e in evs if e["event"] == "fault_injected" and e["fault_index"] not in explained]
    primary, indices = explained_by(evidence, cands, set())
    explained.update(indices)
    emit(detected, "failure_detected", attempt=attempt, detected_at=detected, cause=root.cause, rank=root.rank,
         detector=root.detector, detail=root.detail[:500], signature=signature(root.cause, root.detail),
         fault_index=primary, fault_indices=indices,
         evidence=[{"detector": x.detector, "rank": x.rank, "cause": x.cause, "detail": x.detail[:200]}
                   for x in evidence[:16]],
         last_step=min(steps.values(), default=None), max_step=max(steps.values(), default=None))
