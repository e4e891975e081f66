"""report.html: one self-contained page per run, campaign, burn-in and comparison, from real runs.

One `burnin run smoke`, one small data campaign and one short burn-in are shared by the module; the
pages are checked for what a reader relies on (the faults marked on the loss plot, the restarts on the
timeline, nothing fetched from the network, every scenario string escaped), never for a loss value.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import CI, run_cli, run_dir_of

from burnin.core.events import read_events
from burnin.reports.fleet import write_fleet_reports
from burnin.reports.result import FaultResult

SDC = """\
name: sdc-html
workload: {model: tiny, ranks: 2, steps: 12, threads: 1}
detectors: {nonfinite: {}, fingerprint: {every: 1}}
recovery: {mode: rollback, max_rollbacks: 4}
campaign: {trials: 4, seed: 5, warmup: 4, window: 6, controls: 2}
faults:
  - fault: corruption.bitflip
    step: 4
    params: {target: param}
    vary: {rank: [0, 1], step: {min: 4, max: 8}, bit_class: [exponent, sign]}
"""

BURN_IN = """\
name: burn-in-html
workload: {model: tiny, ranks: 2, threads: 1}
checkpoint: {every: 5, keep: 2}
timeouts: {heartbeat_s: 2}
burn_in:
  duration_s: 14
  seed: 1
  quiet_start_s: 3
  quiet_end_s: 3
  faults:
    - {fault: process.kill, per_hour: 1200, expect: recovered}
"""

HOSTILE = '<script>alert("x")</script><img src="https://evil.example/x.png" onerror="alert(1)"> & </table>'


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html-smoke") / "runs"
    proc = run_cli("run", "smoke", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir_of(out)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("html-campaign")
    (tmp / "sdc.yaml").write_text(SDC)
    proc = run_cli("campaign", str(tmp / "sdc.yaml"), "--out", str(tmp / "runs"), "--quiet", timeout=300)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return run_dir_of(tmp / "runs")


class _Page(HTMLParser):
    """Every element's tag and attributes, in order."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    handle_startendtag = handle_starttag

    def ids(self) -> dict[str, tuple[str, dict[str, str]]]:
        return {a["id"]: (t, a) for t, a in self.elements if "id" in a}


def _self_contained(text: str) -> _Page:
    page = _Page(text)
    for tag, attrs in page.elements:
        assert tag not in ("script", "iframe", "object", "embed"), (tag, attrs)
        assert not (tag == "link" and "stylesheet" in attrs.get("rel", "")), attrs
        for name, value in attrs.items():
            if name in ("src", "href", "xlink:href", "srcset", "action", "poster") or name.startswith("on"):
                assert not re.match(r"\s*(https?:|//|data:text/html|javascript:)", value, re.I), (tag, name, value)
                assert not name.startswith("on"), (tag, name)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", text, re.I)
    ids = [a["id"] for _, a in page.elements if "id" in a]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    return page


def _svg_group_paths(text: str, gid: str) -> str:
    """The markup of the SVG group with this id, nested groups included."""
    start = text.index(f'id="{gid}"')
    depth, pos = 1, start
    while depth:
        m = re.compile(r"<g[\s>]|</g>").search(text, pos)
        assert m is not None, gid
        depth += -1 if m.group() == "</g>" else 1
        pos = m.end()
    return text[start:pos]


# -- a run ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_writes_a_self_contained_report_with_its_verdict_and_tables(smoke: Path) -> None:
    summary = json.loads((smoke / "summary.json").read_text())
    text = (smoke / "report.html").read_text()
    page = _self_contained(text)
    assert "http://" not in text and "https://" not in text
    ids = page.ids()
    assert ids["verdict"][1]["data-verdict"] == ("PASS" if summary["passed"] else "FAIL")
    for part in ("key-figures", "expectations", "faults", "failures", "loss-plot", "timeline-plot"):
        assert part in ids, part
    rows = [a for t, a in page.elements if t == "tr" and "data-fault" in a]
    assert [(int(a["data-fault"]), a["data-outcome"]) for a in rows] == \
        [(f["index"], f["outcome"]) for f in summary["faults"]]
    # the recovery breakdown of each recovered fault, as a stacked bar in its row
    assert text.count('class="phases"') == sum(f["recovery"] is not None for f in summary["faults"])
    assert "class=\"plot-failed\"" not in text


