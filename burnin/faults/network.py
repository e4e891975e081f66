"""Network faults on real links: a rank's veth taken down, blackholed, throttled, or cut off by a partition.

They act from outside the rank, through the run's fabric (`burnin.harness.fabric.NetnsFabric`: one
network namespace per rank), and undo themselves on time through `ctx.schedule`, restarts included.
This kernel has no `netem`: a blackhole is `pfifo limit 0` (every egress packet dropped) and a
throttle is `tbf` (a token bucket). On a machine without the privilege for namespaces, a scenario
with `network.fallback: simulate` runs the `*.simulated` variants instead: the target rank goes
silent (or slow) at the collective level, and every report says `simulated`.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from burnin.core.procs import run_tool
from burnin.errors import HarnessError
from burnin.faults.base import Fault

__all__ = ["LinkDown", "Blackhole", "Throttle", "Partition", "CoordinatorCut", "SIMULATED", "simulate", "rate_bits", "NodeInterface"]

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}  # tc's units: SI, bits per second


def rate_bits(rate: str) -> float:
    """'10mbit' -> 1e7 bits per second."""
    m = _RATE.match(rate)
    if not m:
        raise ValueError(f"rate {rate!r}: expected a number and a unit, e.g. 500kbit, 10mbit, 1gbit")
    return float(m.group(1)) * _UNITS[m.group(2)]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    duration_s: float = Field(1.0, gt=0, le=3600, description="how long the fault lasts before it is undone")


class _NetworkEffect:
    """A network fault shows anywhere in the group (the peers time out, or lose the connection), and
    only while it lasts, plus the time a collective or a step may take to notice."""

    effects = ("network", "hang", "timeout")
    effect_scope = "group"

    def effect_window_s(self, timeouts: Any) -> float | None:
        return self.params.duration_s + max(timeouts.collective_s, timeouts.step_s) + 1.0


class BlackholeParams(_Params):
    duration_s: float = Field(25.0, gt=0, le=3600, description="how long every egress packet is dropped")


class ThrottleParams(_Params):
    duration_s: float = Field(5.0, gt=0, le=3600, description="how long the link stays throttled")
    rate: str = Field("10mbit", description="egress rate limit, in tc units (kbit, mbit, gbit: SI)")
    latency_ms: float = Field(200.0, gt=0, le=10_000, description="longest a packet may wait in the bucket's queue")

    @field_validator("rate")
    @classmethod
    def _rate(cls, rate: str) -> str:
        shown = repr(rate) if len(rate) <= 40 else repr(rate[:37]) + "..."  # never echo a huge value whole
        if not _RATE.fullmatch(rate):  # fullmatch: `$` would let a trailing newline through to tc
            raise ValueError(f"rate {shown}: expected a number and a unit, e.g. 500kbit, 10mbit, 1gbit")
        if not 64e3 <= rate_bits(rate) <= 100e9:
            raise ValueError(f"rate {shown}: use 64kbit to 100gbit")
        return rate


class PartitionParams(_Params):
    duration_s: float = Field(5.0, gt=0, le=3600, description="how long the partition lasts")
    ranks: list[int] | None = Field(None, min_length=1, max_length=64,
                                    description="the ranks cut off from the rest (default: the target rank)")

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, ranks: list[int] | None) -> list[int] | None:
        if ranks is not None and any(r < 0 for r in ranks):
            shown = str(ranks) if len(str(ranks)) <= 60 else str(ranks)[:57] + "..."
            raise ValueError(f"ranks {shown}: ranks are 0 or more")
        # Which ranks exist (workload.ranks) and that some, not all, are cut off is checked with the
        # scenario (schema.Scenario), where the workload is known.
        return ranks


def _fabric(ctx: Any, name: str) -> Any:
    if not hasattr(ctx.fabric, "set_link"):
        raise HarnessError(f"{name} needs per-rank network namespaces, but this run's ranks share the host's "
                           "loopback (the runner picks the namespace fabric for network faults)")
    return ctx.fabric


# -- real faults ---------------------------------------------------------------------------------------

class LinkDown(_NetworkEffect, Fault):
    """Take the rank's interface down, and up again after `duration_s`: a flap, or an outage if long."""

    name = "network.link_down"
    summary = "take a rank's network link down for duration_s, then up (a flap; an outage if long)"
    where = "out_of_rank"
    Params = _Params

    def inject(self, ctx: Any) -> dict[str, Any]:
        fabric, rank = _fabric(ctx, self.name), ctx.rank
        details = fabric.set_link(rank, up=False)
        ctx.schedule(self.params.duration_s, "link up", lambda: fabric.set_link(rank, up=True))
        return {**details, "duration_s": self.params.duration_s}


