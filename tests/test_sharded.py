"""Sharded training: burnin's GPT under FSDP2 and HSDP on a device mesh of real gloo ranks, DCP
checkpoints under burnin's manifest, memory snapshots of each rank's own shards, faults on shards.

The end-to-end tests run the real CLI and judge the run as every run is judged: the final state of
every rank's shards against the fault-free run's, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import processes_of_run, run_cli, run_dir_of, summary_of

from burnin.core.events import read_events
from burnin.errors import ScenarioError
from burnin.scenarios import parse_scenario

BAD = [
    ("a mesh whose product is not the world size", "workload: {ranks: 4, parallel: {dp_shard: 3}}\n",
     "workload.parallel.dp_shard: dp_replicate=1 x dp_shard=3 x tp=1 = 3 ranks, but workload.ranks=4"),
    ("replicas that do not divide the ranks", "workload: {ranks: 4, parallel: {dp_replicate: 3}}\n",
     "workload.parallel.dp_replicate: dp_replicate=3 x tp=1 does not divide workload.ranks=4"),
    ("no shards", "workload: {ranks: 4, parallel: {dp_shard: 0}}\n", "workload.parallel.dp_shard: dp_shard is"),
    ("tensor parallel", "workload: {ranks: 4, parallel: {tp: 2}}\n",
     "workload.parallel.tp: tensor parallelism is not built yet"),
    ("a fingerprint with no replica", "workload: {ranks: 2, parallel: {dp_shard: 2}}\ndetectors: {fingerprint: {}}\n",
     "detectors.fingerprint: the fingerprint compares replicas of a shard"),
    ("a DDP bucket fault on shards",
     "workload: {ranks: 2, parallel: {dp_shard: 2}}\nfaults:\n"
     "  - {fault: corruption.bitflip, rank: 1, step: 2, params: {target: grad}}\n",
     "faults.0.params.target: target grad at after_backward acts on a DDP gradient bucket"),
    ("an index past the target rank's shard",
     "workload: {ranks: 4, parallel: {dp_shard: 4}}\nfaults:\n"
     "  - {fault: corruption.bitflip, rank: 3, step: 2, params: {target: param, tensor: wpe.weight, index: 5000}}\n",
     "index 5000 is past the end of rank 3's shard (of 4) of wpe.weight (1024 elements"),
    ("an unknown sharded tensor",
     "workload: {ranks: 2, parallel: {dp_shard: 2}}\nfaults:\n"
     "  - {fault: corruption.bitflip, rank: 1, step: 2, params: {target: param, tensor: blocks.9.attn.c_attn.weight}}\n",
     "the tiny model has no parameter 'blocks.9.attn.c_attn.weight'"),
    ("a loop that shards itself", "workload: {ranks: 2, entry: train.py, parallel: {dp_shard: 2}}\n",
     "workload.parallel: a loop named by workload.entry shards its own model"),
    ("asynchronous saves of a model that is not sharded", "checkpoint: {async_save: true}\n",
     "checkpoint.async_save: asynchronous saves are DCP's, for sharded models"),
]


@pytest.mark.parametrize("what,body,message", BAD, ids=[b[0] for b in BAD])
def test_bad_meshes_and_sharded_faults_are_one_line_errors(what: str, body: str, message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario("name: x\n" + body, "x.yaml")
    text = str(err.value)
    assert message in text and "\n" not in text, text


def test_validate_refuses_a_bad_mesh_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("name: x\nworkload: {ranks: 4, parallel: {dp_replicate: 2, dp_shard: 3}}\n")
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "mesh.yaml:2: workload.parallel.dp_shard" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_fsdp_ranks_killed_and_raising_resume_from_their_own_shards_in_memory(tmp_path: Path) -> None:
    """Pure FSDP2 (no replica): each rank's snapshot holds its own shards, and a restarted group puts
    every shard back where it was: nothing lost, exact."""
    scenario = tmp_path / "fsdp.yaml"
    scenario.write_text("name: fsdp\nworkload: {ranks: 2, steps: 10, parallel: {dp_shard: 2}}\n"
                        "faults:\n  - {fault: process.kill, rank: 1, step: 3, expect: recovered}\n"
                        "  - {fault: process.exception, rank: 0, step: 6, point: before_forward, expect: recovered}\n")
    out = tmp_path / "runs"
    proc = run_cli("run", str(scenario), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(out)
    assert s["exact"] and [(f["outcome"], f["lost_steps"]) for f in s["faults"]] == [("recovered", 0)] * 2, s["faults"]
    events = read_events(run_dir_of(out) / "events.jsonl")
    resumed = [e for e in events if e["event"] == "resumed" and e.get("attempt", 0) > 0]
    assert len(resumed) == 4 and all(e["tier"] == "memory" for e in resumed), resumed


@pytest.mark.slow
def test_the_bundled_hsdp_scenario_recovers_every_fault_exactly(tmp_path: Path) -> None:
    proc = run_cli("run", "hsdp", "--out", str(tmp_path), timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path)
    assert s["exact"] and [f["outcome"] for f in s["faults"]] == ["recovered"] * 6, s["faults"]
    run_dir = run_dir_of(tmp_path)
    events = read_events(run_dir / "events.jsonl")
    # DCP on disk, under burnin's manifest: every shard file and .metadata
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["writer"] == "dcp" and ".metadata" in manifest["files"]
    assert sorted(n for n in manifest["files"] if n.endswith(".distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    # the damaged shard was refused by its digest, and the checkpoint before it loaded
    rejected = [e for e in events if e["event"] == "checkpoint_rejected"]
    assert rejected and ".distcp fails its SHA-256 check" in rejected[0]["reason"], rejected
    assert [e["from_step"] for e in events if e["event"] == "resumed" and e.get("tier") == "disk"]
    # the gradient-shard flip: the replicas of the shard part, the fingerprint names them, a rollback
    injected = [e for e in events if e["event"] == "fault_injected" and e["fault"] == "corruption.bitflip"]
    assert injected and injected[0]["details"]["tensor"].endswith(".grad(shard)"), injected
    found = [e for e in events if e["event"] == "detection" and e["detector"] == "fingerprint"]
    assert found and 3 in found[0]["odd_ranks"] and set(found[0]["odd_ranks"]) <= {1, 3}, found
    assert processes_of_run(s["run_id"]) == []


FSDP2_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fsdp2"


@pytest.mark.slow
def test_a_users_hsdp_loop_attached_in_four_lines_is_killed_raised_in_and_flipped_and_ends_exact(
        tmp_path: Path) -> None:
    """examples/fsdp2: a torchtitan-style script (device mesh, fully_shard per block, AdamW on DTensors)
    attached with burnin.rank.attach(model, optimizer) as a DDP script is, run as HSDP (2 x 2)."""
    proc = run_cli("run", str(FSDP2_EXAMPLE / "scenario-hsdp.yaml"), "--out", str(tmp_path), timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path)
    assert s["exact"] and s["comparison"] == "exact"
    outcomes = {f["fault"]: (f["outcome"], f["detected_by"]) for f in s["faults"]}
    assert outcomes == {"process.kill": ("recovered", "exit_signal"), "process.exception": ("recovered", "rank_error"),
                        "corruption.bitflip": ("recovered", "fingerprint")}, outcomes
    # burnin checkpoints the loop's shards with DCP (the loop brought no writer of its own)
    manifests = [json.loads(p.read_text()) for p in (run_dir_of(tmp_path) / "checkpoints").glob("*/manifest.json")]
    assert manifests and all(m["writer"] == "dcp" and ".metadata" in m["files"] for m in manifests)


def test_a_dcp_manifest_must_cover_metadata_and_every_shard(tmp_path: Path) -> None:
    """The manifest of a DCP checkpoint lists `.metadata` beside the shards and rank files; a checkpoint
    whose manifest leaves `.metadata` out, or whose shard is gone, is refused."""
    from burnin.core.checkpoints import Checkpoint, verify
    from burnin.core.files import sha256_file

    ckpt = tmp_path / "step_00000004"
    ckpt.mkdir()
    for name, data in ((".metadata", b"index"), ("__0_0.distcp", b"shard0"), ("__1_0.distcp", b"shard1"),
                       ("rank0.pt", b"rng0"), ("rank1.pt", b"rng1")):
        (ckpt / name).write_bytes(data)

    def manifest(names: list[str]) -> None:
        files = {n: dict(zip(("sha256", "bytes"), sha256_file(ckpt / n))) for n in names}
        (ckpt / "manifest.json").write_text(json.dumps({"step": 4, "world_size": 2, "writer": "dcp", "files": files}))

    every = [".metadata", "__0_0.distcp", "__1_0.distcp", "rank0.pt", "rank1.pt"]
    manifest(every)
    assert verify(Checkpoint(4, ckpt), 2)["writer"] == "dcp"
    manifest(every[1:])
    with pytest.raises(Exception, match=r"does not list \.metadata"):
        verify(Checkpoint(4, ckpt), 2)
    manifest(every)
    (ckpt / "__1_0.distcp").unlink()
    with pytest.raises(Exception, match="__1_0.distcp is missing"):
        verify(Checkpoint(4, ckpt), 2)


@pytest.mark.slow
def test_a_users_fsdp_loop_with_no_replica_has_a_flip_between_steps_caught_by_its_checksum(tmp_path: Path) -> None:
    """examples/fsdp2 as plain FSDP over 2 ranks: killed, raised in, and a parameter shard flipped between
    two steps; no replica holds that shard, so the rank's own checksum (sealed at the end of a step,
    checked before the next) finds it one step later, and the ranks roll back: exact."""
    proc = run_cli("run", str(FSDP2_EXAMPLE / "scenario.yaml"), "--out", str(tmp_path), timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path)
    assert s["exact"]
    outcomes = [(f["fault"], f["outcome"], f["detected_by"]) for f in s["faults"]]
    assert outcomes == [("process.kill", "recovered", "exit_signal"), ("process.exception", "recovered", "rank_error"),
                        ("corruption.bitflip", "recovered", "checksum")], outcomes
    events = read_events(run_dir_of(tmp_path) / "events.jsonl")
    (found,) = [e for e in events if e["event"] == "detection"]
    flip = s["faults"][2]
    assert found["detector"] == "checksum" and found["odd_ranks"] == [1] and found["step"] == flip["step"] + 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp-async", "fsdp-sync", "ddp"])
def test_a_save_killed_midway_never_commits_and_the_one_before_is_loaded(tmp_path: Path, kind: str) -> None:
    """Kills inside a checkpoint save: partway through writing a file (a DCP shard of an FSDP2 job; with
    asynchronous saves, from the thread that writes while training goes on; DDP: a rank's own file) and
    after every file is written but before the commit. Neither checkpoint commits; each restart says it
    refused it and loads the one before; `keep: 1` never leaves no committed checkpoint; the run ends exact."""
    async_save = kind == "fsdp-async"
    parallel = ", parallel: {dp_shard: 2}" if kind != "ddp" else ""
    scenario = tmp_path / "crash.yaml"
    scenario.write_text(
        f"name: save-crash\nworkload: {{ranks: 2, steps: 16{parallel}}}\n"
        f"checkpoint: {{every: 4, keep: 1, memory_every: 0, async_save: {str(async_save).lower()}}}\n"
        "faults:\n  - {fault: storage.save_crash, rank: 1, step: 6, params: {phase: write}, expect: recovered}\n"
        "  - {fault: storage.save_crash, rank: 0, step: 10, params: {phase: commit}, expect: recovered}\n")
    out = tmp_path / "runs"
    proc = run_cli("run", str(scenario), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(out)
    assert s["exact"] and [f["outcome"] for f in s["faults"]] == ["recovered"] * 2, s["faults"]
    run_dir = run_dir_of(out)
    events = read_events(run_dir / "events.jsonl")
    saved = [e for e in events if e["event"] == "checkpoint_saved"]
    assert all(bool(e.get("asynchronous")) == async_save for e in saved), saved
    refused = [(e["attempt"], e["checkpoint_step"]) for e in events if e["event"] == "checkpoint_rejected"]
    assert (1, 8) in refused and (2, 12) in refused and all("not committed" in e["reason"] for e in events
                                                            if e["event"] == "checkpoint_rejected"), refused
    starts = {e["attempt"]: e["from_step"] for e in events if e["event"] == "resumed" and e["rank"] == 0}
    assert starts[1] == 4 and starts[2] == 8, starts
    # what the crashes left: the checkpoint committed last, its DCP shards and .metadata under the manifest
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000016"], ckpts
    manifest = json.loads((run_dir / "checkpoints" / ckpts[0] / "manifest.json").read_text())
    if kind == "ddp":
        assert manifest["writer"] == "burnin" and "model.pt" in manifest["files"]
    else:
        assert manifest["writer"] == "dcp" and ".metadata" in manifest["files"]
        assert sum(name.endswith(".distcp") for name in manifest["files"]) == 2
    assert processes_of_run(run_dir.name) == []
