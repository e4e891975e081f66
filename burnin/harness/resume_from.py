"""Starting a run from another run's checkpoint: `burnin run SCENARIO --resume-from PATH`.

The checkpoint (a run directory's newest that verifies, or one `checkpoints/step_N` of it) is checked
against its manifest and against the scenario before anything starts, then copied into the new run's
checkpoint directory, where every attempt's resume finds it as the newest. A sharded checkpoint (DCP)
loads onto another mesh or world size: DCP reshards each tensor by its global offsets. A resume that
changes what is trained (another world size or mesh: another global batch, other reduction orders) can
no longer be bit-exact with the scenario's fault-free run, so the run is judged in tolerance mode and
says why; one that changes nothing of the workload keeps the scenario's comparison.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from burnin.core.checkpoints import MANIFEST, Checkpoint, listed, newest_valid, step_dir, verify
from burnin.errors import CheckpointError, UserError, oneline
from burnin.scenarios.schema import Workload

__all__ = ["Source", "resolve", "install"]

FLAG = "--resume-from"
#: Workload fields that change what the weights mean: a checkpoint of another value does not load.
_SAME = ("model", "seq_len", "kernels")


@dataclass(frozen=True)
class Source:
    """A verified checkpoint of another run, and how the new run differs from the run that wrote it."""

    path: Path
    step: int
    world_size: int
    writer: str
    changed: str | None  # why the run is judged in tolerance mode (None: the workload is the same)
    workload: dict[str, Any]  # the workload that wrote it (its run's scenario.json)

    def reference(self, scenario: Any) -> Any:
        """What the run is compared with: the scenario itself when the workload is unchanged; else the
        fault-free run of the workload that wrote the checkpoint, to the scenario's last step. A step
        trains on the same sequences on either (the global batch is the same: `resolve` checks), so the
        two follow one trajectory up to the rounding of other reduction orders, and tolerance mode says
        how far they part."""
        if self.changed is None:
            return scenario
        theirs = Workload.model_validate({**self.workload, "steps": scenario.workload.steps})
        return scenario.model_copy(update={"workload": theirs, "faults": []})

    def spec(self) -> dict[str, Any]:
        """What the ranks are told (`spec["resume_from"]`): the checkpoint step to accept from `world_size`
        ranks, and whether its rank files (each rank's RNG) belong to ranks of this run."""
        return {"step": self.step, "world_size": self.world_size, "ranks_match": self.changed is None}

    def event(self) -> dict[str, Any]:
        return {"path": str(self.path), "checkpoint_step": self.step, "written_by_ranks": self.world_size,
                "writer": self.writer, "tolerance_because": self.changed}


def resolve(arg: str, scenario: Any) -> tuple[Any, Source]:
    """The checkpoint `arg` names, verified and fit for `scenario`, and the scenario as it will run (in
    tolerance mode when the resume changes the workload). UserError, one line, when it cannot be used."""
    path = Path(arg)
    try:
        there, is_run = path.exists(), (path / "checkpoints").is_dir()
        is_ckpt = (path / MANIFEST).is_file()
    except (OSError, ValueError):  # a name the file system cannot take (a NUL byte, too long)
        there = is_run = is_ckpt = False
    if not arg.strip() or not there:
        raise UserError(f"{FLAG}: {oneline(arg)!r} does not exist; give a run directory, or one of its checkpoints "
                        "(RUN/checkpoints/step_N)")
    if is_run:
        run_dir = path
        ckpt = newest_valid(path / "checkpoints", world_size=None)  # type: ignore[arg-type]
        if ckpt is None:
            found = len(listed(path / "checkpoints"))
            raise UserError(f"{FLAG}: {path}/checkpoints holds no checkpoint that verifies ({found} found); "
                            "give a run directory with a committed checkpoint")
    elif is_ckpt and path.name.startswith("step_") and path.name[5:].isdigit():
        run_dir = path.parent.parent
        ckpt = Checkpoint(int(path.name[5:]), path)
    else:
        raise UserError(f"{FLAG}: {oneline(path)} is neither a run directory (with checkpoints/) nor a committed "
                        "checkpoint (checkpoints/step_N with its manifest.json); give one of those")
    try:
        manifest = verify(ckpt)
    except CheckpointError as exc:
        raise UserError(f"{FLAG}: {ckpt.path} does not verify ({exc}); give another checkpoint") from None
    try:
        source_sc = json.loads((run_dir / "scenario.json").read_text())
        theirs = source_sc["workload"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{FLAG}: {run_dir}/scenario.json is missing or unreadable, so what wrote the checkpoint "
                        "is unknown; give a checkpoint inside a burnin run directory") from None
    w = scenario.workload
    mine = w.model_dump(mode="json")
    if w.entry is not None or theirs.get("entry") is not None:
        raise UserError(f"{FLAG}: resuming another run's checkpoint is for burnin's own workload; a loop "
                        "(workload.entry) resumes from its own checkpoints")
    for field in _SAME:
        if theirs.get(field) != mine[field]:
            raise UserError(f"{FLAG}: the checkpoint was written with workload.{field}={theirs.get(field)!r} and "
                            f"this scenario has {mine[field]!r}; they must be the same")
    tp_theirs = (theirs.get("parallel") or {}).get("tp", 1)
    tp_mine = w.parallel.tp if w.parallel is not None else 1
    if tp_theirs != tp_mine:
        raise UserError(f"{FLAG}: the checkpoint was written with tensor parallel tp={tp_theirs} and this scenario "
                        f"has tp={tp_mine}; the q/k/v rows are laid out per tensor-parallel rank, so tp must match")
    writer = str(manifest.get("writer", "burnin"))
    want = "dcp" if w.parallel is not None else "burnin"
    if writer != want:
        what = {"dcp": "a sharded model's (DCP)", "burnin": "a replicated model's (model.pt)"}.get(writer, writer)
        raise UserError(f"{FLAG}: the checkpoint is {what} and this scenario's model is "
                        f"{'sharded (workload.parallel)' if want == 'dcp' else 'replicated (DDP)'}; resume a "
                        f"checkpoint written the same way")
    if ckpt.step >= w.steps:
        raise UserError(f"{FLAG}: the checkpoint is of step {ckpt.step} and workload.steps={w.steps}: nothing is "
                        f"left to run; raise workload.steps (or --steps) above {ckpt.step}")
    early = [(i, f) for i, f in enumerate(scenario.faults) if f.step is not None and f.step < ckpt.step]
    if early:
        i, f = early[0]
        raise UserError(f"{FLAG}: faults[{i}] {f.fault} is at step {f.step}, before the checkpoint's step {ckpt.step} "
                        "the run starts from; move it to a later step")
    data_theirs = int(theirs.get("ranks", 0)) // tp_theirs * int(theirs.get("batch_size", 0))
    data_mine = w.ranks // tp_mine * w.batch_size
    if data_theirs != data_mine:
        per_rank, rest = divmod(data_theirs, w.ranks // tp_mine)
        fix = f"set batch_size to {per_rank}" if not rest and per_rank else f"choose ranks and batch_size that make {data_theirs}"
        raise UserError(f"{FLAG}: the checkpoint's run trained on {data_theirs} sequences a step "
                        f"({theirs.get('ranks')} ranks / tp {tp_theirs} x batch_size {theirs.get('batch_size')}) and "
                        f"this scenario on {data_mine} ({w.ranks} / {tp_mine} x {w.batch_size}); keep the global "
                        f"batch: {fix} so a step trains on the same sequences")
    ranks = int(manifest.get("world_size") or 0)
    differ = {k: (theirs.get(k), mine[k]) for k in mine
              if k not in ("steps", "compare", "tolerance") and theirs.get(k) != mine[k]}
    changed = None
    if differ:
        said = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in list(differ.items())[:4])
        changed = (f"resumed at step {ckpt.step} from a checkpoint of another workload ({said})"
                   + (", resharded by DCP" if writer == "dcp" else "")
                   + "; compared with that workload's fault-free run")
        scenario = scenario.model_copy(update={"workload": w.model_copy(update={"compare": "tolerance"})})
    return scenario, Source(ckpt.path, ckpt.step, ranks, writer, changed, theirs)


def install(source: Source, checkpoint_dir: Path) -> Path:
    """Copy the checkpoint into the new run's checkpoint directory (under its own step), where the ranks'
    resume finds it; the original is left as it is."""
    dest = step_dir(checkpoint_dir, source.step)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source.path, dest)
    return dest


def _short(value: Any) -> str:
    if isinstance(value, dict):  # a mesh: its sizes, as the scenario names them
        text = " ".join(f"{k}={v}" for k, v in value.items() if v != 1) or "1"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
