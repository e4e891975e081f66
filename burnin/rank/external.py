"""The rank side of a run whose recovery belongs to the system under test (`recovery.mode: external`).

A loop that brings its own fault tolerance (torchft: a lighthouse, a quorum every step, replica groups
that heal from a live peer) is launched by burnin but recovered by itself. `observe` attaches burnin to
such a loop without taking anything over: it never resumes, checkpoints or rolls back. It injects the
rank's faults at the step points, and reports on the rank's event stream what the system did::

    import burnin.rank

    obs = burnin.rank.observe(model, optimizer, manager)   # torchft's Manager and its Optimizer wrapper
    for step in obs.steps(total_steps):                    # manager.current_step() until the last step
        loss = loss_fn(model(x(step)), y(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()                                    # torchft commits, or not
        obs.step_done(loss)

Each pass of the loop is one `step_done` event: the step it ran, its loss bits, whether torchft
committed it (the manager's step moved on), whether the optimizer's update was applied (the inner
optimizer ran), the quorum it ran in, and the digest of the model and optimizer state after it (the
cross-group fingerprint: every replica group that commits step S must hold the same bits after it).
Each quorum the group receives is a `ft_quorum` event (its id, its replica groups, whether this group
heals), and torchft's own log lines about healing become `ft_heal_*` events.

The step points: `before_forward` (a forward pre-hook on the model), `after_backward` and
`ft_all_reduce` (the manager's cross-group all-reduce, before it is sent: what it sends is the target
`allreduce_payload`; a kill or a hang there stops the rank on its way in), `after_allreduce` and
`after_optimizer_step` (the inner optimizer's step hooks, which fire only when torchft commits), and
`between_steps` (in `steps()`, after the step's event); with FSDP2 inside the group, its `all_gather` and
`reduce_scatter` (`burnin.rank.sharding.hook_collectives`). Out-of-rank faults (a kill, a hang) are applied
by the rank to itself at the point, as under torchrun. In a burn-in, `steps()` also ends at the step count
the launcher writes to `ranks/stop` once the time is up.

Outside burnin the observer is inert: `steps(n)` yields the manager's step until `n`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from burnin.core.events import EventWriter, read_events
from burnin.core.procs import EXTERNAL_SPEC_ENV
from burnin.errors import UserError
from burnin.faults.base import COLLECTIVE_POINTS
from burnin.rank.injector import Injector

__all__ = ["observe", "Observer"]


def observe(model: Any, optimizer: Any, manager: Any) -> "Observer":
    """Attach burnin to a loop whose fault tolerance is its own (torchft). `model`: the module the loop
    calls; `optimizer`: torchft's Optimizer wrapper (or the optimizer it wraps); `manager`: the
    torchft Manager. Call it once the manager exists, before the first step."""
    path = os.environ.get(EXTERNAL_SPEC_ENV)
    spec = json.loads(Path(path).read_text()) if path else None
    return Observer(model, optimizer, manager, spec)


class _Events:
    """The rank's stream, written from the loop and from torchft's quorum thread: one line at a time."""

    def __init__(self, writer: EventWriter):
        self._writer, self._lock = writer, threading.Lock()
        self.path = writer.path

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            return self._writer.emit(event, **fields)

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._writer.write(record)


class _TorchftLog(logging.Handler):
    """torchft's log lines that mark a heal, as events: when a group starts to heal, from which step,
    and when the state it fetched is in place; when a group sends its state to peers."""

    MARKS = (("healing required", "ft_heal_started"), ("Loaded state dict", "ft_healed"),
             ("peers need recovery from us", "ft_heal_source"), ("got exception", "ft_error"))

    def __init__(self, events: _Events):
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            for mark, event in self.MARKS:
                if mark in text:
                    self.events.emit(event, text=text[:500])
                    return
        except Exception:  # a report must never break the loop it watches
            pass


class Observer:
    """One rank's link to an external-recovery run. Made by `observe`."""

    def __init__(self, model: Any, optimizer: Any, manager: Any, spec: dict[str, Any] | None):
        self.model, self.manager = model, manager
        self.inner = getattr(optimizer, "optim", optimizer)  # torchft's wrapper steps this one on commit
        self.active = spec is not None
        self.step = manager.current_step()
        self._loss: Any = None
        self._applied = False
        self._t0 = self._t_fwd = time.perf_counter()
        self._fwd_s: float | None = None
        if not self.active:
            return
        self.spec = spec
        sc = spec["scenario"]
        per_group = spec["ranks_per_group"]
        self.group = int(os.environ["REPLICA_GROUP_ID"])
        self.group_rank = int(os.environ["RANK"])
        if int(os.environ["WORLD_SIZE"]) != per_group:
            raise UserError(f"burnin.rank.observe: torchrun started {os.environ['WORLD_SIZE']} ranks in replica "
                            f"group {self.group}, the scenario says {per_group}")
        self.rank = self.group * per_group + self.group_rank
        run_dir = Path(spec["run_dir"])
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        path = run_dir / "ranks" / f"rank{self.rank}.jsonl"
        fired = {ev["fault_index"] for ev in (read_events(path) if path.exists() else [])
                 if ev.get("event") in ("fault_injected", "fault_error")}  # (one that could not be applied: once)
        fired |= set(spec.get("not_in_rank", []))  # the launcher's own faults (a cut from the lighthouse)
        self.events = _Events(EventWriter(path, rank=self.rank, attempt=attempt, group=self.group))
        self.events.emit("rank_started", pid=os.getpid(), host=socket.gethostname(), group_rank=self.group_rank,
                         step=self.step, restart_count=attempt)
        self._gang_start(run_dir, sc["timeouts"]["connect_s"])
        # (a burn-in's arrival times are the launcher's: it arms each fault when its time has come)
        faults = [{**f, "at_s": None} for f in sc["faults"]]
        self.injector = _Deferring(faults, self.rank, spec["world_size"], self.events, fired,
                                   go_timeout_s=sc["timeouts"]["connect_s"], supervised=False, self_inflicted=True)
        self.injector.armed_dir = run_dir / "ranks" / "armed"
        self._hook()

    def _gang_start(self, run_dir: Path, timeout_s: float) -> None:
        """The first launch trains once every rank of every group is up and every group's manager is
        heartbeating to the lighthouse (the launcher writes `ranks/go` then), as a scheduler's gang start
        would have it: a group that is slow to start must not find the others steps ahead (and a fault
        meant for its step 8 skipped) before anything went wrong. A group started again finds it there."""
        go = run_dir / "ranks" / "go"
        deadline = time.monotonic() + timeout_s
        while not go.exists():
            if time.monotonic() > deadline:
                raise UserError(f"burnin.rank.observe: the run did not start within timeouts.connect_s={timeout_s:g} s "
                                f"(not every rank of every group was up); see the groups' logs in {run_dir}/logs")
            time.sleep(0.05)

    # -- hooks -------------------------------------------------------------------------------

    def _hook(self) -> None:
        self.model.register_forward_pre_hook(self._before_forward)
        self.model.register_forward_hook(self._after_forward)
        self.inner.register_step_pre_hook(lambda opt, a, k: self._point("after_allreduce"))
        self.inner.register_step_post_hook(self._after_optimizer)
        manager = self.manager
        allreduce = manager.allreduce

        def watched_allreduce(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            self._point("after_backward", bucket=_Outgoing(tensor))
            self._point("ft_all_reduce")
            return allreduce(tensor, *args, **kwargs)

        manager.allreduce = watched_allreduce
        should_commit = manager.should_commit

        def watched_should_commit(*args: Any, **kwargs: Any) -> bool:
            self._commit = bool(should_commit(*args, **kwargs))
            return self._commit

        manager.should_commit = watched_should_commit
        self._hook_collectives()
        client = manager._client  # torchft 0.2's quorum call: what each group is told, recorded as it is told
        manager._client = _QuorumWatch(client, self.events)
        handler = _TorchftLog(self.events)
        log = logging.getLogger("torchft")  # the manager's logger ("torchft.manager") hands its lines up here
        log.addHandler(handler)
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
        self._forwarded = False

    def _hook_collectives(self) -> None:
        """FSDP2 inside the replica group: its all-gathers and reduce-scatters fire the collective points, as in
        a sharded loop under burnin's own recovery (`burnin.rank.sharding.hook_collectives`). A fault at such a
        point of a model that has none is refused before the first step."""
        from burnin.rank.sharding import fsdp_units, hook_collectives  # lazy: torch

        model = getattr(self.model, "module", self.model)  # (DDP's wrapped module)
        units = hook_collectives(model, self._point, self.injector.armed) if fsdp_units(model) else {}
        # a sharded rank holds its shard: its state is compared with the same shard's in the other groups
        self.shard = self.group_rank if units else None
        for index, name, point in self.injector.points_named():
            if point in COLLECTIVE_POINTS and point != "ft_all_reduce" and (not units or point not in (
                    "all_gather", "reduce_scatter")):
                message = (f"faults[{index}] {name} at point {point}: this loop's model has no FSDP2 collectives "
                           "inside its replica group to act in (it is not sharded with fully_shard); use a step "
                           "point, or ft_all_reduce")
                self.events.emit("rank_error", error_type="UserError", message=message)  # the launcher stops the run
                raise UserError(message)

    def _point(self, name: str, **tensors: Any) -> None:
        self.injector.fire(name, self.step, model=self.model, optimizer=self.inner, **tensors)

    def _before_forward(self, module: Any, args: tuple[Any, ...]) -> None:
        if not self._forwarded and module.training:
            self._forwarded = True
            self._t_fwd = time.perf_counter()
            batch = args[0] if args and hasattr(args[0], "data_ptr") else None  # the target `batch`
            self._point("before_forward", **({"batch": batch} if batch is not None else {}))

    def _after_forward(self, module: Any, args: Any, output: Any) -> None:
        """The step's first forward, timed: the rank's own compute (DDP waits for no peer there), which a
        burn-in's straggler score reads."""
        if self._fwd_s is None and self._forwarded:
            self._fwd_s = time.perf_counter() - self._t_fwd

    def _after_optimizer(self, opt: Any, args: Any, kwargs: Any) -> None:
        self._applied = True
        self._point("after_optimizer_step")

    # -- the loop ----------------------------------------------------------------------------

    def steps(self, total: int | None = None) -> Iterator[int]:
        """The manager's current step, again and again, until the last step is committed (the scenario's
        `workload.steps` under burnin, `total` without)."""
        stop = None
        if self.active:
            total = self.spec["scenario"]["workload"]["steps"]
            stop = Path(self.spec["run_dir"]) / "ranks" / "stop"  # a burn-in's end: the step count, when it is up
        elif total is None:
            raise UserError("obs.steps(): give the number of steps (no burnin run to take it from)")
        last = min(total, _stop_at(stop))
        while (step := self.manager.current_step()) < last:
            self.step, self._loss, self._applied, self._forwarded, self._commit = step, None, False, False, None
            self._fwd_s = None
            self._t0 = time.perf_counter()
            yield step
            if self.active:
                self._report(step)
                self._point("between_steps")
                if last == total:  # (read until it is there, once)
                    last = min(total, _stop_at(stop))
        self.finish()

    def step_done(self, loss: Any) -> None:
        """The pass's loss (a tensor): the last call of the loop's body."""
        self._loss = loss

    def _report(self, step: int) -> None:
        from burnin.rank.state import loss_bits, state_hash  # lazy: torch

        if self._loss is None:
            raise UserError(f"step {step} ended without obs.step_done(loss): call it at the end of each step")
        m = self.manager
        # The step this pass committed: a group that healed in it ran `step` on its old state, took its
        # peer's state of the quorum's step, and committed that one (its loss is of the old state).
        committed = bool(self._commit)
        done = m.current_step() - 1 if committed else step
        self.events.emit("step_done", step=done, ran=step, healed=done != step, loss=float(self._loss.item()),
                         loss_bits=loss_bits(self._loss), committed=committed, applied=self._applied,
                         commit_asked=self._commit is not None, quorum_id=getattr(m, "_quorum_id", None),
                         participants=m.num_participants(), participating=m.is_participating(),
                         errored=str(m.errored())[:300] if m.errored() is not None else None,
                         state_hash=state_hash(self.model, self.inner, local_only=True), shard=self.shard,
                         dt=time.perf_counter() - self._t0, fwd_s=self._fwd_s)

    def finish(self) -> None:
        from burnin.rank.state import state_hash, state_norms  # lazy: torch

        if not self.active:
            return
        self.events.emit("rank_finished", final_step=self.manager.current_step() - 1,
                         state_hash=state_hash(self.model, self.inner, local_only=True), shard=self.shard,
                         state_norms=state_norms(self.model, self.inner))


def _stop_at(path: Path | None) -> float:
    """The number of steps a burn-in's launcher has told the groups to stop at (`ranks/stop`), or infinity."""
    if path is None:
        return float("inf")
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return float("inf")


class _Deferring(Injector):
    """The fault schedule of a loop that heals past steps: a fault is due once the launcher has armed it
    (`ranks/armed/<index>`), which it does one fault at a time, at the fault's step or later, once every
    replica group has taken part in a few steps in a row since the fault before (burnin/harness/external.py):
    faults do not pile up on a group that is still out, and a fault whose step its group skipped while it
    healed fires once it is back, at the step it is at."""

    armed_dir: Path | None = None

    def _due(self, index: int, fault: Any, spec: dict[str, Any], step: int) -> bool:
        return (index not in self.fired and step >= spec["step"] and self.armed_dir is not None
                and (self.armed_dir / str(index)).exists())


class _Outgoing:
    """What a group sends into torchft's cross-group all-reduce, as the corruption faults see a DDP bucket
    (target `allreduce_payload`: one element of the buffer on its way out)."""

    def __init__(self, tensor: Any):
        self._tensor = tensor

    def index(self) -> int:
        return 0

    def buffer(self) -> Any:
        return self._tensor


class _QuorumWatch:
    """torchft's manager client, passed through; each quorum it returns is recorded first."""

    def __init__(self, client: Any, events: _Events):
        self._client, self._events = client, events

    def _quorum(self, *args: Any, **kwargs: Any) -> Any:
        q = self._client._quorum(*args, **kwargs)
        self._events.emit("ft_quorum", quorum_id=q.quorum_id, replica_ids=list(q.replica_ids), max_step=q.max_step,
                          heal=bool(q.heal), replica_rank=q.replica_rank, replica_world_size=q.replica_world_size,
                          recover_dst=list(q.recover_dst_replica_ranks), asked_step=kwargs.get("step"))
        return q

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)
