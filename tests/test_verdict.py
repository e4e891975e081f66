"""Tests of the verdict: from an event log and a golden record to one outcome per fault.

The event logs are written out by hand, event by event, as the supervisor and the ranks would write
them: the verdict is a pure function of them, and each case here pins one of its rules.
"""

from __future__ import annotations

from typing import Any

import pytest

from burnin.harness.golden import GoldenRecord
from burnin.reports.verdict import judge
from burnin.scenarios.schema import Scenario

STEPS = 10
RANKS = 2
GOLDEN_HASH = "a" * 64
OTHER_HASH = "b" * 64


def _bits(step: int, rank: int) -> str:
    return f"{0x40000000 + 1000 * step + rank:08x}"


GOLDEN = GoldenRecord(key="k", state_hash=GOLDEN_HASH,
                      loss_bits={str(r): {str(s): _bits(s, r) for s in range(STEPS)} for r in range(RANKS)},
                      checkpoint_hashes={}, final_loss=2.0, loss_floor=1.5, wall_s=3.0)


def _scenario(*faults: dict[str, Any], **expect: Any) -> Scenario:
    return Scenario.model_validate({"name": "verdict-test", "workload": {"ranks": RANKS, "steps": STEPS},
                                    "checkpoint": {"every": 3}, "faults": list(faults), "expect": expect})


