"""Warm spare ranks: a restart hands the new attempt's ranks to pre-warmed processes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import burnin_cmd, processes_of_run, run_cli, run_dir_of, summary_of

from burnin.harness.events import read_events

pytestmark = pytest.mark.slow


def _events(out: Path) -> list[dict]:
    return read_events(run_dir_of(out) / "events.jsonl")


def test_kill_is_recovered_by_warm_spares_exactly(tmp_path: Path) -> None:
    proc = run_cli("run", "kill-rank", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path)
    (f,) = s["faults"]
    assert f["outcome"] == "recovered" and s["exact"]
    events = _events(tmp_path)
    used = [e for e in events if e["event"] == "spare_used"]
    assert sorted(e["rank"] for e in used) == [0, 1] and all(e["attempt"] == 1 for e in used)
    # the spares became the ranks: the new attempt's ranks are the spares' processes
    started = {e["rank"]: e for e in events if e["event"] == "rank_started" and e["attempt"] == 1}
    assert {r: e["pid"] for r, e in started.items()} == {e["rank"]: e["pid"] for e in used}
    assert all(e["spare"] and e["warm_s"] > 0 for e in started.values())
    # where the new ranks came from is in the report, in words
    new_ranks = f["recovery"]["new_ranks"]
    assert new_ranks == "warm spares" or "warming" in new_ranks, new_ranks
    # the pool was refilled after the restarted attempt's first step, and closed at the end
    assert len([e for e in events if e["event"] == "spare_started"]) == 4
    assert processes_of_run(s["run_id"]) == []


def test_spares_off_starts_the_new_ranks_cold(tmp_path: Path) -> None:
    scenario = tmp_path / "cold.yaml"
    scenario.write_text("name: cold\nworkload: {steps: 16}\nrecovery: {spares: false}\n"
                        "faults:\n  - {fault: process.kill, rank: 1, step: 8, expect: recovered}\n")
    out = tmp_path / "runs"
    proc = run_cli("run", str(scenario), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(out)
    assert s["exact"] and s["faults"][0]["recovery"]["new_ranks"] == "cold start (no spare pool)"
    assert not [e for e in _events(out) if e["event"].startswith("spare_")]


def test_back_to_back_kills_wait_for_a_spare_still_warming_and_say_so(tmp_path: Path) -> None:
    """The second kill comes one step after the restarted attempt's first step, when the pool's refill
    has just started: the new ranks are spares still importing torch (seconds), not warm ones."""
    scenario = tmp_path / "twice.yaml"
    scenario.write_text("name: twice\nworkload: {steps: 20}\ncheckpoint: {every: 4}\n"
                        "faults:\n  - {fault: process.kill, rank: 1, step: 9, expect: recovered}\n"
                        "  - {fault: process.kill, rank: 0, step: 11, expect: recovered}\n")
    out = tmp_path / "runs"
    proc = run_cli("run", str(scenario), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(out)
    assert s["exact"] and s["restarts"] == 2
    first, second = (f["recovery"] for f in s["faults"])
    assert second["new_ranks"] != "warm spares", second
    assert "warming" in second["new_ranks"] or "cold" in second["new_ranks"], second
    late = [e for e in _events(out) if e["event"] == "spare_used" and e["attempt"] == 2]
    assert late and not all(e["ready"] for e in late)


def test_cleanup_removes_the_spares_of_a_sigkilled_supervisor(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    env = {**os.environ, "BURNIN_WORKER_PDEATHSIG": "0"}  # only `burnin cleanup` may remove them
    proc = subprocess.Popen(burnin_cmd("run", "kill-rank", "--steps", "400", "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    spares: list[int] = []
    while time.time() < deadline and not spares:
        assert proc.poll() is None, proc.communicate()
        runs = [d for d in out.iterdir()] if out.is_dir() else []
        if runs and (runs[0] / "events.jsonl").exists():
            spares = [e["pid"] for e in read_events(runs[0] / "events.jsonl") if e["event"] == "spare_started"]
        time.sleep(0.1)
    assert spares, "the pool started"
    run_id = run_dir_of(out).name
    proc.kill()
    proc.communicate(timeout=30)
    assert set(spares) <= set(processes_of_run(run_id)), "without parent-death signals the spares outlive it"
    clean = run_cli("cleanup")
    assert clean.returncode == 0 and run_id in clean.stdout, clean.stdout + clean.stderr
    deadline = time.time() + 10
    while processes_of_run(run_id) and time.time() < deadline:
        time.sleep(0.1)
    assert processes_of_run(run_id) == []
    from burnin.harness import snapshot

    assert not [p for p, owner in snapshot.leftovers() if owner.get("run_id") == run_id]
