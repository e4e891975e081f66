"""In-memory snapshots: the state after a rank's last completed step, kept where its death does not take it.

A killed, hung or raising rank on a live machine loses at most the step in flight: the restart
resumes from the newest snapshot step that every rank has and that verifies, instead of the newest
disk checkpoint (which stays, at its own interval, for a lost machine: memory does not survive that).

Where: a directory in shared memory (tmpfs, ``/dev/shm/burnin-<run_id>``), created and removed by
the supervisor, so it outlives any rank. Layout, per rank, two slots written alternately::

    rank{r}.slot0, rank{r}.slot1
        header   64 bytes: magic, version, state (empty / writing / committed), step, shard
                 length, meta length, CRC-32 of shard + meta; its own CRC-32 in the last 4 bytes
        shard    this rank's share of the model and optimizer tensors' raw bytes
        meta     a small pickle (builtin types only, loaded by a restricted unpickler): the state
                 dicts' structure with tensors replaced by references into the image, the shard
                 bounds, the optimizer's param_groups, this rank's RNG state (inline)
        (spare room, so the file keeps its size from step to step; not under any checksum)

Sharded: the replicas are bit-identical under DDP, so the model + optimizer image (every tensor's
bytes, 64-byte aligned, in state-dict order) is cut at tensor boundaries into one contiguous piece
per rank. Each rank copies and checksums only its piece (1/world_size of the work, in parallel),
and a restore reads every rank's piece from its slot (the ranks a supervisor starts share the host and
its shared memory; the ranks first agree that each of them read every piece). Every rank stores its own
RNG state.

Commit protocol of one slot: mark the header `writing` (with the step), copy the shard and the
meta, checksum them, mark the header `committed` with the checksum. A rank killed mid-write leaves
a `writing` header (or a torn one, which fails its own checksum) in that slot and the other slot
intact: it is rejected on read, and the rank's previous step is still there. The slot written is
never the one holding the rank's newest committed step.

Which step: ranks step in lockstep (one all-reduce per step), so when a rank writes the snapshot of
step s+1 every other rank has committed step s. The newest step every rank has in a verified slot
is the memory tier's candidate; rank 0 compares it with the newest valid disk checkpoint (the newer
wins; memory wins a tie: the same state, cheaper to load) and broadcasts the choice.

Cost per step, tiny model (0.44M parameters, 5.4 MB of model + AdamW state) with two ranks: each
rank one `torch._foreach_copy_` of its 2.7 MB into a preallocated mmap and a CRC-32 of it (zlib,
~4 GB/s: most of the cost), a state_dict(), and a pickle of a few KB (the structure is pickled once
per layout): about 1 ms per rank; see docs/architecture.md ("Recovery tiers").

This module is the format and the directory, with no torch: the supervisor side (`create_dir`,
`remove_dir`, `leftovers`, `sweep`) and the slot reader (`read_slot`, `rank_steps`, `newest_slot`). The
rank's writer and restorer (`RankSnapshots`) is in `burnin.rank.snapshot`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from burnin.core.files import atomic_write_text
from burnin.core.procs import process_start_time, state_dir

__all__ = ["SnapshotError", "Slot", "create_dir", "remove_dir", "leftovers", "sweep", "shm_root", "status",
           "slot_path", "peek", "read_slot", "rank_steps", "newest_slot", "common_step", "OWNER"]

MAGIC = b"BURNSNAP"
VERSION = 1
EMPTY, WRITING, COMMITTED = 0, 1, 2
_HEAD = struct.Struct("<8sIIqQQI")     # magic, version, state, step, shard length, meta length, crc
HEADER_SIZE = 64                        # the fields, zero padding, and the CRC-32 of both in the last 4 bytes
ALIGN = 64                             # each tensor's offset in the image
SLOTS = 2
OWNER = "owner.json"
_PREFIX = "burnin-"


class SnapshotError(Exception):
    """A snapshot slot failed verification (torn write, checksum, truncation, unreadable meta)."""


# -- the directory (supervisor side, no torch) ----------------------------------------------------


def shm_root() -> Path:
    """Where snapshot directories go: $BURNIN_SHM_DIR, else /dev/shm, else the state directory."""
    env = os.environ.get("BURNIN_SHM_DIR")
    if env:
        return Path(env)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return state_dir() / "snapshots"


def create_dir(run_id: str) -> Path:
    """A fresh snapshot directory for run `run_id` (``<root>/burnin-<run_id>``), owned by this process.

    `owner.json` names the supervisor (pid and start time), so `sweep` can tell a leftover from the
    directory of a run still going on."""
    path = shm_root() / f"{_PREFIX}{run_id}"
    if path.exists():  # a leftover of an earlier run with the same id: never resume from it
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    # atomically: a sweep by another process (a concurrent run, `burnin cleanup`) never reads half of it
    atomic_write_text(path / OWNER, json.dumps({"run_id": run_id, "supervisor_pid": os.getpid(),
                                                "supervisor_start": process_start_time(os.getpid())}))
    return path


def remove_dir(path: str | Path | None) -> None:
    """Remove a run's snapshot directory (nothing when it is None or already gone)."""
    if path:
        shutil.rmtree(path, ignore_errors=True)


