"""Detectors: checks run inside each rank at named step points, looking for silent corruption.

Each has a name, the point it runs at, and a cost. Local detectors look at one rank's numbers
(loss, gradient norm); the fingerprint detector is collective: every K steps the ranks all-gather a
hash of their parameters, and on a mismatch a majority vote names the odd rank. Step
recomputation lives in the worker, since it re-runs the step itself.

A finding is only a suspicion: the worker shares it with the other ranks, and the recovery
policy (roll back in process, or restart from a checkpoint) decides what happens.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["Finding", "Detector", "NonFinite", "LossSpike", "GradNormSpike", "Fingerprint", "Checksum", "GatherHash",
           "build_detectors", "DETECTORS"]


@dataclass
class Finding:
    detector: str
    step: int
    details: dict[str, Any] = field(default_factory=dict)
    odd_ranks: list[int] | None = None   # the ranks a collective detector pinned it on


class Detector:
    name: ClassVar[str]
    point: ClassVar[str]
    cost: ClassVar[str]
    collective: ClassVar[bool] = False

    def __init__(self, **cfg: Any):
        self.cfg = cfg

    def check(self, step: int, **ctx: Any) -> Finding | None:
        raise NotImplementedError

    def snapshot(self) -> Any:
        """Detector state to put back on a rollback (running statistics must not learn from bad steps)."""
        return None

    def restore(self, state: Any) -> None:
        pass


class NonFinite(Detector):
    """NaN or Inf in the loss or the gradient norm."""

    name, point, cost = "nonfinite", "after_allreduce", "two scalar checks per step"

    def check(self, step: int, loss: float = 0.0, grad_norm: float = 0.0, **ctx: Any) -> Finding | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Finding(self.name, step, {"loss": repr(loss), "grad_norm": repr(grad_norm)})
        return None


class _RobustSpike(Detector):
    """A value far from the running median, in units of the median absolute deviation."""

    key: ClassVar[str]

    def __init__(self, window: int = 20, z: float = 8.0, warmup: int = 8, **cfg: Any):
        super().__init__(window=window, z=z, warmup=warmup, **cfg)
        self.window, self.z, self.warmup = window, z, warmup
        self.history: deque[float] = deque(maxlen=window)

    def check(self, step: int, **ctx: Any) -> Finding | None:
        value = float(ctx[self.key])
        if not math.isfinite(value):
            return None  # the nonfinite detector's case
        finding = None
        if len(self.history) >= self.warmup:
            vals = sorted(self.history)
            med = vals[len(vals) // 2]
            mad = sorted(abs(v - med) for v in vals)[len(vals) // 2] * 1.4826
            score = abs(value - med) / max(mad, 1e-12 * max(1.0, abs(med)))
            if score > self.z:
                finding = Finding(self.name, step, {self.key: value, "median": med, "mad": mad, "z": score})
        if finding is None:
            self.history.append(value)  # a spike does not become the new normal
        return finding

    def snapshot(self) -> Any:
        return list(self.history)

    def restore(self, state: Any) -> None:
        self.history = deque(state, maxlen=self.window)


class LossSpike(_RobustSpike):
    name, point, cost, key = "loss_spike", "after_allreduce", "a running median of the loss", "loss"


class GradNormSpike(_RobustSpike):
    name, point, cost, key = "grad_norm_spike", "after_allreduce", "the gradient norm (one pass over grads)", "grad_norm"


class UpdateRmsSpike(_RobustSpike):
    """The root mean square of the step's parameter update (after minus before the optimizer step) far from its
    running median: a corrupted gradient or optimizer state shows in the update before it shows in the loss
    (Altenbernd et al., arXiv 2604.00726)."""

    name, point, key = "update_rms_spike", "after_optimizer_step", "update_rms"
    cost = "a copy of the parameters before each optimizer step, one pass over them after it"


class Fingerprint(Detector):
    """Cross-replica fingerprint every K steps, all-gathered; a majority names the odd rank.

    It covers everything the replicas must agree on, parameters and optimizer state: a flipped
    AdamW moment leaves the parameters equal until the next update, and a snapshot taken then
    would carry the corruption into every rank's rollback (measured: endless rollbacks in a campaign).
    Of a sharded model, the state is taken in parts that have the same replicas (`sharding.replica_parts`):
    under tensor parallelism the norms, embeddings and the rowwise layers' biases are whole on every rank
    of a tensor-parallel group, the split layers only on their data-parallel replicas.
    """

    name, point, cost = "fingerprint", "after_optimizer_step", "a hash of the parameters and optimizer state, and an all-gather, every K steps"
    collective = True

    def __init__(self, every: int = 1, **cfg: Any):
        super().__init__(every=every, **cfg)
        self.every = every
        # the parts of the state with the same replicas: (state dict keys, optimizer ids, replica groups),
        # one part of everything (None) under DDP; from the model at the first check
        self.parts: list[tuple[tuple[set[str], set[int]] | None, list[list[int]]]] | None = None

    def _parts(self, model: Any, optimizer: Any, world: int) -> list[tuple[Any, list[list[int]]]]:
        from burnin.rank.sharding import replica_parts  # lazy: torch; `import burnin.rank` stays torch-free

        if self.parts is None:
            self.parts = replica_parts(model, optimizer, world)
        return self.parts

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0

    def check(self, step: int, model: Any = None, optimizer: Any = None, **ctx: Any) -> Finding | None:
        import torch  # lazy: torch; `import burnin.rank` stays torch-free
        import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

        world = dist.get_world_size()
        parts = self._parts(model, optimizer, world)
        digests = [state_digest(model, optimizer, part) for part, _ in parts]
        mine = torch.tensor([int.from_bytes(d[:8], "little", signed=True) for d in digests], dtype=torch.int64)
        if next(model.parameters()).is_cuda:
            mine = mine.cuda()
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        rows = [g.tolist() for g in gathered]
        # Replicas: every rank under DDP; of a sharded model, the ranks that hold the same part.
        odd, majority_every, shown = [], True, None
        for i, (_, groups) in enumerate(parts):
            for group in groups:
                vals = [rows[r][i] for r in group]
                if len(set(vals)) == 1:
                    continue
                majority, votes = Counter(vals).most_common(1)[0]
                majority_every &= votes > len(group) / 2
                odd += [r for r, v in zip(group, vals) if v != majority] if votes > len(group) / 2 else group
                shown = i if shown is None else shown
        if not odd:
            return None
        details: dict[str, Any] = {"fingerprints": [f"{row[shown] & (2**64 - 1):016x}" for row in rows],
                                   "majority": majority_every}
        part = parts[shown][0]
        if part is not None:
            details["part"] = f"{len(part[0])} tensors ({sorted(part[0])[0]}, ...) and their optimizer state"
        return Finding(self.name, step, details, odd_ranks=sorted(set(odd)))


class Checksum(Detector):
    """This rank's own state, sealed at the end of a step and verified before the next forward.

    Between two steps nothing may change the parameters or the optimizer state; a digest that differs
    is memory (or a stray write) changing them. It needs no replica, so it covers a shard that only one
    rank holds (FSDP2 without HSDP). A flip during the step, before the seal, is not its to see.
    """

    name, point, cost = "checksum", "between_steps", "a hash of this rank's parameters and optimizer state, twice a step"

    def __init__(self, every: int = 1, **cfg: Any):
        super().__init__(every=every, **cfg)
        self.every = every
        self.sealed: tuple[int, bytes] | None = None  # (the step it is for, the digest)
        self.found: Finding | None = None

    def seal(self, step: int, model: Any, optimizer: Any) -> None:
        """After `step` completed: the digest the state must still have when step + 1 begins."""
        self.sealed = (step + 1, state_digest(model, optimizer)) if (step + 1) % self.every == 0 else None

    def verify(self, step: int, model: Any, optimizer: Any, rank: int) -> None:
        if self.sealed is not None and self.sealed[0] == step and state_digest(model, optimizer) != self.sealed[1]:
            self.found = Finding(self.name, step, {"sealed_after_step": step - 1}, odd_ranks=[rank])
        self.sealed = None

    def check(self, step: int, **ctx: Any) -> Finding | None:
        found, self.found = self.found, None
        return found

    def restore(self, state: Any) -> None:
        self.sealed, self.found = None, None  # a rolled-back state is sealed again at the next step's end


class GatherHash(Detector):
    """Every rank of a sharded model receives the same parameters from each all-gather; a rank that received
    something else (a flipped bit on its link, in its buffer) computes with it alone.

    Each all-gathered buffer is summed as integers (its float32 words as int32, into an int64: any single
    flipped bit moves the sum by a power of two) where it lies, on the device on a GPU; at the end of the
    step the ranks all-gather their sums and compare call by call, a majority naming the odd rank. It
    sees what no replica comparison can: the rank's gradients were skewed by what it received, and the
    reduce-scatter spread that into every rank's shard alike.
    """

    name, point, cost = "gather_hash", "after_optimizer_step", "an integer sum of each all-gathered buffer, and an all-gather of the sums, per step"
    collective = True

    def __init__(self, **cfg: Any):
        super().__init__(**cfg)
        self.sums: list[Any] = []   # this step's, one per all-gather call
        self.units: list[str] = []
        self.groups: list[list[int]] | None = None  # ranks that receive the same buffers (set when hooked)

    def observe(self, unit: str, output: Any) -> None:
        """After an all-gather: its output's sum (FSDP2's collectives call this through the hooks)."""
        import torch  # lazy: torch; `import burnin.rank` stays torch-free

        words = {4: torch.int32, 2: torch.int16}.get(output.element_size(), torch.uint8)
        self.sums.append(output.detach().view(words).sum(dtype=torch.int64))
        self.units.append(unit)

    def check(self, step: int, model: Any = None, **ctx: Any) -> Finding | None:
        import torch  # lazy: torch; `import burnin.rank` stays torch-free
        import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

        sums, units = self.sums, self.units
        self.sums, self.units = [], []
        world = dist.get_world_size()
        device = next(model.parameters()).device
        # every rank ran the same all-gathers (the same program); a count that differs is itself a finding
        mine = torch.stack(sums).to(device) if sums else torch.zeros(0, dtype=torch.int64, device=device)
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([len(sums)], dtype=torch.int64, device=device))
        n = max(int(c.item()) for c in counts)
        padded = torch.cat([mine, torch.full((n - len(sums),), -1, dtype=torch.int64, device=device)])
        gathered = [torch.zeros(n, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(gathered, padded)
        rows = [g.tolist() for g in gathered]
        odd: set[int] = set()
        calls = []
        # compared within each group of ranks that receive the same buffers (a tensor-parallel group's ranks
        # gather different parts of each block)
        for group in self.groups or [list(range(world))]:
            for i in range(n):
                vals = [rows[r][i] for r in group]
                if len(set(vals)) == 1:
                    continue
                majority, votes = Counter(vals).most_common(1)[0]
                bad = [r for r, v in zip(group, vals) if v != majority] if votes > len(group) / 2 else list(group)
                odd.update(bad)
                calls.append({"call": i, "unit": units[i] if i < len(units) else None, "ranks": bad})
        if not odd:
            return None
        return Finding(self.name, step, {"calls": calls[:8], "all_gathers": n}, odd_ranks=sorted(odd))

    def restore(self, state: Any) -> None:
        self.sums, self.units = [], []


def state_digest(model: Any, optimizer: Any, part: tuple[set[str], set[int]] | None = None) -> bytes:
    """A digest of the parameters, buffers and optimizer state: what every replica must hold alike.

    On a GPU each tensor is fingerprinted where it lives by the Triton kernel (burnin.kernels.
    fingerprint: any single-bit flip changes it) and only the per-tensor numbers are hashed, so
    nothing large crosses to the host. On the CPU, SHA-256 over the bytes is ~20x cheaper than the
    kernel in the Triton interpreter (1.7 ms against 35 ms for the tiny model's parameters).
    """

    from burnin.rank.state import state_hash, state_items  # lazy: torch; `import burnin.rank` stays torch-free

    if not next(model.parameters()).is_cuda:
        return bytes.fromhex(state_hash(model, optimizer, local_only=True, part=part))
    from burnin.kernels.fingerprint import digest  # lazy: torch; `import burnin.rank` stays torch-free

    h = hashlib.sha256()
    for name, t in state_items(model, optimizer, part):
        h.update(name.encode())
        if hasattr(t, "is_cuda") and t.is_cuda and t.numel():
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(digest(t.detach().contiguous()).to_bytes(8, "little"))
        else:
            h.update(repr(t.tolist() if hasattr(t, "tolist") else t).encode())
    return h.digest()


DETECTORS: dict[str, type[Detector]] = {d.name: d for d in (NonFinite, LossSpike, GradNormSpike, UpdateRmsSpike,
                                                              Fingerprint,
                                                              Checksum, GatherHash)}


def build_detectors(cfg: dict[str, Any]) -> list[Detector]:
    """Detectors from the scenario's `detectors` section ({name: {params} or None})."""
    out = []
    for name, params in cfg.items():
        if params is None or name == "recompute":
            continue
        out.append(DETECTORS[name](**params))
    return out
