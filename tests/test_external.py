"""torchft under burnin (`recovery.mode: external`): the system under test heals itself, burnin judges it.

Real runs of examples/torchft/train.py: a torchft lighthouse and one torchrun per replica group, started
by burnin; a hang (ended by torchelastic's watchdog) and a cut from the lighthouse, each healed by torchft
from the live group, and a bit flipped in what a group sends across, averaged into both, judged by the
invariants and exit 0 with nothing left running; a loop that skips the heal, judged failed by the
cross-group fingerprint, exit 1; a burn-in of groups that shard with FSDP2 inside: faults at drawn
instants (a flip in a group's reduce-scatter carried to every group, a rank killed in its group's all-gather
and healed shard by shard), every group stopped at one step, a health verdict per rank. The verdict's invariants are
also checked one by one on event logs that break each of them, and the scenario checks that refuse what
external mode cannot run, in one line.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from conftest import require_module, run_cli, run_dir_of, summary_of

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "torchft"

#: Two groups of one rank each, paced so a group's restart (seconds) costs tens of steps, not hundreds.
#: The faults are armed one at a time, each once the one before has healed: the last fired at step 134-191
#: on a busy machine (the hang's absence ~15 s, the cut's ~6 s, the settling between); 300 steps leave room.
#: (A kill healed by torchft: the burn-in's.)
HEALED = """\
name: torchft-healed
workload:
  entry: train.py
  args: [--step-time, "0.1", --watchdog, "10"]
  ranks: 2
  steps: 300
  tolerance: {window: 20, loss_rtol: 0.25, state_rtol: 0.1}
recovery:
  mode: external
  external:
    replica_groups: 2
    lighthouse: {min_replicas: 1, join_timeout_ms: 6000, heartbeat_timeout_ms: 2000}
timeouts: {run_s: 400}
faults:
  - {fault: process.hang, rank: 0, step: 10, point: ft_all_reduce, expect: recovered}
  - {fault: network.coordinator_cut, rank: 1, step: 15, params: {duration_s: 4}, expect: recovered}
  - {fault: corruption.bitflip, rank: 1, step: 20, params: {target: allreduce_payload, bit_class: mantissa_low},
     expect: masked}
