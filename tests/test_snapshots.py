"""Memory snapshots: the double-buffered store in shared memory, and restarts that resume from it.

The store is tested on real files with real tensors (a real SIGKILL in the middle of writes, real
truncation and flipped bytes); the end-to-end tests run the real `burnin` command and read the
run's own events to see which tier a restart resumed from.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, run_dir_of, summary_of

from burnin.errors import HarnessError
from burnin.core import snapshots as snapshot
from burnin.core.snapshots import HEADER_SIZE, SnapshotError, common_step, rank_steps, read_slot, slot_path
from burnin.rank.snapshot import RankSnapshots, _layout
from burnin.rank.state import capture_rank_state, restore_rank_state, state_hash
from burnin.harness.supervisor import OutOfRankContext
from burnin.scenarios.schema import FaultSpec


def _tiny(steps: int = 2, seed: int = 0):
    """The tiny GPT and its AdamW after a few real steps (dropout on, so the RNGs matter)."""
    from burnin.rank.workload import GPT, MarkovData, gpt_config, make_optimizer

    torch.manual_seed(seed)
    cfg = gpt_config("tiny", 32, 0.1, "torch")
    model = GPT(cfg)
    opt = make_optimizer(model, 1e-3, 0.1)
    data = MarkovData(seed, cfg.vocab_size)
    for s in range(steps):
        x, y = data.batch(s, 0, 4, 32, torch.device("cpu"))
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, opt, data


def _small(value: float = 0.0):
    """A small model whose every parameter holds `value`, with an AdamW state after one step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    model(torch.ones(2, 8)).sum().backward()
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model, opt


def _save(store: RankSnapshots, step: int, value: float | None = None) -> None:
    model, opt = _small(float(step if value is None else value))
    store.save(step, model, opt, capture_rank_state(step))


def _draws() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(3).tolist(), random.random()


# -- the store --------------------------------------------------------------------------------------------


def test_round_trip_is_bit_exact(gloo, tmp_path: Path) -> None:
    model, opt, _ = _tiny()
    store = RankSnapshots(tmp_path, 0, 1)
    store.save(2, model, opt, capture_rank_state(2))
    want_hash = state_hash(model, opt)
    want_draws = _draws()
    store.close()

    reopened = RankSnapshots(tmp_path, 0, 1)
    assert set(reopened.steps()) == {2}
    state, rank_state = reopened.load(2)
    fresh, fresh_opt, _ = _tiny(steps=0, seed=1)  # other weights, no optimizer state yet
    assert state_hash(fresh, fresh_opt) != want_hash
    fresh.load_state_dict(state["model"])
    fresh_opt.load_state_dict(state["optimizer"])
    assert state_hash(fresh, fresh_opt) == want_hash
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    restore_rank_state(rank_state)
    assert _draws() == want_draws  # torch, numpy and python RNGs all back where they were
    # the loaded optimizer state is its own memory, not a view of something the store reuses
    exp_avg = next(iter(fresh_opt.state.values()))["exp_avg"]
    assert exp_avg.untyped_storage().nbytes() == exp_avg.numel() * exp_avg.element_size()


