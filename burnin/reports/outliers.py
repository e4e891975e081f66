"""Who is slow, when only persistent and significant slowness counts: one rule for the ranks of a node and
the nodes of a fleet.

The input is a table of periods x members (ranks, or nodes): each cell a member's median time per step in
that period (None where it ran too few steps). A busy machine stretches everyone's times at once, and
sometimes one member's for a while; a slow member is slow against its peers *in the same period*, in most
periods. So, per member:

- per period, the ratio of its time to the median of the *other* members' times in that period (a
  leave-one-out baseline: with two members it is the other one; with many, one slow member cannot move it);
- `score`: the median of those ratios over the periods (NVRx's straggler score, inverted: time over the
  reference);
- `share`: the share of periods whose ratio is at or above the threshold;
- `p_value`: a one-sided binomial (sign) test that the member is at or above the threshold in more than
  half of the periods (H0: at most half). Persistent *and* significant in one number: with 12 periods it
  takes 10 above the threshold for p < 0.05, 11 for p < 0.01; fewer than 5 periods can never be significant
  at 0.05, and the member is reported `undecided`, not slow;
- `robust_z`: where there are 4 members or more, how far the member's score lies from the members' median
  score in MADs (scaled by 1.4826, so ~1 is one standard deviation of normal noise). Reported, not decisive:
  with a few members the MAD is itself noise.

A member is an outlier when its score is at or above the threshold and the sign test is significant at
`alpha`. Same table, same answer: nothing here is random.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Hashable, Mapping, Sequence


__all__ = ["persistent_outliers", "slow_samples", "robust_z", "MIN_PERIODS", "MIN_SAMPLES"]

#: Periods below which no member can be called slow (a sign test of 4 periods cannot reach p < 0.05).
MIN_PERIODS = 5

#: Samples (checkpoint saves, recoveries) a member needs before it can be called slow at them.
MIN_SAMPLES = 5


def robust_z(x: float, xs: Sequence[float]) -> float | None:
    """How many scaled MADs `x` lies above the median of `xs` (None when the MAD is 0 or there are < 4)."""
    if len(xs) < 4:
        return None
    med = statistics.median(xs)
    mad = statistics.median(abs(v - med) for v in xs) * 1.4826
    return (x - med) / mad if mad > 0 else None


def persistent_outliers(table: Mapping[Hashable, Sequence[float | None]], threshold: float, alpha: float,
                        min_periods: int = MIN_PERIODS) -> dict[Hashable, dict[str, Any]]:
    """Each member's judgement (see the module's docstring). `table[member][k]` is its time in period k
    (periods aligned across members; None: no value there). Returns per member: score, share, periods,
    above, p_value, robust_z, outlier (bool), undecided (too few periods to tell)."""
    members = list(table)
    n_periods = max((len(v) for v in table.values()), default=0)
    ratios: dict[Hashable, list[float]] = {m: [] for m in members}
    for k in range(n_periods):
        here = {m: table[m][k] for m in members if k < len(table[m]) and table[m][k] is not None}
        if len(here) < 2:
            continue  # nobody to compare with in this period
        for m, v in here.items():
            others = [w for o, w in here.items() if o != m]
            base = statistics.median(others)
            if base > 0 and math.isfinite(v):
                ratios[m].append(v / base)
    from scipy.stats import binomtest  # lazy: scipy is slow to import

    scores = {m: statistics.median(r) for m, r in ratios.items() if r}
    out: dict[Hashable, dict[str, Any]] = {}
    for m in members:
        r = ratios[m]
        if not r:
            out[m] = {"score": None, "share": None, "periods": 0, "above": 0, "p_value": None, "robust_z": None,
                      "outlier": False, "undecided": True}
            continue
        above = sum(1 for x in r if x >= threshold)
        p = float(binomtest(above, len(r), 0.5, alternative="greater").pvalue)
        score = scores[m]
        undecided = len(r) < min_periods
        out[m] = {"score": score, "share": above / len(r), "periods": len(r), "above": above, "p_value": p,
                  "robust_z": robust_z(score, list(scores.values())),
                  "outlier": (not undecided) and score >= threshold and p < alpha, "undecided": undecided}
    return out


def slow_samples(samples: Mapping[Hashable, Sequence[float]], threshold: float, alpha: float,
                 min_samples: int = MIN_SAMPLES) -> dict[Hashable, dict[str, Any]]:
    """For what comes as a handful of durations per member rather than a value per period (checkpoint
    saves, recoveries): each member's median against the median of every other member's samples pooled
    (`ratio`), and a one-sided Mann-Whitney U test that its samples are larger (`p_value`). Slow when the
    ratio is at or above `threshold` and p < `alpha`, with at least `min_samples` of its own."""
    from scipy.stats import mannwhitneyu  # lazy: scipy is slow to import

    out: dict[Hashable, dict[str, Any]] = {}
    for m, own in samples.items():
        others = [x for o, xs in samples.items() if o != m for x in xs]
        if not own or not others:
            out[m] = {"ratio": None, "p_value": None, "samples": len(own), "outlier": False, "undecided": True}
            continue
        base = statistics.median(others)
        ratio = statistics.median(own) / base if base > 0 else None
        p = float(mannwhitneyu(own, others, alternative="greater").pvalue)
        undecided = len(own) < min_samples
        out[m] = {"ratio": ratio, "p_value": p, "samples": len(own), "undecided": undecided,
                  "outlier": not undecided and ratio is not None and ratio >= threshold and p < alpha}
    return out
