"""Fleet burn-in: one burn-in per node, judged together. The determinism quorum and the persistent-outlier
rule on their own; bad input; a real local fleet of healthy nodes judged twice; a real three-node Slurm
(three slurmd on this host) with a node made slow from outside and a node carrying a simulated silent
defect: both named, the faulty one drained."""

from __future__ import annotations

import json
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CI, burnin_cmd, main_in, processes_of_run, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from slurm_cluster import SlurmCluster

from burnin.core import cgroups
from burnin.errors import UserError
from burnin.faults import defect
from burnin.harness.fleet import parse_plant
from burnin.reports.fleet import quorum
from burnin.reports.outliers import persistent_outliers, slow_samples

# A fleet's job: the tiny model, a few kills at random instants (every node takes the same schedule: same
# seed), 2-second periods so that a burn-in of 20-30 seconds gives enough of them to judge speed.
FLEET = """\
name: fleet-test
workload: {{model: tiny, ranks: 2, threads: 1}}
checkpoint: {{every: 5, keep: 2}}
timeouts: {{heartbeat_s: 2}}
detectors: {{nonfinite: {{}}, fingerprint: {{every: 5}}}}
burn_in:
  duration_s: 24
  seed: 0
  quiet_start_s: 3
  quiet_end_s: 3
  health: {{period_s: 2}}
  faults:
    - {{fault: process.kill, per_hour: {kills}, expect: recovered}}
"""


def _need(why: str | None) -> None:
    if why:
        if CI:
            pytest.fail(why)
        pytest.skip(why)


def _fleet_scenario(tmp_path: Path, kills: int = 300) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET.format(kills=kills))
    return path


