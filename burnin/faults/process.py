"""Process faults: real signals to real rank processes, and exceptions raised inside the step."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from burnin.core import procs
from burnin.errors import InjectedFault
from burnin.faults.base import COLLECTIVE_POINTS, STEP_POINTS, Fault

__all__ = ["Kill", "Hang", "Exception_", "Straggler"]


class Kill(Fault):
    """SIGKILL the rank: what a node loss or an OOM killer looks like to the job."""

    name = "process.kill"
    summary = "SIGKILL a rank at a step (node loss), or on its way into a sharded collective"
    where = "out_of_rank"
    points = ("between_steps",) + COLLECTIVE_POINTS
    effects = ("killed",)

    def inject(self, ctx: Any) -> dict[str, Any]:
        return _signal(ctx.pid, signal.SIGKILL)


class Hang(Fault):
    """SIGSTOP the rank: every thread freezes, heartbeats stop, peers block in the next collective."""

    name = "process.hang"
    summary = "SIGSTOP a rank at a step (a hung process; caught by the heartbeat timeout), or in a collective"
    where = "out_of_rank"
    points = ("between_steps",) + COLLECTIVE_POINTS
    effects = ("hang",)

    def inject(self, ctx: Any) -> dict[str, Any]:
        return _signal(ctx.pid, signal.SIGSTOP)


def _signal(pid: int, sig: signal.Signals) -> dict[str, Any]:
    """Send `sig` to the rank process. A rank that exited a moment before (another fault's failure, in a
    burn-in where arrivals are timed) is not an error of the harness: the signal acts on nothing, and
    the details say so (`target_exited`), whether the process is still a zombie or already reaped."""
    if procs.proc_state(pid) in (None, "Z", "X"):
        return {"signal": sig.name, "pid": pid, "target_exited": True}
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return {"signal": sig.name, "pid": pid, "target_exited": True}
    return {"signal": sig.name, "pid": pid}


class Exception_(Fault):
    """Raise inside the training step, as a software bug would."""

    name = "process.exception"
    summary = "raise an exception inside a rank's step, or inside a sharded collective"
    where = "in_rank"
    points = ("before_forward", "after_optimizer_step", "between_steps") + COLLECTIVE_POINTS
    effects = ("exception",)
    raises = True

    def inject(self, ctx: Any) -> dict[str, Any]:
        raise InjectedFault(f"burnin injected process.exception at step {ctx.step} ({ctx.point}) on rank {ctx.rank}")


class StragglerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delay_s: float = Field(0.2, gt=0, le=600, description="extra seconds per step")
    steps: int = Field(1, ge=1, le=1_000_000, description="how many consecutive steps are slowed")


class Straggler(Fault):
    """Sleep inside the step so one rank runs late and the others wait for it in the all-reduce. At a
    collective point, every call of that collective in the steps it spans is delayed: a slow collective."""

    name = "process.straggler"
    summary = "slow a rank down by a delay per step (a straggler), or each call of a sharded collective"
    where = "in_rank"
    points = ("before_forward",) + tuple(p for p in STEP_POINTS if p != "before_forward") + COLLECTIVE_POINTS
    Params = StragglerParams
    disruptive = False
    changes_state = False
    effects = ("hang",)        # only a delay past timeouts.step_s brings the group down: a stall
    effect_scope = "group"

    def span(self) -> int:
        return self.params.steps

    def effect_window_s(self, timeouts: Any) -> float | None:
        if self.params.delay_s < timeouts.step_s:
            return 0.0  # the step watchdog never sees a delay shorter than its timeout
        return self.params.steps * self.params.delay_s + timeouts.step_s

    def inject(self, ctx: Any) -> dict[str, Any]:
        time.sleep(self.params.delay_s)
        return {"delay_s": self.params.delay_s}


#: The faults this module adds to the built-in catalogue (`burnin.faults.registry` registers them).
FAULTS = (Kill, Hang, Exception_, Straggler)
