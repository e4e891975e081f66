"""The scenario: a declarative, validated description of one burnin run.

A scenario names the workload (what trains), how checkpoints are kept, how failures are detected
and recovered, which faults fire where, and what outcome each fault is expected to reach. It is
loaded from YAML into these models before anything starts; nothing downstream sees a dict.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from burnin.core.model_shapes import tp_problem
from burnin.faults import registry
from burnin.faults.base import COLLECTIVE_POINTS, POINTS
from burnin.scenarios.checks import (MAX_VARY_COMBINATIONS, NOT_A_BOOLEAN, boolean_for_number, check_fault, invalid,
                                     params_model, rank_problem, short, step_problem)

__all__ = [
    "OUTCOMES",
    "TRIAL_OUTCOMES",
    "MODEL_PRESETS",
    "Workload",
    "Checkpointing",
    "Recovery",
    "Timeouts",
    "FaultSpec",
    "Expect",
    "Debug",
    "Network",
    "Detectors",
    "Campaign",
    "Scenario",
    "scenario_json_schema",
    "HEARTBEAT_PERIOD_S",
    "MIN_HEARTBEAT_S",
    "MAX_VARY_COMBINATIONS",
]

#: Every injected fault ends in exactly one of these (see docs/architecture.md).
#: Every outcome a fault can end in; `unjudged` (injected after the run had diverged: no outcome of its own)
#: is the verdict's, never an expectation.
OUTCOMES = ("recovered", "masked", "detected", "sdc", "failed", "degraded", "unjudged")
#: A campaign's trial has one fault: nothing diverged before it, so it is never `unjudged`.
TRIAL_OUTCOMES = OUTCOMES[:-1]
Outcome = Literal["recovered", "masked", "detected", "sdc", "failed", "degraded"]
#: What a silent corruption did (burnin.reports.effects): an expectation a data-fault campaign can check.
Effect = Literal["benign", "transient", "degraded", "diverged"]
MODEL_PRESETS = ("tiny", "small", "gpt2-124m")

MAX_RANKS = 64
MAX_STEPS = 10_000_000

#: Each rank touches its heartbeat file this often (the supervisor's watch reads it).
HEARTBEAT_PERIOD_S = 0.25
#: The shortest `timeouts.heartbeat_s`: four periods, so that a rank busy for a moment (the GIL held by
#: a long kernel, a slow disk) is not called hung for one late beat.
MIN_HEARTBEAT_S = 4 * HEARTBEAT_PERIOD_S


class _Model(BaseModel):
    # allow_inf_nan=False: `z: .inf` would pass `gt=0`, and scenario.json (strict JSON) would keep it as null
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, data: Any) -> Any:
        # pydantic takes True for the integer 1 (and 1.0) in its lax mode: `keep: true` would keep one
        # checkpoint. Each scenario model checks its own fields (the nested ones check theirs).
        if isinstance(data, dict):
            where = boolean_for_number(cls, data, skip=_Model)
            if where is not None:
                raise invalid(where[0], NOT_A_BOOLEAN, where[1], title=cls.__name__)
        return data


class Tolerance(_Model):
    """How close a run of a non-deterministic loop must come to its golden run (`workload.compare: tolerance`)."""

    loss_rtol: float = Field(0.05, gt=0, le=10, description="each step's loss within this relative difference "
                                                            "of the golden run's loss at that step")
    state_rtol: float = Field(0.01, gt=0, le=10, description="each final tensor's L2 norm within this relative "
                                                             "difference of the golden run's")
    window: int = Field(1, ge=1, le=100_000, description="compare the loss averaged over windows of this many "
                                                         "steps (over every rank), not step by step: a run whose "
                                                         "batch changed (a replica group out) follows the golden "
                                                         "curve, not its step-to-step noise")


_ENTRY = r"^(?:[^\x00]*\.py|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*)$"


class Parallel(_Model):
    """How burnin's own model is split over the ranks, named as torchtitan names it. The ranks form a
    (dp_replicate, dp_shard, tp) device mesh, tp innermost: each block's attention and MLP are split over
    `tp` ranks (tensor parallel: whole heads and hidden units each, an all-reduce summing the parts), then
    parameters, gradients and optimizer state are sharded over `dp_shard` ranks with FSDP2 (`fully_shard`
    per block, then the root), and each shard is replicated `dp_replicate` times (HSDP: reduce-scatter
    within a replica, all-reduce across replicas). The ranks of one tensor-parallel group train on the
    same batch."""

    dp_replicate: int = Field(1, ge=1, le=MAX_RANKS, description="replicas of every shard (HSDP across them)")
    dp_shard: int = Field(-1, ge=-1, le=MAX_RANKS,
                          description="ranks each parameter is sharded over (FSDP2); -1: the ranks left by "
                                      "dp_replicate and tp")
    tp: int = Field(1, ge=1, le=MAX_RANKS, description="tensor-parallel degree (1: none): ranks that split each "
                                                       "block's attention heads and MLP")

    @field_validator("dp_shard")
    @classmethod
    def _not_zero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("dp_shard is a number of ranks (1 or more), or -1 for the ranks left over")
        return v

    def mesh(self, ranks: int) -> tuple[int, int]:
        """(dp_replicate, dp_shard) for `ranks` ranks, -1 resolved (check() first)."""
        shard = self.dp_shard if self.dp_shard != -1 else ranks // (self.dp_replicate * self.tp)
        return self.dp_replicate, shard

    def coords(self, rank: int, ranks: int) -> tuple[int, int, int]:
        """(replica, shard, tp) coordinates of `rank` on the mesh (tp innermost, as torchtitan lays it)."""
        _, shard = self.mesh(ranks)
        dp, t = divmod(rank, self.tp)
        return dp // shard, dp % shard, t

    def check(self, ranks: int) -> tuple[str, str] | None:
        """(field, why) when this split does not fit `ranks` ranks (one line), or None."""
        if self.dp_shard == -1:
            if ranks % (self.dp_replicate * self.tp):
                return "dp_replicate", (f"dp_replicate={self.dp_replicate} x tp={self.tp} does not divide "
                                        f"workload.ranks={ranks}; choose factors of {ranks}")
            return None
        if self.dp_replicate * self.dp_shard * self.tp != ranks:
            return "dp_shard", (f"dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x tp={self.tp} = "
                                f"{self.dp_replicate * self.dp_shard * self.tp} ranks, but workload.ranks={ranks}; "
                                f"make the product {ranks} (dp_shard: -1 takes the ranks left over)")
        return None


class Workload(_Model):
    """What trains: everything here changes the bits, so all of it goes into the golden hash."""

    entry: str | None = Field(
        None, max_length=4096,
        description="the training loop to run instead of burnin's own: a script (`train.py`, relative to the "
                    "scenario file) or `package.module:function`; it attaches with burnin.rank.attach. The model, "
                    "batch, optimizer and device fields below are then the loop's business and unused")
    args: list[str] = Field(default_factory=list, max_length=1000, description="the loop's command-line arguments")
    compare: Literal["exact", "tolerance"] = Field(
        "exact", description="exact: the final state must equal the golden run's bit for bit; tolerance: for a "
                             "loop that is not deterministic, the loss curve and final state within `tolerance` "
                             "(every report then says `not exact`)")
    tolerance: Tolerance = Field(default_factory=Tolerance)

    @field_validator("entry")
    @classmethod
    def _entry_form(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(_ENTRY, v):
            raise ValueError("give a script path ending in .py (`train.py`) or `package.module:function`")
        return v

    model: Literal["tiny", "small", "gpt2-124m"] = Field("tiny", description="model preset")
    ranks: int = Field(2, ge=1, le=MAX_RANKS, description="number of data-parallel ranks")
    steps: int = Field(40, ge=1, le=MAX_STEPS, description="training steps")
    seed: int = Field(0, ge=0, lt=2**63, description="seed of the model init, data and dropout")
    batch_size: int = Field(4, ge=1, le=4096, description="sequences per rank per step")
    seq_len: int = Field(32, ge=2, le=8192, description="tokens per sequence")
    eval_batches: int = Field(4, ge=0, le=256, description="held-out batches (of batch_size sequences) the built-in "
                                                          "workload evaluates without gradients at the end of a run "
                                                          "and of a campaign's trial; 0: none")
    lr: float = Field(3e-3, gt=0, le=10, description="AdamW learning rate")
    weight_decay: float = Field(0.1, ge=0, le=10)
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout makes the torch RNG part of the state")
    threads: int = Field(1, ge=1, le=256, description="torch threads per rank (changes the bits)")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where ranks compute")
    kernels: Literal["torch", "triton"] = Field(
        "triton", description="the loss's row reduction: the Triton kernel (compiled on CUDA, interpreter on "
                              "CPU), or torch")
    parallel: Parallel | None = Field(
        None, description="shard the model (FSDP2, HSDP) over a device mesh of the ranks; none: DDP, every rank "
                          "holds all of it")


class Checkpointing(_Model):
    every: int = Field(5, ge=1, description="save a checkpoint every N steps")
    keep: int = Field(3, ge=1, le=1000, description="how many of the newest checkpoints to keep")
    memory_every: int = Field(
        1, ge=0, le=1_000_000,
        description="snapshot the state in shared memory every N steps (0: off), so a restart after a killed, hung "
                    "or raising rank resumes from there instead of the newest checkpoint; checkpoints on disk "
                    "stay for a lost machine")
    async_save: bool = Field(
        False, description="sharded workloads (DCP): write checkpoints in the background, as torchtitan's async "
                           "mode does; training goes on while the shards are written, and the checkpoint commits "
                           "once every rank's write is done")


#: recovery.mode external: what an observer can inject into a loop that recovers itself, where, and on what
EXTERNAL_FAULTS = ("process.kill", "process.hang", "process.exception", "process.straggler", "corruption.bitflip",
                   "corruption.nan", "network.coordinator_cut")
EXTERNAL_ONLY = ("network.coordinator_cut",)
EXTERNAL_POINTS = ("before_forward", "after_backward", "ft_all_reduce", "after_allreduce", "after_optimizer_step",
                   "between_steps", "all_gather", "reduce_scatter")  # (the last two: FSDP2 inside a replica group)
EXTERNAL_TARGETS = ("param", "optimizer_state", "allreduce_payload", "grad_reduced", "activation", "batch",
                    "all_gather_output", "reduce_scatter_input", "reduce_scatter_output")


def _external_fault_problem(fault: str, params: dict[str, Any], point: str | None) -> tuple[tuple[str, ...], str] | None:
    """Why a fault cannot act on a loop that recovers itself (recovery.mode external), or None: the fields to
    blame under the fault's own entry, and a message."""
    if fault not in EXTERNAL_FAULTS:
        return ("fault",), (f"{fault} cannot act on a loop burnin does not run the recovery of; recovery.mode "
                            f"external takes {', '.join(EXTERNAL_FAULTS)}")
    target = params.get("target")
    if target is not None and target not in EXTERNAL_TARGETS:
        return ("params", "target"), (f"{target} is not at hand in a torchft loop; use one of "
                                      f"{', '.join(EXTERNAL_TARGETS)} (allreduce_payload: the buffer the group sends "
                                      "into the cross-group all-reduce)")
    if point is not None and point not in EXTERNAL_POINTS:
        return ("point",), f"{point} is not a point of a torchft loop; use one of {', '.join(EXTERNAL_POINTS)}"
    if point == "ft_all_reduce" and not fault.startswith("process."):
        return ("point",), ("ft_all_reduce takes the process faults; a corruption of what the group sends is "
                            "target allreduce_payload (at after_backward)")
    return None


