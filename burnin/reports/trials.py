"""Campaign trials judged and counted: one data-fault trial's outcome, and outcome rates with their
95 % Wilson intervals. The campaign's summary, the run history and `burnin compare` all count the same way."""

from __future__ import annotations

import math
from typing import Any

from burnin.scenarios.schema import TRIAL_OUTCOMES

__all__ = ["CAMPAIGN_SCHEMA_VERSION", "Z95", "wilson", "outcome_rates", "judge_trial"]

#: campaign.json's schema version (data-fault and recovery campaigns alike).
CAMPAIGN_SCHEMA_VERSION = 1
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n (sound at k=0 and k=n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def outcome_rates(outcomes: list[str]) -> dict[str, dict[str, Any]]:
    """Per outcome: count, rate and its 95 % Wilson interval."""
    n = len(outcomes)
    out = {}
    for o in TRIAL_OUTCOMES:
        k = outcomes.count(o)
        out[o] = {"count": k, "rate": k / n if n else 0.0, "ci95": list(wilson(k, n))}
    return out


def judge_trial(rec: dict[str, Any]) -> dict[str, Any]:
    """One trial's outcome from its `trial_done` record (or a crash record)."""
    fault = rec["fault"]
    if rec.get("crash"):
        return {"trial": rec["trial"], "template": rec.get("template"), "fault": fault["fault"],
                "target": fault["params"].get("target"),
                "bit_class": fault["params"].get("bit_class") or fault["params"].get("value"), "outcome": "detected",
                "detectors": ["crash"], "latency_steps": {}, "false_alarms": 0, "crash": rec["crash"]}
    inj = rec["injected"][0] if rec["injected"] else None
    details = inj["details"] if inj else {}
    step = inj["step"] if inj else fault["step"]
    before = [f for f in rec["findings"] if f["step"] < step]
    after = [f for f in rec["findings"] if f["step"] >= step]
    latency: dict[str, int] = {}
    for f in after:
        latency.setdefault(f["detector"], f["step"] - step)
    detected = bool(after)
    if not inj:
        outcome = "failed"
    elif detected:
        outcome = "recovered" if rec["exact"] else "detected"
    else:
        outcome = "masked" if rec["exact"] else "sdc"
    return {"trial": rec["trial"], "template": rec.get("template"),
            "fault": fault["fault"], "target": details.get("target", fault["params"].get("target")),
            "bit_class": details.get("bit_class") or details.get("value") or "n/a", "tensor": details.get("tensor"),
            "bit": details.get("bit"), "pattern": details.get("pattern", "single"), "outcome": outcome, "detectors": sorted(latency), "latency_steps": latency,
            "false_alarms": len(before), "rollbacks": rec.get("rollbacks", 0), "exact": rec["exact"],
            "diverged_at_step": rec.get("diverged_at_step")}