class Blackhole(_NetworkEffect, Fault):
    """Drop every packet the rank sends (`pfifo limit 0` on its egress): the link looks up but nothing arrives."""

    name = "network.blackhole"
    summary = "drop all of a rank's egress for duration_s (tc pfifo limit 0): a silent black hole"
    where = "out_of_rank"
    Params = BlackholeParams

    def inject(self, ctx: Any) -> dict[str, Any]:
        fabric, rank = _fabric(ctx, self.name), ctx.rank
        details = fabric.set_qdisc(rank, ["pfifo", "limit", "0"])
        ctx.schedule(self.params.duration_s, "blackhole removed", lambda: fabric.clear_qdisc(rank))
        return {**details, "duration_s": self.params.duration_s}


class Throttle(_NetworkEffect, Fault):
    """Limit the rank's egress rate with a token bucket (`tbf`): a degraded link makes one slow rank."""

    name = "network.throttle"
    summary = "limit a rank's egress to `rate` for duration_s (tc tbf): a degraded link, a straggler"
    where = "out_of_rank"
    Params = ThrottleParams
    disruptive = False  # meant to slow the group down, not to bring it down

    def inject(self, ctx: Any) -> dict[str, Any]:
        fabric, rank, p = _fabric(ctx, self.name), ctx.rank, self.params
        # The bucket must hold a few full-size (GSO) packets, and at least 1/50 s of traffic.
        burst = max(65536, int(rate_bits(p.rate) / 8 / 50))
        details = fabric.set_qdisc(rank, ["tbf", "rate", p.rate, "burst", str(burst),
                                          "latency", f"{p.latency_ms:g}ms"])
        ctx.schedule(p.duration_s, "throttle removed", lambda: fabric.clear_qdisc(rank))
        return {**details, "duration_s": p.duration_s, "rate": p.rate}


class Partition(_NetworkEffect, Fault):
    """Cut a set of ranks off from the others for `duration_s`; ranks on one side still reach each other."""

    name = "network.partition"
    summary = "cut the given ranks off from the rest for duration_s (per-peer blackhole routes)"
    where = "out_of_rank"
    Params = PartitionParams

    def inject(self, ctx: Any) -> dict[str, Any]:
        fabric = _fabric(ctx, self.name)
        side = self.params.ranks or [ctx.rank]
        details = fabric.partition(side, cut=True)
        ctx.schedule(self.params.duration_s, "partition healed", lambda: fabric.partition(side, cut=False))
        return {**details, "duration_s": self.params.duration_s}


class CoordinatorCutParams(_Params):
    duration_s: float = Field(8.0, gt=0, le=3600, description="how long the group cannot reach the coordinator")


class CoordinatorCut(Fault):
    """Cut a replica group off from the coordinator of its fault tolerance (torchft's lighthouse) for
    `duration_s` (recovery.mode external): the group's connections to the lighthouse pass through a
    relay of burnin's, which stops moving their bytes for the duration (a blackhole: nothing is refused
    or reset, packets just go nowhere, then flow again). The group still reaches its peers."""

    name = "network.coordinator_cut"
    summary = "recovery.mode external: cut the target rank's replica group off from the lighthouse for duration_s"
    where = "out_of_rank"
    Params = CoordinatorCutParams
    effects = ("network", "hang", "timeout")
    effect_scope = "group"
    changes_state = False

    def inject(self, ctx: Any) -> dict[str, Any]:
        cut = getattr(ctx, "cut_coordinator", None)
        if cut is None:
            raise HarnessError(f"{self.name} acts on the link between a replica group and its coordinator, which "
                               "only an external-recovery run has (recovery.mode: external)")
        return cut(self.params.duration_s)


# -- simulated variants: no namespaces, the collective level only --------------------------------------

def _collective_timeout() -> float:
    try:
        spec = json.loads(open(os.environ["BURNIN_SPEC"]).read())
        return float(spec["scenario"]["timeouts"]["collective_s"])
    except (KeyError, OSError, ValueError):
        return 30.0