"""


@pytest.fixture(scope="module", autouse=True)
def _torchft() -> None:
    require_module("torchft", "torchft")


def _left_running(run_dir: Path) -> list[int]:
    from burnin.harness.external import run_processes

    return run_processes(run_dir / "external.json")


@pytest.mark.slow
def test_a_hang_and_a_cut_healed_by_torchft_pass_with_nothing_left(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE / "train.py", tmp_path / "train.py")
    (tmp_path / "s.yaml").write_text(HEALED)
    proc = run_cli("run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), timeout=900)
    run_dir = run_dir_of(tmp_path / "out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _left_running(run_dir) == []
    s = summary_of(tmp_path / "out")
    assert s["comparison"] == "tolerance" and not s["exact"]  # never called exact
    checks = {e["name"]: e for e in s["expectations"]}
    for name in ("replica groups agree", "no update outside the quorum", "loss within tolerance",
                 "final state within tolerance", "every group finishes", "nothing left running"):
        assert checks[name]["ok"], checks[name]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    # a low bit flipped in what group 1 sent into the cross-group all-reduce: averaged into both groups
    # alike (they still agree), nothing dropped out, in tolerance
    flip = s["faults"].pop()
    assert flip["outcome"] == "masked" and flip["injected"] and "heal" not in flip["details"], flip
    for f in s["faults"]:
        assert f["outcome"] == "recovered", f
        heal = f["details"]["heal"]
        # healed by torchft from the live group: a heal of its own, a transfer, then every group takes part
        assert heal["total_s"] > 0 and heal["transfer_s"] is not None and f["lost_steps"] is not None
        group = f["rank"]  # one rank per group
        assert any(e["event"] == "ft_healed" and e["rank"] == group and e["t"] > f["injected_at"] for e in events)
    # burnin restored nothing: the groups came back by torchrun's restart, the scheduler's (after the
    # watchdog ended the hung rank's agent), or by themselves after the cut
    kinds = {e["event"] for e in events}
    assert not kinds & {"resumed", "rollback", "checkpoint_saved"}
    assert any(e["event"] == "group_restarted" and e["group"] == 0 for e in events)  # the hang's
    assert any(e["event"] == "coordinator_restored" for e in events)


@pytest.mark.slow
def test_a_group_that_skips_the_heal_is_judged_failed_by_the_fingerprint(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE / "train.py", tmp_path / "train.py")
    text = (EXAMPLE / "broken.yaml").read_text().replace("ranks: 4", "ranks: 2")
    (tmp_path / "broken.yaml").write_text(text.replace("rank: 2, step: 10", "rank: 1, step: 10"))
    proc = run_cli("run", str(tmp_path / "broken.yaml"), "--out", str(tmp_path / "out"), timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = summary_of(tmp_path / "out")
    checks = {e["name"]: e for e in s["expectations"]}
    assert not checks["replica groups agree"]["ok"]
    assert "committed with different states" in checks["replica groups agree"]["message"]
    assert checks["no update outside the quorum"]["ok"] and checks["nothing left running"]["ok"]
    assert s["faults"][0]["outcome"] == "failed"
    assert "replica groups agree" in s["faults"][0]["details"]["why"]
    assert _left_running(run_dir_of(tmp_path / "out")) == []


# -- the invariants, one by one, on event logs that break each ---------------------------------------

def _scenario(faults: list[dict] | None = None):
    from burnin.scenarios.schema import Scenario

    return Scenario.model_validate({
        "name": "ft", "workload": {"entry": "train.py", "ranks": 2, "steps": 3,
                                   "tolerance": {"loss_rtol": 0.1, "state_rtol": 0.1}},
        "recovery": {"mode": "external", "external": {"replica_groups": 2}}, "faults": faults or []})


def _golden():
    from burnin.harness.golden import GoldenRecord

    bits = {"0": "3f800000", "1": "3f800000", "2": "3f800000"}  # 1.0 at every step
    return GoldenRecord(key="k", state_hash="h2", loss_bits={"0": bits, "1": bits}, checkpoint_hashes={},
                        final_loss=1.0, loss_floor=None, wall_s=1.0, state_norms={"model.w": 2.0, "optim.m": 1.0})


def _log() -> list[dict]:
    """A healthy log: two groups of one rank, both in quorum 1, three steps committed alike."""
    ev: list[dict] = [{"t": 0.0, "event": "run_started", "source": "launcher"}]
    t = 1.0
    for step in range(3):
        for rank in (0, 1):
            ev.append({"t": t, "event": "ft_quorum", "rank": rank, "quorum_id": 1,
                       "replica_ids": ["group0:a", "group1:b"]})
            ev.append({"t": t + 0.1, "event": "step_done", "rank": rank, "step": step, "ran": step, "committed": True,
                       "applied": True, "healed": False, "quorum_id": 1, "participants": 2, "loss": 1.0,
                       "loss_bits": "3f800000", "state_hash": f"h{step}"})
            t += 0.2
    for rank in (0, 1):
        ev.append({"t": t, "event": "rank_finished", "rank": rank, "final_step": 2, "state_hash": "h2",
                   "state_norms": {"model.w": 2.0, "optim.m": 1.0}})
    ev.append({"t": t + 1, "event": "run_finished", "source": "launcher", "finished": True, "left_running": []})
    return ev


def _checks(events: list[dict], faults: list[dict] | None = None) -> dict[str, tuple[bool, str]]:
    from burnin.reports.external import judge_external

    r = judge_external(events, _scenario(faults), _golden(), run_id="r", run_dir="/nowhere", config_hash="k")
    return {e.name: (e.ok, e.message) for e in r.expectations}


def test_a_healthy_log_holds_every_invariant() -> None:
    checks = _checks(_log())
    assert all(ok for ok, _ in checks.values()), checks


def test_groups_holding_different_states_after_a_step_break_the_fingerprint() -> None:
    ev = _log()
    next(e for e in ev if e["event"] == "step_done" and e["rank"] == 1 and e["step"] == 1)["state_hash"] = "other"
    ok, msg = _checks(ev)["replica groups agree"]
    assert not ok and "step 1 was committed with different states" in msg


def test_an_update_torchft_did_not_commit_breaks_the_quorum_invariant() -> None:
    ev = _log()
    e = next(e for e in ev if e["event"] == "step_done" and e["rank"] == 0 and e["step"] == 1)
    e["committed"] = False  # the optimizer ran all the same
    ok, msg = _checks(ev)["no update outside the quorum"]
    assert not ok and "applied an update in step 1 that torchft did not commit" in msg


def test_a_commit_in_a_quorum_without_the_group_breaks_the_quorum_invariant() -> None:
    ev = _log()
    for e in ev:
        if e["event"] == "ft_quorum" and e["rank"] == 1:
            e["replica_ids"] = ["group0:a"]
    ok, msg = _checks(ev)["no update outside the quorum"]
    assert not ok and "whose members are groups [0]" in msg


def test_loss_and_final_state_out_of_tolerance_are_named() -> None:
    ev = _log()
    for e in ev:
        if e["event"] == "step_done" and e["step"] == 2:
            e["loss_bits"] = "40000000"  # 2.0 against the golden 1.0
        if e["event"] == "rank_finished":
            e["state_norms"] = {"model.w": 3.0, "optim.m": 9.0}  # the optimizer's moments are not compared
    checks = _checks(ev)
    assert not checks["loss within tolerance"][0] and "at step 2" in checks["loss within tolerance"][1]
    ok, msg = checks["final state within tolerance"]
    assert not ok and "differs from the golden run's by 0.5" in msg


def test_a_group_that_never_finishes_or_a_process_left_running_fails() -> None:
    ev = _log()
    ev = [e for e in ev if not (e["event"] == "rank_finished" and e["rank"] == 1)]
    ev[-1]["left_running"] = [{"pid": 4242, "cmdline": "python train.py"}]
    checks = _checks(ev)
    assert not checks["every group finishes"][0] and not checks["nothing left running"][0]
    assert "4242" in checks["nothing left running"][1]


def test_a_fault_whose_group_never_returns_fails_with_its_phases() -> None:
    ev = _log()
    ev.insert(3, {"t": 1.05, "event": "fault_injected", "rank": 1, "fault_index": 0, "fault": "process.kill",
                  "step": 0})
    # the survivor's quorum without group 1, and group 1 never heals
    ev.append({"t": 1.5, "event": "ft_quorum", "rank": 0, "quorum_id": 2, "replica_ids": ["group0:a"]})
    ev.sort(key=lambda e: e["t"])
    r_faults = [{"fault": "process.kill", "rank": 1, "step": 0, "expect": "recovered"}]
    from burnin.reports.external import judge_external

    r = judge_external(ev, _scenario(r_faults), _golden(), run_id="r", run_dir="/x", config_hash="k")
    f = r.faults[0]
    assert f.outcome == "failed" and "never came back" in f.details["why"]
    assert f.details["heal"]["detection_s"] == pytest.approx(0.45)


# -- what external mode refuses, in one line --------------------------------------------------------

BASE = {"name": "ft", "workload": {"entry": "train.py", "ranks": 4, "steps": 20},
        "recovery": {"mode": "external"}}


@pytest.mark.parametrize("change, field, fragment", [
    ({"workload": {"entry": None}}, "workload.entry", "recovery.mode external runs a loop of yours"),
    ({"workload": {"ranks": 3}}, "recovery.external.replica_groups", "do not divide workload.ranks=3"),
    ({"recovery": {"external": {"replica_groups": 2, "lighthouse": {"min_replicas": 3}}}},
     "recovery.external.lighthouse.min_replicas", "no quorum could form"),
    ({"faults": [{"fault": "storage.checkpoint_corrupt", "step": 3}]}, "faults.0.fault",
     "cannot act on a loop burnin does not run the recovery of"),
    ({"faults": [{"fault": "corruption.bitflip", "step": 3, "params": {"target": "grad"}}]},
     "faults.0.params.target", "use one of param, optimizer_state, allreduce_payload"),
    ({"faults": [{"fault": "corruption.bitflip", "step": 3, "point": "ft_all_reduce"}]}, "faults.0.point",
     "ft_all_reduce takes the process faults"),
    ({"recovery": {"mode": "restart", "external": {"replica_groups": 2}}}, "recovery.external",
     "set the mode, or drop external"),
    ({"recovery": {"mode": "restart"}, "faults": [{"fault": "network.coordinator_cut", "step": 3}]},
     "faults.0.fault", "which only recovery.mode: external has"),
    ({"recovery": {"mode": "restart"}, "faults": [{"fault": "process.kill", "step": 3, "point": "ft_all_reduce"}]},
     "faults.0.point", "which only recovery.mode: external has"),
    # a burn-in's fault kinds, as its arrivals will be
    ({"burn_in": {"duration_s": 60, "faults": [{"fault": "storage.checkpoint_corrupt", "per_hour": 10}]}},
     "burn_in.faults.0.fault", "cannot act on a loop burnin does not run the recovery of"),
    ({"burn_in": {"duration_s": 60, "faults": [{"fault": "process.kill", "per_hour": 10,
                                                "points": ["between_steps", "tp_all_reduce"]}]}},
     "burn_in.faults.0.points", "tp_all_reduce is not a point of a torchft loop"),
    ({"recovery": {"mode": "restart"},
      "burn_in": {"duration_s": 60, "faults": [{"fault": "network.coordinator_cut", "per_hour": 10}]}},
     "burn_in.faults.0.fault", "which only recovery.mode: external has"),
    ({"recovery": {"mode": "restart"},
      "burn_in": {"duration_s": 60, "faults": [{"fault": "process.hang", "per_hour": 10, "points": ["ft_all_reduce"]}]}},
     "burn_in.faults.0.points", "which only recovery.mode: external has"),
])
def test_what_external_mode_cannot_run_is_refused_in_one_line(tmp_path: Path, change: dict, field: str,
                                                              fragment: str) -> None:
    import yaml

    from burnin.errors import ScenarioError
    from burnin.scenarios import load_scenario

    data = copy.deepcopy(BASE)
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    if data["workload"].get("entry") is None:
        data["workload"].pop("entry")
    else:
        (tmp_path / "train.py").write_text("")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    text = str(info.value)
    assert len(text.splitlines()) == 1 and info.value.field == field and fragment in text, text


# -- a burn-in of torchft ---------------------------------------------------------------------------

def test_a_group_that_leaves_the_quorum_with_no_fault_is_an_unexplained_failure_of_its_ranks() -> None:
    from types import SimpleNamespace

    from burnin.harness.burn_in import assess
    from burnin.harness.external_burn_in import unexplained_drops
    from burnin.scenarios.schema import Scenario

    sc = Scenario.model_validate({
        "name": "ft", "workload": {"entry": "train.py", "ranks": 2, "steps": 3},
        "recovery": {"mode": "external", "external": {"replica_groups": 2}},
        "burn_in": {"duration_s": 60, "faults": [{"fault": "process.kill", "per_hour": 60}]}})

    def full(t: float, step: int) -> list[dict]:
        return [{"t": t, "event": "step_done", "rank": r, "step": step, "committed": True, "participants": 2}
                for r in (0, 1)]

    ev = [*full(1, 0), *full(2, 1),
          # a kill of group 1: its restart and heal are the fault's
          {"t": 4, "event": "fault_injected", "rank": 1, "fault_index": 0, "step": 3},
          {"t": 5, "event": "rank_started", "rank": 1, "attempt": 1},
          {"t": 6, "event": "ft_heal_started", "rank": 1}, *full(7, 5),
          # group 0 heals with no fault since it took part again: one drop, seen twice
          {"t": 10, "event": "ft_heal_started", "rank": 0},
          {"t": 10.5, "event": "rank_started", "rank": 0, "attempt": 1}, *full(12, 9),
          # and again, after taking part in between: a second drop
          {"t": 15, "event": "group_restarted", "group": 0}]
    from burnin.reports.result import FaultResult

    kill = FaultResult(index=0, fault="process.kill", rank=1, step=0, point=None, expected=["recovered"],
                       outcome="recovered", injected=True, injected_at=4.0, details={"heal": {"total_s": 3.0}})
    drops = unexplained_drops(ev, sc, [kill])
    assert [(d.rank, d.time) for d in drops] == [(0, 10), (0, 15)]
    assert drops[0].fault_index is None and "healed from a peer" in drops[0].signature
    health = assess(sc, SimpleNamespace(failures=drops), ev, [])
    verdicts = {r["rank"]: r["verdict"] for r in health["ranks"]}
    assert verdicts == {0: "faulty", 1: "healthy"}, health  # two drops: a lemon at burn_in.health.lemon_failures=2


#: Two replica groups of two ranks, each group's model sharded with FSDP2, for 20 s: the seed draws a low bit
#: flipped in what rank 0 puts into its group's reduce-scatter (~4 s in), then a kill of rank 3 in the middle
#: of its group's all-gather (~11 s in; its heal takes ~7 s, 18 s on a loaded machine: the stop waits).
BURN_IN = """\
name: torchft-burn-in
workload:
  entry: train.py
  args: [--fsdp, --step-time, "0.15", --watchdog, "10"]
  ranks: 4
  steps: 10
  tolerance: {window: 20, loss_rtol: 0.25, state_rtol: 0.1}