class Lighthouse(_Model):
    """torchft's lighthouse, as burnin starts it (`torchft_lighthouse` flags of the same names)."""

    min_replicas: int = Field(1, ge=1, le=1024, description="replica groups a quorum needs")
    join_timeout_ms: int = Field(5000, ge=1, le=3_600_000, description="how long a quorum waits for stragglers")
    quorum_tick_ms: int = Field(100, ge=1, le=60_000, description="how often it checks for a quorum")
    heartbeat_timeout_ms: int = Field(5000, ge=1, le=3_600_000,
                                      description="a replica group silent this long is out of the quorum")


class External(_Model):
    """recovery.mode external: the system under test recovers itself. burnin starts it (the lighthouse, one
    torchrun per replica group), injects, watches and judges; it restarts and restores nothing."""

    system: Literal["torchft"] = Field("torchft", description="the fault tolerance under test")
    replica_groups: int = Field(2, ge=1, le=64, description="replica groups (each one torchrun of "
                                                            "workload.ranks / replica_groups ranks)")
    max_restarts: int = Field(3, ge=0, le=1000, description="torchrun's --max-restarts, per replica group")
    group_restarts: int = Field(
        3, ge=0, le=1000, description="the scheduler's part (torchx, Kubernetes): a replica group whose torchrun "
                                      "exits with a failure (it gave up, or its watchdog ended it) is started "
                                      "again, this many times at most")
    watchdog: bool = Field(True, description="turn on torchelastic's file timer (TORCHELASTIC_ENABLE_FILE_TIMER), "
                                             "so a loop that runs its steps under `expires()` has a hung rank "
                                             "killed by its agent (which then ends itself: the group's restart is "
                                             "group_restarts')")
    lighthouse: Lighthouse = Field(default_factory=Lighthouse)