class _Silence(_NetworkEffect, Fault):
    """The target rank stops talking for `duration_s`: its peers wait in the next all-reduce.

    Shorter than the collective timeout: a stall the group survives, as a flap is. Longer: the rank
    raises DistNetworkError when the peers' timeout would have fired, so the group fails with a
    network error at about the time the real fault makes it fail.
    """

    where = "in_rank"
    simulated = True
    raises = True  # past the collective timeout the silent rank raises, as its peers would

    def inject(self, ctx: Any) -> dict[str, Any]:
        d, timeout = self.params.duration_s, _collective_timeout()
        if d < timeout:
            time.sleep(d)
            return {"silent_s": d, "collective_timeout_s": timeout}
        time.sleep(max(0.0, timeout - 0.5))
        import torch.distributed as dist  # lazy: torch, in the rank only

        error = getattr(dist, "DistNetworkError", RuntimeError)
        raise error(f"simulated {self.name.removesuffix('.simulated')}: rank {ctx.rank} cut off for {d:g} s, "
                    f"past the {timeout:g} s collective timeout")


class SimulatedLinkDown(_Silence):
    name = "network.link_down.simulated"
    summary = "network.link_down without namespaces: the rank goes silent for duration_s"
    Params = _Params


class SimulatedBlackhole(_Silence):
    name = "network.blackhole.simulated"
    summary = "network.blackhole without namespaces: the rank goes silent for duration_s"
    Params = BlackholeParams


class SimulatedPartition(_Silence):
    name = "network.partition.simulated"
    summary = "network.partition without namespaces: the target rank alone goes silent for duration_s"
    Params = PartitionParams


class SimulatedThrottle(_NetworkEffect, Fault):
    """Each step while the throttle lasts, the rank sleeps as long as its share of the all-reduce would
    take at `rate` (a ring all-reduce sends 2(n-1)/n of the gradient bytes per rank)."""

    name = "network.throttle.simulated"
    summary = "network.throttle without namespaces: the rank sleeps its all-reduce's transfer time at `rate`"
    where = "in_rank"
    Params = ThrottleParams
    simulated = True
    disruptive = False

    def __init__(self, params: BaseModel | None = None):
        super().__init__(params)
        self._until: float | None = None

    def span(self) -> int:
        return 10_000_000  # bounded by time, not steps: see inject

    def inject(self, ctx: Any) -> dict[str, Any]:
        now = time.time()
        if self._until is None:
            self._until = now + self.params.duration_s
        if now >= self._until or ctx.model is None:
            return {}
        n = ctx.world_size
        payload = sum(p.numel() * p.element_size() for p in ctx.model.parameters())
        delay = 2 * (n - 1) / max(n, 1) * payload * 8 / rate_bits(self.params.rate)
        time.sleep(min(delay, self._until - now))
        return {"delay_s": delay, "rate": self.params.rate}


#: Each real network fault and its simulated stand-in.
SIMULATED: dict[str, str] = {
    LinkDown.name: SimulatedLinkDown.name,
    Blackhole.name: SimulatedBlackhole.name,
    Throttle.name: SimulatedThrottle.name,
    Partition.name: SimulatedPartition.name,
}


def simulate(scenario: Any) -> Any:
    """The scenario with every real network fault replaced by its simulated variant (same step, params, expect)."""
    faults = [f.model_copy(update={"fault": SIMULATED[f.fault]}) if f.fault in SIMULATED else f
              for f in scenario.faults]
    return scenario.model_copy(update={"faults": faults})


class NodeInterface:
    """Under torchrun: this node's network interface, named by the operator (`python -m burnin.rank
    --node-interface NAME`, the opt-in by name), acted on from inside the node's own namespace. A NIC fault
    on any rank of the node takes the whole node's link down, as a failed NIC or cable would."""

    def __init__(self, name: str):
        self.name = name

    def set_link(self, rank: int, up: bool) -> dict[str, Any]:
        run_tool(["ip", "link", "set", "dev", self.name, "up" if up else "down"])
        return {"interface": self.name, "link": "up" if up else "down", "scope": "node"}

    def set_qdisc(self, rank: int, args: list[str]) -> dict[str, Any]:
        run_tool(["tc", "qdisc", "replace", "dev", self.name, "root", *args])
        return {"interface": self.name, "qdisc": " ".join(args), "scope": "node"}

    def clear_qdisc(self, rank: int) -> dict[str, Any]:
        run_tool(["tc", "qdisc", "del", "dev", self.name, "root"], check=False)
        return {"interface": self.name, "qdisc": "default", "scope": "node"}


#: The faults this module adds to the built-in catalogue (`burnin.faults.registry` registers them).
FAULTS = (LinkDown, Blackhole, Throttle, Partition, SimulatedLinkDown, SimulatedBlackhole, SimulatedPartition,
          SimulatedThrottle, CoordinatorCut)