def test_slots_alternate_and_the_newest_is_never_overwritten(tmp_path: Path) -> None:
    store = RankSnapshots(tmp_path, 0, 1)
    held = []
    for step in (1, 2, 3, 4):
        _save(store, step)
        held.append(tuple(getattr(read_slot(slot_path(tmp_path, 0, k)), "step", None) for k in range(2)))
    assert held == [(1, None), (1, 2), (3, 2), (3, 4)]
    assert set(rank_steps(tmp_path, 0)) == {3, 4}


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    state, step, used = snapshot.peek(path)
    if how == "truncate":
        os.truncate(path, used // 2)
        return
    if how == "flip_payload":
        raw[HEADER_SIZE + 100] ^= 0xFF
    elif how == "flip_meta":
        raw[used - 10] ^= 0xFF
    elif how == "flip_header":
        raw[16] ^= 0x01  # the step's low byte
    elif how == "torn":  # what a rank killed between the two header writes leaves
        raw[:HEADER_SIZE] = snapshot.encode_header(snapshot.WRITING, step)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, why", [
    ("truncate", r"bytes, the header says \d+ \(truncated\)"),
    ("flip_payload", r"step 2 fails its CRC-32 check \(corrupted\)"),
    ("flip_meta", r"step 2 fails its CRC-32 check \(corrupted\)"),
    ("flip_header", r"the header fails its CRC-32 check"),
    ("torn", r"step 2 was never committed \(torn write"),
])
def test_a_damaged_newest_slot_falls_back_to_the_other(gloo, tmp_path: Path, how: str, why: str) -> None:
    store = RankSnapshots(tmp_path, 0, 1)
    _save(store, 1)
    _save(store, 2)
    store.close()
    newest = slot_path(tmp_path, 0, 1)
    _damage(newest, how)
    with pytest.raises(SnapshotError, match=why):
        read_slot(newest)
    rejected: list[tuple] = []
    reopened = RankSnapshots(tmp_path, 0, 1, on_reject=lambda p, s, w: rejected.append((p.name, s, w)))
    assert set(reopened.steps()) == {1}
    assert [(name, step) for name, step, _ in rejected] == [("rank0.slot1", None if how == "flip_header" else 2)]
    state, _ = reopened.load(1)
    assert all(float(v.flatten()[0]) == 1.0 for v in state["model"].values())
    # the next save goes to the damaged slot, never to the one the resume may still need
    reopened.discard(newer_than=1)
    _save(reopened, 2, value=7)
    assert read_slot(newest).step == 2 and read_slot(slot_path(tmp_path, 0, 0)).step == 1


def test_the_writer_survives_its_slots_being_truncated(tmp_path: Path) -> None:
    """A shared mapping touched past the end of its file is a SIGBUS: the writer must notice the cut."""
    store = RankSnapshots(tmp_path, 0, 1)
    _save(store, 1)
    _save(store, 2)
    for k in range(2):
        os.truncate(slot_path(tmp_path, 0, k), 10)
    store._held = [None, None]  # as after a resume that rejected both
    _save(store, 3)
    _save(store, 4)
    assert set(rank_steps(tmp_path, 0)) == {3, 4}


def test_a_full_shared_memory_is_an_error_not_a_sigbus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write into a tmpfs page that cannot be allocated is a SIGBUS: slots are allocated up front."""
    import errno

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store = RankSnapshots(tmp_path, 0, 1)
    _save(store, 1)
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(SnapshotError, match="No space left on device"):
        _save(store, 2)
    assert set(rank_steps(tmp_path, 0)) == {1}


_WRITER = """
import sys, torch
from burnin.rank.snapshot import RankSnapshots
from burnin.rank.state import capture_rank_state
model = torch.nn.Linear(2048, 2048)   # 16 MB: a write takes a few ms, so a kill often lands in one
opt = torch.optim.SGD(model.parameters(), lr=0.1)
store = RankSnapshots(sys.argv[1], 0, 1)
step = 0
while True:
    step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    store.save(step, model, opt, capture_rank_state(step))
    print(step, flush=True)
