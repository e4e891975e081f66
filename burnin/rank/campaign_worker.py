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
from burnin.rank.injector import Injector

__all__ = ["run_trials"]


def run_trials(campaign: dict[str, Any], run: Any, one_step: Callable[[int], tuple[float, str, float]],
               scenario: dict[str, Any], rank: int, world_size: int, events: Any) -> None:
    import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

    from burnin.rank.state import state_hash  # lazy: torch; `import burnin.rank` stays torch-free

    guard = run.guard
    guard.quiet = True
    warmup, window = campaign["warmup"], campaign["window"]
    end = warmup + window

    def window_run(start_snapshot: Any) -> tuple[str, list[str], float]:
        guard._restore(start_snapshot)
        guard.rollbacks, guard.log = 0, []
        guard.snap = start_snapshot if guard.mode == "rollback" and guard.active else None
        bits_seen: list[str] = []
        step = warmup
        t0 = time.perf_counter()
        while step < end:
            guard.before_step(step)
            loss, bits, gnorm = one_step(step)
            nxt, loss, bits = guard.after_step(step, loss, bits, gnorm, rerun=one_step)
            if nxt > step:
                bits_seen.append(bits)
                run.injector.fire("between_steps", step, model=guard.model, optimizer=guard.optimizer)
            step = nxt
        return state_hash(guard.model, guard.optimizer), bits_seen, time.perf_counter() - t0

    # warmup: detectors learn what normal looks like; nothing is injected
    run.injector = Injector([], rank, world_size, events, set(), go_timeout_s=60)
    for step in range(warmup):
        loss, bits, gnorm = one_step(step)
        guard.after_step(step, loss, bits, gnorm, rerun=one_step)
    base = guard._take(warmup)

    # the reference window, twice: the second run must repeat the first bit for bit
    ref_hash, ref_bits, ref_s = window_run(base)
    alarms = list(guard.log)
    again, again_bits, _ = window_run(base)
    if (again, again_bits) != (ref_hash, ref_bits):
        raise HarnessError("replaying the fault-free window from its snapshot changed the bits: "
                           "trials cannot be judged (is the workload deterministic?)")
    alarms += guard.log
    all_alarms = _gather(alarms, world_size)
    if rank == 0:
        events.emit("campaign_reference", state_hash=ref_hash, window_s=ref_s, steps=2 * window,
                    false_alarms=[a for part in all_alarms for a in part])

    for trial in campaign["trials"]:
        faults = trial["faults"]
        run.injector = Injector(faults, rank, world_size, events, set(), go_timeout_s=60)
        run.injector.quiet = True
        if rank == 0:
            events.emit("trial_started", trial=trial["trial"])
        final, bits, wall = window_run(base)
        mine = {"injected": [{"index": i, "step": s, "details": d} for i, s, d in run.injector.injected],
                "findings": guard.log, "rollbacks": guard.rollbacks}
        parts = _gather(mine, world_size)
        if rank == 0:
            injected = [x for p in parts for x in p["injected"]]
            findings = sorted((f for p in parts for f in p["findings"]), key=lambda f: f["step"])
            events.emit("trial_done", trial=trial["trial"], template=trial["template"], fault=faults[0],
                        injected=injected, findings=findings, rollbacks=parts[0]["rollbacks"],
                        state_hash=final, exact=final == ref_hash,
                        diverged_at_step=next((warmup + i for i, (a, b) in enumerate(zip(bits, ref_bits)) if a != b),
                                              None),
                        wall_s=wall)


def _gather(obj: Any, world_size: int) -> list[Any]:
    import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
