"""`burnin run --resume-from`: a run that starts from another run's checkpoint, also one written on another
world size or mesh (DCP reshards it), judged against the fault-free run of the workload that wrote it.

Bad input is refused in one line with exit status 2 before anything starts (the checkpoints it reads are
built here from their files and manifest: what is checked is the refusal, before any of them would load).
The end-to-end test runs real gloo ranks: FSDP2 on 2 ranks writes DCP checkpoints, 4 ranks resume from
one and go on, killed once, and must stay within tolerance of the 2-rank trajectory; the same resume with
the optimizer state left out must not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import main_in, processes_of_run, run_cli, run_dir_of, summary_of

from burnin.core.events import read_events
from burnin.scenarios import parse_scenario

SOURCE = "name: src\nworkload: {ranks: 2, steps: 8, batch_size: 8, dropout: 0.0, parallel: {dp_shard: 2}}\n"


def _checkpoint(tmp_path: Path, source: str = SOURCE, step: int = 4, writer: str = "dcp", ranks: int = 2) -> Path:
    """A run directory as `burnin run` leaves it: scenario.json and one committed checkpoint (its files and a
    manifest of their digests)."""
    run_dir = tmp_path / "source-run"
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (run_dir / "scenario.json").write_text(parse_scenario(source, "src.yaml").model_dump_json())
    names = ([".metadata", *[f"__{r}_0.distcp" for r in range(ranks)]] if writer == "dcp" else ["model.pt"])
    names += [f"rank{r}.pt" for r in range(ranks)]
    files = {}
    for name in names:
        data = f"{name} bytes".encode()
        (ckpt / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps({"step": step, "world_size": ranks, "files": files,
                                                    "writer": writer}))
    return run_dir


BAD = [
    ("a path that is not there", None, "name: x\n", "does not exist; give a run directory, or one of its checkpoints"),
    ("another model", SOURCE, "name: x\nworkload: {model: small, ranks: 4, steps: 8, parallel: {dp_shard: 4}}\n",
     "the checkpoint was written with workload.model='tiny' and this scenario has 'small'"),
    ("another tensor-parallel degree", SOURCE,
     "name: x\nworkload: {ranks: 4, steps: 8, batch_size: 8, parallel: {dp_shard: 2, tp: 2}}\n",
     "tensor parallel tp=1 and this scenario has tp=2; the q/k/v rows are laid out per tensor-parallel rank"),
    ("another global batch", SOURCE, "name: x\nworkload: {ranks: 4, steps: 8, batch_size: 2, parallel: {dp_shard: 4}}\n",
     "trained on 16 sequences a step (2 ranks / tp 1 x batch_size 8) and this scenario on 8 (4 / 1 x 2); keep the "
     "global batch: set batch_size to 4"),
    ("a sharded checkpoint into DDP", SOURCE, "name: x\nworkload: {ranks: 2, steps: 8, batch_size: 8}\n",
     "the checkpoint is a sharded model's (DCP) and this scenario's model is replicated (DDP)"),
    ("nothing left to run", SOURCE,
     "name: x\nworkload: {ranks: 4, steps: 4, batch_size: 4, parallel: {dp_shard: 4}}\n",
     "the checkpoint is of step 4 and workload.steps=4: nothing is left to run"),
    ("a fault before the checkpoint", SOURCE,
     "name: x\nworkload: {ranks: 4, steps: 8, batch_size: 4, parallel: {dp_shard: 4}}\n"
     "faults:\n  - {fault: process.kill, rank: 1, step: 2}\n",
     "faults[0] process.kill is at step 2, before the checkpoint's step 4 the run starts from"),
]


@pytest.mark.parametrize("what,source,target,message", BAD, ids=[b[0] for b in BAD])
def test_a_checkpoint_that_cannot_be_resumed_is_refused_in_one_line(tmp_path: Path, what: str, source: str | None,
                                                                     target: str, message: str) -> None:
    """In process, through the checks `burnin run` makes before it starts anything (the subprocess test
    below runs the real command line)."""
    run_dir = _checkpoint(tmp_path, source) if source is not None else tmp_path / "nowhere"
    scenario = tmp_path / "target.yaml"
    scenario.write_text(target)
    out = tmp_path / "runs"
    rc, err = main_in(tmp_path, ["run", str(scenario), "--resume-from", str(run_dir), "--out", str(out)])
    assert rc == 2 and err.startswith("burnin: error: --resume-from: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not out.exists()  # nothing started, nothing left behind


def test_a_damaged_checkpoint_is_refused_and_a_run_directory_with_none_says_so(tmp_path: Path) -> None:
    run_dir = _checkpoint(tmp_path)
    (run_dir / "checkpoints" / "step_00000004" / "__1_0.distcp").write_bytes(b"rotten")
    scenario = tmp_path / "target.yaml"
    scenario.write_text("name: x\nworkload: {ranks: 4, steps: 8, batch_size: 4, parallel: {dp_shard: 4}}\n")
    out = tmp_path / "runs"
    one = run_cli("run", str(scenario), "--resume-from", str(run_dir / "checkpoints" / "step_00000004"),
                  "--out", str(out))
    assert one.returncode == 2 and one.stdout == "" and one.stderr.count("\n") == 1, one.stdout + one.stderr
    assert "does not verify (__1_0.distcp is 6 bytes" in one.stderr and not out.exists(), one.stderr
    rc, err = main_in(tmp_path, ["run", str(scenario), "--resume-from", str(run_dir)])
    assert rc == 2 and "checkpoints holds no checkpoint that verifies (1 found)" in err, err


@pytest.mark.slow
def test_a_resume_onto_twice_the_ranks_follows_the_trajectory_it_left_and_a_lost_optimizer_state_does_not(
        tmp_path: Path) -> None:
    src = tmp_path / "src.yaml"
    src.write_text(SOURCE.replace("steps: 8", "steps: 6") + "checkpoint: {every: 3}\n")
    proc = run_cli("run", str(src), "--out", str(tmp_path / "src"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    source_run = run_dir_of(tmp_path / "src")

    # 4 ranks, each half the batch: the same sequences a step, resharded by DCP; killed once
    dst = tmp_path / "dst.yaml"
    body = ("name: dst\nworkload: {ranks: 4, steps: 10, batch_size: 4, dropout: 0.0, parallel: {dp_shard: 4}}\n"
            "checkpoint: {every: 3}\n")
    dst.write_text(body + "faults:\n  - {fault: process.kill, rank: 3, step: 7, expect: recovered}\n")
    proc = run_cli("run", str(dst), "--out", str(tmp_path / "dst"), "--resume-from", str(source_run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path / "dst")
    t = s["tolerance"]
    assert not s["exact"] and s["comparison"] == "tolerance" and t["within"], t
    assert "resumed at step 6 from a checkpoint of another workload (ranks 2 -> 4" in t["because"], t
    assert [f["outcome"] for f in s["faults"]] == ["recovered"]
    events = read_events(run_dir_of(tmp_path / "dst") / "events.jsonl")
    (started,) = [e for e in events if e["event"] == "resume_from"]
    assert (started["checkpoint_step"], started["written_by_ranks"], started["writer"]) == (6, 2, "dcp")
    first = [e for e in events if e["event"] == "resumed" and e.get("attempt") == 0]
    assert first and all((e["tier"], e["from_step"]) == ("disk", 6) for e in first), first
    assert "tolerance mode, resumed at step 6" in proc.stdout
    assert processes_of_run(s["run_id"]) == []

    # the same resume, the optimizer's moments left behind: the verdict must say no
    dst.write_text(body + "debug: {skip_restore: [optimizer]}\n")
    proc = run_cli("run", str(dst), "--out", str(tmp_path / "broken"), "--resume-from", str(source_run))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    t = summary_of(tmp_path / "broken")["tolerance"]
    assert not t["within"] and t["state_max_rdiff"] > t["state_rtol"], t

    # the source's own workload resumed from its own checkpoint: nothing changed, so exact as ever
    src.write_text(SOURCE.replace("steps: 8", "steps: 10") + "checkpoint: {every: 3}\n")
    proc = run_cli("run", str(src), "--out", str(tmp_path / "again"), "--resume-from", str(source_run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path / "again")
    assert s["exact"] and s["comparison"] == "exact", s