def leftovers() -> list[tuple[Path, dict[str, Any]]]:
    """Every snapshot directory under the root, with its owner record ({} when unreadable)."""
    root = shm_root()
    found = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    for p in entries:
        if not p.name.startswith(_PREFIX) or not p.is_dir() or not (p / OWNER).is_file():
            continue  # only directories this module made: /dev/shm holds other programs' files
        try:
            owner = json.loads((p / OWNER).read_text())
        except (OSError, ValueError):
            owner = {}
        found.append((p, owner))
    return found


def _owner_alive(owner: dict[str, Any]) -> bool:
    pid = owner.get("supervisor_pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = owner.get("supervisor_start")
    return start in (None, "?") or process_start_time(pid) == start


def sweep(alive: Callable[[str, dict[str, Any]], bool] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Remove the snapshot directories of runs whose supervisor is gone.

    `alive(run_id, owner)` says whether a run is still going on; by default its supervisor's pid is
    alive with the recorded start time (a recycled pid does not count). `force` removes them all.
    Returns one report entry per directory: {"run_id", "path", "action": "cleaned" | "skipped"}."""
    alive = alive or (lambda run_id, owner: _owner_alive(owner))
    report = []
    for path, owner in leftovers():
        run_id = str(owner.get("run_id") or path.name[len(_PREFIX):])
        if not force and alive(run_id, owner):
            report.append({"run_id": run_id, "path": str(path), "action": "skipped",
                           "why": "its supervisor is still running"})
            continue
        remove_dir(path)
        report.append({"run_id": run_id, "path": str(path), "action": "cleaned"})
    return report


# -- slots (no torch) ---------------------------------------------------------------------------------


def slot_path(root: str | Path, rank: int, slot: int) -> Path:
    return Path(root) / f"rank{rank}.slot{slot}"


def encode_header(state: int, step: int, shard_len: int = 0, meta_len: int = 0, crc: int = 0) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, state, step, shard_len, meta_len, crc).ljust(HEADER_SIZE - 4, b"\0")
    return head + struct.pack("<I", zlib.crc32(head))


def _parse_header(raw: bytes) -> tuple[int, int, int, int, int] | None:
    """(state, step, shard length, meta length, crc) of a header whose own CRC-32 and magic check out."""
    if len(raw) < HEADER_SIZE:
        return None
    head, (hcrc,) = raw[:HEADER_SIZE - 4], struct.unpack_from("<I", raw, HEADER_SIZE - 4)
    if zlib.crc32(head) != hcrc:
        return None
    magic, version, state, step, shard_len, meta_len, crc = _HEAD.unpack_from(head)
    if magic != MAGIC or version != VERSION:
        return None
    return state, step, shard_len, meta_len, crc


@dataclass
class Slot:
    """One verified, committed slot: its step, its meta, and a private copy of its shard bytes."""

    path: Path
    step: int
    meta: dict[str, Any]
    shard: bytes


class _Unpickler(pickle.Unpickler):
    """The meta holds builtin types and references only: no other class may be loaded."""

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name in ("Ref", "Blob"):
            return globals()[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a snapshot")


class Ref:
    """Stands for tensor `index` of the model/optimizer image in the pickled structure."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return Ref, (self.index,)


class Blob:
    """A small tensor stored inline in the meta (RNG states): dtype name, shape, raw bytes."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape: tuple[int, ...], data: bytes):
        self.dtype, self.shape, self.data = dtype, shape, data

    def __reduce__(self) -> tuple[Any, ...]:
        return Blob, (self.dtype, self.shape, self.data)


def peek(path: str | Path) -> tuple[int, int, int] | None:
    """(state, step, used bytes) from a slot's header when the header itself verifies, else None."""
    try:
        with open(path, "rb") as fh:
            head = _parse_header(fh.read(HEADER_SIZE))
    except OSError:
        return None
    if head is None:
        return None
    state, step, shard_len, meta_len, _ = head
    return state, step, HEADER_SIZE + shard_len + meta_len


def read_slot(path: str | Path, world_size: int | None = None, rank: int | None = None) -> Slot | None:
    """The committed snapshot in `path`, verified; None for an empty slot (never written, or
    discarded); SnapshotError saying why for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"unreadable: {exc!r}") from None
    if len(raw) < HEADER_SIZE:
        raise SnapshotError(f"{len(raw)} bytes, shorter than its header (truncated)")
    head = _parse_header(raw)
    if head is None:
        raise SnapshotError("the header fails its CRC-32 check (corrupted, or a write torn in the header)")
    state, step, shard_len, meta_len, crc = head
    if state == EMPTY:
        return None
    if state == WRITING:
        raise SnapshotError(f"step {step} was never committed (torn write: the rank stopped while writing it)")
    if state != COMMITTED:
        raise SnapshotError(f"unknown slot state {state}")
    end = HEADER_SIZE + shard_len + meta_len
    if len(raw) < end:
        raise SnapshotError(f"{len(raw)} bytes, the header says {end} (truncated)")
    body = memoryview(raw)[HEADER_SIZE:end]
    if zlib.crc32(body) != crc:
        raise SnapshotError(f"step {step} fails its CRC-32 check (corrupted)")
    try:
        meta = load_meta(body[shard_len:])
        meta.update(load_meta(meta.pop("static")))  # the part a rank pickles once per layout
        if meta["step"] != step:
            raise SnapshotError(f"the meta says step {meta['step']}, the header {step}")
        lo, hi = meta["bounds"][meta["rank"]]
        if hi - lo != shard_len:
            raise SnapshotError(f"the shard is {shard_len} bytes, the meta says {hi - lo}")
    except SnapshotError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a checksummed meta that still does not load is corrupt
        raise SnapshotError(f"unreadable meta: {exc!r}") from None
    if world_size is not None and meta["world_size"] != world_size:
        raise SnapshotError(f"written by {meta['world_size']} ranks, this run has {world_size}")
    if rank is not None and meta["rank"] != rank:
        raise SnapshotError(f"written by rank {meta['rank']}, not rank {rank}")
    return Slot(path, step, meta, bytes(body[:shard_len]))


def load_meta(data: bytes | memoryview) -> Any:
    return _Unpickler(io.BytesIO(bytes(data))).load()


def rank_steps(root: str | Path, rank: int, world_size: int | None = None,
               on_reject: Callable[[Path, int | None, str], None] | None = None) -> dict[int, Slot]:
    """This rank's verified slots by step; each slot that fails is reported to `on_reject(path, step, why)`
    (step from its header when the header verifies, else None)."""
    found: dict[int, Slot] = {}
    for k in range(SLOTS):
        path = slot_path(root, rank, k)
        try:
            slot = read_slot(path, world_size, rank)
        except SnapshotError as exc:
            if on_reject:
                head = peek(path)
                on_reject(path, head[1] if head else None, str(exc))
            continue
        if slot is not None:
            found.setdefault(slot.step, slot)
    return found


def newest_slot(root: str | Path, rank: int) -> list[tuple[int, Path, int]]:
    """(step, path, used bytes) of this rank's committed slots, newest first (headers only)."""
    out = []
    for k in range(SLOTS):
        path = slot_path(root, rank, k)
        head = peek(path)
        if head is not None and head[0] == COMMITTED:
            out.append((head[1], path, head[2]))
    return sorted(out, key=lambda x: -x[0])


def status(root: str | Path, world_size: int) -> dict[str, Any] | None:
    """The memory tier as the supervisor's metrics see it, from the slot headers alone: the newest step
    every rank has committed, its bytes over all ranks, and its age (seconds since its newest slot
    was written). None while some rank has no committed slot."""
    newest = [newest_slot(root, r) for r in range(world_size)]
    if not all(newest):
        return None
    step = min(slots[0][0] for slots in newest)
    chosen = [next((x for x in slots if x[0] == step), None) for slots in newest]
    if any(c is None for c in chosen):
        return None
    try:
        written = max(os.stat(c[1]).st_mtime for c in chosen)
    except OSError:
        return None
    return {"step": step, "bytes": sum(c[2] for c in chosen), "age_s": max(0.0, time.time() - written)}


def common_step(per_rank: list[dict[int, str] | None]) -> int | None:
    """The newest step every rank has, with the same layout digest on all: {step: digest} per rank."""
    if not per_rank or any(not steps for steps in per_rank):
        return None
    common = set(per_rank[0])
    for steps in per_rank[1:]:
        common &= set(steps)
    for step in sorted(common, reverse=True):
        if len({steps[step] for steps in per_rank}) == 1:
            return step
    return None
