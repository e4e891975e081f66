"""The verdict: from a run's event log and its golden record to one outcome per fault.

Everything is derived from `events.jsonl` (plus the golden record), so a run's reports can be
rebuilt at any time, also after its supervisor died. A fault counts as recovered only when the
run finished and its final state hash equals the golden run's, bit for bit; a loop that is not
deterministic can be judged in tolerance mode instead (`workload.compare: tolerance`), and is then
never called exact.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from burnin.reports.attribution import pin_detection
from burnin.reports.external import judge_external
from burnin.reports.tolerance import bits_float, rdiff, windowed
from burnin.reports.result import Expectation, Failure, FaultResult, RecoveryBreakdown, RunResult
from burnin.scenarios.burn_in import burn_in_run

__all__ = ["judge"]


def _outcome(injected: bool, detected: bool, finished: bool, exact: bool) -> str:
    if not finished or not injected:
        return "failed"
    if detected:
        return "recovered" if exact else "detected"
    return "masked" if exact else "sdc"


def judge(events: list[dict[str, Any]], scenario: Any, golden: Any, *, run_id: str, run_dir: str,
          config_hash: str, error: str | None = None) -> RunResult:
    if scenario.recovery.mode == "external":  # the system under test recovered itself: its invariants
        return judge_external(events, scenario, golden, run_id=run_id, run_dir=run_dir, config_hash=config_hash,
                              error=error)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        by_kind[ev.get("event", "")].append(ev)
    started = by_kind["run_started"][0]["t"] if by_kind["run_started"] else (events[0]["t"] if events else 0.0)
    end = by_kind["run_finished"][-1] if by_kind["run_finished"] else None
    finished = bool(end and end.get("finished"))
    restarts = len(by_kind["restart"])

    # The last execution of each step counts: a restart replays steps after the checkpoint.
    losses: dict[int, dict[int, str]] = defaultdict(dict)
    final_loss = None
    for ev in by_kind["step_done"]:
        losses[ev["rank"]][ev["step"]] = ev["loss_bits"]
        if ev["rank"] == 0:
            final_loss = ev["loss"]
    steps_executed = sum(1 for ev in by_kind["step_done"] if ev["rank"] == 0)
    done_by_all = [max(steps) for steps in losses.values()] if losses else []
    final_step = min(done_by_all) if len(done_by_all) == scenario.workload.ranks else None

    finals = {ev["rank"]: ev["state_hash"] for ev in by_kind["rank_finished"]
              if ev.get("attempt") == _last_attempt(by_kind)}
    final_hash = finals.get(0)
    replicas_agree = len(set(finals.values())) <= 1 and len(finals) == scenario.workload.ranks
    golden_hash = golden.state_hash if golden else None
    exact = bool(finished and replicas_agree and final_hash is not None and final_hash == golden_hash)

    finals_ev = {ev["rank"]: ev for ev in by_kind["rank_finished"] if ev.get("attempt") == _last_attempt(by_kind)}
    tolerance = None
    if scenario.workload.compare == "tolerance":
        tolerance = _tolerance(scenario.workload.tolerance, losses, finals_ev.get(0), golden, finished)
        # why, when it is not the scenario's own choice: a run started from another workload's checkpoint
        because = next((ev.get("tolerance_because") for ev in by_kind["resume_from"]), None)
        if because:
            tolerance["because"] = because
    matched = exact or bool(tolerance and tolerance["within"])

    diverged = None
    if golden:
        for rank, steps in sorted(losses.items()):
            ref = golden.loss_bits.get(str(rank), {})
            for step in sorted(steps):
                if ref.get(str(step)) not in (None, steps[step]):
                    diverged = step if diverged is None else min(diverged, step)
                    break

    floor = next((ev.get("loss_floor") for ev in by_kind["resumed"] if ev.get("rank") == 0), None)
    # An event log written before a failure could explain several faults names only `fault_index`.
    failures = [Failure(attempt=ev["attempt"], time=ev["detected_at"], cause=ev["cause"], rank=ev.get("rank"),
                        detector=ev["detector"], detail=ev["detail"], signature=ev["signature"],
                        last_step=ev.get("last_step"), fault_index=ev.get("fault_index"),
                        fault_indices=list(ev.get("fault_indices") or []))
                for ev in by_kind["failure_detected"]]
    # A fault that could not be applied is a harness error: it has no outcome but `failed`.
    fault_errors = [f"fault[{ev['fault_index']}] {ev['fault']} could not be applied: {ev['error']}"
                    for ev in by_kind["fault_error"]]
    if fault_errors:
        error = "; ".join(([error] if error else []) + fault_errors)

    detections, false_alarms = _attribute_detections(by_kind, scenario)
    faults = [_fault_result(i, spec, by_kind, failures, finished, matched, detections.get(i, []))
              for i, spec in enumerate(scenario.faults)]
    if golden is not None and tolerance is None and finished and not exact:
        _by_divergence(faults, scenario, by_kind, diverged)
    for ev in by_kind["fault_error"]:
        f = faults[ev["fault_index"]]
        f.outcome, f.details["error"] = "failed", ev["error"]
    simulated = any(f.simulated for f in faults)

    result = RunResult(
        scenario=scenario.name, run_id=run_id, run_dir=run_dir, config_hash=config_hash,
        ranks=scenario.workload.ranks, steps=scenario.workload.steps, device=scenario.workload.device,
        started_at=started, finished_at=end["t"] if end else (events[-1]["t"] if events else started),
        finished=finished, final_step=final_step, final_state_hash=final_hash, golden_state_hash=golden_hash,
        exact=exact, diverged_at_step=diverged, restarts=restarts, steps_executed=steps_executed,
        final_loss=final_loss, loss_floor=floor, failures=failures, faults=faults, simulated=simulated,
        rollbacks=len(by_kind["rollback"]), false_alarms=len(false_alarms),
        error=error, comparison=scenario.workload.compare, tolerance=tolerance,
    )
    result.expectations = _expectations(result, scenario, replicas_agree, finals)
    return result


def _tolerance(tol: Any, losses: dict[int, dict[int, str]], final: dict[str, Any] | None, golden: Any,
               finished: bool) -> dict[str, Any]:
    """Tolerance mode: the largest relative difference of any step's loss (every rank) and of any final
    tensor's L2 norm (rank 0) from the golden run's; within when both are inside the scenario's bounds."""
    out: dict[str, Any] = {"loss_rtol": tol.loss_rtol, "state_rtol": tol.state_rtol, "loss_max_rdiff": None,
                           "loss_worst_step": None, "state_max_rdiff": None, "state_worst_tensor": None,
                           "within": False, "why": None}
    if golden is None:
        out["why"] = "no golden run"
        return out
    if tol.window == 1 and sorted(map(str, losses)) == sorted(golden.loss_bits):
        diffs = [(rdiff(bits_float(bits), bits_float(golden.loss_bits[str(rank)][str(step)])), step)
                 for rank, steps in losses.items() for step, bits in steps.items()
                 if str(step) in golden.loss_bits.get(str(rank), {})]
    else:  # another world size (a resume onto another mesh): each step's loss over all ranks, the global batch's
        mine_mean, ref_mean = _step_means(losses), _step_means(
            {int(r): {int(s): b for s, b in steps.items()} for r, steps in golden.loss_bits.items()})
        mine_mean, ref_mean = windowed(mine_mean, tol.window), windowed(ref_mean, tol.window)
        diffs = [(rdiff(loss, ref_mean[step]), step) for step, loss in mine_mean.items() if step in ref_mean]
    out["loss_max_rdiff"], out["loss_worst_step"] = max(diffs, default=(0.0, None))
    mine, theirs = (final or {}).get("state_norms"), golden.state_norms
    if not mine or not theirs:
        out["why"] = "no final state to compare" if finished else "the run did not finish"
        return out
    missing = sorted(set(theirs) ^ set(mine))
    if missing:
        out["why"] = f"the final states hold different tensors ({missing[0]}, ...)"
        return out
    name = max(theirs, key=lambda n: rdiff(mine[n], theirs[n]))
    out["state_max_rdiff"], out["state_worst_tensor"] = rdiff(mine[name], theirs[name]), name
    out["within"] = bool(finished and out["loss_max_rdiff"] <= tol.loss_rtol and out["state_max_rdiff"] <= tol.state_rtol)
    if not out["within"]:
        out["why"] = ("the run did not finish" if not finished else
                      f"loss differs by {out['loss_max_rdiff']:.3g} at step {out['loss_worst_step']}"
                      if out["loss_max_rdiff"] > tol.loss_rtol else
                      f"{name} differs by {out['state_max_rdiff']:.3g}")
    return out


