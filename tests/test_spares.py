"""Warm spare ranks: a restart hands the new attempt's ranks to pre-warmed processes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import burnin_cmd, long_run, processes_of_run, run_cli, run_dir_of, summary_of

from burnin.core.events import read_events

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _own_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about a run's own pool (its zygote, its spares, its subreaper): not the session's
    `burnin pool serve` (tests/test_pool_server.py)."""
    monkeypatch.delenv("BURNIN_POOL", raising=False)


def _events(out: Path) -> list[dict]:
    return read_events(run_dir_of(out) / "events.jsonl")


def test_kill_is_recovered_by_warm_spares_exactly(tmp_path: Path) -> None:
    proc = run_cli("run", "kill-rank", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path)
    (f,) = s["faults"]
    assert f["outcome"] == "recovered" and s["exact"]
    events = _events(tmp_path)
    used = [e for e in events if e["event"] == "spare_used" and e["attempt"] == 1]
    assert sorted(e["rank"] for e in used) == [0, 1] and all(e["ready"] for e in used)
    # every rank of the run is a fork of the warm zygote, the first attempt's too: on the loopback fabric
    # one zygote serves every slot (a run pays one warm-up)
    # (a golden run made first borrows the run's pool: the run's log then says what it was handed)
    borrowed = [e for e in events if e["event"] == "pool_borrowed"]
    zygotes = {e["slot"]: e["pid"] for e in events if e["event"] == "zygote_started"}
    zygotes.update({int(slot): pid for e in borrowed for slot, pid in e["zygotes"].items()})
    assert sorted(zygotes) == [0] and all(e["shared"] for e in events if e["event"] in ("zygote_started",
                                                                                      "pool_borrowed"))
    started = [e for e in events if e["event"] == "rank_started"]
    assert len(started) == 4 and all(e["spare"] and e["warm_s"] > 0 for e in started)
    # the spares became the ranks: the new attempt's ranks are the spares' processes
    mine = {e["rank"]: e["pid"] for e in started if e["attempt"] == 1}
    assert mine == {e["rank"]: e["pid"] for e in used}
    assert not set(mine.values()) & set(zygotes.values())
    # where the new ranks came from is in the report, in words
    assert f["recovery"]["new_ranks"] == "warm spares", f["recovery"]
    # the pool: 2 forks for the first attempt (before a golden run that borrowed them, if one was made), 2 to
    # refill it, 2 after the restart's first step; closed at the end
    assert len([e for e in events if e["event"] == "spare_started"]) == (4 if borrowed else 6)
    assert processes_of_run(s["run_id"]) == []
    left = sorted(p.name for p in (run_dir_of(tmp_path) / "ranks").iterdir()
                  if p.suffix in (".fifo", ".pid", ".ready"))
    assert left == [], left


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


def test_back_to_back_kills_are_both_recovered_by_warm_spares(tmp_path: Path) -> None:
    """The second kill comes two steps into the restarted attempt: the pool, refilled by forks of the
    warm zygotes after that attempt's first step, has a spare for every slot again."""
    scenario = tmp_path / "twice.yaml"
    scenario.write_text("name: twice\nworkload: {steps: 20}\ncheckpoint: {every: 4}\n"
                        "faults:\n  - {fault: process.kill, rank: 1, step: 9, expect: recovered}\n"
                        "  - {fault: process.kill, rank: 0, step: 11, expect: recovered}\n")
    out = tmp_path / "runs"
    proc = run_cli("run", str(scenario), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(out)
    assert s["exact"] and s["restarts"] == 2
    first, second = (f["recovery"]["new_ranks"] for f in s["faults"])
    assert first == "warm spares", first
    # refilled by forks once the restarted attempt trained a step: warm, or forked a moment before
    assert second == "warm spares" or "being forked" in second, second
    assert all(f["lost_steps"] <= 1 for f in s["faults"])


def test_an_empty_pool_still_recovers_and_says_why(tmp_path: Path) -> None:
    """The zygote dies (SIGKILL from outside, as the OOM killer would) while rank 0 straggles: the first
    kill still finds the spares it had forked, but the refill must start a new zygote, which takes
    seconds to warm up; the second kill, one step later, waits for it, and the report says so."""
    scenario = tmp_path / "empty.yaml"
    scenario.write_text("name: empty\nworkload: {steps: 20}\ncheckpoint: {every: 4}\n"
                        "faults:\n  - {fault: process.straggler, rank: 0, step: 1, params: {delay_s: 0.5, steps: 6},"
                        " expect: [masked, recovered, detected]}\n"
                        "  - {fault: process.kill, rank: 1, step: 9, expect: recovered}\n"
                        "  - {fault: process.kill, rank: 0, step: 10, expect: recovered}\n")
    out = tmp_path / "runs"
    proc = subprocess.Popen(burnin_cmd("run", str(scenario), "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    killed: list[int] = []
    while time.time() < deadline and not killed and proc.poll() is None:
        runs = list(out.iterdir()) if out.is_dir() else []
        events = read_events(runs[0] / "events.jsonl") if runs and (runs[0] / "events.jsonl").exists() else []
        if any(e["event"] == "step_done" for e in events):  # the zygotes are warm, the straggler is on
            killed = [e["pid"] for e in events if e["event"] == "zygote_started"]
            for pid in killed:
                os.kill(pid, 9)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=300)
    assert len(killed) == 1, stdout + stderr  # one zygote serves both slots
    assert proc.returncode == 0, stdout + stderr
    s = summary_of(out)
    assert s["exact"] and s["restarts"] == 2
    events = _events(out)
    assert [e["slot"] for e in events if e["event"] == "zygote_lost"] == [0]
    first, second = (f["recovery"] for f in s["faults"][1:])
    assert first["new_ranks"] == "warm spares", first
    assert "warming" in second["new_ranks"], second
    late = [e for e in events if e["event"] == "spare_used" and e["attempt"] == 2]
    assert late and not all(e["ready"] for e in late)
    assert processes_of_run(s["run_id"]) == []


def test_cleanup_removes_the_spares_of_a_sigkilled_supervisor(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    env = {**os.environ, "BURNIN_WORKER_PDEATHSIG": "0"}  # only `burnin cleanup` may remove them
    proc = subprocess.Popen(burnin_cmd("run", str(long_run(tmp_path)), "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    spares: list[int] = []
    while time.time() < deadline and not spares:
        assert proc.poll() is None, proc.communicate()
        runs = [d for d in out.iterdir()] if out.is_dir() else []
        if runs and (runs[0] / "events.jsonl").exists():
            spares = [e["pid"] for e in read_events(runs[0] / "events.jsonl") if e["event"] == "zygote_started"]
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
    from burnin.core import snapshots as snapshot

    assert not [p for p, owner in snapshot.leftovers() if owner.get("run_id") == run_id]
