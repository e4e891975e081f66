"""Process-fault campaigns: each trial a real fault and a real recovery, judged bit-exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import processes_of_run, run_cli, run_dir_of

from burnin.core import snapshots as snapshot
from burnin.scenarios.campaign import draw_trials
from burnin.core.events import read_events
from burnin.scenarios import load_scenario

MIX = """\
name: mix
workload: {{model: tiny, ranks: 2, steps: 12, threads: 1}}
checkpoint: {{every: 4, keep: 3}}
timeouts: {{heartbeat_s: 2}}
campaign: {{trials: {trials}, seed: {seed}, warmup: 4, window: 6}}
faults:
  - {{fault: process.kill, step: 4, vary: {{rank: [0, 1], step: {{min: 4, max: 9}}}}, expect: recovered}}
  - {{fault: process.hang, step: 4, vary: {{rank: [0, 1], step: {{min: 4, max: 9}}}}, expect: recovered}}
  - {{fault: process.exception, step: 4, vary: {{rank: [0, 1], step: {{min: 4, max: 9}}}}, expect: recovered}}
  - {{fault: storage.checkpoint_corrupt, step: 4, vary: {{rank: [0, 1], step: {{min: 4, max: 9}}}},
      expect: recovered}}
  - {{fault: storage.snapshot_corrupt, step: 4, vary: {{rank: [0, 1], step: {{min: 4, max: 9}}}},
      expect: recovered}}
"""
KINDS = {"process.kill", "process.hang", "process.exception", "storage.checkpoint_corrupt", "storage.snapshot_corrupt"}


def _seed_covering_every_kind(tmp_path: Path, trials: int) -> int:
    """The first seed whose `trials` draws hold each of the five faults (the draw is Python's RNG: the
    same on every machine; the search keeps the test independent of which seed that is)."""
    path = tmp_path / "probe.yaml"
    for seed in range(1000):
        path.write_text(MIX.format(trials=trials, seed=seed))
        plan = draw_trials(load_scenario(str(path)), trials, seed)
        if {t["faults"][0]["fault"] for t in plan} == KINDS:
            return seed
    raise AssertionError("no seed below 1000 draws every kind")


@pytest.mark.slow
def test_every_process_fault_is_a_real_recovery_judged_exact(tmp_path: Path) -> None:
    seed = _seed_covering_every_kind(tmp_path, 5)
    scenario = tmp_path / "mix.yaml"
    scenario.write_text(MIX.format(trials=5, seed=seed))
    out = tmp_path / "runs"
    proc = run_cli("campaign", str(scenario), "--out", str(out), timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = run_dir_of(out)
    s = json.loads((run_dir / "campaign.json").read_text())
    assert s["kind"] == "recovery" and s["trials"] == 5 and s["complete"]
    assert s["exact"]["count"] == 5 and s["failed_expectations"] == 0 and s["unexplained_failures"] == 0
    assert set(s["by_fault"]) == KINDS
    for name, b in s["by_fault"].items():
        assert b["outcomes"]["recovered"]["count"] == b["trials"], (name, b["outcomes"])
        total = b["recovery_s"]["total_s"]
        assert total["n"] == b["trials"] and total["p50"] <= total["p90"] <= total["p99"], (name, total)
        assert b["new_ranks"] == {"warm spares": b["trials"]}, (name, b["new_ranks"])
    # the memory tier: a kill, a hang or an exception loses at most the step in flight
    for name in ("process.kill", "process.hang", "process.exception"):
        assert s["by_fault"][name]["lost_steps"]["max"] <= 1, (name, s["by_fault"][name]["lost_steps"])
        assert s["by_fault"][name]["tiers"] == {"memory": 1}
    # a damaged disk checkpoint is read (no snapshots in its trial), rejected, and an older one taken (or,
    # when it was the only one, the run starts over: tier "none")
    assert set(s["by_fault"]["storage.checkpoint_corrupt"]["tiers"]) <= {"disk", "none"}
    trials = read_events(run_dir / "trials.jsonl")
    assert sorted(t["trial"] for t in trials) == list(range(5))
    (ck,) = [t for t in trials if t["fault"]["fault"] == "storage.checkpoint_corrupt"]
    tdir = run_dir / "trials" / f"{ck['trial']:04d}"
    assert any(e["event"] == "checkpoint_rejected" for e in read_events(tdir / "events.jsonl"))
    (sn,) = [t for t in trials if t["fault"]["fault"] == "storage.snapshot_corrupt"]
    sdir = run_dir / "trials" / f"{sn['trial']:04d}"
    assert any(e["event"] == "snapshot_rejected" for e in read_events(sdir / "events.jsonl"))
    # each trial is a run of its own, judged and reported; its checkpoints are gone once judged
    for t in trials:
        tdir = run_dir / "trials" / f"{t['trial']:04d}"
        summary = json.loads((tdir / "summary.json").read_text())
        assert summary["exact"] and summary["restarts"] >= 1
        assert not (tdir / "checkpoints").exists()
        started = [e for e in read_events(tdir / "events.jsonl") if e["event"] == "rank_started"]
        assert started and all(e["spare"] for e in started), "every rank is a fork of a warm zygote"
    # nothing outlives the campaign: no process, no shared memory
    assert processes_of_run(run_dir.name) == []
    assert not [p for p, owner in snapshot.leftovers() if owner.get("run_id") == run_dir.name]
    md = (run_dir / "campaign.md").read_text()
    assert "p50 / p90 / p99" in md and "process.hang" in md


@pytest.mark.parametrize("change, needle", [
    ("  - {fault: corruption.bitflip, step: 4, params: {target: param}}\n", "not both"),
    ("recovery: {mode: none}\n", "recovery.max_restarts"),
])
def test_a_campaign_that_cannot_run_is_refused_before_it_starts(tmp_path: Path, change: str, needle: str) -> None:
    text = MIX.format(trials=3, seed=0)
    text = text + change if change.startswith("  -") else text.replace("faults:\n", change + "faults:\n")
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(text)
    for cmd in (("validate", str(scenario)), ("campaign", str(scenario), "--out", str(tmp_path / "runs"))):
        proc = run_cli(*cmd)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()
