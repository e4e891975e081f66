"""Prometheus metrics of a run: faults injected, failures, restarts, recovery times, outcomes.

One `Metrics` object per supervisor. Counters that follow the run as it happens (faults injected,
failures, restarts, steps) are fed live by the supervisor; what only the verdict knows (outcomes,
recovery breakdowns, lost steps, pass/fail) comes from `from_result` once the run is judged.
Rates and ratios belong in PromQL, e.g.
``sum(rate(burnin_fault_outcomes_total{outcome="sdc"}[1h])) / sum(rate(burnin_faults_injected_total[1h]))``.
"""

from __future__ import annotations

import threading
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, write_to_textfile

from burnin.reports.result import RecoveryBreakdown, RunResult

__all__ = ["Metrics", "MetricsServer", "CAUSES", "OUTCOMES", "PHASES"]

#: Failure causes as the supervisor classifies them; anything else is counted as "other".
CAUSES: tuple[str, ...] = (
    "killed", "hang", "exception", "illegal_memory_access", "network", "signal", "timeout", "exit", "corruption",
)
#: Fault outcomes (DESIGN "Outcomes"); anything else is counted as "other".
OUTCOMES: tuple[str, ...] = ("recovered", "masked", "detected", "sdc", "failed")
#: Parts of a recovery, in order; the names match RecoveryBreakdown's fields without `_s`.
PHASES: tuple[str, ...] = ("detection", "teardown", "restart", "checkpoint_load", "first_step")

# A recovery takes from under a second (in-process rollback) to minutes (a node restart).
RECOVERY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# Phases can be far shorter than the whole: teardown of a dead group is often milliseconds.
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# Bucket 0 separates exact resumes (nothing recomputed) from the rest.
LOST_STEPS_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def _bounded(value: str, allowed: tuple[str, ...]) -> str:
    # A label value outside the vocabulary would add a series per typo; fold it into one.
    return value if value in allowed else "other"


