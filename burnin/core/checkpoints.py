"""The layout of a checkpoint directory and its manifest: listing and verifying, with no torch.

Layout of one checkpoint (``step`` = steps completed = the step to resume at)::

    checkpoints/step_00000010/
        model.pt        model and optimizer state (rank 0 writes it; replicas are identical)
        rank0.pt ...    each rank's own state: every RNG (torch, CUDA, numpy, python)
        manifest.json   written last: {"step", "world_size", "files": {name: {"sha256", "bytes"}}}

A checkpoint without a manifest is incomplete and never loaded. Loading checks every file against
the manifest and falls back to the previous checkpoint, saying why, when one does not match. The
supervisor, the burn-in's verification windows and the storage faults list and verify checkpoints
here; the ranks write and load them with `burnin.rank.checkpoint`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from burnin.core.files import sha256_file
from burnin.errors import CheckpointError

__all__ = ["MODEL_FILE", "DCP_METADATA", "MANIFEST", "Checkpoint", "rank_file", "step_dir", "listed", "committed", "verify",
           "newest_valid", "model_file", "CheckpointError", "arm_crash", "crash_armed"]

MODEL_FILE = "model.pt"
#: A DCP checkpoint's index of its shards (torch.distributed.checkpoint), written beside `__R_0.distcp`.
DCP_METADATA = ".metadata"
MANIFEST = "manifest.json"
_PREFIX = "step_"


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def step_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


def listed(root: str | Path) -> list[Checkpoint]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit():
            found.append(Checkpoint(int(p.name[len(_PREFIX):]), p))
    return sorted(found, key=lambda c: c.step)


def committed(root: str | Path) -> list[Checkpoint]:
    """Checkpoints whose manifest was written, oldest first (not yet verified)."""
    return [c for c in listed(root) if (c.path / MANIFEST).is_file()]


def verify(ckpt: Checkpoint, world_size: int | None = None) -> dict[str, Any]:
    """The manifest of a checkpoint whose every file matches it; CheckpointError saying why not."""
    try:
        manifest = json.loads((ckpt.path / MANIFEST).read_text())
        # Damaged but still valid JSON must be rejected here too, not crash the fallback loop.
        files = {str(name): {"sha256": str(want["sha256"]), "bytes": int(want["bytes"])}
                 for name, want in manifest["files"].items()}
        if manifest["step"] != ckpt.step:
            raise CheckpointError(f"manifest says step {manifest['step']}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"unreadable manifest: {exc!r}") from None
    if world_size is not None and manifest.get("world_size") != world_size:
        raise CheckpointError(f"written by {manifest.get('world_size')} ranks, this run has {world_size}")
    ranks = manifest.get("world_size")
    needed = {"loop": [], "dcp": [DCP_METADATA]}.get(manifest.get("writer"), [MODEL_FILE])
    unlisted = [n for n in [*needed, *map(rank_file, range(ranks if isinstance(ranks, int) else 0))]
                if n not in files]
    if unlisted:  # a file the manifest does not cover would be loaded unchecked
        raise CheckpointError(f"the manifest does not list {', '.join(unlisted)}")
    for name, want in files.items():
        path = ckpt.path / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        digest, size = sha256_file(path)
        if size != want["bytes"]:
            raise CheckpointError(f"{name} is {size} bytes, the manifest says {want['bytes']} (truncated)")
        if digest != want["sha256"]:
            raise CheckpointError(f"{name} fails its SHA-256 check (corrupted)")
    return manifest


def newest_valid(root: str | Path, world_size: int | None,
                 on_reject: Callable[[Checkpoint, str], None] | None = None,
                 above: int | None = None, foreign: tuple[int, int] | None = None) -> Checkpoint | None:
    """The newest checkpoint that verifies (written by `world_size` ranks, when given); each one skipped on
    the way is reported to `on_reject`. With `above`, only checkpoints of a later step are looked at (a newer
    state is at hand). `foreign` (step, ranks): another run's checkpoint this run started from, written by
    that many ranks (`burnin run --resume-from`)."""
    for ckpt in reversed(listed(root)):
        if above is not None and ckpt.step <= above:
            break
        if not (ckpt.path / MANIFEST).is_file():  # a save that never committed (its rank died mid-save)
            if on_reject:
                on_reject(ckpt, "not committed: no manifest (a save that did not finish)")
            continue
        try:
            verify(ckpt, foreign[1] if foreign is not None and ckpt.step == foreign[0] else world_size)
            return ckpt
        except CheckpointError as exc:
            if on_reject:
                on_reject(ckpt, str(exc))
    return None


def model_file(ckpt_path: Path) -> str:
    """The checkpoint's model file: model.pt, or (written by a loop's own writer) its largest file."""
    try:
        manifest = json.loads((ckpt_path / MANIFEST).read_text())
    except (OSError, ValueError):
        return MODEL_FILE
    if manifest.get("writer") not in ("loop", "dcp"):
        return MODEL_FILE
    ranks = {rank_file(r) for r in range(int(manifest.get("world_size") or 0))}
    theirs = [(meta["bytes"], name) for name, meta in manifest["files"].items()
              if name not in ranks and name != DCP_METADATA]
    return max(theirs)[1] if theirs else MODEL_FILE


#: A crash armed by `storage.save_crash` in this rank process for its next save: (phase, fraction of the
#: write done). The save path (burnin.rank.checkpoint, burnin.rank.sharding) consults it.
_crash: tuple[str, float] | None = None


def arm_crash(phase: str, fraction: float) -> None:
    """SIGKILL this process in its next checkpoint save: "write" part of the way through writing its
    files, "commit" once they are all written, before the checkpoint is committed (storage.save_crash)."""
    global _crash
    _crash = (phase, fraction)


def crash_armed(phase: str) -> float | None:
    """The fraction of the write after which to die, where a crash is armed for `phase` (and disarm it)."""
    global _crash
    if _crash is None or _crash[0] != phase:
        return None
    fraction, _crash = _crash[1], None
    return fraction
