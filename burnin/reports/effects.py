"""Which silent corruptions matter: an effect class for every silent outcome of a campaign's trial, against
a noise band that the campaign measured.

A trial whose fault nothing detected is `masked` (its final state is the reference's, bit for bit) or
`sdc` (it is not). That flag stays; beside it, what the difference did, on three measures against the
fault-free reference window, each relative to the reference's value:

- `final`: the training loss of the window's last step;
- `eval`: the held-out loss after the window (the workload's `evaluate`, no gradient);
- `step`: the largest per-step training-loss deviation over the window.

The **noise band** is how far those measures move without anything having gone wrong, measured in the
campaign: the control trials (`campaign.controls`) flip the lowest mantissa bit at the same step, rank,
tensor and element as the first bit-flip trials (the chaotic floor: training amplifies any difference),
and the spread windows (`campaign.spread_windows`) run the window fault-free from the same state over other
batches (the seed-to-seed spread: what another data order gives; for the per-step measure, the median
window's largest per-step difference: how far a loss curve wanders by itself). Per measure the band is
the larger of the two. With neither the band is 0 and says so (`measured: false`): every difference then
counts.

Classes, for `masked` and `sdc` trials (detected ones were caught; what they would have done is not known):

- `benign`: every measure inside the band (a masked trial always is);
- `transient`: the largest per-step deviation outside the band, the final and held-out losses inside it;
- `degraded`: the final or the held-out loss outside the band;
- `diverged`: a loss (per step, final or held-out) that is NaN or infinite, or a final or held-out loss
  at or above `DIVERGED_RATIO` times the reference's.

`transient`, `degraded` and `diverged` are *harmful*.
"""

from __future__ import annotations

import math
from typing import Any

from burnin.reports.trials import wilson

__all__ = ["EFFECTS", "HARMFUL", "DIVERGED_RATIO", "noise_band", "deviations", "classify_effect", "effect_rates"]

EFFECTS = ("benign", "transient", "degraded", "diverged")
HARMFUL = ("transient", "degraded", "diverged")

#: A final or held-out loss this many times the reference's has diverged (the model no longer trains).
DIVERGED_RATIO = 1.5


def _rel(x: float | None, ref: float | None) -> float | None:
    if x is None or ref is None:
        return None
    if not (math.isfinite(x) and math.isfinite(ref)):
        return math.inf
    return abs(x - ref) / max(abs(ref), 1e-30)


def deviations(rec: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any] | None:
    """A trial's three measures against the reference (relative), and whether a loss was not finite; None
    when the trial or the reference did not record losses (a crash, an older campaign)."""
    ref = reference or {}
    losses, ref_losses = rec.get("losses"), ref.get("losses")
    if not losses or not ref_losses or len(losses) != len(ref_losses):
        return None
    values = [*losses, rec.get("eval_loss")]
    nonfinite = any(v is not None and not math.isfinite(v) for v in values)
    step = max(_rel(x, r) for x, r in zip(losses, ref_losses))
    return {"final": _rel(losses[-1], ref_losses[-1]), "eval": _rel(rec.get("eval_loss"), ref.get("eval_loss")),
            "step": step, "nonfinite": nonfinite,
            "final_ratio": (losses[-1] / ref_losses[-1]) if ref_losses[-1] and math.isfinite(losses[-1]) else None,
            "eval_ratio": (rec["eval_loss"] / ref["eval_loss"])
            if rec.get("eval_loss") is not None and ref.get("eval_loss") and math.isfinite(rec["eval_loss"]) else None}


def noise_band(controls: list[dict[str, Any]], reference: dict[str, Any] | None) -> dict[str, Any]:
    """The band from the control trials and the reference's spread windows (see the module's docstring)."""
    ref = reference or {}
    devs = [d for d in (deviations(c, reference) for c in controls) if d is not None and not d["nonfinite"]]
    floor = {k: max((d[k] for d in devs if d[k] is not None), default=0.0) for k in ("final", "eval", "step")}
    spread_rows = ref.get("spread") or []
    ref_final = (ref.get("losses") or [None])[-1]
    ref_losses = ref.get("losses") or []
    step_spreads = sorted(max((_rel(x, r) or 0.0 for x, r in zip(row.get("losses") or [], ref_losses)), default=0.0)
                          for row in spread_rows)
    spread = {"final": max((_rel(r["final_loss"], ref_final) or 0.0 for r in spread_rows), default=0.0),
              "eval": max((_rel(r["eval_loss"], ref.get("eval_loss")) or 0.0 for r in spread_rows), default=0.0),
              # a step's loss over other batches: how far a loss curve wanders by itself (the median window's
              # largest per-step difference): a spike below it is not one a user could see
              "step": step_spreads[len(step_spreads) // 2] if step_spreads else 0.0}
    band = {k: max(floor[k], spread[k]) for k in ("final", "eval", "step")}
    how = []
    if devs:
        how.append(f"the chaotic floor: per measure, the largest relative deviation among {len(devs)} control trials "
                   "(the first bit-flip trials again with bit 0, the lowest mantissa bit, at the same step, rank, "
                   "tensor and element)")
    if spread_rows:
        how.append(f"the seed-to-seed spread: {len(spread_rows)} fault-free windows from the same state over other "
                   "batches (final and held-out loss: the largest difference; per step: the median window's largest)")
    return {**band, "floor": floor, "spread": spread, "measured": bool(devs or spread_rows), "controls": len(devs),
            "spread_windows": len(spread_rows),
            "how": "; ".join(how) if how else ("not measured (campaign.controls and campaign.spread_windows 0): the "
                                               "band is 0, every difference counts"),
            "diverged_ratio": DIVERGED_RATIO}


def classify_effect(judged: dict[str, Any], rec: dict[str, Any], reference: dict[str, Any] | None,
                    band: dict[str, Any]) -> dict[str, Any]:
    """`judged` (a `judge_trial` row) with `effect` and `deviation` added for a silent outcome."""
    if judged["outcome"] not in ("masked", "sdc"):
        return judged
    if judged["outcome"] == "masked":
        return {**judged, "effect": "benign"}
    d = deviations(rec, reference)
    if d is None:
        return {**judged, "effect": None}
    ratios = [r for r in (d["final_ratio"], d["eval_ratio"]) if r is not None]
    if d["nonfinite"] or any(r >= DIVERGED_RATIO for r in ratios):
        effect = "diverged"
    elif d["final"] > band["final"] or (d["eval"] is not None and d["eval"] > band["eval"]):
        effect = "degraded"
    elif d["step"] > band["step"]:
        effect = "transient"
    else:
        effect = "benign"
    return {**judged, "effect": effect, "deviation": {k: d[k] for k in ("final", "eval", "step")}}


def effect_rates(judged: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and rates (Wilson 95 % intervals) of each class among the silent trials, and the harmful share."""
    silent = [t for t in judged if t.get("effect") is not None]
    n = len(silent)
    out: dict[str, Any] = {"silent_trials": n}
    for e in EFFECTS:
        k = sum(t["effect"] == e for t in silent)
        out[e] = {"count": k, "rate": k / n if n else 0.0, "ci95": list(wilson(k, n)) if n else [0.0, 1.0]}
    harmful = sum(t["effect"] in HARMFUL for t in silent)
    out["harmful"] = {"count": harmful, "rate": harmful / n if n else 0.0,
                      "ci95": list(wilson(harmful, n)) if n else [0.0, 1.0]}
    return out