class MetricsServer:
    """A running /metrics endpoint; `stop()` shuts it down and frees the port."""

    def __init__(self, httpd, thread: threading.Thread):
        self._httpd, self._thread = httpd, thread
        self.addr: str = httpd.server_address[0]
        self.port: int = httpd.server_address[1]
        self._stopped = False

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()       # ends serve_forever in the server thread
        self._httpd.server_close()   # closes the listening socket, so the port is free again
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Metrics:
    """The burnin metrics, registered on their own registry (never the process-global one)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.faults_injected = Counter(
            "burnin_faults_injected_total", "Faults injected, by fault name.", ["fault"], registry=r)
        self.fault_outcomes = Counter(
            "burnin_fault_outcomes_total", "Outcomes of injected faults (recovered, masked, detected, sdc, failed).",
            ["fault", "outcome"], registry=r)
        self.failures = Counter(
            "burnin_failures_total", "Failures of the rank group, by classified cause.", ["cause"], registry=r)
        self.restarts = Counter(
            "burnin_restarts_total", "Restarts of the rank group.", registry=r)
        self.recovery_seconds = Histogram(
            "burnin_recovery_seconds", "Time from a fault to the first step completed after resuming.",
            ["fault"], buckets=RECOVERY_BUCKETS, registry=r)
        self.recovery_phase_seconds = Histogram(
            "burnin_recovery_phase_seconds", "Time spent in each phase of a recovery.",
            ["phase"], buckets=PHASE_BUCKETS, registry=r)
        self.lost_steps_hist = Histogram(
            "burnin_lost_steps", "Training steps recomputed after a recovery.",
            buckets=LOST_STEPS_BUCKETS, registry=r)
        self.training_steps = Counter(
            "burnin_training_steps_total", "Training steps completed by rank 0, recomputed steps included.",
            registry=r)
        self.checkpoints_rejected = Counter(
            "burnin_checkpoints_rejected_total", "Checkpoints that failed verification and were skipped.",
            registry=r)
        self.run_info = Gauge(
            "burnin_run_info", "The run being reported; always 1.", ["scenario", "run_id"], registry=r)
        self.runs = Counter(
            "burnin_runs_total", "Finished runs, by scenario and result (passed, failed).",
            ["scenario", "result"], registry=r)

        # Series that exist from the start read 0 instead of missing, so rate() and
        # absent-series alerts behave from the first scrape.
        for cause in CAUSES:
            self.failures.labels(cause=cause)
        for phase in PHASES:
            self.recovery_phase_seconds.labels(phase=phase)

        self._servers: list[MetricsServer] = []
        self._results_seen: set[str] = set()

    # -- fed live by the supervisor -------------------------------------------------------------

    def set_run(self, scenario: str, run_id: str) -> None:
        # Only the current run is shown: a burn-in runs many, and run ids are unbounded.
        self.run_info.clear()
        self.run_info.labels(scenario=scenario, run_id=run_id).set(1)
        for result in ("passed", "failed"):
            self.runs.labels(scenario=scenario, result=result)

    def fault_injected(self, fault: str) -> None:
        self.faults_injected.labels(fault=fault).inc()
        for outcome in OUTCOMES:
            self.fault_outcomes.labels(fault=fault, outcome=outcome)

    def failure(self, cause: str) -> None:
        self.failures.labels(cause=_bounded(cause, CAUSES)).inc()

    def restart(self) -> None:
        self.restarts.inc()

    def step_done(self, n: int = 1) -> None:
        self.training_steps.inc(n)

    def checkpoint_rejected(self) -> None:
        self.checkpoints_rejected.inc()

    # -- known once the run is judged -----------------------------------------------------------

    def recovery(self, fault: str, breakdown: RecoveryBreakdown) -> None:
        self.recovery_seconds.labels(fault=fault).observe(breakdown.total_s)
        for phase in PHASES:
            self.recovery_phase_seconds.labels(phase=phase).observe(getattr(breakdown, f"{phase}_s"))

    def lost_steps(self, n: int) -> None:
        self.lost_steps_hist.observe(n)

    def outcome(self, fault: str, outcome: str) -> None:
        self.fault_outcomes.labels(fault=fault, outcome=_bounded(outcome, OUTCOMES)).inc()

    def run_finished(self, scenario: str, ok: bool) -> None:
        for result in ("passed", "failed"):
            self.runs.labels(scenario=scenario, result=result)
        self.runs.labels(scenario=scenario, result="passed" if ok else "failed").inc()

    def observe(self, event: dict) -> None:
        """Feed one event of the run's log. The live counters follow the log exactly, so replaying
        `events.jsonl` into a fresh Metrics gives the same totals as the run itself did."""
        kind = event.get("event")
        if kind == "step_done" and event.get("rank") == 0:
            self.step_done()
        elif kind == "fault_injected":
            self.fault_injected(event["fault"])
        elif kind == "failure_detected":
            self.failure(event["cause"])
        elif kind == "restart":
            self.restart()
        elif kind == "checkpoint_rejected":
            self.checkpoint_rejected()

    def from_result(self, result: RunResult) -> None:
        """Record the judged parts of a run: outcomes, recoveries, lost steps, pass/fail.

        Only injected faults get an outcome, so outcomes sum to `burnin_faults_injected_total`.
        A second call with the same run id is ignored, so rebuilding reports does not double count.
        """
        if result.run_id in self._results_seen:
            return
        self._results_seen.add(result.run_id)
        for f in result.faults:
            if not f.injected:
                continue
            self.outcome(f.fault, f.outcome)
            if f.recovery is not None:
                self.recovery(f.fault, f.recovery)
            if f.lost_steps is not None:
                self.lost_steps(f.lost_steps)
        # A harness error fails the run even when every listed expectation held.
        self.run_finished(result.scenario, result.ok and result.error is None)

    # -- exposition -----------------------------------------------------------------------------

    def serve(self, port: int, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve /metrics on addr:port in a daemon thread; port 0 picks a free port (see `.port`)."""
        httpd, thread = start_http_server(port, addr=addr, registry=self.registry)
        server = MetricsServer(httpd, thread)
        self._servers.append(server)
        return server

    def stop(self) -> None:
        """Stop every server `serve` started."""
        while self._servers:
            self._servers.pop().stop()

    def write_textfile(self, path: str | Path) -> None:
        """Write the metrics for node_exporter's textfile collector (atomic: tmp file + rename)."""
        write_to_textfile(str(path), self.registry)
