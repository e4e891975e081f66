"""Burn-in: the workload trains for a stated time while faults arrive at random instants; every rank
gets a health verdict.

The schedule (`draw_schedule`) is a Poisson process per fault kind in wall-clock time: exponential
gaps from the burn-in's seed, one random stream per kind (so adding a kind does not move the others'
arrivals), quiet periods at the start (a baseline) and at the end (the final heal). Each arrival
is a fault with `at_s`: an out-of-rank fault is fired by the supervisor at that instant, wherever
the rank is (in the middle of a step: the rank's position file says which step and which point it
had passed, and the `fault_injected` event records it), at most `max_in_flight` at once and never
during a recovery (it waits); an in-rank fault fires at the first step point of its kind that its
rank reaches after the instant. Same seed, same schedule; the realised one (the step and point
each fault hit) is written as a scenario that `burnin run` replays (`schedule.yaml`).

The golden reference does not cost a second run of the same length: the fault-free state at a
checkpoint is what matters, and only the stretches where faults landed can differ. Each injected
fault opens a *window* from the newest disk checkpoint before it (kept by a hard link when the
fault fires) to the first checkpoint saved after the group recovered; after the burn-in, each
window is replayed from its first checkpoint without faults (a golden run over that window only, on
the same warm spares) and must end with the same state hash the burn-in saved. Overlapping windows
are replayed as one. What this does not re-check is the restore path itself against an
uninterrupted process (both sides restore from a checkpoint): `burnin run` and the test suite do
that against whole golden runs. Stretches without faults are screened by the detectors the scenario
enables (cross-rank fingerprints, recomputation), whose findings no injected fault explains are the
burn-in's SDC findings.

Health per rank (`assess`): its compute time per step (forward and backward up to the first gradient
bucket: the part no peer waits in), less the time it waited for a CPU, against the other ranks' period
by period, slow only when persistent and significant (`judge_speed`, `burnin.reports.outliers`: a
busy host is not a slow rank), failures that no injected fault explains (grouped by signature), detector findings no fault
explains, and repeated trouble on one rank (a lemon). Verdicts `healthy`, `degraded`, `faulty`, each
with its reasons and the thresholds that decided them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from pydantic import ValidationError

from burnin.core import checkpoints as checkpoint, procs
from burnin.core.events import EventWriter, read_events
from burnin.core.files import atomic_write
from burnin.errors import UserError
from burnin.faults import registry
from burnin.harness import cleanup
from burnin.harness.fabric import choose_fabric
from burnin.harness.preflight import check_device, check_out_dir
from burnin.harness.runner import make_run_dir, new_run_id
from burnin.harness.spares import open_pool
from burnin.harness.supervisor import Supervisor
from burnin.reports import history as hist
from burnin.reports.html import write_burn_in_report
from burnin.reports.metrics import Metrics
from burnin.reports.outliers import MIN_PERIODS, persistent_outliers
from burnin.reports.verdict import judge
from burnin.reports.writers import junit_xml, write_html_safely
from burnin.scenarios.burn_in import LEVELS, runtime_scenario
from burnin.scenarios.schema import Scenario

__all__ = ["LEVELS", "draw_schedule", "parse_duration", "run_burn_in", "assess", "conclude", "period_stats",
           "write_reports", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

#: DCGM-like levels: a stated length on CPU and on GPU (seconds).

#: Most faults one schedule may hold (a rate of 100/h for 7 days is 16,800).
MAX_SCHEDULED = 50_000

HEALTH = ("healthy", "degraded", "faulty")

#: A rank's event stream in a burn-in rotates at this size (see EventWriter).
ROTATE_BYTES = 4 << 20

#: At most this many checkpoint copies for verification windows (a window's start): disk stays bounded
#: however long the burn-in; faults beyond it are reported `unverified`.
KEEP_LIMIT = 256

#: Step points, read as the phase of the step a fault landed in (after passing that point).
PHASE = {"before_forward": "forward/backward", "after_backward": "all-reduce", "after_allreduce": "optimizer step",
         "after_optimizer_step": "checkpoint and snapshot", "between_steps": "between steps",
         "all_gather": "all-gather", "reduce_scatter": "reduce-scatter", "replica_all_reduce": "all-reduce across replicas",
         "tp_all_reduce": "tensor-parallel all-reduce", "ft_all_reduce": "all-reduce across replica groups"}


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '1h30m' -> seconds; a one-line UserError naming --duration otherwise."""
    t = str(text).strip().lower()
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", t)
    if not t or not m or not any(m.groups()):
        raise UserError(f"--duration: {text!r} is not a duration; write seconds (90, 90s), minutes (10m) or hours "
                        "(2h, 1h30m)")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    total = h * 3600 + mi * 60 + s
    if not 5 <= total <= 7 * 86400:
        raise UserError(f"--duration: {text!r} is {total:g} s; a burn-in lasts from 5 s to 7 days")
    return total


def draw_schedule(scenario: Scenario, duration_s: float, seed: int) -> list[dict[str, Any]]:
    """The burn-in's faults: per kind, exponential gaps from a stream of its own, inside the fault window
    (after quiet_start_s, before duration - quiet_end_s). Sorted by time; a pure function of its inputs."""
    b = scenario.burn_in
    lo, hi = b.quiet_start_s, duration_s - b.quiet_end_s
    out: list[dict[str, Any]] = []
    for k, kind in enumerate(b.faults):
        rng = random.Random(f"burnin-burn-in:{seed}:{k}:{kind.fault}")
        ranks = kind.ranks or list(range(scenario.workload.ranks))
        t = lo
        while True:
            t += rng.expovariate(kind.rate_per_s)
            if t >= hi:
                break
            spec = {"fault": kind.fault, "rank": rng.choice(ranks), "step": 0,
                    "point": rng.choice(kind.points) if kind.points else None, "params": dict(kind.params),
                    "expect": kind.expect, "at_s": round(t, 3), "kind": k}
            out.append(spec)
            if len(out) > MAX_SCHEDULED:
                raise UserError(f"burn_in.faults.{k}: {kind.fault} at this rate draws more than {MAX_SCHEDULED} "
                                f"faults in {duration_s:g} s; lower its rate or the duration")
    out.sort(key=lambda f: (f["at_s"], f["kind"]))
    return out