class Recovery(_Model):
    mode: Literal["restart", "rollback", "none", "external"] = Field(
        "restart", description="restart the group from the newest valid checkpoint; roll back in process to the "
                               "last verified step (detected corruption); stop; or external: the system under "
                               "test recovers (torchft), burnin only injects, watches and judges")
    external: External | None = Field(None, description="recovery.mode external: the system under test and how "
                                                         "burnin starts it (default: torchft, 2 replica groups)")

    @model_validator(mode="before")
    @classmethod
    def _external_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") == "external" and data.get("external") is None:
            return {**data, "external": {}}
        return data
    max_restarts: int = Field(3, ge=0, le=1000)
    max_rollbacks: int = Field(10, ge=0, le=100_000, description="rollback mode: in-process rollbacks before giving up")
    spares: bool | None = Field(
        None, description="warm spare ranks: one pre-started, pre-warmed process per rank takes over at a restart "
                          "(default: on when the run can restart and the machine has the memory)")


class SpikeDetector(_Model):
    window: int = Field(20, ge=4, le=100_000, description="running window of past values")
    z: float = Field(8.0, gt=0, description="robust z-score (in MADs) above which a value is a spike")
    warmup: int = Field(8, ge=2, le=100_000, description="values needed before judging")


class FingerprintDetector(_Model):
    every: int = Field(1, ge=1, le=1_000_000, description="compare replica fingerprints every K steps")


