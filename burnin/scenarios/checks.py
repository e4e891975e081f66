"""Checks of a scenario that need more than one field, or more than pydantic's lax types say.

- No boolean is taken for a number, in the scenario's models and in every fault's Params (a plug-in's
  too): pydantic's lax mode reads `keep: true` as 1.
- A fault fits the workload it runs in: the tensor and element it names exist in the preset's model
  (known without building it, `burnin.core.model_shapes`), the ranks it cuts off leave a side,
  a checkpoint exists for it to damage.
- Every fault a campaign's `vary:` can draw is valid (each combination of the choices, a range by
  its two ends), and a campaign can run it.

Each raises a pydantic ValidationError located at the field to fix, so the loader reports it as
`file:line: field: message` like any other error. `burnin validate` refuses what `run` would.
"""

from __future__ import annotations

import decimal
import difflib
import itertools
import json
import math
import types
import typing
from collections import abc
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from burnin.errors import short
from burnin.faults import registry
from burnin.faults.base import COLLECTIVE_POINTS
from burnin.faults.corruption import Bitflip, NaN, StuckBit, workload_problem

if TYPE_CHECKING:
    from burnin.scenarios.schema import FaultSpec, Scenario

__all__ = ["NOT_A_BOOLEAN", "MAX_VARY_COMBINATIONS", "boolean_for_number", "params_model", "check_fault",
           "invalid", "short", "rank_problem", "step_problem", "RECOVERY_FAULTS"]

#: `vary:` is checked by validating every combination of its choices (a range counts as its two
#: ends); a fault whose choices make more combinations than this is refused.
MAX_VARY_COMBINATIONS = 20_000

Loc = tuple[str | int, ...]
NOT_A_BOOLEAN = "must be a number, not a boolean"

#: The faults a process-fault (recovery) campaign draws from; a campaign draws these or in-rank data
#: faults, not both.
RECOVERY_FAULTS = ("process.kill", "process.hang", "process.exception", "storage.checkpoint_corrupt",
                   "storage.snapshot_corrupt", "storage.save_crash", "network.coordinator_cut")


# --- numbers are not booleans ---------------------------------------------------------

def invalid(loc: Loc, message: str, value: Any = None, *, title: str = "Scenario") -> ValidationError:
    """A validation error at `loc` (relative to the model being validated), with `message` as its text.

    The loader puts it on the line of `loc`; the message must not open with `word: `, which the
    loader would read as a further field name.
    """
    return ValidationError.from_exception_data(title, [
        {"type": "value_error", "loc": tuple(loc), "input": value, "ctx": {"error": ValueError(message)}}])


def boolean_for_number(model: type[BaseModel], data: dict[str, Any], *,
                       skip: type[BaseModel] | None = None) -> tuple[Loc, Any] | None:
    """Where `data`, read as `model`, gives a boolean to a number field (at any depth), and the value.

    pydantic's lax mode takes True as 1 for an int or float field; a scenario must say a number.
    Walks the fields' types (unions, lists, tuples, dicts, nested models), so it works for any
    model, a plug-in fault's Params too. Nested models that are subclasses of `skip` are left to
    check themselves.
    """
    return _bool_in_model(model, data, (), skip, 0)


def _bool_in_model(model: type[BaseModel], data: dict[str, Any], loc: Loc, skip: Any, depth: int):
    for name, field in model.model_fields.items():
        key = field.alias if isinstance(field.alias, str) and field.alias in data else name
        if key in data:
            found = _bool_in(field.annotation, data[key], loc + (key,), skip, depth + 1)
            if found is not None:
                return found
    return None


def _bool_in(tp: Any, value: Any, loc: Loc, skip: Any, depth: int):
    if depth > 32:
        return None
    members = _members(tp)
    if isinstance(value, bool):
        if any(_takes_bool(m) for m in members) or not any(_takes_number(m) for m in members):
            return None
        return loc, value
    found = None
    for m in members:
        origin = typing.get_origin(m) or m
        args = typing.get_args(m)
        if not isinstance(origin, type):
            continue
        if isinstance(value, (list, tuple, set, frozenset)) and not issubclass(origin, (str, bytes, dict)) \
                and issubclass(origin, (list, tuple, set, frozenset, abc.Sequence, abc.Set)):
            if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
                item_types = [args[0]] * len(value)
            elif origin is tuple and args:
                item_types = list(args) + [Any] * max(0, len(value) - len(args))
            else:
                item_types = [args[0] if args else Any] * len(value)
            items = value if isinstance(value, (list, tuple)) else list(value)
            problem = next((p for j, (t, x) in enumerate(zip(item_types, items))
                            if (p := _bool_in(t, x, loc + (j,), skip, depth + 1)) is not None), None)
        elif isinstance(value, dict) and issubclass(origin, BaseModel):
            if skip is not None and issubclass(origin, skip):
                return None  # it checks itself
            problem = _bool_in_model(origin, value, loc, skip, depth + 1)
        elif isinstance(value, dict) and issubclass(origin, (dict, abc.Mapping)):
            vt = args[1] if len(args) == 2 else Any
            problem = next((p for k, x in value.items()
                            if (p := _bool_in(vt, x, loc + (k,), skip, depth + 1)) is not None), None)
        else:
            continue
        if problem is None:
            return None  # a member of the union takes it as it is
        found = found or problem
    return found


