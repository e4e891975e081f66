"""Prometheus end to end: a real burnin run scraped live and pushed to a real Pushgateway, read back
through a real Prometheus with the shipped rules loaded; promtool on the shipped rules; the metrics
catalogue in docs/metrics.md against the registry.

Needs `prometheus`, `prometheus-pushgateway` and `promtool` on PATH (Debian: the `prometheus` and
`prometheus-pushgateway` packages; `make sysdeps` installs them as root). Without them these tests
skip, or fail under BURNIN_CI=1. Every server binds 127.0.0.1 on a free port, keeps its data in a
temporary directory, and is stopped by its fixture whatever happens.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

import pytest
from conftest import CI, burnin_cmd, processes_of_run, run_cli, run_dir_of
from prometheus_client.parser import text_string_to_metric_families

from burnin.core.events import read_events
from burnin.reports.metrics import DETECTORS, RECOVERY_BUCKETS, Metrics
from burnin.reports.result import FaultResult, RunResult

ROOT = Path(__file__).resolve().parent.parent
PROM_FILES = Path(str(files("burnin.reports") / "prometheus"))
SCENARIO = "prom-e2e"
INSTANCE = "ci-runner-1"
LIVE_JOB = "burnin-live"
QUERY_BOUND_S = 60  # the first scraped sample is queryable ~5 s after start; rules need a cycle more

# 2 ranks, 20 steps: the kill restarts the group from checkpoint 10 (`memory_every: 0`: no memory
# snapshot, so the restart replays steps 10-12, which the counters must count once each); then an
# undetected flip of a local gradient before the all-reduce is averaged into both replicas and ends
# `sdc` (no detectors).
# The flip is a high mantissa bit of a gradient that is never zero, so the final state differs on
# any CPU (a low bit of a drawn element can be absorbed by rounding, which depends on the CPU).
# The kill's recovery matched the golden run step for step until the flip's divergence: `recovered`.
SCENARIO_YAML = f"""\
name: {SCENARIO}
workload: {{model: tiny, ranks: 2, steps: 20, threads: 1}}
checkpoint: {{every: 5, keep: 2, memory_every: 0}}
recovery: {{mode: restart, max_restarts: 2}}
faults:
  - {{fault: corruption.bitflip, rank: 0, step: 14, expect: sdc,
     params: {{target: grad, tensor: blocks.0.ln_1.weight, bit_class: mantissa_high, seed: 1}}}}
  - {{fault: process.kill, rank: 1, step: 12, expect: [recovered, detected]}}