class ChecksumDetector(_Model):
    every: int = Field(1, ge=1, le=1_000_000,
                       description="seal this rank's own state after every K-th step, verify it before the next")


class RecomputeDetector(_Model):
    every: int = Field(0, ge=0, le=1_000_000, description="re-run every K-th step and compare bits (0: only to "
                                                         "classify a suspicion as transient or persistent)")


class Detectors(_Model):
    """Which detectors run (a key present enables it; `{}` takes the defaults)."""

    nonfinite: dict[str, Any] | None = Field(None, description="NaN/Inf in loss or gradient norm")
    loss_spike: SpikeDetector | None = None
    grad_norm_spike: SpikeDetector | None = None
    update_rms_spike: SpikeDetector | None = Field(
        None, description="the RMS of each step's parameter update far from its running median (costs a copy of "
                          "the parameters)")
    fingerprint: FingerprintDetector | None = None
    checksum: ChecksumDetector | None = Field(
        None, description="a digest of each rank's own parameters and optimizer state, taken at the end of a "
                          "step and checked before the next: what changes in memory between two steps (a "
                          "shard with no replica too)")
    gather_hash: dict[str, Any] | None = Field(
        None, description="sharded models: every rank receives the same parameters from an all-gather; each "
                          "all-gathered buffer's integer sum, compared across the ranks at the end of the step")
    recompute: RecomputeDetector | None = None

    @field_validator("nonfinite", "gather_hash")
    @classmethod
    def _no_params(cls, v: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if v:
            raise ValueError(f"{info.field_name} takes no parameters; write `{info.field_name}: {{}}`")
        return v


class Timeouts(_Model):
    """Bounds on every wait: nothing in a run may hang without one of these ending it."""

    heartbeat_s: float = Field(5.0, le=3600, json_schema_extra={"minimum": MIN_HEARTBEAT_S},
                               description=f"a rank whose heartbeat is older is hung (ranks beat every "
                                           f"{HEARTBEAT_PERIOD_S} s; at least {MIN_HEARTBEAT_S} s)")
    collective_s: float = Field(30.0, gt=0, le=3600, description="process-group timeout for collectives")
    connect_s: float = Field(120.0, gt=0, le=3600, description="start-up and rendezvous must finish within this")
    step_s: float = Field(60.0, gt=0, le=86400, description="a step that takes longer is a stall")
    run_s: float = Field(3600.0, gt=0, le=7 * 86400, description="the whole run, restarts included")

    @field_validator("heartbeat_s")
    @classmethod
    def _beats_fit(cls, v: float) -> float:
        if not v >= MIN_HEARTBEAT_S:  # `not >=`: NaN too
            raise ValueError(f"must be at least {MIN_HEARTBEAT_S:g} s (got {short(v)}): ranks beat every "
                             f"{HEARTBEAT_PERIOD_S:g} s, and a timeout under 4 beats calls a rank hung for "
                             f"one late beat")
        return v


class Network(_Model):
    """Per-rank network namespaces, for faults on real links."""

    isolate: bool | None = Field(None, description="one network namespace per rank; default: when a network fault is asked for")
    fallback: Literal["error", "simulate"] = Field(
        "error", description="without the privilege for namespaces: stop with an error, or simulate at the collective level")


class VaryRange(_Model):
    min: int
    max: int

    @model_validator(mode="after")
    def _ordered(self) -> "VaryRange":
        if self.min > self.max:
            raise ValueError(f"min {short(self.min)} is greater than max {short(self.max)}")
        return self


def _known_fault(name: str) -> str:
    try:
        registry.get(name)
    except registry.UnknownFault as exc:
        # pydantic turns only ValueError into a validation error; anything else escapes validation
        raise ValueError(str(exc)) from None
    return name


def _valid_params(params: dict[str, Any], fault: str | None) -> dict[str, Any]:
    if fault is not None:
        # A ValidationError raised in a validator keeps its locations: faults.N.params.<field>
        params_model(registry.get(fault).Params, params)
    return params


def _known_point(point: str, fault: str | None) -> None:
    """A step point that exists, and at which `fault` (when known) can act."""
    if point not in POINTS:
        raise ValueError(f"unknown step point {short(point)}; expected one of: {', '.join(POINTS)}")
    if fault is not None:
        points = registry.get(fault).points
        if point not in points:
            steps = [p for p in points if p not in COLLECTIVE_POINTS]
            inside = [p for p in points if p in COLLECTIVE_POINTS]
            also = f" (or inside a sharded model's {', '.join(inside)})" if inside else ""
            raise ValueError(f"{fault} acts at {', '.join(steps)}{also}, not at {short(point)}")


class FaultSpec(_Model):
    """One fault: which, where (rank, step, point), its parameters, and the expected outcome."""

    fault: str = Field(description="registered fault name, e.g. process.kill")
    rank: int = Field(0, ge=0, description="target rank")
    step: int = Field(ge=0, description="step at which it fires")
    point: str | None = Field(None, description="step point; defaults to the fault's own")
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True,
                                   description="fault-specific parameters")
    expect: Outcome | list[Outcome] = Field(
        default_factory=lambda: ["recovered", "masked"], description="acceptable outcome(s)")
    vary: dict[str, list[Any] | VaryRange] = Field(
        default_factory=dict, description="campaigns: per trial, draw `rank`, `step` or a parameter from a list "
                                          "of choices or an inclusive {min, max} range")
    expect_effect: Effect | list[Effect] | None = Field(
        None, description="data-fault campaigns: the effect class(es) each trial of this fault must have when "
                          "nothing acts on it (benign, transient, degraded, diverged, against the campaign's noise "
                          "band); a trial with another fails the campaign")
    at_s: float | None = Field(None, ge=0, le=7 * 86400,
                               description="burn-in schedules: fire this many seconds after the burn-in began "
                                           "(instead of at `step`): an out-of-rank fault at that instant, in the "
                                           "middle of a step if that is where it lands; an in-rank fault at the "
                                           "first `point` its rank reaches after it")

    @field_validator("fault")
    @classmethod
    def _known_fault(cls, name: str) -> str:
        return _known_fault(name)

    # Fields validate in declaration order, so `fault` (when valid) is in info.data here and below.
    @field_validator("point")
    @classmethod
    def _known_point(cls, point: str | None, info: ValidationInfo) -> str | None:
        if point is not None:
            _known_point(point, info.data.get("fault"))
        return point

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _valid_params(params, info.data.get("fault"))

    @property
    def at(self) -> str:
        return self.point or self.build().default_point()

    @property
    def expected(self) -> list[str]:
        return [self.expect] if isinstance(self.expect, str) else list(self.expect)

    def build(self):
        """The fault instance with validated parameters."""
        cls = registry.get(self.fault)
        return cls(cls.Params.model_validate(self.params))


