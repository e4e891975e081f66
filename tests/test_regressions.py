"""Regression hunting: the run history, honest comparisons, triage by signature, and `git bisect run`."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import burnin_cmd, run_cli, run_dir_of

from burnin.reports import history as hist
from burnin.hunt.compare import compare, load_side
from burnin.reports.result import Expectation, Failure, FaultResult, RunResult


def _result(run_id: str, k: int) -> RunResult:
    faults = [FaultResult(index=i, fault="process.kill", rank=i % 2, step=3 + i, point="between_steps",
                          expected=["recovered"], outcome="recovered", injected=True) for i in range(k)]
    failures = [Failure(attempt=i, time=1.0 + i, cause="killed", rank=i % 2, detector="exit_signal", detail="SIGKILL",
                        signature="killed: SIGKILL", last_step=3 + i, fault_index=i, fault_indices=[i])
                for i in range(k)]
    return RunResult(scenario="s", run_id=run_id, run_dir="/x", config_hash="c", ranks=2, steps=10, device="cpu",
                     started_at=1.0, finished_at=2.0, finished=True, final_step=9, final_state_hash="a",
                     golden_state_hash="a", exact=True, diverged_at_step=None, restarts=k, steps_executed=10,
                     final_loss=1.0, loss_floor=None, failures=failures, faults=faults,
                     expectations=[Expectation("exact", True, "")])


def _writer(path: str, worker: int) -> None:
    for j in range(15):
        hist.record_run(_result(f"w{worker}-r{j}", 1 + (j % 4)), Path(path))


def test_concurrent_writers_leave_whole_records(tmp_path: Path) -> None:
    """Eight processes record 15 runs each at once: every run is there with all its fault and failure rows."""
    path = tmp_path / "h.sqlite"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    con = hist.connect(path)
    try:
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 120
        per_run = dict(con.execute("SELECT run_id, COUNT(*) FROM faults GROUP BY run_id"))
        assert all(per_run[f"w{w}-r{j}"] == 1 + (j % 4) for w in range(8) for j in range(15))
        assert con.execute("SELECT COUNT(*) FROM failures").fetchone()[0] == 8 * sum(1 + (j % 4) for j in range(15))
    finally:
        con.close()


@pytest.mark.slow
def test_a_run_records_itself_with_its_commit_and_history_lists_it(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    scenario = tmp_path / "k.yaml"
    scenario.write_text("name: k\nworkload: {steps: 12}\nfaults:\n  - {fault: process.kill, rank: 1, step: 6, "
                        "expect: recovered}\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "commit", "-q", "--allow-empty", "-m", "first")
    proc = run_cli("run", str(scenario), "--out", str(tmp_path / "runs"), "--history", str(path), cwd=repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = run_cli("history", "--history", str(path), "--json")
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert row["kind"] == "run" and row["scenario"] == "k" and row["ok"] == 1
    assert row["git_commit"] == head and row["git_dirty"] == 0
    assert row["torch_version"] and row["machine"]["cpu"]
    assert row["figures"]["outcomes"] == {"recovered": 1}
    table = run_cli("history", "--history", str(path), "--scenario", "k")
    assert "recovered=1" in table.stdout and head[:8] in table.stdout


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


SDC = """\
name: sdc-{tag}
workload: {{model: tiny, ranks: 2, steps: 12, threads: 1}}
detectors: {detectors}
recovery: {{mode: rollback, max_rollbacks: 4}}
campaign: {{trials: {trials}, seed: 5, warmup: 4, window: 6, observe: false}}
faults:
  - fault: corruption.bitflip
    step: 4
    params: {{target: param}}
    vary: {{rank: [0, 1], step: {{min: 4, max: 8}}, bit_class: [exponent, sign]}}
