"""`burnin forecast`: what a run's measured recovery would be worth on 1,000 to 100,000 GPUs.

From a run, campaign or burn-in directory it takes what burnin measured (recovery time per phase,
the tier each restart resumed from and the steps it lost, the checkpoint's cost, the step time and
the in-memory snapshot's cost), adds a failure model (per-GPU interruption rates by cause; `llama3`
by default) and gives for each recovery tier the expected *goodput*, the share of wall time spent on
training that is kept, at each GPU count, with the best checkpoint interval.

The model (docs/forecast.md), all times in seconds:

- Interruptions arrive as Poisson processes: rate lambda = N x (per-GPU rate), summed over causes
  (independent failures, exponential times between them); any interruption stops the whole job.
- A tier decides, per cause, how the job comes back (`TIERS`): new processes (cold) or warm spares,
  and the state from disk or from the in-memory snapshot. A cause's *scope* (failure model) decides
  what is possible: a machine that left the job took its snapshots with it.
- Interruptions resumed from disk (rate lambda_d, M = 1/lambda_d) cost the recovery time R and the
  work since the newest checkpoint; with a checkpoint of cost delta every tau of work the useful
  share is Daly's exact expectation tau / (M e^{R/M} (e^{(tau+delta)/M} - 1)) (`useful_fraction`), to
  first order Young's 1 - delta/tau - (R + tau/2)/M, at Daly's optimum tau (`daly_interval`).
- Interruptions resumed from memory are a second level of the same model: the snapshot's cost per
  snapshot, the work since the newest snapshot, the recovery from memory plus any steps the input's
  resumes lost beyond that, at the best whole number of steps between snapshots. Goodput is the
  product of the two levels' useful shares (`tier_goodput`).
- Recovery time, checkpoint cost and step time do not change with N (each GPU keeps its own share of
  the work and of the checkpoint: weak scaling); only the failure rate grows with N.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from burnin.core.events import read_events
from burnin.errors import UserError, oneline
from burnin.reports.trials import wilson
from burnin.reports.verdict import judge_burn_in

if TYPE_CHECKING:
    from burnin.reports.failure_models import FailureModel

__all__ = ["TIERS", "DEFAULT_GPUS", "ASSUMPTIONS", "young_interval", "daly_interval", "useful_fraction",
           "tier_goodput", "Value", "Recovery", "Measured", "read_source", "compose", "parse_gpus", "forecast",
           "evaluate", "kind", "is_sdc_campaign", "sdc_forecast", "sdc_text"]

SCHEMA_VERSION = 1
DEFAULT_GPUS = (1000, 10000, 100000)
PHASES = ("detection_s", "teardown_s", "restart_s", "checkpoint_load_s", "first_step_s")

#: How each tier brings the job back, by the scope of the cause: (warm spares?, where the state comes from).
TIERS: dict[str, dict[str, tuple[bool, str]]] = {
    "disk restart": {"machine": (False, "disk"), "process": (False, "disk")},
    "warm spares": {"machine": (True, "disk"), "process": (True, "disk")},
    "in-memory snapshots": {"machine": (True, "disk"), "process": (True, "memory")},
}
TIER_WORDS = {
    "disk restart": "new processes (cold start), state from the newest disk checkpoint",
    "warm spares": "pre-started processes take over (a lost machine's ranks: on a standby machine), state "
                   "from the newest disk checkpoint",
    "in-memory snapshots": "warm spares, state from the in-memory snapshot of the last step when the machines "
                           "stayed up; from the disk checkpoint when a machine left",
}

#: Stand-ins when an input measured no restart of a kind, from docs/performance.md (tiny GPT, 2 ranks, CPU):
HANDOVER_S = 0.05   # a warm spare taking over: restart_s 0.03-0.07 s with 2-4 ranks
COLD_START_S = 3.0  # a cold restart: restart_s 2.9-3.1 s (process start, import torch, warm-up)


# -- the model: pure arithmetic on given numbers ----------------------------------------------------

def young_interval(delta: float, mtbf: float) -> float:
    """Young's first-order optimum checkpoint interval, tau = sqrt(2 delta M).

    J. W. Young, "A first order approximation to the optimum checkpoint interval", CACM 17(9), 1974.
    delta: cost of one checkpoint; M: mean time between the failures that need it.
    """
    return math.sqrt(2.0 * delta * mtbf)


def daly_interval(delta: float, mtbf: float) -> float:
    """Daly's higher-order optimum checkpoint interval (compute time between checkpoints):
    tau = sqrt(2 delta M) [1 + 1/3 sqrt(delta / 2M) + 1/9 (delta / 2M)] - delta   for delta < 2M,
    tau = M                                                                     otherwise.

    J. T. Daly, "A higher order estimate of the optimum checkpoint interval for restart dumps",
    Future Generation Computer Systems 22(3), 2006: the estimate of the maximum of `useful_fraction`.
    """
    if delta >= 2.0 * mtbf:
        return mtbf
    x = delta / (2.0 * mtbf)
    return math.sqrt(2.0 * delta * mtbf) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - delta


def useful_fraction(tau: float, delta: float, restart: float, mtbf: float) -> float:
    """The expected share of wall time that is useful work, checkpointing every `tau` of work at a
    cost `delta`, each failure costing `restart` plus the work since the last checkpoint:

    tau / (M e^{R/M} (e^{(tau + delta)/M} - 1))

    Daly (2006): the expected wall time T_w = M e^{R/M} (e^{(tau+delta)/M} - 1) T_s / tau for T_s of
    work, exact for exponential inter-arrival times with mean M, failures striking during work,
    checkpoints and restarts alike. To first order it is 1 - delta/tau - (R + tau/2)/M: half an
    interval of work lost per failure on average.
    """
    try:
        return tau / (mtbf * math.exp(restart / mtbf) * math.expm1((tau + delta) / mtbf))
    except OverflowError:
        return 0.0


def best_snapshot_every(snapshot_s: float, restart: float, mtbf: float, step_s: float) -> int:
    """Steps between in-memory snapshots that maximise `useful_fraction` at the memory level: Daly's
    interval for a snapshot of cost `snapshot_s`, rounded down or up to whole steps, at least 1."""
    if snapshot_s <= 0:
        return 1
    t = daly_interval(snapshot_s, mtbf) / step_s
    return max(sorted({max(1, math.floor(t)), max(1, math.ceil(t))}),
               key=lambda k: useful_fraction(k * step_s, snapshot_s, restart, mtbf))


def tier_goodput(lam_disk: float, restart_disk: float, delta: float, lam_memory: float = 0.0,
                 restart_memory: float = 0.0, snapshot_s: float = 0.0,
                 step_s: float = 1.0) -> tuple[float, float | None, int | None]:
    """(goodput, best checkpoint interval, best snapshot interval in steps) of one tier at one scale.

    Two levels of the same model, as in multi-level checkpointing (Moody et al., "Design, modeling,
    and evaluation of a scalable multi-level checkpointing system", SC 2010):

    - disk: interruptions at rate `lam_disk` (1/s) resume from the checkpoint (cost `delta`), each
      costing `restart_disk` plus the work since it: `useful_fraction` at Daly's interval for
      M = 1/lam_disk. None when nothing needs the disk checkpoint (it can then be as rare as you like).
    - memory: interruptions at rate `lam_memory` resume from the in-memory snapshot (cost
      `snapshot_s`, taken every k steps of `step_s`), each costing `restart_memory` plus the work
      since it: `useful_fraction` at the best whole k. None when no interruption resumes from memory.

    goodput is the product of the two useful fractions: to first order their wastes add.
    """
    if lam_disk > 0:
        mtbf = 1.0 / lam_disk
        tau: float | None = daly_interval(delta, mtbf)
        g = useful_fraction(tau, delta, restart_disk, mtbf)
    else:
        tau, g = None, 1.0
    k = None
    if lam_memory > 0:
        mtbf = 1.0 / lam_memory
        k = best_snapshot_every(snapshot_s, restart_memory, mtbf, step_s)
        g *= useful_fraction(k * step_s, snapshot_s, restart_memory, mtbf)
    return g, tau, k


def kind(policy: tuple[bool, str]) -> str:
    return f"{'warm' if policy[0] else 'cold'}, from {policy[1]}"


def evaluate(policy: dict[str, tuple[bool, str]], costs: dict[tuple[bool, str], float], rates: dict[str, float],
              n: int, delta: float, step_s: float, snapshot_s: float) -> dict[str, Any]:
    """One tier's `policy` at `n` GPUs: goodput, the best intervals, the rates resumed from disk and from
    memory. `costs`: per (warm?, state) the recovery's cost (downtime, and lost steps as time); `rates`:
    per scope, per GPU-second. Causes resumed the same way at different costs are weighted by rate."""
    lam = {scope: n * r for scope, r in rates.items()}

    def level(state: str) -> tuple[float, float]:
        parts = [(lam[s], costs[p]) for s, p in policy.items() if p[1] == state]
        rate = sum(x for x, _ in parts)
        return rate, (sum(x * c for x, c in parts) / rate if rate else 0.0)

    (ld, rd), (lm, rm) = level("disk"), level("memory")
    g, tau, k = tier_goodput(ld, rd, delta, lm, rm, snapshot_s, step_s)
    return {"goodput": g, "interval_s": tau, "snapshot_every": k, "lam_disk": ld, "lam_memory": lm}


# -- what the input measured ------------------------------------------------------------------------

@dataclass
class Value:
    """A number the forecast uses, and where it came from: `measured`, `assumed` or `given` (a flag)."""

    value: float
    how: str
    where: str


@dataclass
class Recovery:
    """One measured restart: its phases, where its ranks came from, the tier it resumed from."""

    label: str
    phases: dict[str, float]
    warm: bool | None        # warm spares / a cold start / some of each (None)
    tier: str | None         # "memory" | "disk" | None (not recorded)
    lost_steps: int | None


@dataclass
class Measured:
    kind: str                # run | campaign | burn-in
    path: str
    scenario: str
    recoveries: list[Recovery]
    checkpoint_s: list[float]
    step_s: Value | None
    snapshot_s: Value | None     # the snapshot's cost per step
    warmup_s: list[float]        # a spare's warm-up: process start, import torch, first-step warm-up
    memory_every: int


def _warm(new_ranks: str | None) -> bool | None:
    if new_ranks == "warm spares":
        return True
    if new_ranks and (new_ranks.startswith("cold start") or "torchrun" in new_ranks):
        return False
    return None  # some ranks waited for a spare still warming up, or started cold: neither


def _time(v: Any) -> float:
    """A duration from a file: a finite number of seconds, 0 or more (ValueError otherwise)."""
    x = float(v)
    if not (math.isfinite(x) and x >= 0) or isinstance(v, bool):
        raise ValueError(f"{v!r} is not a duration")
    return x


def _recovery(label: str, rec: dict[str, Any], tier: Any, lost: Any) -> Recovery:
    return Recovery(label, {p: _time(rec[p]) for p in PHASES}, _warm(rec.get("new_ranks")),
                    tier if tier in ("memory", "disk") else None, None if lost is None else int(_time(lost)))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"forecast: {oneline(path)} cannot be read ({oneline(exc)[:160]}); give a complete "
                        "run, campaign or burn-in directory") from None


def _events(path: Path) -> list[dict[str, Any]]:
    try:
        return read_events(path) if path.is_file() else []
    except OSError as exc:
        raise UserError(f"forecast: cannot read {oneline(path)}: {exc.strerror or exc}") from None


def _tiers(events: list[dict[str, Any]]) -> dict[int, str | None]:
    """The tier each attempt resumed from (rank 0's `resumed` event)."""
    return {e.get("attempt", 0): e.get("tier") for e in events if e.get("event") == "resumed" and e.get("rank") == 0}


def _step_samples(events: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Rank 0's step times (each attempt's first step left out: it pays the resume) and the gaps between
    a step's end and the next one's start where no checkpoint was saved (the snapshot, the event line)."""
    saved = {(e.get("attempt"), e.get("checkpoint_step")) for e in events if e.get("event") == "checkpoint_saved"}
    steps = [e for e in events if e.get("event") == "step_done" and e.get("rank") == 0 and "dt" in e]
    dts, gaps = [], []
    for prev, cur in zip(steps, steps[1:]):
        if prev.get("attempt") != cur.get("attempt"):
            continue
        dts.append(_time(cur["dt"]))
        if (cur.get("attempt"), prev.get("step", -2) + 1) not in saved:
            gaps.append(max(0.0, _time(cur["t"]) - _time(prev["t"]) - dts[-1]))
    return dts, gaps


def _common(events: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    ckpt = [_time(e["seconds"]) for e in events if e.get("event") == "checkpoint_saved" and e.get("seconds") is not None]
    warm = [_time(e["warm_s"]) for e in events if e.get("event") == "spare_used" and e.get("warm_s") is not None]
    return ckpt, warm


def read_source(path: str | Path) -> Measured:
    """What a run, campaign or burn-in directory measured; a one-line UserError when it is none of those."""
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"forecast: {oneline(path)!r} is not a directory; give a run, campaign or burn-in "
                        "directory (e.g. one `burnin run kill-rank` made)")
    if (d / "campaign.json").is_file() and (d / "trials.jsonl").is_file():
        read, what = _from_campaign, "trials.jsonl"
    elif (d / "burn-in.json").is_file():
        read, what = _from_burn_in, "events.jsonl"
    elif (d / "summary.json").is_file():
        read, what = _from_run, "summary.json"
    else:
        raise UserError(f"forecast: {oneline(path)} holds no summary.json, campaign.json or burn-in.json; give a "
                        "run, campaign or burn-in directory (e.g. one `burnin run kill-rank` made)")
    damaged = (KeyError, IndexError, TypeError, ValueError, AttributeError, StopIteration, OverflowError)
    try:
        m = read(d)
    except damaged as exc:
        raise UserError(f"forecast: {oneline(d / what)} is not as burnin writes it ({type(exc).__name__}: "
                        f"{oneline(exc)[:120]}); give a directory burnin made, complete") from None
    try:
        scen = _load_json(d / "scenario.json") if (d / "scenario.json").is_file() else {}
        scen = scen if isinstance(scen, dict) else {}
        m.scenario = str(scen.get("name", d.name))
        m.memory_every = int((scen.get("checkpoint") or {}).get("memory_every", 1))
    except damaged as exc:  # (a number too large for an int, infinity: OverflowError, found by the fuzz test)
        raise UserError(f"forecast: {oneline(d / 'scenario.json')} is not as burnin writes it ({type(exc).__name__}: "
                        f"{oneline(exc)[:120]}); give a directory burnin made, complete") from None
    return m


def _once_per_failure(faults: list[tuple[int, str, dict[str, Any] | None, int | None]], attempt_of: dict[int, int],
                      tiers: dict[int, str | None]) -> list[Recovery]:
    """The recoveries of (index, fault, recovery, lost steps): one failure can explain several faults, and
    is counted once; its tier is the one the next attempt resumed from."""
    recs, seen = [], set()
    for index, fault, rec, lost in faults:
        a = attempt_of.get(index)
        if rec is None or (a is not None and a in seen):
            continue
        seen.add(a)
        recs.append(_recovery(f"fault[{index}] {fault}", rec, tiers.get(a + 1) if a is not None else None, lost))
    return recs


def _from_run(d: Path) -> Measured:
    s = _load_json(d / "summary.json")
    events = _events(d / "events.jsonl")
    attempt_of = {i: f["attempt"] for f in s.get("failures", []) for i in f.get("fault_indices") or [f.get("fault_index")]}
    recs = _once_per_failure([(f["index"], f["fault"], f.get("recovery"), f.get("lost_steps")) for f in s["faults"]],
                             attempt_of, _tiers(events))
    dts, gaps = _step_samples(events)
    ckpt, warm = _common(events)
    return Measured("run", str(d), "", recs, ckpt, _step_value(dts, "events.jsonl"), _gap_value(gaps, "events.jsonl"),
                    warm, 1)


def _from_campaign(d: Path) -> Measured:
    trials = _events(d / "trials.jsonl")
    recs = [_recovery(f"trial {t['trial']} {t['fault']['fault']}", t["recovery"], t.get("tier"), t.get("lost_steps"))
            for t in trials if t.get("recovery")]
    dts, gaps, ckpt, warm = [], [], [], []
    for t in trials:
        ev = _events(d / "trials" / f"{int(t['trial']):04d}" / "events.jsonl")
        a, b = _step_samples(ev)
        c, w = _common(ev)
        dts, gaps, ckpt, warm = dts + a, gaps + b, ckpt + c, warm + w
    where = "trials/*/events.jsonl"
    return Measured("campaign", str(d), "", recs, ckpt, _step_value(dts, where), _gap_value(gaps, where), warm, 1)


def _from_burn_in(d: Path) -> Measured:
    """A burn-in keeps no per-fault breakdown: its event log is judged again, as the burn-in judged it."""
    events = _events(d / "events.jsonl")
    for name in ("scenario.json", "schedule-drawn.json"):
        _load_json(d / name)  # a damaged file: the one-line error that names it
    result = judge_burn_in(d, events)
    attempt_of = {i: f.attempt for f in result.failures for i in f.fault_indices}
    recs = _once_per_failure([(f.index, f.fault, f.recovery.to_dict() if f.recovery else None, f.lost_steps)
                              for f in result.faults], attempt_of, _tiers(events))
    # burn-ins log steps in 10-s roll-ups: the wall time per step of a typical period (checkpoints included)
    rolls = [e for e in events if e.get("event") == "burn_in_rollup"]
    per = [(_time(b["elapsed_s"]) - _time(a["elapsed_s"])) / (b["executed"] - a["executed"])
           for a, b in zip(rolls, rolls[1:]) if b.get("executed", 0) > a.get("executed", 0)]
    step = Value(statistics.median(per), "measured", f"events.jsonl: median wall time per step over {len(per)} "
                                                     "roll-up periods (checkpoints included)") if per else None
    ckpt, warm = _common(events)
    return Measured("burn-in", str(d), "", recs, ckpt, step, None, warm, 1)  # no per-step events: no snapshot cost


def _step_value(dts: list[float], where: str) -> Value | None:
    if not dts:
        return None
    return Value(statistics.fmean(dts), "measured", f"{where}: mean step_done.dt of rank 0 over {len(dts)} steps")


def _gap_value(gaps: list[float], where: str) -> Value | None:
    if not gaps:
        return None
    return Value(statistics.median(gaps), "measured", f"{where}: median time between one step's end and the "
                 f"next one's start, {len(gaps)} steps without a checkpoint (the snapshot and burnin's event line)")


# -- from measurements to each tier's recovery ---------------------------------------------------------

@dataclass
class Composed:
    """The recovery of one (warm?, state) kind: downtime and lost steps, each part measured or assumed."""

    downtime_s: float
    lost_steps: Value | None
    parts: dict[str, Value]

    @property
    def how(self) -> str:
        parts = [*self.parts.values(), *([self.lost_steps] if self.lost_steps else [])]
        return "measured" if all(p.how in ("measured", "given") for p in parts) else "assumed"


def _n(n: int, phrase: str) -> str:
    """'3 restarts on warm spares', '1 restart on warm spares': the first word takes the plural."""
    head, _, rest = phrase.partition(" ")
    return f"{n} {head}{'' if n == 1 else 's'}" + (f" {rest}" if rest else "")


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else 0.0


def _labels(rs: list[Recovery]) -> str:
    names = [r.label for r in rs[:3]]
    return ", ".join(names) + (f", ... ({len(rs)} in all)" if len(rs) > 3 else "")


def compose(m: Measured, warm: bool, state: str, step_s: float, checkpoint_s: float) -> Composed:
    """The recovery time of a restart on warm spares or cold, resuming from memory or disk: each phase's
    mean over the measured restarts of that kind, or a stated stand-in where none was measured."""
    rs = m.recoveries
    pool = {"warm": [r for r in rs if r.warm is True], "cold": [r for r in rs if r.warm is False],
            "memory": [r for r in rs if r.tier == "memory"], "disk": [r for r in rs if r.tier == "disk"]}

    def mean_of(p: str, group: list[Recovery], what: str) -> Value:
        return Value(_mean([r.phases[p] for r in group]), "measured", f"mean of {_n(len(group), what)}: {_labels(group)}")

    parts = {"detection_s": mean_of("detection_s", rs, "restart"), "teardown_s": mean_of("teardown_s", rs, "restart")}
    own, other = ("warm", "cold") if warm else ("cold", "warm")
    warmup = _mean(m.warmup_s)
    if pool[own]:
        parts["restart_s"] = mean_of("restart_s", pool[own], f"restart on {'warm spares' if warm else 'new processes'}")
    elif warm and pool[other] and m.warmup_s:
        cold = _mean([r.phases["restart_s"] for r in pool[other]])
        parts["restart_s"] = Value(max(0.0, cold - warmup), "assumed", f"no warm-spare restart measured: the cold "
                                   f"restart ({cold:.3g} s) less a spare's warm-up ({warmup:.3g} s)")
    elif warm:
        parts["restart_s"] = Value(HANDOVER_S, "assumed", "no warm-spare restart measured: the hand-over of a warm "
                                   "spare measured in docs/performance.md (0.03-0.07 s with 2-4 ranks)")
    elif pool[other] and m.warmup_s:
        w = _mean([r.phases["restart_s"] for r in pool[other]])
        parts["restart_s"] = Value(w + warmup, "assumed", f"no cold restart measured: the warm-spare restart "
                                   f"({w:.3g} s) plus the warm-up each spare paid before it was needed ({warmup:.3g} s, "
                                   f"mean of {len(m.warmup_s)}: process start, import torch, first-step warm-up), "
                                   "which a cold restart pays on the critical path")
    else:
        parts["restart_s"] = Value(COLD_START_S, "assumed", "no cold restart or spare warm-up measured: the cold "
                                   "restart measured in docs/performance.md (2.9-3.1 s, tiny model, 2 ranks)")
    mem_load = _mean([r.phases["checkpoint_load_s"] for r in pool["memory"]])
    disk_load = (mean_of("checkpoint_load_s", pool["disk"], "resume from disk") if pool["disk"] else
                 Value(max(checkpoint_s, mem_load), "assumed", "no resume from disk measured: taken to last as long "
                       f"as the checkpoint's save ({checkpoint_s:.3g} s) or a resume from memory ({mem_load:.3g} s), "
                       "whichever is longer"))
    if state == "disk":
        parts["checkpoint_load_s"] = disk_load
    elif pool["memory"]:
        parts["checkpoint_load_s"] = mean_of("checkpoint_load_s", pool["memory"], "resume from memory")
    else:
        parts["checkpoint_load_s"] = Value(disk_load.value, "assumed", "no resume from memory measured: taken to "
                                           "last as long as a load from disk")
    first_pool = pool[own] or rs
    first = _mean([r.phases["first_step_s"] for r in first_pool])
    parts["first_step_s"] = Value(max(0.0, first - step_s), "measured" if pool[own] else "assumed",
                                  f"mean first step after the resume ({first:.3g} s) less one step's own work "
                                  f"({step_s:.3g} s): {_labels(first_pool)}")
    lost = None
    if state == "memory":
        # the model charges the work since the last snapshot itself (its memory level); what a resume lost
        # beyond that (a damaged snapshot, an older one chosen) is added to its cost
        ls = [r.lost_steps for r in pool["memory"] if r.lost_steps is not None]
        own_share = max(0, m.memory_every - 1) / 2
        every = max(1, m.memory_every)
        lost = (Value(max(0.0, _mean(ls) - own_share), "measured", f"completed steps lost by {_n(len(ls), 'resume')} "
                      f"from memory (mean {_mean(ls):.3g}), beyond the {own_share:g} that "
                      f"{'a snapshot every step' if every == 1 else f'a snapshot every {every} steps'} explains")
                if ls else
                Value(0.0, "assumed", "no resume from memory measured: none lost beyond the snapshot interval"))
    return Composed(sum(p.value for p in parts.values()), lost, parts)


# -- the forecast ---------------------------------------------------------------------------------------

def _bykind(rs: list[Recovery]) -> dict[str, int]:
    warm = {True: "warm", False: "cold", None: "partly warm"}
    return dict(Counter(f"{warm[r.warm]} from {r.tier or 'unrecorded'}" for r in rs).most_common())


def parse_gpus(text: str) -> list[int]:
    """'1000,10k,1e5' -> [1000, 10000, 100000]; a one-line UserError naming --gpus otherwise."""
    out = []
    for item in text.split(","):
        t = item.strip().lower()
        mult = {"k": 1000, "m": 1_000_000}.get(t[-1:], 1)
        try:
            v = float(t[:-1] if mult > 1 else t) * mult
        except ValueError:
            v = float("nan")
        if not (math.isfinite(v) and v == int(v) and 1 <= v <= 10_000_000):
            raise UserError(f"--gpus: {oneline(item)[:40]!r} is not a GPU count; give counts from 1 to 10M separated "
                            "by commas, e.g. 1000,10000,100000 or 1k,10k,100k")
        out.append(int(v))
    if len(out) > 24:
        raise UserError(f"--gpus: {len(out)} counts; give at most 24")
    return sorted(set(out))


def forecast(m: Measured, model: FailureModel, gpus: list[int] | tuple[int, ...] = DEFAULT_GPUS, *,
             checkpoint_s: float | None = None, step_s: float | None = None,
             snapshot_s: float | None = None) -> dict[str, Any]:
    """The whole forecast as a JSON-able dict: inputs (each with where it came from), goodput and the best
    checkpoint interval per tier and GPU count, the failure model and the assumptions."""
    if not m.recoveries:
        raise UserError(f"forecast: {oneline(m.path)} recorded no complete restart (no fault brought the group "
                        "down, or no restart reached a step); forecast from a run that recovered from one, e.g. "
                        "`burnin run kill-rank`")
    if checkpoint_s is not None:
        ckpt = Value(checkpoint_s, "given", "--checkpoint-seconds")
    elif m.checkpoint_s:
        ckpt = Value(_mean(m.checkpoint_s), "measured", f"mean checkpoint_saved.seconds of {len(m.checkpoint_s)} saves")
    else:
        raise UserError(f"forecast: {oneline(m.path)} saved no checkpoint to measure; give --checkpoint-seconds S")
    if step_s is not None:
        step = Value(step_s, "given", "--step-seconds")
    elif m.step_s is not None and m.step_s.value > 0:
        step = m.step_s
    else:
        raise UserError(f"forecast: {oneline(m.path)} logged no step times; give --step-seconds S")
    if ckpt.value <= 0:
        raise UserError(f"forecast: {oneline(m.path)} measured checkpoints that took no time; give "
                        "--checkpoint-seconds S")
    if snapshot_s is not None:
        snap = Value(snapshot_s, "given", "--snapshot-seconds")
    elif m.snapshot_s is not None and m.memory_every == 1:
        snap = m.snapshot_s
    else:
        why = ("the input took no snapshots" if m.memory_every == 0 else
               f"the input snapshotted every {m.memory_every} steps" if m.memory_every > 1 else "no per-step events")
        snap = Value(ckpt.value, "assumed", f"not measured ({why}): taken to cost what a checkpoint does, an upper "
                                            "bound (the same bytes, to memory instead of disk)")

    kinds = {pol for tier in TIERS.values() for pol in tier.values()}
    comp = {k: compose(m, k[0], k[1], step.value, ckpt.value) for k in kinds}
    costs = {k: c.downtime_s + (c.lost_steps.value * step.value if c.lost_steps else 0.0) for k, c in comp.items()}
    rates = model.rates_by_scope()
    tiers_out: dict[str, Any] = {}
    for name, policy in TIERS.items():
        points = []
        for n in gpus:
            e = evaluate(policy, costs, rates, n, ckpt.value, step.value, snap.value)
            tau, lam_disk, total = e["interval_s"], e["lam_disk"], e["lam_disk"] + e["lam_memory"]
            points.append({"gpus": n, "goodput": e["goodput"], "interval_s": tau,
                           "interval_young_s": young_interval(ckpt.value, 1 / lam_disk) if lam_disk else None,
                           "interval_steps": tau / step.value if tau is not None else None,
                           "snapshot_every_steps": e["snapshot_every"],
                           "mtbf_s": 1 / total if total else None, "mtbf_disk_s": 1 / lam_disk if lam_disk else None})
        used = sorted(set(policy.values()))
        tiers_out[name] = {
            "how": "measured" if all(comp[p].how == "measured" for p in used) else "assumed",
            "what": TIER_WORDS[name],
            "recovery": {kind(p): {"cost_s": costs[p], "downtime_s": comp[p].downtime_s, "how": comp[p].how,
                                    "lost_steps": asdict(comp[p].lost_steps) if comp[p].lost_steps else None,
                                    "phases": {k: asdict(v) for k, v in comp[p].parts.items()}} for p in used},
            "points": points,
        }
    per_gpu_s = model.total / model.gpu_seconds
    return {
        "schema_version": SCHEMA_VERSION,
        "source": {"path": m.path, "kind": m.kind, "scenario": m.scenario, "restarts": len(m.recoveries),
                   "restarts_by_kind": _bykind(m.recoveries)},
        "failure_model": {**model.model_dump(), "total": model.total, "per_gpu_hour": per_gpu_s * 3600,
                          "mtbf_observed_s": 1 / (per_gpu_s * model.gpus), "per_gpu_s_by_scope": rates,
                          "share_by_scope": {k: v / per_gpu_s for k, v in rates.items()}},
        "inputs": {"checkpoint_s": asdict(ckpt), "step_s": asdict(step), "snapshot_s": asdict(snap)},
        "gpus": list(gpus),
        "tiers": tiers_out,
        "assumptions": ASSUMPTIONS,
    }


ASSUMPTIONS = [
    "Failures are independent, and each cause's interruptions arrive as a Poisson process at a constant rate "
    "per GPU (exponential times between them; no infant mortality, no wear-out): the job's rate is the GPU count "
    "times the per-GPU rate, for every cause, software included.",
    "Training is synchronous: any interruption, on any machine, stops the whole job until it recovers.",
    "The recovery time, the checkpoint's and the snapshot's cost and the step time are the input's, whatever the "
    "GPU count: each GPU keeps its own share of the work and saves its own shard in parallel with the others "
    "(weak scaling), and neither rendezvous nor storage slows down with size. At scale both do: give "
    "--checkpoint-seconds for a checkpoint of your model on your storage.",
    "A resume from disk loses the work since the newest checkpoint: half an interval on average (Daly's exact "
    "expectation for exponential failures, which may also strike during checkpoints and restarts). Damaged "
    "checkpoints, which send a restart back one checkpoint further, are not modelled.",
    "burnin keeps its snapshots in each machine's own shared memory: a cause that takes a machine out of the job "
    "(scope machine) is resumed from disk even in the in-memory tier. A resume from memory loses the work since "
    "the newest snapshot, plus what the input's resumes from memory lost beyond that.",
    "Warm spares serve a lost machine too: its ranks move to a standby machine whose processes are already "
    "started, and take over as fast as a spare did in the input. Waiting for a replacement machine is not "
    "modelled.",
    "The two levels (disk checkpoints, in-memory snapshots) are independent to first order: goodput is the "
    "product of their useful shares.",
    "Planned interruptions (maintenance) are not counted; in-process rollback (detected corruption) is not one of "
    "the tiers forecast.",
]


# -- silent data corruption: harmful escapes per day ---------------------------------------------

SDC_ASSUMPTIONS = [
    "A silent data corruption event on a device is one fault like the campaign's trials: the campaign's shares "
    "(silent and harmful, caught, harmful if unchecked) are what such an event does. The trials draw target, "
    "tensor, element, bit class and step uniformly from the campaign's templates; a real defect has its own "
    "distribution (a stuck bit, a unit that miscomputes one operation), so the forecast is as good as the "
    "templates' resemblance to it.",
    "Events arrive independently at a constant rate per device; the job's rate is the device count times it.",
    "The failure model's `Silent data corruption` interruptions are SDCs that were noticed (they stopped the job): "
    "a lower bound of the rate of SDC events, which burnin's campaign says how many would pass unnoticed.",
    "An effect is judged over the campaign's window after the fault (its `campaign.window` steps): harm that "
    "shows only later (a parameter frozen by an infinite second moment, a slow drift) reads benign.",
]


def is_sdc_campaign(path: str | Path) -> bool:
    """A data-fault campaign's directory whose summary has effect classes."""
    f = Path(path) / "campaign.json"
    if not f.is_file():
        return False
    try:
        s = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(s, dict) and "effects" in s and "by_fault" not in s


def sdc_forecast(path: str | Path, model: FailureModel | None, gpus: list[int] | tuple[int, ...] = DEFAULT_GPUS, *,
                 per_gpu_day: float | None = None) -> dict[str, Any]:
    """Harmful silent corruptions per day at each GPU count: a per-device SDC rate (given, or the failure
    model's `Silent data corruption` category) times the campaign's share of trials that escaped silently
    and did harm (Wilson 95 % bounds carried through), beside what the same events would do unchecked."""
    summary = _load_json(Path(path) / "campaign.json")
    if per_gpu_day is not None:
        rate = Value(per_gpu_day, "given", "--sdc-per-gpu-day")
    else:
        cat = next((c for c in (model.categories if model else []) if "silent data corruption" in c.name.lower()),
                   None)
        if cat is None or model is None:
            raise UserError(f"forecast: the failure model {model.name if model else ''!r} has no `Silent data "
                            "corruption` category; give --sdc-per-gpu-day R (SDC events per GPU per day)")
        rate = Value(model.rate(cat) * 86400, "assumed",
                     f"{cat.count} `{cat.name}` interruptions in {model.days:g} days on {model.gpus} GPUs "
                     f"({model.source or model.name}): noticed SDCs, a lower bound")
    n = summary["trials"]
    eff = summary["effects"]
    harmful_silent = eff["harmful"]["count"]
    unchecked = summary.get("unchecked_effects") or {}
    shares = {
        "silent_harmful": {"count": harmful_silent, "of": n, "what": "escaped every detector and did harm"},
        "silent": {"count": summary["outcomes"]["sdc"]["count"], "of": n,
                   "what": "escaped every detector (any change of the final state)"},
    }
    if unchecked.get("silent_trials"):
        shares["unchecked_harmful"] = {"count": unchecked["harmful"]["count"], "of": unchecked["silent_trials"],
                                       "what": "did harm when nothing acted on it (no detector)"}
    for v in shares.values():
        v["share"] = v["count"] / v["of"] if v["of"] else 0.0
        v["ci95"] = list(wilson(v["count"], v["of"])) if v["of"] else [0.0, 1.0]
    points = []
    for g in gpus:
        events = g * rate.value
        row: dict[str, Any] = {"gpus": g, "sdc_events_per_day": events}
        for k, v in shares.items():
            row[k] = {"per_day": events * v["share"], "ci95": [events * v["ci95"][0], events * v["ci95"][1]],
                      "days_between": 1 / (events * v["share"]) if v["share"] else None}
        points.append(row)
    return {"schema_version": SCHEMA_VERSION, "kind": "sdc",
            "source": {"path": str(path), "scenario": summary.get("scenario"), "trials": n, "seed": summary.get("seed"),
                       "noise_band": {k: summary["noise_band"][k] for k in ("final", "eval", "step", "how")}},
            "rate_per_gpu_day": asdict(rate), "shares": shares, "gpus": list(gpus), "points": points,
            "assumptions": SDC_ASSUMPTIONS}


def sdc_text(f: dict[str, Any]) -> str:
    """The SDC forecast as a few lines and a table."""
    r = f["rate_per_gpu_day"]
    lines = [f"Silent data corruption at scale, from {f['source']['path']} ({f['source']['trials']} trials)",
             f"SDC events: {r['value']:.3g} per GPU per day ({r['how']}: {r['where']})"]
    for k, v in f["shares"].items():
        lines.append(f"  {k}: {v['count']}/{v['of']} = {v['share']:.3f} (95 % {v['ci95'][0]:.3f}-{v['ci95'][1]:.3f}) "
                     f"of events {v['what']}")
    keys = list(f["shares"])
    lines.append("")
    lines.append(f"{'GPUs':>8} {'events/day':>11} " + " ".join(f"{k + '/day':>26}" for k in keys))
    for p in f["points"]:
        cells = " ".join(f"{p[k]['per_day']:>9.3g} [{p[k]['ci95'][0]:.2g}, {p[k]['ci95'][1]:.2g}]".rjust(26) for k in keys)
        lines.append(f"{p['gpus']:>8} {p['sdc_events_per_day']:>11.3g} {cells}")
    lines.append("")
    lines += [f"- {a}" for a in f["assumptions"]]
    return "\n".join(lines)
