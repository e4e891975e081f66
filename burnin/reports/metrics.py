"""Prometheus metrics of a run: faults injected, failures, restarts, recovery times, outcomes.

One `Metrics` object per supervisor. Counters that follow the run as it happens (faults injected,
failures, restarts, steps, detections, rollbacks) are fed live, and only, through `observe(event)`
with each event of the run's log; what only the verdict knows (outcomes, recovery breakdowns, lost
steps, false alarms, pass/fail) comes from `from_result` once the run is judged. Rates and ratios
belong in PromQL (see `burnin/reports/prometheus/rules.yml` and docs/metrics.md), e.g.
``sum(burnin_fault_outcomes_total{outcome="sdc"}) / sum(burnin_fault_outcomes_total)``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    push_to_gateway,
    start_http_server,
    write_to_textfile,
)

from burnin.scenarios.schema import OUTCOMES
from burnin.reports.endpoint import endpoint_error
from burnin.reports.result import RecoveryBreakdown, RunResult

__all__ = ["Metrics", "MetricsServer", "CAUSES", "OUTCOMES", "PHASES", "DETECTORS", "PUSH_JOB"]

#: Failure causes as the supervisor classifies them; anything else is counted as "other".
CAUSES: tuple[str, ...] = (
    "killed", "hang", "exception", "illegal_memory_access", "network", "signal", "timeout", "exit", "corruption",
)
#: Fault outcomes (DESIGN "Outcomes"); anything else is counted as "other".
#: Parts of a recovery, in order; the names match RecoveryBreakdown's fields without `_s`.
PHASES: tuple[str, ...] = ("detection", "teardown", "restart", "checkpoint_load", "first_step")
#: In-rank detectors (burnin.rank.detectors, plus step recomputation); anything else is "other".
DETECTORS: tuple[str, ...] = ("nonfinite", "loss_spike", "grad_norm_spike", "update_rms_spike", "fingerprint",
                               "checksum", "gather_hash", "recompute")
#: Everything that can detect a fault: in-rank detectors, the supervisor's, the checkpoint loader's.
DETECTED_BY: tuple[str, ...] = DETECTORS + (
    "exit_signal", "exit_code", "heartbeat", "rank_error", "step_timeout", "connect_timeout",
    "checkpoint_checksum", "crash", "step_stall", "straggler")
#: Corruption targets and bit classes (burnin.faults.corruption); anything else is "other".
TARGETS: tuple[str, ...] = ("param", "optimizer_state", "grad", "allreduce_payload", "grad_reduced",
                            "activation", "batch", "all_gather_output", "reduce_scatter_input",
                            "reduce_scatter_output", "replica_all_reduce_output", "tp_all_reduce_output")
BIT_CLASSES: tuple[str, ...] = ("sign", "exponent", "mantissa_high", "mantissa_low", "any", "nan", "inf", "-inf")
#: The `job` label of pushed metrics (the Pushgateway's grouping key).
PUSH_JOB = "burnin"

# A recovery takes from under a second (in-process rollback) to minutes (a node restart).
RECOVERY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# Phases can be far shorter than the whole: teardown of a dead group is often milliseconds.
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# Bucket 0 separates exact resumes (nothing recomputed) from the rest.
LOST_STEPS_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def _bounded(value: str, allowed: tuple[str, ...]) -> str:
    # A label value outside the vocabulary would add a series per typo; fold it into one.
    return value if value in allowed else "other"


def _flag(value: Any) -> str:
    return "true" if value else "false"


class MetricsServer:
    """A running /metrics endpoint; `stop()` shuts it down and frees the port."""

    def __init__(self, httpd, thread: threading.Thread):
        self._httpd, self._thread = httpd, thread
        self.addr: str = httpd.server_address[0]
        self.port: int = httpd.server_address[1]
        self._stopped = False
        # When the last scrape had its body built: `linger` waits for one after the final values.
        self.last_scrape: float = 0.0
        app = httpd.get_app()

        def timed(environ: dict, start_response: Any) -> Any:
            body = app(environ, start_response)
            self.last_scrape = time.time()
            return body

        httpd.set_app(timed)

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def linger(self, since: float, timeout: float) -> bool:
        """Wait (at most `timeout` seconds) until a scrape reads the values as they were at `since`,
        so a scraper sees a run's final numbers before the endpoint goes away. True if one did."""
        deadline = time.monotonic() + timeout
        while self.last_scrape < since and time.monotonic() < deadline and not self._stopped:
            time.sleep(0.05)
        if self.last_scrape >= since:
            time.sleep(0.1)  # the scraper is still reading the body
            return True
        return False

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
    """The burnin metrics, registered on their own registry (never the process-global one).

    docs/metrics.md is the catalogue of what is registered here; a test keeps the two in step.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.faults_injected = Counter(
            "burnin_faults_injected_total", "Faults injected, by fault name and whether the fault was simulated.",
            ["fault", "simulated"], registry=r)
        self.fault_outcomes = Counter(
            "burnin_fault_outcomes_total", "Outcomes of injected faults (recovered, masked, detected, sdc, failed).",
            ["fault", "outcome", "simulated"], registry=r)
        self.failures = Counter(
            "burnin_failures_total", "Failures of the rank group, by classified cause.", ["cause"], registry=r)
        self.restarts = Counter(
            "burnin_restarts_total", "Restarts of the rank group.", registry=r)
        self.rollbacks = Counter(
            "burnin_rollbacks_total", "In-process rollbacks to the last verified snapshot.", registry=r)
        self.detections = Counter(
            "burnin_detections_total", "Findings of the in-rank detectors, by detector.", ["detector"], registry=r)
        self.false_alarms = Counter(
            "burnin_false_alarms_total", "Detector findings before any fault was injected, by detector.",
            ["detector"], registry=r)
        self.faults_detected = Counter(
            "burnin_faults_detected_total", "Injected faults, by the detector that caught each first.",
            ["fault", "detector"], registry=r)
        self.detection_latency_steps = Histogram(
            "burnin_detection_latency_steps", "Steps from a fault to its first detection, by detector.",
            ["detector"], buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.corruption_outcomes = Counter(
            "burnin_corruption_outcomes_total", "Outcomes of corruption faults by target and bit class.",
            ["target", "bit_class", "outcome"], registry=r)
        self.recovery_seconds = Histogram(
            "burnin_recovery_seconds", "Time from a fault to the first step completed after resuming.",
            ["fault"], buckets=RECOVERY_BUCKETS, registry=r)
        self.recovery_phase_seconds = Histogram(
            "burnin_recovery_phase_seconds", "Time spent in each phase of a recovery.",
            ["phase"], buckets=PHASE_BUCKETS, registry=r)
        self.lost_steps_hist = Histogram(
            "burnin_lost_steps", "Training steps recomputed after a recovery.",
            buckets=LOST_STEPS_BUCKETS, registry=r)
        self.network_stall_seconds = Histogram(
            "burnin_network_stall_seconds", "Extra time of a training step stalled by a network fault "
            "(its step time minus the median step time), one observation per stalled step.",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.training_steps = Counter(
            "burnin_training_steps_total", "Training steps completed by rank 0, recomputed steps included.",
            registry=r)
        self.useful_steps = Counter(
            "burnin_useful_steps_total", "Distinct training steps completed by rank 0: the first execution of "
            "each step; steps recomputed after a restart or rollback are not counted.", registry=r)
        self.checkpoints_rejected = Counter(
            "burnin_checkpoints_rejected_total", "Checkpoints that failed verification and were skipped.",
            registry=r)
        self.spares_started = Counter(
            "burnin_spares_started_total", "Warm spare rank processes started (the pool and its refills).",
            registry=r)
        self.spares_used = Counter(
            "burnin_spares_used_total", "Ranks of a restarted attempt taken over by a spare, by whether the spare "
            "had finished warming up (ready) or not.", ["ready"], registry=r)
        self.spares_missing = Counter(
            "burnin_spares_missing_total", "Ranks of a restarted attempt that started cold: no spare for the slot.",
            registry=r)
        self.snapshot_step = Gauge(
            "burnin_snapshot_step", "Newest step whose in-memory snapshot every rank has committed (-1: none yet).",
            registry=r)
        self.snapshot_age = Gauge(
            "burnin_snapshot_age_seconds", "Seconds since that snapshot was written (what a failure now would "
            "cost in time, at most, with the memory tier).", registry=r)
        self.snapshot_bytes = Gauge(
            "burnin_snapshot_bytes", "Bytes of that snapshot in shared memory, all ranks' shards together.",
            registry=r)
        self.spares_ready = Gauge(
            "burnin_spares_ready", "Warm spares forked and waiting for an assignment.", registry=r)
        self.rank_health = Gauge(
            "burnin_rank_health", "A burn-in's verdict per rank: 0 healthy, 1 degraded, 2 faulty.", ["rank"],
            registry=r)
        self.goodput = Gauge(
            "burnin_goodput_ratio", "Useful steps over executed steps (a burn-in under its fault mix).", registry=r)
        self.burn_in_faults = Gauge(
            "burnin_burn_in_faults_per_hour", "Faults a burn-in fired per hour of wall time.", registry=r)
        self.sdc_effects = Gauge(
            "burnin_sdc_effect_trials", "A data-fault campaign's trials by effect class against its measured noise "
            "band (benign, transient, degraded, diverged): scope silent = the masked and sdc trials, unchecked = "
            "every trial as it runs when nothing acts on its fault.", ["scope", "effect"], registry=r)
        self.detector_harm = Gauge(
            "burnin_detector_harm_ratio", "Per detector (and `any`), over a campaign's trials run unchecked: the "
            "share of the harmful ones it flags (measure harmful_caught) and of the benign ones "
            "(benign_flagged).", ["detector", "measure"], registry=r)
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
        for ready in ("true", "false"):
            self.spares_used.labels(ready=ready)
        for detector in DETECTORS:
            self.detections.labels(detector=detector)
            self.false_alarms.labels(detector=detector)

        self._servers: list[MetricsServer] = []
        self._results_seen: set[str] = set()
        self._new_run()

    def _new_run(self) -> None:
        # What observe() needs to remember within one run.
        self._top_step = -1                                   # newest step rank 0 completed
        self._first_fault_t: float | None = None              # earliest fault_injected time
        self._alarm_candidates: list[tuple[float, str]] = []  # detections before any fault so far

    # -- fed live by the supervisor -------------------------------------------------------------

    def set_run(self, scenario: str, run_id: str) -> None:
        # Only the current run is shown: a burn-in runs many, and run ids are unbounded.
        self.run_info.clear()
        self.run_info.labels(scenario=scenario, run_id=run_id).set(1)
        for result in ("passed", "failed"):
            self.runs.labels(scenario=scenario, result=result)
        self._new_run()

    def fault_injected(self, fault: str, simulated: bool = False) -> None:
        sim = _flag(simulated)
        self.faults_injected.labels(fault=fault, simulated=sim).inc()
        for outcome in OUTCOMES:
            self.fault_outcomes.labels(fault=fault, outcome=outcome, simulated=sim)

    def failure(self, cause: str) -> None:
        self.failures.labels(cause=_bounded(cause, CAUSES)).inc()

    def restart(self) -> None:
        self.restarts.inc()

    def rollback(self) -> None:
        self.rollbacks.inc()

    def detection(self, detector: str) -> None:
        self.detections.labels(detector=_bounded(detector, DETECTORS)).inc()

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

    def outcome(self, fault: str, outcome: str, simulated: bool = False) -> None:
        self.fault_outcomes.labels(fault=fault, outcome=_bounded(outcome, OUTCOMES), simulated=_flag(simulated)).inc()

    def judged_fault(self, fault: str, outcome: str, detected_by: str | None, latency_steps: int | None,
                     target: str | None, bit_class: str | None) -> None:
        """What a judged fault adds beyond its outcome: who detected it, how late, and for
        corruption faults the outcome by target and bit class (campaign trials come here too)."""
        if detected_by is not None:
            det = _bounded(detected_by, DETECTED_BY)
            self.faults_detected.labels(fault=fault, detector=det).inc()
            if latency_steps is not None:
                self.detection_latency_steps.labels(detector=det).observe(latency_steps)
        if target is not None:
            self.corruption_outcomes.labels(target=_bounded(target, TARGETS),
                                            bit_class=_bounded(str(bit_class), BIT_CLASSES),
                                            outcome=_bounded(outcome, OUTCOMES)).inc()

    def campaign_effects(self, summary: dict[str, Any]) -> None:
        """A data-fault campaign's effect classes and detectors against harm, once its summary is made (the
        noise band needs every control trial first)."""
        for scope, key in (("silent", "effects"), ("unchecked", "unchecked_effects")):
            eff = summary.get(key) or {}
            for effect in ("benign", "transient", "degraded", "diverged"):
                if effect in eff:
                    self.sdc_effects.labels(scope=scope, effect=effect).set(eff[effect]["count"])
        for det, v in ((summary.get("detector_harm") or {}).get("detectors") or {}).items():
            for measure in ("harmful_caught", "benign_flagged"):
                if v[measure]["rate"] is not None:
                    self.detector_harm.labels(detector=_bounded(det, (*DETECTORS, "any")), measure=measure).set(
                        v[measure]["rate"])

    def run_finished(self, scenario: str, ok: bool) -> None:
        for result in ("passed", "failed"):
            self.runs.labels(scenario=scenario, result=result)
        self.runs.labels(scenario=scenario, result="passed" if ok else "failed").inc()

    def burn_in(self, summary: dict) -> None:
        """A burn-in's verdicts and rates."""
        for r in summary["health"]["ranks"]:
            self.rank_health.labels(rank=str(r["rank"])).set(("healthy", "degraded", "faulty").index(r["verdict"]))
        if summary["steps"]["goodput_steps"] is not None:
            self.goodput.set(summary["steps"]["goodput_steps"])
        if summary["faults"]["per_hour"] is not None:
            self.burn_in_faults.set(summary["faults"]["per_hour"])

    def memory_tier(self, status: dict | None) -> None:
        """The newest in-memory snapshot (burnin.rank.snapshot.status), or None while there is none."""
        if status is None:
            self.snapshot_step.set(-1)
            return
        self.snapshot_step.set(status["step"])
        self.snapshot_age.set(status["age_s"])
        self.snapshot_bytes.set(status["bytes"])

    def observe(self, event: dict) -> None:
        """Feed one event of the run's log: the single way events reach the counters. The live
        counters follow the log exactly, so replaying `events.jsonl` into a fresh Metrics gives
        the same totals as the run itself did, restarts or not."""
        kind = event.get("event")
        if kind == "step_done" and event.get("rank") == 0:
            self.step_done()
            step = event.get("step")
            if isinstance(step, int) and step > self._top_step:
                self._top_step = step
                self.useful_steps.inc()
        elif kind == "fault_injected":
            self.fault_injected(event["fault"], simulated=bool(event.get("simulated")))
            t = event.get("t")
            if t is not None and (self._first_fault_t is None or t < self._first_fault_t):
                self._first_fault_t = t
                self._alarm_candidates = [(ct, d) for ct, d in self._alarm_candidates if ct < t]
        elif kind == "detection":
            detector = _bounded(str(event.get("detector")), DETECTORS)
            self.detection(detector)
            t = event.get("t", 0.0)
            if self._first_fault_t is None or t < self._first_fault_t:
                self._alarm_candidates.append((t, detector))
        elif kind == "failure_detected":
            self.failure(event["cause"])
        elif kind == "restart":
            self.restart()
        elif kind == "rollback":
            self.rollback()
        elif kind == "checkpoint_rejected":
            self.checkpoint_rejected()
        elif kind == "network_stall":
            self.network_stall_seconds.observe(float(event["stall_s"]))
        elif kind == "spare_started":
            self.spares_started.inc()
        elif kind == "spare_used":
            self.spares_used.labels(ready="true" if event.get("ready") else "false").inc()
        elif kind == "spare_missing":
            self.spares_missing.inc()

    def from_result(self, result: RunResult) -> None:
        """Record the judged parts of a run: outcomes, recoveries, lost steps, false alarms, pass/fail.

        Only injected faults get an outcome, so outcomes sum to `burnin_faults_injected_total`.
        A false alarm is what the verdict calls one: a detection with no fault injected before it
        (by time). Their detectors are those `observe` saw; any the verdict counts beyond those
        (events never observed here) are labelled "other", so the total always equals the verdict's.
        A second call with the same run id is ignored, so rebuilding reports does not double count.
        """
        if result.run_id in self._results_seen:
            return
        self._results_seen.add(result.run_id)
        for f in result.faults:
            if not f.injected:
                continue
            self.outcome(f.fault, f.outcome, simulated=f.simulated)
            self.judged_fault(f.fault, f.outcome, f.detected_by, f.details.get("detection_latency_steps"),
                              f.details.get("target"), f.details.get("bit_class") or f.details.get("value"))
            if f.recovery is not None:
                self.recovery(f.fault, f.recovery)
            if f.lost_steps is not None:
                self.lost_steps(f.lost_steps)
        alarms = self._alarm_candidates[:result.false_alarms]
        for _, detector in alarms:
            self.false_alarms.labels(detector=detector).inc()
        if result.false_alarms > len(alarms):
            self.false_alarms.labels(detector="other").inc(result.false_alarms - len(alarms))
        self._alarm_candidates = []
        # A harness error fails the run even when every listed expectation held.
        self.run_finished(result.scenario, result.ok and result.error is None)

    # -- exposition -----------------------------------------------------------------------------

    def serve(self, port: int, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve /metrics on addr:port in a daemon thread; port 0 picks a free port (see `.port`).

        An address that does not resolve or is not this machine's, or a port in use, raises a one-line
        UserError naming --metrics-addr or --metrics-port (nothing is left listening)."""
        try:
            httpd, thread = start_http_server(port, addr=addr, registry=self.registry)
        except (OSError, ValueError, OverflowError) as exc:
            raise endpoint_error(exc, addr, port) from None
        server = MetricsServer(httpd, thread)
        self._servers.append(server)
        return server

    def stop(self, linger_s: float = 0.0) -> None:
        """Stop every server `serve` started. With `linger_s`, first wait up to that long for each
        to be scraped once more, so the final values (outcomes, recoveries) reach the scraper."""
        since = time.time()
        deadline = time.monotonic() + linger_s
        while self._servers:
            server = self._servers.pop()
            if linger_s > 0:
                server.linger(since, max(0.0, deadline - time.monotonic()))
            server.stop()

    def write_textfile(self, path: str | Path) -> None:
        """Write the metrics for node_exporter's textfile collector (atomic: tmp file + rename)."""
        write_to_textfile(str(path), self.registry)

    def push(self, gateway: str, scenario: str, instance: str, timeout: float = 10.0) -> None:
        """Push every metric to a Pushgateway, replacing the group {job="burnin", scenario, instance}
        (HTTP PUT): the group then holds this run's totals. Raises OSError when the push fails."""
        push_to_gateway(gateway, job=PUSH_JOB, registry=self.registry,
                        grouping_key={"scenario": scenario, "instance": instance}, timeout=timeout)