"""
# (observe: false: what a caught flip would have done unchecked is not what these tests compare, and skips a
# window per caught trial)


def _campaign(tmp_path: Path, tag: str, detectors: str, trials: int) -> Path:
    path = tmp_path / f"{tag}.yaml"
    path.write_text(SDC.format(tag=tag, detectors=detectors, trials=trials))
    out = tmp_path / f"runs-{tag}"
    proc = run_cli("campaign", str(path), "--out", str(out), "--quiet", timeout=400)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return run_dir_of(out)


@pytest.mark.slow
def test_compare_says_same_worse_and_not_comparable_when_it_should(tmp_path: Path) -> None:
    on = "{nonfinite: {}, fingerprint: {every: 1}}"
    a = _campaign(tmp_path, "on1", on, 20)
    # the same campaign again (same seed, same trials: a campaign is deterministic, tests/test_sdc.py)
    b = Path(shutil.copytree(a, tmp_path / "runs-on2" / a.name))
    off = _campaign(tmp_path, "off", "{}", 20)  # the same trials, no detector
    # same seed, same trials: paired, and every metric the same (20 trials fit a 0.25 margin)
    same = run_cli("compare", str(a), str(b), "--margin", "0.25", "--json", "--fail-on", "not-comparable")
    assert same.returncode == 0, same.stdout + same.stderr
    c = json.loads(same.stdout)
    assert c["paired"] and {m["verdict"] for m in c["metrics"]} == {"same"}, c["metrics"]
    # the detector switched off: detection and sdc worse, with the interval
    worse = run_cli("compare", str(a), str(off), "--json", "--fail-on", "worse")
    assert worse.returncode == 1, worse.stdout + worse.stderr
    by = {m["metric"]: m for m in json.loads(worse.stdout)["metrics"]}
    for name in ("detection rate", "sdc rate"):
        m = by[name]
        assert m["verdict"] == "worse" and m["p"] < 0.05, m
        lo, hi = m["ci95"]
        assert (hi < 0 if name == "detection rate" else lo > 0), m
    md = run_cli("compare", str(a), str(off))
    assert "McNemar" in md.stdout and "worse" in md.stdout
    # 5 trials against 5: the samples cannot tell, and say how many would
    five_a = _campaign(tmp_path, "five1", on, 5)
    five_b = Path(shutil.copytree(five_a, tmp_path / "runs-five2" / five_a.name))
    c5 = compare(load_side(str(five_a)), load_side(str(five_b)))
    rates = [m for m in c5["metrics"] if "rate" in m["metric"]]
    assert rates and all(m["verdict"] == "not comparable" and m["trials_needed"] > 5 for m in rates), rates


@pytest.mark.slow
def test_triage_groups_by_signature_and_marks_what_is_new(tmp_path: Path) -> None:
    env = {"BURNIN_HISTORY": str(tmp_path / "h.sqlite")}  # this test's runs only

    def run(tag: str, *args: str) -> Path:
        out = tmp_path / f"runs-{tag}"
        proc = run_cli("run", *args, "--out", str(out), env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return run_dir_of(out)

    def scenario(tag: str, faults: str) -> str:
        path = tmp_path / f"{tag}.yaml"
        path.write_text(f"name: {tag}\nworkload: {{steps: 14}}\nfaults:\n{faults}")
        return str(path)

    kill = "  - {fault: process.kill, rank: 1, step: %d, expect: recovered}\n"
    base = run("base", scenario("base", kill % 5))
    now1 = run("now", scenario("now", kill % 9 + "  - {fault: process.exception, rank: 0, step: 4, expect: recovered}\n"))
    # the story's latent kernel bug: crashes at data-dependent steps, and a kill of rank 1 at step 40
    bug = run("bug", "latent-kernel-bug", "--steps", "45")
    proc = run_cli("triage", str(now1), str(bug), str(base), "--baseline", str(base), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    t = json.loads(proc.stdout)
    groups = {g["signature"]: g for g in t["groups"]}
    # kills at steps 5, 9 and 40 in three runs: one signature (the step and the pid are erased)
    (killed,) = [g for s, g in groups.items() if s.startswith("killed")]
    assert killed["count"] == 3 and killed["runs"] == 3 and killed["status"] == "ongoing"
    assert killed["explained_by"] == ["process.kill"] and killed["reproduces"] == 1.0
    (exc,) = [g for s, g in groups.items() if s.startswith("exception")]
    assert exc["status"] == "new" and exc["explained_by"] == ["process.exception"] and exc["reproduces"] == 1.0
    # the bug's crashes: groups of their own, explained by the bug, none by the kill
    crashes = [g for g in t["groups"] if "memory.latent_kernel_bug" in g["explained_by"]]
    assert crashes and all(g["status"] == "new" and g["runs"] == 1 and 0 in g["ranks"] for g in crashes), crashes
    assert t["causes"]["memory.latent_kernel_bug"] == [g["signature"] for g in crashes]
    md = run_cli("triage", str(now1), "--baseline", str(base), env=env)
    assert md.returncode == 0 and "| new |" in md.stdout and "`killed: SIGKILL`" in md.stdout, md.stdout


@pytest.mark.slow
def test_git_bisect_run_finds_the_commit_that_broke_recovery(tmp_path: Path) -> None:
    """A throwaway repository whose scenario is fine for three commits; the fourth stops restoring the
    torch RNG on resume (a real reliability bug: the restart no longer reaches the golden state)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    good = "name: b\nworkload: {steps: 12}\nfaults:\n  - {fault: process.kill, rank: 1, step: 6, expect: recovered}\n"
    commits = []
    for i in range(6):
        text = good + (f"# revision {i}\n")
        if i >= 3:
            text += "debug: {skip_restore: [torch_rng]}\n"
        (repo / "scenario.yaml").write_text(text)
        _git(repo, "add", "scenario.yaml")
        _git(repo, "commit", "-q", "-m", f"revision {i}")
        commits.append(_git(repo, "rev-parse", "HEAD").strip())
    _git(repo, "bisect", "start", commits[-1], commits[0])
    cmd = " ".join(burnin_cmd("bisect", "scenario.yaml", "--out", str(tmp_path / "runs")))
    env = {**os.environ}
    out = subprocess.run(["git", "bisect", "run", "sh", "-c", cmd], cwd=repo, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{commits[3]} is the first bad commit" in out.stdout, out.stdout
    _git(repo, "bisect", "reset")
    # what a revision that cannot be set up says: skip
    (repo / "scenario.yaml").write_text("name: b\nworkload: {steps: nope}\n")
    skip = run_cli("bisect", "scenario.yaml", cwd=repo)
    assert skip.returncode == 125 and "skipped" in skip.stderr, skip.stderr
    flags = run_cli("bisect", "scenario.yaml", "--repeats", "0", cwd=repo)
    assert flags.returncode == 128, flags.stderr
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


@pytest.mark.slow
def test_shrink_finds_the_one_fault_that_causes_the_failure(tmp_path: Path) -> None:
    """Six faults: kills, an exception, a damaged checkpoint that nothing loads (every restart resumes from a
    memory snapshot), and one exponent flip in a local gradient before the all-reduce, which no replica
    fingerprint can see. The verdict pins the divergence on the flip alone: the recoveries before it matched
    the golden run until it (`recovered`), the damage nobody read is `masked`, the faults after the divergence
    are `unjudged`. Shrink reduces the schedule to the flip, and the result fails the same way."""
    faults = ["{fault: process.kill, rank: 1, step: 3}", "{fault: process.exception, rank: 0, step: 5}",
              "{fault: storage.checkpoint_corrupt, step: 7, params: {mode: truncate}}",
              "{fault: corruption.bitflip, rank: 0, step: 8, params: {target: grad, tensor: blocks.0.ln_1.weight, "
              "bit_class: exponent, seed: 3}}",
              "{fault: process.kill, rank: 0, step: 10}", "{fault: process.kill, rank: 1, step: 12}"]
    scenario = tmp_path / "six.yaml"
    scenario.write_text("name: six\nworkload: {steps: 16}\nrecovery: {max_restarts: 8}\nfaults:\n"
                        + "".join(f"  - {f}\n" for f in faults))
    out = tmp_path / "runs"
    first = run_cli("run", str(scenario), "--out", str(out))
    assert first.returncode == 1, first.stdout + first.stderr
    run_dir = run_dir_of(out)
    s = json.loads((run_dir / "summary.json").read_text())
    outcomes = [f["outcome"] for f in s["faults"]]
    assert outcomes == ["recovered", "recovered", "masked", "sdc", "unjudged", "unjudged"], (outcomes, first.stdout)
    assert "nothing loaded the damaged checkpoint" in s["faults"][2]["details"]["why"]
    flip_step = s["faults"][3]["step"]
    # the first divergent step comes after the flip and before the faults that read `unjudged`
    assert flip_step < s["diverged_at_step"] < s["faults"][4]["step"] and s["faults"][3]["details"]["diverged_at_step"] == s["diverged_at_step"]
    junit = (run_dir / "junit.xml").read_text()
    assert 'skipped="2"' in junit and 'failures="2"' in junit, junit
    proc = run_cli("shrink", str(run_dir), "--max-runs", "20", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 faults -> 1" in proc.stdout, proc.stdout + proc.stderr
    from burnin.scenarios import load_scenario

    small = load_scenario(str(run_dir / "shrunk.yaml"))
    assert [f.fault for f in small.faults] == ["corruption.bitflip"]
    assert small.faults[0].step <= flip_step and small.workload.steps <= 16
    again = run_cli("run", str(run_dir / "shrunk.yaml"), "--out", str(tmp_path / "again"))
    assert again.returncode == 1
    s = json.loads((run_dir_of(tmp_path / "again") / "summary.json").read_text())
    assert not s["exact"] and s["faults"][0]["outcome"] == "sdc"