def _left_running(fleet_dir: Path) -> list[int]:
    """The nodes' ranks (their run ids in their environment) and the nodes' own processes (the fleet
    directory on their command line) still alive."""
    pids = []
    for node in (fleet_dir / "nodes").iterdir():
        for run in (p for p in node.iterdir() if p.is_dir()):
            pids += processes_of_run(run.name)
    for p in Path("/proc").iterdir():
        try:
            alive = (p / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
            if alive and str(fleet_dir).encode() in (p / "cmdline").read_bytes():
                pids.append(int(p.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def _cgroups_left(fleet_id: str) -> list[str]:
    return [str(p) for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu")) if root.is_dir()
            for p in root.glob(f"burnin-*-{fleet_id}-*")]


# -- the quorum and the outlier rule ---------------------------------------------------------------------

def test_the_quorum_names_the_outvoted_node_with_its_first_step_and_rank_and_never_guesses_a_tie() -> None:
    good = {(s, r): f"{s}.{r}" for s in range(10) for r in range(2)}
    bad = dict(good)
    bad[(4, 1)] = "flip"  # rank 1's own gradient first; from step 5 every rank holds the damage
    bad.update({(s, r): f"x{s}.{r}" for s in range(5, 10) for r in range(2)})
    q = quorum({"a": good, "b": dict(good), "c": bad})
    assert q["c"]["status"] == "minority" and q["c"]["step"] == 4 and q["c"]["ranks"] == [1], q
    assert q["a"]["status"] == q["b"]["status"] == "agrees" and q["a"]["steps_compared"] == 10
    # two nodes that differ: no majority, and no guess which one is wrong
    tie = quorum({"a": good, "c": bad})
    assert tie["a"]["status"] == tie["c"]["status"] == "ambiguous" and tie["a"]["step"] == 4
    assert quorum({"a": good})["a"]["status"] == "alone"
    # a node that ran fewer steps (a slow one) votes on those it has
    short = {k: v for k, v in good.items() if k[0] < 3}
    q = quorum({"a": good, "b": short, "c": bad, "d": dict(good)})
    assert q["b"]["status"] == "agrees" and q["b"]["steps_compared"] == 3
    assert q["c"]["status"] == "minority" and q["c"]["step"] == 4  # outvoted 2 to 1 where b had no vote


def test_a_member_is_slow_only_when_persistently_and_significantly_so() -> None:
    rng = random.Random(5)
    noise = {m: [0.1 * rng.lognormvariate(0, 0.05) for _ in range(16)] for m in ("a", "b", "c", "d")}
    noise["a"][3] *= 4  # one terrible period is not a slow node
    judged = persistent_outliers(noise, 1.05, 0.01)
    assert not any(j["outlier"] for j in judged.values()), judged
    slow = {m: list(v) for m, v in noise.items()}
    slow["d"] = [x * 1.3 for x in noise["d"]]
    for k in (2, 9):
        slow["d"][k] = noise["d"][k] * 0.9  # slow in most periods, not all
    j = persistent_outliers(slow, 1.05, 0.01)
    assert j["d"]["outlier"] and j["d"]["p_value"] < 0.01 and j["d"]["score"] > 1.05, j["d"]
    assert not any(j[m]["outlier"] for m in "abc")
    assert persistent_outliers(slow, 1.05, 0.01) == j  # the same table, the same verdict
    few = persistent_outliers({m: v[:4] for m, v in slow.items()}, 1.05, 0.01)
    assert few["d"]["undecided"] and not few["d"]["outlier"]  # 4 periods can never be significant
    # what comes as a handful of durations per node (checkpoint saves): a rank test against the others pooled
    saves = {m: [0.07 * rng.lognormvariate(0, 0.2) for _ in range(8)] for m in "abcd"}
    saves["d"] = [x * 2 for x in saves["d"]]
    judged = slow_samples(saves, 1.5, 0.01)
    assert judged["d"]["outlier"] and not any(judged[m]["outlier"] for m in "abc"), judged
    assert slow_samples({m: v[:3] for m, v in saves.items()}, 1.5, 0.01)["d"]["undecided"]


# -- bad input ---------------------------------------------------------------------------------------

def _plant(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"plant-{secrets.token_hex(3)}.yaml"
    path.write_text(text)
    return str(path)


def test_bad_fleet_input_is_one_line_and_exit_2_before_anything_starts(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    cases = [
        (["fleet"], "say what to do"),
        (["fleet", "run", "--out", str(out), "--local", "0"], "--local"),
        (["fleet", "run", "--out", str(out), "--plant", _plant(tmp_path, "node-1: {silent: every=5}")], "--plant"),
        (["fleet", "run", "--out", str(out), "--local", "2", "--drain"], "--drain"),
        (["fleet", "run", "--out", str(out), "--node", "no/such name"], "--node"),
        (["fleet", "run", "--out", str(out), "--local", "2", "--duration", "5s"], "--duration"),
        (["fleet", "run", "--out", str(out), "--local", "2", "--pushgateway", "ftp://x"], "--pushgateway"),
        (["fleet", "run", "--out", str(out), "--local", "2", "--plant", _plant(tmp_path, "node-1: [")], "not YAML"),
        (["fleet", "run", "--out", str(out), "--local", "2", "--plant", _plant(tmp_path, "node-9: {silent: every=5}")],
         "node-9"),
        (["fleet", "run", "--out", str(out), "--local", "2", "--plant",
          _plant(tmp_path, "node-1: {slow: {cpu_fraction: 2}}")], "cpu_fraction"),
        (["fleet", "run", "--out", str(out), "--local", "2", "--plant",
          _plant(tmp_path, "node-1: {silent: every=0}")], "every=0"),
        (["fleet", "run", "--out", str(out), "--local", "2", "--plant", str(tmp_path / "missing.yaml")], "cannot read"),
        (["fleet", "report", str(tmp_path)], "not a fleet directory"),
        (["fleet", "score", str(tmp_path)], "fleet.json"),
    ]
    for argv, needle in cases:
        rc, err = main_in(tmp_path, argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (argv, rc, err)
        assert "Traceback" not in err
    assert not out.exists()  # nothing left behind


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_the_simulated_defect_spec(text: str) -> None:
    try:
        spec = defect.parse(text)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert spec["every"] >= 1 and 0 <= spec["bit"] <= 31


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_plant_files(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("plant") / "plant.yaml"
    path.write_text(text)
    try:
        parse_plant(str(path), 3)
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("--plant: ")


# -- real fleets -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_local_fleet_of_healthy_nodes_agrees_and_judged_again_says_the_same(tmp_path: Path) -> None:
    """Three stand-in nodes, each a cgroup of its own, take the same kills at the same instants: every node
    healthy, every node's fingerprints agree, and `burnin fleet report` writes the same verdicts again."""
    _need(cgroups.available())
    out = tmp_path / "fleet"
    proc = run_cli("fleet", "run", str(_fleet_scenario(tmp_path)), "--local", "3", "--duration", "20s",
                   "--seed", "3", "--out", str(out), timeout=420)
    fleet = json.loads((out / "fleet.json").read_text()) if (out / "fleet.json").exists() else {}
    assert proc.returncode == 0, proc.stdout + proc.stderr + json.dumps(fleet.get("nodes"), indent=1)
    assert sorted(fleet["nodes"]) == ["node-1", "node-2", "node-3"] and fleet["counts"]["healthy"] == 3
    for name, n in fleet["nodes"].items():
        assert n["verdict"] == "healthy" and n["reasons"] == [], n
        assert n["quorum"]["status"] == "agrees" and n["quorum"]["steps_compared"] > 20, n
        assert n["metrics"]["faults"] >= 1  # every node took the kills, and recovered them exactly
    assert len(fleet["classes"]) == 1 and fleet["classes"][0]["class"]["cpu"]
    first = (out / "fleet.json").read_text()
    again = run_cli("fleet", "report", str(out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert (out / "fleet.json").read_text() == first  # the same inputs judged again: the same verdicts
    junit = (out / "junit.xml").read_text()
    assert junit.count("<testcase") == 3 and "<failure" not in junit
    rows = [json.loads(line) for line in (out / "results-summary.jsonl").read_text().splitlines()]
    assert [r["node"] for r in rows] == ["node-1", "node-2", "node-3"] and all(r["burnin/step_s"] > 0 for r in rows)
    prom = (out / "metrics.prom").read_text()
    assert 'burnin_node_health{node="node-2"} 0.0' in prom
    assert 'id="heatmap"' in (out / "fleet.html").read_text()
    hist = run_cli("history", "--kind", "fleet")
    assert hist.returncode == 0 and out.name in hist.stdout, hist.stdout + hist.stderr
    assert _left_running(out) == [] and _cgroups_left(out.name) == []


@pytest.mark.slow
def test_a_local_fleet_stopped_with_ctrl_c_leaves_nothing_running(tmp_path: Path) -> None:
    """Ctrl-C on the launcher: every node stops (its ranks live in sessions of their own, its cgroup holds
    them all the same), no process and no cgroup is left, exit 130."""
    _need(cgroups.available())
    out = tmp_path / "fleet"
    proc = subprocess.Popen(burnin_cmd("fleet", "run", str(_fleet_scenario(tmp_path)), "--local", "2", "--duration",
                                       "60s", "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("nodes/*/*/ranks/rank1.pos")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert _left_running(out) == [] and _cgroups_left(out.name) == []


@pytest.mark.slow
def test_under_slurm_a_slow_node_and_a_silent_defect_are_named_and_the_faulty_one_drained(tmp_path: Path) -> None:
    """srun -N3 on three slurmd daemons of this host. From outside burnin, a wrapper gives each node a CPU
    cgroup of its own (n2 a quarter less CPU than the others) and plants a simulated silent defect in n3's
    environment. The fleet names n2 slow and n3 an SDC suspect at the step and rank of the first flip, drains
    n3 with its reason, and leaves n1 healthy; what was planted, sealed away from the verdict, scores it."""
    _need(SlurmCluster.unavailable() or cgroups.available())
    tag = secrets.token_hex(3)
    quota = 0.45
    groups = {n: cgroups.CpuGroup(f"test-{tag}-{n}", weight=1000) for n in ("n1", "n2", "n3")}
    for n, g in groups.items():
        g.limit(quota * (0.75 if n == "n2" else 1.0))
    out = tmp_path / "fleet"
    every = 20
    wrapper = tmp_path / "node.sh"
    wrapper.write_text(
        "#!/bin/bash\n"
        "case \"$SLURMD_NODENAME\" in\n"
        + "".join(f"  {n}) echo $$ > {g.path / 'cgroup.procs'} ;;\n" for n, g in groups.items())
        + "esac\n"
        f"if [ \"$SLURMD_NODENAME\" = n3 ]; then export {defect.ENV}=every={every},bit=10,rank=1; fi\n"
        f"exec {sys.executable} -m burnin fleet run {_fleet_scenario(tmp_path, kills=150)} --out {out} "
        "--duration 30s --seed 1 --drain --quiet\n")  # the slow node needs 7 periods of 2 s to be named
    wrapper.chmod(0o755)
    sealed = tmp_path / "sealed.json"  # what was planted: out of the fleet's reach until it is scored
    sealed.write_text(json.dumps({"n2": {"slow": {"cpu_fraction": 0.75}},
                                  "n3": {"silent": f"every={every},bit=10,rank=1"}}))
    cluster = SlurmCluster(tmp_path / "slurm", nodes=3)
    try:
        cluster.start()
        r = cluster.run("srun", "-N3", str(wrapper), timeout_s=480)
        fleet = json.loads((out / "fleet.json").read_text()) if (out / "fleet.json").exists() else {}
        report = r.stdout + r.stderr + json.dumps(fleet.get("nodes"), indent=1)
        assert r.returncode == 1, report  # rank 0 of the step: the fleet failed
        nodes = fleet["nodes"]
        assert nodes["n1"]["verdict"] == "healthy", report
        assert nodes["n2"]["verdict"] == "degraded" and any(x.startswith("slow:") for x in nodes["n2"]["reasons"]), report
        q = nodes["n3"]["quorum"]
        assert nodes["n3"]["verdict"] == "faulty" and q["status"] == "minority", report
        # named at the step and rank of a flip (the rank says where, labelled simulated; a kill restarts the count
        # and may undo a flip, so the steps are read there, not computed)
        logs = "".join(p.read_text() for p in (out / "nodes" / "n3").glob("*/ranks/*.log"))
        flips = [int(m) for m in re.findall(r"SIMULATED DEFECT on rank 1: .* \(step (\d+)\)", logs)]
        assert q["step"] in flips and q["ranks"] == [1], (q, flips)
        drained = cluster.drained()
        assert list(drained) == ["n3"] and drained["n3"].startswith("burnin: SDC suspect"), drained
        score = run_cli("fleet", "score", str(out), "--sealed", str(sealed))
        assert score.returncode == 0 and "found 2, missed 0, false alarms 0" in score.stdout, score.stdout
    finally:
        cluster.stop()
        for g in groups.values():
            g.close()
    assert _left_running(out) == [] and all(not g.path.exists() for g in groups.values())
    deadline = time.monotonic() + 15  # a daemon SIGKILLed a moment ago may still be on its way out
    while _slurm_daemons() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _slurm_daemons() == []


def _slurm_daemons() -> list[str]:
    found = []
    for p in Path("/proc").iterdir():
        try:
            comm = (p / "comm").read_text().strip()
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if comm in ("slurmd", "slurmctld", "munged", "slurmstepd") and state not in ("Z", "X"):
            found.append(f"{p.name} {comm}")
    return found


def test_the_simulated_defect_arms_only_on_the_rank_its_environment_names() -> None:
    import torch

    from burnin.rank.workload import GPT, gpt_config

    model = GPT(gpt_config("tiny", 16, 0.0))
    assert defect.install(model, rank=0, env={}) is None  # not in this environment: nothing armed
    assert defect.install(model, rank=1, env={defect.ENV: "every=1,rank=0"}) is None  # another rank's
    spec = defect.install(model, rank=0, env={defect.ENV: "every=2,bit=10"})
    idx = torch.zeros(1, 4, dtype=torch.long)
    a, b = model(idx)[0], model(idx)[0]
    assert spec == {"every": 2, "bit": 10, "rank": 0} and not torch.equal(a, b)
    assert torch.equal(a.reshape(-1)[1:], b.reshape(-1)[1:])  # one element, one bit