@pytest.mark.slow
def test_the_loss_plot_marks_every_fault_where_it_fired_and_the_loss_floor(smoke: Path) -> None:
    summary = json.loads((smoke / "summary.json").read_text())
    text = (smoke / "report.html").read_text()
    ids = _Page(text).ids()
    fired = [f for f in summary["faults"] if f["injected"]]
    assert len(fired) == 5
    tag, fig = ids["loss-plot"]
    assert tag == "figure" and fig["data-marked"] == "5"
    assert fig["data-faults"].split() == [str(f["index"]) for f in fired]
    marks = sorted(int(m) for m in re.findall(r'id="loss-fault-(\d+)"', text))
    assert marks == [f["index"] for f in fired]
    for f in fired:
        assert f'id="loss-fault-{f["index"]}-label"' in text
        # the label names the fault; the caption says where it fired
        assert re.search(rf'<li data-fault="{f["index"]}" data-step="{f["step"]}">', text)
    label = _svg_group_paths(text, "loss-fault-0-label")
    assert "process.kill" in label
    # the plot is not empty: the golden run and each rank's loss over every step
    for rank in (0, 1):
        path = _svg_group_paths(text, f"loss-rank-{rank}")
        assert len(re.findall(r"\bL\s", path)) >= summary["steps"] - 1, path[:300]
    assert len(re.findall(r"\bL\s", _svg_group_paths(text, "loss-golden"))) >= summary["steps"] - 1
    assert 'id="loss-floor"' in text and "loss floor" in text
    assert 'id="loss-divergence"' not in text  # recovered exactly: no divergence to mark


@pytest.mark.slow
def test_the_timeline_shows_each_attempt_the_restarts_and_the_recovery_phases(smoke: Path) -> None:
    summary = json.loads((smoke / "summary.json").read_text())
    events = read_events(smoke / "events.jsonl")
    text = (smoke / "report.html").read_text()
    ids = _Page(text).ids()
    assert summary["restarts"] == 3
    fig = ids["timeline-plot"][1]
    assert fig["data-restarts"] == "3" and fig["data-failures"] == str(len(summary["failures"]))
    assert sorted(int(n) for n in re.findall(r'id="timeline-restart-(\d+)"', text)) == [1, 2, 3]
    assert all(f'id="timeline-failure-{k}"' in text for k in range(len(summary["failures"])))
    attempts = {(e["rank"], e["attempt"]) for e in events if e.get("event") == "step_done"}
    assert len(attempts) == 8  # 2 ranks x 4 attempts
    for rank, attempt in attempts:
        bar = _svg_group_paths(text, f"timeline-attempt-{rank}-{attempt}")
        assert "<path" in bar
    for f in summary["faults"]:
        assert f'id="timeline-fault-{f["index"]}"' in text
    # every failure's recovery, its phases stacked in the recovery lane
    recovered = [x for x in summary["failures"] if x["fault_index"] is not None]
    for k, _ in enumerate(recovered):
        for phase in ("detection", "teardown", "restart", "checkpoint_load", "first_step"):
            assert f'id="timeline-recovery-{k}-{phase}"' in text, (k, phase)


