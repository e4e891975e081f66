"""`burnin compare A B`: is B better, the same, or worse than A, and can the samples tell?

A side is a campaign directory (its trials), a run or burn-in directory (its faults), or a history
selection `history:SCENARIO[@COMMIT]` (every fault of those runs, pooled). Per metric:

- rates (each outcome's, detection, exactness, and for campaigns with effect classes the harmful sdc
  rate: silent escapes that were transient, degraded or diverged against each side's own noise band):
  the difference B - A with a 95 % interval and an
  exact test. Two campaigns that drew the same trials (same scenario faults, seed and trial count:
  each trial i is the same fault at the same place on both sides) are *paired*: the exact test is
  McNemar's (a binomial test on the discordant trials), the interval Newcombe's square-and-add of
  the Wilson intervals of the two discordant proportions (conservative: it ignores their negative
  correlation). Otherwise *unpaired*: Fisher's exact test, and Newcombe's hybrid score interval
  (method 10) from the Wilson intervals of the two rates.
- recovery time and lost steps: the Mann-Whitney U test and the ratio of medians.

The verdict of a metric: `better` or `worse` when the test rejects "no difference" at `alpha` and
the interval excludes 0 (direction by what the metric means: more recovered is better, more sdc is
worse); `same` when the interval lies within +/- `margin` (rates) or the medians are within 10 %
with at least 10 recoveries a side (times); `not comparable` otherwise, with the number of trials
per side at which the interval would fit within the margin.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from burnin.core.events import read_events
from burnin.errors import UserError
from burnin.reports import history as hist
from burnin.reports.effects import HARMFUL, classify_effect
from burnin.reports.trials import Z95, judge_trial, wilson

__all__ = ["load_side", "compare", "markdown"]

#: +1: higher is better; -1: higher is worse; 0: neither (a difference is reported, not judged)
POLARITY = {"recovered": 1, "masked": 0, "detected": -1, "sdc": -1, "failed": -1, "unjudged": 0, "detection": 1,
            "exact": 1, "harmful": -1}
TIME_SAME = 0.10


# -- the two sides ---------------------------------------------------------------------------------

def load_side(spec: str, history: str | None = None) -> dict[str, Any]:
    """A side's samples: per trial (or fault) its outcome, whether something detected it, whether the run
    ended exact, its recovery seconds and lost steps; plus what identifies its trials for pairing."""
    if spec.startswith("history:"):
        return _from_history(spec[len("history:"):], history)
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"compare: {spec!r} is neither a run, campaign or burn-in directory nor history:SCENARIO[@COMMIT]")
    if (path / "campaign.json").exists() and (path / "trials.jsonl").exists():
        return _from_campaign(path)
    if (path / "burn-in.json").exists():
        s = json.loads((path / "burn-in.json").read_text())
        rows = [{"outcome": f["outcome"], "detected": f["detected_by"] is not None, "exact": None,
                 "recovery_s": f["recovery_s"], "lost_steps": f["lost_steps"], "key": None} for f in s["faults"]["list"]]
        return {"label": path.name, "kind": "burn-in", "rows": rows, "plan": None}
    if (path / "summary.json").exists():
        s = json.loads((path / "summary.json").read_text())
        rows = [{"outcome": f["outcome"], "detected": f.get("detected_by") is not None, "exact": s.get("exact"),
                 "recovery_s": (f.get("recovery") or {}).get("total_s"), "lost_steps": f.get("lost_steps"),
                 "key": None} for f in s["faults"] if f.get("injected")]
        return {"label": path.name, "kind": "run", "rows": rows, "plan": None}
    raise UserError(f"compare: {spec} holds no campaign.json, burn-in.json or summary.json; give a run, campaign or "
                    "burn-in directory")


def _from_campaign(path: Path) -> dict[str, Any]:
    summary = json.loads((path / "campaign.json").read_text())
    band = summary.get("noise_band")
    ref_file = path / "reference.json"
    reference = json.loads(ref_file.read_text()) if band and ref_file.exists() else None
    rows = []
    for t in sorted(read_events(path / "trials.jsonl"), key=lambda t: t["trial"]):
        if t.get("control"):
            continue  # a control trial measures the noise band; it has no outcome
        key = json.dumps(t["fault"], sort_keys=True)
        if t.get("kind") == "recovery":
            rec = t.get("recovery") or {}
            rows.append({"trial": t["trial"], "outcome": t["outcome"], "detected": t.get("detected_by") is not None,
                         "exact": t.get("exact"), "recovery_s": rec.get("total_s"), "lost_steps": t.get("lost_steps"),
                         "key": key})
        else:
            j = judge_trial(t)
            # a silent escape that did harm (transient, degraded, diverged against the side's own noise band);
            # None for a campaign measured before effect classes
            harmful = None
            if reference is not None:
                effect = classify_effect(j, t, reference, band).get("effect")
                harmful = effect in HARMFUL
            rows.append({"trial": t["trial"], "outcome": j["outcome"], "detected": bool(j["detectors"]),
                         "exact": t.get("exact"), "recovery_s": None, "lost_steps": None, "key": key,
                         "harmful": harmful})
    return {"label": path.name, "kind": "campaign", "rows": rows, "seed": summary.get("seed"),
            "plan": [r["key"] for r in rows]}


def _from_history(selector: str, history: str | None) -> dict[str, Any]:
    scenario, _, commit = selector.partition("@")
    path = hist.history_path(history)
    if path is None or not path.exists():
        raise UserError(f"compare: no history at {path}; record runs first (or give --history PATH)")
    runs = hist.select_runs(path, scenario=scenario or None, commit=commit or None)
    if not runs:
        raise UserError(f"compare: history:{selector} selects no runs in {path}; see `burnin history`")
    con = hist.reader(path)
    try:
        ids = [r["run_id"] for r in runs]
        q = f"SELECT outcome, detected_by, exact, recovery_s, lost_steps FROM faults WHERE run_id IN ({', '.join('?' * len(ids))})"
        rows = [{"outcome": o, "detected": d is not None, "exact": None if e is None else bool(e), "recovery_s": r,
                 "lost_steps": ls, "key": None} for o, d, e, r, ls in con.execute(q, ids)]
    finally:
        con.close()
    return {"label": f"history:{selector} ({len(runs)} runs)", "kind": "history", "rows": rows, "plan": None}


# -- statistics ------------------------------------------------------------------------------------

def _rate_metric(name: str, a: list[bool], b: list[bool], paired: bool, alpha: float, margin: float) -> dict[str, Any]:
    from scipy import stats  # lazy: scipy, only for a test statistic

    na, nb = len(a), len(b)
    ka, kb = sum(a), sum(b)
    pa, pb = (ka / na if na else 0.0), (kb / nb if nb else 0.0)
    out: dict[str, Any] = {"metric": name, "a": {"rate": pa, "k": ka, "n": na, "ci95": list(wilson(ka, na))},
                           "b": {"rate": pb, "k": kb, "n": nb, "ci95": list(wilson(kb, nb))},
                           "difference": pb - pa, "paired": paired}
    if not na or not nb:
        return {**out, "ci95": None, "p": None, "test": None, "verdict": "not comparable",
                "why": "a side has no trials", "trials_needed": None}
    if paired:
        worse_b = sum(1 for x, y in zip(a, b) if x and not y)   # A yes, B no
        better_b = sum(1 for x, y in zip(a, b) if not x and y)  # A no, B yes
        n = na
        disc = worse_b + better_b
        p = stats.binomtest(min(worse_b, better_b), disc, 0.5).pvalue if disc else 1.0
        pc, pw = better_b / n, worse_b / n
        lc, uc = wilson(better_b, n)
        lw, uw = wilson(worse_b, n)
        d = pc - pw
        lo = d - math.sqrt((pc - lc) ** 2 + (uw - pw) ** 2)
        hi = d + math.sqrt((uc - pc) ** 2 + (pw - lw) ** 2)
        test = f"McNemar exact (discordant {worse_b} vs {better_b})"
        # trials at which the interval of this discordance would fit within the margin
        rate = max(disc / n, 1 / (n + 2))
        needed = math.ceil(Z95 ** 2 * rate / margin ** 2)
    else:
        la, ua = wilson(ka, na)
        lb, ub = wilson(kb, nb)
        d = pb - pa
        lo = d - math.sqrt((pb - lb) ** 2 + (ua - pa) ** 2)
        hi = d + math.sqrt((ub - pb) ** 2 + (pa - la) ** 2)
        p = stats.fisher_exact([[ka, na - ka], [kb, nb - kb]]).pvalue
        test = "Fisher exact"
        pooled = (ka + kb) / (na + nb)
        var = max(pooled * (1 - pooled), 1 / (na + nb + 2))
        needed = math.ceil(2 * Z95 ** 2 * var / margin ** 2)
    out.update(ci95=[lo, hi], p=p, test=test)
    polarity = POLARITY.get(name.split(" ")[0], 0)
    if p < alpha and (lo > 0 or hi < 0):
        if polarity == 0:
            verdict = "different"
        else:
            verdict = "better" if (d > 0) == (polarity > 0) else "worse"
        out.update(verdict=verdict, why=f"p = {p:.2g} < {alpha}", trials_needed=None)
    elif -margin <= lo and hi <= margin:
        out.update(verdict="same", why=f"the 95 % interval of the difference lies within +/-{margin}",
                   trials_needed=None)
    else:
        out.update(verdict="not comparable",
                   why=f"p = {p:.2g}, and the 95 % interval [{lo:+.3f}, {hi:+.3f}] is wider than +/-{margin}",
                   trials_needed=max(needed, min(na, nb) + 1))
    return out


def _time_metric(name: str, a: list[float], b: list[float], alpha: float) -> dict[str, Any]:
    from scipy import stats  # lazy: scipy, only for a test statistic

    out: dict[str, Any] = {"metric": name, "a": {"n": len(a), "median": statistics.median(a) if a else None},
                           "b": {"n": len(b), "median": statistics.median(b) if b else None}}
    if len(a) < 2 or len(b) < 2:
        return {**out, "ratio_of_medians": None, "p": None, "test": None, "verdict": "not comparable",
                "why": "fewer than 2 values on a side", "trials_needed": 10}
    ratio = out["b"]["median"] / out["a"]["median"] if out["a"]["median"] else None
    p = stats.mannwhitneyu(a, b, alternative="two-sided").pvalue
    out.update(ratio_of_medians=ratio, p=p, test="Mann-Whitney U")
    if p < alpha and ratio is not None and ratio != 1:
        out.update(verdict="better" if ratio < 1 else "worse", why=f"p = {p:.2g} < {alpha}", trials_needed=None)
    elif min(len(a), len(b)) >= 10 and (out["a"]["median"] == out["b"]["median"] or
                                        (ratio is not None and abs(ratio - 1) <= TIME_SAME)):
        out.update(verdict="same", why=f"p = {p:.2g}; medians within {TIME_SAME:.0%}", trials_needed=None)
    else:
        out.update(verdict="not comparable", why=f"p = {p:.2g}; medians {ratio and f'{ratio:.2f}x'}",
                   trials_needed=max(10, 2 * min(len(a), len(b))))
    return out


def compare(a: dict[str, Any], b: dict[str, Any], *, alpha: float = 0.05, margin: float = 0.05) -> dict[str, Any]:
    paired = bool(a.get("plan") and a.get("plan") == b.get("plan"))
    ra, rb = a["rows"], b["rows"]
    metrics = []
    outcomes = sorted({r["outcome"] for r in ra + rb}, key=lambda o: list(POLARITY).index(o) if o in POLARITY else 99)
    for o in outcomes:
        metrics.append(_rate_metric(f"{o} rate", [r["outcome"] == o for r in ra], [r["outcome"] == o for r in rb],
                                    paired, alpha, margin))
    metrics.append(_rate_metric("detection rate", [r["detected"] for r in ra], [r["detected"] for r in rb],
                                paired, alpha, margin))
    if ra and rb and all(r.get("harmful") is not None for r in ra + rb):
        # each side's effects against its own measured noise band
        metrics.append(_rate_metric("harmful sdc rate", [r["harmful"] for r in ra], [r["harmful"] for r in rb],
                                    paired, alpha, margin))
    if all(r["exact"] is not None for r in ra + rb) and ra and rb:
        metrics.append(_rate_metric("exact rate", [bool(r["exact"]) for r in ra], [bool(r["exact"]) for r in rb],
                                    paired, alpha, margin))
    ta = [r["recovery_s"] for r in ra if r["recovery_s"] is not None]
    tb = [r["recovery_s"] for r in rb if r["recovery_s"] is not None]
    if ta or tb:
        metrics.append(_time_metric("recovery time (s)", ta, tb, alpha))
    la = [r["lost_steps"] for r in ra if r["lost_steps"] is not None]
    lb = [r["lost_steps"] for r in rb if r["lost_steps"] is not None]
    if la or lb:
        metrics.append(_time_metric("lost steps", la, lb, alpha))
    return {"schema_version": 1, "a": a["label"], "b": b["label"], "paired": paired, "alpha": alpha, "margin": margin,
            "metrics": metrics, "worse": [m["metric"] for m in metrics if m["verdict"] == "worse"]}


def markdown(c: dict[str, Any]) -> str:
    lines = [f"# {c['b']} against {c['a']}", "",
             "Paired: both sides ran the same trials." if c["paired"] else "Unpaired samples.",
             f"Verdicts at alpha {c['alpha']}; `same` needs the interval within +/-{c['margin']}.", "",
             "| metric | A | B | B - A (95 % CI) | test | p | verdict |", "|---|---|---|---|---|---|---|"]
    for m in c["metrics"]:
        if "rate" in m["a"]:
            a = f"{m['a']['rate']:.3f} ({m['a']['k']}/{m['a']['n']})"
            b = f"{m['b']['rate']:.3f} ({m['b']['k']}/{m['b']['n']})"
            ci = f"{m['difference']:+.3f} [{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}]" if m.get("ci95") else "–"
        else:
            a = f"median {m['a']['median']:.3f} (n {m['a']['n']})" if m["a"]["median"] is not None else "–"
            b = f"median {m['b']['median']:.3f} (n {m['b']['n']})" if m["b"]["median"] is not None else "–"
            ci = f"ratio {m['ratio_of_medians']:.2f}" if m.get("ratio_of_medians") else "–"
        verdict = m["verdict"] + (f" (needs ~{m['trials_needed']} trials a side)" if m.get("trials_needed") else "")
        p = f"{m['p']:.3g}" if m.get("p") is not None else "–"
        lines.append(f"| {m['metric']} | {a} | {b} | {ci} | {m.get('test') or '–'} | {p} | {verdict} |")
    return "\n".join(lines) + "\n"
