"""The command line: bad input of every kind ends in one line and exit status 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

BAD = sorted((Path(__file__).parent / "bad_scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_scenario_one_line_exit_2(path: Path) -> None:
    for command in (("validate", str(path)), ("run", str(path), "--out", "/nonexistent/never-created")):
        proc = run_cli(*command, timeout=60)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(str(path)), lines[0]
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, needle", [
    (("run", "--steps", "many"), "--steps"),
    (("run", "--ranks", "0"), "workload.ranks"),
    (("run", "--device", "tpu"), "--device"),
    (("run", "--metrics-port", "70000"), "--metrics-port"),
    (("run", "--out", "/dev/null"), "--out"),
    (("run", "--metrics-port", "0", "--metrics-addr", "no.such.host.invalid"), "--metrics-addr"),
    (("campaign", "sdc-campaign", "--out", "/dev/null/runs"), "--out"),
    (("campaign", "sdc-campaign", "--trials", "0"), "--trials"),
    (("campaign", "--resume", "/dev/null"), "--resume"),
    (("run", "no-such-scenario"), "no-such-scenario"),
    (("run", "kill-rnak"), "kill-rank"),
    (("frobnicate",), "frobnicate"),
    (("report", "/nonexistent"), "not a burnin run directory"),
])
def test_bad_flags_one_line_exit_2(args: tuple[str, ...], needle: str) -> None:
    proc = run_cli(*args, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_list_shows_faults_and_scenarios() -> None:
    proc = run_cli("list", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("process.kill", "process.hang", "process.exception", "storage.checkpoint_corrupt",
                 "storage.snapshot_corrupt", "smoke", "kill-rank", "hang-rank", "corrupt-checkpoint",
                 "corrupt-snapshot"):
        assert name in proc.stdout


def test_validate_accepts_bundled() -> None:
    from burnin.harness.fabric import privilege_problem

    bundled = sorted((Path(__file__).parents[1] / "burnin" / "scenarios" / "bundled").glob("*.yaml"))
    # validate refuses what run would: the network scenarios need namespaces (root), without a fallback
    need_netns = [p for p in bundled if "fault: network." in p.read_text()] if privilege_problem() else []
    proc = run_cli("validate", *map(str, bundled), timeout=60)
    assert proc.returncode == (2 if need_netns else 0), proc.stderr
    assert proc.stdout.count(": ok") == len(bundled) - len(need_netns)
    assert len(proc.stderr.splitlines()) == len(need_netns), proc.stderr


def test_schema_is_json_with_every_fault() -> None:
    proc = run_cli("schema", timeout=60)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert "process.kill" in json.dumps(schema)


def test_cli_import_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, burnin.cli, burnin.scenarios, burnin.harness.supervisor, burnin.harness.preflight; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
