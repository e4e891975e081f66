"""What a fault is: a name, a validated parameter model, where it acts, and `inject(ctx)`.

In-rank faults run inside a rank worker at a named point of the training step and may touch
torch state through the context. Out-of-rank faults run in the supervisor (which never imports
torch) while the target rank is held at the step point, so their effect lands at a known step.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["STEP_POINTS", "COLLECTIVE_POINTS", "POINTS", "Fault", "NoParams"]

#: The points of a training step at which faults fire and detectors look, in step order.
STEP_POINTS: tuple[str, ...] = (
    "before_forward",        # the batch is built, nothing computed yet
    "after_backward",        # local gradients, before the all-reduce
    "after_allreduce",       # gradients averaged across ranks
    "after_optimizer_step",  # parameters and optimizer state updated
    "between_steps",         # the step is done and logged; out-of-rank faults act here
)

#: Points inside a sharded model's collectives (FSDP2, HSDP, tensor parallel), fired at each call of the step: a fault
#: there acts on the rank on its way into the collective, while its peers are already in it (a kill or
#: a hang loses a rank in the middle), or on the tensors the collective sends or received.
COLLECTIVE_POINTS: tuple[str, ...] = (
    "all_gather",            # a unit's parameters gathered over the shard group (forward, and backward)
    "reduce_scatter",        # a unit's gradients reduced and scattered over the shard group (backward)
    "replica_all_reduce",    # HSDP: a unit's gradient shards all-reduced across the replicate group
    "tp_all_reduce",         # tensor parallel: a rowwise layer's partial outputs summed over the tp group (forward)
    "ft_all_reduce",         # recovery.mode external: torchft's all-reduce of a group's gradients across the groups
)

#: Every point a fault may name.
POINTS: tuple[str, ...] = STEP_POINTS + COLLECTIVE_POINTS


class NoParams(BaseModel):
    """Parameters of a fault that takes none."""

    model_config = ConfigDict(extra="forbid")


class Fault:
    """Base class of every fault. Subclass, set the class attributes, implement `inject`."""

    name: ClassVar[str]                       # "family.kind", e.g. "process.kill"
    summary: ClassVar[str]                    # one line for `burnin list`
    where: ClassVar[Literal["in_rank", "out_of_rank"]]
    points: ClassVar[tuple[str, ...]] = ("between_steps",)  # allowed points; the first is the default
    Params: ClassVar[type[BaseModel]] = NoParams
    #: True when the fault is a stand-in for the real thing on this machine; reports say `simulated`.
    simulated: ClassVar[bool] = False
    #: True when the fault is meant to bring the group down (reports and campaigns read it); which
    #: failures a fault explains is decided by `effects` and `effect_scope`, not by this flag.
    disruptive: ClassVar[bool] = True
    #: The failure causes (`burnin.harness.classify`) by which the fault's effect shows when it brings
    #: the group down: a kill shows as "killed", a SIGSTOP as "hang", a link down as "network".
    effects: ClassVar[tuple[str, ...]] = ()
    #: Where that evidence appears: on the target rank itself ("rank": a killed rank's own exit), on
    #: any rank of the group ("group": a link down makes the peers time out), or through a detector
    #: finding that pins the fault ("detector": a bit flip caught by the fingerprint).
    effect_scope: ClassVar[Literal["rank", "group", "detector"]] = "rank"
    #: True when raising from `inject` IS the fault (process.exception); any other exception from
    #: `inject` means the fault could not be applied, a harness error and never an outcome.
    raises: ClassVar[bool] = False
    #: True when one injected fault may bring the group down again and again (a latent bug that
    #: stays in the code): it can explain any number of failures, not just one.
    recurring: ClassVar[bool] = False
    #: False when the fault cannot change the training's bits unless it brings the group down (a delay):
    #: a burn-in replays no verification window for it then.
    changes_state: ClassVar[bool] = True

    def __init__(self, params: BaseModel | None = None):
        self.params = params if params is not None else self.Params()

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]

    def default_point(self) -> str:
        """The step point the fault acts at when the scenario names none (may depend on params)."""
        return self.points[0]

    def fire_point(self, point: str) -> str:
        """The point the rank fires the fault at, given the scenario's `point`: the same, except for a fault
        on what a collective received, which fires once the collective is done (`<point>.out`)."""
        return point

    def effect_window_s(self, timeouts: Any) -> float | None:
        """How long after injection the fault's effect can still first show (None: to the end of the
        attempt). A link that came back up long ago explains no timeout."""
        return None

    def span(self) -> int:
        """How many consecutive steps the fault acts on (most act once)."""
        return 1

    def fires_at(self, offset: int) -> bool:
        """Whether the fault acts `offset` steps into its span (a recurring defect acts every N-th step of it)."""
        return True

    def inject(self, ctx: Any) -> dict[str, Any]:
        """Apply the fault. Returns details that go into the `fault_injected` event."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.params!r}>"
