"""Checkpoints, the rank's side: each rank writes its part atomically, rank 0 commits the manifest of
SHA-256 sums last, and a load reads only what verified.

The layout of a checkpoint directory, listing and verifying (no torch) are in `burnin.core.checkpoints`;
they are imported here too, so a training loop needs this module alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

from burnin.core.checkpoints import (DCP_METADATA, MANIFEST, MODEL_FILE, Checkpoint, arm_crash, committed, crash_armed,
                                     listed, model_file, newest_valid, rank_file, step_dir, verify)
from burnin.core.files import atomic_write, sha256_file
from burnin.errors import CheckpointError

__all__ = ["MODEL_FILE", "MANIFEST", "Checkpoint", "rank_file", "committed", "verify", "newest_valid",
           "save", "write_part", "commit", "arm_crash", "load", "load_rank", "model_file", "atomic_write"]


def _torch_bytes(obj: Any) -> bytes:
    import torch  # lazy: torch; `import burnin.rank` stays torch-free

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def die_mid_write(path: Path, data: bytes, fraction: float) -> None:
    """What a process killed while writing `path` leaves: the first `fraction` of it on disk. Then the kill."""
    with open(path, "wb") as fh:
        fh.write(data[:int(len(data) * fraction)])
        fh.flush()
        os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def save(root: str | Path, step: int, rank: int, world_size: int, rank_state: dict[str, Any],
         model_state: dict[str, Any] | None, keep: int,
         writer: Callable[[Path], None] | None = None, writer_kind: str = "loop") -> Checkpoint | None:
    """Write this rank's part of checkpoint `step`; rank 0 also writes the model and commits.

    With `writer` (a training loop's own checkpoint writer), every rank calls it with the checkpoint's
    directory instead, and the manifest covers whatever files it wrote there (model.pt is then not
    required; `writer_kind` "dcp": burnin's own DCP writer of a sharded model, whose `.metadata` the
    manifest covers too). Collective: every rank of the default process group must call it at the same step.
    Returns the committed checkpoint on rank 0, None elsewhere.
    """
    path = step_dir(Path(root), step)
    mine = write_part(path, rank, rank_state, model_state if writer is None else None,
                      crash_mid_write=writer_kind != "dcp")
    if writer is not None:
        writer(path)
    return commit(root, step, rank, world_size, mine, keep, writer=writer is not None, writer_kind=writer_kind)


def write_part(path: Path, rank: int, rank_state: dict[str, Any], model_state: dict[str, Any] | None,
               crash_mid_write: bool = True) -> dict[str, dict[str, Any]]:
    """This rank's own files of a checkpoint (its RNG state; rank 0's model file where burnin writes it),
    each atomically; their digests for the manifest."""
    path.mkdir(parents=True, exist_ok=True)
    mine: dict[str, dict[str, Any]] = {}
    parts = [(rank_file(rank), rank_state)]
    if rank == 0 and model_state is not None:
        parts.append((MODEL_FILE, model_state))
    fraction = crash_armed("write") if crash_mid_write else None
    for name, obj in parts:
        data = _torch_bytes(obj)
        if fraction is not None:  # storage.save_crash: killed while writing (the temporary file of atomic_write)
            die_mid_write(path / f".{name}.tmp", data, fraction)
        atomic_write(path / name, data)
        mine[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return mine


def commit(root: str | Path, step: int, rank: int, world_size: int, mine: dict[str, dict[str, Any]], keep: int,
           writer: bool = False, writer_kind: str = "loop") -> Checkpoint | None:
    """Commit checkpoint `step` once every rank's files are written: rank 0 writes the manifest of every
    file's SHA-256 (the ranks' digests, and those of a writer's files read back), then prunes to `keep`
    (never before the new one is committed). Collective."""
    import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

    if crash_armed("commit") is not None:  # storage.save_crash: everything written, nothing committed
        os.kill(os.getpid(), signal.SIGKILL)
    path = step_dir(Path(root), step)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)  # (also: every rank's writer has returned)
    if rank == 0:
        files = {name: meta for part in gathered for name, meta in part.items()}
        if writer:  # the loop's own files: whatever its writer left in the directory
            for p in sorted(path.rglob("*")):
                name = str(p.relative_to(path))
                if p.is_file() and name not in files and name != MANIFEST and (
                        not p.name.startswith(".") or (writer_kind == "dcp" and name == DCP_METADATA)):
                    digest, size = sha256_file(p)
                    files[name] = {"sha256": digest, "bytes": size}
        manifest = {"step": step, "world_size": world_size, "files": dict(sorted(files.items())),
                    "writer": writer_kind if writer else "burnin"}
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
    for ckpt in listed(root):  # incomplete ones left by a crash mid-save
        if ckpt.step < newest and not (ckpt.path / MANIFEST).is_file():
            shutil.rmtree(ckpt.path, ignore_errors=True)


def load(ckpt: Checkpoint, rank: int, device: Any = "cpu", *,
         with_rank: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(model_state, rank_state) of a verified checkpoint, loaded with weights_only=True (rank_state None
    without `with_rank`: another run's checkpoint whose rank files are not this rank's)."""
    import torch  # lazy: torch; `import burnin.rank` stays torch-free

    try:
        model_state = torch.load(ckpt.path / MODEL_FILE, map_location=device, weights_only=True)
        rank_state = (torch.load(ckpt.path / rank_file(rank), map_location="cpu", weights_only=True)
                      if with_rank else None)
    except Exception as exc:  # verified files that still fail to unpickle: treat as corrupt
        raise CheckpointError(f"{ckpt.path.name} does not load: {exc}") from None
    return model_state, rank_state


def load_rank(ckpt: Checkpoint, rank: int) -> dict[str, Any]:
    """A verified checkpoint's rank state alone (the loop reads its own files)."""
    import torch  # lazy: torch; `import burnin.rank` stays torch-free

    try:
        return torch.load(ckpt.path / rank_file(rank), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{ckpt.path.name} does not load: {exc}") from None