"""


@pytest.mark.slow
def test_a_rank_killed_mid_write_leaves_its_other_slot(tmp_path: Path) -> None:
    """Real SIGKILLs at random moments of a loop of saves: whatever is left verifies or is rejected,
    never loads wrong, and the newest committed step is always there."""
    torn = 0
    for trial in range(3):
        root = tmp_path / f"t{trial}"
        root.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True)
        committed = 0
        while committed < 3:
            committed = int(proc.stdout.readline())
        time.sleep(random.Random(trial).uniform(0.0, 0.02))
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
        committed = max([committed, *map(int, rest.split())])
        rejected: list[str] = []
        valid = rank_steps(root, 0, on_reject=lambda p, s, w: rejected.append(w))
        assert max(valid) >= committed  # printed only once committed
        assert all("torn write" in w for w in rejected), rejected
        torn += len(rejected)
        for step, slot in valid.items():  # what verifies holds exactly its step's values
            weights = np.frombuffer(slot.shard, dtype=np.float32)
            assert np.all(weights == step), (step, np.unique(weights)[:4])
    print(f"{torn} of 3 kills landed in the middle of a write")


def test_newest_common_step() -> None:
    a = "0000abcd:100"
    assert common_step([{3: a, 4: a}, {4: a, 5: a}]) == 4
    assert common_step([{3: a, 4: a}, {3: a}]) == 3               # rank 1's step 4 torn
    assert common_step([{3: a, 4: a}, {}]) is None                # rank 1 has none: the disk tier
    assert common_step([{3: a, 4: a}, None]) is None
    assert common_step([{3: a, 4: a}, {3: a, 4: "other:100"}]) == 3  # another layout at 4
    assert common_step([{7: a}, {5: a, 6: a}]) is None
    assert common_step([]) is None


def test_newest_common_step_over_real_slots(tmp_path: Path) -> None:
    stores = [RankSnapshots(tmp_path, r, 2) for r in range(2)]
    for step in (1, 2, 3):
        for store in stores:
            _save(store, step)
    _save(stores[0], 4)  # rank 0 is one step ahead: rank 1 was killed before its snapshot of 4
    offers = [{s: f"{slot.meta['layout_crc']:08x}:{slot.meta['image_len']}"
               for s, slot in rank_steps(tmp_path, r, 2).items()} for r in range(2)]
    assert [set(o) for o in offers] == [{3, 4}, {2, 3}]
    assert common_step(offers) == 3
    slot_path(tmp_path, 1, 0).unlink()
    slot_path(tmp_path, 1, 1).unlink()  # a rank's slots missing altogether
    assert common_step([offers[0], {s: d for s, d in rank_steps(tmp_path, 1, 2).items()}]) is None


def test_shards_cover_the_image_and_split_the_work(tmp_path: Path) -> None:
    model, opt, _ = _tiny()
    world = 3
    for r in range(world):
        RankSnapshots(tmp_path, r, world).save(2, model, opt, capture_rank_state(2))
    slots = [read_slot(slot_path(tmp_path, r, 0), world) for r in range(world)]
    meta = slots[0].meta
    image = bytearray(meta["image_len"])
    for r, slot in enumerate(slots):
        lo, hi = meta["bounds"][r]
        assert slot.meta["bounds"] == meta["bounds"] and len(slot.shard) == hi - lo
        assert (hi - lo) < 0.5 * meta["image_len"]  # each rank copies and checksums about a third
        image[lo:hi] = slot.shard
    osd = opt.state_dict()
    tensors = list(model.state_dict().values()) + [v for st in osd["state"].values() for v in st.values()]
    for (off, dtype, shape, n), t in zip(meta["entries"], tensors):
        assert bytes(image[off:off + n]) == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_layout_cuts_at_tensor_boundaries(world: int) -> None:
    tensors = [torch.zeros(n) for n in (1000, 10, 0, 5000, 3, 2000, 1)] + [torch.zeros((), dtype=torch.int64)]
    entries, total, bounds = _layout(tensors, world)
    starts = {e[0] for e in entries} | {total}
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
    assert all(lo in starts and hi in starts and lo <= hi for lo, hi in bounds)
    assert all(off % 64 == 0 for off, *_ in entries)


def test_discard_marks_slots_empty(tmp_path: Path) -> None:
    store = RankSnapshots(tmp_path, 0, 1)
    _save(store, 5)
    _save(store, 6)
    store.discard(newer_than=5)
    assert set(rank_steps(tmp_path, 0)) == {5}
    store.discard()
    rejected: list = []
    assert rank_steps(tmp_path, 0, on_reject=lambda *a: rejected.append(a)) == {} and rejected == []
    _save(store, 1)
    assert set(rank_steps(tmp_path, 0)) == {1}


def test_the_meta_loads_no_code(tmp_path: Path) -> None:
    import pickle

    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        snapshot.load_meta(pickle.dumps({"x": os.getcwd, "static": b""}))


# -- the directory: created, found, swept (no torch) ---------------------------------------------------------


def test_directory_lifecycle_and_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURNIN_SHM_DIR", str(tmp_path))
    mine = snapshot.create_dir("run-a")
    assert mine == tmp_path / "burnin-run-a" and mine.is_dir()
    owner = json.loads((mine / snapshot.OWNER).read_text())
    assert owner["run_id"] == "run-a" and owner["supervisor_pid"] == os.getpid()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = snapshot.create_dir("run-b")
    (dead / snapshot.OWNER).write_text(json.dumps({"run_id": "run-b", "supervisor_pid": int(gone.stdout)}))
    (tmp_path / "someone-else").mkdir()  # not ours: never listed, never removed
    (tmp_path / "burnin-no-owner").mkdir()
    assert [p.name for p, _ in snapshot.leftovers()] == ["burnin-run-a", "burnin-run-b"]

    report = snapshot.sweep()
    assert {e["run_id"]: e["action"] for e in report} == {"run-a": "skipped", "run-b": "cleaned"}
    assert mine.is_dir() and not dead.exists() and (tmp_path / "someone-else").is_dir()
    assert snapshot.sweep(alive=lambda run_id, owner: False)[0]["action"] == "cleaned" and not mine.exists()

    again = snapshot.create_dir("run-c")
    (again / "rank0.slot0").write_bytes(b"stale")
    assert not (snapshot.create_dir("run-c") / "rank0.slot0").exists()  # a reused id starts empty
    snapshot.remove_dir(again)
    snapshot.remove_dir(None)
    assert not again.exists()


def test_supervisor_side_imports_no_torch() -> None:
    code = ("import sys, burnin.core.snapshots as s, burnin.harness.supervisor, burnin.faults.storage; "
            "s.sweep(alive=lambda *a: True); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# -- the fault ---------------------------------------------------------------------------------------------


def _fault(**params) -> object:
    return FaultSpec.model_validate({"fault": "storage.snapshot_corrupt", "rank": 1, "step": 3,
                                     "params": params}).build()


def _run_with_snapshots(tmp_path: Path) -> tuple[Path, OutOfRankContext]:
    """A run directory whose spec names a snapshot directory with steps 2 and 3 of ranks 0 and 1."""
    root = tmp_path / "shm"
    root.mkdir()
    for r in range(2):
        store = RankSnapshots(root, r, 2)
        for step in (2, 3):
            _save(store, step)
    (tmp_path / "run" / "ranks").mkdir(parents=True)
    (tmp_path / "run" / "ranks" / "spec.json").write_text(json.dumps({"snapshot_dir": str(root)}))
    ctx = OutOfRankContext(rank=1, step=3, point="between_steps", pid=os.getpid(), run_dir=tmp_path / "run",
                           checkpoint_dir=tmp_path / "run" / "checkpoints")
    return root, ctx


@pytest.mark.parametrize("params, left, why", [
    ({}, {2}, "fails its CRC-32 check"),
    ({"mode": "truncate"}, {2}, "(truncated)"),
    ({"slots": "both", "nbytes": 1, "seed": 5}, set(), "CRC-32"),
    ({"slots": "both", "mode": "truncate", "keep_fraction": 0.0}, set(), "(truncated)"),
])
def test_snapshot_corrupt_damages_the_newest_slot(tmp_path: Path, params: dict, left: set, why: str) -> None:
    root, ctx = _run_with_snapshots(tmp_path)
    details = _fault(**params).inject(ctx)
    both = params.get("slots") == "both"
    assert details["snapshot_step"] == 3 and details["snapshot_steps"] == ([3, 2] if both else [3])
    assert details["rank"] == 1 and len(details["files"]) == (2 if both else 1)
    reasons: list[str] = []
    assert set(rank_steps(root, 1, 2, on_reject=lambda p, s, w: reasons.append(w))) == left
    assert reasons and all(why in w for w in reasons), reasons
    assert set(rank_steps(root, 0, 2)) == {2, 3}  # the other rank's slots are untouched
    assert common_step([{s: "x" for s in rank_steps(root, r, 2)} for r in range(2)]) == (max(left) if left else None)


def test_snapshot_corrupt_flips_the_same_bytes_for_a_seed(tmp_path: Path) -> None:
    offsets = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        _, ctx = _run_with_snapshots(tmp_path / run)
        offsets.append(_fault(seed=3).inject(ctx)["offsets"])
    assert offsets[0] == offsets[1] and len(offsets[0][0]) == 8


def test_snapshot_corrupt_without_a_snapshot_cannot_be_applied(tmp_path: Path) -> None:
    (tmp_path / "run" / "ranks").mkdir(parents=True)
    (tmp_path / "run" / "ranks" / "spec.json").write_text(json.dumps({"snapshot_dir": None}))
    ctx = OutOfRankContext(rank=1, step=3, point="between_steps", pid=os.getpid(), run_dir=tmp_path / "run",
                           checkpoint_dir=tmp_path)
    with pytest.raises(HarnessError, match="the run keeps no memory snapshots"):
        _fault().inject(ctx)
    (tmp_path / "shm").mkdir()
    (tmp_path / "run" / "ranks" / "spec.json").write_text(json.dumps({"snapshot_dir": str(tmp_path / "shm")}))
    with pytest.raises(HarnessError, match="no memory snapshot of rank 1 in"):
        _fault().inject(ctx)


# -- end to end: which tier a restart resumes from -------------------------------------------------------------


def _events(out: Path) -> list[dict]:
    from burnin.core.events import read_events

    return read_events(run_dir_of(out) / "events.jsonl")


def _resumed(events: list[dict], attempt: int) -> dict:
    """Rank 0's resume of `attempt` (every rank resumes from the same step and tier)."""
    mine = [e for e in events if e["event"] == "resumed" and e["attempt"] == attempt]
    assert len({(e["from_step"], e["tier"]) for e in mine}) == 1, mine
    return next(e for e in mine if e["rank"] == 0)


