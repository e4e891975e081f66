"""Training state: what a checkpoint must hold for a resume to be bit-exact, and its fingerprint.

Measured: leaving out any RNG state (torch above all, since dropout draws from it) makes the
resumed run diverge from the uninterrupted one. Data needs no state: a batch is a pure function
of (seed, step, rank).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Iterable

import numpy as np
import torch

from burnin.rank.sharding import global_digest, is_sharded, local

__all__ = ["capture_rank_state", "restore_rank_state", "state_items", "state_hash", "state_norms", "state_digests",
           "loss_bits"]


def capture_rank_state(step: int) -> dict[str, Any]:
    """Every RNG of this process, in types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python_rng": list(_flatten_py_state(random.getstate())),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rank_state(state: dict[str, Any], skip: Iterable[str] = ()) -> None:
    """Put back every RNG; names in `skip` are left alone (used to show the verdict can say no)."""
    skip = set(skip)
    if "torch_rng" not in skip:
        torch.set_rng_state(state["torch_rng"])
    if "numpy_rng" not in skip:
        name, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "python_rng" not in skip:
        version, *rest = state["python_rng"]
        random.setstate((int(version), tuple(int(x) for x in rest[:-1]), rest[-1]))
    if "cuda_rng" in state and "torch_rng" not in skip and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _flatten_py_state(st: tuple) -> Iterable[Any]:
    version, internal, gauss = st
    yield version
    yield from internal
    yield gauss


def state_items(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                part: tuple[set[str], set[int]] | None = None, *, whole: bool = False) -> Iterable[tuple[str, Any]]:
    """(name, value) of every parameter, buffer and optimizer state entry, in a fixed order; of a sharded
    model (DTensor parameters), this rank's shards (the DTensors themselves with `whole`). With `part`
    (state dict keys, optimizer parameter ids), only those."""
    view = (lambda t: t) if whole else local
    for name, t in model.state_dict().items():
        if part is None or name in part[0]:
            yield f"model.{name}", view(t)
    if optimizer is not None:
        osd = optimizer.state_dict()
        for pid in sorted(osd["state"]):
            if part is not None and pid not in part[1]:
                continue
            for key in sorted(osd["state"][pid]):
                yield f"optim.{pid}.{key}", view(osd["state"][pid][key])


def state_hash(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
               local_only: bool = False, part: tuple[set[str], set[int]] | None = None) -> str:
    """SHA-256 of every parameter, buffer and optimizer tensor: names, dtypes, shapes and bits. Of a sharded
    model, the hash of every rank's shards in rank order, the same on every rank (collective then), or
    with `local_only` of this rank's shards alone (of `part` alone when given: see `_state`)."""
    h = hashlib.sha256()
    for name, value in state_items(model, optimizer, part):
        _update(h, name, value)
    if not local_only and is_sharded(model):
        return global_digest(h.hexdigest())
    return h.hexdigest()


def state_norms(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """The L2 norm (float64) of every floating-point parameter, buffer and optimizer tensor, by name: what
    a tolerance comparison of two final states looks at when their bits cannot agree. Of a sharded model,
    the norm of each whole tensor, the same on every rank whatever the mesh (collective then: DTensor
    reduces over the shards and counts a replicated tensor once), so runs on different world sizes
    compare."""
    from torch.distributed.tensor import DTensor  # lazy: torch, DTensor

    norms: dict[str, float] = {}

    def add(name: str, t: Any) -> None:
        if isinstance(t, DTensor):
            norm = torch.linalg.vector_norm(t.detach().to(torch.float64))
            norms[name] = float(norm.full_tensor())
        elif isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            norms[name] = float(torch.linalg.vector_norm(t.detach().to("cpu", torch.float64)))

    for name, t in state_items(model, optimizer, whole=True):
        add(name, t)
    return norms


def state_digests(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, str]:
    """A short digest of each tensor of the state and of each RNG, by name (`burnin check-determinism`)."""
    out: dict[str, str] = {}

    def add(name: str, value: Any) -> None:
        h = hashlib.sha256()
        _update(h, name, value)
        out[name] = h.hexdigest()[:12]

    for name, t in state_items(model, optimizer):
        add(name, t)
    rng = capture_rank_state(0)
    add("rng.torch", rng["torch_rng"])
    add("rng.numpy", rng["numpy_rng"][1])
    add("rng.python", repr(rng["python_rng"]))
    if "cuda_rng" in rng:
        add("rng.cuda", repr([t.tolist() for t in rng["cuda_rng"]]))
    return out


def _update(h: "hashlib._Hash", name: str, value: Any) -> None:
    h.update(name.encode())
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(value).encode())


def loss_bits(loss: torch.Tensor) -> str:
    """The loss's exact bits as hex, so two runs compare bit for bit, not to a tolerance."""
    t = loss.detach().to("cpu", torch.float32).reshape(1)
    return t.view(torch.int32).item().to_bytes(4, "big", signed=True).hex()
