"""`burnin triage`: failures grouped by signature, across runs, against a baseline.

A signature is the failure's cause and the first line of its detail with every number, hex address
and path erased (`burnin.harness.classify.signature`): "killed: SIGKILL", "exception: RuntimeError:
injected fault at step N (rank N)". A step number, a pid, a port or a temporary directory never
splits a group; a different exception type or message does.

Per group: how many failures, in how many runs, the ranks and steps it hit, first and last seen,
how reliably it reproduces (the share of the selected runs of its scenario in which it appears),
the injected faults that explain it or `unexplained`, and its status against a baseline: `new`
(never seen before the current runs), `regressed` (seen once, absent from the baseline, back now),
`ongoing` (in both), `resolved` (in the baseline, gone now). Groups explained by one fault share a
cause, and are listed together under it: a latent kernel bug that shows as a segfault in one run
and a NaN in another is one cause with two signatures.

A data-fault campaign's directory counts as one run whose failures are its harmful silent escapes, signed
by effect class and where the fault struck (`silent diverged: corruption.bitflip param exponent`): triage
of two campaigns says which kinds of harm are new, ongoing or resolved. A benign escape is no failure.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from burnin.core.events import read_events
from burnin.errors import UserError
from burnin.reports import history as hist
from burnin.reports.effects import harmful_escapes

__all__ = ["collect_dirs", "collect_history", "triage", "markdown"]


def collect_dirs(dirs: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(runs, failures) from run directories (summary.json), burn-in directories (burn-in.json's run) and
    data-fault campaign directories (their harmful silent escapes and crashed trials)."""
    runs, failures = [], []
    for d in dirs:
        path = Path(d)
        summary = path / "summary.json"
        if not summary.exists() and (path / "campaign.json").exists() and (path / "trials.jsonl").exists():
            run, found = _campaign(path)
            runs.append(run)
            failures += found
            continue
        if not summary.exists():
            raise UserError(f"triage: {d} holds no summary.json; give run or campaign directories (or --history)")
        s = json.loads(summary.read_text())
        runs.append({"run_id": s["run_id"], "scenario": s["scenario"], "started_at": s["started_at"]})
        names = {f["index"]: f["fault"] for f in s.get("faults", [])}
        for f in s.get("failures", []):
            idx = f.get("fault_indices") or ([f["fault_index"]] if f.get("fault_index") is not None else [])
            failures.append({"run_id": s["run_id"], "scenario": s["scenario"], "signature": f["signature"],
                             "cause": f["cause"], "rank": f.get("rank"), "step": f.get("last_step"), "time": f["time"],
                             "explained_by": sorted({names[i] for i in idx if i in names}) or None})
    return runs, failures


