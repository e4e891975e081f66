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

from burnin.reports.trials import judge_trial, wilson

__all__ = ["EFFECTS", "HARMFUL", "DIVERGED_RATIO", "noise_band", "deviations", "classify_effect", "effect_rates",
           "unchecked_effect", "detector_harm", "harmful_escapes"]

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
    """`judged` (a `judge_trial` row) with `effect` and `deviation` added for a silent outcome, and `unchecked`
    for every trial whose unchecked run is known (see `unchecked_effect`)."""
    out = dict(judged)
    u = unchecked_effect(judged, rec, reference, band)
    if u is not None:
        out["unchecked"] = u
    if judged["outcome"] not in ("masked", "sdc"):
        return out
    if judged["outcome"] == "masked":
        return {**out, "effect": "benign"}
    effect, d = _effect(rec, reference, band)
    if d is None:
        return {**out, "effect": None}
    return {**out, "effect": effect, "deviation": {k: d[k] for k in ("final", "eval", "step")}}


def _effect(rec: dict[str, Any], reference: dict[str, Any] | None,
            band: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The class of a window that did not end exact, and its deviations (None: no losses to judge)."""
    d = deviations(rec, reference)
    if d is None:
        return None, None
    ratios = [r for r in (d["final_ratio"], d["eval_ratio"]) if r is not None]
    if d["nonfinite"] or any(r >= DIVERGED_RATIO for r in ratios):
        return "diverged", d
    if d["final"] > band["final"] or (d["eval"] is not None and d["eval"] > band["eval"]):
        return "degraded", d
    if d["step"] > band["step"]:
        return "transient", d
    return "benign", d


def unchecked_effect(judged: dict[str, Any], rec: dict[str, Any], reference: dict[str, Any] | None,
                     band: dict[str, Any]) -> dict[str, Any] | None:
    """What the trial's fault does when nothing acts on it: its effect class, and each detector that flags
    it (steps after the injection). From the trial's own window when no detector acted (it ran unchecked),
    or from its unchecked run (`observed`: the same fault again, detectors watching but not acting; a
    campaign's `observe`). None for a crash, or a caught trial without an unchecked run."""
    if judged.get("crash") or judged["outcome"] == "failed":
        return None
    src = rec.get("observed")
    if src is None:
        if judged["outcome"] not in ("masked", "sdc"):
            return None
        src = rec
    inj = rec.get("injected") or []
    step = inj[0]["step"] if inj else (rec.get("fault") or {}).get("step", 0)
    flagged: dict[str, int] = {}
    for f in src.get("findings") or []:
        if f["step"] >= step:
            flagged.setdefault(f["detector"], f["step"] - step)
    effect = "benign" if src.get("exact") else _effect(src, reference, band)[0]
    return {"effect": effect, "flagged": flagged, "exact": bool(src.get("exact"))}


def detector_harm(judged: list[dict[str, Any]], detectors: list[str]) -> dict[str, Any]:
    """Per detector, and for any detector at all: the share of the harmful trials (unchecked effect
    transient, degraded or diverged) it flags, and the share of the benign ones it flags, with Wilson 95 %
    intervals; over the trials whose unchecked effect is known."""
    known = [t["unchecked"] for t in judged if t.get("unchecked") and t["unchecked"]["effect"] is not None]
    harmful = [u for u in known if u["effect"] in HARMFUL]
    benign = [u for u in known if u["effect"] == "benign"]

    def score(hit: Any) -> dict[str, Any]:
        caught, flagged = sum(map(hit, harmful)), sum(map(hit, benign))
        return {"harmful_caught": {"count": caught, "of": len(harmful), "rate": caught / len(harmful) if harmful else None,
                                   "ci95": list(wilson(caught, len(harmful))) if harmful else [0.0, 1.0]},
                "benign_flagged": {"count": flagged, "of": len(benign), "rate": flagged / len(benign) if benign else None,
                                   "ci95": list(wilson(flagged, len(benign))) if benign else [0.0, 1.0]}}

    out = {d: score(lambda u, d=d: d in u["flagged"]) for d in detectors}
    out["any"] = score(lambda u: bool(u["flagged"]))
    missing = sum(1 for t in judged if not (t.get("unchecked") and t["unchecked"]["effect"] is not None))
    return {"detectors": out, "trials": len(known), "harmful": len(harmful), "benign": len(benign),
            "unknown": missing,
            "how": "each trial's unchecked run: its own window when no detector acted, else the same fault again "
                   "with the detectors watching, not acting (campaign.observe); harmful = transient, degraded or "
                   "diverged against the noise band; a detector flags a trial when it fires at or after the "
                   "injected step"}


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


def harmful_escapes(trials: list[dict[str, Any]], reference: dict[str, Any] | None,
                    band: dict[str, Any]) -> list[dict[str, Any]]:
    """A campaign's trials whose fault escaped every detector and did harm (transient, degraded, diverged
    against the band), each with a signature of its class and place for triage and the history:
    `silent diverged: corruption.bitflip param exponent`."""
    out = []
    for t in trials:
        if t.get("control") or t.get("crash"):
            continue
        j = classify_effect(judge_trial(t), t, reference, band)
        if j.get("effect") not in HARMFUL:
            continue
        target = None if j["fault"].endswith("." + str(j["target"])) else j["target"]
        pattern = None if j.get("pattern") in (None, "single", "tile") else j["pattern"]
        where = " ".join(str(x) for x in (target, j["bit_class"], pattern) if x)
        out.append({"trial": t["trial"], "fault": j["fault"], "effect": j["effect"], "rank": t["fault"].get("rank"),
                    "step": (t.get("injected") or [{}])[0].get("step", t["fault"].get("step")),
                    "signature": f"silent {j['effect']}: {j['fault']} {where}"})
    return out
