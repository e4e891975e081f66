"""The in-rank side of the fault schedule: `injector.fire(point, step)` at each step point.

The schedule is data keyed by (step, point). In-rank faults are applied here; for out-of-rank faults
the rank announces the point on its event stream and waits until the supervisor has acted (sent the
signal, damaged the checkpoint) and said go, so every fault lands at a known step. Each fault fires
once per run: faults fired before a restart are passed in and skipped when the step is replayed.
"""

from __future__ import annotations

import os
import select
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from burnin.core.events import EventWriter
from burnin.core.position import Position
from burnin.errors import HarnessError
from burnin.faults import registry

__all__ = ["RankContext", "SelfContext", "Injector"]


@dataclass
class RankContext:
    """What an in-rank fault may touch."""

    rank: int
    world_size: int
    step: int
    point: str
    model: Any = None
    optimizer: Any = None
    tensors: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelfContext:
    """The context of an out-of-rank fault a rank applies to itself (torchrun runs): the fields of the
    supervisor's context that make sense inside the rank; the fabric is the node's interface, if named."""

    rank: int
    step: int
    point: str
    pid: int
    run_dir: Any
    checkpoint_dir: Any
    fabric: Any
    fault_index: int
    snapshot_dir: Any = None

    def schedule(self, delay_s: float, label: str, fn: Any) -> None:
        """Undo the fault after `delay_s` from a forked process of its own session, so the undo happens
        on time even when the fault brings this rank down (a link taken down must come back up)."""
        if os.fork() == 0:
            try:
                os.setsid()
                time.sleep(delay_s)
                fn()
            finally:
                os._exit(0)