def _campaign(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A data-fault campaign as one run: each trial whose fault escaped and did harm (transient, degraded,
    diverged against the campaign's own noise band) is a failure signed by its class and where it struck
    (`silent diverged: corruption.bitflip param exponent`); a benign escape is not one. A crashed trial
    keeps its crash's signature."""
    try:
        summary = json.loads((path / "campaign.json").read_text())
        trials = read_events(path / "trials.jsonl")
        events = read_events(path / "events.jsonl") if (path / "events.jsonl").exists() else []
        reference = json.loads((path / "reference.json").read_text()) if (path / "reference.json").exists() else None
    except (OSError, ValueError) as exc:
        raise UserError(f"triage: {path} is a damaged campaign directory ({' '.join(str(exc).split())[:200]})") from None
    if summary.get("kind") == "recovery" or "effects" not in summary:
        raise UserError(f"triage: {path} is a campaign without effect classes (a recovery campaign, or one from before "
                        "them); triage its trials' runs, or run it again")
    started = events[0]["t"] if events else path.stat().st_mtime
    run = {"run_id": path.name, "scenario": summary["scenario"], "started_at": started}
    out = []
    for t in trials:
        if t.get("crash") and not t.get("control"):
            cause, _, sig = t["crash"].partition(": ")
            out.append({"run_id": path.name, "scenario": summary["scenario"], "rank": t["fault"].get("rank"),
                        "step": t["fault"].get("step"), "time": started, "explained_by": [t["fault"]["fault"]],
                        "signature": sig or t["crash"], "cause": cause})
    for e in harmful_escapes(trials, reference, summary["noise_band"]):
        out.append({"run_id": path.name, "scenario": summary["scenario"], "rank": e["rank"], "step": e["step"],
                    "time": started, "explained_by": [e["fault"]], "signature": e["signature"], "cause": "sdc"})
    return run, out


def collect_history(history: str | None, *, scenario: str | None = None, commit: str | None = None,
                    since: float | None = None, until: float | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    path = hist.history_path(history)
    if path is None or not path.exists():
        raise UserError(f"triage: no history at {path}; record runs first (or give --history PATH)")
    runs = [r for r in hist.select_runs(path, scenario=scenario, commit=commit)
            if (since is None or r["started_at"] >= since) and (until is None or r["started_at"] < until)]
    by_id = {r["run_id"]: r for r in runs}
    failures = []
    for f in hist.failures_of(path, list(by_id)):
        r = by_id[f["run_id"]]
        failures.append({"run_id": f["run_id"], "scenario": r["scenario"], "signature": f["signature"],
                         "cause": f["cause"], "rank": f["rank"], "step": f["step"], "time": f["time"] or r["started_at"],
                         "explained_by": f["explained_by"].split(",") if f["explained_by"] else None})
    return [{"run_id": r["run_id"], "scenario": r["scenario"], "started_at": r["started_at"]} for r in runs], failures


def triage(runs: list[dict[str, Any]], failures: list[dict[str, Any]],
           baseline: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None,
           earlier: set[str] | None = None) -> dict[str, Any]:
    runs_per_scenario: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        runs_per_scenario[r["scenario"]].add(r["run_id"])
    groups: dict[str, dict[str, Any]] = {}
    for f in failures:
        g = groups.setdefault(f["signature"], {"signature": f["signature"], "cause": f["cause"], "count": 0,
                                               "runs": set(), "ranks": set(), "steps": set(), "first_seen": f["time"],
                                               "last_seen": f["time"], "explained_by": set(), "unexplained": 0,
                                               "scenarios": set()})
        g["count"] += 1
        g["runs"].add(f["run_id"])
        g["scenarios"].add(f["scenario"])
        if f["rank"] is not None:
            g["ranks"].add(f["rank"])
        if f["step"] is not None:
            g["steps"].add(f["step"])
        g["first_seen"] = min(g["first_seen"], f["time"])
        g["last_seen"] = max(g["last_seen"], f["time"])
        if f["explained_by"]:
            g["explained_by"].update(f["explained_by"])
        else:
            g["unexplained"] += 1
    base_sigs = {f["signature"] for f in baseline[1]} if baseline is not None else None
    out = []
    for g in sorted(groups.values(), key=lambda g: (-g["count"], g["signature"])):
        total = len(set().union(*(runs_per_scenario[s] for s in g["scenarios"])))
        status = None
        if base_sigs is not None:
            if g["signature"] in base_sigs:
                status = "ongoing"
            elif earlier and g["signature"] in earlier:
                status = "regressed"
            else:
                status = "new"
        out.append({**g, "runs": len(g["runs"]), "ranks": sorted(g["ranks"]), "steps": sorted(g["steps"])[:50],
                    "scenarios": sorted(g["scenarios"]), "explained_by": sorted(g["explained_by"]) or ["unexplained"],
                    "reproduces": len(g["runs"]) / total if total else None, "status": status})
    resolved = sorted(base_sigs - set(groups)) if base_sigs is not None else []
    causes: dict[str, list[str]] = defaultdict(list)
    for g in out:
        for name in g["explained_by"]:
            if name != "unexplained":
                causes[name].append(g["signature"])
    return {"schema_version": 1, "runs": len(runs), "failures": len(failures), "groups": out,
            "resolved": resolved, "shared_causes": {k: v for k, v in sorted(causes.items()) if len(v) > 1},
            "causes": dict(sorted(causes.items()))}


def markdown(t: dict[str, Any]) -> str:
    lines = [f"# Triage: {t['failures']} failures in {t['runs']} runs, {len(t['groups'])} signatures", "",
             "| signature | count | runs | reproduces | ranks | steps | explained by | status |",
             "|---|---|---|---|---|---|---|---|"]
    for g in t["groups"]:
        rep = f"{g['reproduces']:.0%}" if g["reproduces"] is not None else "–"
        steps = ", ".join(map(str, g["steps"][:8])) + (" …" if len(g["steps"]) > 8 else "")
        lines.append(f"| `{g['signature']}` | {g['count']} | {g['runs']} | {rep} | {', '.join(map(str, g['ranks']))} | "
                     f"{steps} | {', '.join(g['explained_by'])} | {g['status'] or '–'} |")
    if t["resolved"]:
        lines += ["", "Resolved (in the baseline, not now): " + ", ".join(f"`{s}`" for s in t["resolved"])]
    if t["shared_causes"]:
        lines += ["", "## One cause, several signatures", ""]
        for cause, sigs in t["shared_causes"].items():
            lines.append(f"- {cause}: " + ", ".join(f"`{s}`" for s in sigs))
    return "\n".join(lines) + "\n"
