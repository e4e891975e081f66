"""A PyTorch Lightning Trainer under burnin: examples/lightning, with burnin's callback.

Real runs of the example script (2 ranks, gloo; Lightning's DDP joins the ranks burnin starts): killed,
then broken by an exception, each restart resumed by Lightning from the checkpoint inside burnin's
newest valid one (the second from a checkpoint that a resumed run wrote) and judged bit-exact against
the script's own fault-free run; a checkpoint cadence that falls inside an epoch is refused in one line;
the script still trains alone under plain torchrun, where the callback does nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_module, run_cli, run_dir_of, summary_of

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lightning"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _lightning() -> None:
    require_module("lightning", "lightning")


def test_lightning_example_killed_and_raising_recovers_exactly(tmp_path: Path) -> None:
    proc = run_cli("run", str(EXAMPLE / "scenario.yaml"), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path)
    assert s["finished"] and s["exact"] and s["final_state_hash"] == s["golden_state_hash"]
    assert s["comparison"] == "exact" and s["restarts"] == 2
    outcomes = {f["fault"]: (f["outcome"], f["detected_by"], f["recovery"]["resumed_from_step"]) for f in s["faults"]}
    # Checkpoint 8 was written by the run resumed at 4: a resume from a resumed run's checkpoint.
    assert outcomes == {"process.kill": ("recovered", "exit_signal", 4),
                        "process.exception": ("recovered", "rank_error", 8)}
    # Lightning's checkpoint inside each of burnin's, committed by burnin's manifest.
    manifests = [json.loads(p.read_text()) for p in (run_dir_of(tmp_path) / "checkpoints").glob("*/manifest.json")]
    assert manifests and all(m["writer"] == "loop" and "lightning.ckpt" in m["files"] for m in manifests)


def test_a_checkpoint_inside_an_epoch_is_refused_in_one_line(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE / "train.py", tmp_path / "train.py")
    (tmp_path / "s.yaml").write_text(
        "name: inside-an-epoch\n"
        "workload: {entry: train.py, args: ['--steps', '8', '--epoch-steps', '4'], ranks: 2, steps: 8, threads: 1}\n"
        "checkpoint: {every: 3}\n")
    proc = run_cli("run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"))
    # bad input that only the rank can see (the loop's epochs): one line, exit status 2
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("burnin: error:")]
    assert len(said) == 1 and "checkpoint.every: 3" in said[0], proc.stderr
    assert "puts a checkpoint at step 3, inside an epoch of 4 steps" in said[0]
    assert "make checkpoint.every a multiple of the steps of an epoch" in said[0]


def test_the_script_still_trains_alone_under_torchrun(tmp_path: Path) -> None:
    """Without burnin the callback does nothing and resume_path() is None: Lightning trains, writes nothing."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(EXAMPLE / "train.py"), "--steps", "12"], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step 10 loss" in proc.stdout
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []
