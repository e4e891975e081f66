"""A user's own training loop under burnin: examples/ddp_plain, attached with burnin.rank.attach.

Real runs of the example script (2 ranks, gloo): killed, hung and bit-flipped, judged bit-exact
against the script's own fault-free run; its non-deterministic variant judged in tolerance mode and
called `not exact`; `burnin check-determinism` names where two runs part; the script still runs alone
under plain torchrun, where the session is inactive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, run_dir_of, summary_of

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ddp_plain"

pytestmark = pytest.mark.slow


def test_plain_example_killed_hung_and_bit_flipped_recovers_exactly(tmp_path: Path) -> None:
    proc = run_cli("run", str(EXAMPLE / "scenario.yaml"), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path)
    assert s["finished"] and s["exact"] and s["final_state_hash"] == s["golden_state_hash"]
    assert s["comparison"] == "exact" and s["tolerance"] is None
    outcomes = {f["fault"]: (f["outcome"], f["detected_by"]) for f in s["faults"]}
    assert outcomes == {"process.kill": ("recovered", "exit_signal"), "process.hang": ("recovered", "heartbeat"),
                        "corruption.bitflip": ("recovered", "fingerprint")}
    assert s["restarts"] == 2 and s["rollbacks"] >= 1
    # Its checkpoints were written by the script's own writer and committed by burnin's manifest.
    manifests = [json.loads(p.read_text()) for p in (run_dir_of(tmp_path) / "checkpoints").glob("*/manifest.json")]
    assert manifests and all(m["writer"] == "loop" and "train.pt" in m["files"] for m in manifests)
    assert "not exact" not in proc.stdout


def test_nondeterministic_loop_is_judged_within_tolerance_and_never_called_exact(tmp_path: Path) -> None:
    proc = run_cli("run", str(EXAMPLE / "scenario-nondeterministic.yaml"), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path)
    assert s["finished"] and not s["exact"], "OS noise in every batch: the bits cannot agree"
    assert s["comparison"] == "tolerance"
    t = s["tolerance"]
    assert t["within"] and 0 < t["loss_max_rdiff"] <= t["loss_rtol"] and 0 < t["state_max_rdiff"] <= t["state_rtol"]
    assert [f["outcome"] for f in s["faults"]] == ["recovered"]
    assert "not exact" in proc.stdout
    assert "not exact" in (run_dir_of(tmp_path) / "summary.md").read_text()
    assert "not exact" in (run_dir_of(tmp_path) / "junit.xml").read_text()


def test_check_determinism_names_where_two_runs_part(tmp_path: Path) -> None:
    proc = run_cli("check-determinism", str(EXAMPLE / "scenario-nondeterministic.yaml"), "--steps", "4",
                   "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not deterministic: the runs part at step 0" in proc.stdout
    assert "model.0.weight" in proc.stdout  # the first layer sees the noisy batch first
    proc = run_cli("check-determinism", str(EXAMPLE / "scenario.yaml"), "--steps", "4", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deterministic: two fault-free runs agree bit for bit at every step (4 steps)" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # both runs' directories are removed


def test_the_script_still_runs_alone_under_torchrun(tmp_path: Path) -> None:
    """Without burnin's entry the session is inactive: steps(n) is range(n), nothing is written."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(EXAMPLE / "train.py"), "--steps", "12"], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step 10 loss" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_loop_that_never_reports_its_loss_fails_with_a_clear_error(tmp_path: Path) -> None:
    script = tmp_path / "loop.py"
    script.write_text(
        "import torch, torch.distributed as dist, burnin.rank\n"
        "from torch.nn.parallel import DistributedDataParallel as DDP\n"
        "dist.init_process_group('gloo')\n"
        "model = DDP(torch.nn.Linear(4, 1))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "session = burnin.rank.attach(model, opt)\n"
        "for step in session.steps(3):\n"
        "    loss = model(torch.ones(2, 4)).sum()\n"
        "    opt.zero_grad(); loss.backward(); opt.step()\n")
    (tmp_path / "s.yaml").write_text("name: forgot\nworkload: {entry: loop.py, ranks: 2, steps: 3}\n")
    proc = run_cli("run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"))
    # a misuse of the rank API, found by the golden run's rank: bad input, one line, exit 2
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("burnin: error:")]
    assert len(errors) == 1 and "step 0 ended without session.step_done(loss)" in errors[0], proc.stderr


@pytest.mark.parametrize("body, message", [
    ("workload: {entry: missing.py}", "workload.entry: no script missing.py"),
    ("workload: {entry: 'no_such_module_xyz:main'}", "no module no_such_module_xyz on the Python path"),
    ("workload: {entry: 'train.py; rm -rf /'}", "workload.entry"),
    ("workload: {args: ['--x']}", "workload.args: arguments are for a loop named by workload.entry"),
    ("workload: {entry: train.py, kernels: triton}\nfaults:\n  - {fault: memory.oob_write, rank: 0, step: 1}",
     "acts on burnin's own Triton loss kernel"),
])
def test_a_bad_entry_is_a_one_line_error(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "train.py").write_text("")
    path = tmp_path / "s.yaml"
    path.write_text(f"name: bad\n{body}\n")
    for cmd in ("validate", "run"):
        proc = run_cli(cmd, str(path), "--out", str(tmp_path / "out")) if cmd == "run" else run_cli(cmd, str(path))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_fault_the_loops_model_cannot_take_is_a_one_line_error_without_restarts(tmp_path: Path) -> None:
    """A fault inside a sharded model's collectives, on a loop whose model is DDP: only a rank can see that
    (burnin does not know a loop's model before it attaches). The rank says so, the supervisor does not
    restart what would fail the same way again, and the command ends with one line and exit status 2;
    the run directory keeps what happened."""
    path = tmp_path / "s.yaml"
    path.write_text(f"name: no-collectives\nworkload: {{entry: {EXAMPLE / 'train.py'}, args: ['--steps', '6'], "
                    "ranks: 2, steps: 6}\n"
                    "faults:\n  - {fault: process.kill, rank: 1, step: 3, point: reduce_scatter}\n")
    assert run_cli("validate", str(path)).returncode == 0  # the loop's model is unknown at load time
    out = tmp_path / "out"
    proc = run_cli("run", str(path), "--out", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = ("faults[0] process.kill at point reduce_scatter: this loop's model has no FSDP2 collectives to act in")
    errors = [x for x in proc.stderr.splitlines() if x.startswith("burnin: error:")]  # (progress goes there too)
    assert len(errors) == 1 and line in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    events = [json.loads(x) for x in (run_dir_of(out) / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["event"] == "restart"]
    (abandoned,) = [e for e in events if e["event"] == "recovery_abandoned"]
    assert line in abandoned["reason"]