class Log:
    """An event log written in time order, 10 ms apart."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.events: list[dict[str, Any]] = []

    def add(self, event: str, **fields: Any) -> dict[str, Any]:
        self.t += 0.01
        ev = {"t": round(self.t, 2), "event": event, **fields}
        self.events.append(ev)
        return ev

    def start(self) -> None:
        self.add("run_started", source="supervisor", ranks=RANKS, steps=STEPS)

    def attempt(self, attempt: int, from_step: int | None) -> None:
        if attempt:
            self.add("restart", source="supervisor", attempt=attempt)
        self.add("attempt_started", source="supervisor", attempt=attempt)
        for r in range(RANKS):
            self.add("pg_ready", rank=r, attempt=attempt)
        for r in range(RANKS):
            self.add("resumed", rank=r, attempt=attempt, from_step=from_step, loss_floor=1.5)

    def steps(self, attempt: int, steps: range, bits=_bits) -> None:
        for s in steps:
            for r in range(RANKS):
                self.add("step_done", rank=r, attempt=attempt, step=s, loss=2.0 - s / 100, loss_bits=bits(s, r))

    def finish(self, attempt: int, hashes: tuple[str, ...] = (GOLDEN_HASH, GOLDEN_HASH)) -> None:
        for r, h in enumerate(hashes):
            self.add("rank_finished", rank=r, attempt=attempt, state_hash=h)
        self.add("teardown_done", source="supervisor", attempt=attempt, exits={"0": 0, "1": 0})
        self.add("run_finished", source="supervisor", finished=True, restarts=attempt)

    def injected(self, index: int, fault: str, rank: int, step: int, simulated: bool = False,
                 details: dict | None = None) -> dict[str, Any]:
        ev = self.add("fault_injected", fault_index=index, fault=fault, rank=rank, step=step, simulated=simulated)
        if details is not None:
            self.add("fault_applied", fault_index=index, details=details)
        return ev

    def failure(self, attempt: int, fault_index: int | None, *, cause: str = "killed", rank: int | None = 1,
                detector: str = "exit_signal", detail: str = "SIGKILL", max_step: int | None = None) -> dict:
        ev = self.add("failure_detected", source="supervisor", attempt=attempt, detected_at=self.t + 0.005,
                      cause=cause, rank=rank, detector=detector, detail=detail, signature=f"{cause}: {detail}",
                      fault_index=fault_index, last_step=max_step, max_step=max_step)
        self.add("teardown_done", source="supervisor", attempt=attempt, exits={"0": -9, "1": -9})
        return ev

    def give_up(self, attempt: int) -> None:
        self.add("recovery_exhausted", source="supervisor", restarts=attempt, max_restarts=attempt)
        self.add("run_finished", source="supervisor", finished=False, restarts=attempt)


def _judge(log: Log, scenario: Scenario, golden: GoldenRecord | None = GOLDEN, error: str | None = None):
    return judge(log.events, scenario, golden, run_id="r1", run_dir="/tmp/r1", config_hash="k", error=error)


def _expectation(result, name: str):
    return next(e for e in result.expectations if e.name == name)


KILL = {"fault": "process.kill", "rank": 1, "step": 4, "expect": "recovered"}
STRAGGLER = {"fault": "process.straggler", "rank": 0, "step": 4, "expect": ["masked"]}
FLIP = {"fault": "corruption.bitflip", "rank": 0, "step": 4, "params": {"target": "param"}, "expect": ["masked"]}


def _kill_and_restart(log: Log, *, final: tuple[str, str] = (GOLDEN_HASH, GOLDEN_HASH), bits=_bits) -> None:
    """A kill of rank 1 at step 4, detected, restarted from the checkpoint at step 3, run to the end."""
    log.start()
    log.attempt(0, None)
    log.steps(0, range(0, 5))
    log.injected(0, "process.kill", rank=1, step=4)
    log.failure(0, fault_index=0, max_step=4)
    log.attempt(1, 3)
    log.steps(1, range(3, STEPS), bits)
    log.finish(1, final)


# -- the outcomes table ------------------------------------------------------------------------------


@pytest.mark.parametrize("detected, exact, outcome", [
    (True, True, "recovered"),
    (False, True, "masked"),
    (True, False, "detected"),
    (False, False, "sdc"),
])
def test_outcome_of_a_finished_run(detected: bool, exact: bool, outcome: str) -> None:
    final = (GOLDEN_HASH,) * 2 if exact else (OTHER_HASH,) * 2
    log = Log()
    if detected:
        _kill_and_restart(log, final=final)
        sc = _scenario(KILL)
    else:
        log.start()
        log.attempt(0, None)
        log.steps(0, range(0, 4))
        log.injected(0, "corruption.bitflip", rank=0, step=4)
        log.steps(0, range(4, STEPS))
        log.finish(0, final)
        sc = _scenario(FLIP)
    r = _judge(log, sc)
    assert r.finished and r.exact is exact
    [f] = r.faults
    assert f.injected and f.outcome == outcome
    assert (f.detected_by is not None) is detected
    assert _expectation(r, f"fault[0] {f.fault}@rank{f.rank}:step4").ok is (outcome in f.expected)
    assert _expectation(r, "final state equals golden").ok is exact
    assert r.ok is (outcome == f.expected[0])


@pytest.mark.parametrize("detected", [True, False])
def test_a_run_that_does_not_finish_fails_its_faults(detected: bool) -> None:
    log = Log()
    log.start()
    log.attempt(0, None)
    log.steps(0, range(0, 5))
    log.injected(0, "process.kill", rank=1, step=4)
    if detected:
        log.failure(0, fault_index=0, max_step=4)
    log.give_up(0)
    r = _judge(log, _scenario(KILL))
    assert not r.finished and not r.exact
    assert r.faults[0].outcome == "failed"
    assert (r.faults[0].detected_by == "exit_signal") is detected
    finish = _expectation(r, "run finishes")
    assert not finish.ok and finish.message == f"completed step 4 of {STEPS - 1}"
    assert not r.ok


def test_a_fault_that_never_fired_fails() -> None:
    log = Log()
    log.start()
    log.attempt(0, None)
    log.steps(0, range(STEPS))
    log.finish(0)
    r = _judge(log, _scenario(KILL))
    assert r.finished and r.exact
    [f] = r.faults
    assert not f.injected and f.outcome == "failed"
    assert "the fault never fired" in _expectation(r, "fault[0] process.kill@rank1:step4").message
    assert not r.ok


def test_recovered_kill_has_a_recovery_breakdown() -> None:
    log = Log()
    _kill_and_restart(log)
    r = _judge(log, _scenario(KILL))
    [f] = r.faults
    assert f.outcome == "recovered" and f.ok
    assert (f.detected_by, f.cause) == ("exit_signal", "killed")
    injected = next(e for e in log.events if e["event"] == "fault_injected")
    failure = next(e for e in log.events if e["event"] == "failure_detected")
    assert f.injected_at == injected["t"]
    assert f.detection_latency_s == pytest.approx(failure["detected_at"] - injected["t"])
    rec = f.recovery
    assert rec is not None and rec.resumed_from_step == 3
    parts = [rec.detection_s, rec.teardown_s, rec.restart_s, rec.checkpoint_load_s, rec.first_step_s]
    assert all(p > 0 for p in parts)
    first_steps = [e["t"] for e in log.events if e["event"] == "step_done" and e["attempt"] == 1 and e["step"] == 3]
    assert rec.total_s == pytest.approx(max(first_steps) - injected["t"])
    assert f.lost_steps == 2  # steps 3 and 4 ran twice
    assert r.restarts == 1
    assert r.steps_executed == 5 + (STEPS - 3)
    assert r.final_step == STEPS - 1
    assert r.final_state_hash == r.golden_state_hash == GOLDEN_HASH
    assert r.diverged_at_step is None
    assert r.loss_floor == 1.5 and r.final_loss == pytest.approx(2.0 - (STEPS - 1) / 100)
    assert [(x.attempt, x.signature, x.fault_index) for x in r.failures] == [(0, "killed: SIGKILL", 0)]
    assert r.ok


# -- failures that no fault explains -------------------------------------------------------------------


def test_an_unexplained_failure_fails_its_expectation() -> None:
    log = Log()
    log.start()
    log.attempt(0, None)
    log.steps(0, range(0, 6))
    log.failure(0, fault_index=None, cause="network", rank=0, detector="rank_error",
                detail="RuntimeError: Connection closed by peer", max_step=5)
    log.attempt(1, 6)
    log.steps(1, range(6, STEPS))
    log.finish(1)
    r = _judge(log, _scenario())
    assert r.finished and r.exact and r.faults == []
    unexplained = _expectation(r, "no unexplained failures")
    assert not unexplained.ok
    assert unexplained.message == "attempt 0: network: RuntimeError: Connection closed by peer"
    assert not r.ok


def test_a_failure_attributed_to_a_fault_is_explained() -> None:
    log = Log()
    _kill_and_restart(log)
    r = _judge(log, _scenario(KILL))
    explained = _expectation(r, "no unexplained failures")
    assert explained.ok and explained.message == "none"


# -- exactness and divergence -------------------------------------------------------------------------


def test_replicas_that_disagree_are_not_exact() -> None:
    log = Log()
    _kill_and_restart(log, final=(GOLDEN_HASH, OTHER_HASH))  # rank 0 alone matches the golden run
    r = _judge(log, _scenario(KILL))
    assert r.final_state_hash == GOLDEN_HASH and not r.exact
    assert r.faults[0].outcome == "detected"
    ex = _expectation(r, "final state equals golden")
    assert not ex.ok and "replicas disagree" in ex.message


def test_a_stale_finish_from_an_earlier_attempt_does_not_count() -> None:
    # Rank 0 finished attempt 0 with a wrong state; attempt 1 redid the end and got it right.
    log = Log()
    log.start()
    log.attempt(0, None)
    log.steps(0, range(STEPS))
    log.add("rank_finished", rank=0, attempt=0, state_hash=OTHER_HASH)
    log.failure(0, fault_index=None, cause="exit", rank=1, detector="exit_code", detail="exit code 1",
                max_step=STEPS - 1)
    log.attempt(1, 9)
    log.steps(1, range(9, STEPS))
    log.finish(1)
    r = _judge(log, _scenario())
    assert r.exact and r.final_state_hash == GOLDEN_HASH


def test_diverged_at_step_is_the_first_differing_step() -> None:
    def bits(step: int, rank: int) -> str:
        if (rank == 1 and step >= 6) or (rank == 0 and step >= 8):
            return "7fc00000"
        return _bits(step, rank)

    log = Log()
    _kill_and_restart(log, final=(OTHER_HASH, OTHER_HASH), bits=bits)
    r = _judge(log, _scenario(KILL))
    assert r.diverged_at_step == 6
    assert not r.exact and r.faults[0].outcome == "detected"
    ex = _expectation(r, "final state equals golden")
    assert not ex.ok and ex.message.endswith("loss bits first differ at step 6")


def test_the_last_execution_of_a_step_counts() -> None:
    # Step 4 went wrong before the kill; the replay after the restart is right again.
    def bad_before_kill(step: int, rank: int) -> str:
        return "7fc00000" if step == 4 else _bits(step, rank)

    log = Log()
    log.start()
    log.attempt(0, None)
    log.steps(0, range(0, 5), bad_before_kill)
    log.injected(0, "process.kill", rank=1, step=4)
    log.failure(0, fault_index=0, max_step=4)
    log.attempt(1, 3)
    log.steps(1, range(3, STEPS))
    log.finish(1)
    r = _judge(log, _scenario(KILL))
    assert r.diverged_at_step is None and r.exact and r.faults[0].outcome == "recovered"


def test_without_a_golden_record_nothing_is_exact() -> None:
    log = Log()
    _kill_and_restart(log)
    r = _judge(log, _scenario(KILL), golden=None)
    assert not r.exact and r.golden_state_hash is None and r.diverged_at_step is None
    assert r.faults[0].outcome == "detected"


# -- checkpoint damage, detected by a checksum on resume ---------------------------------------------


def test_damaged_checkpoint_is_detected_when_a_resume_rejects_it() -> None:
    sc = _scenario({"fault": "storage.checkpoint_corrupt", "step": 7, "params": {"mode": "truncate"},
                    "expect": "recovered"},
                   {"fault": "process.kill", "rank": 1, "step": 8, "expect": "recovered"})
    log = Log()
    log.start()
    log.attempt(0, None)
    log.steps(0, range(0, 8))
    inj = log.injected(0, "storage.checkpoint_corrupt", rank=0, step=7,
                       details={"checkpoint_step": 6, "file": "model.pt", "mode": "truncate"})
    log.steps(0, range(8, 9))
    log.injected(1, "process.kill", rank=1, step=8)
    log.failure(0, fault_index=1, max_step=8)
    log.add("restart", source="supervisor", attempt=1)
    log.add("attempt_started", source="supervisor", attempt=1)
    for rank in range(RANKS):
        log.add("pg_ready", rank=rank, attempt=1)
    reject = log.add("checkpoint_rejected", rank=0, attempt=1, checkpoint_step=6,
                     reason="model.pt is 100 bytes, the manifest says 200 (truncated)")
    for rank in range(RANKS):
        log.add("resumed", rank=rank, attempt=1, from_step=3, loss_floor=1.5)
    log.steps(1, range(3, STEPS))
    log.finish(1)
    r = _judge(log, sc)
    storage, kill = r.faults
    assert storage.outcome == "recovered" and kill.outcome == "recovered"
    assert storage.detected_by == "checkpoint_checksum" and "truncated" in storage.cause
    assert storage.detection_latency_s == pytest.approx(reject["t"] - inj["t"])
    assert storage.lost_steps == 3  # resumed from 3 instead of 6
    assert storage.details["checkpoint_step"] == 6
    assert kill.recovery is not None and kill.recovery.resumed_from_step == 3
    assert r.ok


def test_damaged_snapshots_are_detected_when_a_resume_rejects_them() -> None:
    """Rank 1's snapshots of 7 and 8 damaged, then it is killed: the resume rejects them (rank 1 reports
    its own slots; a header too damaged to name its step still names its file) and loads the checkpoint
    of 6: the fallback cost 8 - 6 steps."""
    sc = _scenario({"fault": "storage.snapshot_corrupt", "rank": 1, "step": 7, "params": {"slots": "both"},
                    "expect": "recovered"},
                   {"fault": "process.kill", "rank": 1, "step": 7, "expect": "recovered"})
    log = Log()
    log.start()
    log.attempt(0, None)
    log.steps(0, range(0, 8))
    inj = log.injected(0, "storage.snapshot_corrupt", rank=1, step=7,
                       details={"snapshot_step": 8, "snapshot_steps": [8, 7], "files": ["rank1.slot1", "rank1.slot0"],
                                "rank": 1, "mode": "flip"})
    log.injected(1, "process.kill", rank=1, step=7)
    log.failure(0, fault_index=1, max_step=7)
    log.add("restart", source="supervisor", attempt=1)
    log.add("attempt_started", source="supervisor", attempt=1)
    for rank in range(RANKS):
        log.add("pg_ready", rank=rank, attempt=1)
    # an unrelated rank's rejection, and one of another file, do not count
    log.add("snapshot_rejected", rank=0, attempt=1, snapshot_step=8, file="rank0.slot1", reason="elsewhere")
    reject = log.add("snapshot_rejected", rank=1, attempt=1, snapshot_step=None, file="rank1.slot0",
                     reason="the header fails its CRC-32 check (corrupted, or a write torn in the header)")
    log.add("snapshot_rejected", rank=1, attempt=1, snapshot_step=8, file="rank1.slot1",
            reason="step 8 fails its CRC-32 check (corrupted)")
    for rank in range(RANKS):
        log.add("resumed", rank=rank, attempt=1, from_step=6, tier="disk", loss_floor=1.5)
    log.steps(1, range(6, STEPS))
    log.finish(1)
    r = _judge(log, sc)
    storage, kill = r.faults
    assert storage.outcome == "recovered" and kill.outcome == "recovered"
    assert storage.detected_by == "snapshot_checksum" and "header" in storage.cause
    assert storage.detection_latency_s == pytest.approx(reject["t"] - inj["t"])
    assert storage.lost_steps == 2  # resumed from 6 instead of 8
    assert kill.recovery is not None and kill.recovery.resumed_from_step == 6
    assert r.ok


def test_a_snapshot_never_read_again_is_masked() -> None:
    """Damaged, then overwritten by later snapshots before any restart: nothing saw it, the bits are right."""
    sc = _scenario({"fault": "storage.snapshot_corrupt", "rank": 0, "step": 4, "expect": "masked"})
    log = Log()
    log.start()
    log.add("snapshot_rejected", rank=0, attempt=0, snapshot_step=5, file="rank0.slot1", reason="before (torn)")
    log.attempt(0, None)
    log.steps(0, range(0, 5))
    log.injected(0, "storage.snapshot_corrupt", rank=0, step=4,
                 details={"snapshot_step": 5, "snapshot_steps": [5], "files": ["rank0.slot1"], "rank": 0})
    log.steps(0, range(5, STEPS))
    log.finish(0)
    r = _judge(log, sc)
    assert r.faults[0].detected_by is None and r.faults[0].outcome == "masked"


def test_a_rejection_from_before_the_damage_does_not_count() -> None:
    sc = _scenario({"fault": "storage.checkpoint_corrupt", "step": 7, "expect": "masked"})
    log = Log()
    log.start()
    log.add("checkpoint_rejected", rank=0, attempt=0, checkpoint_step=6, reason="an older problem (corrupted)")
    log.attempt(0, None)
    log.steps(0, range(0, 8))
    log.injected(0, "storage.checkpoint_corrupt", rank=0, step=7, details={"checkpoint_step": 6, "mode": "flip"})
    log.steps(0, range(8, STEPS))
    log.finish(0)
    r = _judge(log, sc)
    assert r.faults[0].detected_by is None and r.faults[0].outcome == "masked"


# -- run-level details ---------------------------------------------------------------------------------


def test_simulated_faults_mark_the_run_simulated() -> None:
    log = Log()
    log.start()
    log.attempt(0, None)
    log.steps(0, range(0, 4))
    log.injected(0, "process.straggler", rank=0, step=4, simulated=True)
    log.steps(0, range(4, STEPS))
    log.finish(0)
    r = _judge(log, _scenario(STRAGGLER))
    assert r.simulated and r.faults[0].simulated


def test_max_restarts_and_harness_error_expectations() -> None:
    log = Log()
    _kill_and_restart(log)
    r = _judge(log, _scenario(KILL, max_restarts=0), error="the supervisor ended without run_finished")
    restarts = _expectation(r, "at most 0 restarts")
    assert not restarts.ok and restarts.message == "1 restarts"
    harness = _expectation(r, "harness")
    assert not harness.ok and harness.message == "the supervisor ended without run_finished"
    assert r.faults[0].outcome == "recovered"
    assert not r.ok
    r = _judge(log, _scenario(KILL, max_restarts=1))
    assert _expectation(r, "at most 1 restarts").ok and r.ok


def test_a_rank_without_steps_leaves_final_step_unknown() -> None:
    log = Log()
    log.start()
    log.attempt(0, None)
    for s in range(3):
        log.add("step_done", rank=0, attempt=0, step=s, loss=2.0, loss_bits=_bits(s, 0))
    log.give_up(0)
    r = _judge(log, _scenario())
    assert r.final_step is None and r.steps_executed == 3 and not r.finished


def test_a_recurring_fault_gets_one_recovery_per_failure():
    """Two crashes pinned on one fault: both recoveries are reported, lost steps add up."""
    from burnin.reports.verdict import judge
    from burnin.scenarios.schema import Scenario

    sc = Scenario.model_validate({"name": "r", "workload": {"steps": 6, "ranks": 1},
                                  "faults": [{"fault": "process.kill", "step": 1}]})
    ev = []
    t = [0.0]

    def e(kind, **kw):
        t[0] += 1.0
        ev.append({"t": t[0], "event": kind, **kw})

    e("run_started")
    for attempt, (start, stop) in enumerate([(0, 3), (2, 4), (3, 6)]):
        e("attempt_started", attempt=attempt)
        e("pg_ready", rank=0, attempt=attempt)
        e("resumed", rank=0, attempt=attempt, from_step=start or None)
        if attempt == 0:
            e("fault_injected", fault_index=0, fault="process.kill", rank=0, step=1, simulated=False)
        for s in range(start, stop):
            e("step_done", rank=0, attempt=attempt, step=s, loss=1.0, loss_bits="00")
        if attempt < 2:
            e("failure_detected", attempt=attempt, detected_at=t[0], cause="killed", rank=0, detector="exit_signal",
              detail="SIGKILL", signature="killed: SIGKILL", fault_index=0, last_step=stop - 1, max_step=stop - 1)
            e("teardown_done", attempt=attempt)
            e("restart", attempt=attempt + 1)
    e("rank_finished", rank=0, attempt=2, state_hash="h")
    e("run_finished", finished=True)
    golden = type("G", (), {"state_hash": "h", "loss_bits": {}})()
    r = judge(ev, sc, golden, run_id="r", run_dir="/tmp/r", config_hash="k")
    (f,) = r.faults
    assert f.outcome == "recovered" and f.details["failures"] == 2
    assert [x["resumed_from_step"] for x in f.details["recoveries"]] == [2, 3]
    assert f.lost_steps == (3 - 2) + (4 - 3)


# -- which fault a divergence belongs to -------------------------------------------------------------


def _off_from(first: int):
    """Loss bits that part from the golden run's at step `first`."""
    return lambda step, rank: _bits(step, rank) if step < first else f"{0x50000000 + 1000 * step + rank:08x}"