class Campaign(_Model):
    """Many short trials in one group of ranks: each restores the state at `warmup`, runs `window`
    steps with one fault drawn from the scenario's faults, and is judged against a fault-free window."""

    trials: int = Field(100, ge=1, le=1_000_000)
    seed: int = Field(0, ge=0, description="the trials' parameters are drawn from it: same seed, same campaign")
    warmup: int = Field(8, ge=0, description="steps trained before the window (detectors learn what is normal)")
    window: int = Field(8, ge=1, le=10_000, description="steps per trial")
    controls: int = Field(0, ge=0, le=10_000, description="control trials for the noise band (at most half as many "
                                                          "as the trials): the first bit-flip "
                                                          "trials again with the lowest mantissa bit (a flip that "
                                                          "cannot matter); their spread is what a silent corruption's "
                                                          "effect is measured against")
    draw: Literal["random", "each"] = Field("random", description="which fault a trial takes: drawn at random, or "
                                                                 "each in turn (trial k takes fault k mod their "
                                                                 "number: every fault gets its trials)")
    spread_windows: int = Field(0, ge=0, le=100, description="fault-free windows over other batches from the same "
                                                             "state: the seed-to-seed spread of the final and the "
                                                             "held-out loss, the noise band's other half")
    observe: bool = Field(True, description="run each trial a detector acted on once more with the detectors "
                                            "watching, not acting: what its fault does unchecked (its effect class) "
                                            "and which detectors flag it; the per-detector harmful-caught and "
                                            "benign-flagged shares (one more window per caught trial)")


