"""Checkpoints: written atomically, committed by a manifest of SHA-256 sums, verified on load.

Layout of one checkpoint (``step`` = steps completed = the step to resume at)::

    checkpoints/step_00000010/
        model.pt        model and optimizer state (rank 0 writes it; replicas are identical)
        rank0.pt ...    each rank's own state: every RNG (torch, CUDA, numpy, python)
        manifest.json   written last: {"step", "world_size", "files": {name: {"sha256", "bytes"}}}

A checkpoint without a manifest is incomplete and never loaded. Loading checks every file against
the manifest and falls back to the previous checkpoint, saying why, when one does not match.
Listing and verifying need no torch (the supervisor and the storage faults use them).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from burnin.errors import CheckpointError

__all__ = ["MODEL_FILE", "MANIFEST", "Checkpoint", "rank_file", "committed", "verify", "newest_valid",
           "save", "load", "load_rank", "model_file", "atomic_write"]

MODEL_FILE = "model.pt"
MANIFEST = "manifest.json"
_PREFIX = "step_"


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def _dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


def _all(root: str | Path) -> list[Checkpoint]:
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
    return [c for c in _all(root) if (c.path / MANIFEST).is_file()]


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, rename over it, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


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
    needed = [] if manifest.get("writer") == "loop" else [MODEL_FILE]
    unlisted = [n for n in [*needed, *map(rank_file, range(ranks if isinstance(ranks, int) else 0))]
                if n not in files]
    if unlisted:  # a file the manifest does not cover would be loaded unchecked
        raise CheckpointError(f"the manifest does not list {', '.join(unlisted)}")
    for name, want in files.items():
        path = ckpt.path / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        digest, size = _sha256_file(path)
        if size != want["bytes"]:
            raise CheckpointError(f"{name} is {size} bytes, the manifest says {want['bytes']} (truncated)")
        if digest != want["sha256"]:
            raise CheckpointError(f"{name} fails its SHA-256 check (corrupted)")
    return manifest


def newest_valid(root: str | Path, world_size: int,
                 on_reject: Callable[[Checkpoint, str], None] | None = None,
                 above: int | None = None) -> Checkpoint | None:
    """The newest checkpoint that verifies; each one skipped on the way is reported to `on_reject`.
    With `above`, only checkpoints of a later step are looked at (a newer state is at hand)."""
    for ckpt in reversed(committed(root)):
        if above is not None and ckpt.step <= above:
            break
        try:
            verify(ckpt, world_size)
            return ckpt
        except CheckpointError as exc:
            if on_reject:
                on_reject(ckpt, str(exc))
    return None


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save(root: str | Path, step: int, rank: int, world_size: int, rank_state: dict[str, Any],
         model_state: dict[str, Any] | None, keep: int,
         writer: Callable[[Path], None] | None = None) -> Checkpoint | None:
    """Write this rank's part of checkpoint `step`; rank 0 also writes the model and commits.

    With `writer` (a training loop's own checkpoint writer), every rank calls it with the checkpoint's
    directory instead, and the manifest covers whatever files it wrote there (model.pt is then not
    required). Collective: every rank of the default process group must call it at the same step.
    Returns the committed checkpoint on rank 0, None elsewhere.
    """
    import torch.distributed as dist

    path = _dir(Path(root), step)
    path.mkdir(parents=True, exist_ok=True)
    mine: dict[str, dict[str, Any]] = {}
    parts = [(rank_file(rank), rank_state)]
    if rank == 0 and writer is None:
        parts.append((MODEL_FILE, model_state))
    for name, obj in parts:
        data = _torch_bytes(obj)
        atomic_write(path / name, data)
        mine[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if writer is not None:
        writer(path)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)  # (also: every rank's writer has returned)
    if rank == 0:
        files = {name: meta for part in gathered for name, meta in part.items()}
        if writer is not None:  # the loop's own files: whatever its writer left in the directory
            for p in sorted(path.rglob("*")):
                name = str(p.relative_to(path))
                if p.is_file() and name not in files and name != MANIFEST and not p.name.startswith("."):
                    digest, size = _sha256_file(p)
                    files[name] = {"sha256": digest, "bytes": size}
        manifest = {"step": step, "world_size": world_size, "files": dict(sorted(files.items())),
                    "writer": "loop" if writer is not None else "burnin"}
        atomic_write(path / MANIFEST, json.dumps(manifest, indent=1).encode())
        _prune(Path(root), keep)
    # No rank goes on before the checkpoint is committed: whatever happens next on any rank (an
    # out-of-rank fault damaging "the newest checkpoint", a kill) sees the same newest checkpoint.
    dist.barrier()
    return Checkpoint(step, path) if rank == 0 else None


def _prune(root: Path, keep: int) -> None:
    done = committed(root)
    for old in done[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    newest = done[-1].step if done else -1
    for ckpt in _all(root):  # incomplete ones left by a crash mid-save
        if ckpt.step < newest and not (ckpt.path / MANIFEST).is_file():
            shutil.rmtree(ckpt.path, ignore_errors=True)


def load(ckpt: Checkpoint, rank: int, device: Any = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_state, rank_state) of a verified checkpoint, loaded with weights_only=True."""
    import torch

    try:
        model_state = torch.load(ckpt.path / MODEL_FILE, map_location=device, weights_only=True)
        rank_state = torch.load(ckpt.path / rank_file(rank), map_location="cpu", weights_only=True)
    except Exception as exc:  # verified files that still fail to unpickle: treat as corrupt
        raise CheckpointError(f"{ckpt.path.name} does not load: {exc}") from None
    return model_state, rank_state


def load_rank(ckpt: Checkpoint, rank: int) -> dict[str, Any]:
    """A verified checkpoint's rank state alone (the loop reads its own files)."""
    import torch

    try:
        return torch.load(ckpt.path / rank_file(rank), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{ckpt.path.name} does not load: {exc}") from None


def model_file(ckpt_path: Path) -> str:
    """The checkpoint's model file: model.pt, or (written by a loop's own writer) its largest file."""
    try:
        manifest = json.loads((ckpt_path / MANIFEST).read_text())
    except (OSError, ValueError):
        return MODEL_FILE
    if manifest.get("writer") != "loop":
        return MODEL_FILE
    ranks = {rank_file(r) for r in range(int(manifest.get("world_size") or 0))}
    theirs = [(meta["bytes"], name) for name, meta in manifest["files"].items() if name not in ranks]
    return max(theirs)[1] if theirs else MODEL_FILE
