"""Sharded state: burnin's model split with FSDP2 over a device mesh, and a rank's shards of any sharded
model (FSDP2, HSDP, a model with DTensor parameters) as plain tensors and back.

A sharded rank holds only its shards: its checkpoint part, its memory snapshot and its fingerprint are of
the local tensors (`DTensor.to_local()`), and a load wraps the saved local tensors again in DTensors with
the placements of the live model's own (so a resume onto the same mesh puts back the same bits). The
state of the whole model is the state of every rank's shards: `global_digest` hashes each rank's digest
in rank order (collective), so every rank reports the same hash, as replicas do under DDP.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from burnin.scenarios.schema import Parallel

__all__ = ["is_sharded", "shard_model", "local", "to_local_state", "from_local_state", "global_digest",
           "replica_groups"]


def is_sharded(model: Any) -> bool:
    """Whether any parameter of `model` is a DTensor (FSDP2, HSDP, tensor parallel)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: Any) -> Any:
    """A DTensor's local shard (detached); anything else as it is."""
    return t.to_local().detach() if isinstance(t, DTensor) else t


def shard_model(model: Any, parallel: dict[str, Any], world_size: int, device_type: str) -> Any:
    """Shard burnin's GPT with FSDP2: each block, then the root (embeddings, final norm, the tied head),
    over a (dp_replicate, dp_shard) mesh (1-D when there is no replica). Returns the mesh."""
    from torch.distributed.device_mesh import init_device_mesh  # lazy: torch, the mesh's own imports
    from torch.distributed.fsdp import fully_shard  # lazy: torch, FSDP2

    rep, shard = Parallel.model_validate(parallel).mesh(world_size)
    if rep > 1:
        mesh = init_device_mesh(device_type, (rep, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    else:
        mesh = init_device_mesh(device_type, (shard,), mesh_dim_names=("dp_shard",))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return mesh


def to_local_state(obj: Any) -> Any:
    """`obj` (a state dict, nested) with every DTensor replaced by its local shard."""
    if isinstance(obj, DTensor):
        return obj.to_local().detach()
    if isinstance(obj, dict):
        return {k: to_local_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_local_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_local_state(v) for v in obj)
    return obj


def _like(saved: Any, template: Any, device: Any) -> Any:
    """`saved` (a local shard) as a DTensor placed as `template` is; a plain tensor stays plain."""
    if isinstance(template, DTensor) and isinstance(saved, torch.Tensor) and not isinstance(saved, DTensor):
        return DTensor.from_local(saved.to(device), template.device_mesh, template.placements, run_check=False,
                                  shape=template.shape, stride=template.stride())
    return saved


def from_local_state(model: Any, optimizer: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The model and optimizer state dicts of `state` (as `to_local_state` made them) with each local shard
    wrapped again in a DTensor placed like the live model's (the mesh must be the one it was saved on)."""
    device = next(iter(model.parameters())).device
    live = model.state_dict()
    out: dict[str, Any] = {}
    if "model" in state:
        out["model"] = {k: _like(v, live.get(k), device) for k, v in state["model"].items()}
    if "optimizer" in state:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        osd = state["optimizer"]
        out["optimizer"] = {
            **osd,
            "state": {pid: {k: (_like(v, params[pid], device) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                            for k, v in entry.items()}
                      for pid, entry in osd["state"].items()},
        }
    return out


def global_digest(local_hex: str) -> str:
    """SHA-256 over every rank's `local_hex`, in rank order: the same on every rank. Collective."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local_hex)
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def replica_groups(model: Any, world_size: int) -> list[list[int]]:
    """The ranks that must hold the same state, as groups: every rank under DDP; of a sharded model, the
    ranks that differ only along the mesh's dimensions where the parameters are replicated (HSDP's
    replicas of one shard). A group of one has no replica to compare with."""
    from torch.distributed.tensor import Shard  # lazy: torch, DTensor placements

    param = next((p for p in model.parameters() if isinstance(p, DTensor)), None)
    if param is None:
        return [list(range(world_size))]
    mesh = param.device_mesh.mesh  # the ranks, laid out on the mesh
    sharded = [d for d, pl in enumerate(param.placements) if isinstance(pl, Shard)]
    replicated = [d for d in range(mesh.dim()) if d not in sharded]
    # one row per shard: the ranks along the replicated dimensions
    rows = mesh.permute(*sharded, *replicated).reshape(math.prod(mesh.shape[d] for d in sharded), -1)
    return sorted(sorted(row) for row in rows.tolist())


# -- DCP checkpoints ------------------------------------------------------------------------------

def dcp_save(model: Any, optimizer: Any, path: Any, *, group: Any = None, crash_after: float | None = None) -> Any:
    """Write the model's and optimizer's sharded state to `path` with torch.distributed.checkpoint: each
    rank its shards (`__R_0.distcp`), the coordinator `.metadata`. Collective. With `group` (a process
    group of its own: the write's collectives must not interleave with training's), asynchronously: the
    state is staged (copied) before this returns, the files are written by a thread, and the returned
    future completes when they are. With `crash_after` (storage.save_crash), this process is SIGKILLed
    once that fraction of its first shard file is written: a real kill in the middle of a real write."""
    import torch.distributed.checkpoint as dcp  # lazy: torch, DCP
    from torch.distributed.checkpoint.state_dict import get_state_dict  # lazy: torch, DCP

    msd, osd = get_state_dict(model, optimizer)
    writer = dcp.FileSystemWriter(str(path))
    if crash_after is not None:
        writer.fs = _dying_fs(writer.fs, crash_after)
    if group is None:
        dcp.save({"model": msd, "optim": osd}, storage_writer=writer)
        return None
    return dcp.async_save({"model": msd, "optim": osd}, storage_writer=writer, process_group=group)


def _dying_fs(fs: Any, fraction: float) -> Any:
    """A DCP file system whose shard stream SIGKILLs the process partway (`fraction`) through the first
    piece of a shard file it is given to write."""
    class _Stream:
        def __init__(self, raw: Any):
            self.raw, self.written = raw, 0

        def write(self, data: Any) -> int:
            buf = memoryview(data).cast("B")
            # DCP writes a shard in pieces of unknown total: die within the first piece's bytes
            cut = max(1, int(len(buf) * fraction))
            self.raw.write(buf[:cut])
            self.raw.flush()
            os.fsync(self.raw.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
            return cut

        def __getattr__(self, name: str) -> Any:
            return getattr(self.raw, name)

    class _DyingFS(type(fs)):  # type: ignore[misc]
        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str) -> Any:
            with super().create_stream(path, mode) as raw:
                yield _Stream(raw) if str(path).endswith(".distcp") else raw

    out = _DyingFS.__new__(_DyingFS)
    out.__dict__.update(fs.__dict__)
    return out


def dcp_load(model: Any, optimizer: Any, path: Any) -> None:
    """Read a DCP checkpoint into the live model and optimizer (resharded by DCP when the mesh differs).
    Collective. The optimizer's state is created first where it is not yet (a fresh process) by a step
    with zero gradients at learning rate 0, which moves no parameter."""
    import torch.distributed.checkpoint as dcp  # lazy: torch, DCP
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # lazy: torch, DCP

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