recovery:
  mode: external
  external:
    replica_groups: 2
    lighthouse: {min_replicas: 1, join_timeout_ms: 6000, heartbeat_timeout_ms: 2000}
burn_in:
  duration_s: 20
  seed: 179
  quiet_start_s: 4
  quiet_end_s: 6
  faults:
    - {fault: process.kill, per_hour: 150, ranks: [3], points: [all_gather]}
    - {fault: corruption.bitflip, per_hour: 150, ranks: [0],
       params: {target: reduce_scatter_input, bit_class: mantissa_low}}
"""


@pytest.mark.slow
def test_a_burn_in_of_fsdp2_groups_heals_shard_by_shard_stops_every_group_at_one_step_and_judges_each_rank(
        tmp_path: Path) -> None:
    import yaml

    shutil.copy(EXAMPLE / "train.py", tmp_path / "train.py")
    (tmp_path / "b.yaml").write_text(BURN_IN)
    out = tmp_path / "out"
    proc = run_cli("burn-in", str(tmp_path / "b.yaml"), "--out", str(out), timeout=900)
    run_dir = run_dir_of(out)
    s = json.loads((run_dir / "burn-in.json").read_text())
    # the exit status is the health verdicts' too, which a busy machine can change: the recovery must hold
    assert proc.returncode == (0 if s["ok"] else 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert s["recovery"]["ok"] and s["error"] is None, s["recovery"]
    assert {i["name"] for i in s["recovery"]["invariants"]} >= {"replica groups agree", "no update outside the quorum",
                                                                "loss within tolerance", "every group finishes"}
    drawn = json.loads((run_dir / "schedule-drawn.json").read_text())["faults"]
    assert [f["fault"] for f in drawn] == ["corruption.bitflip", "process.kill"]  # from the seed alone
    flip, kill = s["faults"]["list"]
    assert all(f["fired_at_s"] >= f["at_s"] for f in (flip, kill))
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    # the flip, in what rank 0 put into its group's reduce-scatter, reached one shard of group 0, and torchft's
    # average carried it to that shard in group 1 too: every shard agrees across the groups
    hit = next(e for e in events if e["event"] == "fault_injected" and e["fault_index"] == flip["index"])
    assert hit["point"] == "reduce_scatter" and "parameter" in hit["details"], hit
    assert flip["outcome"] == "masked", flip
    # the kill landed inside group 1's all-gather; torchrun restarted the group, each rank healed its own shard
    # from the rank of the same shard in group 0
    assert kill["outcome"] == "recovered" and kill["point"] == "all_gather" and kill["phase"] == "all-gather", kill
    assert kill["heal"]["total_s"] > 0 and kill["heal"]["transfer_s"] is not None
    t_kill = next(e["t"] for e in events if e["event"] == "fault_injected" and e["fault_index"] == kill["index"])
    assert {e["rank"] for e in events if e["event"] == "ft_healed" and e["t"] > t_kill} == {2, 3}
    # the time was up, the groups settled: every rank stopped after the same step, the reference as long
    stop = [e for e in events if e["event"] == "burn_in_stop"]
    assert len(stop) == 1 and stop[0]["elapsed_s"] >= 20
    finals = {e["rank"]: (e["final_step"], e["shard"]) for e in events if e["event"] == "rank_finished"}
    last = stop[0]["steps"] - 1
    assert finals == {0: (last, 0), 1: (last, 1), 2: (last, 0), 3: (last, 1)}
    assert s["steps"]["job_steps"] == stop[0]["steps"] and 0 < s["steps"]["goodput_steps"] < 1
    # a verdict per rank, from the rolled-up forward times, with its thresholds
    assert [r["rank"] for r in s["health"]["ranks"]] == [0, 1, 2, 3]
    for r in s["health"]["ranks"]:
        assert r["verdict"] in ("healthy", "degraded", "faulty") and r["median_compute_s"] > 0
        assert (r["verdict"] == "healthy") == (not r["reasons"])
    assert sum(r["unexplained_failures"] for r in s["health"]["ranks"]) == sum(
        g["count"] for g in s["health"]["unexplained_failures"])  # (none, on a quiet machine: a drop is a fault's)
    assert [e for e in events if e["event"] == "burn_in_rollup"]
    assert _left_running(run_dir) == []
    for name in ("burn-in.md", "junit.xml", "report.html", "metrics.prom"):
        assert (run_dir / name).is_file(), name
    assert "## Invariants" in (run_dir / "burn-in.md").read_text()
    # the realised schedule replays as a plain external run
    replay = yaml.safe_load((run_dir / "schedule.yaml").read_text())
    assert replay["recovery"]["mode"] == "external" and [f["fault"] for f in replay["faults"]] == [
        "corruption.bitflip", "process.kill"]
    (tmp_path / "replay.yaml").write_text((run_dir / "schedule.yaml").read_text())
    assert run_cli("validate", str(tmp_path / "replay.yaml")).returncode == 0


@pytest.mark.slow
def test_a_fault_in_collectives_a_ddp_group_does_not_have_is_one_line_exit_2(tmp_path: Path) -> None:
    """The groups of examples/torchft/train.py use DDP by default: no all-gather to kill a rank in. Only the
    rank can see that (a loop's model is its own): it says so, and the run stops with the line, exit 2."""
    shutil.copy(EXAMPLE / "train.py", tmp_path / "train.py")
    (tmp_path / "s.yaml").write_text("""\
name: torchft-no-fsdp
workload: {entry: train.py, ranks: 2, steps: 8}
recovery: {mode: external, external: {replica_groups: 2}}
faults: [{fault: process.kill, rank: 1, step: 3, point: all_gather}]
""")
    proc = run_cli("run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "faults[0] process.kill at point all_gather" in line and "no FSDP2 collectives" in line, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _left_running(run_dir_of(tmp_path / "out")) == []
