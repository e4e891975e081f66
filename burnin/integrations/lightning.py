"""burnin for a PyTorch Lightning `Trainer`: one callback, and the checkpoint to resume from.

    from burnin.integrations.lightning import BurninCallback

    burnin_cb = BurninCallback()
    trainer = L.Trainer(accelerator="cpu", devices=int(os.environ.get("WORLD_SIZE", 1)), max_steps=n,
                        callbacks=[burnin_cb])
    trainer.fit(model, loader, ckpt_path=burnin_cb.resume_path())

Under burnin each rank is a process burnin started with the torchrun environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT...). Lightning sees LOCAL_RANK and joins the group instead of
spawning ranks of its own (its LightningEnvironment, or TorchElasticEnvironment under torchrun), so
`devices` must be the number of ranks. The callback maps Lightning's hooks onto the callback form of
the rank API (`burnin.rank.session`):

| Lightning hook | burnin |
|---|---|
| `on_fit_start` | `attach(ddp, optimizer, save=, load=)` and `start()`: resume, every RNG put back |
| `on_train_start` | checks (the checkpoint Lightning loaded is burnin's; checkpoints fall on epoch ends); a resumed epoch starts as a fresh one |
| `on_train_batch_start` | `begin_step(trainer.global_step)` |
| `on_train_batch_end` | `end_step(loss)`: detectors, the step's event, burnin's checkpoint, `between_steps` |
| `on_fit_end` | `finish()` |

Resume. burnin's checkpoint holds a Lightning checkpoint (`trainer.save_checkpoint`: weights, optimizer,
schedulers, the loops' position) beside each rank's RNG state, under one SHA-256 manifest. Before `fit`,
`resume_path()` names the newest burnin checkpoint that verifies (no process group needed: every rank
reads the same files), and Lightning restores from it; in `on_fit_start` burnin chooses the same one over
the group and puts back every RNG. That is before Lightning creates the epoch's DataLoader iterator,
which draws its seed from the torch RNG, as the uninterrupted run's iterator did after the checkpoint.

Lightning resumes a DataLoader at the start of its epoch, not at the batch a checkpoint was taken
after, and a fresh iterator draws from the RNG where the uninterrupted run drew nothing; so a resume is
exact only from the end of an epoch. The callback refuses a `checkpoint.every` that puts a checkpoint
inside an epoch (make it a multiple of the epoch's steps). A loop driven by callbacks cannot run a step
again: use `recovery.mode: restart` (`end_step` refuses a rollback or recomputation).

Outside burnin the callback does nothing and `resume_path()` is None: the script trains as it did.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

try:
    import lightning
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # the optional extra
    raise ImportError("burnin.integrations.lightning needs Lightning 2.5 or later: "
                      "pip install 'burnin[lightning]'") from exc

# Measured: Lightning 2.4 resumes a checkpoint taken after an epoch's last batch by running that batch again.
if tuple(int(p) for p in lightning.__version__.split(".")[:2] if p.isdigit()) < (2, 5):
    raise ImportError(f"burnin.integrations.lightning needs Lightning 2.5 or later (found {lightning.__version__}): "
                      "2.4 resumes from the end of an epoch by running its last batch again")

from burnin.errors import UserError
from burnin.rank import checkpoint
from burnin.rank.session import Session, attach, current

__all__ = ["BurninCallback", "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "lightning.ckpt"  # the Lightning checkpoint inside each of burnin's checkpoints


class BurninCallback(Callback):
    """Puts a Lightning `Trainer.fit` under burnin: faults at its step points, burnin's checkpoints
    (holding Lightning's own), an exact resume after a restart, the events the verdict reads."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self._trainer: Any = None
        self._loaded: Path | None = None  # the burnin checkpoint the session resumed from

    def resume_path(self) -> str | None:
        """The Lightning checkpoint inside the newest burnin checkpoint that verifies, for
        `trainer.fit(..., ckpt_path=)`; None outside burnin or before the first checkpoint."""
        ctx = current()
        if ctx is None:
            return None
        ckpt = checkpoint.newest_valid(Path(ctx.spec["checkpoint_dir"]), ctx.world_size)
        if ckpt is None:
            return None
        path = ckpt.path / CHECKPOINT_FILE
        if not path.is_file():
            raise UserError(f"burnin's checkpoint {ckpt.path} holds no {CHECKPOINT_FILE}: it was not written by "
                            "BurninCallback")
        return str(path)

    # -- Lightning's hooks ---------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        ctx = current()
        if ctx is None:
            return
        _check_trainer(trainer, ctx)
        steps = ctx.spec["scenario"]["workload"]["steps"]
        if trainer.max_steps != steps or trainer.max_epochs not in (None, -1):
            if ctx.rank == 0:
                ctx.events.emit("note", text=f"the Trainer asked for max_steps={trainer.max_steps}, "
                                             f"max_epochs={trainer.max_epochs}; the scenario's workload.steps={steps} "
                                             "rules under burnin")
            trainer.fit_loop.epoch_loop.max_steps = steps
            trainer.fit_loop.max_epochs = -1
        self._trainer = trainer
        # trainer.strategy.model: the DistributedDataParallel module Lightning wrapped (its comm hook and
        # forward pre-hook are burnin's step points), or the LightningModule on one device
        self.session = attach(trainer.strategy.model, trainer.optimizers[0], save=self._save, load=self._load)
        # Resume now, before the fit loop creates the DataLoader's iterator: creating it draws from the
        # torch RNG, and the uninterrupted run drew that seed after the checkpoint's RNG state was taken.
        self.session.start(steps)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.session is None:
            return
        loaded = self._loaded / CHECKPOINT_FILE if self._loaded is not None else None
        given = trainer.ckpt_path
        if (Path(given).resolve() if given else None) != (loaded.resolve() if loaded else None):
            raise UserError(f"Lightning resumed from {given or 'no checkpoint'}, burnin from {loaded or 'none'}: give "
                            "trainer.fit ckpt_path=callback.resume_path()")
        _check_epochs(trainer, self.session.scenario["checkpoint"]["every"], trainer.max_steps)
        _close_restart(trainer.fit_loop)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.session is not None:
            self.session.begin_step(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.session is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or not hasattr(loss, "item"):
            raise UserError(f"step {self.session.step}: training_step returned no loss (got {type(outputs).__name__}); "
                            "burnin judges each step by its loss: return it, or a dict with 'loss'")
        self.session.end_step(loss)
        if self.session.should_stop(trainer.global_step):  # a burn-in's time is up
            trainer.should_stop = True

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # on_fit_end, not on_train_end: a fit resumed at its last step skips the training loop and its hooks
        if self.session is not None:
            self.session.finish(trainer.global_step - 1)

    # -- burnin's checkpoints, through Lightning's -----------------------------------------------

    def _save(self, directory: Path) -> None:
        # every rank calls it (Lightning's save is collective); rank 0 writes the file
        self._trainer.save_checkpoint(directory / CHECKPOINT_FILE)

    def _load(self, directory: Path) -> None:
        # Lightning has loaded it (fit's ckpt_path); on_train_start checks it was this one
        self._loaded = directory


def _check_trainer(trainer: Any, ctx: Any) -> None:
    """The Trainer must be one rank of burnin's group, stepping once per batch with one optimizer."""
    if trainer.world_size != ctx.world_size or trainer.global_rank != ctx.rank:
        raise UserError(f"the Trainer is rank {trainer.global_rank} of {trainer.world_size}, burnin started rank "
                        f"{ctx.rank} of {ctx.world_size}: give L.Trainer devices=int(os.environ['WORLD_SIZE']) "
                        "(burnin starts the ranks, as torchrun does)")
    if trainer.accumulate_grad_batches != 1:
        raise UserError(f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}): burnin counts a step "
                        "per batch; leave it at 1")
    if len(trainer.optimizers) != 1:
        raise UserError(f"configure_optimizers gave {len(trainer.optimizers)} optimizers; burnin attaches to one")


