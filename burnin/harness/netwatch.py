"""What network faults do to training: stalls measured against the median step, and the rank named.

The supervisor feeds every rank's `step_done` to a `NetworkWatch` and polls it from its loop; the
watch emits `network_stall` (one per stalled step; the `burnin_network_stall_seconds` histogram),
`network_probe` (the evidence) and `fault_detected` (once per network fault). See docs/network.md.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["NetworkWatch", "slow_rank"]

STALL_FACTOR = 3.0       # a step this many times the median step time ...
STALL_MIN_S = 0.3        # ... and at least this much longer is a stall
NAME_FACTOR = 10.0       # a rank whose link carries the probe this many times slower than the others' ...
NAME_MAX_BPS = 1e9       # ... and slower than this is named. A veth moves 10-30 Gbit/s; scheduling noise on a
                         # busy CPU can slow one probe several times, never to below a gigabit.


@dataclass
class _Window:
    attempt: int
    start: float
    end: float
    step: int
    detected: bool = False


class NetworkWatch:
    """Stall and straggler detection for network faults, fed with the ranks' `step_done` events.

    In DDP every rank waits for the others inside the all-reduce, so a slow link slows every rank's
    step alike: step times say *that* the network hurts, not *where*. The watch takes the median step
    time of the attempt as the baseline; while a network fault is in force (from the step it fires at
    until twice its duration later, since TCP retransmits with backoff), a step far slower than the
    baseline is a stall (`network_stall`, one per step). The first stall of a fault triggers a probe
    of every rank's link from its own namespace (`NetnsFabric.probe`); a rank whose link carries the
    probe far slower than the others' (or not at all) is named the straggler. The fault is then
    `fault_detected` by `straggler` with that rank, or by `step_stall` when every link looks healthy
    again (a flap that is already over). On a fabric without probes (loopback, simulated faults)
    every detection is a `step_stall`.
    """

    def __init__(self, specs: list[Any], faults: list[Any], fabric: Any, fired: set[int],
                 emit: Callable[..., Any]):
        self._net = {i: (spec, fault) for i, (spec, fault) in enumerate(zip(specs, faults))
                     if fault.family == "network" and hasattr(fault.params, "duration_s")}
        self._fabric, self._fired, self._emit = fabric, fired, emit
        self._windows: dict[int, _Window] = {}
        self._baseline: dict[int, deque[float]] = {}
        self._warm: set[tuple[int, int]] = set()
        self._stalled_steps: set[tuple[int, int]] = set()
        self._pending: list[tuple[threading.Thread, dict[str, Any]]] = []

    def step_done(self, ev: dict[str, Any]) -> None:
        if not self._net or "dt" not in ev:
            return
        attempt, rank, step, dt, t = ev.get("attempt", 0), ev["rank"], ev["step"], ev["dt"], ev["t"]
        for i, (spec, fault) in self._net.items():
            if step == spec.step and i not in self._windows and i not in self._fired:
                d = fault.params.duration_s
                self._windows[i] = _Window(attempt, t, t + 2 * d + 1.0, step)
        if (attempt, rank) not in self._warm:  # the first step of an attempt pays for warm-up
            self._warm.add((attempt, rank))
            return
        base = self._baseline.setdefault(attempt, deque(maxlen=50))
        open_ = [(i, w) for i, w in self._windows.items() if w.attempt == attempt and w.start <= t <= w.end
                 and step > w.step]
        median = statistics.median(base) if len(base) >= 3 else None
        slow = median is not None and dt > max(STALL_FACTOR * median, median + STALL_MIN_S)
        if not open_:
            if not slow:
                base.append(dt)
            return
        if not slow or (attempt, step) in self._stalled_steps:
            return
        self._stalled_steps.add((attempt, step))
        i, w = max(open_, key=lambda iw: iw[1].start)
        stall = dt - median
        self._emit("network_stall", fault_index=i, rank=rank, step=step, stall_s=stall, step_s=dt, median_step_s=median)
        if w.detected:
            return
        w.detected = True
        found = {"fault_index": i, "stall_s": stall, "step": step, "median_step_s": median,
                 "latency_steps": step - self._net[i][0].step}
        if hasattr(self._fabric, "probe"):
            thread = threading.Thread(target=self._probe, args=(found,), name="burnin-probe", daemon=True)
            thread.start()
            self._pending.append((thread, found))
        else:
            self._detected(found)

    def poll(self) -> None:
        """Emit what finished probes found (called from the supervisor's loop)."""
        for item in [p for p in self._pending if not p[0].is_alive()]:
            self._pending.remove(item)
            self._detected(item[1])

    def _probe(self, found: dict[str, Any]) -> None:
        links = self._fabric.probe()
        found["evidence"] = {"links": links, "qdisc": {k: self._fabric.qdisc_stats(k) for k in links}}
        found["rank"] = slow_rank(links)

    def _detected(self, found: dict[str, Any]) -> None:
        rank = found.pop("rank", None)
        evidence = found.pop("evidence", None)
        if evidence is not None:
            self._emit("network_probe", fault_index=found["fault_index"], **evidence)
        if rank is not None:
            links = evidence["links"]
            others = [v["egress_bps"] for k, v in links.items() if k != rank and v["egress_bps"]]
            mine = links[rank]["egress_bps"]
            what = "no connection" if mine is None else f"{mine / 1e6:.1f} Mbit/s"
            theirs = f"{statistics.median(others) / 1e6:.0f} Mbit/s" if others else "n/a"
            self._emit("fault_detected", detector="straggler", rank=rank,
                       cause=f"slow link on rank {rank}: {what} out vs {theirs} on the others", **found)
        else:
            self._emit("fault_detected", detector="step_stall", rank=None,
                       cause=f"network stall of {found['stall_s']:.2f} s at step {found['step']}", **found)


def slow_rank(links: dict[int, dict[str, float | None]]) -> int | None:
    """The one rank whose link is far slower than the others' (or dead while theirs work), if any."""
    rate = {k: v.get("egress_bps") for k, v in links.items()}
    dead = [k for k, v in rate.items() if not v]
    alive = {k: v for k, v in rate.items() if v}
    if len(dead) == 1 and alive:
        return dead[0]
    if dead or len(alive) < 2:
        return None
    worst = min(alive, key=alive.__getitem__)
    rest = statistics.median(v for k, v in alive.items() if k != worst)
    return worst if alive[worst] * NAME_FACTOR <= rest and alive[worst] < NAME_MAX_BPS else None
