"""Storage faults: damage to checkpoints on disk and to memory snapshots, which the loader must catch by checksum."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from burnin.core import checkpoints as checkpoint
from burnin.core import snapshots as snapshot
from burnin.errors import HarnessError
from burnin.faults.base import Fault

__all__ = ["CheckpointCorrupt", "SaveCrash", "SnapshotCorrupt"]


class CheckpointCorruptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["flip", "truncate", "delete"] = Field(
        "flip", description="flip bytes, cut the file short, or delete it (a lost shard of a DCP checkpoint)")
    file: Literal["model", "rank"] = Field(
        "model", description="the model/optimizer file (of a DCP checkpoint: its largest shard, `.metadata` "
                             "left intact) or the target rank's own file")
    nbytes: int = Field(8, ge=1, le=1 << 20, description="how many bytes to flip (mode: flip)")
    keep_fraction: float = Field(0.5, ge=0, lt=1, description="fraction of the file kept (mode: truncate)")
    seed: int = Field(0, ge=0, description="chooses which bytes are flipped")


class CheckpointCorrupt(Fault):
    """Flip bytes in, or truncate, a file of the newest committed checkpoint."""

    name = "storage.checkpoint_corrupt"
    summary = "flip bytes in, or truncate, the newest checkpoint (the loader must fall back)"
    where = "out_of_rank"
    Params = CheckpointCorruptParams
    disruptive = False  # harmless until a restart loads the damaged checkpoint

    def inject(self, ctx: Any) -> dict[str, Any]:

        newest = checkpoint.committed(ctx.checkpoint_dir)
        if not newest:  # validation refuses a step before the first checkpoint: this is a harness error
            raise HarnessError(f"no committed checkpoint in {ctx.checkpoint_dir} to damage at step {ctx.step}")
        ckpt = newest[-1]
        p = self.params
        target: Path = ckpt.path / (checkpoint.model_file(ckpt.path) if p.file == "model" else checkpoint.rank_file(ctx.rank))
        size = target.stat().st_size
        out = {"checkpoint_step": ckpt.step, "file": target.name, "mode": p.mode}
        if p.mode == "delete":
            target.unlink()
            return {**out, "size": size}
        if p.mode == "truncate":
            return {**out, "size": size, "kept": _damage(target, size, p)}
        return {**out, "offsets": _damage(target, size, p)}


class SaveCrashParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phase: Literal["write", "commit"] = Field(
        "write", description="write: killed partway through writing its files (a DCP shard, or its own file); "
                             "commit: killed once every file is written, before the checkpoint is committed")
    fraction: float = Field(0.5, gt=0, lt=1, description="how far into the file the kill comes (phase: write)")


class SaveCrash(Fault):
    """SIGKILL the rank in the middle of its next checkpoint save: the checkpoint is never committed, and
    a restart must refuse it and load the one before. With `checkpoint.async_save`, the kill comes from
    the thread writing the shards while training goes on (a kill during an asynchronous save)."""

    name = "storage.save_crash"
    summary = "kill a rank in the middle of its next checkpoint save (a save that never commits)"
    where = "in_rank"
    points = ("between_steps", "before_forward", "after_optimizer_step")
    Params = SaveCrashParams
    effects = ("killed",)
    changes_state = False

    def inject(self, ctx: Any) -> dict[str, Any]:
        checkpoint.arm_crash(self.params.phase, self.params.fraction)
        return {"armed": self.params.phase, "fraction": self.params.fraction}


class SnapshotCorruptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["flip", "truncate"] = Field("flip", description="flip bytes, or cut the slot short")
    slots: Literal["newest", "both"] = Field(
        "newest", description="the target rank's newest snapshot slot (the resume falls back to its other "
                              "slot, one step older), or both (the resume falls back to the disk checkpoints)")
    nbytes: int = Field(8, ge=1, le=1 << 20, description="how many bytes to flip per slot (mode: flip)")
    keep_fraction: float = Field(0.5, ge=0, lt=1, description="fraction of the slot kept (mode: truncate)")
    seed: int = Field(0, ge=0, description="chooses which bytes are flipped")


def _snapshot_dir(ctx: Any) -> Path | None:
    """The run's memory snapshot directory: the context's, else the one the ranks were given."""
    where = getattr(ctx, "snapshot_dir", None)
    if where:
        return Path(where)
    try:
        spec = json.loads((Path(ctx.run_dir) / "ranks" / "spec.json").read_text())
    except (OSError, ValueError):
        return None
    return Path(spec["snapshot_dir"]) if spec.get("snapshot_dir") else None


class SnapshotCorrupt(Fault):
    """Flip bytes in, or truncate, the target rank's newest memory snapshot (or both of its slots)."""

    name = "storage.snapshot_corrupt"
    summary = "flip bytes in, or truncate, a rank's newest memory snapshot (the resume must fall back)"
    where = "out_of_rank"
    Params = SnapshotCorruptParams
    disruptive = False  # harmless until a restart reads the damaged snapshot
    effects = ()

    def inject(self, ctx: Any) -> dict[str, Any]:

        root = _snapshot_dir(ctx)
        slots = snapshot.newest_slot(root, ctx.rank) if root is not None else []
        if not slots:  # validation refuses a step before the first snapshot: this is a harness error
            where = f"in {root}" if root is not None else "(the run keeps no memory snapshots)"
            raise HarnessError(f"no memory snapshot of rank {ctx.rank} {where} to damage at step {ctx.step}")
        p = self.params
        damaged = slots if p.slots == "both" else slots[:1]
        out: dict[str, Any] = {"snapshot_step": damaged[0][0], "snapshot_steps": [s for s, _, _ in damaged],
                               "files": [path.name for _, path, _ in damaged], "rank": ctx.rank, "mode": p.mode}
        for _, path, used in damaged:
            # within the bytes the slot's checksums cover (the file has spare room after them)
            out.setdefault("kept" if p.mode == "truncate" else "offsets", []).append(_damage(path, used, p))
        return out


def _damage(path: Path, size: int, p: Any) -> Any:
    """Truncate `path` to `keep_fraction` of `size` (returns the bytes kept), or flip `nbytes` bytes drawn
    from its first `size` by `seed` (returns the first 16 offsets); flushed to the device."""
    if p.mode == "truncate":
        keep = int(size * p.keep_fraction)
        os.truncate(path, keep)
        return keep
    offsets = sorted(random.Random(p.seed).sample(range(size), min(p.nbytes, size)))
    with open(path, "r+b") as fh:
        for off in offsets:
            fh.seek(off)
            b = fh.read(1)[0]
            fh.seek(off)
            fh.write(bytes([b ^ 0xFF]))
        fh.flush()
        os.fsync(fh.fileno())
    return offsets[:16]


#: The faults this module adds to the built-in catalogue (`burnin.faults.registry` registers them).
FAULTS = (CheckpointCorrupt, SaveCrash, SnapshotCorrupt)