expect: {{exact: false, max_restarts: 1}}
"""


def _need(*binaries: str) -> dict[str, str]:
    found = {b: shutil.which(b) for b in binaries}
    missing = [b for b, path in found.items() if path is None]
    if missing:
        msg = (f"needs {', '.join(missing)} on PATH (Debian: apt-get install prometheus prometheus-pushgateway, "
               "which `make sysdeps` does as root)")
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return found  # type: ignore[return-value]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- servers ---------------------------------------------------------------------------------------


class _Server:
    """A server process with its log in a file; `stop()` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path):
        self.name, self.port, self.log = name, port, log
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        tail = self.log.read_text(errors="replace")[-2000:]
        raise AssertionError(f"{self.name} not ready on {self.url} within {timeout:.0f} s "
                             f"(exit {self.proc.poll()}):\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory: pytest.TempPathFactory):
    binary = _need("prometheus-pushgateway")["prometheus-pushgateway"]
    work = tmp_path_factory.mktemp("pushgateway")
    port = _free_port()
    server = _Server("pushgateway", [binary, f"--web.listen-address=127.0.0.1:{port}",
                                     f"--persistence.file={work / 'persistence.data'}"], port, work / "log.txt")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def live_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, pushgateway: _Server, live_port: int):
    tools = _need("prometheus", "promtool")
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(PROM_FILES / "rules.yml")],
        "scrape_configs": [
            {"job_name": LIVE_JOB, "static_configs": [{"targets": [f"127.0.0.1:{live_port}"]}]},
            {"job_name": "pushgateway", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{pushgateway.port}"]}]},
        ],
    }, indent=1))
    check = subprocess.run([tools["promtool"], "check", "config", str(config)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = _free_port()
    server = _Server("prometheus", [tools["prometheus"], f"--config.file={config}",
                                    f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                    "--web.enable-lifecycle"], port, work / "log.txt")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, prometheus: _Server, pushgateway: _Server,
        live_port: int) -> dict[str, Any]:
    """One real run, scraped live by Prometheus and pushed to the Pushgateway at its end."""
    work = tmp_path_factory.mktemp("prom-run")
    scenario = work / "prom-e2e.yaml"
    scenario.write_text(SCENARIO_YAML)
    out = work / "runs"
    textfile = work / "textfile" / "burnin.prom"
    textfile.parent.mkdir()
    proc = subprocess.run(
        burnin_cmd("run", str(scenario), "--out", str(out), "--quiet", "--metrics-port", str(live_port),
                   "--metrics-linger", "20", "--pushgateway", pushgateway.url, "--push-instance", INSTANCE,
                   "--metrics-textfile", str(textfile)),
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    run_dir = run_dir_of(out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert processes_of_run(summary["run_id"]) == []
    outcomes = {f["fault"]: f["outcome"] for f in summary["faults"]}
    assert outcomes == {"corruption.bitflip": "sdc", "process.kill": "recovered"}, outcomes
    return {"run_dir": run_dir, "summary": summary, "events": read_events(run_dir / "events.jsonl"),
            "textfile": textfile}


# -- reading Prometheus ----------------------------------------------------------------------------


def _api(server: _Server, path: str, **params: str) -> Any:
    url = f"{server.url}{path}" + (f"?{urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:  # a bad expression: 400 with the reason in the body
        body = json.loads(exc.read() or b"{}")
    assert body.get("status") == "success", f"{url}: {body}"
    return body["data"]


def _vector(server: _Server, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
    data = _api(server, "/api/v1/query", query=expr)
    assert data["resultType"] == "vector", data
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in data["result"]}


def _by(server: _Server, expr: str, *labels: str) -> dict[Any, float]:
    """An instant query as {label value(s): value}."""
    out = {}
    for key, value in _vector(server, expr).items():
        d = dict(key)
        k = tuple(d.get(label, "") for label in labels)
        out[k[0] if len(k) == 1 else k] = value
    return out


def _eventually(fn: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = QUERY_BOUND_S) -> Any:
    """Poll `fn` until `ok(result)` or the bound; return the last result for the assertion's message."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if ok(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


PUSHED = f'job="burnin",scenario="{SCENARIO}",instance="{INSTANCE}"'
LIVE = f'job="{LIVE_JOB}"'


def _expected_totals(run: dict[str, Any]) -> dict[str, Any]:
    events, summary = run["events"], run["summary"]
    rank0_steps = sum(1 for e in events if e["event"] == "step_done" and e["rank"] == 0)
    assert rank0_steps == summary["steps_executed"]
    return {
        "injected": dict(Counter(e["fault"] for e in events if e["event"] == "fault_injected")),
        "outcomes": dict(Counter((f["fault"], f["outcome"]) for f in summary["faults"] if f["injected"])),
        "restarts": float(sum(1 for e in events if e["event"] == "restart")),
        "failures": dict(Counter(e["cause"] for e in events if e["event"] == "failure_detected")),
        "steps": float(rank0_steps),
        "useful": float(summary["steps"]),
    }


def _totals_in_prometheus(prom: _Server, sel: str, wrap: Callable[[str], str]) -> dict[str, Any]:
    def q(metric: str, *by: str) -> Any:
        inner = wrap(metric + "{" + sel + "}")
        expr = f"sum by ({', '.join(by)}) ({inner})" if by else f"sum({inner})"
        got = _by(prom, expr, *by) if by else _vector(prom, expr)
        return got if by else next(iter(got.values()), None)

    outcomes = {k: v for k, v in q("burnin_fault_outcomes_total", "fault", "outcome").items() if v}
    failures = {k: v for k, v in q("burnin_failures_total", "cause").items() if v}
    return {"injected": q("burnin_faults_injected_total", "fault"), "outcomes": outcomes,
            "restarts": q("burnin_restarts_total"), "failures": failures,
            "steps": q("burnin_training_steps_total"), "useful": q("burnin_useful_steps_total")}


# -- the run, seen through Prometheus --------------------------------------------------------------


@pytest.mark.slow
def test_counters_equal_the_event_log_through_restarts(run, prometheus, pushgateway):
    """Pushed and scraped, the totals are the events': a restart neither resets nor repeats a count."""
    want = _expected_totals(run)
    assert want["restarts"] == 1 and want["steps"] == 20 + 3  # steps 10-12 replayed after the restart

    # Pushed at the end: the Pushgateway holds the run's totals under its grouping key.
    pushed = _eventually(lambda: _totals_in_prometheus(prometheus, PUSHED, lambda s: s), lambda got: got == want)
    assert pushed == want

    # Scraped live: the endpoint lingered until Prometheus had the final values, then closed (so the
    # series are stale now, and last_over_time reads their last sample).
    live = _eventually(lambda: _totals_in_prometheus(prometheus, LIVE, lambda s: f"last_over_time({s}[10m])"),
                       lambda got: got == want)
    assert live == want

    # The Pushgateway's own view of the same group.
    with urllib.request.urlopen(f"{pushgateway.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    totals: Counter[str] = Counter()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("job") == "burnin" and s.labels.get("scenario") == SCENARIO:
                assert s.labels.get("instance") == INSTANCE
                totals[s.name] += s.value
    assert totals["burnin_faults_injected_total"] == sum(want["injected"].values()) == 2
    assert totals["burnin_fault_outcomes_total"] == sum(want["outcomes"].values()) == 2
    assert totals["burnin_restarts_total"] == want["restarts"]
    assert totals["burnin_training_steps_total"] == want["steps"]
    assert totals["burnin_useful_steps_total"] == want["useful"]


@pytest.mark.slow
def test_recording_rules_give_the_expected_ratios(run, prometheus):
    faults = [f for f in run["summary"]["faults"] if f["injected"]]
    failing = ("detected", "sdc", "failed")
    want_failure = {f["fault"]: float(f["outcome"] in failing) for f in faults}  # one fault of each type here
    want_sdc = sum(f["outcome"] == "sdc" for f in faults) / len(faults)
    steps = run["summary"]["steps_executed"]

    def rules() -> dict[str, Any]:
        return {
            "failure": _by(prometheus, 'job_fault:burnin_fault_failures:ratio{job="burnin"}', "fault"),
            "failure_job": _by(prometheus, 'job:burnin_fault_failures:ratio{job="burnin"}', "job"),
            "sdc": _by(prometheus, 'job:burnin_sdc_escapes:ratio{job="burnin"}', "job"),
            "sdc_fault": _by(prometheus, 'job_fault:burnin_sdc_escapes:ratio{job="burnin"}', "fault"),
            "goodput": _by(prometheus, 'job:burnin_goodput:ratio{job="burnin"}', "job"),
        }

    want = {
        "failure": want_failure,
        "failure_job": {"burnin": sum(want_failure.values()) / len(faults)},
        "sdc": {"burnin": want_sdc},
        "sdc_fault": {f["fault"]: float(f["outcome"] == "sdc") for f in faults},
        "goodput": {"burnin": pytest.approx(20 / steps)},
    }
    got = _eventually(rules, lambda g: g == want)
    assert got == want
    assert want_sdc == 0.5

    # Recovery-time quantiles: one observation, interpolated within its bucket as Prometheus does.
    (kill,) = [f for f in faults if f["fault"] == "process.kill"]
    total = kill["recovery"]["total_s"]
    upper = next(b for b in RECOVERY_BUCKETS if total <= b)
    lower = max([0.0] + [b for b in RECOVERY_BUCKETS if b < upper])
    recorded = 'job_fault:burnin_recovery_seconds:histogram_quantile{job="burnin"}'
    quantiles = _eventually(lambda: _by(prometheus, recorded, "fault", "quantile"), lambda g: len(g) == 3)
    assert quantiles == {("process.kill", q): pytest.approx(lower + (upper - lower) * float(q))
                         for q in ("0.5", "0.9", "0.99")}


@pytest.mark.slow
def test_sdc_alert_fires(run, prometheus):
    def sdc_alerts() -> list[dict[str, Any]]:
        return [a for a in _api(prometheus, "/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == "BurninSilentDataCorruption" and a["labels"].get("job") == "burnin"]

    alerts = _eventually(sdc_alerts, lambda a: any(x["state"] == "firing" for x in a))
    firing = [a for a in alerts if a["state"] == "firing"]
    assert firing, alerts
    (alert,) = firing
    assert alert["labels"] == {
        "alertname": "BurninSilentDataCorruption", "severity": "critical", "job": "burnin", "scenario": SCENARIO,
        "instance": INSTANCE, "fault": "corruption.bitflip", "simulated": "false"}
    assert "corruption.bitflip escaped silently" in alert["annotations"]["summary"]
    # The same through the ALERTS series.
    series = _eventually(lambda: _vector(prometheus, 'ALERTS{alertname="BurninSilentDataCorruption",'
                                                     'alertstate="firing",job="burnin"}'), bool)
    assert [dict(k)["fault"] for k in series] == ["corruption.bitflip"]
    # The flip failed (the kill recovered): the ratio alert for the flip's fault type is at least pending
    # (it waits 1m before firing); none for the kill's.
    ratio = _eventually(lambda: _by(prometheus, 'ALERTS{alertname="BurninFaultFailureRatioHigh",job="burnin"}',
                                    "fault"), lambda g: len(g) >= 1)
    assert set(ratio) == {"corruption.bitflip"}


@pytest.mark.slow
def test_every_dashboard_query_evaluates(run, prometheus):
    dashboard = json.loads((PROM_FILES / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    concrete = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$job": ".+"}
    _eventually(lambda: _vector(prometheus, 'push_time_seconds{job="burnin"}'), bool)
    empty = []
    for expr in exprs:
        for var, value in concrete.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
        # rate() and increase() need two samples of a series: the pushed series have one until Prometheus
        # scrapes the Pushgateway again (a run that ends fast gives the live series few), so each query
        # is polled, bounded. An error fails inside _api; a typo'd name gives nothing, and fails here.
        if not _eventually(lambda: _vector(prometheus, expr), bool):
            empty.append(expr)
    assert not empty, f"dashboard queries with no data after a real run: {empty}"


@pytest.mark.slow
def test_textfile_flag_writes_the_final_metrics_atomically(run):
    def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(path.read_text()) for s in fam.samples
                if not s.name.endswith("_created")}

    assert samples(run["textfile"]) == samples(run["run_dir"] / "metrics.prom")
    assert [p.name for p in run["textfile"].parent.iterdir()] == ["burnin.prom"]  # no temporary file left


# -- promtool --------------------------------------------------------------------------------------


def test_promtool_checks_and_tests_the_shipped_rules(tmp_path):
    promtool = _need("promtool")["promtool"]
    check = subprocess.run([promtool, "check", "rules", str(PROM_FILES / "rules.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    # `burnin rules --dir` hands out the same files; promtool finds rules.yml next to the test file.
    out = run_cli("rules", "--dir", str(tmp_path / "rules"), timeout=60)
    assert out.returncode == 0, out.stderr
    test = subprocess.run([promtool, "test", "rules", str(tmp_path / "rules" / "rules_test.yml")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


# -- no servers needed -----------------------------------------------------------------------------


def _documented() -> dict[str, dict[str, Any]]:
    rows = {}
    text = (ROOT / "docs" / "metrics.md").read_text()
    catalogue = text.split("## Catalogue", 1)[1].split("\n## ", 1)[0]
    for line in catalogue.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`(burnin_\w+)`", cells[0]) if len(cells) == 6 else None
        if m:
            rows[m.group(1)] = {"type": cells[1], "labels": set(re.findall(r"`(\w+)`", cells[3]))}
    return rows


def _exercised() -> Metrics:
    """A Metrics with every labelled child created, from events and a judged result."""
    m = Metrics()
    m.set_run("s", "r")
    for ev in [
        {"t": 1.0, "event": "detection", "detector": "loss_spike", "rank": 0, "step": 0},
        {"t": 2.0, "event": "fault_injected", "fault": "process.kill", "simulated": False},
        {"t": 3.0, "event": "failure_detected", "cause": "killed"},
        {"t": 4.0, "event": "restart"}, {"t": 5.0, "event": "rollback"},
        {"t": 6.0, "event": "step_done", "rank": 0, "step": 0},
        {"t": 7.0, "event": "checkpoint_rejected"},
    ]:
        m.observe(ev)
    m.from_result(_result([_fault("process.kill", "recovered")], false_alarms=1))
    m.lost_steps(1)
    m.judged_fault("corruption.bitflip", "recovered", "fingerprint", 1, "param", "exponent")
    m.burn_in({"health": {"ranks": [{"rank": 0, "verdict": "healthy"}]}, "steps": {"goodput_steps": 1.0},
               "faults": {"per_hour": 60.0}})
    rate = {"count": 1, "rate": 0.5, "ci95": [0.1, 0.9]}
    m.campaign_effects({"effects": {"benign": rate}, "unchecked_effects": {"diverged": rate},
                        "detector_harm": {"detectors": {"any": {"harmful_caught": rate, "benign_flagged": rate}}}})
    return m


def _fault(name: str, outcome: str, simulated: bool = False, index: int = 0) -> FaultResult:
    from burnin.reports.result import RecoveryBreakdown

    rec = RecoveryBreakdown(0.1, 0.1, 1.0, 0.2, 0.1, resumed_from_step=0) if outcome == "recovered" else None
    return FaultResult(index=index, fault=name, rank=0, step=1, point="between_steps", expected=[outcome],
                       outcome=outcome, injected=True, simulated=simulated, recovery=rec)


def _result(faults: list[FaultResult], **kw: Any) -> RunResult:
    d: dict[str, Any] = dict(scenario="s", run_id="r", run_dir="/tmp/r", config_hash="c", ranks=2, steps=3,
                             device="cpu", started_at=0.0, finished_at=1.0, finished=True, final_step=2,
                             final_state_hash="a", golden_state_hash="a", exact=True, diverged_at_step=None,
                             restarts=0, steps_executed=3, final_loss=1.0, loss_floor=None, faults=faults)
    d.update(kw)
    return RunResult(**d)


def test_docs_catalogue_matches_the_registry():
    from burnin.reports.fleet import node_metrics

    documented = _documented()
    registered = {}
    fleet = {"counts": {"healthy": 1, "degraded": 0, "faulty": 0},
             "nodes": {"n1": {"verdict": "healthy", "metrics": {"step_s": 0.1}}}}
    for fam in [*_exercised().registry.collect(), *node_metrics(fleet).collect()]:  # a run's, a fleet's
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        registered[name] = {"type": fam.type, "labels": labels}
    assert set(documented) == set(registered), "docs/metrics.md and metrics.py list different metrics"
    for name, reg in registered.items():
        assert documented[name] == reg, f"{name}: documented {documented[name]}, registered {reg}"


def test_simulated_label_goodput_detections_false_alarms_rollbacks():
    m = Metrics()
    m.set_run("s", "r")
    t = iter(range(100))
    for ev in [
        {"event": "detection", "detector": "loss_spike", "rank": 0},       # before any fault: a false alarm
        {"event": "detection", "detector": "made_up", "rank": 1},          # folded into "other"
        {"event": "fault_injected", "fault": "network.link_down", "simulated": True},
        {"event": "fault_injected", "fault": "process.kill", "simulated": False},
        {"event": "detection", "detector": "fingerprint", "rank": 0},      # after a fault: explained
        {"event": "rollback"},
        *[{"event": "step_done", "rank": 0, "step": s} for s in (0, 1, 2, 1, 2, 3)],  # 1 and 2 replayed
        {"event": "step_done", "rank": 1, "step": 0},                      # rank 1's steps are not counted
    ]:
        m.observe({"t": float(next(t)), **ev})
    v = m.registry.get_sample_value
    assert v("burnin_faults_injected_total", {"fault": "network.link_down", "simulated": "true"}) == 1
    assert v("burnin_faults_injected_total", {"fault": "process.kill", "simulated": "false"}) == 1
    assert v("burnin_fault_outcomes_total", {"fault": "network.link_down", "outcome": "sdc", "simulated": "true"}) == 0
    assert v("burnin_training_steps_total") == 6 and v("burnin_useful_steps_total") == 4
    assert v("burnin_rollbacks_total") == 1
    assert v("burnin_detections_total", {"detector": "loss_spike"}) == 1
    assert v("burnin_detections_total", {"detector": "other"}) == 1
    assert v("burnin_detections_total", {"detector": "fingerprint"}) == 1
    for d in DETECTORS:  # every detector's series exists from the start
        assert v("burnin_false_alarms_total", {"detector": d}) == 0
    m.from_result(_result([_fault("network.link_down", "recovered", simulated=True),
                           _fault("process.kill", "sdc", index=1)], false_alarms=2))
    assert v("burnin_fault_outcomes_total", {"fault": "network.link_down", "outcome": "recovered",
                                             "simulated": "true"}) == 1
    assert v("burnin_fault_outcomes_total", {"fault": "process.kill", "outcome": "sdc", "simulated": "false"}) == 1
    assert v("burnin_false_alarms_total", {"detector": "loss_spike"}) == 1
    assert v("burnin_false_alarms_total", {"detector": "other"}) == 1
    assert v("burnin_false_alarms_total", {"detector": "fingerprint"}) == 0


def test_replaying_the_events_of_a_run_resets_per_run_state():
    m = Metrics()
    for run_id in ("r1", "r2"):
        m.set_run("s", run_id)
        for step in (0, 1, 2):
            m.observe({"t": 1.0, "event": "step_done", "rank": 0, "step": step})
    assert m.registry.get_sample_value("burnin_useful_steps_total") == 6


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:9091", "127.0.0.1:9091", "http://", "pushgateway"])
def test_pushgateway_url_is_checked_before_anything_runs(url, tmp_path):
    proc = run_cli("run", "kill-rank", "--out", str(tmp_path / "runs"), "--pushgateway", url, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pushgateway" in lines[0] and "http" in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_failed_push_is_one_warning_line(capsys, tmp_path):
    from burnin.harness.runner import _export_metrics

    m = Metrics()
    m.set_run("s", "r")
    closed = _free_port()  # nothing listens there
    _export_metrics(m, "s", tmp_path / "m.prom", f"http://127.0.0.1:{closed}", "host-1")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"burnin: warning: metrics not pushed to http://127.0.0.1:{closed}")
    assert (tmp_path / "m.prom").is_file()  # the textfile is written all the same


def test_linger_waits_for_one_scrape_after_the_end():
    m = Metrics()
    server = m.serve(0)
    t0 = time.monotonic()

    def scrape() -> None:
        time.sleep(0.3)
        urllib.request.urlopen(server.url, timeout=5).read()

    th = threading.Thread(target=scrape)
    th.start()
    m.stop(linger_s=10)
    th.join(timeout=10)
    assert 0.3 <= time.monotonic() - t0 < 3  # returned after the scrape, not after 10 s
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)

    m2 = Metrics()
    m2.serve(0)
    t0 = time.monotonic()
    m2.stop(linger_s=0.5)  # nobody scrapes: gives up at the bound
    assert 0.5 <= time.monotonic() - t0 < 2


def test_a_fleet_pushes_each_node_as_a_group_of_its_own(pushgateway):
    """`burnin fleet run/report --pushgateway`: one group per node, {job="burnin", fleet, node}, holding that
    node's health (0 healthy, 1 degraded, 2 faulty) and step time; a later push of one node replaces only
    that node's group."""
    from burnin.harness.fleet import push_nodes

    def fleet(verdicts: dict[str, str]) -> dict:
        return {"fleet_id": "fleet-push-test", "counts": {}, "nodes": {
            name: {"verdict": v, "metrics": {"step_s": 0.1 + i / 100}} for i, (name, v) in enumerate(verdicts.items())}}

    def groups() -> dict[str, dict[str, float]]:
        with urllib.request.urlopen(f"{pushgateway.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, dict[str, float]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.labels.get("fleet") == "fleet-push-test" and s.name.startswith("burnin_node_"):
                    assert s.labels["job"] == "burnin"
                    out.setdefault(s.labels["node"], {})[s.name] = s.value
        return out

    push_nodes(fleet({"n1": "healthy", "n2": "degraded", "n3": "faulty"}), pushgateway.url)
    got = groups()
    assert {n: g["burnin_node_health"] for n, g in got.items()} == {"n1": 0.0, "n2": 1.0, "n3": 2.0}
    assert got["n2"]["burnin_node_step_seconds"] == pytest.approx(0.11)
    push_nodes(fleet({"n3": "healthy"}), pushgateway.url)  # n3 judged again: only its group changes
    assert {n: g["burnin_node_health"] for n, g in groups().items()} == {"n1": 0.0, "n2": 1.0, "n3": 0.0}
