"""The public rank-side API: what a training loop calls to be run, disturbed and judged by burnin.

A few lines attach burnin to a loop; the loop stays the loop::

    import burnin.rank

    session = burnin.rank.attach(ddp_model, optimizer)      # after init_process_group and DDP
    for step in session.steps(total_steps):                 # resumes first; a range without burnin
        x, y = batch(step)
        loss = loss_fn(ddp_model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        session.step_done(loss)

`attach` hooks the step points into the modules the loop already has: `before_forward` is a forward
pre-hook on the model (its first argument is the batch), `after_backward` a DDP communication hook
(each gradient bucket, then the usual averaging all-reduce), `after_allreduce` and
`after_optimizer_step` the optimizer's step pre- and post-hooks; `between_steps` fires in `steps()`
after the step's checkpoint. `steps()` does the rest between two steps: it resumes from the newest
valid state (a memory snapshot or a checkpoint, model + optimizer + every RNG + the loop's own
`state=` objects), runs the detectors, rolls back or recomputes a step when they say so, writes the
checkpoints the scenario asks for (atomic, SHA-256 manifest; through the loop's own `save=`/`load=`
when it has them), and reports each step on the rank's event stream.

Outside burnin (no run started this process: plain `python train.py`, or `torchrun` without burnin's
entry) the session is inactive: `steps(n)` is `range(n)` and `step_done` does nothing, so one
script serves both.

burnin's own workload (`burnin.rank.worker`) is the first user of this API.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from burnin.core.snapshots import SLOTS, SnapshotError, common_step
from burnin.errors import UserError
from burnin.faults.base import COLLECTIVE_POINTS
from burnin.faults.network import NodeInterface
from burnin.rank import checkpoint
from burnin.rank.guard import CorruptionDetected, Guard
from burnin.rank.injector import Injector
from burnin.rank.snapshot import RankSnapshots

__all__ = ["attach", "Session", "RunContext", "current"]


@dataclass
class RunContext:
    """What the entry that started this process as a burnin rank knows: the run's spec, this rank, its
    event stream. Set by `burnin.rank.worker` (under the supervisor) or `burnin.rank.__main__` (torchrun)."""

    spec: dict[str, Any]
    rank: int
    world_size: int
    events: Any
    pg_announced: bool = False
    finished: bool = False
    # torchrun: no supervisor acts on out-of-rank faults, the rank applies them to itself
    self_inflicted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def announce_pg(self, device: Any = None) -> None:
        """The `pg_ready` event, once: the process group is formed."""
        if self.pg_announced:
            return
        import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

        self.pg_announced = True
        if "on_pg" in self.extra:  # torchrun: the event stream opens once the group agreed on the attempt
            self.extra["on_pg"]()
        self.events.emit("pg_ready", backend=dist.get_backend(), device=str(device) if device is not None else None)


_CURRENT: RunContext | None = None


def current() -> RunContext | None:
    """The run this process is a rank of; None outside burnin."""
    return _CURRENT


def _set_current(ctx: RunContext | None) -> None:
    global _CURRENT
    _CURRENT = ctx


def attach(model: Any, optimizer: Any, *, state: Mapping[str, Any] | None = None,
           save: Callable[[Path], None] | None = None, load: Callable[[Path], None] | None = None,
           ddp_hook: bool = True, evaluate: Callable[[], Any] | None = None) -> "Session":
    """Attach burnin to a loop's model (a DistributedDataParallel module, or a plain one) and optimizer.

    - `state`: more objects the step changes, whose `state_dict()`/`load_state_dict()` a checkpoint and an
      in-process rollback keep (an LR scheduler, a data loader's position), saved per rank. A rollback
      restores the model, the optimizer, every RNG and these; anything else the step changes is not
      put back, so name it here (even when the loop's own `save`/`load` keep it on disk).
    - `save(directory)` / `load(directory)`: the loop's own checkpoint writer and reader. burnin hands them a
      fresh directory, then commits what was written with a SHA-256 manifest (so a damaged file is refused
      and the previous checkpoint loaded), times it, and adds each rank's RNG state beside it. Without them,
      burnin saves the model's and optimizer's state dicts itself.
    - `ddp_hook=False`: leave the DDP communication hook alone (the loop has its own); the `after_backward`
      point then never fires.
    - `evaluate()`: the loss on held-out data (a float or a 0-d tensor), computed without gradients and
      without changing any state the step changes; burnin calls it on every rank at the end of the run (the
      `eval_loss` of `rank_finished`), so that the effect of a silent corruption is judged on held-out data
      as well as on the training loss.

    Call it after `init_process_group` and after wrapping the model in DDP."""
    if evaluate is not None and not callable(evaluate):
        raise UserError(f"attach: evaluate: {type(evaluate).__name__} is not callable; give a function of no "
                        "arguments that returns the held-out loss")
    return Session(model, optimizer, state=dict(state or {}), save=save, load=load, ddp_hook=ddp_hook,
                   ctx=current(), evaluate=evaluate)


class Session:
    """One rank's link to the run. See the module docstring; made by `attach`."""

    def __init__(self, model: Any, optimizer: Any, *, state: dict[str, Any], save: Callable[[Path], None] | None,
                 load: Callable[[Path], None] | None, ddp_hook: bool, ctx: RunContext | None,
                 evaluate: Callable[[], Any] | None = None):
        if (save is None) != (load is None):
            raise UserError("burnin.rank.attach: give both save= and load= (a checkpoint burnin writes through "
                            "the loop's writer must be read back through its reader), or neither")
        self.ctx = ctx
        self.active = ctx is not None
        self.ddp = model if hasattr(model, "register_comm_hook") and hasattr(model, "module") else None
        self.model = self.ddp.module if self.ddp is not None else model
        self.optimizer = optimizer
        self.extra = state
        self.save_fn, self.load_fn = save, load
        self.evaluate = evaluate
        self._before_update: list[Any] | None = None  # the parameters before the optimizer step (update_rms_spike)
        self.data_offset = 0  # the built-in workload reads batch step + data_offset (a campaign's spread windows)
        self.step = 0
        self.start_step: int | None = None
        self.grad_norm = 0.0
        self.t_compute: float | None = None
        self.w_compute: float | None = None  # the loop thread's run-queue wait so far, at the same instant
        self.grad_digest: Any = None  # this rank's gradient buckets before the all-reduce (_bits_sum, summed)
        self._digest_grads = False
        self._schedstat = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        self._loss: Any = None
        self._forwarded = False
        self._priming = False
        self._resumed = False
        self._tier: str | None = None
        self.guard: Any = None
        self.injector: Any = None
        self.snaps: Any = None
        self.sharded = self._dcp = False
        self._pending: dict[str, Any] | None = None  # an asynchronous DCP save not yet committed
        self._ckpt_group: Any = None
        if not self.active:
            return
        import torch  # lazy: torch; `import burnin.rank` stays torch-free

        from burnin.rank.sharding import dcp_load, dcp_save, is_sharded  # lazy: torch; `import burnin.rank` stays torch-free

        ctx.announce_pg(next(iter(self.model.parameters()), torch.empty(0)).device)
        # A sharded model (FSDP2, HSDP: DTensor parameters) is checkpointed with DCP, each rank its shards,
        # unless the loop brings its own writer; memory snapshots and rollbacks keep each rank's shards.
        self.sharded = is_sharded(self.model)
        self._dcp = self.sharded and save is None
        if ctx.spec["scenario"]["checkpoint"].get("async_save") and not self._dcp:
            raise UserError("checkpoint.async_save: asynchronous saves are DCP's, for a sharded model (FSDP2, "
                            "HSDP) checkpointed by burnin; this loop's model is not, or it brings its own writer: "
                            "drop async_save")
        if self._dcp:
            self.save_fn = lambda path: dcp_save(self.model, self.optimizer, path,
                                                 crash_after=checkpoint.crash_armed("write"))
            self.load_fn = lambda path: dcp_load(self.model, self.optimizer, path,
                                                 skip=self.scenario["debug"]["skip_restore"])
        self._build(ddp_hook)

    # -- set-up ------------------------------------------------------------------------------

    def _build(self, ddp_hook: bool) -> None:
        ctx, spec = self.ctx, self.ctx.spec
        sc = spec["scenario"]
        self.scenario = sc
        self.ckpt_dir = Path(spec["checkpoint_dir"])
        rank, world = ctx.rank, ctx.world_size
        position = str(Path(spec["run_dir"]) / "ranks" / f"rank{rank}.pos") if spec.get("clock0") else None
        self.guard = Guard(sc, rank, world, ctx.events, self.model, self.optimizer, self.extra)
        self.injector = Injector(sc["faults"], rank, world, ctx.events, set(spec["fired"]),
                                 go_timeout_s=sc["timeouts"]["connect_s"], clock0=spec.get("clock0"),
                                 position=position, self_inflicted=ctx.self_inflicted,
                                 checkpoint_dir=str(self.ckpt_dir), snapshot_dir=spec.get("snapshot_dir"),
                                 fabric=_node_interface(spec))
        self._hook_collectives()
        outer = self.ddp if self.ddp is not None else self.model
        outer.register_forward_pre_hook(self._before_forward)
        if self.ddp is not None and ddp_hook:
            self.ddp.register_comm_hook(self, _allreduce_hook)
        self.optimizer.register_step_pre_hook(self._before_optimizer)
        self.optimizer.register_step_post_hook(self._after_optimizer)

    def _hook_collectives(self) -> None:
        """A sharded model's all-gathers and reduce-scatters (and HSDP's all-reduce, and a tensor-parallel
        layer's all-reduce) fire the collective points (golden runs too: faulted and fault-free runs
        communicate the same way). A fault at such a point of a model that has no such collective is
        refused here, before the first step."""
        units: dict[str, bool] = {}  # each hooked FSDP2 unit: whether it is HSDP
        layers: list[str] = []       # each tensor-parallel layer that ends in an all-reduce
        if self.sharded:
            from burnin.rank.sharding import gather_groups, hook_collectives, hook_tp  # lazy: torch; `import burnin.rank` stays torch-free

            gather = self.guard.gather
            units = hook_collectives(self.model, self.point, self.armed, gather.observe if gather is not None else None)
            layers = hook_tp(self.model, self.point, self.armed)
            if gather is not None:
                gather.groups = gather_groups(self.model, self.ctx.world_size)
        hsdp = any(units.values())
        if self.guard.gather is not None and not units:
            raise UserError("detectors.gather_hash: this loop's model has no FSDP2 all-gathers to compare (it is not "
                            "sharded with fully_shard); drop gather_hash, or use fingerprint, checksum or recompute")
        for index, name, point in self.injector.points_named():
            if point not in COLLECTIVE_POINTS:
                continue
            if point == "tp_all_reduce":
                if not layers:
                    raise UserError(f"faults[{index}] {name} at point tp_all_reduce: this loop's model has no "
                                    "tensor-parallel layer that ends in an all-reduce (a Linear parallelized with "
                                    "RowwiseParallel); use all_gather or reduce_scatter, or a step point")
                continue
            if not units:
                raise UserError(f"faults[{index}] {name} at point {point}: this loop's model has no FSDP2 collectives "
                                "to act in (it is not sharded with fully_shard); use a step point such as "
                                "before_forward")
            if point == "replica_all_reduce" and not hsdp:
                raise UserError(f"faults[{index}] {name} at point replica_all_reduce: this loop's sharded model has "
                                "no replicas (HSDP), so no all-reduce across them; use all_gather or reduce_scatter")

    # -- the step points, from the hooks -------------------------------------------------------

    def point(self, name: str, **tensors: Any) -> None:
        """Fire step point `name` of the current step by hand (the hooks fire the usual ones)."""
        if self.active and not self._priming:
            self.injector.fire(name, self.step, model=self.model, optimizer=self.optimizer, **tensors)

    def armed(self, name: str) -> bool:
        """Whether a fault waits at point `name` now (the collectives ask before they wait for a call to
        finish). Asks the current injector: a campaign hands each trial one of its own."""
        return self.active and not self._priming and self.injector.armed(name)

    def _before_forward(self, module: Any, args: tuple[Any, ...]) -> None:
        if self._forwarded or not module.training:
            return
        self._forwarded = True
        batch = args[0] if args and hasattr(args[0], "data_ptr") else None
        self.point("before_forward", **({"batch": batch} if batch is not None else {}))

    def _before_optimizer(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.point("after_allreduce")
        if self.guard is not None and self.guard.needs_grad_norm:
            self.grad_norm = _grad_norm(self.model)
        if self.guard is not None and self.guard.needs_update_rms:
            self._before_update = [_local(p).detach().clone() for p in self.model.parameters()]

    def _after_optimizer(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.guard is not None and self.guard.needs_update_rms and self._before_update is not None:
            self.guard.update_rms = _update_rms(self.model, self._before_update)
            self._before_update = None
        self.point("after_optimizer_step")

    # -- the loop ------------------------------------------------------------------------------

    def step_done(self, loss: Any) -> None:
        """The step's loss (a tensor): the last call of a step's body."""
        self._loss = loss

    def waited(self) -> float | None:
        """Seconds the loop's thread has spent runnable but waiting for a CPU (the kernel's schedstat
        run_delay: descheduled by other work, or held back by a CPU limit); readable from DDP's hook threads
        too. None where the kernel does not say."""
        try:
            with open(self._schedstat, "rb") as f:
                return int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return None

    def begin(self, step: int) -> None:
        """Start executing `step` (steps() does it; a campaign's trials call it by hand)."""
        self.step, self.t_compute, self.w_compute, self._forwarded, self._loss = step, None, None, False, None
        self.grad_digest = None

    def steps(self, total: int | None = None) -> Iterator[int]:
        """The steps to run: from the resume point to the scenario's last step (`workload.steps`; `total` is
        what runs without burnin), again after a rollback, twice for a recomputed one. Inactive: `range(total)`."""
        if not self.active:
            if total is None:
                raise UserError("session.steps(): give the number of steps (no burnin run to take it from)")
            yield from range(total)
            return
        # Under burnin the scenario's workload.steps rules (faults are placed and validated against it, and
        # `--steps` overrides it); the loop's own number is what it runs alone.
        want = self.scenario["workload"]["steps"]
        if total is not None and total != want and self.ctx.rank == 0:
            self.ctx.events.emit("note", text=f"the loop asked for {total} steps; the scenario's workload.steps={want} "
                                              "rules under burnin")
        yield from self._loop(want)

    def resume(self) -> int:
        """Load the newest state every rank has that verifies (memory snapshot or checkpoint); the step to
        run next. Collective; steps() calls it."""
        if not self.active:
            return 0
        if self._resumed:
            return self.start_step

        ctx, spec = self.ctx, self.ctx.spec
        t0 = time.time()
        if self.save_fn is None or self._dcp:  # (a loop's own writer may keep what snapshots cannot see)
            self.snaps = _open_snapshots(spec, ctx.rank, ctx.world_size, ctx.events)
        t_open = time.time()
        foreign = spec.get("resume_from")
        tier, start = _choose_resume(self.ckpt_dir, self.snaps, ctx.rank, ctx.world_size, ctx.events,
                                     (foreign["step"], foreign["world_size"]) if foreign else None)
        t_choose = time.time()
        if tier is not None:
            self._load(tier, start)
        self._tier = tier
        info = ctx.extra.get("resumed", {})
        # where the load's time went: opening (verifying) this rank's snapshots, agreeing on what to load
        # (waits for the slowest rank; rank 0 verifies the checkpoint), and reading it into the model
        ctx.events.emit("resumed", from_step=start if tier is not None else None, tier=tier, load_s=time.time() - t0,
                        open_s=round(t_open - t0, 4), choose_s=round(t_choose - t_open, 4),
                        read_s=round(time.time() - t_choose, 4),
                        params=sum(p.numel() for p in self.model.parameters()), **info)
        self.start_step, self._resumed = start, True
        return start

    def _load(self, tier: str, start: int) -> None:
        """Put back the state of `start` from a memory snapshot or a verified checkpoint."""
        from burnin.rank.state import restore_rank_state  # lazy: torch; `import burnin.rank` stays torch-free

        ctx = self.ctx
        device = next(iter(self.model.parameters())).device
        skip = self.scenario["debug"]["skip_restore"]
        if tier == "memory":
            model_state, rank_state = self.snaps.load(start, device)
            if self.sharded:  # each rank's shards, placed again as the live model's
                from burnin.rank.sharding import from_local_state  # lazy: torch; `import burnin.rank` stays torch-free

                model_state = from_local_state(self.model, self.optimizer, model_state)
        else:
            ckpt = checkpoint.Checkpoint(start, checkpoint.step_dir(self.ckpt_dir, start))
            foreign = ctx.spec.get("resume_from")
            # another run's checkpoint, of another workload: its rank files are other ranks' RNGs (or none is
            # this rank's); the rank keeps the RNG it was seeded with, and the run is judged in tolerance mode
            with_rank = foreign is None or foreign["step"] != start or foreign["ranks_match"]
            if self.load_fn is not None:
                model_state = None
                rank_state = checkpoint.load_rank(ckpt, ctx.rank) if with_rank else None
                priming, self._priming = self._priming, True  # DCP may step the optimizer once at lr 0
                try:
                    self.load_fn(ckpt.path)
                finally:
                    self._priming = priming
            else:
                model_state, rank_state = checkpoint.load(ckpt, ctx.rank, device, with_rank=with_rank)
        if model_state is not None:
            if "model" not in skip:
                self.model.load_state_dict(model_state["model"])
            if "optimizer" not in skip:
                self.optimizer.load_state_dict(model_state["optimizer"])
        if rank_state is None:
            return
        for name, obj in self.extra.items():
            obj.load_state_dict(rank_state["extra"][name])
        restore_rank_state(rank_state, skip)

    def _loop(self, total: int) -> Iterator[int]:
        step = self.resume()
        if step > 0 and self.ddp is not None and self.ctx.world_size >= 3:
            yield from self._prime(step)
        self._start(step, total)
        while step < total and not self._stopping(step):
            self._open(step)
            yield step
            step = self._close(step, self._kept_loss(step))
        self.finish(step - 1)

    # -- the same, for a loop someone else runs (a framework's callbacks) --------------------------

    def start(self, total: int | None = None) -> int:
        """Resume and get ready; the step to run first. For a loop driven by callbacks (a framework's):
        then `begin_step(step)` and `end_step(loss)` around each step, `finish()` at the end."""
        if not self.active:
            return 0
        step = self.resume()
        self._start(step, total if total is not None else self.scenario["workload"]["steps"])
        return step

    def begin_step(self, step: int) -> None:
        if self.active:
            self._open(step)

    def end_step(self, loss: Any) -> None:
        """The step's loss: detectors, the step's event, its checkpoint and snapshot, between_steps. A
        callback-driven loop cannot run a step again, so a rollback or recomputation is refused."""
        if not self.active:
            return
        step = self.step
        nxt = self._close(step, loss)
        if nxt != step + 1:
            raise UserError("the detectors asked to run a step again (recovery.mode: rollback, or recompute), which "
                            "a loop driven by callbacks cannot do; use recovery.mode: restart")

    def should_stop(self, step: int) -> bool:
        """Whether the loop must stop before `step` (a burn-in's time is up: every rank stops at the same step)."""
        return self.active and self._stopping(step)

    # -- between two steps ---------------------------------------------------------------------

    def _start(self, step: int, total: int) -> None:
        if self.snaps is not None:  # snapshots after the resume point are of another history now
            self.snaps.discard(newer_than=step)
        self.guard.start(step)
        spec = self.ctx.spec
        self._total = total
        self._memory_every = self.scenario["checkpoint"].get("memory_every", 0) if self.snaps is not None else 0
        # A burn-in ends at a step the supervisor writes to this file once its time is up (ahead of every
        # rank's position, so all ranks stop at the same step).
        self._stop_file, self._stop_at = spec.get("stop_file"), None
        self._digest_grads = self._stop_file is not None  # only a burn-in records fingerprints (fingerprints.txt)
        self._trace = bool(spec.get("trace_state"))  # check-determinism: a digest of every state at each step
        self._again = False  # the guard asked for the same step once more (recomputation)
        self._t_step, self._t_compute, self._w_step, self._w_compute = 0.0, None, None, None

    def _stopping(self, step: int) -> bool:
        if self._stop_file is not None and self._stop_at is None and os.path.exists(self._stop_file):
            self._stop_at = int(Path(self._stop_file).read_text())
        return self._stop_at is not None and step >= self._stop_at

    def _open(self, step: int) -> None:
        if not self._again:  # a recomputed step is timed from its first execution
            self._t_step, self._t_compute = time.perf_counter(), None
            self._w_step, self._w_compute = self.waited(), None
            self.guard.before_step(step)
        self.begin(step)

    def _close(self, step: int, loss: Any) -> int:
        """After the step's body: the next step to run (step + 1; the same step again, or an earlier one)."""
        from burnin.rank.state import loss_bits, state_digests  # lazy: torch; `import burnin.rank` stays torch-free

        events, ck = self.ctx.events, self.scenario["checkpoint"]
        self._t_compute = self.t_compute if self._t_compute is None else self._t_compute
        self._w_compute = self.w_compute if self._w_compute is None else self._w_compute
        # detect: detectors, agreement across ranks, and rollback or recomputation when they find something
        try:
            next_step, lossf, bits = self.guard.after_step(step, float(loss.item()), loss_bits(loss), self.grad_norm)
        except CorruptionDetected:
            # The corruption may predate the finding, so a memory snapshot may hold it: restart from
            # the disk checkpoints, as without snapshots.
            if self.snaps is not None:
                self.snaps.discard()
            raise
        self._again = self.guard.rerun_pending
        if self._again:
            return step
        if next_step <= step:
            if self.snaps is not None:  # rolled back in process: later snapshots hold the undone steps
                self.snaps.discard(newer_than=next_step)
            return next_step
        # compute_s: from the step's start to its first gradient bucket ready for the all-reduce, the part
        # of the step no peer waits in; cpu_wait_s: how much of it the loop thread spent runnable but waiting
        # for a CPU (a busy host, a CPU limit), which a burn-in's straggler score leaves out
        t_step, t_compute = self._t_step, self._t_compute
        cpu_wait_s = (self._w_compute - self._w_step) if None not in (self._w_compute, self._w_step) else None
        trace = {"digests": state_digests(self.model, self.optimizer)} if self._trace else {}
        if self.grad_digest is not None:
            trace["grad_bits"] = f"{int(self.grad_digest) & (2**64 - 1):016x}"
        events.emit("step_done", step=step, loss=lossf, loss_bits=bits, dt=time.perf_counter() - t_step,
                    compute_s=(t_compute - t_step) if t_compute is not None else None, cpu_wait_s=cpu_wait_s, **trace)
        done = step + 1
        if self._pending is not None:
            self._commit_if_written()
        if done % ck["every"] == 0 or done == self._total or done == self._stop_at:
            self._checkpoint(done, ck["keep"])
        # memory snapshot: committed before the out-of-rank point, so a kill there loses nothing
        if self._memory_every and done % self._memory_every == 0:
            try:
                self.snaps.save(done, self.model, self.optimizer, self._rank_state(done))
            except SnapshotError as exc:  # shared memory full: go on without; the disk tier remains
                events.emit("snapshot_failed", step=done, reason=str(exc))
                self._memory_every = 0
        self.injector.fire("between_steps", step, model=self.model, optimizer=self.optimizer)
        return done

    def finish(self, final_step: int | None = None) -> None:
        """The `rank_finished` event: this rank's final state hash (steps() calls it at the end)."""
        from burnin.rank.state import state_hash, state_norms  # lazy: torch; `import burnin.rank` stays torch-free

        if not self.active:
            return
        if final_step is None:
            final_step = self.step
        self._commit_pending()  # the last asynchronous save is committed before the rank says it finished
        self.ctx.finished = True
        held_out = self.held_out_loss()
        self.ctx.events.emit("rank_finished", final_step=final_step, state_hash=state_hash(self.model, self.optimizer),
                             state_norms=state_norms(self.model, self.optimizer),
                             **({"eval_loss": held_out[0], "eval_loss_bits": held_out[1]} if held_out else {}))

    def held_out_loss(self) -> tuple[float, str] | None:
        """The loop's `evaluate()` (no gradient, no step point fires), as (value, its bits); None without one. A
        collective inside it (a sharded model's all-gathers) needs every rank to call it."""
        if self.evaluate is None:
            return None
        import torch  # lazy: torch; `import burnin.rank` stays torch-free

        from burnin.rank.state import loss_bits  # lazy: torch; `import burnin.rank` stays torch-free

        was, self._priming = self._priming, True
        try:
            with torch.no_grad():
                value = self.evaluate()
        finally:
            self._priming = was
        t = value.detach().float().reshape(()) if hasattr(value, "detach") else torch.tensor(float(value))
        return float(t.item()), loss_bits(t)

    def _kept_loss(self, step: int) -> Any:
        if self._loss is None:
            raise UserError(f"step {step} ended without session.step_done(loss): call it at the end of each step")
        return self._loss

    def _rank_state(self, step: int) -> dict[str, Any]:
        from burnin.rank.state import capture_rank_state  # lazy: torch; `import burnin.rank` stays torch-free

        state = capture_rank_state(step)
        if self.extra:
            state["extra"] = {name: obj.state_dict() for name, obj in self.extra.items()}
        return state

    def _checkpoint(self, done: int, keep: int) -> None:
        from burnin.rank.state import state_hash  # lazy: torch; `import burnin.rank` stays torch-free

        t_ck = time.time()
        ctx = self.ctx
        if self._dcp and self.scenario["checkpoint"].get("async_save"):
            self._checkpoint_async(done, keep, t_ck)
            return
        model_state = None
        if self.save_fn is None and ctx.rank == 0:
            model_state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        saved = checkpoint.save(self.ckpt_dir, done, ctx.rank, ctx.world_size, self._rank_state(done), model_state,
                                keep=keep, writer=self.save_fn, writer_kind="dcp" if self._dcp else "loop")
        # (a sharded model's hash is collective: every rank computes it, rank 0 reports it)
        digest = state_hash(self.model, self.optimizer) if self.sharded or saved is not None else None
        if saved is not None:
            ctx.events.emit("checkpoint_saved", checkpoint_step=done, state_hash=digest, seconds=time.time() - t_ck)

    # -- asynchronous DCP saves (`checkpoint.async_save`) ---------------------------------------

    def _checkpoint_async(self, done: int, keep: int, t_ck: float) -> None:
        """Start checkpoint `done` in the background: this rank's own file now, the shards by DCP's thread
        (the state staged first, so training may go on changing it). The previous save, if still in
        flight, is finished and committed first, as torchtitan does. Committed once every rank's write is
        done (`_commit_if_written`, at each step's end); a rank that dies before leaves it uncommitted,
        and a restart refuses it."""
        import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

        from burnin.rank.sharding import dcp_save  # lazy: torch; `import burnin.rank` stays torch-free
        from burnin.rank.state import state_hash  # lazy: torch; `import burnin.rank` stays torch-free

        self._commit_pending()
        if self._ckpt_group is None:  # the write's collectives on a group of their own (collective: once)
            self._ckpt_group = dist.new_group(backend="gloo")
        path = checkpoint.step_dir(self.ckpt_dir, done)
        mine = checkpoint.write_part(path, self.ctx.rank, self._rank_state(done), None, crash_mid_write=False)
        future = dcp_save(self.model, self.optimizer, path, group=self._ckpt_group,
                          crash_after=checkpoint.crash_armed("write"))
        digest = state_hash(self.model, self.optimizer)  # collective on a sharded model
        self._pending = {"step": done, "future": future, "mine": mine, "keep": keep, "digest": digest,
                         "t0": t_ck, "staged_s": time.time() - t_ck}

    def _commit_if_written(self) -> None:
        """Commit the save in flight once every rank's write is done (a one-integer all-reduce per step
        while one is in flight: the ranks must agree on the step at which it commits)."""
        import torch  # lazy: torch; `import burnin.rank` stays torch-free
        import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

        flag = torch.tensor([1 if self._pending["future"].done() else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()):
            self._commit_pending()

    def _commit_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        t_wait = time.time()
        pending["future"].result()  # a failed write raises here, as a synchronous save would
        waited = time.time() - t_wait
        ctx = self.ctx
        saved = checkpoint.commit(self.ckpt_dir, pending["step"], ctx.rank, ctx.world_size, pending["mine"],
                                  pending["keep"], writer=True, writer_kind="dcp")
        if saved is not None:
            ctx.events.emit("checkpoint_saved", checkpoint_step=pending["step"], state_hash=pending["digest"],
                            seconds=pending["staged_s"], asynchronous=True, waited_s=round(waited, 4),
                            committed_after_s=round(time.time() - pending["t0"], 4))

    def _prime(self, step: int) -> Iterator[int]:
        """Make a resumed group all-reduce with the bucket layout of an uninterrupted run.

        DDP rebuilds its gradient buckets once, after the first backward of each DDP instance. An
        uninterrupted run reduces step 0 with the initial layout and every later step with the rebuilt
        one; a group resumed at step k would reduce step k with the initial layout. With three or more
        ranks the ring all-reduce sums an element in an order that depends on its position in the bucket,
        so that one step would differ in its last bits (measured: 3 ranks, resume at 10, loss bits differ
        from step 11 on; with two, a + b is b + a). So the loop runs step k once as a throwaway, with no
        fault, detector or event, and then loads the state of step k again, whatever the step changed
        (the loop's scheduler, say) put back by the same load as the resume's."""
        import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

        self._priming = True
        try:
            self.begin(step)
            yield step
            self._kept_loss(step)
        finally:
            self._priming = False
        self.optimizer.zero_grad(set_to_none=True)
        self._load(self._tier, step)
        dist.barrier()

    # -- campaigns -------------------------------------------------------------------------------

    def run_step(self, step: int, body: Callable[[int], Any]) -> tuple[float, str, float]:
        """Execute one step outside steps() (a data-fault campaign's trials): (loss, loss bits, grad norm)."""
        from burnin.rank.state import loss_bits  # lazy: torch; `import burnin.rank` stays torch-free

        self.begin(step)
        loss = body(step)
        return float(loss.item()), loss_bits(loss), self.grad_norm


def _node_interface(spec: dict[str, Any]) -> Any:
    """Under torchrun, the node's interface the operator named for NIC faults (else None)."""
    if not spec.get("node_interface"):
        return None
    return NodeInterface(spec["node_interface"])


def _allreduce_hook(session: Session, bucket):  # noqa: ANN001 -- DDP inspects the annotation: none, or a real GradBucket
    """DDP comm hook: the `after_backward` point on each local bucket, then the usual averaging.

    Always registered (golden runs too), so faulted and fault-free runs reduce the same way."""
    import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

    if session.t_compute is None:
        session.t_compute, session.w_compute = time.perf_counter(), session.waited()
    # this rank's own gradient as it computed it, before any injected fault and before the average hides
    # whose it was: a fleet's fingerprint. Summed over every bucket, so DDP's bucket layout (rebuilt after a
    # restart's first step) does not enter it.
    if session._digest_grads:  # a burn-in's fingerprint only: the rest of runs keep their step as it was
        digest = _bits_sum(bucket.buffer())
        session.grad_digest = digest if session.grad_digest is None else session.grad_digest + digest
    session.point("after_backward", bucket=bucket)
    buf = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _bits_sum(t: Any) -> Any:
    """The sum of a tensor's elements read as integers (a 0-d int64 tensor, not synchronised): any one bit
    flipped in it changes the sum. Cheap: one pass, no hashing."""
    import torch  # lazy: torch; `import burnin.rank` stays torch-free

    flat = t.detach().reshape(-1)
    view = {4: torch.int32, 2: torch.int16, 8: torch.int64}.get(flat.element_size(), torch.uint8)
    return flat.view(view).sum(dtype=torch.int64)


def _local(p: Any) -> Any:
    """A parameter's local tensor (a sharded model's DTensor: this rank's shard)."""
    return p.to_local() if hasattr(p, "to_local") else p


def _update_rms(model: Any, before: list[Any]) -> float:
    """The root mean square of (parameters now - `before`) over this rank's elements (its shards)."""
    import torch  # lazy: torch; `import burnin.rank` stays torch-free

    sq = torch.zeros((), dtype=torch.float64)
    n = 0
    for p, q in zip(model.parameters(), before):
        d = _local(p).detach().double() - q.double()
        sq += (d * d).sum().cpu()
        n += d.numel()
    return float((sq / max(n, 1)).sqrt())


def _grad_norm(model: Any) -> float:
    import torch  # lazy: torch; `import burnin.rank` stays torch-free

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                      for g in grads])))


def _open_snapshots(spec: dict[str, Any], rank: int, world_size: int, events: Any) -> Any:
    """This rank's memory snapshot store, its slots verified (each bad one reported); None when the
    run keeps none (no directory from the supervisor: golden runs, torchrun; `memory_every: 0`; campaigns)."""
    if not spec.get("snapshot_dir") or not spec["scenario"]["checkpoint"].get("memory_every") or "campaign" in spec:
        return None

    return RankSnapshots(spec["snapshot_dir"], rank, world_size,
                         on_reject=lambda path, step, why: events.emit("snapshot_rejected", snapshot_step=step,
                                                                       file=path.name, reason=why))


def _choose_resume(ckpt_dir: Path, snaps: Any, rank: int, world_size: int, events: Any,
                   foreign: tuple[int, int] | None = None) -> tuple[str | None, int]:
    """(tier, step) to resume from, the same on every rank: ("memory", s), ("disk", s) or (None, 0).
    `foreign`: (step, ranks) of another run's checkpoint this run started from (`--resume-from`).

    Collective. Each rank offers the steps of its verified snapshots; rank 0 takes the newest one
    every rank has, verifies only the disk checkpoints newer than it (the newer tier wins; memory
    wins a tie: the same state, cheaper to load), and broadcasts the choice."""
    import torch  # lazy: torch; `import burnin.rank` stays torch-free
    import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free

    # (integers in tensors, one collective each way: the pickled object collectives took two each, and
    # this is on every recovery's critical path)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    offered: list[Any] = [None] * world_size
    if snaps is not None:  # each rank's (step, layout digest) of its verified slots
        mine = [-1] * (2 * SLOTS)
        for i, (step, layout) in enumerate(sorted(snaps.steps().items())[:SLOTS]):
            mine[2 * i:2 * i + 2] = [step, zlib.crc32(layout.encode())]
        rows = [torch.zeros(2 * SLOTS, dtype=torch.int64, device=device) for _ in range(world_size)]
        dist.all_gather(rows, torch.tensor(mine, dtype=torch.int64, device=device))
        offered = [{int(r[2 * i]): str(int(r[2 * i + 1])) for i in range(SLOTS) if r[2 * i] >= 0}
                   for r in (row.tolist() for row in rows)]
    choice = torch.zeros(2, dtype=torch.int64, device=device)  # (tier: 0 none, 1 memory, 2 disk; step)
    if rank == 0:
        memory = common_step(offered) if snaps is not None else None
        ckpt = checkpoint.newest_valid(
            ckpt_dir, world_size, above=memory, foreign=foreign,
            on_reject=lambda c, why: events.emit("checkpoint_rejected", checkpoint_step=c.step, reason=why))
        if ckpt is not None:
            choice[:] = torch.tensor([2, ckpt.step])
        elif memory is not None:
            choice[:] = torch.tensor([1, memory])
    dist.broadcast(choice, src=0)
    tier, step = choice.tolist()
    return (None, "memory", "disk")[tier], step