def test_a_divergence_belongs_to_the_faults_at_or_before_its_first_step() -> None:
    """A kill recovered exactly, then a silent flip that the losses show from the next step on, then a kill:
    the flip is `sdc`, the first kill `recovered` (its recovery matched the golden run until the flip's
    divergence), the last kill `unjudged` (after the divergence: no expectation of its own fails); a delay
    cannot change the bits (`masked`), nor can a damaged checkpoint that nothing loaded."""
    log = Log()
    log.start()
    log.attempt(0, None)
    log.steps(0, range(0, 3))
    log.injected(0, "process.kill", rank=1, step=2)
    log.failure(0, fault_index=0, max_step=2)
    log.attempt(1, 3)
    log.injected(1, "process.straggler", rank=0, step=3)
    log.injected(2, "storage.checkpoint_corrupt", rank=0, step=3, details={"checkpoint_step": 3})
    log.steps(1, range(3, 5))
    log.injected(3, "corruption.bitflip", rank=0, step=4)
    log.steps(1, range(5, 7), _off_from(5))
    log.injected(4, "process.kill", rank=0, step=6)
    log.failure(1, fault_index=4, rank=0, max_step=6)
    log.attempt(2, 7)
    log.steps(2, range(7, STEPS), _off_from(5))
    log.finish(2, (OTHER_HASH, OTHER_HASH))
    sc = _scenario({**KILL, "step": 2}, {**STRAGGLER, "step": 3, "expect": "recovered"},
                   {"fault": "storage.checkpoint_corrupt", "step": 3},
                   {**FLIP, "expect": "recovered"}, {**KILL, "rank": 0, "step": 6})
    r = _judge(log, sc)
    assert r.diverged_at_step == 5
    assert [f.outcome for f in r.faults] == ["recovered", "masked", "masked", "sdc", "unjudged"]
    assert "nothing loaded the damaged checkpoint of step 3" in r.faults[2].details["why"]
    assert r.faults[3].details["diverged_at_step"] == 5
    last = _expectation(r, "fault[4] process.kill@rank0:step6")
    assert last.ok and last.skipped and "after the run had diverged" in last.message
    assert not _expectation(r, "fault[3] corruption.bitflip@rank0:step4").ok
    assert not r.ok  # the run failed all the same: the final state is not the golden run's


def test_damage_that_a_later_resume_threw_away_is_masked() -> None:
    """A silent flip at step 4, then a kill whose restart resumes from step 3 (before the flip): the flip's
    damage is gone (`masked`); a later flip is the one the divergence belongs to."""
    log = Log()
    log.start()
    log.attempt(0, None)
    log.steps(0, range(0, 4))
    log.injected(0, "corruption.bitflip", rank=0, step=4)
    log.steps(0, range(4, 6), _off_from(5))
    log.injected(1, "process.kill", rank=1, step=5)
    log.failure(0, fault_index=1, max_step=5)
    log.attempt(1, 3)
    log.steps(1, range(3, 7))
    log.injected(2, "corruption.bitflip", rank=1, step=7)
    log.steps(1, range(7, STEPS), _off_from(8))
    log.finish(1, (OTHER_HASH, OTHER_HASH))
    sc = _scenario(FLIP, {**KILL, "step": 5}, {**FLIP, "rank": 1, "step": 7})
    r = _judge(log, sc)
    assert r.diverged_at_step == 8
    assert [f.outcome for f in r.faults] == ["masked", "recovered", "sdc"]
    assert "thrown away" in r.faults[0].details["why"]