@pytest.fixture(scope="module")
def hostile_copy(smoke: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke run's directory (without checkpoints) with a hostile description, a hostile failure detail,
    and a golden record that disagrees with the run's loss from step 20 on."""
    copy = tmp_path_factory.mktemp("html-copy") / smoke.name
    shutil.copytree(smoke, copy, ignore=shutil.ignore_patterns("checkpoints"))
    sc = json.loads((copy / "scenario.json").read_text())
    sc["description"] = HOSTILE
    (copy / "scenario.json").write_text(json.dumps(sc))
    lines = []
    for line in (copy / "events.jsonl").read_text().splitlines():
        ev = json.loads(line)
        if ev.get("event") == "failure_detected":
            ev["detail"] = HOSTILE
        lines.append(json.dumps(ev))
    (copy / "events.jsonl").write_text("\n".join(lines) + "\n")
    golden = json.loads((copy / "golden.json").read_text())
    bits = golden["loss_bits"]["0"]
    bits["20"] = f"{int(bits['20'], 16) ^ 1:08x}"
    (copy / "golden.json").write_text(json.dumps(golden))
    return copy


@pytest.mark.slow
def test_burnin_report_rebuilds_the_page_and_escapes_what_the_scenario_says(hostile_copy: Path) -> None:
    (hostile_copy / "report.html").unlink()
    proc = run_cli("report", str(hostile_copy))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (hostile_copy / "report.html").read_text()
    page = _self_contained(text)
    assert not any(t == "img" for t, _ in page.elements)
    assert "<script" not in text.lower() and "</table>" not in text.split('id="description"')[1].split("</p>")[0]
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert page.ids()["description"][0] == "p"
    assert text.count("&lt;img src=&quot;https://evil.example/x.png&quot;") >= 2  # the description and a failure
    # a golden record that disagrees at step 20: the divergence is marked where the bits first differ
    assert 'id="loss-divergence"' in text and "diverged at step 20" in text


@pytest.mark.slow
def test_a_plot_that_fails_leaves_a_note_and_every_other_report(hostile_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from burnin.harness.runner import rebuild_reports
    from burnin.reports import html, plots
    from burnin.reports.writers import write_reports

    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("no renderer <today>")

    for name in ("summary.json", "junit.xml", "summary.md", "report.html"):
        (hostile_copy / name).unlink()
    monkeypatch.setattr(plots, "loss_plot", broken)
    result = rebuild_reports(hostile_copy)
    for name in ("summary.json", "junit.xml", "summary.md", "report.html"):
        assert (hostile_copy / name).is_file(), name
    text = (hostile_copy / "report.html").read_text()
    tag, fig = _Page(text).ids()["loss-plot"]
    assert fig.get("class") == "plot-failed"
    assert "This plot could not be drawn (RuntimeError: no renderer &lt;today&gt;)" in text
    assert fig["data-marked"] == "5" and text.count("<li data-fault=") == 5  # the caption still lists the faults
    assert 'id="timeline-restart-3"' in text  # the other plot stands
    # the whole page failing costs a warning, not the other reports
    monkeypatch.setattr(html, "run_page", broken)
    for name in ("summary.json", "junit.xml", "summary.md", "report.html"):
        (hostile_copy / name).unlink()
    paths = write_reports(result, hostile_copy, html=True)
    assert set(paths) == {"json", "junit", "markdown"}
    assert all(p.is_file() for p in paths.values()) and not (hostile_copy / "report.html").exists()
    assert "report.html not written: RuntimeError: no renderer" in capsys.readouterr().err


def test_matplotlib_is_imported_only_when_a_page_is_drawn() -> None:
    code = ("import sys, burnin.reports.html, burnin.reports.plots, burnin.reports.writers, burnin.harness.runner, "
            "burnin.harness.campaign, burnin.harness.burn_in, burnin.cli; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_fault_with_a_duration_is_a_band_over_the_steps_it_lasted() -> None:
    from burnin.reports.plots import fault_marks

    events = [{"event": "step_done", "rank": 0, "step": s, "t": 100.0 + s} for s in range(20)]
    events.append({"event": "fault_injected", "fault_index": 0, "step": 5, "point": "before_forward", "t": 105.5})
    events.append({"event": "fault_injected", "fault_index": 1, "step": 12, "point": "between_steps", "t": 112.2})
    link = FaultResult(index=0, fault="network.link_down.simulated", rank=1, step=5, point="before_forward",
                       expected=["recovered"], outcome="recovered", injected=True, details={"duration_s": 3.0})
    slow = FaultResult(index=1, fault="process.straggler", rank=0, step=12, point="between_steps",
                       expected=["masked"], outcome="masked", injected=True)
    never = FaultResult(index=2, fault="process.kill", rank=0, step=30, point="between_steps",
                        expected=["recovered"], outcome="failed", injected=False)
    marks = fault_marks([link, slow, never], events, {1: {"steps": 4}})
    assert [m["index"] for m in marks] == [0, 1]  # a fault that never fired is not marked
    assert marks[0]["x"] == 5 and marks[0]["band"] == (5, 9)  # steps 6, 7, 8 completed within the 3 s
    assert marks[1]["x"] == 12.5 and marks[1]["band"] == (12, 16)


# -- campaigns, comparisons, burn-ins ---------------------------------------------------------------

@pytest.mark.slow
def test_a_campaign_page_shows_outcome_rates_and_the_scorecard_heat_map(campaign: Path) -> None:
    summary = json.loads((campaign / "campaign.json").read_text())
    text = (campaign / "report.html").read_text()
    page = _self_contained(text)
    ids = page.ids()
    assert "outcomes-plot" in ids and "scorecard-plot" in ids and "class=\"plot-failed\"" not in text
    outcomes = [o for o in summary["outcomes"]]
    assert all(f'id="outcomes-bar-{k}"' in text for k in range(len(outcomes)))
    card = summary["scorecard"]
    dets = sorted({d for row in card for d in row["detectors"]})
    assert ids["scorecard-plot"][1]["data-rows"] == str(len(card))
    assert ids["scorecard-plot"][1]["data-detectors"].split() == dets
    assert 'id="scorecard-detectors"' in text and 'id="scorecard-sdc"' in text
    for i in range(len(card)):
        for j in range(len(dets)):
            assert f'id="scorecard-cell-{i}-{j}"' in text
    # the interval of each rate is on the page as well as in the plot
    for o, v in summary["outcomes"].items():
        assert f"{v['ci95'][0]:.3f} – {v['ci95'][1]:.3f}" in text
    # the effect classes of the silent trials, and each detector against harm (every trial run unchecked)
    assert "effects" in ids and "detector-harm" in ids and "unchecked" in ids
    harm = summary["detector_harm"]
    assert harm["trials"] == 4 and harm["unknown"] == 0 and set(harm["detectors"]) == {*dets, "any"}
    for d, v in harm["detectors"].items():
        assert f"<td>{d}</td><td>{v['harmful_caught']['count']}/{harm['harmful']}</td>" in text
    # `burnin report` rebuilds a campaign's page from its summary
    (campaign / "report.html").unlink()
    proc = run_cli("report", str(campaign))
    assert proc.returncode == 0 and "rebuilt" in proc.stdout, proc.stdout + proc.stderr
    # the same page; its footer links the files beside it, and metrics.prom came after the first page
    assert (campaign / "report.html").read_text().split("<footer")[0] == text.split("<footer")[0]


@pytest.mark.slow
def test_compare_writes_both_sides_with_their_intervals_to_the_page_asked_for(campaign: Path, tmp_path: Path) -> None:
    page_path = tmp_path / "pages" / "compare.html"
    proc = run_cli("compare", str(campaign), str(campaign), "--html", str(page_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("# ")  # the Markdown on stdout as before
    text = page_path.read_text()
    page = _self_contained(text)
    rows = [a for t, a in page.elements if t == "tr" and "data-metric" in a]
    rates = [a for a in rows if "rate" in a["data-metric"]]
    assert rates and all(f'id="compare-a-{k}"' in text and f'id="compare-b-{k}"' in text
                         and f'id="compare-diff-{k}"' in text for k in range(len(rates)))
    assert "paired: both sides ran the same trials" in text
    bad = run_cli("compare", str(campaign), str(campaign), "--html", str(tmp_path))
    assert bad.returncode == 2 and "--html" in bad.stderr and "Traceback" not in bad.stderr


def test_a_recovery_campaign_page_shows_recovery_time_per_phase() -> None:
    from burnin.harness.recovery_campaign import summarize
    from burnin.reports.html import campaign_page
    from burnin.scenarios.schema import Scenario

    sc = Scenario.model_validate({"name": "kills", "faults": [{"fault": "process.kill", "rank": 1, "step": 4}]})
    trials = []
    for k in range(6):
        fault = ("process.kill", "process.hang")[k % 2]
        rec = {"detection_s": 0.05 + 0.01 * k, "teardown_s": 0.1, "restart_s": 0.08, "checkpoint_load_s": 0.2,
               "first_step_s": 0.15}
        rec["total_s"] = sum(rec.values())
        trials.append({"trial": k, "fault": {"fault": fault}, "outcome": "recovered", "exact": True, "ok": True,
                       "lost_steps": k % 3, "recovery": {**rec, "new_ranks": "warm spares"}, "tier": "memory",
                       "unexplained": [], "wall_s": 1.3, "error": None})
    summary = summarize(sc, trials)
    text = campaign_page(summary)
    ids = _self_contained(text).ids()
    assert "outcomes-plot" in ids and "phases-plot" in ids and "by-fault" in ids
    assert 'class="plot-failed"' not in text
    for y in range(2):
        for phase in ("detection", "teardown", "restart", "checkpoint_load", "first_step"):
            assert f'id="phases-{y}-{phase}"' in text


@pytest.fixture(scope="module")
def burn_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("html-burn-in")
    (tmp / "bi.yaml").write_text(BURN_IN)
    proc = run_cli("burn-in", str(tmp / "bi.yaml"), "--out", str(tmp / "runs"), "--quiet", timeout=300)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return run_dir_of(tmp / "runs")


@pytest.mark.slow
def test_a_burn_in_page_shows_health_over_time_and_the_verdicts(burn_in: Path) -> None:
    run_dir = burn_in
    summary = json.loads((run_dir / "burn-in.json").read_text())
    text = (run_dir / "report.html").read_text()
    page = _self_contained(text)
    ids = page.ids()
    assert ids["verdict"][1]["data-verdict"] == ("PASS" if summary["ok"] else "FAIL")
    assert 'class="plot-failed"' not in text
    verdicts = {int(a["data-rank"]): a["data-verdict"] for t, a in page.elements if t == "tr" and "data-rank" in a}
    assert verdicts == {r["rank"]: r["verdict"] for r in summary["health"]["ranks"]}
    for r in summary["health"]["ranks"]:
        assert f'id="health-rank-{r["rank"]}"' in text and f'id="health-verdict-{r["rank"]}"' in text
    assert 'id="health-threshold"' in text
    fired = summary["faults"]["list"]
    assert fired and all(f'id="health-fault-{f["index"]}"' in text for f in fired)
    assert ids["timeline-plot"][1]["data-restarts"] == str(summary["restarts"])
    assert len(re.findall(r'id="timeline-restart-\d+"', text)) == summary["restarts"]


# -- in a real browser ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_page_renders_in_headless_chromium_without_an_error(smoke: Path, campaign: Path, burn_in: Path,
                                                                    tmp_path: Path) -> None:
    """Debian's chromium, headless, over the DevTools protocol (tests/_browser.py): each page loads from
    its file with no console error or warning and no exception, every figure has a drawing that is not
    blank, and screenshots are saved (to $BURNIN_SCREENSHOTS too, when set, for a person to look at)."""
    import _browser

    if _browser.CHROMIUM is None:
        if CI:
            pytest.fail("chromium is not installed (make sysdeps installs it; BURNIN_CI=1)")
        pytest.skip("chromium is not installed (make sysdeps)")
    proc = run_cli("forecast", str(smoke))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    compare = tmp_path / "compare.html"
    proc = run_cli("compare", str(campaign), str(campaign), "--html", str(compare))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fleet_dir = tmp_path / "fleet"
    fleet_dir.mkdir()
    write_fleet_reports(_a_fleet(), fleet_dir)
    pages = {"run": smoke / "report.html", "forecast": smoke / "forecast.html", "campaign": campaign / "report.html",
             "burn-in": burn_in / "report.html", "compare": compare, "fleet": fleet_dir / "fleet.html"}
    expected = {"run": {"loss-plot", "timeline-plot"}, "forecast": {"forecast-plot"},
                "campaign": {"outcomes-plot", "scorecard-plot"}, "burn-in": {"health-plot", "timeline-plot"},
                "compare": {"compare-plot"}, "fleet": set()}
    shots = Path(os.environ.get("BURNIN_SCREENSHOTS") or tmp_path / "screenshots")
    for name, path in pages.items():
        page = _browser.open_page(path, shots / name)
        assert page.errors == [], (name, page.errors)
        figures = {f["id"]: f for f in page.figures}
        assert expected[name] <= set(figures), (name, sorted(figures))
        for fid, fig in figures.items():
            assert fig["graphic"] in ("svg", "img") and fig["graphic_width"] > 100 and fig["graphic_height"] > 100, \
                (name, fid, fig)
            assert fig["drawn"] > 10, (name, fid, fig)
            assert _browser.ink(page.figure_shots[fid]) > 0.02, (name, fid, "blank")
        assert _browser.ink(page.screenshot) > 0.02


def _a_fleet() -> dict:
    """A judged fleet of three nodes, one of each verdict (what `burnin.reports.fleet.judge_fleet` returns)."""
    def node(name: str, verdict: str, step_s: float, reasons: list[str]) -> dict:
        return {"node": name, "verdict": verdict, "reasons": reasons,
                "metrics": {"step_s": step_s, "compute_s": step_s / 2, "cpu_wait_share": 0.4, "recovery_s": 0.4,
                            "checkpoint_s": 0.07, "unexplained_failures": 0, "goodput_steps": 0.99},
                "quorum": {"status": "minority" if verdict == "faulty" else "agrees",
                           "step": 99 if verdict == "faulty" else None}}
    nodes = {"n1": node("n1", "healthy", 0.10, []),
             "n2": node("n2", "degraded", 0.13, ["slow: step time 1.30x its class's median in 12 of 12 periods"]),
             "n3": node("n3", "faulty", 0.10, ["SDC suspect: outvoted by the determinism quorum at step 99"])}
    return {"fleet_id": "fleet-html", "scenario": "fleet", "seed": 1, "started_at": 0.0, "ok": False,
            "counts": {"healthy": 1, "degraded": 1, "faulty": 1}, "nodes": nodes, "ranking": ["n3", "n2", "n1"],
            "concentration": {"findings": 2, "top_k_share": {"1": 0.5}}, "repeat_offenders": [], "classes": [],
            "thresholds": {"slow_ratio": 1.05, "significance": 0.01, "min_periods": 5, "min_steps_per_period": 5}}