def _step_means(losses: dict[int, dict[int, str]]) -> dict[int, float]:
    """Each step's mean loss over the ranks (the steps every rank ran)."""
    steps = set.intersection(*(set(s) for s in losses.values())) if losses else set()
    return {step: sum(bits_float(s[step]) for s in losses.values()) / len(losses) for step in sorted(steps)}


def tolerance_text(t: dict[str, Any]) -> str:
    """One line for every report: tolerance mode is never called exact (and says why it is used, when the
    scenario did not ask for it)."""
    mode = f"tolerance mode, {t['because']}" if t.get("because") else "tolerance mode"
    if t.get("loss_max_rdiff") is None or t.get("state_max_rdiff") is None:
        return f"not exact ({mode}): cannot compare, {t.get('why')}"
    verdict = "within tolerance" if t["within"] else f"OUTSIDE tolerance ({t['why']})"
    return (f"not exact ({mode}): {verdict}: loss max rel. diff {t['loss_max_rdiff']:.2e} "
            f"(bound {t['loss_rtol']:g}), final tensors max rel. diff {t['state_max_rdiff']:.2e} "
            f"(bound {t['state_rtol']:g}, {t['state_worst_tensor']})")


def _last_attempt(by_kind: dict[str, list[dict[str, Any]]]) -> int:
    starts = by_kind["attempt_started"]
    return starts[-1]["attempt"] if starts else 0


