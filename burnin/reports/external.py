"""The verdict of a run whose recovery was the system under test's own (`recovery.mode: external`).

When a replica group of torchft drops out, the others go on with fewer participants: the batch changes,
so bit-exactness with the golden run is not the test. These invariants are (docs/external.md):

1. **The groups agree** (a cross-group fingerprint): every rank that committed step S holds the same
   model and optimizer state after it, bit for bit, whichever group it is in, heals included; and at
   the end every rank holds the same state.
2. **No update outside the quorum**: a rank applies an optimizer update only in a step torchft
   committed, and only in a quorum its group is a member of.
3. **The loss stays in tolerance**: each step's mean loss over the ranks that committed it, within
   `workload.tolerance.loss_rtol` of the golden (fault-free, same groups) run's.
4. **The final state is in tolerance**: every tensor's L2 norm within `state_rtol` of the golden run's.
5. **Every group finished** and **nothing was left running** (lighthouse, agents, ranks).

Each fault is `recovered` (the job finished, its group came back to full participation healed from a
peer, every invariant held, in tolerance), `degraded` (all that, but out of tolerance), `masked` (an
in-rank corruption nothing noticed, in tolerance), or `failed` (the job did not finish, an invariant
broke after it, or its group never came back). Its time to heal is split in phases: detection (the
fault to the survivors' first quorum without the group), return (to the group asking to heal: a
restart, or the end of a cut), state transfer (the heal's fetch and load), rejoin (to the group's
first step committed with every group participating); the steps lost are the ones the group skipped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from burnin.reports.tolerance import bits_float, rdiff, windowed
from burnin.reports.result import Expectation, FaultResult, RecoveryBreakdown, RunResult

__all__ = ["judge_external", "INVARIANTS"]

INVARIANTS = ("replica groups agree", "no update outside the quorum", "loss within tolerance",
              "final state within tolerance", "every group finishes", "nothing left running")


def _group_of(replica_id: str) -> int | None:
    head = replica_id.split(":", 1)[0]
    digits = head[len(head.rstrip("0123456789")):]
    return int(digits) if digits else None


def judge_external(events: list[dict[str, Any]], scenario: Any, golden: Any, *, run_id: str, run_dir: str,
                   config_hash: str, error: str | None = None) -> RunResult:
    ext = scenario.recovery.external
    groups = ext.replica_groups
    per = scenario.workload.ranks // groups
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        by[ev.get("event", "")].append(ev)
    # a burn-in's groups stop where the launcher told them once its time was up; the arrivals still waiting
    # then never fire, which is no error
    stop = by["burn_in_stop"][-1] if by["burn_in_stop"] else None
    steps = stop["steps"] if stop else scenario.workload.steps
    unfired = set(stop["unfired"]) if stop else set()
    started = by["run_started"][0]["t"] if by["run_started"] else (events[0]["t"] if events else 0.0)
    end = next((ev for ev in reversed(by["run_finished"]) if ev.get("source") == "launcher"), None)
    if end and end.get("error") and not error:
        error = end["error"]
    left = (end or {}).get("left_running") or []

    done = [ev for ev in by["step_done"] if "rank" in ev]
    committed = [ev for ev in done if ev.get("committed")]
    # 1. the groups agree: every rank that committed step S holds the same state after it
    # step -> state hash -> the commits that left it: (rank, quorum id); a step committed twice (a group
    # that started over from scratch in a quorum of its own) counts both times
    # (a sharded group's rank holds one shard, `shard` in its events: compared with the same shard in the other
    # groups; an unsharded rank holds the whole state, compared with every rank)
    at_step: dict[tuple[int, Any], dict[str, list[tuple[int, Any]]]] = defaultdict(lambda: defaultdict(list))
    for ev in committed:
        at_step[(ev["step"], ev.get("shard"))][ev["state_hash"]].append((ev["rank"], ev.get("quorum_id")))
    disagree = next((((s, shard), h) for (s, shard), h in sorted(at_step.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))
                     if len(h) > 1), None)
    finals = {}
    for ev in by["rank_finished"]:
        finals[ev["rank"]] = ev  # the last attempt's
    final_hashes = {r: ev["state_hash"] for r, ev in finals.items()}
    final_by_shard: dict[Any, set[str]] = defaultdict(set)
    for ev in finals.values():
        final_by_shard[ev.get("shard")].add(ev["state_hash"])
    agree_msg = "every rank that committed a step holds the same state after it; the final states agree"
    agree_ok = disagree is None and all(len(h) <= 1 for h in final_by_shard.values())
    broke: list[tuple[float, set[int], str]] = []  # (time, groups, invariant): what an invariant's breach points at
    if disagree is not None:
        (s, shard), by_hash = disagree
        parts = "; ".join(f"ranks {sorted({r for r, _ in c})} (quorum {', '.join(map(str, sorted({str(q) for _, q in c})))}) "
                          f"hold {h[:12]}" for h, c in by_hash.items())
        agree_msg = (f"step {s} was committed with different states{'' if shard is None else f' of shard {shard}'}: "
                     f"{parts}")
        # every group that committed the step is in the breach; it happened when the second state appeared
        t = sorted(min(ev["t"] for ev in committed if ev["step"] == s and ev["state_hash"] == h) for h in by_hash)[1]
        broke.append((t, {r // per for c in by_hash.values() for r, _ in c}, "replica groups agree"))
    elif not agree_ok:
        agree_msg = f"the final states differ: { {r: h[:12] for r, h in sorted(final_hashes.items())} }"
        odd_rank = min(final_hashes, key=lambda r: list(final_hashes.values()).count(final_hashes[r]))
        broke.append((finals[odd_rank]["t"], {r // per for r in final_hashes}, "replica groups agree"))

    # 2. no update outside the quorum
    quorums: dict[int, dict[int, set[int]]] = defaultdict(dict)  # rank -> quorum id -> member groups
    for ev in by["ft_quorum"]:
        quorums[ev["rank"]][ev["quorum_id"]] = {g for g in map(_group_of, ev.get("replica_ids", [])) if g is not None}
    outside = []
    for ev in done:
        g = ev["rank"] // per
        if ev.get("applied") and not ev.get("committed"):
            outside.append((ev, f"rank {ev['rank']} (group {g}) applied an update in step {ev['ran']} that torchft "
                                f"did not commit (quorum {ev.get('quorum_id')})"))
        elif ev.get("committed") and g not in quorums[ev["rank"]].get(ev.get("quorum_id"), {g}):
            outside.append((ev, f"rank {ev['rank']} committed step {ev['step']} in quorum {ev.get('quorum_id')}, "
                                f"whose members are groups {sorted(quorums[ev['rank']][ev['quorum_id']])}"))
    if outside:
        broke.append((outside[0][0]["t"], {outside[0][0]["rank"] // per}, "no update outside the quorum"))
    quorum_msg = (f"{len(outside)} update(s) outside a committed quorum; the first: {outside[0][1]}" if outside else
                  f"{len(committed)} commits, each in a quorum of the rank's group; no update without a commit")

    # 3./4. tolerance against the golden run of the same groups
    tol = scenario.workload.tolerance
    mean_loss = windowed(_step_means(committed), tol.window)
    ref = windowed(_golden_means(golden), tol.window)
    diffs = [(rdiff(v, ref[s]), s) for s, v in mean_loss.items() if s in ref]
    loss_max, loss_step = max(diffs, default=(None, None))
    rank0 = finals.get(0, {})
    # the model's parameters and buffers: the optimizer's moments follow the batch step by step, and a
    # group out changed the batch
    mine, theirs = [{k: v for k, v in (norms or {}).items() if not k.startswith("optim.")} or None
                    for norms in (rank0.get("state_norms"), golden.state_norms if golden else None)]
    # the norm of the whole model (a small tensor, a norm's bias, moves by more than the state as a whole
    # when the batch of a few steps changed); the tensor that moved most, beside it
    state_max = worst = worst_rdiff = None
    if mine and theirs and set(mine) == set(theirs):
        state_max = rdiff(math.sqrt(sum(v * v for v in mine.values())), math.sqrt(sum(v * v for v in theirs.values())))
        worst = max(theirs, key=lambda n: rdiff(mine[n], theirs[n]))
        worst_rdiff = rdiff(mine[worst], theirs[worst])
    finished = bool(end and end.get("finished")) and len(finals) == scenario.workload.ranks and all(
        ev.get("final_step") == steps - 1 for ev in finals.values())
    loss_ok = loss_max is not None and loss_max <= tol.loss_rtol
    state_ok = state_max is not None and state_max <= tol.state_rtol
    tolerance = {"loss_rtol": tol.loss_rtol, "state_rtol": tol.state_rtol, "loss_max_rdiff": loss_max,
                 "loss_worst_step": loss_step, "state_max_rdiff": state_max, "state_worst_tensor": "the model's norm",
                 "tensor_max_rdiff": worst_rdiff, "tensor_worst": worst, "window": tol.window,
                 "within": bool(finished and loss_ok and state_ok),
                 "why": None if finished and loss_ok and state_ok else
                 ("the run did not finish" if not finished else "no golden run" if golden is None else
                  f"loss differs by {loss_max:.3g} at step {loss_step}" if not loss_ok else
                  f"the model's norm differs by {state_max:.3g}" if state_max is not None else
                  "no final state to compare"),
                 "because": "the system under test recovers itself (recovery.mode: external): a group that drops "
                            "out changes the batch"}

    # each fault: what the system did, and how long it took
    faults = [_fault(i, spec, by, per, groups, finished, agree_ok and not outside, tolerance["within"], broke)
              for i, spec in enumerate(scenario.faults)]
    fault_errors = [f"fault[{ev['fault_index']}] {ev['fault']} could not be applied: {ev['error']}"
                    for ev in by["fault_error"]]
    errored = {ev["fault_index"] for ev in by["fault_error"]}
    never = [f"fault[{f.index}] {f.fault} never fired: rank {f.rank}'s group did not run step {f.step} (it had "
             f"healed past it, or the run ended first)" for f in faults
             if not f.injected and f.index not in errored | unfired]
    if fault_errors or never:
        error = "; ".join(([error] if error else []) + fault_errors + never)

    step0 = [ev for ev in committed if ev["rank"] == 0]
    result = RunResult(
        scenario=scenario.name, run_id=run_id, run_dir=run_dir, config_hash=config_hash,
        ranks=scenario.workload.ranks, steps=steps, device=scenario.workload.device, started_at=started,
        finished_at=end["t"] if end else (events[-1]["t"] if events else started), finished=finished,
        final_step=min((ev.get("final_step", -1) for ev in finals.values()), default=None) if finals else None,
        final_state_hash=final_hashes.get(0), golden_state_hash=golden.state_hash if golden else None,
        exact=False, diverged_at_step=None, restarts=len(by["group_restarted"]) + sum(
            1 for ev in by["rank_started"] if ev.get("attempt", 0) > 0 and ev.get("group_rank") == 0),
        steps_executed=len([ev for ev in done if ev["rank"] == 0]), final_loss=step0[-1]["loss"] if step0 else None,
        loss_floor=None, faults=faults, error=error, comparison="tolerance", tolerance=tolerance)
    ex = [Expectation(f"fault[{f.index}] {f.fault}@rank{f.rank}:step{f.step}", f.ok,
                      f"outcome {f.outcome}, expected {' or '.join(f.expected)}" + (
                          f"; {f.details['why']}" if f.details.get("why") else "")) for f in faults
          if f.index not in unfired]
    ex += [
        Expectation("replica groups agree", agree_ok, agree_msg),
        Expectation("no update outside the quorum", not outside, quorum_msg),
        Expectation("loss within tolerance", loss_ok,
                    f"largest relative difference of a {_span(tol.window)} mean loss from the golden run's: "
                    f"{loss_max:.3g} at step {loss_step} (bound {tol.loss_rtol:g})" if loss_max is not None else
                    "no step to compare with the golden run"),
        Expectation("final state within tolerance", state_ok,
                    f"the L2 norm of the model's parameters differs from the golden run's by {state_max:.3g} (bound "
                    f"{tol.state_rtol:g}); of one tensor, at most {worst_rdiff:.3g} ({worst})"
                    if state_max is not None else "no final state to compare"),
        Expectation("every group finishes", finished,
                    "every rank of every group committed the last step" if finished else
                    (f"not finished within timeouts.run_s={by['run_timeout'][0]['run_s']:g} s (groups "
                     f"{by['run_timeout'][0]['running']} still running, ended by burnin); " if by["run_timeout"] else "")
                    + f"final steps { {r: ev.get('final_step') for r, ev in sorted(finals.items())} } of {steps - 1}"
                    + (f"; {len(finals)} of {scenario.workload.ranks} ranks finished" if len(finals) < scenario.workload.ranks else "")),
        Expectation("nothing left running", not left,
                    "the lighthouse, every agent and every rank had exited" if not left else
                    f"{len(left)} process(es) of the run still running at the end, ended by burnin: "
                    + "; ".join(f"{p['pid']} {p['cmdline'][:80]}" for p in left[:3])),
    ]
    if result.error:
        ex.append(Expectation("harness", False, result.error))
    result.expectations = ex
    return result


def _span(window: int) -> str:
    return "step's" if window == 1 else f"{window}-step window's"


def _step_means(committed: list[dict[str, Any]]) -> dict[int, float]:
    """Each step's mean loss over the ranks that committed it (not counting a pass that healed: its loss
    was computed on the state it replaced)."""
    acc: dict[int, dict[int, float]] = defaultdict(dict)
    for ev in committed:
        if not ev.get("healed"):
            acc[ev["step"]][ev["rank"]] = bits_float(ev["loss_bits"])
    return {s: sum(v.values()) / len(v) for s, v in acc.items() if v}


def _golden_means(golden: Any) -> dict[int, float]:
    if golden is None:
        return {}
    acc: dict[int, list[float]] = defaultdict(list)
    for steps in golden.loss_bits.values():
        for s, bits in steps.items():
            acc[int(s)].append(bits_float(bits))
    return {s: sum(v) / len(v) for s, v in acc.items()}


def _fault(i: int, spec: Any, by: dict[str, list[dict[str, Any]]], per: int, groups: int, finished: bool,
           invariants_ok: bool, within: bool, broke: list[tuple[float, set[int], str]]) -> FaultResult:
    fault = spec.build()
    g = spec.rank // per
    inj = next((ev for ev in by["fault_injected"] if ev.get("fault_index") == i), None)
    res = FaultResult(index=i, fault=spec.fault, rank=spec.rank, step=spec.step, point=spec.at,
                      expected=spec.expected, outcome="failed", injected=inj is not None,
                      injected_at=inj["t"] if inj else None, simulated=bool(inj and inj.get("simulated")))
    if inj is None:
        res.details["why"] = "never fired"
        return res
    t0 = inj["t"]
    # what happened up to the next fault is this fault's (the launcher arms one fault at a time)
    t_next = min((ev["t"] for ev in by["fault_injected"] if ev["t"] > t0), default=float("inf"))

    def mine(ev: dict[str, Any]) -> bool:
        return ev.get("rank") is not None and ev["rank"] // per == g and ev["t"] < t_next

    # detection: the survivors' first quorum without the group
    t_detect = next((ev["t"] for ev in by["ft_quorum"] if t0 <= ev["t"] < t_next and ev["rank"] // per != g
                     and g not in {_group_of(x) for x in ev.get("replica_ids", [])}), None)
    # the group's return: its first heal after the fault (a restarted group, or one back from a cut)
    heal = next((ev for ev in by["ft_heal_started"] if ev["t"] >= t0 and mine(ev)), None)
    healed = next((ev for ev in by["ft_healed"] if heal is not None and ev["t"] >= heal["t"] and mine(ev)), None)
    before = [ev["step"] for ev in by["step_done"] if mine(ev) and ev.get("committed") and ev["t"] < t0]
    full = next((ev for ev in by["step_done"] if mine(ev) and ev.get("committed") and ev["t"] > (
        healed or heal or inj)["t"] and ev.get("participants") == groups), None) if t_detect or heal else None
    restarted = next((ev["t"] for ev in by["rank_started"] if mine(ev) and ev["t"] > t0), None)
    dropped = t_detect is not None or heal is not None or restarted is not None
    # a breach between this fault and the next is this fault's (in its group: it broke it; in another, the
    # fault cannot be called recovered); one before it leaves nothing to judge it by; a later one is not its
    breach = next(((t, inv) for t, gs, inv in broke if g in gs and t0 <= t < t_next), None)
    elsewhere = next((inv for t, gs, inv in broke if g not in gs and t0 <= t < t_next), None)
    earlier = next((inv for t, gs, inv in broke if t < t0), None)
    if dropped:
        t_back = heal["t"] if heal else None
        phases = {"detection_s": (t_detect - t0) if t_detect else None,
                  "restart_s": (restarted - t0) if restarted else None,
                  "return_s": (t_back - (t_detect or t0)) if t_back else None,
                  "transfer_s": (healed["t"] - heal["t"]) if healed and heal else None,
                  "rejoin_s": (full["t"] - (healed or heal)["t"]) if full and (healed or heal) else None,
                  "total_s": (full["t"] - t0) if full else None}
        # the group's first commit once back (after its heal: a peer's commit of the step in flight when the
        # fault hit is not a return)
        back_from = (heal or inj)["t"]
        first = next((ev for ev in by["step_done"] if mine(ev) and ev.get("committed") and ev["t"] >= back_from), None)
        if first is not None:  # the steps the group skipped: it took its peer's state of a later step
            res.lost_steps = max(0, first["step"] - max(before, default=-1) - 1)
            phases["lost_steps"] = res.lost_steps
            phases["back_at_step"] = first["step"]
        res.details["heal"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in phases.items()}
        if full is not None and heal is not None:
            res.recovery = RecoveryBreakdown(
                detection_s=phases["detection_s"] or 0.0, teardown_s=0.0, restart_s=phases["return_s"] or 0.0,
                checkpoint_load_s=phases["transfer_s"] or 0.0, first_step_s=phases["rejoin_s"] or 0.0,
                resumed_from_step=full["step"], new_ranks="healed by torchft from a live peer")
        res.detected_by = "torchft quorum" if t_detect else "torchft heal"
        res.detection_latency_s = phases["detection_s"]
    if breach is not None:
        res.outcome, res.details["why"] = "failed", f"broke '{breach[1]}' after it"
    elif not finished:
        res.outcome, res.details["why"] = "failed", "the job did not finish"
    elif dropped and (heal is None or full is None):
        res.outcome, res.details["why"] = "failed", f"group {g} never came back to full participation"
    elif elsewhere is not None:
        res.outcome, res.details["why"] = "failed", f"'{elsewhere}' broke in another group after it"
    elif earlier is not None:
        res.outcome, res.details["why"] = "failed", f"'{earlier}' had broken before it"
    elif not invariants_ok and not broke:
        res.outcome, res.details["why"] = "failed", "an invariant broke"
    elif not within:
        res.outcome, res.details["why"] = "degraded", "finished outside tolerance"
    else:
        res.outcome = "recovered" if dropped else ("masked" if fault.where == "in_rank" else "recovered")
    return res
