"""`burnin forecast`: the model's arithmetic on fixed numbers, the inputs it reads from a run directory,
the command on one real run (invariants only: its numbers are this machine's), and bad input.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from conftest import main_in, run_cli, run_dir_of
from hypothesis import example, given, settings
from hypothesis import strategies as st

from burnin.errors import UserError
from burnin.reports import forecast as fc
from burnin.reports.failure_models import bundled, load

# -- the model: Young, Daly, the useful fraction -------------------------------------------------------


def test_young_interval_by_hand() -> None:
    # sqrt(2 * 60 s * 3 h) = sqrt(1,296,000 s^2) = 1138.4199... s
    assert fc.young_interval(60, 3 * 3600) == pytest.approx(1138.4199576606, rel=1e-12)
    assert fc.young_interval(8, 1) == pytest.approx(4.0)


def test_daly_interval_by_hand() -> None:
    # delta = 60, M = 10800: x = delta / 2M = 1/360; sqrt(2 delta M) = 1138.41996
    # tau = 1138.41996 * (1 + sqrt(1/360)/3 + 1/(9 * 360)) - 60 = 1138.41996 * 1.01787695 - 60 = 1098.7713
    assert fc.daly_interval(60, 10800) == pytest.approx(1098.7713218, rel=1e-9)
    # delta >= 2M: checkpoint every M
    assert fc.daly_interval(100, 40) == 40
    assert fc.daly_interval(80, 40) == 40
    # far from failures it tends to Young's
    assert fc.daly_interval(1, 1e9) == pytest.approx(fc.young_interval(1, 1e9), rel=1e-4)


def test_daly_interval_maximises_the_useful_fraction() -> None:
    """Daly's estimate sits at the maximum of the exact expectation it approximates."""
    for delta, restart, mtbf in ((60, 300, 10800), (2, 0.5, 1800), (600, 900, 7200), (0.1, 10, 1e6)):
        tau = fc.daly_interval(delta, mtbf)
        best = fc.useful_fraction(tau, delta, restart, mtbf)
        for f in (0.5, 0.8, 0.95, 1.05, 1.25, 2.0):
            assert fc.useful_fraction(tau * f, delta, restart, mtbf) <= best + 1e-12


def test_useful_fraction_by_hand() -> None:
    # tau / (M e^{R/M} (e^{(tau+delta)/M} - 1)), tau = 1098.7713, delta = 60, R = 300, M = 10800:
    # e^{300/10800} = 1.0281672, e^{1158.7713/10800} - 1 = 0.1132609; 10800 * 1.0281672 * 0.1132609 = 1257.6700
    assert fc.useful_fraction(1098.7713218450797, 60, 300, 10800) == pytest.approx(0.87365311, rel=1e-7)
    # no failures: only the checkpoints cost
    assert fc.useful_fraction(100, 5, 50, 1e15) == pytest.approx(100 / 105, rel=1e-9)
    # first order (Young): 1 - delta/tau - (R + tau/2)/M, close when everything is small against M
    tau, delta, r, m = 50.0, 0.01, 2.0, 1e6
    assert fc.useful_fraction(tau, delta, r, m) == pytest.approx(1 - delta / tau - (r + tau / 2) / m, abs=1e-6)
    # a failure rate far beyond the recovery: nothing useful, no overflow
    assert fc.useful_fraction(10, 1, 1e6, 1.0) == 0.0


def test_tier_goodput_levels() -> None:
    g, tau, k = fc.tier_goodput(1 / 10800, 300, 60)
    assert (g, k) == (pytest.approx(0.87365311, rel=1e-7), None) and tau == pytest.approx(1098.7713, rel=1e-7)
    # nothing resumes from disk: no checkpoint interval, nothing lost
    assert fc.tier_goodput(0.0, 300, 60) == (1.0, None, None)
    # the memory level: the best whole number of steps between snapshots, and a product of the two levels
    g2, _, k2 = fc.tier_goodput(1 / 10800, 300, 60, lam_memory=1 / 3600, restart_memory=1.0, snapshot_s=0.5,
                                step_s=2.0)
    mem = fc.useful_fraction(k2 * 2.0, 0.5, 1.0, 3600)
    assert g2 == pytest.approx(g * mem, rel=1e-12)
    assert k2 == round(fc.daly_interval(0.5, 3600) / 2.0) or abs(k2 - fc.daly_interval(0.5, 3600) / 2.0) < 1
    for other in (k2 - 1, k2 + 1):
        assert fc.useful_fraction(other * 2.0, 0.5, 1.0, 3600) <= mem
    # snapshots that cost nothing: every step
    assert fc.tier_goodput(0.0, 0, 1, lam_memory=1e-4, restart_memory=1, snapshot_s=0, step_s=1)[2] == 1