def _exact(out: Path, proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(out)
    assert s["finished"] and s["exact"] and s["final_state_hash"] == s["golden_state_hash"]
    assert all(f["outcome"] == "recovered" for f in s["faults"]), s["faults"]
    assert not (snapshot.shm_root() / f"burnin-{s['run_id']}").exists()  # the supervisor removed it
    return s


def _scenario(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text("workload: {model: tiny, ranks: 2, steps: 30, threads: 1}\n" + text)
    return path


@pytest.mark.slow
def test_kill_rank_resumes_from_memory(tmp_path: Path) -> None:
    proc = run_cli("run", "kill-rank", "--out", str(tmp_path))
    s = _exact(tmp_path, proc)
    (f,) = s["faults"]
    resumed = _resumed(_events(tmp_path), 1)
    assert resumed["tier"] == "memory"
    # killed at the end of step 12, after its snapshot of 13: nothing, or at worst that step, is lost
    assert f["lost_steps"] <= 1 and resumed["from_step"] >= 12
    assert f["recovery"]["resumed_from_step"] == resumed["from_step"]


@pytest.mark.slow
def test_damaged_snapshots_fall_back_to_the_disk_checkpoint(tmp_path: Path) -> None:
    path = _scenario(tmp_path, "name: snap-both\ncheckpoint: {every: 5}\nfaults:\n"
                               "  - {fault: storage.snapshot_corrupt, rank: 1, step: 12, params: {slots: both},"
                               " expect: recovered}\n"
                               "  - {fault: process.kill, rank: 1, step: 12, expect: recovered}\n")
    out = tmp_path / "runs"
    s = _exact(out, run_cli("run", str(path), "--out", str(out)))
    corrupt, kill = s["faults"]
    events = _events(out)
    resumed = _resumed(events, 1)
    assert (resumed["tier"], resumed["from_step"]) == ("disk", 10)
    rejected = [e for e in events if e["event"] == "snapshot_rejected"]
    assert {(e["rank"], e["snapshot_step"]) for e in rejected} == {(1, 12), (1, 13)}
    assert corrupt["detected_by"] == "snapshot_checksum" and "CRC-32" in corrupt["cause"]
    assert corrupt["lost_steps"] == 13 - 10  # the fallback from memory (13) to disk (10)
    assert kill["recovery"]["resumed_from_step"] == 10


@pytest.mark.slow
def test_a_damaged_newest_snapshot_falls_back_to_the_other_slot(tmp_path: Path) -> None:
    s = _exact(tmp_path, run_cli("run", "corrupt-snapshot", "--out", str(tmp_path)))
    corrupt, kill = s["faults"]
    resumed = _resumed(_events(tmp_path), 1)
    assert (resumed["tier"], resumed["from_step"]) == ("memory", corrupt["details"]["snapshot_step"] - 1)
    assert corrupt["detected_by"] == "snapshot_checksum" and corrupt["lost_steps"] == 1


@pytest.mark.slow
def test_without_memory_snapshots_the_checkpoint_is_used(tmp_path: Path) -> None:
    path = _scenario(tmp_path, "name: snap-off\ncheckpoint: {every: 5, memory_every: 0}\n"
                               "faults:\n  - {fault: process.kill, rank: 1, step: 12, expect: recovered}\n")
    out = tmp_path / "runs"
    s = _exact(out, run_cli("run", str(path), "--out", str(out)))
    resumed = _resumed(_events(out), 1)
    assert (resumed["tier"], resumed["from_step"]) == ("disk", 10)
    assert s["faults"][0]["lost_steps"] == 3


@pytest.mark.slow
def test_a_corruption_finding_restarts_from_disk(tmp_path: Path) -> None:
    """A memory snapshot may hold a corruption that predates its finding: the restart after a
    finding resumes from the disk checkpoints, as without snapshots."""
    path = tmp_path / "s.yaml"
    path.write_text("name: snap-sdc\nworkload: {model: tiny, ranks: 2, steps: 12, threads: 1}\n"
                    "checkpoint: {every: 5}\ndetectors: {fingerprint: {every: 1}}\nrecovery: {mode: restart}\n"
                    "faults:\n  - {fault: corruption.bitflip, rank: 1, step: 7, point: after_optimizer_step,"
                    " params: {target: param, bit_class: exponent, seed: 3}, expect: recovered}\n")
    out = tmp_path / "runs"
    _exact(out, run_cli("run", str(path), "--out", str(out)))
    resumed = _resumed(_events(out), 1)
    assert (resumed["tier"], resumed["from_step"]) == ("disk", 5)


def test_header_layout_is_fixed() -> None:
    """The header is read by processes that never import torch (the fault, `burnin cleanup`)."""
    head = snapshot.encode_header(snapshot.COMMITTED, 12, 100, 20, 7)
    assert len(head) == HEADER_SIZE and snapshot._parse_header(head) == (snapshot.COMMITTED, 12, 100, 20, 7)
    assert struct.unpack_from("<8sIIq", head)[0:4] == (snapshot.MAGIC, snapshot.VERSION, snapshot.COMMITTED, 12)
