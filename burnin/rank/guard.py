"""The guard: runs the detectors after each step, makes the ranks agree, and applies the policy.

Record, then decide: each rank's detectors record findings; one small all-reduce per step makes
every rank see whether any rank found something; then all ranks take the same action together:
roll back in process to the last verified snapshot and recompute (`recovery.mode: rollback`),
raise so the supervisor restarts the group from a checkpoint (`restart`), or only report (`none`).

A snapshot is verified when the fingerprint detector found the replicas equal at that step (or,
without it, when no detector found anything). Step recomputation re-runs a step from the state
before it and compares bits: a difference is a transient fault (the second execution is kept),
agreement on a suspicious step means the anomaly is persistent (a property of the data or model).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

from burnin.errors import BurninError
from burnin.rank.detectors import Checksum, Finding, Fingerprint, GatherHash, build_detectors, state_digest

__all__ = ["Guard", "CorruptionDetected"]


class CorruptionDetected(BurninError):
    """Raised in every rank when a detector's finding must be recovered by a restart."""


@dataclass
class _Snapshot:
    step: int                    # the next step to run after restoring
    model: dict[str, Any]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    detectors: list[Any]
    extra: dict[str, Any]        # the loop's own state objects (attach(state=...)), by name


class Guard:
    def __init__(self, scenario: dict[str, Any], rank: int, world_size: int, events: Any,
                 model: Any, optimizer: Any, extra: dict[str, Any] | None = None):
        cfg = {k: v for k, v in scenario["detectors"].items() if v is not None}
        self.detectors = build_detectors(cfg)
        self.local = [d for d in self.detectors if not d.collective]
        self.fingerprint = next((d for d in self.detectors if isinstance(d, Fingerprint)), None)
        self.checksum = next((d for d in self.detectors if isinstance(d, Checksum)), None)
        self.gather = next((d for d in self.detectors if isinstance(d, GatherHash)), None)
        rc = cfg.get("recompute")
        self.recompute_every = rc["every"] if rc else 0
        self.mode = scenario["recovery"]["mode"]
        self.max_rollbacks = scenario["recovery"]["max_rollbacks"]
        self.snapshot_every = scenario["checkpoint"]["every"]
        self.rank, self.world_size, self.events = rank, world_size, events
        self.model, self.optimizer = model, optimizer
        self.extra = extra or {}
        self.rollbacks = 0
        self.log: list[dict[str, Any]] = []   # every finding of this rank (a campaign reads it per trial)
        self.quiet = False                    # campaigns summarise findings per trial instead of per event
        self.snap: _Snapshot | None = None
        self._pre: _Snapshot | None = None
        self._first_bits: dict[int, str] = {}   # loss bits of a suspicious step's first execution
        self._pending: tuple[int, list[Finding], tuple[str, str]] | None = None  # a step to execute again
        self.active = bool(self.detectors) or self.recompute_every > 0
        self.needs_grad_norm = any(d.name in ("nonfinite", "grad_norm_spike") for d in self.local)
        self.needs_update_rms = any(d.name == "update_rms_spike" for d in self.local)
        self.update_rms = 0.0  # the step's parameter update RMS (the session's optimizer hooks set it)

    # -- snapshots -------------------------------------------------------------------------

    def _take(self, next_step: int) -> _Snapshot:
        from burnin.rank.state import capture_rank_state  # lazy: torch; `import burnin.rank` stays torch-free

        return _Snapshot(next_step, copy.deepcopy(self.model.state_dict()),
                         copy.deepcopy(self.optimizer.state_dict()), capture_rank_state(next_step),
                         [d.snapshot() for d in self.detectors],
                         {name: copy.deepcopy(obj.state_dict()) for name, obj in self.extra.items()})

    def _restore(self, snap: _Snapshot) -> None:
        from burnin.rank.state import restore_rank_state  # lazy: torch; `import burnin.rank` stays torch-free

        self.model.load_state_dict(snap.model)
        self.optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
        restore_rank_state(snap.rng)
        for d, s in zip(self.detectors, snap.detectors):
            d.restore(s)
        for name, obj in self.extra.items():
            obj.load_state_dict(copy.deepcopy(snap.extra[name]))

    def start(self, step: int) -> None:
        """The state at `step` (fresh or loaded from a checkpoint) is the first verified snapshot."""
        if self.mode == "rollback" and self.active:
            self.snap = self._take(step)

    def before_step(self, step: int) -> None:
        if self.checksum is not None:  # has the state changed since the last step sealed it?
            self.checksum.verify(step, self.model, self.optimizer, self.rank)
        if self.recompute_every and (step + 1) % self.recompute_every == 0:
            self._pre = self._take(step)

    # -- after each step -------------------------------------------------------------------

    def _recomputed(self, step: int, first: tuple[str, str], bits: str) -> list[Finding]:
        if (bits, state_digest(self.model, self.optimizer)) == first:
            return []
        return [Finding("recompute", step, {"verdict": "transient", "loss_bits_differ": bits != first[0]},
                        odd_ranks=[self.rank] if bits != first[0] else None)]

    @property
    def rerun_pending(self) -> bool:
        """after_step asked for the step it was given to be executed once more (sampled recomputation):
        the state before it is restored; the caller runs it again and calls after_step with the result."""
        return self._pending is not None

    def after_step(self, step: int, loss: float, bits: str, grad_norm: float,
                   rerun: Callable[[int], tuple[float, str, float]] | None = None) -> tuple[int, float, str]:
        """Check the step that just ran. Returns (next step to run, loss, loss bits): the next step is
        `step + 1`, or an earlier one after a rollback; loss and bits are those of the kept execution.
        Without `rerun`, a step due for recomputation comes back as `rerun_pending` instead."""
        if not self.active:
            return step + 1, loss, bits
        if self._pending is not None:  # the second execution of a recomputed step
            pending_step, findings, first = self._pending
            self._pending = None
            if pending_step != step:
                raise RuntimeError(f"recomputation of step {pending_step} answered with step {step}")
            findings = findings + self._recomputed(step, first, bits)
        else:
            findings = []
            for d in self.local:
                f = d.check(step, loss=loss, grad_norm=grad_norm, update_rms=self.update_rms)
                if f:
                    findings.append(f)
            if self._pre is not None:  # sampled recomputation: run the step again from the state before it
                first = (bits, state_digest(self.model, self.optimizer))
                self._restore(self._pre)
                self._pre = None
                if rerun is None:
                    self._pending = (step, findings, first)
                    return step, loss, bits
                loss, bits, grad_norm = rerun(step)
                findings += self._recomputed(step, first, bits)
        # Replaying a step that was suspicious the first time: did the anomaly come back?
        if step in self._first_bits:
            verdict = "persistent" if self._first_bits.pop(step) == bits and findings else "transient"
            self.events.emit("recompute_verdict", step=step, verdict=verdict)
        shared: list[Finding] = []  # the collective detectors' findings: every rank has the same
        if self.fingerprint and self.fingerprint.due(step):
            shared.append(self.fingerprint.check(step, model=self.model, optimizer=self.optimizer))
        if self.gather is not None:
            shared.append(self.gather.check(step, model=self.model))
        shared = [f for f in shared if f is not None]
        # Every rank must take the same decision: share the worst local verdict.
        # 2: a finding to recover from; 1: only recomputation findings (already recovered); 0: none.
        local = 2 if any(f.detector != "recompute" for f in findings) else (1 if findings else 0)
        worst = self._agree(local) if self.local or self.recompute_every else 0
        for f in findings:
            self._emit(f)
        if self.rank == 0:
            for f in shared:
                self._emit(f)
        if worst < 2 and not shared:
            self._maybe_snapshot(step)
            if self.checksum is not None:
                self.checksum.seal(step, self.model, self.optimizer)
            return step + 1, loss, bits
        reason = ", ".join(sorted({f.detector for f in findings + shared}))
        return self._recover(step, bits, reason or "a finding on another rank"), loss, bits

    def _recover(self, step: int, bits: str, reason: str) -> int:
        if self.mode == "none":
            return step + 1
        if self.mode == "restart" or self.snap is None:
            raise CorruptionDetected(f"{reason} at step {step}: restarting from a checkpoint")
        self.rollbacks += 1
        if self.rollbacks > self.max_rollbacks:
            raise CorruptionDetected(f"{reason} at step {step}: more than {self.max_rollbacks} rollbacks")
        self._first_bits[step] = bits
        self._restore(self.snap)
        if self.rank == 0 and not self.quiet:
            self.events.emit("rollback", from_step=step, to_step=self.snap.step, reason=reason,
                             rollbacks=self.rollbacks)
        return self.snap.step

    def _maybe_snapshot(self, step: int) -> None:
        if self.mode != "rollback":
            return
        verified = self.fingerprint.due(step) if self.fingerprint else (step + 1) % self.snapshot_every == 0
        if verified:
            self.snap = self._take(step + 1)

    def _agree(self, level: int) -> int:
        import torch  # lazy: torch; `import burnin.rank` stays torch-free
        import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

        t = torch.tensor([level], dtype=torch.int32)
        if next(self.model.parameters()).is_cuda:
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _emit(self, f: Finding) -> None:
        self.log.append({"detector": f.detector, "step": f.step, "rank": self.rank, "odd_ranks": f.odd_ranks})
        if not self.quiet:
            self.events.emit("detection", detector=f.detector, step=f.step, odd_ranks=f.odd_ranks, details=f.details)