# -- the failure model -----------------------------------------------------------------------------------

def test_llama3_model_adds_up_and_gives_three_hours_at_16k() -> None:
    m = load("llama3")
    assert "llama3" in bundled()
    assert m.total == 419 and len(m.categories) == 18
    assert (m.gpus, m.days, m.planned) == (16384, 54, 47)
    counts = {c.name: c.count for c in m.categories}
    assert counts["Faulty GPU"] == 148 and counts["GPU HBM3 memory"] == 72 and counts["Software bug"] == 54
    # "one interruption every three hours": 54 days * 24 h / 419 = 3.093 h on 16,384 GPUs
    per_gpu_s = sum(m.rates_by_scope().values())
    assert 1 / (per_gpu_s * 16384) / 3600 == pytest.approx(54 * 24 / 419, rel=1e-12)
    assert 2.9 < 54 * 24 / 419 < 3.2
    # the machines stay up for software bugs, NCCL timeouts and dependencies: 63 of 419
    assert sum(c.count for c in m.categories if c.scope == "process") == 63


def test_failure_model_from_a_file(tmp_path: Path) -> None:
    y = tmp_path / "ours.yaml"
    y.write_text("name: ours\ngpus: 1000\ndays: 10\ncategories:\n"
                 "  - {name: gpu, count: 5, scope: machine}\n  - {name: nccl, count: 5, scope: process}\n")
    m = load(str(y))
    assert m.rates_by_scope()["machine"] == pytest.approx(5 / (1000 * 10 * 86400))
    j = tmp_path / "ours.json"
    j.write_text(json.dumps({"name": "j", "gpus": 8, "days": 1, "categories": [{"name": "x", "count": 1,
                                                                              "scope": "process"}]}))
    assert load(str(j)).total == 1


