"""Memory faults: a Triton kernel of the training step computes a wrong offset.

They act on the loss's row reduction (`burnin.kernels.reduction`), which runs in every step's
forward when `workload.kernels` is "triton". Each fault arms the kernel at `before_forward`; the
kernel does the damage in that step's forward, with real memory accesses: on CUDA a load far
outside the tensor is the real, sticky "an illegal memory access was encountered"; in the CPU
interpreter the same load is a real SIGSEGV. Nothing here is simulated.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from burnin.faults.base import Fault

__all__ = ["IllegalAccess", "LatentKernelBug", "OobWrite", "reduction_kernel"]

# 2**40 elements: terabytes past any allocation, so the load hits unmapped memory on any machine.
_WILD = 1 << 40


def reduction_kernel(ctx: Any, fault: str):
    """The reduction kernel's module, after checking that this rank's loss really runs it (also for
    `corruption.kernel_tile`)."""
    kernels = getattr(getattr(ctx.model, "cfg", None), "kernels", None)
    if kernels != "triton":
        raise RuntimeError(f"{fault} acts on the Triton loss kernel, but this workload uses kernels={kernels!r}: "
                           "set workload.kernels: triton")
    from burnin.kernels import reduction  # lazy: torch, in the rank only

    return reduction


def _no_core_dump() -> None:
    # A deliberate crash on every burn-in loop must not leave a core file per rank behind.
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass


def _rows(ctx: Any) -> int:
    batch = ctx.tensors.get("batch")
    return int(batch.numel()) if batch is not None else 1


class IllegalAccessParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    offset: int = Field(_WILD, ge=1 << 20, le=1 << 50,
                        description="elements added to one row's offset (far enough to leave every mapping)")
    row: int = Field(0, ge=0, description="which row of the reduction goes wrong (modulo the row count)")


class IllegalAccess(Fault):
    """One launch of the reduction kernel reads at a wild offset: the rank dies of an illegal memory access."""

    name = "memory.illegal_access"
    summary = "a Triton kernel loads at a wild offset (CUDA illegal memory access; SIGSEGV on CPU)"
    where = "in_rank"
    points = ("before_forward",)
    Params = IllegalAccessParams
    effects = ("illegal_memory_access",)

    def inject(self, ctx: Any) -> dict[str, Any]:
        reduction = reduction_kernel(ctx, self.name)
        row = self.params.row % _rows(ctx)
        _no_core_dump()
        reduction.arm(wild_row=row, wild_offset=self.params.offset)
        return {"kernel": "reduction", "row": row, "offset_elements": self.params.offset}


class LatentKernelBugParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    probability: float = Field(1 / 300, gt=0, le=1,
                               description="chance that a step's batch holds the rare pattern the bug needs")
    replay_probability: float = Field(0.5, gt=0, le=1,
                                      description="chance that the non-reproducible condition (timing, memory "
                                                  "layout) holds on one execution of a step")
    seed: int = Field(0, ge=0, lt=2**63, description="chooses which batches hold the pattern")
    offset: int = Field(_WILD, ge=1 << 20, le=1 << 50, description="how far off the wrong offset is (elements)")


def _unit(*parts: bytes) -> float:
    """A number in [0, 1) that is a pure function of the bytes."""
    h = hashlib.blake2b(b"".join(parts), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


class LatentKernelBug(Fault):
    """A latent offset bug in the reduction kernel: it crashes on a rare data pattern, at irregular steps.

    The bug fires on a step's execution when two things hold together:

    - the batch holds a rare pattern (decided from the batch's tokens: a hash of them below
      `probability`), as the real bug fired only for some data distributions; and
    - a condition that a replay does not reproduce (in real life: timing, memory layout, what else
      the allocator holds), drawn afresh on every execution from (seed, step, attempt) with
      `replay_probability`: deterministic given the attempt number, different on each attempt.

    Both are needed: the data of a step is a pure function of (seed, step, rank), so after a
    crash the group resumes from a checkpoint and replays the same batches; a purely data-driven
    trigger would crash at the same step on every attempt and the run could never get past it.
    With the second condition a replayed step crashes again only with `replay_probability`, and
    steps with the pattern crash at a rate of `probability * replay_probability`.

    The fault is armed from its `step` to the end of the run and may bring the group down any
    number of times; each crash is attributed to it (`recurring`).
    """

    name = "memory.latent_kernel_bug"
    summary = "a latent offset bug in a Triton kernel: crashes on a rare data pattern, again and again"
    where = "in_rank"
    points = ("before_forward",)
    Params = LatentKernelBugParams
    recurring = True
    effects = ("illegal_memory_access",)

    def span(self) -> int:
        return 1 << 62  # to the end of the run

    def triggers(self, batch: Any, step: int, attempt: int) -> tuple[bool, bool]:
        """(the batch holds the pattern, the per-execution condition holds)."""
        tokens = batch.detach().to("cpu").contiguous().numpy().tobytes()
        pattern = _unit(b"pattern", struct.pack("<q", self.params.seed), tokens) < self.params.probability
        condition = _unit(b"condition", struct.pack("<qqq", self.params.seed, step, attempt)) \
            < self.params.replay_probability
        return pattern, condition

    def inject(self, ctx: Any) -> dict[str, Any]:
        reduction = reduction_kernel(ctx, self.name)
        batch = ctx.tensors.get("batch")
        if batch is None:
            raise RuntimeError(f"{self.name} needs the step's batch at {ctx.point}")
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        pattern, condition = self.triggers(batch, ctx.step, attempt)
        if pattern and condition:
            row = int(_unit(b"row", batch.detach().to("cpu").numpy().tobytes()) * batch.numel())
            _no_core_dump()
            # The rank log is the only witness that survives the crash.
            sys.stderr.write(f"burnin: {self.name} fires at step {ctx.step} (attempt {attempt}, row {row})\n")
            sys.stderr.flush()
            reduction.arm(wild_row=row, wild_offset=self.params.offset)
        return {"kernel": "reduction", "probability": self.params.probability,
                "replay_probability": self.params.replay_probability}


class OobWriteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    elements: int = Field(4, ge=1, le=64, description="how many elements are stored past the end")


class OobWrite(Fault):
    """One launch of the reduction kernel stores a few elements past the end of its output.

    The kernel writes the per-row losses and, next to them in the same allocation, the per-row
    log-sum-exp that the backward pass reads. The overrun lands in the first rows of the
    log-sum-exp: the loss printed for the step is right, the gradients of those rows are not.
    Nothing crashes, nothing is NaN: a silent data corruption source, unless a detector notices.
    """

    name = "memory.oob_write"
    summary = "a Triton kernel stores a few elements past the end of its output (silent corruption)"
    where = "in_rank"
    points = ("before_forward",)
    Params = OobWriteParams
    disruptive = False  # it corrupts, it does not crash
    effects = ("corruption",)
    effect_scope = "detector"

    def inject(self, ctx: Any) -> dict[str, Any]:
        reduction = reduction_kernel(ctx, self.name)
        reduction.arm(overrun=self.params.elements)
        return {"kernel": "reduction", "elements_past_end": self.params.elements, "lands_in": "lse[0:n]"}


#: The faults this module adds to the built-in catalogue (`burnin.faults.registry` registers them).
FAULTS = (IllegalAccess, LatentKernelBug, OobWrite)