class Clock:
    """The supervisor's side of a burn-in, polled every round: fires timed out-of-rank faults when due
    (and allowed), keeps the disk checkpoints a fault's window starts from, rolls step events up, and
    ends the run when the time is up."""

    def __init__(self, scenario: Scenario, run_dir: Path, duration_s: float, clock0: float,
                 on_progress: Callable[[dict[str, Any]], None] | None = None, metrics: Any = None,
                 fired: set[int] | None = None, events: list[dict[str, Any]] | None = None):
        self.sc, self.run_dir, self.duration_s, self.clock0 = scenario, run_dir, duration_s, clock0
        self.metrics = metrics
        self.stop_file = run_dir / "ranks" / "stop"
        self.stop_file.unlink(missing_ok=True)
        self.on_progress = on_progress
        self.max_in_flight = scenario.burn_in.max_in_flight if scenario.burn_in else 1
        # timed out-of-rank faults still to fire: (due time, index)
        fired = fired or set()
        self.pending = sorted((clock0 + f.at_s, i) for i, f in enumerate(scenario.faults)
                              if f.at_s is not None and registry.get(f.fault).where == "out_of_rank"
                              and i not in fired)
        self.in_flight: dict[int, tuple[int, int]] = {}  # fired fault -> (attempt, step) it fired at
        self.stopping_at: int | None = None
        self.ckpt_hashes: dict[int, str] = {}  # step -> state hash, the newest saving of each checkpoint
        self.steps = defaultdict(list)         # rank -> (compute_s, cpu_wait_s, dt) of this roll-up period's steps
        self.period_s = scenario.burn_in.health.period_s if scenario.burn_in else 10.0
        # each rank's loss bits per step (the last execution of a step wins): what a fleet's nodes compare
        self.fingerprints = open(run_dir / "fingerprints.txt", "a", encoding="ascii")
        self.rollups: list[dict[str, Any]] = []
        self.last_rollup = time.time()
        self.executed = 0                      # steps executed by rank 0, replays included
        self.last_step = -1
        self.attempt = 0
        self.attempt_progressed = False
        self.faults_fired = 0
        self._last_progress = 0.0
        # a resumed burn-in: what the earlier sessions saw

        self.windows_kept = [c.step for c in checkpoint.committed(run_dir / "verify" / "checkpoints")]
        for ev in events or []:
            kind = ev.get("event")
            if kind == "checkpoint_saved":
                self.ckpt_hashes[ev["checkpoint_step"]] = ev["state_hash"]
            elif kind == "fault_injected":
                self.faults_fired += 1
            elif kind == "burn_in_rollup":
                self.rollups.append({k: v for k, v in ev.items() if k not in ("event", "source")})
                self.executed, self.last_step = ev["executed"], ev["last_step"]

    # -- what the ranks need -----------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        # rank streams rotate (two generations of 4 MiB at most): a burn-in writes a step event per step for hours
        return {"clock0": self.clock0, "stop_file": str(self.stop_file), "rotate_bytes": ROTATE_BYTES}

    # -- events (the supervisor's on_event) --------------------------------------------------------

    def observe(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "step_done":
            if ev.get("compute_s") is not None:
                self.steps[ev["rank"]].append((ev["compute_s"], ev.get("cpu_wait_s"), ev.get("dt")))
            if ev.get("loss_bits") is not None and not self.fingerprints.closed:
                self.fingerprints.write(f"{ev['step']} {ev['rank']} {ev['loss_bits']} {ev.get('grad_bits', '-')}\n")
            if ev.get("rank") == 0:
                self.executed += 1
                self.last_step = max(self.last_step, ev["step"])
                self.attempt_progressed = True
                # a fault is past once the group trains on: in a later attempt (recovered), or two steps
                # beyond it in the same one (it brought nothing down)
                self.in_flight = {i: (a, s) for i, (a, s) in self.in_flight.items()
                                  if a == self.attempt and ev["step"] < s + 2}
        elif kind == "resumed" and ev.get("rank") == 0 and ev.get("from_step"):
            # every step before the resume point ran at least once (a resumed burn-in's earlier session may have
            # run some after its last roll-up, uncounted)
            self.executed = max(self.executed, ev["from_step"])
        elif kind == "attempt_started":
            self.attempt = ev["attempt"]
            self.attempt_progressed = False
        elif kind == "checkpoint_saved":
            self.ckpt_hashes[ev["checkpoint_step"]] = ev["state_hash"]
        elif kind == "fault_injected":
            self.faults_fired += 1
            self.in_flight[ev["fault_index"]] = (self.attempt, ev.get("step", self.last_step))
            self._keep_checkpoint(ev.get("step", self.last_step + 1))

    def _keep_checkpoint(self, step: int) -> None:
        """Copy the newest valid checkpoint at or before `step` into verify/: the window of a fault starts
        there, and the run's own rotation (checkpoint.keep) would delete it. A copy, not a hard link: a
        damaged checkpoint is damaged in place (this runs before the fault acts, from its `fault_injected`
        event). One copy per window start, at most KEEP_LIMIT of them; removed once the windows are
        replayed."""

        keep = self.run_dir / "verify" / "checkpoints"
        for c in reversed(checkpoint.committed(self.run_dir / "checkpoints")):
            if c.step > step:
                continue
            if c.step in self.windows_kept:
                return
            if len(self.windows_kept) >= KEEP_LIMIT or not _verifies(c, self.sc.workload.ranks):
                return  # its window is not replayed (its fault is reported unverified), or an older copy serves
            dst, tmp = keep / c.path.name, keep / (c.path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
                for f in c.path.iterdir():
                    shutil.copyfile(f, tmp / f.name)
                os.replace(tmp, dst)
                self.windows_kept.append(c.step)
            except OSError:  # rotated away between the listing and the copy
                shutil.rmtree(tmp, ignore_errors=True)
            return

    # -- every round of the supervisor's loop ------------------------------------------------------

    def poll(self, sup: Any, ranks: list[Any], now: float) -> None:
        end = self.clock0 + self.duration_s
        if now >= end and self.stopping_at is None:
            self._stop(ranks)
        while self.pending and self.pending[0][0] <= now and self.stopping_at is None:
            if not self.attempt_progressed or len(self.in_flight) >= self.max_in_flight:
                break  # a recovery in progress, or enough faults in flight: the arrival waits
            if any(r.proc.poll() is not None or r.error is not None
                   or procs.proc_state(r.proc.pid) in (None, "Z", "X") for r in ranks):
                break  # a rank is already failing: the failure is being decided
            _, index = self.pending.pop(0)
            spec = self.sc.faults[index]
            target = next((r for r in ranks if r.rank == spec.rank), None)
            if target is None:
                continue
            if spec.fault == "storage.checkpoint_corrupt" and not checkpoint.committed(self.run_dir / "checkpoints"):
                self.pending.insert(0, (now + 0.5, index))  # nothing on disk to damage yet: a little later
                break
            sup.fire_now(target, index)  # (its fault_injected event puts it in flight)
        # periods end on wall-clock multiples of period_s, the same instants on every node of a fleet (a busy
        # moment of a shared host falls in the same period of each)
        if now // self.period_s != self.last_rollup // self.period_s:
            rollup = self.rollup(now)
            if rollup is not None:  # in the event log, so a resumed burn-in has it
                sup._emit("burn_in_rollup", **{k: v for k, v in rollup.items() if k != "t"})
        if self.on_progress and now - self._last_progress >= 10.0:
            self._last_progress = now
            self.on_progress({"event": "burn_in_progress", "elapsed_s": now - self.clock0, "step": self.last_step,
                              "faults_fired": self.faults_fired, "t": now})

    def _stop(self, ranks: list[Any]) -> None:
        """Time is up: every rank stops at one step, far enough ahead that none has passed it."""
        steps = [r.last_step for r in ranks if r.last_step is not None] or [self.last_step]
        rate = statistics.median([x[0] for xs in self.steps.values() for x in xs[-20:]] or [0.05])
        self.stopping_at = max(steps) + 5 + int(1.0 / max(rate, 1e-3))
        tmp = self.stop_file.with_suffix(".tmp")
        tmp.write_text(str(self.stopping_at))
        os.replace(tmp, self.stop_file)

    def rollup(self, now: float) -> dict[str, Any] | None:
        """Per rank, the steps of the last period in a few numbers (step events stay out of the log), and what
        the supervisor holds (resident memory, open files: flat over hours, or something leaks)."""
        out = None
        if any(self.steps.values()):
            out = {"t": now, "period": int(self.last_rollup // self.period_s), "span_s": now - self.last_rollup,
                   "elapsed_s": now - self.clock0,
                   "last_step": self.last_step,
                   "executed": self.executed, "supervisor": _own_usage(),
                   "ranks": {str(r): period_stats(*zip(*xs)) for r, xs in sorted(self.steps.items()) if xs}}
            self.rollups.append(out)
        if not self.fingerprints.closed:
            self.fingerprints.flush()
        if self.metrics is not None and self.executed:
            self.metrics.goodput.set((self.last_step + 1) / self.executed)
        self.steps = defaultdict(list)
        self.last_rollup = now
        return out


def period_stats(xs: Sequence[float], waits: Sequence[float | None] = (), dts: Sequence[float | None] = ()
                 ) -> dict[str, Any]:
    """One rank's steps of one roll-up period in a few numbers (what `assess` and a fleet's report read):
    compute time per step, and where the steps say, the part of it spent waiting for a CPU, the compute time
    less that wait (`median_net_compute_s`, the straggler score's measure) and the whole step's time (its
    mean: a fleet's speed measure; a CPU limit makes step times bimodal, and their median jumps)."""
    out = {"n": len(xs), "median_compute_s": statistics.median(xs), "min_compute_s": min(xs),
           "max_compute_s": max(xs)}
    if waits and all(w is not None for w in waits):
        out["median_cpu_wait_s"] = statistics.median(waits)
        out["median_net_compute_s"] = statistics.median(max(0.0, x - w) for x, w in zip(xs, waits))
    if dts and all(d is not None for d in dts):
        out["median_step_s"] = statistics.median(dts)
        out["mean_step_s"] = statistics.fmean(dts)
    return out


# -- verification windows ------------------------------------------------------------------------

def windows(events: list[dict[str, Any]], kept: list[int], hashes: dict[int, str],
            max_span: int = 1 << 62) -> list[dict[str, Any]]:
    """The stretches to replay: for each injected fault, from the newest kept checkpoint at or before
    its step to the first checkpoint saved after the group trained past it (its state hash is what
    the replay must reach); overlapping stretches merged."""
    brought_down = {i for e in events if e.get("event") == "failure_detected" for i in e.get("fault_indices") or []}
    out: list[list[int]] = []
    for ev in events:
        if ev.get("event") != "fault_injected":
            continue
        if not registry.get(ev["fault"]).changes_state and ev["fault_index"] not in brought_down:
            continue  # a delay that brought nothing down leaves the bits alone
        step = ev["step"]
        starts = [c for c in kept if c <= step]
        ends = [c for c in hashes if c > step]
        if not ends:
            continue
        start = max(starts) if starts else 0
        if step - start > max_span:
            continue  # no copy near it (the copies ran out): not replayed, reported unverified
        out.append([start, min(ends), ev["fault_index"]])
    out.sort()
    merged: list[dict[str, Any]] = []
    for start, end, index in out:
        if merged and start <= merged[-1]["end"]:
            m = merged[-1]
            m["end"] = max(m["end"], end)
            m["faults"].append(index)
        else:
            merged.append({"start": start, "end": end, "faults": [index]})
    for m in merged:
        # the window must end at a checkpoint the burn-in saved after its last fault
        m["end"] = min(c for c in hashes if c >= m["end"])
        m["expected_hash"] = hashes[m["end"]]
    return merged


def replay(scenario: Scenario, run_dir: Path, run_id: str, window: dict[str, Any], pool: Any, k: int) -> dict[str, Any]:
    """Run `window` without faults from its first checkpoint (a golden run of that stretch only)."""
    wdir = run_dir / "verify" / f"window{k:03d}"
    shutil.rmtree(wdir, ignore_errors=True)
    (wdir / "checkpoints").mkdir(parents=True)
    # the newest kept checkpoint at or before the window's start that verifies (one damaged before it was
    # kept is passed over: the window then starts earlier)
    kept = [c for c in checkpoint.committed(run_dir / "verify" / "checkpoints") if c.step <= window["start"]]
    src = next((c for c in reversed(kept) if _verifies(c, scenario.workload.ranks)), None)
    window = {**window, "start": src.step if src is not None else 0}
    if src is not None:
        dst = wdir / "checkpoints" / src.path.name
        dst.mkdir()
        for f in src.path.iterdir():
            os.link(f, dst / f.name)
    data = scenario.model_dump(mode="json")
    data["workload"] = {**data["workload"], "steps": window["end"]}
    data["faults"], data["burn_in"] = [], None
    data["checkpoint"] = {**data["checkpoint"], "memory_every": 0, "keep": 1, "every": max(window["end"], 1)}
    sc = Scenario.model_validate(data)
    t0 = time.time()
    Supervisor(sc, wdir, run_id, golden=True, pool=pool, log_steps=False).run()
    finals = {e["rank"]: e["state_hash"] for e in read_events(wdir / "events.jsonl") if e.get("event") == "rank_finished"}
    shutil.rmtree(wdir / "checkpoints", ignore_errors=True)
    got = finals.get(0)
    return {**window, "replayed_hash": got, "exact": got is not None and got == window["expected_hash"]
            and len(set(finals.values())) == 1, "wall_s": time.time() - t0}


def _verifies(ckpt: Any, world_size: int) -> bool:
    try:
        checkpoint.verify(ckpt, world_size)
        return True
    except checkpoint.CheckpointError:
        return False


# -- health ----------------------------------------------------------------------------------------

def assess(scenario: Scenario, result: Any, events: list[dict[str, Any]], rollups: list[dict[str, Any]]) -> dict[str, Any]:
    """Each rank's verdict (healthy / degraded / faulty), with the reasons and the thresholds."""
    h = scenario.burn_in.health
    n = scenario.workload.ranks
    reasons: dict[int, list[tuple[str, str]]] = {r: [] for r in range(n)}   # (level, reason)
    speed = judge_speed(rollups, n, h)
    for r, j in speed["ranks"].items():
        if j["outlier"]:
            reasons[r].append(("degraded", f"straggler: {speed['measure_text']} {j['score']:.2f}x the other ranks' "
                                           f"median in {j['above']} of {j['periods']} periods (sign test p = "
                                           f"{j['p_value']:.2g}; thresholds {h.straggler_ratio:.2f}x, p < "
                                           f"{h.significance:g})"))
        s = speed["slowdown"][r]
        if s["outlier"]:
            reasons[r].append(("degraded", f"slowed down: {speed['measure_text']} in the last third of the burn-in "
                                           f"{s['score']:.2f}x its first third's in {s['above']} of {s['periods']} "
                                           f"periods (sign test p = {s['p_value']:.2g}; thresholds "
                                           f"{h.slowdown_ratio:.2f}x, p < {h.significance:g})"))
    # failures no injected fault explains, grouped by signature
    groups: dict[tuple[str, int | None], list[Any]] = defaultdict(list)
    for f in result.failures:
        if f.fault_index is None:
            groups[(f.signature, f.rank)].append(f)
    unexplained = [{"signature": sig, "rank": rank, "count": len(fs), "cause": fs[0].cause,
                    "detector": fs[0].detector, "first_at": min(x.time for x in fs)}
                   for (sig, rank), fs in sorted(groups.items(), key=lambda kv: str(kv[0]))]
    per_rank_failures: dict[int, int] = defaultdict(int)
    for g in unexplained:
        if g["rank"] is not None:
            per_rank_failures[g["rank"]] += g["count"]
    for r, count in per_rank_failures.items():
        if count >= h.lemon_failures:
            reasons[r].append(("faulty", f"lemon: {count} failures that no injected fault explains "
                                         f"(threshold {h.lemon_failures})"))
        else:
            reasons[r].append(("degraded", f"{count} failure(s) that no injected fault explains "
                                           f"(faulty at {h.lemon_failures})"))
    # detector findings no injected fault explains: silent data corruption on that rank
    findings = _unexplained_findings(events)
    for r, fs in findings.items():
        if 0 <= r < n:
            reasons[r].append(("faulty", f"{len(fs)} detector finding(s) that no injected fault explains "
                                         f"(first: {fs[0]['detector']} at step {fs[0]['step']})"))
    ranks = []
    for r in range(n):
        levels = [lvl for lvl, _ in reasons[r]]
        verdict = "faulty" if "faulty" in levels else "degraded" if "degraded" in levels else "healthy"
        j = speed["ranks"][r]
        ranks.append({"rank": r, "verdict": verdict, "reasons": [txt for _, txt in reasons[r]],
                      "median_compute_s": speed["median_compute_s"].get(r), "straggler_score": j["score"],
                      "straggler": j, "cpu_wait_share": speed["cpu_wait_share"].get(r),
                      "unexplained_failures": per_rank_failures.get(r, 0),
                      "unexplained_findings": len(findings.get(r, []))})
    return {"ranks": ranks, "unexplained_failures": unexplained,
            "thresholds": {"straggler_ratio": h.straggler_ratio, "slowdown_ratio": h.slowdown_ratio,
                           "significance": h.significance, "period_s": h.period_s, "min_periods": MIN_PERIODS,
                           "lemon_failures": h.lemon_failures, "measure": speed["measure"]}}


def judge_speed(rollups: list[dict[str, Any]], n: int, h: Any) -> dict[str, Any]:
    """Which ranks are slow, against the others period by period (`reports.outliers`), and which slowed down
    against their own first third. The measure is the compute time per step less the time the rank waited
    for a CPU (a busy host's descheduling, a CPU limit: the host's trouble, judged at the fleet level, not the
    rank's) where the steps report it, else the compute time."""
    from scipy.stats import binomtest  # lazy: scipy is slow to import

    net = all("median_net_compute_s" in x for p in rollups for x in p["ranks"].values())
    measure = "median_net_compute_s" if net and rollups else "median_compute_s"
    table = {r: _period_values(rollups, r, measure) for r in range(n)}
    ranks = persistent_outliers(table, h.straggler_ratio, h.significance)
    slowdown = {}
    for r in range(n):
        xs = [x for x in table[r] if x is not None]
        third = len(xs) // 3
        late = [x / statistics.median(xs[:third]) for x in xs[-third:]] if third else []
        above = sum(1 for x in late if x >= h.slowdown_ratio)
        p = float(binomtest(above, len(late), 0.5, alternative="greater").pvalue) if late else None
        score = statistics.median(late) if late else None
        slowdown[r] = {"score": score, "periods": len(late), "above": above, "p_value": p,
                       "outlier": bool(late) and len(late) >= MIN_PERIODS and score >= h.slowdown_ratio
                       and p < h.significance}
    compute, wait = {}, {}
    for r in range(n):
        xs = [x for x in _period_values(rollups, r, "median_compute_s") if x is not None]
        ws = [x for x in _period_values(rollups, r, "median_cpu_wait_s") if x is not None]
        if xs:
            compute[r] = statistics.median(xs)
            if ws and compute[r] > 0:
                wait[r] = min(1.0, statistics.median(ws) / compute[r])
    return {"measure": measure, "ranks": ranks, "slowdown": slowdown, "median_compute_s": compute,
            "cpu_wait_share": wait,
            "measure_text": ("compute per step less its wait for a CPU" if measure == "median_net_compute_s"
                             else "compute per step")}


def _period_values(rollups: list[dict[str, Any]], rank: int, key: str, min_steps: int = 5) -> list[float | None]:
    """A rank's `key` per roll-up period, aligned with the periods (None where it ran fewer than `min_steps`
    steps, an outage or a restart: one slow step there would weigh as much as a period of hundreds)."""
    out: list[float | None] = []
    for p in rollups:
        x = p["ranks"].get(str(rank))
        out.append(x[key] if x is not None and x["n"] >= min_steps and key in x else None)
    return out


def _unexplained_findings(events: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Detector findings (`detection` events) at or before which no fault was injected into that attempt
    or the one before: what the detectors saw that the schedule did not cause."""
    injected_steps = sorted(e["step"] for e in events if e.get("event") == "fault_injected")
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("event") != "detection":
            continue
        step = e.get("step", 0)
        if any(s <= step for s in injected_steps if step - s <= 50):
            continue
        out[e.get("rank", 0)].append(e)
    return out


# -- the whole burn-in -----------------------------------------------------------------------------

def run_burn_in(scenario: Scenario | None, out_dir: str | Path, *, duration_s: float = 0, seed: int = 0,
                on_event: Callable[[dict[str, Any]], None] | None = None,
                resume: str | Path | None = None, history: str | None = None) -> dict[str, Any]:
    """Run a burn-in (or, with `resume`, continue one whose supervisor died); returns the summary. A job that
    recovers itself (recovery.mode external) runs by `external_burn_in.run_external_burn_in`."""
    if scenario is not None and scenario.recovery.mode == "external":
        raise UserError(f"{scenario.name}: recovery.mode external: a burn-in of a job that recovers itself runs by "
                        "burnin.harness.external_burn_in.run_external_burn_in (`burnin burn-in` picks it)")
    before: dict[str, Any] = {"elapsed_s": 0.0, "fired": set(), "first_attempt": 0, "events": []}
    if resume is not None:
        run_dir = check_out_dir(resume, "--resume", must_exist=True, fix="give the run directory of a burn-in")
        scenario, duration_s, seed, schedule, before = read_resume_state(run_dir)
        run_id = run_dir.name
        session = f"{run_id}-s{before['sessions']}"
    else:
        schedule = draw_schedule(scenario, duration_s, seed)
        run_id = session = new_run_id(scenario.name)
    sc = runtime_scenario(scenario, schedule, duration_s)
    sc, fabric = choose_fabric(sc, session)
    check_device(sc)
    if resume is None:
        out = check_out_dir(out_dir)
        run_dir = make_run_dir(out, run_id, scenario.model_dump_json(indent=1))
        (run_dir / "ranks").mkdir(exist_ok=True)
        (run_dir / "schedule-drawn.json").write_text(json.dumps({"seed": seed, "duration_s": duration_s,
                                                                 "faults": schedule}, indent=1))
    metrics = Metrics()
    metrics.set_run(scenario.name, run_id)
    # One pool of warm spares for the whole burn-in and its replays, on loopback; with network namespaces
    # the run keeps its own (its spares must live in them, and go before the namespaces do).
    pool = _local_pool(sc, run_dir, session) if fabric is None else None
    t_start = time.time()
    # a resumed burn-in goes on where its timeline stopped: the downtime is not burn-in time
    clock = Clock(sc, run_dir, duration_s, clock0=t_start - before["elapsed_s"], on_progress=on_event,
                  metrics=metrics, fired=before["fired"], events=before["events"])

    def tap(ev: dict[str, Any]) -> None:
        clock.observe(ev)
        if on_event and ev.get("event") in ("fault_injected", "failure_detected", "restart", "recovery_exhausted"):
            on_event({**ev, "elapsed_s": time.time() - clock.clock0})

    interrupted = None
    try:
        try:
            Supervisor(sc, run_dir, session, metrics=metrics, on_event=tap, fabric=fabric, pool=pool, clock=clock,
                       log_steps=False, first_attempt=before["first_attempt"], fired=before["fired"]).run()
        except KeyboardInterrupt:
            interrupted = "interrupted by SIGINT: the verdict covers what ran"
        with EventWriter(run_dir / "events.jsonl") as log:
            final = clock.rollup(time.time())
            if final is not None:
                log.emit("burn_in_rollup", source="supervisor", **final)
            clock.fingerprints.close()
            log.emit("burn_in_ended", source="supervisor", interrupted=interrupted)
        wall = time.time() - clock.clock0
        events = read_events(run_dir / "events.jsonl")
        result = judge(events, sc, None, run_id=run_id, run_dir=str(run_dir), config_hash="burn-in")
        wins = windows(events, sorted(set(clock.windows_kept)), clock.ckpt_hashes,
                       max_span=4 * sc.checkpoint.every)
        checked = []
        if interrupted is None:
            if fabric is not None:  # the run's own pool lived in its namespaces, gone now: one on loopback
                pool = _local_pool(sc, run_dir, session)
            for k, win in enumerate(wins):
                if on_event:
                    on_event({"event": "window_replay", "k": k, "of": len(wins), "start": win["start"],
                              "end": win["end"], "t": time.time()})
                checked.append(replay(sc, run_dir, session, win, pool, k))
        shutil.rmtree(run_dir / "verify" / "checkpoints", ignore_errors=True)
    finally:
        if pool is not None:
            pool.close()
        cleanup.unregister(session)
    summary = _summary(scenario, sc, result, events, clock, checked, wall, duration_s, seed, interrupted)
    return conclude(scenario, sc, summary, result, events, clock.rollups, run_dir=run_dir, metrics=metrics,
                    history=history, started_at=clock.clock0, sessions=before.get("sessions", 0) + 1)


def conclude(scenario: Scenario, sc: Scenario, summary: dict[str, Any], result: Any, events: list[dict[str, Any]],
             rollups: list[dict[str, Any]], *, run_dir: Path, metrics: Any, history: str | None, started_at: float,
             sessions: int) -> dict[str, Any]:
    """A finished burn-in's health per rank, its verdict, its reports, metrics and history row; returns the
    summary (`sc`: the run the burn-in was, `result`: its judged run)."""
    summary["sessions"] = sessions
    health = assess(scenario, result, events, rollups)
    summary["health"] = health
    summary["ok"] = (summary["recovery"]["ok"] and all(r["verdict"] == "healthy" for r in health["ranks"])
                     and summary["interrupted"] is None and result.error is None)
    summary["run_dir"] = str(run_dir)
    write_reports(run_dir, summary, sc)
    metrics.burn_in(summary)
    metrics.write_textfile(run_dir / "metrics.prom")
    hist.record_burn_in(summary, result, hist.history_path(history), started_at)
    return summary


def read_resume_state(run_dir: Path) -> tuple[Scenario, float, int, list[dict[str, Any]], dict[str, Any]]:
    """What a burn-in whose supervisor died had done: its scenario, its drawn schedule, how far its
    timeline got, which faults fired, its attempts. A one-line UserError when it cannot be resumed."""
    try:
        scenario = Scenario.model_validate(json.loads((run_dir / "scenario.json").read_text()))
        drawn = json.loads((run_dir / "schedule-drawn.json").read_text())
        duration_s, seed, schedule = float(drawn["duration_s"]), int(drawn["seed"]), list(drawn["faults"])
        events = read_events(run_dir / "events.jsonl")
    except FileNotFoundError as exc:
        raise UserError(f"--resume: {run_dir} is not a burn-in run directory ({Path(exc.filename).name} is "
                        "missing)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume: {run_dir} is damaged ({' '.join(str(exc).split())[:200]}); start a new "
                        "burn-in") from None
    if scenario.burn_in is None:
        raise UserError(f"--resume: {run_dir} is not a burn-in run directory (its scenario has no burn_in)")
    if any(e.get("event") == "burn_in_ended" for e in events):
        raise UserError(f"--resume: the burn-in in {run_dir} ended already (see burn-in.md); start a new one")
    starts = [e for e in events if e.get("event") == "run_started"]
    if not starts:
        raise UserError(f"--resume: the burn-in in {run_dir} never started; start a new one")
    last_pid = starts[-1].get("pid")
    if last_pid and _alive_burnin(last_pid):
        raise UserError(f"--resume: the burn-in in {run_dir} is still running (supervisor pid {last_pid}); "
                        "stop it first")
    elapsed = max(e.get("t", 0) for e in events) - starts[0]["t"]
    sessions = len(starts)
    # earlier sessions' downtime is not burn-in time: sum each session's span
    spans = []
    for k, st in enumerate(starts):
        nxt = starts[k + 1]["t"] if k + 1 < len(starts) else float("inf")
        ts = [e["t"] for e in events if st["t"] <= e.get("t", 0) < nxt]
        spans.append(max(ts) - st["t"] if ts else 0.0)
    elapsed = min(elapsed, sum(spans))
    fired = {e["fault_index"] for e in events if e.get("event") == "fault_injected"}
    attempts = [e.get("attempt", 0) for e in events if e.get("event") == "attempt_started"]
    return scenario, duration_s, seed, schedule, {
        "elapsed_s": elapsed, "fired": fired, "first_attempt": max(attempts, default=-1) + 1,
        "events": events, "sessions": sessions}


def _alive_burnin(pid: int) -> bool:
    try:
        return b"burnin" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _own_usage() -> dict[str, float]:
    """This process's resident memory (MiB) and open file descriptors."""
    rss = 0.0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = -1
    return {"rss_mib": round(rss, 1), "fds": fds}


def _local_pool(sc: Scenario, run_dir: Path, session: str) -> Any:
    return open_pool(sc, run_dir, session)[0]


def _summary(scenario: Scenario, sc: Scenario, result: Any, events: list[dict[str, Any]], clock: Clock,
             checked: list[dict[str, Any]], wall: float, duration_s: float, seed: int,
             interrupted: str | None) -> dict[str, Any]:
    exact_of = {}
    for win in checked:
        for i in win["faults"]:
            exact_of[i] = win["exact"]
    faults = []
    for f in result.faults:
        if not f.injected:
            continue
        exact = exact_of.get(f.index)
        seen = f.detected_by is not None or f.recovery is not None
        if exact is None and not spec_changes_state(sc, f.index) and not seen:
            outcome = "masked"  # a delay that brought nothing down: nothing to verify
        elif exact is None:
            outcome = "unverified"  # no checkpoint after it (the run ended first), or the burn-in was cut short
        elif exact:
            outcome = "recovered" if seen else "masked"
        else:
            outcome = "detected" if seen else "sdc"
        spec = sc.faults[f.index]
        fired = next((e for e in events if e.get("event") == "fault_injected" and e.get("fault_index") == f.index), {})
        faults.append({"index": f.index, "fault": f.fault, "rank": f.rank, "at_s": spec.at_s,
                       "fired_at_s": (fired.get("t", clock.clock0) - clock.clock0) if fired else None,
                       "step": fired.get("step"), "point": fired.get("point"),
                       "phase": PHASE.get(fired.get("point"), None), "timed": bool(fired.get("timed")),
                       "outcome": outcome, "expected": spec.expected,
                       "ok": outcome in spec.expected or outcome == "unverified",
                       "detected_by": f.detected_by, "lost_steps": f.lost_steps,
                       "recovery_s": f.recovery.total_s if f.recovery else None})
    useful = (clock.stopping_at or (clock.last_step + 1))
    fault_free = [p["ranks"]["0"]["median_compute_s"] for p in clock.rollups if "0" in p["ranks"]]
    by_outcome: dict[str, int] = defaultdict(int)
    for f in faults:
        by_outcome[f["outcome"]] += 1
    recovery_ok = all(f["ok"] for f in faults) and all(w["exact"] for w in checked)
    return {
        "schema_version": SCHEMA_VERSION, "kind": "burn-in", "scenario": scenario.name, "seed": seed,
        "duration_s": duration_s, "wall_s": wall, "interrupted": interrupted, "error": result.error,
        "steps": {"useful": useful, "executed": clock.executed,
                  "goodput_steps": useful / clock.executed if clock.executed else None,
                  "useful_per_s": useful / wall if wall else None},
        "faults": {"scheduled": len(sc.faults), "fired": len(faults), "by_outcome": dict(by_outcome),
                   "per_hour": len(faults) / wall * 3600 if wall else None, "list": faults},
        "restarts": result.restarts,
        "recovery": {"ok": recovery_ok, "windows": checked},
        "step_time": {"fault_free_median_compute_s": statistics.median(fault_free) if fault_free else None},
        "supervisor_usage": _usage_trend(clock.rollups),
    }


def spec_changes_state(sc: Scenario, index: int) -> bool:
    return registry.get(sc.faults[index].fault).changes_state


def _replayable(data: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Drop from the realised schedule `data` the faults a fresh run refuses at the step they hit (a
    checkpoint damaged at step 0 after a restart from scratch: a fresh run has no checkpoint there);
    returns each one left out with the reason. Bounded: at most one pass per fault."""
    left_out = []
    for _ in range(len(data["faults"]) + 1):
        try:
            Scenario.model_validate(data)
            return left_out
        except ValidationError as exc:
            bad = next((e for e in exc.errors() if len(e["loc"]) > 1 and e["loc"][0] == "faults"
                        and isinstance(e["loc"][1], int)), None)
            if bad is None:
                raise
            left_out.append((data["faults"].pop(bad["loc"][1]), bad["msg"].removeprefix("Value error, ")))
    return left_out


def _usage_trend(rollups: list[dict[str, Any]]) -> dict[str, Any]:
    """The supervisor's memory and open files from minute 2 (or the first period) to the end."""
    rows = [p for p in rollups if "supervisor" in p]
    if not rows:
        return {}
    later = [p for p in rows if p["elapsed_s"] >= 120] or rows
    first, last = later[0]["supervisor"], rows[-1]["supervisor"]
    growth = (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"] if first["rss_mib"] else None
    return {"from_s": later[0]["elapsed_s"], "first": first, "last": last, "rss_growth": growth,
            "fds_growth": last["fds"] - first["fds"], "max_rss_mib": max(p["supervisor"]["rss_mib"] for p in rows)}


def write_reports(run_dir: Path, summary: dict[str, Any], sc: Scenario) -> None:
    """burn-in.json, schedule.yaml (the realised schedule, replayable), burn-in.md, junit.xml and report.html."""
    atomic_write(run_dir / "burn-in.json", json.dumps(summary, indent=1, default=str).encode())
    # the realised schedule as a scenario `burnin run` takes: each fault at the step and point it hit (a
    # scenario names only the points where a fault can wait for the supervisor: one that landed mid-step
    # replays at its step's nearest such point; burn-in.json keeps where it really landed)

    realised = []
    for f in summary["faults"]["list"]:
        if f["step"] is None:
            continue
        points = registry.get(f["fault"]).points
        realised.append({"fault": f["fault"], "rank": f["rank"], "step": f["step"],
                         "point": f["point"] if f["point"] in points else points[0],
                         "params": sc.faults[f["index"]].params, "expect": sc.faults[f["index"]].expected})
    data = sc.model_dump(mode="json", exclude={"burn_in", "campaign"})
    last = max([f["step"] for f in realised] or [0])
    data["workload"]["steps"] = max(summary["steps"].get("job_steps") or summary["steps"]["useful"], last + 2)
    data["faults"] = realised
    data["name"] = (sc.name + "-replay")[:64]
    left_out = _replayable(data)

    head = (f"# The faults burn-in {summary['scenario']} (seed {summary['seed']}) fired, at the steps they hit:\n"
            f"# `burnin run schedule.yaml` replays them (mid-step landings at their step's nearest point).\n")
    for fault, why in left_out:
        head += f"# Left out (a fresh run cannot replay it): {fault['fault']} at step {fault['step']}: {why}\n"
    atomic_write(run_dir / "schedule.yaml", (head + yaml.safe_dump(data, sort_keys=False)).encode())
    h = summary["health"]
    external = summary.get("comparison") == "invariants"
    st = summary["steps"]
    goodput = (f"goodput {st['useful']} of {st['executed']} group-steps committed (each of {summary['replica_groups']} "
               f"replica groups' part of each of {st['job_steps']} steps)" if external else
               f"goodput {st['useful']} useful of {st['executed']} executed steps")
    lines = [f"# Burn-in {summary['scenario']}: {'PASS' if summary['ok'] else 'FAIL'}", "",
             f"{summary['wall_s']:.0f} s (asked {summary['duration_s']:.0f} s), seed {summary['seed']}; "
             f"{summary['faults']['fired']} faults fired of {summary['faults']['scheduled']} scheduled; "
             f"{summary['restarts']} restarts; {goodput}.", ""]
    if external:
        lines += [f"Recovery by the system under test ({summary['system']}, recovery.mode: external): judged by its "
                  "invariants, not bit for bit; health on each rank's forward time per step.", ""]
    if summary.get("error"):
        lines += [f"**error: {summary['error']}**", ""]
    if summary["interrupted"]:
        lines += [f"**{summary['interrupted']}**", ""]
    lines += ["| rank | verdict | straggler score | unexplained failures | reasons |", "|---|---|---|---|---|"]
    for r in h["ranks"]:
        score = f"{r['straggler_score']:.2f}" if r["straggler_score"] is not None else "–"
        lines.append(f"| {r['rank']} | {r['verdict']} | {score} | {r['unexplained_failures']} | "
                     f"{'; '.join(r['reasons']) or '–'} |")
    t = h["thresholds"]
    lines += ["", f"Thresholds: straggler {t['straggler_ratio']}x the other ranks' median "
                  f"({t.get('measure', 'median_compute_s')}, per {t.get('period_s', 10):g}-second period), in most "
                  f"periods at p < {t.get('significance', 0.01):g} (sign test, at least {t.get('min_periods', 5)} "
                  f"periods); lemon at {t['lemon_failures']} unexplained failures.", "",
              "## Faults", "", "| # | fault | rank | at (s) | step | phase | outcome | recovery (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for f in summary["faults"]["list"]:
        rec = f"{f['recovery_s']:.2f}" if f["recovery_s"] is not None else "–"
        at = f"{f['fired_at_s']:.1f}" if f["fired_at_s"] is not None else "–"
        lines.append(f"| {f['index']} | {f['fault']} | {f['rank']} | {at} | {f['step']} | {f['phase'] or '–'} | "
                     f"{f['outcome']}{'' if f['ok'] else ' (expected ' + '/'.join(f['expected']) + ')'} | {rec} |")
    if h["unexplained_failures"]:
        lines += ["", "## Failures no injected fault explains", "", "| signature | rank | count | cause |",
                  "|---|---|---|---|"]
        for g in h["unexplained_failures"]:
            lines.append(f"| `{g['signature']}` | {g['rank']} | {g['count']} | {g['cause']} |")
    if external:
        lines += ["", "## Invariants", "", "| invariant | ok | evidence |", "|---|---|---|"]
        lines += [f"| {i['name']} | {i['ok']} | {i['message']} |" for i in summary["recovery"]["invariants"]]
    else:
        lines += ["", "## Verification windows", "",
                  "Each stretch with faults was replayed without them from its first checkpoint; the state hash at "
                  "its last checkpoint must match.", "", "| from step | to step | faults | exact |",
                  "|---|---|---|---|"]
        for wdw in summary["recovery"]["windows"]:
            lines.append(f"| {wdw['start']} | {wdw['end']} | {', '.join(map(str, wdw['faults']))} | {wdw['exact']} |")
    atomic_write(run_dir / "burn-in.md", ("\n".join(lines) + "\n").encode())

    cases = [(f"rank {r['rank']}", r["verdict"] == "healthy", f"{r['verdict']}: " + "; ".join(r["reasons"]))
             for r in h["ranks"]]
    cases.append(("recovery", summary["recovery"]["ok"], "; ".join(
        [f"{i['name']}: {i['message']}" for i in summary["recovery"].get("invariants", []) if not i["ok"]]
        + [f"fault {f['index']} {f['fault']}: {f['outcome']}" + (f" ({f['why']})" if f.get("why") else "")
           for f in summary["faults"]["list"] if not f["ok"]]) or "an injected fault was not recovered exactly"))
    xml = junit_xml(f"burn-in.{summary['scenario']}", cases, wall_s=summary["wall_s"],
                    started_at=time.time() - summary["wall_s"], error=summary["error"],
                    properties={"run_dir": run_dir, "seed": summary["seed"], "duration_s": summary["duration_s"]},
                    system_out=(run_dir / "burn-in.md").read_text())
    atomic_write(run_dir / "junit.xml", xml.encode())
    # report.html, last: a failure to draw it costs a warning, never the reports above
    write_html_safely(lambda: write_burn_in_report(run_dir, summary), run_dir / "report.html")
