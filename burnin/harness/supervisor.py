"""The supervisor: launches the rank group, watches it, applies out-of-rank faults, restarts it.

It never imports torch. Per attempt it spawns one worker process per rank, tails their event
streams into the run's `events.jsonl`, and watches exit codes, heartbeats and progress. On the
first sign of failure it gathers evidence for a moment, pins the failure on its root cause,
tears the whole group down and starts a new one, which resumes from the newest valid checkpoint,
up to `recovery.max_restarts` times. Whatever way the run ends, no rank process outlives it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from burnin.core import procs
from burnin.core import snapshots as snapshot
from burnin.core.events import EventWriter, Tail
from burnin.core.position import read_position
from burnin.harness import cleanup
from burnin.harness.classify import classify_error, classify_exit, signature
from burnin.harness.fabric import LocalFabric
from burnin.harness.netwatch import NetworkWatch
from burnin.harness.spares import SparePool, open_pool, rank_base_env, server_path
from burnin.reports.attribution import Candidate, Evidence, explained_by, pin_detection
from burnin.scenarios.schema import HEARTBEAT_PERIOD_S, Scenario

__all__ = ["Supervisor", "OutOfRankContext", "LocalFabric", "classify_exit", "classify_error", "signature"]

POLL_S = 0.01
GRACE_S = 0.25          # after the first sign of failure, how long to gather evidence of its cause (at most:
                        # it ends once every rank has exited)

# Which evidence names the root cause when several ranks fail together: a rank killed by a signal
# brings its peers down with connection errors, not the other way round. A fault that could not be
# applied is a harness error, and outranks everything. `stopped` is never a first sign (it is looked
# at once the failure is certain), only a witness of which ranks were frozen.
_PRIORITY = {"fault_error": -1, "exit_signal": 0, "heartbeat": 1, "stopped": 2, "rank_error": 3,
             "exit_code": 4, "step_timeout": 5, "connect_timeout": 6, "run_timeout": 7}


def _priority(e: Evidence) -> int:
    return _PRIORITY[e.detector]


@dataclass
class _Rank:
    rank: int
    proc: Any                                           # subprocess.Popen, or spares.ForkedProc
    tail: Tail
    heartbeat: Path
    last_step: int | None = None
    pg_ready: bool = False
    finished: bool = False
    error: dict[str, Any] | None = None


@dataclass
class _Action:
    due: float
    label: str
    fn: Callable[[], Any]
    fault_index: int


@dataclass
class OutOfRankContext:
    """What an out-of-rank fault may touch: the target's pid, the run's files, the fabric.

    A fault with a duration (a link down for 30 s) undoes itself through `schedule`: the action runs
    on time whatever the group is doing, restarts included, and at the latest when the run ends.
    """

    rank: int
    step: int
    point: str
    pid: int
    run_dir: Path
    checkpoint_dir: Path
    fabric: Any = None
    fault_index: int = -1
    actions: list[_Action] = field(default_factory=list)  # the supervisor's scheduled actions

    def schedule(self, delay_s: float, label: str, fn: Callable[[], Any]) -> None:
        self.actions.append(_Action(time.time() + delay_s, label, fn, self.fault_index))


def restarts_ranks(sc: Scenario) -> bool:
    """Whether a run of `sc` may start new ranks after its first attempt (and so keeps warm spares)."""
    return sc.recovery.mode != "none" and sc.recovery.max_restarts > 0


@dataclass
class Supervisor:
    scenario: Scenario
    run_dir: Path
    run_id: str
    metrics: Any = None                                   # burnin.reports.metrics.Metrics or None
    on_event: Callable[[dict[str, Any]], None] | None = None
    golden: bool = False                                  # a fault-free reference run
    fabric: Any = None                                    # LocalFabric unless the run needs a network
    extra_spec: Callable[[], dict[str, Any]] | None = None  # more for the ranks' spec, asked at each attempt
    python: str = sys.executable
    pool: SparePool | None = None                         # a pool that outlives this run (a campaign's)
    clock: Any = None                                     # a burn-in's clock (burnin.harness.burn_in.Clock)
    log_steps: bool = True                                # False: step_done stays out of events.jsonl
    first_attempt: int = 0                                # a resumed burn-in numbers its attempts on
    fired: set[int] = field(default_factory=set)          # faults fired before (a resumed burn-in's)
    resume_from: Any = None                               # another run's checkpoint it starts from (resume_from.Source)
    _log: EventWriter = field(init=False)
    _fired: set[int] = field(init=False, default_factory=set)
    _explained: set[int] = field(init=False, default_factory=set)
    _first_injected: dict[int, float] = field(init=False, default_factory=dict)  # fault -> first injection
    _fired_now: dict[int, float] = field(init=False, default_factory=dict)  # this attempt: fault -> time
    _detections: list[dict[str, Any]] = field(init=False, default_factory=list)  # this attempt's findings
    _fault_errors: list[dict[str, Any]] = field(init=False, default_factory=list)
    #: A rank said the loop or the scenario misuses burnin (a UserError: a fault at a point the loop's model
    #: does not have, asynchronous saves of a model that is not sharded): a restart would say it again.
    usage_error: str | None = field(init=False, default=None)
    _tails: dict[int, Tail] = field(init=False, default_factory=dict)
    _actions: list[_Action] = field(init=False, default_factory=list)
    _pool: SparePool | None = field(init=False, default=None)
    _refilled: float = field(init=False, default=0.0)
    _refill_due: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "ranks").mkdir(exist_ok=True)
        self._log = EventWriter(self.run_dir / "events.jsonl")
        self._faults = [f.build() for f in self.scenario.faults]
        self._fired.update(self.fired)
        if self.fabric is None:
            self.fabric = LocalFabric()
        self._watch = NetworkWatch(self.scenario.faults, self._faults, self.fabric, self._fired, self._emit)

    # -- public ----------------------------------------------------------------------------

    def run(self) -> bool:
        """Run the scenario to the end or until recovery gives up. True when the last step completed."""
        sc = self.scenario
        self._emit("run_started", scenario=sc.name, run_id=self.run_id, golden=self.golden,
                   ranks=sc.workload.ranks, steps=sc.workload.steps, pid=os.getpid(),
                   scenario_json=sc.model_dump(mode="json"))
        if self.resume_from is not None:
            self._emit("resume_from", **self.resume_from.event())
        deadline = time.time() + sc.timeouts.run_s
        attempt, restarts = self.first_attempt, 0
        finished = False
        # memory snapshots (burnin/rank/snapshot.py): one directory in shared memory per run, kept
        # across attempts so a restarted group resumes from it; golden runs and campaigns keep none
        self.snapshot_dir = (snapshot.create_dir(self.run_id)
                             if sc.checkpoint.memory_every > 0 and not self.golden and sc.campaign is None else None)
        if self.snapshot_dir is not None:
            snapshot.sweep()  # what SIGKILLed supervisors left in shared memory (never a live run's)
        try:
            fabric = self.fabric.setup(sc.workload.ranks)
            if fabric:
                self._emit("fabric_ready", **fabric)
            self._pool = self.pool if self.pool is not None else self._spare_pool()
            if self.pool is not None:  # a pool that outlives this run: what it holds, and its events from now
                self.pool.emit = self._emit
                self._emit("pool_borrowed", zygotes={str(z.slot): z.proc.pid for z in self.pool.zygotes.values()},
                           spares=len(self.pool.spares), shared=self.pool.shared)
            while True:
                ok, evidence = self._attempt(attempt, deadline)
                if ok:
                    finished = True
                    break
                if evidence is not None and evidence.detector == "run_timeout":
                    break
                if self.usage_error is not None:
                    self._emit("recovery_abandoned", reason=f"bad input, found by a rank: {self.usage_error}")
                    break
                if self._fault_errors:  # a harness error: restarting would only hide it
                    self._emit("recovery_abandoned", reason="a fault could not be applied",
                               faults=[e["fault_index"] for e in self._fault_errors])
                    break
                if sc.recovery.mode == "none" or restarts >= sc.recovery.max_restarts:
                    self._emit("recovery_exhausted", restarts=restarts, max_restarts=sc.recovery.max_restarts)
                    break
                restarts += 1
                attempt += 1
                self._emit("restart", attempt=attempt)
                self._settle(deadline)
        finally:
            snapshot.remove_dir(self.snapshot_dir)  # memory snapshots: the run's directory goes with it
            try:
                self._run_actions(force=True)
            finally:
                if self._pool is not None and self.pool is None:  # spares first: one may live in the
                    self._pool.close()                              # fabric's namespaces
                self._register([])
                self.fabric.teardown()
                self._emit("run_finished", finished=finished, restarts=restarts)
            self._log.close()
        return finished

    # -- one attempt -----------------------------------------------------------------------

    def _attempt(self, attempt: int, deadline: float) -> tuple[bool, Evidence | None]:
        ranks = self._spawn(attempt)
        started = time.time()
        last_progress = started
        first_sign: float | None = None
        evidence: list[Evidence] = []
        try:
            while True:
                now = time.time()
                # every rank gone before this round's drain: its last words and exits are all read below
                all_gone = all(r.proc.poll() is not None for r in ranks)
                self._run_actions()
                self._watch.poll()
                progressed = self._drain(ranks)
                if progressed:
                    last_progress = now
                    self._refill(ranks)
                if self.clock is not None:
                    self.clock.poll(self, ranks, now)
                evidence += self._check(ranks, now, started, last_progress, deadline, evidence)
                if all(r.finished and r.proc.poll() == 0 for r in ranks):
                    return True, None
                if evidence and first_sign is None:
                    first_sign = now
                # The grace ends early once no rank is left to say more: every process has exited.
                if first_sign is not None and (now - first_sign >= GRACE_S or all_gone or
                                               any(e.detector in ("run_timeout", "fault_error") for e in evidence)):
                    break
                time.sleep(POLL_S)
            evidence += self._stopped(ranks, time.time())
            # Of the ranks' own errors, a connection error comes after any other: it is what a peer's exception
            # leaves on the ranks that were waiting for it (which rank's process exits first, and so is seen
            # first, is a race: under load the peer's can win).
            evidence.sort(key=lambda e: (_priority(e), e.detector == "rank_error" and e.cause == "network", e.time))
            self._failure(attempt, evidence, ranks)
            return False, evidence[0]
        finally:
            self._teardown(ranks, attempt)

    def _spawn(self, attempt: int) -> list[_Rank]:
        sc = self.scenario
        n = sc.workload.ranks
        spec = {
            "scenario": sc.model_dump(mode="json"),
            "run_dir": str(self.run_dir),
            "checkpoint_dir": str(self.checkpoint_dir),
            "attempt": attempt,
            "fired": sorted(self._fired),
            "heartbeat_period_s": HEARTBEAT_PERIOD_S,
            # memory snapshots (burnin/rank/snapshot.py): the run's directory in shared memory, or None
            "snapshot_dir": str(self.snapshot_dir) if getattr(self, "snapshot_dir", None) else None,
        }
        if self.resume_from is not None:
            spec["resume_from"] = self.resume_from.spec()
        if self.extra_spec is not None:
            spec.update(self.extra_spec())
        if self.clock is not None:
            spec.update(self.clock.spec())
        spec_path = self.run_dir / "ranks" / "spec.json"
        spec_path.write_text(json.dumps(spec))
        self._fired_now, self._detections = {}, []
        port = _free_port()
        self._emit("attempt_started", attempt=attempt, master_port=port)
        ranks = []
        for r in range(n):
            mine = {
                "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
                "GROUP_RANK": "0", "ROLE_RANK": str(r), "MASTER_ADDR": self.fabric.master_addr, "MASTER_PORT": str(port),
                "TORCHELASTIC_RESTART_COUNT": str(attempt), "BURNIN_SPEC": str(spec_path),
            }
            hb = self.run_dir / "ranks" / f"rank{r}.heartbeat"
            hb.unlink(missing_ok=True)
            log_path = self.run_dir / "ranks" / f"rank{r}.log"
            with open(log_path, "ab") as log:
                log.write(f"--- attempt {attempt} ---\n".encode())
            proc = self._from_pool(r, attempt, mine, log_path)
            if proc is None:
                argv = self.fabric.rank_command(r, [self.python, "-m", "burnin.rank.worker"])
                with open(log_path, "ab") as log:
                    proc = subprocess.Popen(argv, env={**self._base_env(), **self.fabric.rank_env(r), **mine},
                                            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            # One tail per rank for the whole run: a new attempt appends to the same stream.
            # A resumed campaign reuses its run directory: what the streams hold is an earlier session's.
            tail = self._tails.setdefault(r, Tail(self.run_dir / "ranks" / f"rank{r}.jsonl", from_end=True))
            ranks.append(_Rank(r, proc, tail, hb))
        # The pool's replacements: at once for a run's first attempt; for a restart, once every new rank has
        # completed a step (forks are cheap, but four of a 380 MiB process still cost 0.1 s of CPU that the
        # restart's critical path would share on a small machine: measured with 4 ranks on 2 cores).
        spares = self._pool is not None and self._keeps_spares()
        if spares and attempt == self.first_attempt:
            self._pool.fill(range(n))
        self._refill_due = spares and attempt != self.first_attempt
        self._register([r.proc.pid for r in ranks])
        return ranks

    # -- warm spares -----------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        return rank_base_env(self.scenario, self.run_id)

    def _spare_pool(self) -> SparePool | None:
        """One warm spare per rank, when the run can restart (`recovery.spares`, default: where memory allows);
        with `burnin pool serve` (BURNIN_POOL), for every run: its ranks cost a fork, not a start-up."""
        sc = self.scenario
        if (not restarts_ranks(sc) or self.golden) and server_path() is None:
            return None
        pool, why = open_pool(sc, self.run_dir, self.run_id, self.fabric, self._emit, self.python)
        if pool is None and sc.recovery.spares is not False:
            self._emit("spares_off", reason=why)
        return pool

    def _keeps_spares(self) -> bool:
        """Whether spares wait beside the ranks: a run that never restarts ranks only forks them (from the
        pool server's zygote, which it joined for that)."""
        return self.pool is not None or (restarts_ranks(self.scenario) and not self.golden)

    def _from_pool(self, rank: int, attempt: int, env: dict[str, str], log: Path) -> Any:
        """A warm spare made rank `rank` of `attempt`, or None (then the rank starts cold), said in an event."""
        if self._pool is None:
            return None
        proc, info = self._pool.take(rank)
        if proc is None:
            self._emit("spare_missing", rank=rank, attempt=attempt, **info)
            return None
        self._pool.assign(proc, rank, attempt, env, log)
        self._emit("spare_used", rank=rank, attempt=attempt, **info)
        return proc

    def _refill(self, ranks: list[_Rank]) -> None:
        """Once a second while the attempt trains: keep the pool full (a spare or a zygote that died is
        replaced: a fork is cheap, a zygote's warm-up is not, and it happens off the critical path), and
        update the gauges of the memory tier and the pool."""
        now = time.time()
        if self._refill_due:
            if not all(r.last_step is not None for r in ranks):
                return
            self._refill_due, self._refilled = False, 0.0  # the restarted attempt trains: refill now
        if now - self._refilled < 1.0:
            return
        self._refilled = now
        if self.metrics is not None and self.snapshot_dir is not None:
            self.metrics.memory_tier(snapshot.status(self.snapshot_dir, self.scenario.workload.ranks))
        if self._pool is None:
            return
        if self.metrics is not None:
            self.metrics.spares_ready.set(self._pool.ready_count())
        if not self._keeps_spares():
            return
        before = self._pool.pids()
        self._pool.fill(range(self.scenario.workload.ranks))
        if self._pool.pids() != before:
            self._register([r.proc.pid for r in ranks])

    def _register(self, rank_pids: list[int]) -> None:
        """What `burnin cleanup` must find if this supervisor dies: the attempt's ranks and the spares."""
        pids = rank_pids + (self._pool.pids() if self._pool is not None and not self._pool.closed else [])
        if pids:
            cleanup.register(self.run_id, self.run_dir, pids)
        else:
            cleanup.unregister(self.run_id)

    def _drain(self, ranks: list[_Rank]) -> bool:
        """Copy new rank events into the log and act on them. True when any arrived."""
        got = False
        for r in ranks:
            for ev in r.tail.read():
                got = True
                # Without step events in the log (a burn-in), each rank's first step of an attempt is still
                # there: the recovery breakdown ends with it.
                if self.log_steps or ev.get("event") != "step_done" or r.last_step is None:
                    self._log.write(ev)
                self._handle(r, ev)
                self._publish(ev)
        return got

    def _handle(self, r: _Rank, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "step_done":
            r.last_step = ev["step"]
            self._watch.step_done(ev)
        elif kind == "pg_ready":
            r.pg_ready = True
        elif kind == "rank_finished":
            r.finished = True
        elif kind == "rank_error":
            r.error = ev
            if ev.get("error_type") == "UserError" and self.usage_error is None:
                self.usage_error = str(ev.get("message", "")).splitlines()[0] if ev.get("message") else "UserError"
        elif kind == "fault_injected":
            self._injected(ev)
        elif kind == "fault_error":
            self._fault_errors.append(ev)
        elif kind == "detection":
            self._detections.append(ev)
        elif kind == "fault_point":
            self._out_of_rank(r, ev)

    def _injected(self, ev: dict[str, Any]) -> None:
        index = ev["fault_index"]
        self._fired.add(index)
        self._fired_now[index] = ev["t"]
        self._first_injected.setdefault(index, ev["t"])

    def _out_of_rank(self, r: _Rank, ev: dict[str, Any]) -> None:
        index = ev["fault_index"]
        fault = self._faults[index]
        ctx = OutOfRankContext(r.rank, ev["step"], ev["point"], r.proc.pid, self.run_dir, self.checkpoint_dir,
                               self.fabric, index, self._actions)
        self._injected(self._emit("fault_injected", fault_index=index, fault=fault.name, rank=r.rank,
                                  step=ev["step"], point=ev["point"], where="out_of_rank",
                                  simulated=fault.simulated, attempt=ev.get("attempt")))
        try:
            details = fault.inject(ctx) or {}
        except Exception as exc:  # the fault could not be applied: a harness error, never an outcome
            self._fault_errors.append(self._emit("fault_error", fault_index=index, fault=fault.name, rank=r.rank,
                                                 step=ev["step"], error=f"{type(exc).__name__}: {exc}"[:2000]))
            return  # the rank waits for a go that never comes; the attempt ends on the error
        self._emit("fault_applied", fault_index=index, details=details)
        try:
            r.proc.stdin.write(b"go\n")
            r.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the fault killed it: nobody is listening

    def fire_now(self, r: _Rank, index: int) -> dict[str, Any] | None:
        """Fire out-of-rank fault `index` on rank `r` at this instant, wherever the rank is (a burn-in's timed
        fault: in the middle of a step, say); the step and the last point it passed are read from the rank's
        position file and recorded. Returns the `fault_injected` event, None when the fault failed to apply."""

        fault = self._faults[index]
        where = read_position(str(self.run_dir / "ranks" / f"rank{r.rank}.pos"))
        step, point = where if where is not None else ((r.last_step or -1) + 1, "before_forward")
        ctx = OutOfRankContext(r.rank, step, point, r.proc.pid, self.run_dir, self.checkpoint_dir,
                               self.fabric, index, self._actions)
        ev = self._emit("fault_injected", fault_index=index, fault=fault.name, rank=r.rank, step=step, point=point,
                        where="out_of_rank", simulated=fault.simulated, timed=True)
        self._injected(ev)
        try:
            details = fault.inject(ctx) or {}
        except Exception as exc:  # the fault could not be applied: a harness error, never an outcome
            self._fault_errors.append(self._emit("fault_error", fault_index=index, fault=fault.name, rank=r.rank,
                                                 step=step, error=f"{type(exc).__name__}: {exc}"[:2000]))
            return None
        self._emit("fault_applied", fault_index=index, details=details)
        return ev

    def _check(self, ranks: list[_Rank], now: float, started: float, last_progress: float,
               deadline: float, seen: list[Evidence]) -> list[Evidence]:
        """New evidence of failure, at most one item per rank and detector."""
        t = self.scenario.timeouts
        have = {(e.detector, e.rank) for e in seen}
        new: list[Evidence] = []

        def add(detector: str, rank: int | None, cause: str, detail: str) -> None:
            # stamped when seen, not with the round's start: a fault applied earlier in this round (a kill
            # at a rank's step point, while its events were drained) must not look detected before it was
            # injected (it did once: a detection 0.2 ms before the kill)
            if (detector, rank) not in have:
                new.append(Evidence(detector, rank, cause, detail, time.time()))
                have.add((detector, rank))

        for err in self._fault_errors:
            add("fault_error", err.get("rank"), "harness",
                f"fault[{err['fault_index']}] {err['fault']} could not be applied: {err['error']}")

        for r in ranks:
            rc = r.proc.poll()
            if rc is not None and rc != 0:
                if r.error is not None:
                    add("rank_error", r.rank, classify_error(r.error["error_type"], r.error["message"]),
                        f"{r.error['error_type']}: {r.error['message']}")
                elif rc < 0:
                    add("exit_signal", r.rank, *classify_exit(rc))
                else:
                    add("exit_code", r.rank, *classify_exit(rc))
            elif rc == 0 and not r.finished:
                add("exit_code", r.rank, "exit", "exit code 0 before the last step")
            elif rc is None and not r.finished:
                # A finished rank is exiting: the heartbeat thread freezes while the interpreter shuts
                # down (2-3 s with a process group and DDP, more on a busy machine); the step watchdog
                # still bounds an exit that never ends.
                try:
                    age = now - r.heartbeat.stat().st_mtime
                except FileNotFoundError:
                    age = None  # not started yet: the connect watchdog covers it
                if age is not None and age > t.heartbeat_s:
                    add("heartbeat", r.rank, "hang", f"no heartbeat for {age:.1f} s")
        if not all(r.pg_ready for r in ranks) and now - started > t.connect_s:
            late = [r.rank for r in ranks if not r.pg_ready]
            add("connect_timeout", None, "timeout", f"ranks {late} did not join the group within {t.connect_s:g} s")
        elif all(r.pg_ready for r in ranks) and now - last_progress > t.step_s:
            add("step_timeout", None, "hang", f"no progress for {now - last_progress:.1f} s")
        if now > deadline:
            add("run_timeout", None, "timeout", f"the run exceeded timeouts.run_s={t.run_s:g}")
        return new

    def _stopped(self, ranks: list[_Rank], now: float) -> list[Evidence]:
        """Ranks frozen by a signal (state T) when the failure is certain: a SIGSTOP that landed with
        another fault is seen here, long before its heartbeat goes stale."""
        found = []
        for r in ranks:
            if r.proc.poll() is None and procs.proc_state(r.proc.pid) in ("T", "t"):
                found.append(Evidence("stopped", r.rank, "hang", "process stopped (state T)", now))
        return found

    def _failure(self, attempt: int, evidence: list[Evidence], ranks: list[_Rank]) -> None:
        root = evidence[0]
        last = [r.last_step for r in ranks]
        primary, explained = self._attribute(evidence)
        self._emit("failure_detected", attempt=attempt, detected_at=root.time, cause=root.cause, rank=root.rank,
                   detector=root.detector, detail=root.detail[:500], signature=signature(root.cause, root.detail),
                   fault_index=primary, fault_indices=explained,
                   evidence=[{"detector": e.detector, "rank": e.rank, "cause": e.cause, "detail": e.detail[:200]}
                             for e in evidence[:16]],
                   last_step=min((s for s in last if s is not None), default=None),
                   max_step=max((s for s in last if s is not None), default=None))

    def _attribute(self, evidence: list[Evidence]) -> tuple[int | None, list[int]]:
        """Every injected fault whose effect this failure's evidence shows (attribution.py says the rule)."""
        if evidence[0].detector == "fault_error":
            return None, []  # a harness error: no fault brought the group down
        specs, t = self.scenario.faults, self.scenario.timeouts
        fired = {**{i: self._first_injected[i] for i in self._fired
                    if self._faults[i].recurring and i in self._first_injected}, **self._fired_now}
        candidates = [Candidate(i, specs[i].step, specs[i].rank, self._faults[i].effects,
                                self._faults[i].effect_scope, at, self._faults[i].effect_window_s(t))
                      for i, at in fired.items() if i not in self._explained or self._faults[i].recurring]
        ranks = [f.rank for f in specs]
        scoped = [f.effect_scope == "detector" for f in self._faults]
        pinned = {pin_detection(d, self._first_injected, ranks, scoped) for d in self._detections}
        primary, explained = explained_by(evidence, candidates, pinned - {None})
        self._explained.update(explained)
        return primary, explained

    def _teardown(self, ranks: list[_Rank], attempt: int) -> None:
        """SIGKILL every process group of the attempt that is still there; wait for all to go."""
        for r in ranks:
            if r.proc.poll() is None:
                procs.kill_group(r.proc.pid)
        for r in ranks:
            try:
                r.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # only a process in uninterruptible sleep gets here
                procs.kill_group(r.proc.pid)
            if r.proc.stdin:
                try:
                    r.proc.stdin.close()
                except OSError:
                    pass
        self._drain(ranks)  # the last words of the dying
        for path in (self.run_dir / "ranks").glob(f"assign-a{attempt}-r*.json"):
            path.unlink(missing_ok=True)  # read by the spares when they became ranks
        exits = {r.rank: r.proc.returncode for r in ranks}
        self._register([])
        self._emit("teardown_done", attempt=attempt, exits=exits)

    def _settle(self, deadline: float) -> None:
        """Before a restart, wait for the undo actions due soon (a link coming back up): a group
        restarted onto a link that is still down would only fail its rendezvous again. Waits for
        those due within `timeouts.connect_s`, no longer; the wait counts in the restart phase."""
        now = time.time()
        waiting = [a for a in self._actions if a.due <= min(now + self.scenario.timeouts.connect_s, deadline)]
        if not waiting:
            return
        until = max(a.due for a in waiting)
        self._emit("restart_delayed", seconds=max(0.0, until - now), actions=[a.label for a in waiting])
        while time.time() < until and any(a in self._actions for a in waiting):
            self._run_actions()
            time.sleep(POLL_S * 5)
        self._run_actions()

    def _run_actions(self, force: bool = False) -> None:
        """Run the scheduled actions that are due (all of them with `force`), each once."""
        now = time.time()
        due = [a for a in self._actions if force or a.due <= now]
        self._actions = [a for a in self._actions if a not in due]
        for a in sorted(due, key=lambda a: a.due):
            try:
                details = a.fn() or {}
                self._emit("fault_action", fault_index=a.fault_index, action=a.label, late_s=now - a.due,
                           details=details)
            except Exception as exc:  # an undo that fails must be seen, and must not stop the others
                self._emit("fault_action_failed", fault_index=a.fault_index, action=a.label,
                           error=f"{type(exc).__name__}: {exc}")

    def _emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = self._log.emit(event, source="supervisor", **fields)
        self._publish(record)
        return record

    def _publish(self, ev: dict[str, Any]) -> None:
        if self.metrics:
            self.metrics.observe(ev)
        if self.on_event:
            self.on_event(ev)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