def _close_restart(fit_loop: Any) -> None:
    """Start the epoch after a checkpoint taken at the end of the one before as a fresh epoch.

    Resuming from a checkpoint written after an epoch's last batch, Lightning (2.5, 2.6) counts that epoch
    done but still takes the run as restarted inside it: the next epoch then runs without
    `on_train_epoch_start` and without being counted as started, so the checkpoint at its end resumes
    the epoch after it with the sampler's order of the one before (`set_epoch` takes the count).
    Measured: a second resume diverged at its first step. Forgetting the restart stage makes the next
    epoch start as in the uninterrupted run."""
    if (getattr(fit_loop, "restarted_mid_epoch", False) and fit_loop.epoch_loop.restarted_on_train_batch_end
            and fit_loop.epoch_loop.batch_progress.is_last_batch):
        fit_loop.reset_restart_stage()


def _check_epochs(trainer: Any, every: int, total: int) -> None:
    """Refuse a checkpoint inside an epoch: Lightning would resume it from the epoch's first batch."""
    per_epoch = trainer.num_training_batches
    inside = next((s for s in range(every, total, every) if math.isinf(per_epoch) or s % per_epoch), None)
    if inside is None:
        return
    epoch = "an epoch without end (a loader with no length)" if math.isinf(per_epoch) else \
        f"an epoch of {per_epoch} steps"
    raise UserError(f"checkpoint.every: {every} puts a checkpoint at step {inside}, inside {epoch}; Lightning "
                    "resumes a DataLoader at the start of its epoch, so the resume would not be exact: make "
                    "checkpoint.every a multiple of the steps of an epoch")
