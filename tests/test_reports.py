"""Unit tests of burnin.reports: metrics, summary.json, junit.xml, summary.md, terminal output."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import urllib.request
import xml.etree.ElementTree as ET

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from burnin.reports import (
    SCHEMA_VERSION,
    Expectation,
    Failure,
    FaultResult,
    Metrics,
    RecoveryBreakdown,
    RunResult,
    render_console,
    render_plain,
    write_reports,
)
from burnin.reports.metrics import CAUSES, PHASES

# -- builders -------------------------------------------------------------------------------------


def _breakdown(**kw) -> RecoveryBreakdown:
    d = dict(detection_s=0.4, teardown_s=0.05, restart_s=2.0, checkpoint_load_s=0.3, first_step_s=0.25,
             resumed_from_step=10)
    d.update(kw)
    return RecoveryBreakdown(**d)


def _kill(index=0, **kw) -> FaultResult:
    d = dict(index=index, fault="process.kill", rank=1, step=12, point="between_steps", expected=["recovered"],
             outcome="recovered", injected=True, injected_at=1000.5, detected_by="exit_signal", cause="killed",
             detection_latency_s=0.4, recovery=_breakdown(), lost_steps=2)
    d.update(kw)
    return FaultResult(**d)


def _flip(index=1, **kw) -> FaultResult:
    d = dict(index=index, fault="corruption.bitflip", rank=0, step=20, point="after_optimizer_step",
             expected=["detected", "recovered"], outcome="sdc", injected=True, injected_at=1003.0)
    d.update(kw)
    return FaultResult(**d)


def _result(faults=None, failures=None, expectations=None, **kw) -> RunResult:
    faults = [_kill(), _flip()] if faults is None else faults
    failures = [Failure(attempt=0, time=1000.9, cause="killed", rank=1, detector="exit_signal", detail="SIGKILL",
                        signature="signal:SIGKILL", last_step=11, fault_index=0)] if failures is None else failures
    if expectations is None:
        expectations = [Expectation(name=f"fault[{f.index}] {f.fault}@rank{f.rank}:step{f.step} -> {f.outcome}",
                                    ok=f.ok, message="" if f.ok else f"expected {' or '.join(f.expected)}, got {f.outcome}")
                        for f in faults]
    d = dict(scenario="kill_and_flip", run_id="20240101-000000-abcd", run_dir="/tmp/runs/kill_and_flip",
             config_hash="c0ffee" * 8, ranks=2, steps=40, device="cpu", started_at=1000.0, finished_at=1012.5,
             finished=True, final_step=40, final_state_hash="aa" * 32, golden_state_hash="bb" * 32, exact=False,
             diverged_at_step=21, restarts=1, steps_executed=42, final_loss=2.5, loss_floor=2.25,
             failures=failures, faults=faults, expectations=expectations)
    d.update(kw)
    return RunResult(**d)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def _v(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


# -- metrics --------------------------------------------------------------------------------------


def test_default_registry_is_fresh_not_global():
    from prometheus_client import REGISTRY

    a, b = Metrics(), Metrics()
    assert a.registry is not REGISTRY and a.registry is not b.registry
    a.restart()
    assert _v(a, "burnin_restarts_total") == 1 and _v(b, "burnin_restarts_total") == 0


def test_live_counters(metrics):
    metrics.set_run("kill_and_flip", "r1")
    metrics.fault_injected("process.kill")
    metrics.fault_injected("process.kill")
    metrics.fault_injected("corruption.bitflip")
    metrics.failure("killed")
    metrics.failure("network")
    metrics.failure("made_up")
    metrics.restart()
    metrics.step_done()
    metrics.step_done(41)
    metrics.checkpoint_rejected()

    assert _v(metrics, "burnin_faults_injected_total", fault="process.kill", simulated="false") == 2
    assert _v(metrics, "burnin_faults_injected_total", fault="corruption.bitflip", simulated="false") == 1
    assert _v(metrics, "burnin_failures_total", cause="killed") == 1
    assert _v(metrics, "burnin_failures_total", cause="network") == 1
    assert _v(metrics, "burnin_failures_total", cause="other") == 1
    assert _v(metrics, "burnin_failures_total", cause="made_up") is None
    assert _v(metrics, "burnin_restarts_total") == 1
    assert _v(metrics, "burnin_training_steps_total") == 42
    assert _v(metrics, "burnin_checkpoints_rejected_total") == 1
    assert _v(metrics, "burnin_run_info", scenario="kill_and_flip", run_id="r1") == 1


def test_series_exist_at_zero_before_any_event(metrics):
    for cause in CAUSES:
        assert _v(metrics, "burnin_failures_total", cause=cause) == 0
    for phase in PHASES:
        assert _v(metrics, "burnin_recovery_phase_seconds_count", phase=phase) == 0
    metrics.set_run("s", "r")
    assert _v(metrics, "burnin_runs_total", scenario="s", result="passed") == 0
    assert _v(metrics, "burnin_runs_total", scenario="s", result="failed") == 0
    metrics.fault_injected("process.hang")
    assert _v(metrics, "burnin_fault_outcomes_total", fault="process.hang", outcome="sdc", simulated="false") == 0


def test_set_run_keeps_only_the_current_run(metrics):
    metrics.set_run("s", "r1")
    metrics.set_run("s", "r2")
    assert _v(metrics, "burnin_run_info", scenario="s", run_id="r1") is None
    assert _v(metrics, "burnin_run_info", scenario="s", run_id="r2") == 1


def test_recovery_histograms_and_buckets(metrics):
    metrics.recovery("process.kill", _breakdown())          # total 3.0 s
    metrics.recovery("process.kill", _breakdown(restart_s=100.0))  # total 101.0 s
    name = "burnin_recovery_seconds"
    assert _v(metrics, name + "_count", fault="process.kill") == 2
    assert _v(metrics, name + "_sum", fault="process.kill") == pytest.approx(104.0)
    assert _v(metrics, name + "_bucket", fault="process.kill", le="2.0") == 0
    assert _v(metrics, name + "_bucket", fault="process.kill", le="5.0") == 1
    assert _v(metrics, name + "_bucket", fault="process.kill", le="120.0") == 2
    assert _v(metrics, name + "_bucket", fault="process.kill", le="+Inf") == 2
    for le in (".5", "1", "2", "5", "10", "20", "30", "60", "120", "300", "600"):
        assert _v(metrics, name + "_bucket", fault="process.kill", le=str(float(le))) is not None

    phase = "burnin_recovery_phase_seconds"
    assert _v(metrics, phase + "_count", phase="teardown") == 2
    assert _v(metrics, phase + "_sum", phase="teardown") == pytest.approx(0.1)
    assert _v(metrics, phase + "_sum", phase="restart") == pytest.approx(102.0)
    assert _v(metrics, phase + "_bucket", phase="teardown", le="0.05") == 2
    assert _v(metrics, phase + "_bucket", phase="detection", le="0.5") == 2
    assert _v(metrics, phase + "_sum", phase="checkpoint_load") == pytest.approx(0.6)
    assert _v(metrics, phase + "_sum", phase="first_step") == pytest.approx(0.5)


def test_lost_steps_buckets(metrics):
    for n in (0, 0, 3, 1000, 5000):
        metrics.lost_steps(n)
    name = "burnin_lost_steps_bucket"
    assert _v(metrics, name, le="0.0") == 2
    assert _v(metrics, name, le="2.0") == 2
    assert _v(metrics, name, le="5.0") == 3
    assert _v(metrics, name, le="1000.0") == 4
    assert _v(metrics, name, le="+Inf") == 5
    assert _v(metrics, "burnin_lost_steps_sum") == 6003


def test_outcome_and_run_finished(metrics):
    metrics.outcome("process.kill", "recovered")
    metrics.outcome("process.kill", "bogus")
    metrics.run_finished("s", True)
    metrics.run_finished("s", False)
    metrics.run_finished("s", False)
    assert _v(metrics, "burnin_fault_outcomes_total", fault="process.kill", outcome="recovered", simulated="false") == 1
    assert _v(metrics, "burnin_fault_outcomes_total", fault="process.kill", outcome="other", simulated="false") == 1
    assert _v(metrics, "burnin_runs_total", scenario="s", result="passed") == 1
    assert _v(metrics, "burnin_runs_total", scenario="s", result="failed") == 2


def test_from_result_records_judged_parts_once(metrics):
    not_reached = _kill(index=2, step=99, injected=False, outcome="failed", recovery=None, lost_steps=None)
    result = _result(faults=[_kill(), _flip(), not_reached])
    metrics.from_result(result)
    metrics.from_result(result)  # a rebuilt report must not count twice

    assert _v(metrics, "burnin_fault_outcomes_total", fault="process.kill", outcome="recovered", simulated="false") == 1
    assert _v(metrics, "burnin_fault_outcomes_total", fault="process.kill", outcome="failed", simulated="false") is None
    assert _v(metrics, "burnin_fault_outcomes_total", fault="corruption.bitflip", outcome="sdc", simulated="false") == 1
    assert _v(metrics, "burnin_recovery_seconds_count", fault="process.kill") == 1
    assert _v(metrics, "burnin_recovery_seconds_sum", fault="process.kill") == pytest.approx(3.0)
    assert _v(metrics, "burnin_recovery_phase_seconds_count", phase="detection") == 1
    assert _v(metrics, "burnin_lost_steps_count") == 1
    assert _v(metrics, "burnin_runs_total", scenario="kill_and_flip", result="failed") == 1
    # live counters are the supervisor's to feed, not from_result's
    assert _v(metrics, "burnin_restarts_total") == 0
    assert _v(metrics, "burnin_training_steps_total") == 0


def test_from_result_harness_error_fails_the_run(metrics):
    metrics.from_result(_result(faults=[], failures=[], expectations=[], error="worker crashed"))
    assert _v(metrics, "burnin_runs_total", scenario="kill_and_flip", result="failed") == 1
    assert _v(metrics, "burnin_runs_total", scenario="kill_and_flip", result="passed") == 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # as a real server would: a closed connection in TIME_WAIT is not a listener
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_serve_on_loopback_then_stop_frees_port(metrics):
    metrics.fault_injected("process.kill")
    server = metrics.serve(0)
    try:
        assert server.addr == "127.0.0.1" and server.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert 'burnin_faults_injected_total{fault="process.kill",simulated="false"} 1.0' in body
        assert 'burnin_recovery_phase_seconds_bucket{le="600.0",phase="restart"} 0.0' in body
        assert "python_gc" not in body  # the global registry's collectors stay out
    finally:
        server.stop()
    server.stop()  # idempotent
    assert _port_free(server.port)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


def test_metrics_stop_stops_every_server(metrics):
    a, b = metrics.serve(0), metrics.serve(0)
    metrics.stop()
    assert _port_free(a.port) and _port_free(b.port)


def test_write_textfile_parses(metrics, tmp_path):
    metrics.set_run("s", "r")
    metrics.fault_injected("process.kill")
    metrics.from_result(_result())
    path = tmp_path / "burnin.prom"
    metrics.write_textfile(path)
    families = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    for name in ("burnin_faults_injected", "burnin_fault_outcomes", "burnin_failures", "burnin_restarts",
                 "burnin_recovery_seconds", "burnin_recovery_phase_seconds", "burnin_lost_steps",
                 "burnin_training_steps", "burnin_checkpoints_rejected", "burnin_run_info", "burnin_runs"):
        assert name in families, name
    assert families["burnin_recovery_seconds"].type == "histogram"
    assert families["burnin_run_info"].type == "gauge"
    assert families["burnin_faults_injected"].type == "counter"
    assert not list(tmp_path.glob("*.tmp*"))


# -- files ----------------------------------------------------------------------------------------


def test_write_reports_writes_three_files_atomically(tmp_path):
    run_dir = tmp_path / "run"
    paths = write_reports(_result(), run_dir)
    assert set(paths) == {"json", "junit", "markdown"}
    assert {p.name for p in paths.values()} == {"summary.json", "junit.xml", "summary.md"}
    assert all(p.is_file() for p in paths.values())
    assert sorted(p.name for p in run_dir.iterdir()) == ["junit.xml", "summary.json", "summary.md"]


def test_summary_json_round_trips(tmp_path):
    result = _result()
    d = json.loads(write_reports(result, tmp_path)["json"].read_text())
    assert d["schema_version"] == SCHEMA_VERSION
    assert d["ok"] is False and d["passed"] is False
    assert d["faults"][0]["recovery"]["total_s"] == pytest.approx(3.0)
    assert d["faults"][1]["ok"] is False
    assert d["failures"][0]["signature"] == "signal:SIGKILL"
    assert d["wall_s"] == pytest.approx(12.5)
    # passed and failure_groups are derived by the writer, not fields of the result
    assert {k: v for k, v in d.items() if k not in ("passed", "failure_groups")} == \
        json.loads(json.dumps(result.to_dict()))


def test_summary_json_non_finite_loss_is_strict_json(tmp_path):
    path = write_reports(_result(final_loss=float("nan"), loss_floor=float("inf")), tmp_path)["json"]
    d = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert math.isnan(float(d["final_loss"])) and float(d["loss_floor"]) == math.inf


def test_junit_counts_and_properties(tmp_path):
    result = _result()
    root = ET.parse(write_reports(result, tmp_path)["junit"]).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    suite = suites[0]
    assert suite.get("name") == "burnin.kill_and_flip"
    assert suite.get("tests") == "2" and suite.get("failures") == "1" and suite.get("errors") == "0"
    assert float(suite.get("time")) == pytest.approx(12.5)
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [e.name for e in result.expectations]
    assert cases[0].get("name") == "fault[0] process.kill@rank1:step12 -> recovered"
    assert all(c.get("classname") == "burnin.kill_and_flip" for c in cases)
    assert cases[0].find("failure") is None
    assert cases[1].find("failure").get("message") == "expected detected or recovered, got sdc"
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["run_id"] == result.run_id
    assert props["config_hash"] == result.config_hash
    assert props["final_state_hash"] == result.final_state_hash
    assert props["golden_state_hash"] == result.golden_state_hash
    assert props["simulated"] == "false"
    assert suite.get("timestamp") == "1970-01-01T00:16:40"


def test_junit_harness_error_and_control_characters(tmp_path):
    result = _result(faults=[], failures=[], expectations=[Expectation("finished", False, "rank 1: \x1b[31mboom\x00")],
                     error="RuntimeError: worker died\ntraceback...", golden_state_hash=None)
    root = ET.parse(write_reports(result, tmp_path)["junit"]).getroot()
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1" and suite.get("errors") == "1"
    harness = [c for c in suite.findall("testcase") if c.get("name") == "harness"][0]
    assert harness.find("error").get("message") == "RuntimeError: worker died"
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["golden_state_hash"] == ""


def test_summary_md_tables(tmp_path):
    result = _result()
    md = write_reports(result, tmp_path)["markdown"].read_text()
    assert md.startswith("# burnin kill_and_flip: FAIL")
    assert "| 0 | process.kill | 1 | 12 | between_steps | recovered | recovered | exit_signal | 3.000 | 2 |" in md
    assert "| 1 | corruption.bitflip | 0 | 20 | after_optimizer_step | sdc ✗ | detected, recovered | - | - | - |" in md
    assert "| 0 | process.kill | 0.400 | 0.050 | 2.000 | 0.300 | 0.250 | 3.000 | 10 |" in md
    assert "| 0 | killed | 1 | exit_signal | SIGKILL | `signal:SIGKILL` |" in md
    assert "!= golden" in md and "diverged at step 21" in md
    assert "final loss 2.5000 vs floor 2.2500 (+0.2500 nats/token)" in md
    assert "restarts: 1" in md
    assert "simulated" not in md


def test_summary_md_says_simulated(tmp_path):
    md = write_reports(_result(faults=[_kill(simulated=True)]), tmp_path)["markdown"].read_text()
    assert md.splitlines()[0] == "# burnin kill_and_flip: PASS (simulated)"
    assert "**simulated**" in md.split("## Faults")[0]  # above the tables, not buried in them
    junit = ET.parse(tmp_path / "junit.xml").getroot()
    assert {p.get("name"): p.get("value") for p in junit.iter("property")}["simulated"] == "true"
    md2 = write_reports(_result(simulated=True), tmp_path)["markdown"].read_text()
    assert "**simulated**" in md2


def test_summary_md_pass_and_escaping(tmp_path):
    fail = Failure(attempt=0, time=1.0, cause="exception", rank=None, detector="rank_error",
                   detail="ValueError: a|b", signature="exc:ValueError", last_step=None, fault_index=None)
    result = _result(faults=[_kill()], failures=[fail], exact=True, final_state_hash="bb" * 32,
                     diverged_at_step=None)
    md = write_reports(result, tmp_path)["markdown"].read_text()
    assert md.startswith("# burnin kill_and_flip: PASS")
    assert "ValueError: a\\|b" in md
    assert "exact: final" in md


def test_render_plain():
    text = render_plain(_result(faults=[_kill(), _flip(simulated=True)]))
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("fault[0] process.kill@rank1:step12 between_steps -> recovered")
    assert "recovery 3.00s" in lines[0] and "lost 2 steps" in lines[0]
    assert "UNEXPECTED" in lines[1] and "simulated" in lines[1]
    assert lines[2] == "FAIL kill_and_flip /tmp/runs/kill_and_flip (simulated)"
    ok = render_plain(_result(faults=[_kill()]))
    assert ok.splitlines()[-1] == "PASS kill_and_flip /tmp/runs/kill_and_flip"


def test_render_console():
    from rich.console import Console

    console = Console(record=True, width=160, color_system=None)
    console.print(render_console(_result(faults=[_kill(), _flip(simulated=True, fault="x[bold]y")])))
    out = console.export_text()
    assert "FAIL" in out and "process.kill" in out and "simulated" in out and "x[bold]y" in out


def test_import_is_cheap():
    code = ("import sys, burnin.reports as r; assert r.RunResult; "
            "bad = [m for m in ('torch', 'prometheus_client', 'rich') if m in sys.modules]; "
            "assert not bad, bad; r.Metrics; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_judged_fault_counts_detection_latency_and_corruption_outcomes():
    from burnin.reports.metrics import Metrics

    m = Metrics()
    m.judged_fault("corruption.bitflip", "recovered", "fingerprint", 1, "param", "exponent")
    m.judged_fault("corruption.bitflip", "sdc", None, None, "grad", "mantissa_low")
    m.judged_fault("corruption.bitflip", "sdc", None, None, "made-up", "weird")
    g = m.registry.get_sample_value
    assert g("burnin_faults_detected_total", {"fault": "corruption.bitflip", "detector": "fingerprint"}) == 1
    assert g("burnin_detection_latency_steps_count", {"detector": "fingerprint"}) == 1
    assert g("burnin_detection_latency_steps_bucket", {"detector": "fingerprint", "le": "0.0"}) == 0
    assert g("burnin_detection_latency_steps_bucket", {"detector": "fingerprint", "le": "1.0"}) == 1
    assert g("burnin_corruption_outcomes_total", {"target": "grad", "bit_class": "mantissa_low", "outcome": "sdc"}) == 1
    assert g("burnin_corruption_outcomes_total", {"target": "other", "bit_class": "other", "outcome": "sdc"}) == 1
