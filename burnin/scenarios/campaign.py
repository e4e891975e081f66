"""A campaign's trials, drawn from its scenario: each trial picks one fault template and draws what its
`vary:` names, deterministically for a seed. A campaign draws in-rank data faults (bit flips, NaNs), or
process faults (kills, hangs, damaged checkpoints: a recovery campaign, each trial a supervised run),
never both. `burnin validate` draws the trials as `burnin campaign` will, so a bad one is refused first.
"""

from __future__ import annotations

import random
from typing import Any

from burnin.errors import ScenarioError
from burnin.scenarios.checks import RECOVERY_FAULTS
from burnin.scenarios.schema import FaultSpec, Scenario

__all__ = ["draw_trials", "draw_controls", "is_recovery_campaign", "check_templates", "companion_faults", "trial_scenario"]

#: What a trial adds to make its fault matter: a damaged checkpoint (or snapshot) only costs something
#: when a restart has to read it, so its trial kills the same rank right after, at the same step point.
_NEEDS_KILL = ("storage.checkpoint_corrupt", "storage.snapshot_corrupt")


def draw_trials(scenario: Scenario, trials: int, seed: int) -> list[dict[str, Any]]:
    """The campaign's trials: each picks one fault of the scenario and draws what `vary` names."""
    c = scenario.campaign
    if c is None:
        raise ScenarioError("campaign: this scenario has no `campaign:` section; add one (trials, warmup, window)")
    if not scenario.faults:
        raise ScenarioError("faults: a campaign needs at least one fault to draw trials from")
    recovery = is_recovery_campaign(scenario)
    if recovery:
        check_templates(scenario)
    for i, f in enumerate(scenario.faults):
        if not recovery and f.build().where != "in_rank":
            raise ScenarioError(f"faults.{i}.fault: a data-fault campaign runs in-rank faults only; {f.fault} acts "
                                f"from outside the rank (use `burnin run` for it)")
    out = []
    for k in range(trials):
        rng = random.Random(f"burnin-campaign:{seed}:{k}")
        template = rng.randrange(len(scenario.faults)) if c.draw == "random" else k % len(scenario.faults)
        spec = scenario.faults[template].model_dump(mode="json")
        params = dict(spec["params"])
        for key in sorted(spec["vary"]):
            v = spec["vary"][key]
            value = rng.choice(v) if isinstance(v, list) else rng.randint(v["min"], v["max"])
            if key in ("rank", "step"):
                spec[key] = value
            else:
                params[key] = value
        if "seed" not in spec["vary"] and "seed" in scenario.faults[template].build().Params.model_fields:
            params["seed"] = rng.randrange(2**31)  # what the fault draws itself (tensor, element, bit)
        spec.update(params=params, vary={})
        if not c.warmup <= spec["step"] < c.warmup + c.window:
            raise ScenarioError(f"faults.{template}.step: step {spec['step']} (trial {k}) is outside the campaign "
                                f"window {c.warmup}..{c.warmup + c.window - 1}; set step or vary.step inside it")
        if spec["rank"] >= scenario.workload.ranks:
            raise ScenarioError(f"faults.{template}.rank: rank {spec['rank']} (trial {k}) does not exist with "
                                f"workload.ranks={scenario.workload.ranks}")
        FaultSpec.model_validate(spec)  # the drawn parameters must be valid too
        extra = companion_faults(spec) if recovery else []
        out.append({"trial": k, "template": template, "faults": [spec, *extra]})
    return out


def draw_controls(scenario: Scenario, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The control trials (`campaign.controls`, at most half as many as the trials): the first bit-flip trials of
    `plan` again, at the same step,
    rank, tensor and element, with bit 0 (the lowest mantissa bit), numbered after the trials. Their effect
    is the chaotic floor a real corruption's effect is measured against."""
    n = min(scenario.campaign.controls if scenario.campaign else 0, len(plan) // 2)  # at most half the trials
    flips = [t for t in plan if t["faults"][0]["fault"] == "corruption.bitflip"][:n]
    out = []
    for k, t in enumerate(flips):
        spec = {**t["faults"][0], "params": {**t["faults"][0]["params"], "bit": 0}}
        out.append({"trial": len(plan) + k, "template": t["template"], "faults": [spec], "control": True,
                    "control_of": t["trial"]})
    return out


def is_recovery_campaign(scenario: Scenario) -> bool:
    return any(f.fault in RECOVERY_FAULTS for f in scenario.faults)


def check_templates(scenario: Scenario) -> None:
    """What a recovery campaign needs of its scenario, as one-line ScenarioErrors naming the field."""
    for i, f in enumerate(scenario.faults):
        if f.fault not in RECOVERY_FAULTS:
            raise ScenarioError(f"faults.{i}.fault: a campaign draws either process faults ({', '.join(RECOVERY_FAULTS)}) "
                                f"or in-rank data faults, not both; {f.fault} is the other kind (split the campaign)")
    if scenario.recovery.mode == "external":  # the system under test restarts and heals its groups itself
        return
    if scenario.recovery.mode == "none" or scenario.recovery.max_restarts < 1:
        raise ScenarioError("recovery.max_restarts: a process-fault campaign studies recoveries; allow at least one "
                            "restart (recovery.mode: restart, max_restarts >= 1)")


def companion_faults(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """What a trial of `spec` adds: the kill that makes a damaged checkpoint or snapshot be read."""
    if spec["fault"] not in _NEEDS_KILL:
        return []
    return [{"fault": "process.kill", "rank": spec["rank"], "step": spec["step"], "point": "between_steps",
             "params": {}, "vary": {}, "expect": "recovered"}]


def trial_scenario(scenario: Scenario, trial: dict[str, Any]) -> Scenario:
    """The run a trial is: the scenario's workload, the trial's faults, no campaign. A damaged disk
    checkpoint is only read when no memory snapshot is newer, so its trials keep none."""
    data = scenario.model_dump(mode="json")
    data.update(campaign=None, faults=trial["faults"])
    if trial["faults"][0]["fault"] == "storage.checkpoint_corrupt":
        data["checkpoint"] = {**data["checkpoint"], "memory_every": 0}
    return Scenario.model_validate(data)