def _members(tp: Any) -> list[Any]:
    if typing.get_origin(tp) is typing.Annotated:
        return _members(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(tp) for m in _members(a)]
    return [tp]


def _takes_bool(tp: Any) -> bool:
    if tp is bool or tp is Any or tp is object:
        return True
    return typing.get_origin(tp) is Literal and any(isinstance(a, bool) for a in typing.get_args(tp))


def _takes_number(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, (int, float, decimal.Decimal)) and not issubclass(tp, bool)


def params_model(params_cls: type[BaseModel], params: Any) -> BaseModel:
    """`params` validated as a fault's Params, with no boolean taken for a number.

    Raises pydantic's ValidationError, located at the parameter.
    """
    if isinstance(params, dict):
        where = boolean_for_number(params_cls, params)
        if where is not None:
            raise invalid(where[0], NOT_A_BOOLEAN, where[1], title=params_cls.__name__)
    return params_cls.model_validate(params)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def rank_problem(rank: int, ranks: int) -> str:
    return f"rank {short(rank)} does not exist with workload.ranks={ranks} (ranks are 0..{ranks - 1})"


def step_problem(step: int, steps: int) -> str:
    if step < 0:
        return f"step {short(step)} does not exist (workload.steps={steps}, steps are 0..{steps - 1})"
    return f"step {short(step)} is past the end of the run (workload.steps={steps}, steps are 0..{steps - 1})"


Problem = tuple[tuple[str, ...], str]  # the fields to blame, the first to change first; the message


def check_fault(sc: "Scenario", i: int, f: FaultSpec) -> None:
    """What only the whole scenario can say about fault i: it fits the workload (the tensor and
    element it names, the ranks it cuts off, a checkpoint there to damage), every fault its `vary:`
    can draw is valid, and a campaign can run it. Raises a ValidationError at the field to fix."""
    cls = registry.get(f.fault)
    at: Loc = ("faults", i)
    c = sc.campaign
    try:
        dumped = f.model_dump(mode="json")  # what a campaign draws from; a run directory keeps it too
    except Exception:  # e.g. binary data that is not UTF-8, in a value no model field types
        raise invalid(at, "holds a value that cannot be written as JSON (binary data that is not UTF-8 "
                           "text?); the run directory keeps the scenario as JSON") from None
    recovery = c is not None and any(g.fault in RECOVERY_FAULTS for g in sc.faults)
    if recovery and f.fault not in RECOVERY_FAULTS:
        raise invalid(at + ("fault",), f"a campaign draws either process faults ({', '.join(RECOVERY_FAULTS)}) or "
                                        f"in-rank data faults, not both; {f.fault} is the other kind (split the "
                                        f"campaign)", f.fault)
    if c is not None and not recovery:
        if cls.where != "in_rank":
            raise invalid(at + ("fault",), f"a data-fault campaign runs in-rank faults only; {f.fault} acts from "
                                            f"outside the rank (use `burnin run` for it)", f.fault)
        if "seed" not in cls.Params.model_fields:
            able = [n for n in registry.names()
                    if registry.get(n).where == "in_rank" and "seed" in registry.get(n).Params.model_fields]
            raise invalid(at + ("fault",), f"a campaign gives each trial's fault a drawn `seed` parameter, and "
                                            f"{f.fault} takes none; a campaign can draw {', '.join(able)}", f.fault)

    # The fault as `burnin run` fires it (vary is for campaigns); its params, rank and step are valid already.
    problem = _workload_problem(sc, cls, f, f.rank, f.step, cls.Params.model_validate(f.params),
                                window=c is not None and "step" not in f.vary)
    if problem is not None:
        fields, message = problem
        raise invalid(_fixed_loc(at, f, fields), message)

    # Every fault a campaign can draw: each combination of the choices, a range by its two ends.
    allowed = ["rank", "step", *cls.Params.model_fields]
    cands: dict[str, list[tuple[Loc | None, Any]]] = {}
    for key, spec in f.vary.items():
        loc = at + ("vary", key)
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6) if len(key) <= 200 else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise invalid(loc, f"unknown key{hint}; vary draws one of: {', '.join(allowed)}")
        value = dumped["vary"][key]
        if not isinstance(spec, list):  # a VaryRange: vary takes a list of choices or a range
            ends = [(loc + ("VaryRange", "min"), spec.min)]
            if spec.max != spec.min:
                ends.append((loc + ("VaryRange", "max"), spec.max))
            cands[key] = ends
            continue
        if not value:
            raise invalid(loc, "an empty list: there is nothing to draw; give at least one choice, or a "
                                "{min, max} range", value)
        seen: set[str] = set()
        cands[key] = []
        for j, x in enumerate(value):
            try:
                ident = json.dumps(x, sort_keys=True)
            except (TypeError, ValueError):
                ident = repr(x)
            if ident not in seen:
                seen.add(ident)
                cands[key].append((loc + ("list[any]", j), x))
    if c is not None and "seed" not in f.vary and "seed" in cls.Params.model_fields:
        cands["seed"] = [(None, 0), (None, 2**31 - 1)]  # a campaign draws it from 0..2**31-1
    if not cands:
        return
    keys = list(cands)
    count = math.prod(len(cands[k]) for k in keys)
    if count > MAX_VARY_COMBINATIONS:
        raise invalid(at + ("vary",), f"its choices make {count} combinations, more than the "
                                       f"{MAX_VARY_COMBINATIONS} burnin checks at load time; draw fewer "
                                       f"(a {{min, max}} range counts as 2)")
    for combo in itertools.product(*(cands[k] for k in keys)):
        drawn = dict(zip(keys, combo))
        rank = drawn["rank"][1] if "rank" in drawn else f.rank
        step = drawn["step"][1] if "step" in drawn else f.step
        params = {**dumped["params"], **{k: v for k, (_, v) in drawn.items() if k not in ("rank", "step")}}
        try:
            model = params_model(cls.Params, params)
        except ValidationError as exc:
            raise _drawn_params_error(at, f, drawn, exc) from None
        problem = _workload_problem(sc, cls, f, rank, step, model, window=c is not None)
        if problem is not None:
            fields, message = problem
            blamed = next((drawn[n] for n in fields if n in drawn and drawn[n][0] is not None), None)
            if blamed is not None:
                raise invalid(blamed[0], message, blamed[1])
            raise invalid(_fixed_loc(at, f, fields), f"{message} (drawn with {_drawn_text(drawn)})")


