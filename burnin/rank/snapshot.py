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
and a restore all-gathers the pieces (so each rank reads only its own files: ranks on several
machines each read their machine's shared memory). Every rank stores its own RNG state.

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

The supervisor side (`create_dir`, `remove_dir`, `leftovers`, `sweep`) and the slot reader
(`read_slot`, `rank_steps`, `newest_slot`) need no torch.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import pickle
import shutil
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["SnapshotError", "Slot", "create_dir", "remove_dir", "leftovers", "sweep", "shm_root", "status",
           "slot_path", "peek", "read_slot", "rank_steps", "newest_slot", "common_step", "RankSnapshots", "OWNER"]

MAGIC = b"BURNSNAP"
VERSION = 1
EMPTY, WRITING, COMMITTED = 0, 1, 2
_HEAD = struct.Struct("<8sIIqQQI")     # magic, version, state, step, shard length, meta length, crc
HEADER_SIZE = 64                        # the fields, zero padding, and the CRC-32 of both in the last 4 bytes
_ALIGN = 64                             # each tensor's offset in the image
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
    from burnin.harness.cleanup import state_dir

    return state_dir() / "snapshots"


def create_dir(run_id: str) -> Path:
    """A fresh snapshot directory for run `run_id` (``<root>/burnin-<run_id>``), owned by this process.

    `owner.json` names the supervisor (pid and start time), so `sweep` can tell a leftover from the
    directory of a run still going on."""
    from burnin.harness.cleanup import process_start_time

    path = shm_root() / f"{_PREFIX}{run_id}"
    if path.exists():  # a leftover of an earlier run with the same id: never resume from it
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    (path / OWNER).write_text(json.dumps({"run_id": run_id, "supervisor_pid": os.getpid(),
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
    from burnin.harness.cleanup import process_start_time

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


def _header(state: int, step: int, shard_len: int = 0, meta_len: int = 0, crc: int = 0) -> bytes:
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
        if module == __name__ and name in ("_Ref", "_Blob"):
            return globals()[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a snapshot")


class _Ref:
    """Stands for tensor `index` of the model/optimizer image in the pickled structure."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return _Ref, (self.index,)


class _Blob:
    """A small tensor stored inline in the meta (RNG states): dtype name, shape, raw bytes."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape: tuple[int, ...], data: bytes):
        self.dtype, self.shape, self.data = dtype, shape, data

    def __reduce__(self) -> tuple[Any, ...]:
        return _Blob, (self.dtype, self.shape, self.data)


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
        meta = _loads(body[shard_len:])
        meta.update(_loads(meta.pop("static")))  # the part a rank pickles once per layout
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


def _loads(data: bytes | memoryview) -> Any:
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
    import time

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


# -- a rank's store (torch) ---------------------------------------------------------------------------


_SCALARS = frozenset((int, float, bool, str, type(None)))


def _flatten(obj: Any, tensors: list[Any]) -> Any:
    """`obj` with every tensor replaced by a _Ref into `tensors` (dicts, lists and tuples walked)."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Ref(len(tensors) - 1)
    if isinstance(obj, dict):
        return {k: _flatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if _SCALARS.issuperset(map(type, obj)):  # a list of numbers (params ids, an RNG's words)
            return obj
        items = [_flatten(v, tensors) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _inline(obj: Any) -> Any:
    """`obj` with every tensor replaced by a _Blob of its bytes (small states: RNGs)."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        return _Blob(str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(obj, dict):
        return {k: _inline(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if _SCALARS.issuperset(map(type, obj)):
            return obj
        items = [_inline(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _rebuild(obj: Any, tensors: list[Any]) -> Any:
    import torch

    if isinstance(obj, _Ref):
        return tensors[obj.index]
    if isinstance(obj, _Blob):
        if not obj.data:
            return torch.empty(obj.shape, dtype=_dtype(obj.dtype))
        return torch.frombuffer(bytearray(obj.data), dtype=_dtype(obj.dtype)).reshape(obj.shape)
    if isinstance(obj, dict):
        return {k: _rebuild(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_rebuild(v, tensors) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _dtype(name: str) -> Any:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SnapshotError(f"unknown dtype {name!r} in a snapshot")
    return dtype


def _layout(tensors: list[Any], world_size: int) -> tuple[list[tuple[int, str, tuple[int, ...], int]], int,
                                                          list[tuple[int, int]]]:
    """Each tensor's (offset, dtype, shape, bytes) in the image, the image's length, and per rank the
    [lo, hi) of its shard, cut at tensor boundaries as near as possible to equal shares."""
    entries, off = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        entries.append((off, str(t.dtype).removeprefix("torch."), tuple(t.shape), n))
        off += -(-n // _ALIGN) * _ALIGN
    total = off
    starts = [e[0] for e in entries] + [total]
    cuts, j = [0], 0
    for k in range(1, world_size):
        target = total * k / world_size
        while j + 1 < len(starts) and abs(starts[j + 1] - target) <= abs(starts[j] - target):
            j += 1
        cuts.append(max(cuts[-1], starts[j]))
    cuts.append(total)
    return entries, total, [(cuts[r], cuts[r + 1]) for r in range(world_size)]


def _structure(msd: dict[str, Any], ostate: dict[Any, Any]) -> tuple[list[Any], Any, Callable[[], bytes]]:
    """The tensors of a model state dict and an optimizer's state, in image order; a signature that
    changes whenever the layout would; and how to pickle the structure, with each tensor replaced
    by a reference to its place in that order (called only when the signature is new)."""
    import torch

    tensors = list(msd.values())
    for st in ostate.values():
        tensors.extend(st.values())
    if all(isinstance(t, torch.Tensor) for t in tensors):  # the usual case: checked without a walk
        sig = (tuple(msd), tuple((pid, tuple(st)) for pid, st in ostate.items()),
               tuple([(t.dtype, t.shape, t.device) for t in tensors]))

        def build() -> bytes:
            refs = iter(range(len(tensors)))
            return pickle.dumps({"model": {name: _Ref(next(refs)) for name in msd},
                                 "optimizer_state": {pid: {k: _Ref(next(refs)) for k in st}
                                                     for pid, st in ostate.items()}},
                                protocol=pickle.HIGHEST_PROTOCOL)
        return tensors, sig, build
    tensors = []  # something else in there too (an extra state, a plain number): walk it every time
    skeleton = pickle.dumps({"model": _flatten(dict(msd), tensors), "optimizer_state": _flatten(ostate, tensors)},
                            protocol=pickle.HIGHEST_PROTOCOL)
    return tensors, (skeleton, tuple([(t.dtype, t.shape, t.device) for t in tensors])), lambda: skeleton


class _Plan:
    """Where each tensor goes (offsets in the image, this rank's shard, views of the slots' maps), and
    the meta that does not change from step to step, pickled once."""

    def __init__(self, tensors: list[Any], skeleton: bytes, model_metadata: Any, rank: int, world_size: int):
        self.entries, self.image_len, self.bounds = _layout(tensors, world_size)
        self.lo, hi = self.bounds[rank]
        self.shard_len = hi - self.lo
        self.mine = [i for i, e in enumerate(self.entries) if self.lo <= e[0] < hi and e[3] > 0]
        self.cpu = all(t.device.type == "cpu" for t in tensors)
        self.views: dict[int, list[Any]] = {}
        self.static = pickle.dumps({"image_len": self.image_len, "bounds": self.bounds, "entries": self.entries,
                                    "layout_crc": zlib.crc32(skeleton + repr(self.entries).encode()),
                                    "skeleton": skeleton, "model_metadata": model_metadata},
                                   protocol=pickle.HIGHEST_PROTOCOL)


class RankSnapshots:
    """One rank's double-buffered snapshot store in `root`.

    Opening it verifies the rank's slots (each one that fails goes to `on_reject(path, step, why)`,
    step None when its header is unreadable); `steps()` is then what this rank can offer, `load` a
    collective that rebuilds the state of a step every rank has, `save` writes the next snapshot.
    """

    def __init__(self, root: str | Path, rank: int, world_size: int,
                 on_reject: Callable[[Path, int | None, str], None] | None = None):
        self.root, self.rank, self.world_size = Path(root), rank, world_size
        self._valid = rank_steps(self.root, rank, world_size, on_reject)  # verified copies, until chosen
        # step held by each slot (None: empty or not valid), so a write never hits the newest one
        self._held: list[int | None] = [None] * SLOTS
        for slot in self._valid.values():
            self._held[int(slot.path.name[-1])] = slot.step
        self._maps: list[tuple[int, mmap.mmap, int] | None] = [None] * SLOTS  # (fd, map, size)
        self._plan: tuple[Any, _Plan] | None = None  # (structure signature, plan) of the last save

    # -- restore ------------------------------------------------------------------------------------

    def steps(self) -> dict[int, str]:
        """{step: layout digest} of this rank's verified snapshots (the digest must match across ranks)."""
        return {s: f"{slot.meta['layout_crc']:08x}:{slot.meta['image_len']}" for s, slot in self._valid.items()}

    def load(self, step: int, device: Any = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
        """(model/optimizer state, this rank's RNG state) of `step`, from every rank's shard.

        Collective: every rank calls it with the same step (one all-gather of the shards)."""
        import torch
        import torch.distributed as dist

        slot = self._valid[step]
        meta = slot.meta
        bounds = meta["bounds"]
        width = max(1, max(hi - lo for lo, hi in bounds))
        comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        mine = torch.zeros(width, dtype=torch.uint8)
        if slot.shard:
            mine[:len(slot.shard)] = torch.frombuffer(bytearray(slot.shard), dtype=torch.uint8)
        mine = mine.to(comm)
        parts = [torch.empty(width, dtype=torch.uint8, device=comm) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        image = torch.empty(meta["image_len"], dtype=torch.uint8)
        for (lo, hi), part in zip(bounds, parts):
            image[lo:hi] = part[:hi - lo].cpu()
        tensors = [image[off:off + n].view(_dtype(dtype)).reshape(shape).clone().to(device)
                   for off, dtype, shape, n in meta["entries"]]
        skeleton = _loads(meta["skeleton"])
        model = OrderedDict(_rebuild(skeleton["model"], tensors))
        if meta.get("model_metadata") is not None:
            model._metadata = meta["model_metadata"]  # type: ignore[attr-defined]
        state = {"model": model, "optimizer": {"state": _rebuild(skeleton["optimizer_state"], tensors),
                                               "param_groups": meta["param_groups"]}}
        return state, _rebuild(meta["rank_state"], [])

    def discard(self, newer_than: int | None = None) -> None:
        """Mark empty every slot holding a step after `newer_than` (all slots when None): states that a
        resume from an earlier step, a rollback or a corruption finding made stale or suspect."""
        self._valid.clear()  # the verified copies are needed only until the choice
        for k in range(SLOTS):
            path = slot_path(self.root, self.rank, k)
            if not path.exists():
                continue
            head = peek(path)
            if newer_than is not None and head is not None and head[0] == COMMITTED and head[1] <= newer_than:
                self._held[k] = head[1]
                continue
            if head is None or head[0] != EMPTY:
                with open(path, "r+b") as fh:
                    fh.write(_header(EMPTY, -1))
            self._held[k] = None

    # -- save ---------------------------------------------------------------------------------------

    def save(self, step: int, model: Any, optimizer: Any, rank_state: dict[str, Any]) -> None:
        """Commit the snapshot of `step` (= steps completed) to the slot not holding the newest one.
        SnapshotError when the slot cannot be allocated (shared memory full): nothing was written."""
        import torch

        msd, osd = model.state_dict(), optimizer.state_dict()
        tensors, sig, skeleton = _structure(msd, osd["state"])
        if self._plan is None or self._plan[0] != sig:  # the layout is worked out once, then reused
            self._plan = (sig, _Plan(tensors, skeleton(), _plain_metadata(msd), self.rank, self.world_size))
        plan = self._plan[1]
        meta = pickle.dumps({"step": step, "rank": self.rank, "world_size": self.world_size,
                             "static": plan.static, "param_groups": osd["param_groups"],
                             "rank_state": _inline(rank_state)}, protocol=pickle.HIGHEST_PROTOCOL)
        k = self._target()
        end = HEADER_SIZE + plan.shard_len + len(meta)
        mm = self._map(k, end, plan.views)
        mm[:HEADER_SIZE] = _header(WRITING, step)
        if plan.mine:
            if k not in plan.views:  # typed views of this slot's map, one per tensor of the shard
                plan.views[k] = [torch.frombuffer(mm, dtype=tensors[i].dtype, count=tensors[i].numel(),
                                                  offset=HEADER_SIZE + plan.entries[i][0] - plan.lo
                                                  ).view(tensors[i].shape) for i in plan.mine]
            src = [tensors[i] for i in plan.mine]
            if plan.cpu:
                torch._foreach_copy_(plan.views[k], src)
            else:
                for dst, t in zip(plan.views[k], src):
                    dst.copy_(t)
        mm[HEADER_SIZE + plan.shard_len:end] = meta
        with memoryview(mm) as mv:
            crc = zlib.crc32(mv[HEADER_SIZE:end])
        mm[:HEADER_SIZE] = _header(COMMITTED, step, plan.shard_len, len(meta), crc)
        self._held[k] = step

    def _target(self) -> int:
        """The slot to write: an empty or invalid one, else the one holding the older step."""
        free = [k for k in range(SLOTS) if self._held[k] is None]
        if free:
            return free[0]
        return min(range(SLOTS), key=lambda k: self._held[k])  # type: ignore[arg-type,return-value]

    def _map(self, k: int, need: int, views: dict[int, Any]) -> mmap.mmap:
        """Slot k's file mapped with room for `need` bytes (grown, or restored after a truncation)."""
        cur = self._maps[k]
        if cur is not None:
            fd, mm, size = cur
            if size >= need and os.fstat(fd).st_size >= size:
                return mm
            views.pop(k, None)  # views hold the old map: drop them before closing it
            self._close(k)
        path = slot_path(self.root, self.rank, k)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = max(os.fstat(fd).st_size, -(-(need + (need >> 3) + 4096) // 4096) * 4096)
        try:
            os.ftruncate(fd, size)
            # Allocated now: a full tmpfs is an error here, not a SIGBUS when the map is written.
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            raise SnapshotError(f"cannot allocate {size} bytes for {path}: {exc.strerror or exc}") from None
        mm = mmap.mmap(fd, size)
        self._maps[k] = (fd, mm, size)
        return mm

    def _close(self, k: int) -> None:
        cur = self._maps[k]
        self._maps[k] = None
        if cur is not None:
            fd, mm, _ = cur
            try:
                mm.close()
            except BufferError:  # a view still exported: leave the map to the garbage collector
                pass
            os.close(fd)

    def close(self) -> None:
        if self._plan is not None:
            self._plan[1].views.clear()
        for k in range(SLOTS):
            self._close(k)


def _plain_metadata(state_dict: Any) -> dict[str, dict[str, Any]] | None:
    """A state dict's `_metadata` (module versions) in builtin types, which the meta may hold."""
    md = getattr(state_dict, "_metadata", None)
    return None if md is None else {str(k): dict(v) for k, v in md.items()}
