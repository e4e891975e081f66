"""Failure models for `burnin forecast`: how often GPUs of a real cluster interrupted a training job, by cause.

A failure model is a YAML (or JSON) file: the cluster's size and the length of the observation, and
per cause a count of the job interruptions it caused and its *scope*, which decides which recovery
tier can take it: `process` (the machines stay healthy; the ranks restart on them, their in-memory
snapshots intact) or `machine` (a machine, or a GPU of it, leaves the job; its ranks move to another
machine, and its shared memory is out of reach). The per-GPU rate of a cause is its count divided by
GPUs x time observed.

Bundled: `llama3` (Table 5 of "The Llama 3 Herd of Models", Meta, 2024). Your own:

```yaml
name: our-cluster
title: 30 days of our 2,048-GPU cluster
source: incident log, 2025-01 to 2025-02
gpus: 2048
days: 30
categories:
  - {name: GPU fell off the bus, count: 9, scope: machine}
  - {name: NCCL timeout, count: 4, scope: process}
```
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from burnin.errors import UserError, oneline, short

__all__ = ["Category", "FailureModel", "bundled", "load"]

_MAX_BYTES = 1 << 20


class Category(BaseModel):
    """One cause of interruptions."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=120)
    group: str = Field("", max_length=120, description="the source's own grouping (GPU, Host, Network, ...)")
    count: int = Field(ge=0, le=10**9, description="interruptions of the job this cause made in the observation")
    scope: Literal["machine", "process"]
    why: str = Field("", max_length=400, description="why this scope")


class FailureModel(BaseModel):
    """A cluster's interruptions by cause, over `days` on `gpus` GPUs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=80)
    title: str = Field("", max_length=200)
    source: str = Field("", max_length=400)
    url: str | None = Field(None, max_length=400)
    gpus: int = Field(ge=1, le=10**8, description="GPUs the job ran on during the observation")
    days: float = Field(gt=0, le=36500, allow_inf_nan=False, description="length of the observation")
    planned: int | None = Field(None, ge=0, description="planned interruptions in the same time: not counted")
    categories: list[Category] = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _check(self) -> FailureModel:
        names = [c.name for c in self.categories]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"category {dup!r} appears twice; merge its counts")
        if self.total == 0:
            raise ValueError("every count is 0: the model has no failures to forecast")
        return self

    @property
    def total(self) -> int:
        return sum(c.count for c in self.categories)

    @property
    def gpu_seconds(self) -> float:
        return self.gpus * self.days * 86400.0

    def rate(self, category: Category) -> float:
        """Interruptions per GPU-second of this cause."""
        return category.count / self.gpu_seconds

    def rates_by_scope(self) -> dict[str, float]:
        """Interruptions per GPU-second, summed by scope."""
        out = {"machine": 0.0, "process": 0.0}
        for c in self.categories:
            out[c.scope] += self.rate(c)
        return out


def bundled() -> list[str]:
    """Names of the failure models shipped with burnin."""
    return sorted(p.name[:-5] for p in files(__name__).iterdir() if p.name.endswith(".yaml"))


def load(spec: str, flag: str = "--failure-model") -> FailureModel:
    """A bundled model by name, or a YAML/JSON file; bad input is a one-line UserError naming `flag`."""
    if spec in bundled():
        return _parse((files(__name__) / f"{spec}.yaml").read_text(encoding="utf-8"), spec, flag)
    path = Path(spec)
    names = ", ".join(bundled())
    try:
        if "\x00" in spec or not path.is_file():
            raise UserError(f"{flag}: {short(oneline(spec))} is neither a bundled failure model ({names}) nor a "
                            f"file; give one of those names or the path of a YAML or JSON file")
        if path.stat().st_size > _MAX_BYTES:
            raise UserError(f"{flag}: {oneline(spec)} is larger than {_MAX_BYTES >> 20} MiB; a failure model is a "
                            "short YAML or JSON file")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{flag}: cannot read {oneline(spec)}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{flag}: {oneline(spec)} is not UTF-8 text; give a YAML or JSON file") from None
    return _parse(text, oneline(spec), flag)


def _parse(text: str, where: str, flag: str) -> FailureModel:
    try:
        data = json.loads(text) if where.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{flag}: {where}{line}: not valid YAML/JSON ({oneline(what)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{flag}: {where}: expected a mapping with name, gpus, days and categories; "
                        f"see docs/forecast.md")
    try:
        return FailureModel.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise UserError(f"{flag}: {where}: {loc}: {oneline(msg)}{more}; see docs/forecast.md") from None