def _attribute_detections(by_kind: dict[str, list[dict[str, Any]]],
                          scenario: Any) -> tuple[dict[int, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Pin each detector finding on the newest fault injected before it (preferring a fault aimed at a
    rank the detector named); a finding with no fault before it is a false alarm."""
    injected = sorted(((ev["t"], ev["fault_index"]) for ev in by_kind["fault_injected"]), key=lambda x: x[0])
    first_injection: dict[int, float] = {}
    for t, i in injected:
        first_injection.setdefault(i, t)
    ranks = [f.rank for f in scenario.faults]
    scoped = [f.build().effect_scope == "detector" for f in scenario.faults]
    per_fault: dict[int, list[dict[str, Any]]] = defaultdict(list)
    false_alarms = []
    for det in by_kind["detection"]:
        pinned = pin_detection(det, first_injection, ranks, scoped)
        if pinned is None:
            false_alarms.append(det)
        else:
            per_fault[pinned].append(det)
    return per_fault, false_alarms


def _rejected(res: FaultResult, detector: str, reject: dict[str, Any], damaged_step: int,
              by_kind: dict[str, list[dict[str, Any]]]) -> None:
    """A damaged checkpoint or snapshot that a resume rejected by its checksum: detected then, and the
    steps the fallback cost beyond it (from the resume that followed)."""
    res.detected_by, res.cause = detector, reject["reason"]
    res.detection_latency_s = reject["t"] - res.injected_at
    resumed = next((ev for ev in by_kind["resumed"] if ev.get("rank") == 0 and ev["t"] >= reject["t"]), None)
    if resumed is not None:
        res.lost_steps = max(0, damaged_step - (resumed.get("from_step") or 0))


def _fault_result(i: int, spec: Any, by_kind: dict[str, list[dict[str, Any]]], failures: list[Failure],
                  finished: bool, exact: bool, detections: list[dict[str, Any]]) -> FaultResult:
    injected_ev = next((ev for ev in by_kind["fault_injected"] if ev["fault_index"] == i), None)
    applied = next((ev for ev in by_kind["fault_applied"] if ev["fault_index"] == i), None)
    details = dict((applied or {}).get("details") or (injected_ev or {}).get("details") or {})
    res = FaultResult(index=i, fault=spec.fault, rank=spec.rank, step=spec.step, point=spec.at,
                      expected=spec.expected, outcome="failed", injected=injected_ev is not None,
                      injected_at=injected_ev["t"] if injected_ev else None,
                      simulated=bool(injected_ev and injected_ev.get("simulated")), details=details)
    again = [ev for ev in by_kind["fault_repeated"] if ev.get("fault_index") == i]
    if again:  # it acted again across its span: how often, and (a stuck bit) how many elements it changed in all
        res.details["firings"] = 1 + len(again)
        if "changed" in details:
            res.details["changed_total"] = details["changed"] + sum((ev.get("details") or {}).get("changed", 0)
                                                                    for ev in again)
    mine = [f for f in failures if i in f.fault_indices]
    failure = mine[0] if mine else None
    if failure is not None and res.injected_at is not None:
        res.detected_by, res.cause = failure.detector, failure.cause
        res.detection_latency_s = failure.time - res.injected_at
        res.recovery, res.lost_steps = _recovery(failure, res.injected_at, by_kind)
    if len(mine) > 1:
        # A recurring fault (a latent bug) fails the group again and again: each crash has its own
        # recovery, timed from its detection (when the bug was armed says nothing about a crash).
        per = [_recovery(f, f.time, by_kind) for f in mine]
        res.details["failures"] = len(mine)
        res.details["recoveries"] = [{"attempt": f.attempt, "lost_steps": lost,
                                      **(rec.to_dict() if rec else {"recovered": False})}
                                     for f, (rec, lost) in zip(mine, per)]
        res.lost_steps = sum(lost or 0 for _, lost in per)
    # Detectors inside the ranks (fingerprint, non-finite, spikes, recomputation).
    if detections and res.injected_at is not None:
        first = min(detections, key=lambda d: d["t"])
        if res.detected_by is None or first["t"] - res.injected_at < (res.detection_latency_s or float("inf")):
            res.detected_by, res.cause = first["detector"], "corruption"
            res.detection_latency_s = first["t"] - res.injected_at
            res.details["detection_latency_steps"] = first["step"] - spec.step
        res.details["detectors"] = sorted({d["detector"] for d in detections})
    # A detector that saw the fault without the group failing (a fingerprint mismatch, a stall).
    seen = next((ev for ev in by_kind["fault_detected"] if ev.get("fault_index") == i), None)
    if seen is not None and res.detected_by is None and res.injected_at is not None:
        res.detected_by, res.cause = seen["detector"], seen.get("cause") or seen["detector"]
        res.detection_latency_s = seen["t"] - res.injected_at
        if seen.get("latency_steps") is not None:
            res.details["detection_latency_steps"] = seen["latency_steps"]
    # A damaged checkpoint is detected when a resume rejects it by checksum.
    damaged = details.get("checkpoint_step")
    if damaged is not None and res.injected_at is not None:
        reject = next((ev for ev in by_kind["checkpoint_rejected"]
                       if ev["checkpoint_step"] == damaged and ev["t"] >= res.injected_at), None)
        if reject is not None:
            _rejected(res, "checkpoint_checksum", reject, damaged, by_kind)
    # A damaged memory snapshot likewise, when the owning rank rejects one of the damaged slots (by its
    # file: a header too damaged to name its step still names the slot).
    snap = details.get("snapshot_step")
    if snap is not None and res.injected_at is not None:
        files = set(details.get("files") or [])
        reject = next((ev for ev in by_kind["snapshot_rejected"]
                       if ev.get("rank") == spec.rank and ev.get("file") in files
                       and ev.get("snapshot_step") in (*(details.get("snapshot_steps") or [snap]), None)
                       and ev["t"] >= res.injected_at), None)
        if reject is not None:
            _rejected(res, "snapshot_checksum", reject, snap, by_kind)
    res.outcome = _outcome(res.injected, res.detected_by is not None, finished, exact)
    return res


def _by_divergence(faults: list[FaultResult], scenario: Any, by_kind: dict[str, list[dict[str, Any]]],
                   diverged: int | None) -> None:
    """Which fault a run's divergence from the golden run belongs to, from the evidence (the run finished,
    its final state differs). The first step whose loss bits differ names the faults that can have caused it:
    those at or before it. What else the evidence says, fault by fault:

    - damage that nothing read (a checkpoint or snapshot never loaded), or that a later resume or rollback to
      a step before it threw away (a fault that acts once), or a fault that cannot change the bits: `masked`;
    - an undetected fault at or before the first divergent step: `sdc` (guilty; one of these caused it);
    - a fault injected after the divergence: `unjudged`, no outcome of its own (nothing to compare it with);
    - a detected fault whose recovery matched the golden run step for step until a later fault's divergence:
      `recovered`; one that restored a state already carrying an earlier fault's damage: `unjudged`.

    Without a divergent step (every loss the golden run's: the difference came after the last loss), every
    step counts as before it."""
    first = diverged if diverged is not None else float("inf")
    # every later start from an earlier state: a restart's resume and an in-rank rollback, (time, step run next)
    restarts = sorted([(ev["t"], ev["from_step"]) for ev in by_kind["resumed"]
                       if ev.get("rank") == 0 and ev.get("from_step") is not None]
                      + [(ev["t"], ev["to_step"]) for ev in by_kind["rollback"] if ev.get("rank", 0) == 0])
    where = f"step {diverged}" if diverged is not None else "the final state (every step's loss agreed)"

    def step_of(f: FaultResult) -> int:
        ev = next((e for e in by_kind["fault_injected"] if e["fault_index"] == f.index), None)
        return int(ev["step"]) if ev and ev.get("step") is not None else f.step

    guilty: list[FaultResult] = []
    for f, spec in zip(faults, scenario.faults):
        if f.outcome != "sdc" or f.injected_at is None:
            continue
        s = step_of(f)
        acts_from = s + 1 if f.point == "between_steps" else s
        stored, unread = _damage_unread(f, by_kind)
        fault = spec.build()
        # (a fault with a span acts again on the steps a resume runs again: a resume does not undo it)
        wiped = None if stored or fault.span() > 1 else next(((t, step) for t, step in restarts
                                                              if t > f.injected_at and step <= acts_from), None)
        if not fault.changes_state:
            f.outcome, f.details["why"] = "masked", "it cannot change the training's bits without stopping the group"
        elif unread:
            f.outcome, f.details["why"] = "masked", unread
        elif wiped is not None:
            f.outcome = "masked"
            f.details["why"] = f"a later resume ran step {wiped[1]} again from a state before it: its damage was thrown away"
        elif s > first:
            f.outcome = "unjudged"
            f.details["why"] = f"injected at step {s}, after the run had diverged from the golden run at {where}"
        else:
            guilty.append(f)
            f.details["diverged_at_step"] = diverged
    for f in guilty:
        others = [g.index for g in guilty if g is not f]
        f.details["why"] = (f"nothing detected it and the run diverged from the golden run at {where}"
                            + (f"; so may fault(s) {', '.join(map(str, others))}" if others else ""))
    for f in faults:
        if f.outcome != "detected" or f.injected_at is None:
            continue
        s = step_of(f)
        seen_at = f.injected_at + (f.detection_latency_s or 0.0)
        back = next(((t, step) for t, step in restarts if t >= seen_at), None)  # its recovery: the next start
        before = [g.index for g in guilty if g.injected_at < f.injected_at]
        after = [g.index for g in guilty if back is not None and g.injected_at > back[0]]
        if s > first:
            f.outcome = "unjudged"
            f.details["why"] = f"injected at step {s}, after the run had diverged from the golden run at {where}"
        elif before:
            f.outcome = "unjudged"
            f.details["why"] = (f"its recovery restored a state that already carried the damage of fault(s) "
                                f"{', '.join(map(str, before))}")
        elif after and back is not None and back[1] <= first:
            f.outcome = "recovered"
            f.details["why"] = (f"its recovery (from step {back[1]}) matched the golden run step for step until "
                                f"the divergence at {where}, after fault(s) {', '.join(map(str, after))}")


def _damage_unread(f: FaultResult, by_kind: dict[str, list[dict[str, Any]]]) -> tuple[bool, str | None]:
    """(whether the fault damaged stored state, why nothing read it after the damage: None when something did).
    A checkpoint or memory snapshot counts as read when a resume loaded that step from that tier; a load that
    rejected it made the fault `detected` already."""
    d = f.details
    if d.get("checkpoint_step") is not None:
        step = d["checkpoint_step"]
        read = any(ev.get("tier") == "disk" and ev.get("from_step") == step and ev["t"] > f.injected_at
                   for ev in by_kind["resumed"])
        return True, None if read else f"nothing loaded the damaged checkpoint of step {step}"
    if d.get("snapshot_step") is not None:
        steps = set(d.get("snapshot_steps") or [d["snapshot_step"]])
        read = any(ev.get("tier") == "memory" and ev.get("rank") == f.rank and ev.get("from_step") in steps
                   and ev["t"] > f.injected_at for ev in by_kind["resumed"])
        return True, None if read else f"nothing loaded the damaged snapshot(s) of step {', '.join(map(str, sorted(steps)))}"
    return False, None


def _recovery(failure: Failure, injected_at: float,
              by_kind: dict[str, list[dict[str, Any]]]) -> tuple[RecoveryBreakdown | None, int | None]:
    nxt = failure.attempt + 1
    teardown = next((ev for ev in by_kind["teardown_done"] if ev["attempt"] == failure.attempt), None)
    pg = [ev["t"] for ev in by_kind["pg_ready"] if ev.get("attempt") == nxt]
    resumed = [ev for ev in by_kind["resumed"] if ev.get("attempt") == nxt]
    first: dict[int, float] = {}
    for ev in by_kind["step_done"]:
        if ev.get("attempt") == nxt and ev["rank"] not in first:
            first[ev["rank"]] = ev["t"]
    failed_event = next(ev for ev in by_kind["failure_detected"] if ev["attempt"] == failure.attempt)
    if teardown is None or not pg or not resumed or not first:
        return None, None  # never restarted, or the restart itself failed before a step
    from_step = resumed[0].get("from_step") or 0
    max_step = failed_event.get("max_step")
    lost = max(0, (max_step + 1 if max_step is not None else from_step) - from_step)
    t_pg, t_loaded, t_first = max(pg), max(ev["t"] for ev in resumed), max(first.values())
    return RecoveryBreakdown(new_ranks=_new_ranks(by_kind, nxt),
        detection_s=failure.time - injected_at,
        teardown_s=teardown["t"] - failure.time,
        restart_s=t_pg - teardown["t"],
        checkpoint_load_s=t_loaded - t_pg,
        first_step_s=t_first - t_loaded,
        resumed_from_step=from_step,
    ), lost


def _new_ranks(by_kind: dict[str, list[dict[str, Any]]], attempt: int) -> str:
    """Where the ranks of `attempt` came from, in words: warm spares, or why (some of) them started cold
    or waited for a spare still warming up."""
    used = [ev for ev in by_kind["spare_used"] if ev.get("attempt") == attempt]
    missing = [ev for ev in by_kind["spare_missing"] if ev.get("attempt") == attempt]
    if not used and not missing:
        if any(ev.get("launcher") == "torchrun" for ev in by_kind["run_started"]):
            return "restarted by torchrun"
        return "cold start (no spare pool)"
    late = [ev for ev in used if not ev.get("ready")]
    if not late and not missing:
        return "warm spares"
    parts = [f"rank {ev['rank']}: {ev.get('why', 'spare not ready')}" for ev in late]
    parts += [f"rank {ev['rank']}: started cold, {ev.get('why', 'no spare')}" for ev in missing]
    return "; ".join(parts)


def _expectations(r: RunResult, scenario: Any, replicas_agree: bool, finals: dict[int, str]) -> list[Expectation]:
    ex: list[Expectation] = []
    for f in r.faults:
        where = f"{f.fault}@rank{f.rank}:step{f.step}"
        msg = f"outcome {f.outcome}, expected {' or '.join(f.expected)}"
        if f.detected_by:
            msg += f"; detected by {f.detected_by} ({f.cause})"
        if not f.injected:
            msg += "; the fault never fired"
        if f.outcome == "unjudged":
            ex.append(Expectation(f"fault[{f.index}] {where}", True, str(f.details.get("why")), skipped=True))
            continue
        if f.details.get("why"):
            msg += f"; {f.details['why']}"
        ex.append(Expectation(f"fault[{f.index}] {where}", f.outcome in f.expected, msg))
    e = scenario.expect
    if e.finish:
        ex.append(Expectation("run finishes", r.finished,
                              f"completed step {r.final_step} of {r.steps - 1}" if not r.finished else "finished"))
    if e.exact and r.tolerance is not None:
        ex.append(Expectation("final state within tolerance (not exact)", r.tolerance["within"],
                              tolerance_text(r.tolerance)))
    elif e.exact:
        if r.exact:
            msg = f"final state {r.final_state_hash[:16]} equals the golden run's"
        elif not replicas_agree:
            msg = f"replicas disagree at the end: { {k: v[:12] for k, v in finals.items()} }"
        else:
            msg = (f"final state {(r.final_state_hash or 'none')[:16]} != golden {(r.golden_state_hash or 'none')[:16]}"
                   + (f"; loss bits first differ at step {r.diverged_at_step}" if r.diverged_at_step is not None else ""))
        ex.append(Expectation("final state equals golden", r.exact, msg))
    if e.max_restarts is not None:
        ex.append(Expectation(f"at most {e.max_restarts} restarts", r.restarts <= e.max_restarts,
                              f"{r.restarts} restarts"))
    # A harness error (a fault that could not be applied) is reported under "harness", not here.
    unexplained = [f for f in r.failures if not f.fault_indices and f.cause != "harness"]
    ex.append(Expectation("no unexplained failures", not unexplained,
                          "; ".join(f"attempt {f.attempt}: {f.signature}" for f in unexplained) or "none"))
    if r.error:
        ex.append(Expectation("harness", False, r.error))
    return ex


def judge_burn_in(run_dir: str | Path, events: list[dict[str, Any]]) -> RunResult:
    """A finished burn-in's run judged again from its event log, as the burn-in judged it (its drawn
    faults as a plain scenario, no golden record: the burn-in's windows were verified by replays)."""
    return judge(events, burn_in_run(run_dir), None, run_id=Path(run_dir).name, run_dir=str(run_dir),
                 config_hash="burn-in")


def exactness(result: RunResult) -> str:
    """The run's final state against the golden run's, in one line (Markdown)."""
    if result.tolerance is not None and not result.exact:
        return tolerance_text(result.tolerance)
    if result.golden_state_hash is None:
        return "no golden run to compare with"
    if result.final_state_hash is None:
        return f"no final state (golden {_hash(result.golden_state_hash)})"
    if result.exact:
        return f"exact: final {_hash(result.final_state_hash)} == golden {_hash(result.golden_state_hash)}"
    where = f", loss diverged at step {result.diverged_at_step}" if result.diverged_at_step is not None else ""
    return f"**differs**: final {_hash(result.final_state_hash)} != golden {_hash(result.golden_state_hash)}{where}"


def _hash(h: str | None) -> str:
    return "-" if h is None else f"`{h[:16]}`"