class BurnInFault(_Model):
    """One kind of fault in a burn-in: its arrivals are a Poisson process in wall-clock time (exponential
    gaps from the burn-in's seed, a stream of its own), each at a drawn rank and step point."""

    fault: str = Field(description="registered fault name, e.g. process.kill")
    per_hour: float | None = Field(None, gt=0, le=360_000, description="mean arrivals per hour")
    mtbf_s: float | None = Field(None, ge=0.01, le=7 * 86400, description="or: mean seconds between arrivals")
    ranks: list[int] | None = Field(None, min_length=1, max_length=4096, description="ranks it may hit (default: all)")
    points: list[str] | None = Field(None, min_length=1, description="step points it may fire at, drawn per arrival "
                                                                     "(default: the fault's own)")
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True, description="fault-specific parameters")
    expect: Outcome | list[Outcome] = Field(default_factory=lambda: ["recovered", "masked"],
                                            description="acceptable outcome(s) of each arrival")

    @field_validator("fault")
    @classmethod
    def _known_fault(cls, name: str) -> str:
        return _known_fault(name)

    @field_validator("points")
    @classmethod
    def _known_points(cls, points: list[str] | None, info: ValidationInfo) -> list[str] | None:
        for p in points or []:
            _known_point(p, info.data.get("fault"))
        return points

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _valid_params(params, info.data.get("fault"))

    @model_validator(mode="after")
    def _one_rate(self) -> "BurnInFault":
        if (self.per_hour is None) == (self.mtbf_s is None):
            raise ValueError("give its rate as per_hour or as mtbf_s (one of the two)")
        return self

    @property
    def rate_per_s(self) -> float:
        return self.per_hour / 3600 if self.per_hour is not None else 1 / self.mtbf_s


class BurnInHealth(_Model):
    """The thresholds of the per-rank verdict (each reason in the report names the one that decided it)."""

    straggler_ratio: float = Field(1.10, gt=1, le=100, description="degraded: compute per step (less any wait for a "
                                                                   "CPU) this many times the other ranks' median in "
                                                                   "most periods, significantly (gpu-burn's 10 %)")
    slowdown_ratio: float = Field(1.5, gt=1, le=100, description="degraded: a rank's compute per step (less any wait "
                                                                 "for a CPU) in the last third of the burn-in this "
                                                                 "many times its own best period's, in most of them")
    significance: float = Field(0.01, gt=0, lt=0.5, description="a slowness counts only when a one-sided sign test "
                                                                "over the periods says so at this level (a false "
                                                                "alarm drains a good node)")
    period_s: float = Field(10.0, ge=1, le=3600, description="length of a roll-up period: step times are compared "
                                                            "period by period")
    lemon_failures: int = Field(2, ge=1, le=1000, description="faulty: this many failures on one rank that no "
                                                              "injected fault explains (one already makes it degraded)")


class BurnIn(_Model):
    """A burn-in (`burnin burn-in`): the workload trains for `duration_s` while faults arrive at random
    instants, and every rank gets a health verdict."""

    duration_s: float = Field(600, ge=5, le=7 * 86400, description="wall-clock length (`--duration`, `--level`)")
    seed: int = Field(0, ge=0, description="the schedule is drawn from it: same seed, same schedule")
    quiet_start_s: float = Field(10, ge=0, le=86400, description="no faults in the first seconds (a baseline)")
    quiet_end_s: float = Field(5, ge=0, le=86400, description="no faults in the last seconds (the final heal)")
    max_in_flight: int = Field(1, ge=1, le=1000, description="faults at once: an out-of-rank arrival waits while "
                                                              "this many are not yet past (recovered, or two steps "
                                                              "behind without bringing anything down)")
    faults: list[BurnInFault] = Field(default_factory=list, max_length=100)
    health: BurnInHealth = Field(default_factory=BurnInHealth)

    @model_validator(mode="after")
    def _time_for_faults(self) -> "BurnIn":
        if self.quiet_start_s + self.quiet_end_s >= self.duration_s:
            raise ValueError(f"quiet_start_s ({self.quiet_start_s:g}) and quiet_end_s ({self.quiet_end_s:g}) leave no "
                             f"time for faults in duration_s={self.duration_s:g}; shorten them or run longer")
        expected = sum(f.rate_per_s for f in self.faults) * (self.duration_s - self.quiet_start_s - self.quiet_end_s)
        if expected > 25_000:
            raise ValueError(f"the rates draw about {expected:.0f} faults in duration_s={self.duration_s:g}, more than "
                             "a schedule holds (25000 expected); lower the rates or the duration")
        return self


