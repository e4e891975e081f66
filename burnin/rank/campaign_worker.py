"""The rank side of a campaign: many short trials in one process group, each from the same state.

Train `warmup` steps, snapshot the state in memory, run the fault-free window twice (the
reference, and a check that replaying the window from the snapshot gives the same bits), then
for each trial: restore the snapshot, arm the trial's fault, run the window with the detectors
and the recovery policy, and compare the final state with the reference. Rank 0 reports each
trial as one `trial_done` event. No trial pays a process start.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from burnin.errors import HarnessError
from burnin.rank.guard import CorruptionDetected
from burnin.rank.injector import Injector

__all__ = ["run_trials"]


def run_trials(campaign: dict[str, Any], run: Any, one_step: Callable[[int], tuple[float, str, float]],
               scenario: dict[str, Any], rank: int, world_size: int, events: Any) -> None:
    import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

    from burnin.rank.state import state_hash  # lazy: torch; `import burnin.rank` stays torch-free

    guard = run.guard
    guard.quiet = True
    state: dict[str, Any] = {"observing": bool(campaign.get("observe"))}
    warmup, window = campaign["warmup"], campaign["window"]
    end = warmup + window

    def window_run(start_snapshot: Any, act: bool = True) -> tuple[str, list[str], float, list[float], float | None]:
        """The window from the snapshot: the final state hash, each step's loss bits and loss (the last
        execution of a step), its wall time, and the held-out loss at its end (every rank evaluates).
        act=False: the detectors watch and log but nothing recovers (what a fault does unchecked)."""
        guard._restore(start_snapshot)
        guard.rollbacks, guard.log = 0, []
        mode = guard.mode
        if not act:
            guard.mode = "none"
        try:
            return _window(start_snapshot)
        finally:
            guard.mode = mode

    def _window(start_snapshot: Any) -> tuple[str, list[str], float, list[float], float | None]:
        guard.snap = start_snapshot if guard.mode == "rollback" and guard.active else None
        seen: dict[int, tuple[str, float]] = {}
        step = warmup
        t0 = time.perf_counter()
        state["gave_up"] = None
        while step < end:
            guard.before_step(step)
            loss, bits, gnorm = one_step(step)
            try:
                nxt, loss, bits = guard.after_step(step, loss, bits, gnorm, rerun=one_step)
            except CorruptionDetected as exc:
                if guard.mode != "rollback":
                    raise  # restart mode: the supervisor restarts the group, as the campaign asked
                # Rollback gave up (a fault that acts again on every replay: a stuck bit). Every rank raised
                # it together (the guard agrees first): the trial ends here, detected; the next one restores
                # its own state, so the group need not restart.
                state["gave_up"] = str(exc)
                break
            if nxt > step:
                seen[step] = (bits, float(loss))
                run.injector.fire("between_steps", step, model=guard.model, optimizer=guard.optimizer)
            step = nxt
        wall = time.perf_counter() - t0
        # A trial the guard acted on (every rank rolled back, or gave up, together) is judged from its unchecked
        # run when the campaign runs one: its own held-out loss would be read by nothing (~1.3 steps of forward).
        skip_eval = state.get("observing") and guard.mode == "rollback" and (guard.rollbacks or state["gave_up"])
        held_out = None if skip_eval else run.held_out_loss()
        ordered = [seen[s] for s in sorted(seen)]
        return (state_hash(guard.model, guard.optimizer), [b for b, _ in ordered], wall, [x for _, x in ordered],
                held_out[0] if held_out else None)

    # warmup: detectors learn what normal looks like; nothing is injected
    run.injector = Injector([], rank, world_size, events, set(), go_timeout_s=60)
    for step in range(warmup):
        loss, bits, gnorm = one_step(step)
        guard.after_step(step, loss, bits, gnorm, rerun=one_step)
    base = guard._take(warmup)

    # the reference window, twice: the second run must repeat the first bit for bit
    ref_hash, ref_bits, ref_s, ref_losses, ref_eval = window_run(base)
    alarms = list(guard.log)
    again, again_bits, _, _, again_eval = window_run(base)
    if (again, again_bits, again_eval) != (ref_hash, ref_bits, ref_eval):
        raise HarnessError("replaying the fault-free window from its snapshot changed the bits: "
                           "trials cannot be judged (is the workload deterministic?)")
    alarms += guard.log
    all_alarms = _gather(alarms, world_size)
    # the seed-to-seed spread: the same window from the same state over other batches (a data seed of its own
    # each), fault-free; what a final or held-out loss may differ by without anything having gone wrong
    spread = []
    for k in range(1, campaign.get("spread_windows", 0) + 1):
        run.data_offset = k * 1_000_003
        try:
            _, _, _, losses_k, eval_k = window_run(base)
        finally:
            run.data_offset = 0
        spread.append({"final_loss": losses_k[-1] if losses_k else None, "eval_loss": eval_k, "losses": losses_k})
    if rank == 0:
        events.emit("campaign_reference", state_hash=ref_hash, window_s=ref_s, steps=2 * window,
                    false_alarms=[a for part in all_alarms for a in part], losses=ref_losses, eval_loss=ref_eval,
                    spread=spread)

    for trial in campaign["trials"]:
        faults = trial["faults"]
        run.injector = Injector(faults, rank, world_size, events, set(), go_timeout_s=60)
        run.injector.quiet = True
        if rank == 0:
            events.emit("trial_started", trial=trial["trial"])
        final, bits, wall, losses, held_out = window_run(base)
        gave_up = state["gave_up"]
        mine = {"injected": [{"index": i, "step": s, "details": d} for i, s, d in run.injector.injected],
                "findings": guard.log, "rollbacks": guard.rollbacks}
        parts = _gather(mine, world_size)
        observed = None
        # A trial a detector acted on hides what its fault would have done: run it once more with the
        # detectors watching, not acting (the same fault, drawn from the same seed, at the same point).
        if campaign.get("observe") and any(p["findings"] for p in parts) and not trial.get("control"):
            run.injector = Injector(faults, rank, world_size, events, set(), go_timeout_s=60)
            run.injector.quiet = True
            o_final, o_bits, _, o_losses, o_eval = window_run(base, act=False)
            o_parts = _gather({"injected": [d for _, _, d in run.injector.injected], "findings": guard.log},
                              world_size)
            # (the fault as drawn: its first act on each rank; a fault with a span acts again on a replayed step)
            if [p["injected"][:1] for p in o_parts] != [[x["details"] for x in p["injected"][:1]] for p in parts]:
                raise HarnessError(f"trial {trial['trial']}: the unchecked run injected another fault than the trial "
                                   "(is the fault's draw deterministic?)")
            observed = {"findings": sorted((f for p in o_parts for f in p["findings"]), key=lambda f: f["step"]),
                        "exact": o_final == ref_hash, "diverged_at_step": _first_difference(o_bits, ref_bits, warmup),
                        "losses": o_losses, "eval_loss": o_eval}
        if rank == 0:
            injected = [x for p in parts for x in p["injected"]]
            findings = sorted((f for p in parts for f in p["findings"]), key=lambda f: f["step"])
            events.emit("trial_done", trial=trial["trial"], template=trial["template"], fault=faults[0],
                        injected=injected, findings=findings, rollbacks=parts[0]["rollbacks"],
                        state_hash=final, exact=final == ref_hash,
                        diverged_at_step=_first_difference(bits, ref_bits, warmup),
                        wall_s=wall, losses=losses, eval_loss=held_out, control=bool(trial.get("control")),
                        **({"gave_up": gave_up} if gave_up else {}),
                        **({"observed": observed} if observed is not None else {}))


def _first_difference(bits: list[str], ref_bits: list[str], warmup: int) -> int | None:
    return next((warmup + i for i, (a, b) in enumerate(zip(bits, ref_bits)) if a != b), None)


def _gather(obj: Any, world_size: int) -> list[Any]:
    import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