def _workload_problem(sc: "Scenario", cls: Any, f: FaultSpec, rank: Any, step: Any, params: BaseModel, *,
                      window: bool) -> Problem | None:
    """Why this fault at (rank, step) with these validated params cannot run in this scenario."""
    w, c = sc.workload, sc.campaign
    if not _whole(rank):
        return ("rank",), NOT_A_BOOLEAN if isinstance(rank, bool) else f"a rank is a whole number (got {short(rank)})"
    if not 0 <= rank < w.ranks:
        return ("rank",), rank_problem(rank, w.ranks)
    if f.at_s is not None:
        step = None  # a burn-in's fault fires at a time; its step is where it lands (checked when it fires)
    if step is None:
        pass
    elif not _whole(step):
        return ("step",), NOT_A_BOOLEAN if isinstance(step, bool) else f"a step is a whole number (got {short(step)})"
    elif not 0 <= step < w.steps:
        return ("step",), step_problem(step, w.steps)
    if step is None:
        pass
    elif window and c is not None and not c.warmup <= step < c.warmup + c.window:
        return ("step",), (f"step {step} is outside the campaign window {c.warmup}..{c.warmup + c.window - 1} "
                           f"(campaign.warmup={c.warmup}, campaign.window={c.window}); set step or vary.step "
                           f"inside it")
    if cls.name == "storage.checkpoint_corrupt" and step is not None:
        # Checkpoints are saved after every `every` steps and after the last; out-of-rank faults act
        # after their step's commit. Before the first commit there is nothing to damage.
        every = sc.checkpoint.every
        if step + 1 < every and step + 1 != w.steps:
            return ("step",), (f"no checkpoint is committed by step {step}: the first is saved after step "
                               f"{every - 1} (checkpoint.every={every}), and this fault acts after its step's "
                               f"checkpoint commit; use step {every - 1} or later")
    if cls.name == "storage.snapshot_corrupt":
        # Memory snapshots are taken after every `memory_every` steps, before the out-of-rank point.
        every = sc.checkpoint.memory_every
        if every == 0:
            return ("step",), ("there is no memory snapshot to damage (checkpoint.memory_every=0: none are "
                               "taken); set memory_every to 1 or more, or damage a checkpoint on disk "
                               "(storage.checkpoint_corrupt)")
        if step is not None and step + 1 < every:
            return ("step",), (f"no memory snapshot is taken by step {step}: the first is taken after step "
                               f"{every - 1} (checkpoint.memory_every={every}), and this fault acts after its "
                               f"step's snapshot; use step {every - 1} or later")
    if cls.name in ("network.partition", "network.partition.simulated"):
        side = list(params.ranks) if params.ranks else [rank]
        missing = [r for r in side if r >= w.ranks]
        if missing:
            return ("ranks", "rank"), (f"{rank_problem(missing[0], w.ranks)}; a partition cuts off some of "
                                       f"them from the others")
        if len(set(side)) >= w.ranks:
            what = f"rank {side[0]}" if len(set(side)) == 1 else f"ranks {short(sorted(set(side)))}"
            return ("ranks", "rank"), (f"cutting off {what} leaves no rank on the other side "
                                       f"(workload.ranks={w.ranks}); name some ranks, not all")

    at = f.point or cls(params).default_point()
    tp = w.parallel.tp if w.parallel is not None else 1
    if at == "tp_all_reduce" and w.entry is None:
        if tp <= 1:
            return ("point", "target"), ("point tp_all_reduce is a tensor-parallel layer's all-reduce, and this "
                                         "workload has no tensor parallelism (workload.parallel.tp=1); set tp > 1, or "
                                         "use another point")
    elif at in COLLECTIVE_POINTS and w.entry is None:  # a loop's own model: checked when it attaches
        replicas, shards = w.parallel.mesh(w.ranks) if w.parallel is not None else (1, 1)
        if shards <= 1:
            what = "not sharded (no workload.parallel)" if w.parallel is None else "sharded over 1 rank (dp_shard=1)"
            return ("point", "target"), (f"point {at} is inside a sharded model's collectives, and this workload is "
                                         f"{what}: it has no all-gather or reduce-scatter; shard it (workload.parallel: "
                                         f"{{dp_shard: N}}) or use a step point")
        if at == "replica_all_reduce" and replicas <= 1:
            return ("point", "target"), ("point replica_all_reduce is HSDP's all-reduce across replicas, and this "
                                         "workload has none (dp_replicate=1); set dp_replicate > 1, or use all_gather "
                                         "or reduce_scatter")
    if cls.name in (Bitflip.name, NaN.name, StuckBit.name) and w.entry is None:  # a loop's own model: when it fires
        shards, where = 1, (0, 0)
        if w.parallel is not None:
            shards = w.parallel.mesh(w.ranks)[1]
            where = w.parallel.coords(rank, w.ranks)[1:] if isinstance(rank, int) else (0, 0)
        return workload_problem(cls.name, params, point=f.point, step=step, model=w.model,
                                batch_size=w.batch_size, seq_len=w.seq_len, shards=shards,
                                rank_in_shard=where[0], tp=tp, tp_rank=where[1])
    return None


