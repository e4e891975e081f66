"""The pytest plug-in, driven as a user drives it: a small project of tests run by an inner pytest.

The inner pytest is a subprocess that finds the plug-in through its `pytest11` entry point (nothing
passes `-p`), and inherits the session's golden cache from the environment (conftest.py), so runs of
one workload share one golden run. The passing project tests burnin's workload and its own loop.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ddp_plain"

PASSING = '''
import pytest

# The project's own training loop (train.py beside this file), killed once: found next to the test.
SCENARIO = """
name: user-loop-kill
workload: {entry: train.py, args: ["--steps", "12"], ranks: 2, steps: 12}
checkpoint: {every: 4}
faults:
  - {fault: process.kill, rank: 1, step: 6, expect: recovered}
expect: {max_restarts: 1}
"""


@pytest.mark.burnin("kill-rank", steps=16)
def test_kill_rank(burnin_result):
    assert burnin_result.restarts == 1
    assert [f.outcome for f in burnin_result.faults] == ["recovered"]


def test_scenario_in_the_test(burnin_run):
    result = burnin_run(SCENARIO)
    assert result.ok and result.exact
    assert [f.fault for f in result.faults] == ["process.kill"]


def test_loaded_from_its_entry_point(pytestconfig):
    assert pytestconfig.pluginmanager.get_plugin("burnin").__name__ == "burnin.pytest_plugin"
'''

FAILING = '''
import pytest


@pytest.mark.burnin("kill-rank", steps=16, overrides={"expect.max_restarts": 0})
def test_no_restart_allowed():
    pass


def test_inspect_a_failed_run(burnin_run):
    result = burnin_run("kill-rank", steps=16, check=False, **{"expect.max_restarts": 0})
    assert [e.name for e in result.expectations if not e.ok] == ["at most 0 restarts"]


@pytest.mark.burnin("kill-rnak")
def test_unknown_scenario():
    pass


def test_invalid_yaml(burnin_run):
    burnin_run("name: broken\\nfaults: [{fault: process.kill\\n")


def test_unknown_fault(burnin_run):
    burnin_run("name: typo\\nfaults:\\n  - {fault: process.kil, rank: 0, step: 3}\\n")


def test_unknown_argument(burnin_run):
    burnin_run("smoke", stesp=3)


def test_result_without_marker(burnin_result):
    pass
'''


def _properties(xml_path, test_name: str) -> dict[str, str]:
    case = next(c for c in ET.parse(xml_path).iter("testcase") if c.get("name") == test_name)
    return {p.get("name"): p.get("value") for p in case.iter("property")}


@pytest.mark.slow
def test_a_user_project_passes_and_reports_its_figures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_reliability=PASSING, train=(EXAMPLE / "train.py").read_text())
    pytester.makeini("[pytest]\nburnin_out = runs\nburnin_history = history.sqlite\n")
    result = pytester.runpytest_subprocess("--strict-markers", "--junitxml=report.xml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)

    props = _properties(pytester.path / "report.xml", "test_kill_rank")
    assert props["burnin.scenario"] == "kill-rank"
    assert props["burnin.passed"] == "true" and props["burnin.exact"] == "true"
    assert props["burnin.restarts"] == "1" and props["burnin.expectations_failed"] == "0"
    assert props["burnin.outcome.recovered"] == "1"
    assert props["burnin.fault.0"] == "process.kill@rank1:step12 recovered"
    assert float(props["burnin.fault.0.recovery_s"]) > 0
    assert int(props["burnin.fault.0.lost_steps"]) >= 0
    assert float(props["burnin.recovery_s.max"]) == float(props["burnin.fault.0.recovery_s"])
    # the ini keys: run directories under ./runs, both runs in ./history.sqlite
    run_dir = pytester.path / "runs" / props["burnin.run_dir"].rsplit("/", 1)[1]
    assert (run_dir / "summary.json").is_file()
    assert _properties(pytester.path / "report.xml", "test_scenario_in_the_test")["burnin.scenario"] == \
        "user-loop-kill"
    with sqlite3.connect(pytester.path / "history.sqlite") as con:
        assert sorted(r[0] for r in con.execute("SELECT scenario FROM runs")) == ["kill-rank", "user-loop-kill"]


@pytest.mark.slow
def test_failed_expectations_and_bad_input_fail_tests_in_one_message(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_reliability=FAILING)
    result = pytester.runpytest_subprocess("--burnin-out", "out", "-p", "no:cacheprovider", "-rfE")
    result.assert_outcomes(passed=1, failed=5, errors=1)
    out = result.stdout.str()
    assert "Traceback" not in out and "During handling" not in out and "burnin/harness" not in out

    # the failed expectation, the run directory and its report, in one message, in the call phase
    result.stdout.fnmatch_lines([
        "*_ test_no_restart_allowed _*",
        "burnin: scenario kill-rank: 1 of * expectations failed",
        "  at most 0 restarts: 1 restarts",
        f"run dir: {pytester.path}/out/kill-rank-*",
        f"report:  {pytester.path}/out/kill-rank-*/summary.md",
    ])
    # bad input: burnin's one-line errors
    result.stdout.fnmatch_lines([
        "*_ ERROR at setup of test_result_without_marker _*",
        "burnin_result: test_result_without_marker has no @pytest.mark.burnin(SCENARIO, ...) marker; add one, "
        "or call the burnin_run fixture",
        "*_ test_unknown_scenario _*",
        "kill-rnak: no such file, and no bundled scenario called 'kill-rnak': did you mean 'kill-rank'? (bundled: *)",
        "*_ test_invalid_yaml _*",
        "<scenario text>:3: YAML syntax error: *",
        "*_ test_unknown_fault _*",
        "<scenario text>:3: faults.0.fault: unknown fault 'process.kil': did you mean 'process.kill'?",
        "*_ test_unknown_argument _*",
        "burnin: error: burnin_run: unknown argument stesp=3; use ranks, steps, seed, threads, device, check, or "
        "overrides={'dotted.path': value}",
        "*= short test summary info =*",
    ])


def test_options_and_marker_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.burnin(scenario='smoke', *, check=True, steps=None,*"])
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["burnin fault-injection runs:", "*--burnin-out=DIR*", "*--burnin-history=PATH*",
                                 "*burnin_out (string):*", "*burnin_history (string):*"])

    pytester.mkdir("a-dir")
    result = pytester.runpytest_subprocess("--burnin-history", "a-dir")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --burnin-history: 'a-dir' is not a file path; give the path of a SQLite "
                                 "file (created if missing), or `off`"])
    pytester.makefile(".txt", a_file="")
    result = pytester.runpytest_subprocess("--burnin-out", "a_file.txt/runs")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --burnin-out: *a_file.txt/runs goes through *a_file.txt, which is a "
                                 "regular file, not a directory; *"])


def test_importing_the_plugin_imports_no_torch() -> None:
    code = "import sys, burnin.pytest_plugin; print(sorted(m for m in ('torch', 'burnin.harness.runner') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
