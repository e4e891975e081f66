"""Tests of checkpoints (save, verify, fall back, prune, load) and of the training state they hold."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from burnin.errors import CheckpointError
from burnin.rank import checkpoint
from burnin.rank.checkpoint import MANIFEST, MODEL_FILE, Checkpoint, rank_file
from burnin.rank.state import capture_rank_state, loss_bits, restore_rank_state, state_hash

# -- fixtures and helpers -------------------------------------------------------------------------




def _model_and_optimizer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # the optimizer now has state (exp_avg, exp_avg_sq, step)
    return model, opt


def _save(root: Path, step: int, keep: int = 10, seed: int = 0) -> Checkpoint:
    model, opt = _model_and_optimizer(seed)
    ckpt = checkpoint.save(root, step, 0, 1, capture_rank_state(step),
                           {"model": model.state_dict(), "optimizer": opt.state_dict()}, keep=keep)
    assert ckpt is not None
    return ckpt


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- save and the manifest ------------------------------------------------------------------------


def test_save_writes_a_manifest_of_sha256_sums(gloo, tmp_path: Path) -> None:
    ckpt = _save(tmp_path, 5)
    assert ckpt == Checkpoint(5, tmp_path / "step_00000005")
    manifest = json.loads((ckpt.path / MANIFEST).read_text())
    assert manifest["step"] == 5
    assert manifest["world_size"] == 1
    assert list(manifest["files"]) == [MODEL_FILE, rank_file(0)]
    for name, meta in manifest["files"].items():
        data = (ckpt.path / name).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert checkpoint.verify(ckpt, world_size=1) == manifest


def test_save_by_two_ranks_lists_every_rank_file(tmp_path: Path) -> None:
    # Two real rank processes save the same step; rank 0 commits a manifest that covers both.
    script = textwrap.dedent("""
        import os, sys
        from datetime import timedelta
        import torch, torch.distributed as dist
        from burnin.rank import checkpoint
        rank, root, store_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2,
                                timeout=timedelta(seconds=30))
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        got = checkpoint.save(root, 4, rank, 2, {"rank": rank, "marker": torch.full((2,), float(rank))},
                              {"model": model.state_dict()} if rank == 0 else None, keep=2)
        print("committed" if got is not None else "none")
        dist.destroy_process_group()
    """)
    root, store = tmp_path / "ckpts", tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(root), str(store)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert [o.strip() for o, _ in outs] == ["committed", "none"]
    [ckpt] = checkpoint.committed(root)
    manifest = checkpoint.verify(ckpt, world_size=2)
    assert sorted(manifest["files"]) == [MODEL_FILE, "rank0.pt", "rank1.pt"]
    _, rank1 = checkpoint.load(ckpt, rank=1)
    assert rank1["rank"] == 1 and torch.equal(rank1["marker"], torch.ones(2))
    with pytest.raises(CheckpointError, match="written by 2 ranks, this run has 1"):
        checkpoint.verify(ckpt, world_size=1)


def test_committed_ignores_checkpoints_without_a_manifest(gloo, tmp_path: Path) -> None:
    _save(tmp_path, 5)
    half = tmp_path / "step_00000010"  # a save that crashed before its manifest
    half.mkdir()
    (half / MODEL_FILE).write_bytes(b"partial")
    (tmp_path / "step_notanumber").mkdir()
    (tmp_path / "step_00000020").write_text("a file, not a checkpoint directory")
    assert [c.step for c in checkpoint.committed(tmp_path)] == [5]
    assert checkpoint.newest_valid(tmp_path, 1) == Checkpoint(5, tmp_path / "step_00000005")
    assert checkpoint.committed(tmp_path / "does-not-exist") == []


# -- verify: each way a checkpoint can be bad is named --------------------------------------------


def test_verify_rejects_a_flipped_byte(gloo, tmp_path: Path) -> None:
    ckpt = _save(tmp_path, 5)
    _flip_byte(ckpt.path / MODEL_FILE)
    with pytest.raises(CheckpointError, match=r"model\.pt fails its SHA-256 check \(corrupted\)"):
        checkpoint.verify(ckpt, 1)


def test_verify_rejects_a_truncated_file(gloo, tmp_path: Path) -> None:
    ckpt = _save(tmp_path, 5)
    target = ckpt.path / rank_file(0)
    size = target.stat().st_size
    os.truncate(target, size // 2)
    with pytest.raises(CheckpointError, match=rf"rank0\.pt is {size // 2} bytes, the manifest says {size} \(truncated\)"):
        checkpoint.verify(ckpt, 1)


def test_verify_rejects_a_missing_file(gloo, tmp_path: Path) -> None:
    ckpt = _save(tmp_path, 5)
    (ckpt.path / rank_file(0)).unlink()
    with pytest.raises(CheckpointError, match=r"rank0\.pt is missing"):
        checkpoint.verify(ckpt, 1)


def test_verify_rejects_the_wrong_world_size(gloo, tmp_path: Path) -> None:
    ckpt = _save(tmp_path, 5)
    with pytest.raises(CheckpointError, match="written by 1 ranks, this run has 2"):
        checkpoint.verify(ckpt, 2)
    assert checkpoint.verify(ckpt) is not None  # no world size asked for: not checked


@pytest.mark.parametrize("manifest, why", [
    (b"{not json", "unreadable manifest"),
    (b"\xff\xfe\x00garbage", "unreadable manifest"),
    (b"[1, 2, 3]", "unreadable manifest"),
    (b'{"step": 5, "world_size": 1}', "unreadable manifest"),
    (b'{"step": 5, "world_size": 1, "files": ["model.pt"]}', "unreadable manifest"),
    (b'{"step": 5, "world_size": 1, "files": {"model.pt": "abc"}}', "unreadable manifest"),
    (b'{"step": 5, "world_size": 1, "files": {}}', "does not list"),
    (b'{"step": 6, "world_size": 1, "files": {}}', "manifest says step 6"),
])
def test_verify_rejects_a_garbage_manifest(gloo, tmp_path: Path, manifest: bytes, why: str) -> None:
    ckpt = _save(tmp_path, 5)
    (ckpt.path / MANIFEST).write_bytes(manifest)
    with pytest.raises(CheckpointError, match=why):
        checkpoint.verify(ckpt, 1)
    # and the loader falls back past it instead of crashing
    rejected: list[str] = []
    assert checkpoint.newest_valid(tmp_path, 1, on_reject=lambda c, r: rejected.append(r)) is None
    assert len(rejected) == 1 and why in rejected[0]


# -- falling back, pruning ------------------------------------------------------------------------


def test_newest_valid_falls_back_and_reports_each_rejection(gloo, tmp_path: Path) -> None:
    for step in (5, 10, 15):
        _save(tmp_path, step)
    rejected: list[tuple[int, str]] = []

    def on_reject(c: Checkpoint, why: str) -> None:
        rejected.append((c.step, why))

    assert checkpoint.newest_valid(tmp_path, 1, on_reject).step == 15
    assert rejected == []

    _flip_byte(tmp_path / "step_00000015" / MODEL_FILE)
    assert checkpoint.newest_valid(tmp_path, 1, on_reject).step == 10
    assert [s for s, _ in rejected] == [15] and "corrupted" in rejected[0][1]

    rejected.clear()
    target = tmp_path / "step_00000010" / rank_file(0)
    os.truncate(target, 10)
    assert checkpoint.newest_valid(tmp_path, 1, on_reject).step == 5
    assert [s for s, _ in rejected] == [15, 10]
    assert "corrupted" in rejected[0][1] and "truncated" in rejected[1][1]

    rejected.clear()
    (tmp_path / "step_00000005" / MODEL_FILE).unlink()
    assert checkpoint.newest_valid(tmp_path, 1, on_reject) is None
    assert [s for s, _ in rejected] == [15, 10, 5] and "missing" in rejected[2][1]
    assert checkpoint.newest_valid(tmp_path, 1) is None  # no callback: still just None


def test_prune_keeps_the_newest(gloo, tmp_path: Path) -> None:
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [c.step for c in checkpoint.committed(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]


def test_prune_removes_older_incomplete_checkpoints_but_not_newer_ones(gloo, tmp_path: Path) -> None:
    _save(tmp_path, 2, keep=3)
    for step in (3, 9):  # left by a crash mid-save (3), or a save still in progress (9)
        (tmp_path / f"step_{step:08d}").mkdir()
    _save(tmp_path, 4, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004", "step_00000009"]


# -- atomic writes ---------------------------------------------------------------------------------


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    checkpoint.atomic_write(target, b"first")
    checkpoint.atomic_write(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_atomic_write_that_fails_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_text("x")  # a non-empty directory cannot be renamed over
    with pytest.raises(OSError):
        checkpoint.atomic_write(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# -- load ------------------------------------------------------------------------------------------


def test_load_returns_what_was_saved(gloo, tmp_path: Path) -> None:
    model, opt = _model_and_optimizer(seed=3)
    ckpt = checkpoint.save(tmp_path, 7, 0, 1, capture_rank_state(7),
                           {"model": model.state_dict(), "optimizer": opt.state_dict()}, keep=1)
    model_state, rank_state = checkpoint.load(ckpt, rank=0)
    fresh, fresh_opt = _model_and_optimizer(seed=4)
    assert state_hash(fresh, fresh_opt) != state_hash(model, opt)
    fresh.load_state_dict(model_state["model"])
    fresh_opt.load_state_dict(model_state["optimizer"])
    assert state_hash(fresh, fresh_opt) == state_hash(model, opt)
    assert rank_state["step"] == 7


class _Payload:
    """Unpickling this runs code: it makes a directory. weights_only must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_load_refuses_a_pickled_object(gloo, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    root = tmp_path / "ckpts"
    ckpt = checkpoint.save(root, 3, 0, 1, capture_rank_state(3), {"model": _Payload(marker)}, keep=1)
    checkpoint.verify(ckpt, 1)  # the sums match: only the loader can stop it
    with pytest.raises(CheckpointError, match="step_00000003 does not load"):
        checkpoint.load(ckpt, rank=0)
    assert not marker.exists()
    # The payload is live: a loader without weights_only would have run it.
    torch.load(ckpt.path / MODEL_FILE, weights_only=False)
    assert marker.is_dir()


# -- state: RNG capture and restore ----------------------------------------------------------------


def _draw() -> tuple:
    return (torch.rand(4).tolist(), torch.randn(3).tolist(), np.random.rand(3).tolist(),
            np.random.standard_normal(1).tolist(), random.random(), random.gauss(0, 1))


def _through_checkpoint_bytes(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture
def rng_guard():
    """Leave the process's RNGs as they were found."""
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    yield
    torch.set_rng_state(saved[0])
    np.random.set_state(saved[1])
    random.setstate(saved[2])


def test_rank_state_round_trip_restores_every_rng_exactly(rng_guard) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    # Leave a cached Gaussian in numpy and python, so their less obvious state is exercised too.
    np.random.standard_normal(1)
    random.gauss(0, 1)
    state = _through_checkpoint_bytes(capture_rank_state(11))
    expected = _draw()
    _draw()
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rank_state(state)
    assert _draw() == expected
    assert state["step"] == 11


@pytest.mark.parametrize("left_out, index", [("torch_rng", 0), ("numpy_rng", 2), ("python_rng", 4)])
def test_restore_skip_leaves_one_rng_alone(rng_guard, left_out: str, index: int) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = capture_rank_state(0)
    expected = _draw()
    restore_rank_state(state, skip=[left_out])
    got = _draw()
    for i, (a, b) in enumerate(zip(got, expected)):
        if i in (index, index + 1):  # the two draws of the skipped generator
            assert a != b, left_out
        else:
            assert a == b, i


# -- state: fingerprints ----------------------------------------------------------------------------


def test_state_hash_is_equal_for_identical_models() -> None:
    a, opt_a = _model_and_optimizer(seed=5)
    b, opt_b = _model_and_optimizer(seed=5)
    assert state_hash(a) == state_hash(b)
    assert state_hash(a, opt_a) == state_hash(b, opt_b)
    assert state_hash(a, opt_a) != state_hash(a)  # optimizer state is part of it
    c, _ = _model_and_optimizer(seed=6)
    assert state_hash(c) != state_hash(a)


def _flip_bit(t: torch.Tensor, index: int, bit: int) -> None:
    with torch.no_grad():
        t.view(-1).view(torch.int32)[index] ^= 1 << bit


@pytest.mark.parametrize("bit", [0, 22, 30, 31])
def test_state_hash_changes_when_one_parameter_bit_flips(bit: int) -> None:
    model, opt = _model_and_optimizer(seed=5)
    before = state_hash(model, opt)
    weight = model[2].weight
    _flip_bit(weight, 3, bit)
    assert state_hash(model, opt) != before
    _flip_bit(weight, 3, bit)
    assert state_hash(model, opt) == before


def test_state_hash_changes_when_one_optimizer_bit_flips() -> None:
    model, opt = _model_and_optimizer(seed=5)
    before = state_hash(model, opt)
    exp_avg = opt.state[model[0].weight]["exp_avg"]
    _flip_bit(exp_avg, 0, 0)
    assert state_hash(model, opt) != before
    assert state_hash(model) == state_hash(_model_and_optimizer(seed=5)[0])


@pytest.mark.parametrize("value", [1.0, -1.0, 0.0, -0.0, 2.5e-3, 1e-45, 3.4e38, float("inf"), float("-inf")])
def test_loss_bits_is_the_float32_bit_pattern(value: float) -> None:
    assert loss_bits(torch.tensor(value)) == struct.pack(">f", value).hex()


def test_loss_bits_of_other_dtypes_and_shapes() -> None:
    assert loss_bits(torch.tensor(1.0)) == "3f800000"
    assert loss_bits(torch.tensor([-2.0])) == "c0000000"
    x = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    assert loss_bits(x * 1) == struct.pack(">f", 0.1).hex()  # rounded to float32, graph detached
    nan = torch.tensor(float("nan"))
    assert loss_bits(nan) == nan.view(torch.int32).item().to_bytes(4, "big", signed=True).hex()
    # one ulp apart: different bits, although a tolerance would call them equal
    a = torch.tensor(1.0)
    assert loss_bits(a) != loss_bits(torch.nextafter(a, torch.tensor(2.0)))