@pytest.mark.parametrize("text, needle", [
    ("name: x\ngpus: 10\ndays: 1\ncategories: [{name: a, count: 1, scope: rack}]\n", "categories.0.scope"),
    ("name: x\ngpus: 0\ndays: 1\ncategories: [{name: a, count: 1, scope: machine}]\n", "gpus"),
    ("name: x\ngpus: 10\ndays: .nan\ncategories: [{name: a, count: 1, scope: machine}]\n", "days"),
    ("name: x\ngpus: 10\ndays: 1\ncategories: [{name: a, count: 0, scope: machine}]\n", "every count is 0"),
    ("name: x\ngpus: 10\ndays: 1\ncategories: [{name: a, count: 1, scope: machine}, {name: a, count: 1, "
     "scope: machine}]\n", "appears twice"),
    ("name: x\ngpus: 10\ndays: 1\ncategories: [{name: a, count: -1, scope: machine}]\n", "categories.0.count"),
    ("name: x\ngpus: 10\ndays: 1\nrate: 3\ncategories: [{name: a, count: 1, scope: machine}]\n", "rate"),
    ("categories: [\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_failure_model_errors_name_the_field(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as exc:
        load(str(f))
    msg = str(exc.value)
    assert msg.startswith("--failure-model: ") and needle in msg and "\n" not in msg, msg


# -- inputs read from a run directory: a fixed one ----------------------------------------------------------

def _fixed_run(d: Path, name: str = "fixed") -> Path:
    """A run directory with given numbers: two warm-spare restarts, one from memory, one from disk."""
    d.mkdir(parents=True)
    (d / "scenario.json").write_text(json.dumps({"name": name, "checkpoint": {"every": 5, "memory_every": 1}}))
    rec = lambda det, tear, rst, load_, first, new: {  # noqa: E731
        "detection_s": det, "teardown_s": tear, "restart_s": rst, "checkpoint_load_s": load_, "first_step_s": first,
        "resumed_from_step": 0, "new_ranks": new}
    (d / "summary.json").write_text(json.dumps({
        "scenario": name,
        "failures": [{"attempt": 0, "fault_index": 0, "fault_indices": [0]},
                     {"attempt": 1, "fault_index": 1, "fault_indices": [1]}],
        "faults": [{"index": 0, "fault": "process.kill", "recovery": rec(0.02, 0.05, 0.04, 0.1, 0.3, "warm spares"),
                    "lost_steps": 0},
                   {"index": 1, "fault": "process.kill", "recovery": rec(0.03, 0.05, 0.06, 0.2, 0.3, "warm spares"),
                    "lost_steps": 3}]}))
    ev = [{"event": "spare_used", "rank": 0, "attempt": 1, "warm_s": 4.0},
          {"event": "checkpoint_saved", "rank": 0, "attempt": 0, "checkpoint_step": 5, "seconds": 2.0},
          {"event": "resumed", "rank": 0, "attempt": 1, "tier": "memory"},
          {"event": "resumed", "rank": 0, "attempt": 2, "tier": "disk"}]
    t = 100.0
    for step in range(10):  # 0.2 s steps, 0.01 s between them, 2 s more after the step that saves checkpoint 5
        t += 0.2
        ev.append({"event": "step_done", "rank": 0, "attempt": 0, "step": step, "dt": 0.2, "t": t})
        t += 2.01 if step == 4 else 0.01
    (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev))
    return d


def test_reads_a_fixed_run(tmp_path: Path) -> None:
    m = fc.read_source(_fixed_run(tmp_path / "run"))
    assert (m.kind, m.scenario, len(m.recoveries)) == ("run", "fixed", 2)
    assert [(r.warm, r.tier, r.lost_steps) for r in m.recoveries] == [(True, "memory", 0), (True, "disk", 3)]
    assert m.checkpoint_s == [2.0] and m.warmup_s == [4.0]
    assert m.step_s.value == pytest.approx(0.2) and m.step_s.how == "measured"
    assert m.snapshot_s.value == pytest.approx(0.01)  # the gap after the checkpoint's step is left out

    f = fc.forecast(m, load("llama3"), [1000, 100000])
    rec = f["tiers"]["in-memory snapshots"]["recovery"]
    # warm from memory: detection 0.025 + teardown 0.05 + restart 0.05 + load 0.1 + first step (0.3 - 0.2)
    assert rec["warm, from memory"]["downtime_s"] == pytest.approx(0.325)
    assert rec["warm, from memory"]["how"] == "measured"
    assert rec["warm, from disk"]["downtime_s"] == pytest.approx(0.425)
    cold = f["tiers"]["disk restart"]["recovery"]["cold, from disk"]
    # no cold restart measured: the warm restart (0.05) plus a spare's warm-up (4.0)
    assert cold["phases"]["restart_s"]["value"] == pytest.approx(4.05) and cold["how"] == "assumed"
    assert "warm-up" in cold["phases"]["restart_s"]["where"]
    assert f["tiers"]["disk restart"]["how"] == "assumed"
    assert f["tiers"]["warm spares"]["how"] == f["tiers"]["in-memory snapshots"]["how"] == "measured"
    assert (f["inputs"]["checkpoint_s"]["value"], f["inputs"]["checkpoint_s"]["how"]) == (2.0, "measured")
    json.dumps(f, allow_nan=False)


def test_fixed_inputs_order_the_tiers_and_fall_with_scale(tmp_path: Path) -> None:
    m = fc.read_source(_fixed_run(tmp_path / "run"))
    model = load("llama3")
    grid = [int(1000 * 1.2 ** i) for i in range(0, 40)]  # 1k to ~1.2M
    f = fc.forecast(m, model, grid, checkpoint_s=30.0)
    t = f["tiers"]
    for name in fc.TIERS:
        g = [p["goodput"] for p in t[name]["points"]]
        assert all(0 < x < 1 for x in g)
        assert all(a > b for a, b in zip(g, g[1:])), name  # more GPUs, more interruptions: less goodput
        iv = [p["interval_s"] for p in t[name]["points"]]
        assert all(a > b for a, b in zip(iv, iv[1:]))  # and more frequent checkpoints
    for p_disk, p_warm, p_mem in zip(*(t[n]["points"] for n in ("disk restart", "warm spares",
                                                                 "in-memory snapshots"))):
        assert p_mem["goodput"] >= p_warm["goodput"] >= p_disk["goodput"]
        # fewer interruptions need the disk checkpoint: it can be rarer
        assert p_mem["interval_s"] > p_warm["interval_s"] == p_disk["interval_s"]
        assert p_mem["mtbf_disk_s"] > p_warm["mtbf_disk_s"] == p_warm["mtbf_s"]


def test_flags_override_the_measured_inputs(tmp_path: Path) -> None:
    m = fc.read_source(_fixed_run(tmp_path / "run"))
    model = load("llama3")
    base = fc.forecast(m, model, [10000])
    slow = fc.forecast(m, model, [10000], checkpoint_s=120.0, step_s=0.4, snapshot_s=0.0)
    assert slow["inputs"]["checkpoint_s"] == {"value": 120.0, "how": "given", "where": "--checkpoint-seconds"}
    assert slow["inputs"]["step_s"]["how"] == slow["inputs"]["snapshot_s"]["how"] == "given"
    for name in fc.TIERS:
        assert slow["tiers"][name]["points"][0]["goodput"] < base["tiers"][name]["points"][0]["goodput"]
        assert slow["tiers"][name]["points"][0]["interval_s"] > base["tiers"][name]["points"][0]["interval_s"]
    assert slow["tiers"]["in-memory snapshots"]["points"][0]["snapshot_every_steps"] == 1


def test_a_run_without_a_restart_is_refused(tmp_path: Path) -> None:
    d = _fixed_run(tmp_path / "run")
    (d / "summary.json").write_text(json.dumps({"faults": [], "failures": []}))
    with pytest.raises(UserError, match="no complete restart"):
        fc.forecast(fc.read_source(d), load("llama3"))


@pytest.mark.parametrize("text, out", [("1000,10000,100000", [1000, 10000, 100000]), ("1k,10k,100k", [1000, 10000, 100000]),
                                       ("100k, 1k", [1000, 100000]), ("1e4", [10000]), ("2M", [2000000]), ("8", [8])])
def test_parse_gpus(text: str, out: list[int]) -> None:
    assert fc.parse_gpus(text) == out


# -- the command on one real run --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("forecast-run")
    proc = run_cli("run", "kill-rank", "--steps", "16", "--quiet", "--out", str(out), "--history", "off")
    assert proc.returncode == 0, proc.stderr
    return run_dir_of(out)


@pytest.mark.slow
def test_forecast_of_a_real_run(real_run: Path, tmp_path: Path) -> None:
    proc = run_cli("forecast", str(real_run), timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for n in ("1k GPUs", "10k GPUs", "100k GPUs", "disk restart", "warm spares", "in-memory snapshots",
              "best checkpoint interval", "checkpoint cost", "step time", "recovery, warm, from memory",
              "measured", "failure model"):
        assert n in text, n
    page = real_run / "forecast.html"
    assert f"plot and page: {page}" in text
    html = page.read_text()
    assert html.count('id="forecast-plot"') == 1 and "<svg" in html and "</svg>" in html
    assert "<script" not in html  # self-contained and static
    for n in ("Assumptions", "Poisson", "Daly", "Young", "Faulty GPU", "warm spares"):
        assert n in html, n

    proc = run_cli("forecast", str(real_run), "--json", "--gpus", "1k,4k,16k,64k", "--out", str(tmp_path / "f.html"),
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    f = json.loads(proc.stdout)
    assert f["gpus"] == [1000, 4000, 16000, 64000] and (tmp_path / "f.html").is_file()
    assert f["source"]["kind"] == "run" and f["source"]["restarts"] == 1
    # kill-rank: a killed rank, taken over by warm spares from the in-memory snapshot, nothing lost
    assert f["source"]["restarts_by_kind"] == {"warm from memory": 1}
    assert f["tiers"]["in-memory snapshots"]["recovery"]["warm, from memory"]["how"] == "measured"
    assert f["tiers"]["disk restart"]["how"] == "assumed"
    for v in f["inputs"].values():
        assert v["how"] in ("measured", "assumed", "given") and v["value"] >= 0
    assert f["inputs"]["checkpoint_s"]["how"] == f["inputs"]["step_s"]["how"] == "measured"
    for name, t in f["tiers"].items():
        g = [p["goodput"] for p in t["points"]]
        assert all(0 < x <= 1 for x in g) and g == sorted(g, reverse=True), name
    warm, cold = (f["tiers"][n]["points"] for n in ("warm spares", "disk restart"))
    assert all(w["goodput"] >= c["goodput"] for w, c in zip(warm, cold))


@pytest.mark.slow
def test_user_text_is_escaped_in_the_page(real_run: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "a<b>&c"
    shutil.copytree(real_run, d, ignore=shutil.ignore_patterns("checkpoints", "forecast.html"))
    sc = json.loads((d / "scenario.json").read_text())
    (d / "scenario.json").write_text(json.dumps({**sc, "name": "<img src=x onerror=alert(1)>"}))
    from burnin.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["forecast", str(d)]) == 0
    html = (d / "forecast.html").read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "a<b>&c" not in html and "a&lt;b&gt;&amp;c" in html


# -- bad input -----------------------------------------------------------------------------------------------

def _main(argv: list[str]) -> tuple[int, str, str]:
    from burnin.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's own errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def fixed_dir(tmp_path: Path) -> Path:
    return _fixed_run(tmp_path / "run")


@pytest.mark.parametrize("args, needle", [
    (["--gpus", ""], "--gpus"), (["--gpus", "0"], "--gpus"), (["--gpus", "-5"], "--gpus"),
    (["--gpus", "1.5"], "--gpus"), (["--gpus", "lots"], "--gpus"), (["--gpus", "1e9"], "--gpus"),
    (["--gpus", "1k,,2k"], "--gpus"), (["--gpus", ",".join(str(i) for i in range(1, 31))], "--gpus"),
    (["--checkpoint-seconds", "nan"], "--checkpoint-seconds"), (["--checkpoint-seconds", "0"], "--checkpoint-seconds"),
    (["--checkpoint-seconds", "-1"], "--checkpoint-seconds"), (["--checkpoint-seconds", "inf"], "--checkpoint-seconds"),
    (["--checkpoint-seconds", "soon"], "--checkpoint-seconds"), (["--step-seconds", "0"], "--step-seconds"),
    (["--snapshot-seconds", "-0.5"], "--snapshot-seconds"), (["--step-seconds", "1e300"], "--step-seconds"),
    (["--failure-model", "llama4"], "--failure-model"), (["--failure-model", "/dev/null"], "--failure-model"),
    (["--failure-model", "."], "--failure-model"), (["--failure-model", "a\x00b"], "--failure-model"),
    (["--out", "/no/such/dir/f.html"], "--out"), (["--out", "."], "--out"), (["--out", "a\x00b"], "--out"),
    (["--sdc-per-gpu-day", "nan"], "--sdc-per-gpu-day"), (["--sdc-per-gpu-day", "0"], "--sdc-per-gpu-day"),
    (["--sdc-per-gpu-day", "-1"], "--sdc-per-gpu-day"), (["--sdc-per-gpu-day", "often"], "--sdc-per-gpu-day"),
    (["--sdc-per-gpu-day", "0.001"], "not a data-fault campaign"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_flags_one_line_exit_2(fixed_dir: Path, args: list[str], needle: str) -> None:
    rc, out, err = _main(["forecast", str(fixed_dir), *args])
    assert rc == 2, (args, out, err)
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not (fixed_dir / "forecast.html").exists()


def test_bad_sources_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    damaged = _fixed_run(tmp_path / "damaged")
    (damaged / "summary.json").write_text("{not json")
    for src, needle in ((tmp_path / "missing", "not a directory"), (tmp_path / "afile", "not a directory"),
                        (tmp_path / "empty", "holds no summary.json"), (damaged, "summary.json cannot be read"),
                        (Path("/dev/null"), "not a directory")):
        rc, _, err = _main(["forecast", str(src)])
        assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, (src, err)
    proc = run_cli("forecast", str(tmp_path / "empty"), timeout=60)  # the real command line, once
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


_flag_values = {
    "--gpus": st.sampled_from(["1000,10000,100000", "1k", "0", "-1", "1e9", "x", "", ",", "1k,1M", "16384",
                               "1.5k", "nan", "1e3,2e3"]) | st.text(max_size=8),
    "--failure-model": st.sampled_from(["llama3", "llama", "", ".", "/dev/null", "model.yaml", "bad.yaml"])
    | st.text(max_size=6),
    "--checkpoint-seconds": st.sampled_from(["60", "0", "-1", "nan", "inf", "1e-9", "1e8", "x", ""]),
    "--step-seconds": st.sampled_from(["0.5", "0", "-0", "nan", "1e7", "x"]),
    "--snapshot-seconds": st.sampled_from(["0", "0.001", "-1", "inf", "x"]),
    "--sdc-per-gpu-day": st.sampled_from(["0.001", "0", "-1", "nan", "1e9", "x"]),
    "--out": st.sampled_from(["f.html", "", ".", "nodir/f.html", "/dev/null/x"]) | st.text(max_size=6),
}


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("forecast-fuzz")
    _fixed_run(d / "run")
    (d / "model.yaml").write_text("name: m\ngpus: 64\ndays: 2\ncategories: [{name: a, count: 3, scope: machine}]\n")
    (d / "bad.yaml").write_text("name: m\ngpus: 64\ncategories: []\n")
    return d


@settings(max_examples=60, deadline=None)
@given(flags=st.lists(st.sampled_from(sorted(_flag_values)), unique=True, max_size=4), data=st.data())
def test_fuzz_forecast_flags(fuzz_dir: Path, flags: list[str], data: st.DataObject) -> None:
    """Any mix of flag values: exit 0, or 2 with one line naming what is wrong; never a traceback."""
    argv = ["forecast", "run"] + [f"{f}={data.draw(_flag_values[f])}" for f in flags]
    rc, text = main_in(fuzz_dir, argv)
    assert rc in (0, 2), (argv, rc, text)
    assert "Traceback" not in text
    if rc == 2:
        assert len(text.strip().splitlines()) == 1, (argv, text)
    else:
        assert text == "", (argv, text)
    assert not (fuzz_dir / "run" / "forecast.html").exists()


def test_fuzz_examples_accept_and_refuse(fuzz_dir: Path) -> None:
    rc, _, err = _main(["forecast", str(fuzz_dir / "run"), "--failure-model", str(fuzz_dir / "model.yaml"),
                        "--gpus", "64,1k", "--out", str(fuzz_dir / "ok.html")])
    assert rc == 0 and err == "" and (fuzz_dir / "ok.html").is_file()
    rc, _, err = _main(["forecast", str(fuzz_dir / "run"), "--failure-model", str(fuzz_dir / "bad.yaml")])
    assert rc == 2 and "--failure-model" in err and "days" in err
    assert math.isfinite(json.loads(_main(["forecast", str(fuzz_dir / "run"), "--json", "--out",
                                           str(fuzz_dir / "ok.html")])[1])["tiers"]["warm spares"]["points"][0]["goodput"])


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.sampled_from([float("nan"), float("inf"),
                       -1.5, 1e308, 0.0]), st.text(max_size=5), st.just([]), st.just({}))


def _mutate(obj: object, path: list[int], value: object) -> object:
    """`obj` with the node `path` leads to (each step picks a child by index, modulo) replaced by `value`."""
    if not path or not isinstance(obj, (dict, list)) or not obj:
        return value
    keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
    k = keys[path[0] % len(keys)]
    out = dict(obj) if isinstance(obj, dict) else list(obj)
    out[k] = _mutate(obj[k], path[1:], value)
    return out


@settings(max_examples=30, deadline=None)
@given(which=st.sampled_from(["summary.json", "scenario.json", "events.jsonl"]),
       path=st.lists(st.integers(0, 50), max_size=5), value=_json_leaf)
@example(which="scenario.json", path=[1, 1], value=float("inf"))  # checkpoint.memory_every: inf (found once)
def test_fuzz_damaged_run_directory(tmp_path_factory: pytest.TempPathFactory, which: str, path: list[int],
                                    value: object) -> None:
    """A run directory damaged anywhere: a forecast, or one line naming the file and exit 2."""
    d = _fixed_run(tmp_path_factory.mktemp("damaged") / "run")
    f = d / which
    if which == "events.jsonl":
        events = [json.loads(line) for line in f.read_text().splitlines()]
        f.write_text("".join(json.dumps(e) + "\n" for e in _mutate(events, path or [0], value)))
    else:
        f.write_text(json.dumps(_mutate(json.loads(f.read_text()), path, value)))
    rc, out, err = _main(["forecast", str(d), "--json"])
    assert rc in (0, 2), (which, path, value, err)
    assert "Traceback" not in err
    if rc == 2:
        assert len(err.strip().splitlines()) == 1, err
    else:
        assert err == "" and json.loads(out)["tiers"]


def _sdc_campaign(d: Path, *, trials: int = 40, sdc: int = 20, harmful: int = 4, unchecked_harmful: int = 9) -> Path:
    """The parts of a data-fault campaign's campaign.json the SDC forecast reads (a real one: test_sdc.py)."""
    d.mkdir(parents=True)
    rates = lambda k, n: {"count": k, "rate": k / n, "ci95": [0.0, 1.0]}  # noqa: E731
    summary = {"scenario": "sdc", "seed": 1, "trials": trials,
               "outcomes": {"sdc": rates(sdc, trials), "masked": rates(trials - sdc, trials)},
               "effects": {"silent_trials": trials, "harmful": rates(harmful, trials)},
               "unchecked_effects": {"silent_trials": trials, "harmful": rates(unchecked_harmful, trials)},
               "noise_band": {"final": 0.05, "eval": 0.01, "step": 0.05, "how": "12 control trials"}}
    (d / "campaign.json").write_text(json.dumps(summary))
    return d


def test_the_sdc_forecast_scales_the_campaign_shares_by_a_per_device_rate(tmp_path: Path) -> None:
    """Harmful silent corruptions per day: the per-GPU rate (the failure model's noticed SDCs unless given) x the
    GPU count x the campaign's share, with the share's Wilson bounds carried through."""
    d = _sdc_campaign(tmp_path / "c")
    rc, out, err = _main(["forecast", str(d), "--gpus", "1k,10k", "--json"])
    assert rc == 0, err
    f = json.loads(out)
    llama = load("llama3")
    want_rate = 6 / (llama.gpus * llama.days)
    assert f["rate_per_gpu_day"]["how"] == "assumed" and f["rate_per_gpu_day"]["value"] == pytest.approx(want_rate)
    assert "Silent data corruption" in f["rate_per_gpu_day"]["where"]
    for p in f["points"]:
        events = p["gpus"] * want_rate
        assert p["silent_harmful"]["per_day"] == pytest.approx(events * 4 / 40)
        assert p["unchecked_harmful"]["per_day"] == pytest.approx(events * 9 / 40)
        lo, hi = p["silent_harmful"]["ci95"]
        assert lo < p["silent_harmful"]["per_day"] < hi
    assert (d / "forecast-sdc.json").exists()
    # a failure model without an SDC category needs the rate given
    (tmp_path / "m.yaml").write_text("name: m\ngpus: 64\ndays: 2\ncategories: [{name: a, count: 3, scope: machine}]\n")
    rc, _, err = _main(["forecast", str(d), "--failure-model", str(tmp_path / "m.yaml")])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--sdc-per-gpu-day" in err, err
    rc, out, _ = _main(["forecast", str(d), "--failure-model", str(tmp_path / "m.yaml"), "--sdc-per-gpu-day", "0.01",
                        "--gpus", "100"])
    assert rc == 0 and "silent_harmful" in out
