"""A rank's memory snapshots: the writer and restorer (torch) over the slot format of `burnin.core.snapshots`.

See `burnin.core.snapshots` for where snapshots live, the slot layout and its commit protocol, and the
cost per step.
"""

from __future__ import annotations

import mmap
import os
import pickle
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from burnin.core.snapshots import (ALIGN, COMMITTED, EMPTY, HEADER_SIZE, SLOTS, WRITING, Blob, Ref, SnapshotError,
                                   encode_header, load_meta, newest_slot, peek, rank_steps, read_slot, slot_path)

__all__ = ["RankSnapshots"]


# -- a rank's store (torch) ---------------------------------------------------------------------------


_SCALARS = frozenset((int, float, bool, str, type(None)))


def _flatten(obj: Any, tensors: list[Any]) -> Any:
    """`obj` with every tensor replaced by a Ref into `tensors` (dicts, lists and tuples walked)."""
    import torch  # lazy: torch; `import burnin.rank` stays torch-free

    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return Ref(len(tensors) - 1)
    if isinstance(obj, dict):
        return {k: _flatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if _SCALARS.issuperset(map(type, obj)):  # a list of numbers (params ids, an RNG's words)
            return obj
        items = [_flatten(v, tensors) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _inline(obj: Any) -> Any:
    """`obj` with every tensor replaced by a Blob of its bytes (small states: RNGs)."""
    import torch  # lazy: torch; `import burnin.rank` stays torch-free

    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        return Blob(str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(obj, dict):
        return {k: _inline(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if _SCALARS.issuperset(map(type, obj)):
            return obj
        items = [_inline(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _rebuild(obj: Any, tensors: list[Any]) -> Any:
    import torch  # lazy: torch; `import burnin.rank` stays torch-free

    if isinstance(obj, Ref):
        return tensors[obj.index]
    if isinstance(obj, Blob):
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
    import torch  # lazy: torch; `import burnin.rank` stays torch-free

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
        off += -(-n // ALIGN) * ALIGN
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
    import torch  # lazy: torch; `import burnin.rank` stays torch-free

    tensors = list(msd.values())
    for st in ostate.values():
        tensors.extend(st.values())
    if all(isinstance(t, torch.Tensor) for t in tensors):  # the usual case: checked without a walk
        sig = (tuple(msd), tuple((pid, tuple(st)) for pid, st in ostate.items()),
               tuple([(t.dtype, t.shape, t.device) for t in tensors]))

        def build() -> bytes:
            refs = iter(range(len(tensors)))
            return pickle.dumps({"model": {name: Ref(next(refs)) for name in msd},
                                 "optimizer_state": {pid: {k: Ref(next(refs)) for k in st}
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

    def __init__(self, tensors: list[Any], skeleton: bytes, model_metadata: Any, rank: int, world_size: int,
                 local: bool = False):
        # Replicas (DDP) hold the same state: each writes its 1/world of the image. A sharded model's
        # ranks hold different states: each writes all of its own (`local`), and loads it alone.
        self.entries, self.image_len, self.bounds = _layout(tensors, 1 if local else world_size)
        if local:
            self.bounds = self.bounds * world_size
        self.lo, hi = self.bounds[rank]
        self.shard_len = hi - self.lo
        self.mine = [i for i, e in enumerate(self.entries) if self.lo <= e[0] < hi and e[3] > 0]
        self.cpu = all(t.device.type == "cpu" for t in tensors)
        self.views: dict[int, list[Any]] = {}
        self.static = pickle.dumps({"image_len": self.image_len, "bounds": self.bounds, "entries": self.entries,
                                    "local": local,
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
        return {s: "local" if slot.meta.get("local") else f"{slot.meta['layout_crc']:08x}:{slot.meta['image_len']}"
                for s, slot in self._valid.items()}

    def load(self, step: int, device: Any = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
        """(model/optimizer state, this rank's RNG state) of `step`, from every rank's shard.

        Collective: every rank calls it with the same step (each reads the others' shards from shared
        memory, `_read_peers`)."""
        import torch  # lazy: torch; `import burnin.rank` stays torch-free

        slot = self._valid[step]
        meta = slot.meta
        bounds = meta["bounds"]
        image = torch.empty(meta["image_len"], dtype=torch.uint8)
        if meta.get("local"):  # a sharded model's rank: its own state, all of it in its slot
            if slot.shard:
                image[:] = torch.frombuffer(bytearray(slot.shard), dtype=torch.uint8)
        else:
            self._read_peers(step, image, meta)
        tensors = [image[off:off + n].view(_dtype(dtype)).reshape(shape).clone().to(device)
                   for off, dtype, shape, n in meta["entries"]]
        skeleton = load_meta(meta["skeleton"])
        model = OrderedDict(_rebuild(skeleton["model"], tensors))
        if meta.get("model_metadata") is not None:
            model._metadata = meta["model_metadata"]  # type: ignore[attr-defined]
        state = {"model": model, "optimizer": {"state": _rebuild(skeleton["optimizer_state"], tensors),
                                               "param_groups": meta["param_groups"]}}
        return state, _rebuild(meta["rank_state"], [])

    def _read_peers(self, step: int, image: Any, meta: dict[str, Any]) -> None:
        """Fill `image` with every rank's part of `step`, read from its slot in shared memory: the ranks a
        supervisor starts share the host, and each rank verified its own slot when it opened its store
        (an all-gather of the parts through the process group cost more: 46 against 40 ms a load of the
        tiny model on 4 ranks, measured). The ranks agree that every rank read every part (an all-reduce
        of one integer) before any of them uses it; SnapshotError on every rank otherwise. Collective."""
        import torch  # lazy: torch; `import burnin.rank` stays torch-free
        import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

        parts: dict[int, bytes] = {self.rank: self._valid[step].shard}
        why = ""
        for peer in range(self.world_size):
            if peer in parts:
                continue
            path = next((p for s, p, _ in newest_slot(self.root, peer) if s == step), None)
            try:
                found = read_slot(path, self.world_size, peer) if path is not None else None
            except SnapshotError as exc:
                found, why = None, str(exc)
            if found is None or found.meta["layout_crc"] != meta["layout_crc"]:
                why = why or "gone, or of another layout"
                break
            parts[peer] = found.shard
        ok = torch.tensor([int(len(parts) == self.world_size)])
        if dist.get_backend() == "nccl":
            ok = ok.cuda()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not int(ok.item()):
            raise SnapshotError(f"the snapshot of step {step} could not be read whole"
                                + (f" (by this rank: {why})" if why else " (by another rank)"))
        for r, (lo, hi) in enumerate(meta["bounds"]):
            if hi > lo:
                image[lo:hi] = torch.frombuffer(bytearray(parts[r]), dtype=torch.uint8)

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
                    fh.write(encode_header(EMPTY, -1))
            self._held[k] = None

    # -- save ---------------------------------------------------------------------------------------

    def save(self, step: int, model: Any, optimizer: Any, rank_state: dict[str, Any]) -> None:
        """Commit the snapshot of `step` (= steps completed) to the slot not holding the newest one.
        SnapshotError when the slot cannot be allocated (shared memory full): nothing was written."""
        import torch  # lazy: torch; `import burnin.rank` stays torch-free

        from burnin.rank.sharding import is_sharded, to_local_state  # lazy: torch; `import burnin.rank` stays torch-free

        # of a sharded model, this rank's shards (the load places them again: Session._load)
        local = is_sharded(model)
        msd, osd = model.state_dict(), optimizer.state_dict()
        if local:
            msd, osd = to_local_state(msd), to_local_state(osd)
        tensors, sig, skeleton = _structure(msd, osd["state"])
        if self._plan is None or self._plan[0] != sig:  # the layout is worked out once, then reused
            self._plan = (sig, _Plan(tensors, skeleton(), _plain_metadata(msd), self.rank, self.world_size, local))
        plan = self._plan[1]
        meta = pickle.dumps({"step": step, "rank": self.rank, "world_size": self.world_size,
                             "static": plan.static, "param_groups": osd["param_groups"],
                             "rank_state": _inline(rank_state)}, protocol=pickle.HIGHEST_PROTOCOL)
        k = self._target()
        end = HEADER_SIZE + plan.shard_len + len(meta)
        mm = self._map(k, end, plan.views)
        mm[:HEADER_SIZE] = encode_header(WRITING, step)
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
        mm[:HEADER_SIZE] = encode_header(COMMITTED, step, plan.shard_len, len(meta), crc)
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