class Expect(_Model):
    """Run-level expectations, each a JUnit testcase."""

    exact: bool = Field(True, description="the final state must equal the golden run's bit for bit")
    max_restarts: int | None = Field(None, ge=0, description="at most this many restarts")
    finish: bool = Field(True, description="the run must reach its last step")


class Debug(_Model):
    """Knobs that break burnin on purpose, so tests can show the verdict says no."""

    skip_restore: list[Literal["torch_rng", "numpy_rng", "python_rng", "optimizer", "model"]] = Field(
        default_factory=list, description="state NOT restored on resume (breaks exact recovery)")


class Scenario(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    workload: Workload = Field(default_factory=Workload)
    checkpoint: Checkpointing = Field(default_factory=Checkpointing)
    recovery: Recovery = Field(default_factory=Recovery)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    network: Network = Field(default_factory=Network)
    detectors: Detectors = Field(default_factory=Detectors)
    campaign: Campaign | None = Field(None, description="run as a campaign of trials (`burnin campaign`)")
    burn_in: BurnIn | None = Field(None, description="how `burnin burn-in` runs this scenario")
    faults: list[FaultSpec] = Field(default_factory=list, max_length=10_000)
    expect: Expect = Field(default_factory=Expect)
    debug: Debug = Field(default_factory=Debug)

    @model_validator(mode="after")
    def _external_fits(self) -> "Scenario":
        """recovery.mode external: a loop of the user's, launched as replica groups, with the faults an
        observer can inject into it (EXTERNAL_FAULTS); the coordinator cut exists only there."""
        rec = self.recovery
        if rec.mode != "external":
            if rec.external is not None:
                raise invalid(("recovery", "external"), "describes the system that recovers under recovery.mode: "
                                                        "external; set the mode, or drop external")
            kinds = [(("faults", i), f.fault, [f.point]) for i, f in enumerate(self.faults)]
            kinds += [(("burn_in", "faults", i), bf.fault, bf.points or [])
                      for i, bf in enumerate(self.burn_in.faults if self.burn_in is not None else [])]
            for where, fault, points in kinds:
                if fault in EXTERNAL_ONLY:
                    raise invalid((*where, "fault"), f"{fault} cuts a replica group off from its coordinator, which "
                                                     "only recovery.mode: external has")
                if "ft_all_reduce" in points:
                    raise invalid((*where, "point" if where[0] == "faults" else "points"),
                                  "ft_all_reduce is torchft's all-reduce across replica groups, which only "
                                  "recovery.mode: external has")
            return self
        ext = rec.external
        if self.workload.entry is None:
            raise invalid(("workload", "entry"), "recovery.mode external runs a loop of yours that recovers itself "
                                                 "(torchft: see examples/torchft/train.py); name it in workload.entry")
        if self.workload.ranks % ext.replica_groups:
            raise invalid(("recovery", "external", "replica_groups"),
                          f"{ext.replica_groups} replica groups do not divide workload.ranks={self.workload.ranks}; "
                          f"give each group the same number of ranks")
        if ext.lighthouse.min_replicas > ext.replica_groups:
            raise invalid(("recovery", "external", "lighthouse", "min_replicas"),
                          f"{ext.lighthouse.min_replicas} is more than the {ext.replica_groups} replica groups: no "
                          "quorum could form")
        for i, f in enumerate(self.faults):
            if (problem := _external_fault_problem(f.fault, f.params, f.point)) is not None:
                raise invalid(("faults", i, *problem[0]), problem[1])
        for i, bf in enumerate(self.burn_in.faults if self.burn_in is not None else []):
            for point in bf.points or [None]:
                if (problem := _external_fault_problem(bf.fault, bf.params, point)) is not None:
                    field = ("points",) if problem[0] == ("point",) else problem[0]
                    raise invalid(("burn_in", "faults", i, *field), problem[1])
        return self

    @model_validator(mode="after")
    def _faults_fit_workload(self) -> "Scenario":
        par = self.workload.parallel
        if par is not None and self.workload.entry is not None:
            raise invalid(("workload", "parallel"), "a loop named by workload.entry shards its own model; drop "
                                                    "parallel (burnin.rank.attach takes the FSDP2 module as it is)")
        if par is not None and (problem := par.check(self.workload.ranks)) is not None:
            raise invalid(("workload", "parallel", problem[0]), problem[1])
        if par is not None and (why := tp_problem(self.workload.model, par.tp)) is not None:
            raise invalid(("workload", "parallel", "tp"), why)
        if self.checkpoint.async_save and par is None and self.workload.entry is None:
            raise invalid(("checkpoint", "async_save"),
                          "asynchronous saves are DCP's, for sharded models; set workload.parallel (FSDP2 or "
                          "HSDP) or drop async_save")
        if par is not None and self.detectors.fingerprint is not None and par.dp_replicate == 1 and par.tp == 1:
            raise invalid(("detectors", "fingerprint"),
                          "the fingerprint compares replicas of a shard, and with workload.parallel.dp_replicate=1 "
                          "no shard has one; set dp_replicate to 2 or more (HSDP), or use checksum (each rank's "
                          "own state between steps), recompute, nonfinite or the spike detectors")
        if self.detectors.gather_hash is not None and self.workload.entry is None and (
                par is None or par.mesh(self.workload.ranks)[1] <= 1):
            raise invalid(("detectors", "gather_hash"),
                          "gather_hash compares what the ranks receive from a sharded model's all-gathers, and this "
                          "workload has none; shard it (workload.parallel: {dp_shard: N}), or use fingerprint, "
                          "checksum or recompute")
        if self.campaign is not None:
            c = self.campaign
            if c.warmup + c.window > self.workload.steps:
                raise ValueError(f"campaign.window: warmup {c.warmup} + window {c.window} is more than "
                                 f"workload.steps={self.workload.steps}; raise workload.steps")
        if self.workload.args and self.workload.entry is None:
            raise ValueError("workload.args: arguments are for a loop named by workload.entry; name the entry, "
                             "or drop args")
        if self.workload.entry is not None and self.campaign is not None and not any(
                f.fault.startswith(("process.", "storage.")) for f in self.faults):
            raise ValueError("campaign: a data-fault campaign steps burnin's own workload trial by trial; with "
                             "workload.entry, use `burnin run` (or a campaign of process and storage faults)")
        for i, f in enumerate(self.faults):
            if (f.fault.startswith("memory.") or f.fault == "corruption.kernel_tile") and self.workload.entry is not None:
                raise ValueError(f"faults.{i}.fault: {f.fault} acts on burnin's own Triton loss kernel, which "
                                 f"a loop named by workload.entry does not run; drop the fault")
            if (f.fault.startswith("memory.") or f.fault == "corruption.kernel_tile") and self.workload.kernels != "triton":
                raise ValueError(f"faults.{i}.fault: {f.fault} acts on the Triton loss kernel; "
                                 f"set workload.kernels: triton (it is {self.workload.kernels!r})")
            if f.expect_effect is not None and (self.campaign is None or f.build().where != "in_rank"):
                raise ValueError(f"faults.{i}.expect_effect: effect classes are measured by a data-fault campaign "
                                 "(against its noise band), and this is not one; add a `campaign:` section or drop "
                                 "expect_effect")
            if f.rank >= self.workload.ranks:
                raise ValueError(f"faults.{i}.rank: {rank_problem(f.rank, self.workload.ranks)}")
            if f.step >= self.workload.steps:
                raise ValueError(f"faults.{i}.step: {step_problem(f.step, self.workload.steps)}")
            check_fault(self, i, f)
        if self.burn_in is not None:
            for i, bf in enumerate(self.burn_in.faults):
                for r in bf.ranks or []:
                    if not 0 <= r < self.workload.ranks:
                        raise ValueError(f"burn_in.faults.{i}.ranks: {rank_problem(r, self.workload.ranks)}")
        if self.campaign is not None and not self.faults:
            where = "faults" if "faults" in self.model_fields_set else "campaign"
            raise ValueError(f"{where}: a campaign needs at least one fault to draw trials from")
        return self

    def golden_key(self, extra: dict[str, Any] | None = None) -> str:
        """Hash of everything that changes the bits of a fault-free run (not the faults)."""
        # Detectors do not change the bits, but a golden run also counts their false alarms.
        payload = {"workload": self.workload.model_dump(mode="json"),
                   "detectors": self.detectors.model_dump(mode="json", exclude_none=True), **(extra or {})}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def scenario_json_schema() -> dict[str, Any]:
    """JSON Schema for scenario files, with each registered fault's parameters spelled out."""
    schema = Scenario.model_json_schema()
    variants = []
    for cls in registry.all_faults():
        variants.append({
            "properties": {
                "fault": {"const": cls.name, "description": cls.summary},
                "point": {"enum": list(cls.points)},
                "params": cls.Params.model_json_schema(),
            },
        })
    fault_spec = schema["$defs"]["FaultSpec"]
    fault_spec["properties"]["fault"]["enum"] = registry.names()
    fault_spec["oneOf"] = variants
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "burnin scenario"
    return schema
