"""End to end: memory faults from the Triton loss kernel, through the real `burnin` command.

On this CPU-only machine the kernel runs in the Triton interpreter, where a wild offset is a real
SIGSEGV of the rank and a small overrun a real silent overwrite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import processes_of_run, run_cli, run_dir_of, summary_of

from burnin.core.events import read_events

IMA = "illegal_memory_access: SIGSEGV"


def test_failure_groups_put_one_root_cause_in_one_group() -> None:
    from burnin.reports.result import Failure, RunResult
    from burnin.reports.writers import failure_groups

    def failure(attempt: int, sig: str, cause: str, rank: int, last: int | None, fault: int | None) -> Failure:
        return Failure(attempt, 0.0, cause, rank, "exit_signal", sig.split(": ")[1], sig, last, fault)

    result = RunResult("s", "r", "/d", "h", 2, 100, "cpu", 0.0, 1.0, True, 99, "a", "a", True, None, 4, 100,
                       1.0, 0.5, failures=[failure(0, IMA, "illegal_memory_access", 0, 14, 0),
                                           failure(1, "killed: SIGKILL", "killed", 1, 40, 1),
                                           failure(2, IMA, "illegal_memory_access", 0, 28, 0),
                                           failure(3, IMA, "illegal_memory_access", 0, None, 0)])
    groups = failure_groups(result)
    assert [(g["signature"], g["count"]) for g in groups] == [(IMA, 3), ("killed: SIGKILL", 1)]
    assert groups[0]["steps"] == [15, 29, None] and groups[0]["ranks"] == [0] and groups[0]["faults"] == [0]
    assert groups[1] == {"signature": "killed: SIGKILL", "count": 1, "causes": ["killed"], "ranks": [1],
                         "steps": [41], "faults": [1]}


@pytest.mark.slow
def test_illegal_memory_access_kills_the_rank_and_recovers_exactly(tmp_path: Path) -> None:
    proc = run_cli("run", "illegal-memory-access", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path)
    assert s["finished"] and s["exact"] and s["final_state_hash"] == s["golden_state_hash"]
    (f,) = s["faults"]
    assert f["outcome"] == "recovered"
    assert f["detected_by"] == "exit_signal" and f["cause"] == "illegal_memory_access"
    assert s["restarts"] == 1

    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    (failure,) = [e for e in events if e["event"] == "failure_detected"]
    assert failure["rank"] == 1 and failure["detail"] == "SIGSEGV" and failure["cause"] == "illegal_memory_access"
    first_teardown = next(e for e in events if e["event"] == "teardown_done")
    assert first_teardown["exits"]["1"] == -11  # the rank died of the signal, not of an exit code
    assert [g["signature"] for g in s["failure_groups"]] == [IMA]
    assert processes_of_run(s["run_id"]) == []


@pytest.mark.slow
def test_latent_kernel_bug_crashes_again_and_again_and_every_crash_is_recovered(tmp_path: Path) -> None:
    proc = run_cli("run", "latent-kernel-bug", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path)
    assert s["finished"] and s["exact"]
    assert [f["outcome"] for f in s["faults"]] == ["recovered", "recovered"]

    crashes = [x for x in s["failures"] if x["signature"] == IMA]
    assert len(crashes) >= 3
    assert all(x["fault_index"] == 0 for x in crashes)       # each one attributed to the latent bug
    assert not [x for x in s["failures"] if x["fault_index"] is None]

    # One group for the bug, however many times it struck, and its own group for the kill.
    groups = {g["signature"]: g for g in s["failure_groups"]}
    assert set(groups) == {IMA, "killed: SIGKILL"}
    bug, kill = groups[IMA], groups["killed: SIGKILL"]
    assert bug["count"] == len(crashes) and bug["faults"] == [0] and bug["ranks"] == [0]
    assert len(set(bug["steps"])) >= 3                        # at different, data-dependent steps
    assert kill["count"] == 1 and kill["faults"] == [1] and kill["steps"] == [41]
    assert s["restarts"] == len(crashes) + 1
    md = (run_dir_of(tmp_path) / "summary.md").read_text()
    assert "## Failure groups" in md and f"`{IMA}` | {len(crashes)} |" in md


@pytest.mark.slow
def test_oob_write_is_a_silent_corruption(tmp_path: Path) -> None:
    proc = run_cli("run", "oob-write", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the scenario expects sdc
    s = summary_of(tmp_path)
    (f,) = s["faults"]
    assert f["outcome"] == "sdc" and f["detected_by"] is None
    assert s["finished"] and not s["exact"] and s["restarts"] == 0 and s["failures"] == []
    # The overrun lands in the log-sum-exp the backward reads: the loss of the fault's own step is
    # still right; a later one differs (which one depends on the CPU's floating-point path).
    assert s["diverged_at_step"] is not None and s["diverged_at_step"] > f["step"]
    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    assert not [e for e in events if e["event"] in ("detection", "fault_detected", "detected")]
