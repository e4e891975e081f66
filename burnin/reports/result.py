"""The outcome of one run, as reports and metrics see it.

Built by `burnin.reports.verdict.judge` from the event log, the scenario and the golden run, so it
can always be rebuilt from `events.jsonl` alone. Plain dataclasses: no torch, cheap to import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SCHEMA_VERSION", "RecoveryBreakdown", "Failure", "FaultResult", "Expectation", "RunResult", "passed",
           "is_simulated"]

#: Bumped whenever a field of summary.json changes meaning or disappears.
SCHEMA_VERSION = 1


@dataclass
class RecoveryBreakdown:
    """Time from a fault to the first training step completed after resuming, in parts.

    detection: fault injected -> failure detected by the supervisor
    teardown: detected -> every rank of the old group gone
    restart: teardown done -> every new rank up and its process group formed
    checkpoint_load: process group formed -> checkpoint loaded (the slowest rank)
    first_step: checkpoint loaded -> first step completed after resume
    """

    detection_s: float
    teardown_s: float
    restart_s: float
    checkpoint_load_s: float
    first_step_s: float
    resumed_from_step: int
    #: where the new attempt's ranks came from: "warm spares", "cold start", or which spares were not ready
    new_ranks: str | None = None

    @property
    def total_s(self) -> float:
        return self.detection_s + self.teardown_s + self.restart_s + self.checkpoint_load_s + self.first_step_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_s": self.total_s}


@dataclass
class Failure:
    """One failure of the rank group, as the supervisor classified it."""

    attempt: int               # 0 for the first launch, 1 after the first restart, ...
    time: float                # unix time of detection
    cause: str                 # killed | hang | exception | illegal_memory_access | network | signal | timeout | exit
    rank: int | None           # the rank the failure was pinned on (None: the group as a whole)
    detector: str              # exit_signal | exit_code | heartbeat | step_timeout | connect_timeout | rank_error
    detail: str                # the signal name, exit code, or first line of the error
    signature: str             # normalized: same root cause -> same signature
    last_step: int | None      # newest step every rank had completed before the failure
    fault_index: int | None    # the fault its recovery is reported under, None when unexplained
    #: every fault the failure explains (one restart can recover several; docs/architecture.md)
    fault_indices: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fault_index is not None and self.fault_index not in self.fault_indices:
            self.fault_indices = sorted([*self.fault_indices, self.fault_index])


@dataclass
class FaultResult:
    index: int                 # position in the scenario's `faults`
    fault: str
    rank: int
    step: int
    point: str
    expected: list[str]
    outcome: str               # recovered | masked | detected | sdc | failed | unjudged
    injected: bool             # False when the run never reached the fault's step
    injected_at: float | None = None
    detected_by: str | None = None
    cause: str | None = None
    detection_latency_s: float | None = None
    recovery: RecoveryBreakdown | None = None
    lost_steps: int | None = None
    simulated: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The outcome is one the scenario expected; an `unjudged` fault (injected after the run had diverged
        from the golden run) fails no expectation of its own: the divergence is another fault's."""
        return self.outcome in self.expected or self.outcome == "unjudged"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recovery"] = self.recovery.to_dict() if self.recovery else None
        d["ok"] = self.ok
        return d


@dataclass
class Expectation:
    """One check of the scenario; a JUnit testcase."""

    name: str
    ok: bool
    message: str
    #: nothing could judge it (a fault injected after the run had diverged); ok, and a JUnit <skipped>
    skipped: bool = False


@dataclass
class RunResult:
    scenario: str
    run_id: str
    run_dir: str
    config_hash: str           # the golden key: hash of everything that changes the bits
    ranks: int
    steps: int
    device: str
    started_at: float
    finished_at: float
    finished: bool             # every rank reached the last step
    final_step: int | None     # newest step completed by every rank
    final_state_hash: str | None
    golden_state_hash: str | None
    exact: bool                # final_state_hash == golden_state_hash
    diverged_at_step: int | None  # first step whose loss bits differ from the golden run's
    restarts: int
    steps_executed: int        # step executions by rank 0, recomputed steps included
    final_loss: float | None
    loss_floor: float | None   # entropy rate of the synthetic data, nats/token
    failures: list[Failure] = field(default_factory=list)
    faults: list[FaultResult] = field(default_factory=list)
    expectations: list[Expectation] = field(default_factory=list)
    rollbacks: int = 0         # in-process rollbacks to a verified snapshot
    false_alarms: int = 0      # detections that no injected fault explains
    simulated: bool = False    # some fault was a simulation of the real thing
    error: str | None = None   # a harness error that ended the run
    comparison: str = "exact"  # how the run was judged: "exact" (bits), or "tolerance" (a loop that is not deterministic)
    tolerance: dict[str, Any] | None = None  # tolerance mode: the bounds, the largest differences, within or not
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.expectations)

    @property
    def matched(self) -> bool:
        """The final state is the golden run's: bit for bit, or (tolerance mode) within the bounds."""
        return self.exact or bool(self.tolerance and self.tolerance.get("within"))

    @property
    def wall_s(self) -> float:
        return self.finished_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["faults"] = [f.to_dict() for f in self.faults]
        d["ok"] = self.ok
        d["wall_s"] = self.wall_s
        return d


def passed(result: RunResult) -> bool:
    """The run's verdict: every expectation held and no harness error ended it."""
    return result.ok and result.error is None


def is_simulated(result: RunResult) -> bool:
    """Whether any part of the run was a simulation (the report says so in so many words)."""
    return result.simulated or any(f.simulated for f in result.faults)
