"""Storage faults: damage to checkpoints on disk, which the loader must catch by checksum."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from burnin.errors import HarnessError
from burnin.faults.base import Fault
from burnin.faults.registry import register

__all__ = ["CheckpointCorrupt"]


class CheckpointCorruptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["flip", "truncate"] = Field("flip", description="flip bytes, or cut the file short")
    file: Literal["model", "rank"] = Field("model", description="the model/optimizer file or the target rank's own file")
    nbytes: int = Field(8, ge=1, le=1 << 20, description="how many bytes to flip (mode: flip)")
    keep_fraction: float = Field(0.5, ge=0, lt=1, description="fraction of the file kept (mode: truncate)")
    seed: int = Field(0, ge=0, description="chooses which bytes are flipped")


@register
class CheckpointCorrupt(Fault):
    """Flip bytes in, or truncate, a file of the newest committed checkpoint."""

    name = "storage.checkpoint_corrupt"
    summary = "flip bytes in, or truncate, the newest checkpoint (the loader must fall back)"
    where = "out_of_rank"
    Params = CheckpointCorruptParams
    disruptive = False  # harmless until a restart loads the damaged checkpoint

    def inject(self, ctx: Any) -> dict[str, Any]:
        from burnin.harness import checkpoint

        newest = checkpoint.committed(ctx.checkpoint_dir)
        if not newest:  # validation refuses a step before the first checkpoint: this is a harness error
            raise HarnessError(f"no committed checkpoint in {ctx.checkpoint_dir} to damage at step {ctx.step}")
        ckpt = newest[-1]
        p = self.params
        target: Path = ckpt.path / (checkpoint.MODEL_FILE if p.file == "model" else checkpoint.rank_file(ctx.rank))
        size = target.stat().st_size
        if p.mode == "truncate":
            keep = int(size * p.keep_fraction)
            os.truncate(target, keep)
            return {"checkpoint_step": ckpt.step, "file": target.name, "mode": "truncate", "size": size, "kept": keep}
        rng = random.Random(p.seed)
        offsets = sorted(rng.sample(range(size), min(p.nbytes, size)))
        with open(target, "r+b") as fh:
            for off in offsets:
                fh.seek(off)
                b = fh.read(1)[0]
                fh.seek(off)
                fh.write(bytes([b ^ 0xFF]))
            fh.flush()
            os.fsync(fh.fileno())
        return {"checkpoint_step": ckpt.step, "file": target.name, "mode": "flip", "offsets": offsets[:16]}