class Injector:
    def __init__(self, faults: list[dict[str, Any]], rank: int, world_size: int, events: EventWriter,
                 fired: set[int], go_timeout_s: float, supervised: bool = True, clock0: float | None = None,
                 position: str | None = None, self_inflicted: bool = False, checkpoint_dir: str | None = None,
                 snapshot_dir: str | None = None, fabric: Any = None):
        self.rank, self.world_size, self.events = rank, world_size, events
        self.go_timeout_s, self.supervised = go_timeout_s, supervised
        # torchrun: no supervisor; the rank applies its out-of-rank faults to itself (a kill is the rank
        # SIGKILLing itself at the point, a hang SIGSTOP, a damaged checkpoint damaged by the rank)
        self.self_inflicted, self.checkpoint_dir, self.snapshot_dir = self_inflicted, checkpoint_dir, snapshot_dir
        self.fabric = fabric
        self.fired = set(fired)
        self.quiet = False  # campaigns report injections per trial instead of per event
        self.injected: list[tuple[int, int, dict[str, Any]]] = []  # (fault index, step, details) fired here
        # Burn-ins: a fault with `at_s` is due at clock0 + at_s; the out-of-rank ones are the supervisor's alone.
        self.clock0 = clock0
        self._began: dict[int, int] = {}  # timed fault -> step it first fired at (a span counts from there)
        self.position = Position(position) if position else None
        # (index, fault instance, spec) of this rank's faults
        self._mine: list[tuple[int, Any, dict[str, Any]]] = []
        for i, spec in enumerate(faults):
            if spec["rank"] != rank:
                continue
            cls = registry.get(spec["fault"])
            fault = cls(cls.Params.model_validate(spec.get("params") or {}))
            if spec.get("at_s") is not None and fault.where == "out_of_rank":
                continue
            point = spec.get("point") or fault.default_point()
            # (a fault on what a collective received fires once the call is done: `<point>.out`)
            spec = {**spec, "point": fault.fire_point(point), "named_point": point}
            self._mine.append((i, fault, spec))
        self._points = {spec["point"] for _, _, spec in self._mine}

    def armed(self, point: str) -> bool:
        """Whether a fault of this rank fires at `point` (cheap: the collectives ask at every call)."""
        return point in self._points

    def points_named(self) -> list[tuple[int, str, str]]:
        """(fault index, fault name, point as the scenario names it) of this rank's faults."""
        return [(index, fault.name, spec["named_point"]) for index, fault, spec in self._mine]

    def fire(self, point: str, step: int, **ctx: Any) -> None:
        if self.position is not None:
            self.position.set(step, point)
        if point not in self._points:  # the common case costs one set lookup
            return
        for index, fault, spec in self._mine:
            if spec["point"] != point or not self._due(index, fault, spec, step):
                continue
            first, named = index not in self.fired, spec["named_point"]
            if fault.where == "out_of_rank":
                self.fired.add(index)
                if self.self_inflicted:
                    self._inflict(index, fault, step, point)
                else:
                    self._hand_to_supervisor(index, fault, step, point)
                continue
            tensors = {k: v for k, v in ctx.items() if k not in ("model", "optimizer")}
            context = RankContext(self.rank, self.world_size, step, point, model=ctx.get("model"),
                                  optimizer=ctx.get("optimizer"), tensors=tensors)
            try:
                details = fault.inject(context) or {}
            except Exception as exc:
                self.fired.add(index)
                if not fault.raises:  # it could not be applied: a harness error, never an outcome
                    error = f"{type(exc).__name__}: {exc}"[:2000]
                    self.events.emit("fault_error", fault_index=index, fault=fault.name, step=step, point=named,
                                     error=error)
                    raise HarnessError(f"fault[{index}] {fault.name} could not be applied at step {step} "
                                       f"({named}): {error}") from exc
                self.events.emit("fault_injected", fault_index=index, fault=fault.name, step=step, point=named,
                                 where="in_rank", simulated=fault.simulated, details={"raised": True})
                raise
            if details.get("not_here"):
                continue  # e.g. the target gradient is in another bucket: try the next call
            self.fired.add(index)
            self.injected.append((index, step, details))
            if first and not self.quiet:
                self.events.emit("fault_injected", fault_index=index, fault=fault.name, step=step, point=named,
                                 where="in_rank", simulated=fault.simulated, details=details)
            elif not self.quiet:  # a fault that acts again across its span (a recurring defect, a stuck bit)
                self.events.emit("fault_repeated", fault_index=index, fault=fault.name, step=step, point=named,
                                 details=details)

    def _due(self, index: int, fault: Any, spec: dict[str, Any], step: int) -> bool:
        span = fault.span()
        if spec.get("at_s") is not None:
            if index in self._began:  # a timed fault with a span: the steps after the one it first hit
                return step < self._began[index] + span and fault.fires_at(step - self._began[index])
            if index in self.fired or self.clock0 is None or time.time() < self.clock0 + spec["at_s"]:
                return False
            self._began[index] = step
            return True
        if not spec["step"] <= step < spec["step"] + span:
            return False
        # A repeating fault keeps firing across its span (at the steps it says); a one-shot fault never twice.
        return fault.fires_at(step - spec["step"]) if span > 1 else index not in self.fired

    def _inflict(self, index: int, fault: Any, step: int, point: str) -> None:
        """Apply an out-of-rank fault from inside the rank. The event is written first: the fault may end
        this process."""
        self.events.emit("fault_injected", fault_index=index, fault=fault.name, step=step, point=point,
                         where="self_inflicted", simulated=fault.simulated)
        ctx = SelfContext(self.rank, step, point, os.getpid(), None, self.checkpoint_dir, self.fabric, index,
                          snapshot_dir=self.snapshot_dir)
        try:
            details = fault.inject(ctx) or {}
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:2000]
            self.events.emit("fault_error", fault_index=index, fault=fault.name, step=step, point=point, error=error)
            raise HarnessError(f"fault[{index}] {fault.name} could not be applied at step {step} ({point}): "
                               f"{error}") from exc
        self.events.emit("fault_applied", fault_index=index, details=details)

    def _hand_to_supervisor(self, index: int, fault: Any, step: int, point: str) -> None:
        if not self.supervised:
            raise HarnessError(f"{fault.name} acts from outside the rank and needs the burnin supervisor")
        self.events.emit("fault_point", fault_index=index, fault=fault.name, step=step, point=point)
        # The supervisor answers on our stdin once it has acted. If the fault kills or stops us,
        # the answer never matters.
        ready, _, _ = select.select([sys.stdin], [], [], self.go_timeout_s)
        if not ready:
            raise HarnessError(f"no answer from the supervisor within {self.go_timeout_s:.0f} s at {fault.name}")
        line = os.read(sys.stdin.fileno(), 64)
        if not line.startswith(b"go"):
            raise HarnessError(f"unexpected answer from the supervisor at {fault.name}: {line!r}")