def _fixed_loc(at: Loc, f: FaultSpec, fields: tuple[str, ...]) -> Loc:
    """Where in the file the first of `fields` that is written there is (else the fault's name)."""
    for name in fields:
        if name in ("rank", "step", "point") and name in f.model_fields_set:
            return at + (name,)
        if name in f.params:
            return at + ("params", name)
    return at + ("fault",)


def _drawn_text(drawn: dict[str, tuple[Loc | None, Any]]) -> str:
    shown = [f"{k}={short(v, 40)}" for k, (loc, v) in drawn.items() if loc is not None]
    return ", ".join(shown) or "the campaign's own seed"


def _drawn_params_error(at: Loc, f: FaultSpec, drawn: dict[str, tuple[Loc | None, Any]],
                        exc: ValidationError) -> ValidationError:
    """The first error of a drawn combination's params, put where the value to change is written."""
    e = exc.errors(include_url=False)[0]
    loc = tuple(e["loc"])
    field = loc[0] if loc else None
    text = str(e["ctx"]["error"]) if e["type"] == "value_error" and "ctx" in e else e["msg"]
    if field in drawn and drawn[field][0] is not None:
        detail = {"type": e["type"], "loc": drawn[field][0] + loc[1:], "input": e.get("input")}
        if "ctx" in e:
            detail["ctx"] = e["ctx"]
        try:
            return ValidationError.from_exception_data("Scenario", [detail])
        except Exception:  # an error type of a plug-in's own: keep its message
            return invalid(detail["loc"], text, e.get("input"))
    if field == "seed" and "seed" in drawn:
        return invalid(at + ("fault",), f"a campaign draws each trial's seed from 0..{2**31 - 1}, and "
                                         f"{f.fault} refuses some of them ({text})")
    where = ".".join(str(s) for s in loc)
    varied = [v[0] for k, v in drawn.items() if v[0] is not None and k not in ("rank", "step")]
    return invalid(varied[0] if varied else at + ("params",),
                    f"drawn with {_drawn_text(drawn)}, the params are refused ({where + ': ' if where else ''}{text})")
