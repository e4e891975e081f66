"""Attribution: which faults a failure explains, and faults that could not be applied."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from conftest import run_cli, run_dir_of, summary_of

from burnin.faults import registry
from burnin.reports.attribution import Candidate, Evidence, explained_by, pin_detection
from burnin.core.events import read_events

T = 1000.0


def _ev(detector: str, rank: int | None, cause: str, t: float = T) -> Evidence:
    return Evidence(detector, rank, cause, "", t)


def _cand(index: int, fault: str, rank: int, step: int = 5, at: float = T - 1, timeouts=None) -> Candidate:
    f = registry.get(fault)()
    window = f.effect_window_s(timeouts) if timeouts is not None else None
    return Candidate(index, step, rank, f.effects, f.effect_scope, at, window)


def test_two_kills_in_one_attempt_are_both_explained() -> None:
    evidence = [_ev("exit_signal", 1, "killed"), _ev("exit_signal", 2, "killed"), _ev("rank_error", 0, "network")]
    primary, every = explained_by(evidence, [_cand(0, "process.kill", 1), _cand(1, "process.kill", 2)], set())
    assert every == [0, 1] and primary == 0  # the root evidence is rank 1's death


def test_a_stopped_rank_is_explained_beside_a_killed_one() -> None:
    evidence = [_ev("exit_signal", 2, "killed"), _ev("stopped", 1, "hang")]
    primary, every = explained_by(evidence, [_cand(0, "process.hang", 1), _cand(1, "process.kill", 2)], set())
    assert every == [0, 1] and primary == 1


def test_evidence_on_another_rank_explains_no_rank_fault() -> None:
    # rank 1 was killed, but the fault aimed at rank 0: that is not this fault's effect
    assert explained_by([_ev("exit_signal", 1, "killed")], [_cand(0, "process.kill", 0)], set()) == (None, [])
    # a stop is not a kill
    assert explained_by([_ev("exit_signal", 1, "killed")], [_cand(0, "process.hang", 1)], set()) == (None, [])


def test_a_detector_finding_explains_the_corruption_it_pins() -> None:
    flip = _cand(0, "corruption.bitflip", 1)
    evidence = [_ev("rank_error", 0, "corruption"), _ev("rank_error", 1, "corruption")]
    assert explained_by(evidence, [flip], {0}) == (0, [0])
    assert explained_by(evidence, [flip], set()) == (None, [])  # nothing pinned it: unexplained


def test_a_network_fault_explains_timeouts_only_while_it_can_have_them() -> None:
    from burnin.scenarios.schema import Timeouts

    t = Timeouts(collective_s=10, step_s=20)
    down = _cand(0, "network.link_down", 1, at=T - 5, timeouts=t)  # 1 s down: effects up to 1 + 20 + 1 s later
    assert explained_by([_ev("rank_error", 0, "network")], [down], set()) == (0, [0])
    late = _cand(0, "network.link_down", 1, at=T - 100, timeouts=t)
    assert explained_by([_ev("rank_error", 0, "network")], [late], set()) == (None, [])


def test_detections_pin_the_newest_fault_aimed_at_a_named_rank() -> None:
    first = {0: T - 3, 1: T - 2, 2: T + 5}
    ranks = [1, 0, 1]
    assert pin_detection({"t": T, "odd_ranks": [1]}, first, ranks) == 0
    assert pin_detection({"t": T, "odd_ranks": []}, first, ranks) == 1
    assert pin_detection({"t": T - 10, "odd_ranks": [1]}, first, ranks) is None  # before any: a false alarm


def test_a_finding_prefers_the_fault_a_detector_can_see() -> None:
    """Seen in a burn-in: a bit flip on rank 1, then a damaged checkpoint on rank 1 a moment later, then
    the fingerprint names rank 1. The finding is the flip's; a damaged checkpoint shows only on a load."""
    first = {0: T - 0.3, 1: T - 0.1}
    ranks = [1, 1]
    assert pin_detection({"t": T, "odd_ranks": [1]}, first, ranks, [True, False]) == 0
    assert pin_detection({"t": T, "odd_ranks": [1]}, first, ranks) == 1  # without scopes: the newest
    assert pin_detection({"t": T, "odd_ranks": [1]}, first, ranks, [False, False]) == 1


# -- a fault that cannot be applied is a harness error, never an outcome ---------------------------


def _plugin(root: Path) -> dict[str, str]:
    dist_info = root / "brokenfaults-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenfaults\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[burnin.faults]\ninrank = brokenfaults:InRank\noutofrank = brokenfaults:OutOfRank\n")
    (root / "brokenfaults.py").write_text(textwrap.dedent('''
        from burnin.faults import Fault

        class InRank(Fault):
            name = "test.unappliable"
            summary = "an in-rank fault whose target is gone"
            where = "in_rank"
            points = ("after_optimizer_step",)
            disruptive = False

            def inject(self, ctx):
                raise RuntimeError("the device to corrupt is gone")

        class OutOfRank(Fault):
            name = "test.unappliable_outside"
            summary = "an out-of-rank fault whose tool fails"
            where = "out_of_rank"
            effects = ("killed",)

            def inject(self, ctx):
                raise OSError("the tool that applies it failed")
    '''))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["test.unappliable", "test.unappliable_outside"])
def test_a_fault_that_cannot_be_applied_is_a_harness_error(fault: str, tmp_path: Path) -> None:
    env = _plugin(tmp_path / "plugin")
    scenario = tmp_path / "s.yaml"
    scenario.write_text(f"name: unappliable\nworkload: {{steps: 8}}\ncheckpoint: {{every: 2}}\n"
                        f"faults:\n  - {{fault: {fault}, rank: 1, step: 3}}\n")
    out = tmp_path / "runs"
    proc = run_cli("run", str(scenario), "--out", str(out), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    s = summary_of(out)
    (f,) = s["faults"]
    assert f["outcome"] == "failed"
    assert f["details"]["error"] in ("RuntimeError: the device to corrupt is gone",
                                     "OSError: the tool that applies it failed")
    assert s["restarts"] == 0  # restarting would only hide a harness error
    checks = {e["name"]: e for e in s["expectations"]}
    assert not checks["harness"]["ok"] and "could not be applied" in checks["harness"]["message"]
    assert checks["no unexplained failures"]["ok"]  # the harness error is reported once, as such
    events = read_events(run_dir_of(out) / "events.jsonl")
    assert [e["fault_index"] for e in events if e["event"] == "fault_error"] == [0]
    assert any(e["event"] == "recovery_abandoned" for e in events)
    assert "Traceback" not in proc.stderr
