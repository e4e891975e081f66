"""A fleet burn-in's verdict: one burn-in per node, judged together.

A fleet directory holds `nodes/<name>/`, one per node: `node.json` (the node's name, its hardware class,
where its burn-in's run directory is, how it ended) beside that run directory. `judge_fleet` reads them
(and nothing else: what a local fleet planted lies in `sealed/`, which it never opens) and decides per node:

- **Its own burn-in**: every injected fault recovered exactly, every rank's verdict (`burn_in.assess`).
- **Cross-node determinism quorum**: every node trains the same deterministic job from the same seed and
  recovers bit for bit, so within one hardware class (CPU or GPU model, torch, the job) every node's
  per-step loss on every rank must be the same bits whatever faults each one took. Step by step the
  majority wins; a node outvoted is an SDC suspect, with the first step and ranks where it parted; where no
  strict majority exists the nodes that differ are `ambiguous`, never guessed.
- **Speed against the class**: each node's mean step time per roll-up period against the median of the
  other nodes of its class in the same period; slow only when persistent and significant
  (`burnin.reports.outliers`). How much of its ranks' compute was spent waiting for a CPU is reported beside
  it: something else running on the node, or a CPU limit.

Verdicts: `faulty` (an SDC suspect, a failed recovery, a faulty rank, a node whose burn-in did not finish),
`degraded` (slow, a degraded rank, an ambiguous quorum), else `healthy`, each with its reasons. The same
directory judged twice gives the same verdicts: nothing here is random or read from the clock.
"""

from __future__ import annotations

import html
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from burnin.core.events import read_events
from burnin.core.files import atomic_write_text
from burnin.reports.outliers import MIN_PERIODS, MIN_SAMPLES, persistent_outliers, slow_samples
from burnin.reports.writers import junit_xml

__all__ = ["SCHEMA_VERSION", "THRESHOLDS", "judge_fleet", "load_node", "quorum", "write_fleet_reports",
           "read_fingerprints", "VERDICTS"]

SCHEMA_VERSION = 1
VERDICTS = ("healthy", "degraded", "faulty")

#: A node is slow when its step time is this many times its class's median in most periods, at p < significance.
THRESHOLDS = {"slow_ratio": 1.05, "significance": 0.01, "min_periods": MIN_PERIODS, "min_steps_per_period": 5,
              "slow_checkpoint_ratio": 1.5, "slow_recovery_ratio": 1.5, "min_samples": MIN_SAMPLES, "top_k": 3}


# -- reading a node ----------------------------------------------------------------------------------

def read_fingerprints(path: Path) -> dict[tuple[int, int], str]:
    """(step, rank) -> `loss/grad`: the loss bits and the bit-sum of the rank's own gradients before the
    all-reduce, at the step's last execution (a burn-in's `fingerprints.txt`). The gradient names
    the rank where a corruption began: the loss can round it away, and after the all-reduce every rank holds
    it."""
    out: dict[tuple[int, int], str] = {}
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) in (3, 4) and parts[0].isdigit() and parts[1].isdigit():
            out[(int(parts[0]), int(parts[1]))] = "/".join(parts[2:])
    return out


def load_node(node_dir: Path, min_steps: int) -> dict[str, Any]:
    """What the verdict needs from one node's directory."""
    node = {"node": node_dir.name, "state": "unfinished", "class": None, "summary": None, "periods": {},
            "fingerprints": {}, "run_dir": None, "error": None}
    meta_path = node_dir / "node.json"
    if not meta_path.is_file():
        node["error"] = "its burn-in did not finish (no node.json)"
        return node
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        node["error"] = f"its node.json is unreadable ({' '.join(str(exc).split())[:120]})"
        return node
    node["class"] = meta.get("class")
    node["started_at"] = meta.get("started_at")
    if meta.get("error"):
        node["state"], node["error"] = "error", str(meta["error"])
        return node
    run_dir = node_dir / meta.get("run_dir", "")
    node["run_dir"] = str(run_dir)
    try:
        node["summary"] = json.loads((run_dir / "burn-in.json").read_text())
    except (OSError, ValueError):
        node["error"] = f"its burn-in left no readable burn-in.json in {run_dir.name}"
        return node
    node["state"] = "done"
    events = read_events(run_dir / "events.jsonl")
    rollups = [ev for ev in events if ev.get("event") == "burn_in_rollup" and "period" in ev]
    for ev in rollups[1:-1]:  # the first and the last period are cut short by the start and the end
        ranks = [x for x in ev["ranks"].values() if x["n"] >= min_steps and "mean_step_s" in x]
        if not ranks or len(ranks) < len(ev["ranks"]):
            continue
        node["periods"][ev["period"]] = ({
            # the mean time of the period's steps: not their median (under a CPU limit a step is throttled or
            # not, and the median jumps between the two), not the period over the step count (a count of 10
            # is 10 % off by one step)
            "step_s": statistics.median(x["mean_step_s"] for x in ranks),
            "compute_s": statistics.median(x["median_compute_s"] for x in ranks),
            "cpu_wait_s": statistics.median(x.get("median_cpu_wait_s", 0.0) for x in ranks)})
    node["checkpoints"] = [e["seconds"] for e in events if e.get("event") == "checkpoint_saved"
                           and e.get("seconds") is not None]
    node["checkpoint_s"] = _median(node["checkpoints"])
    node["recoveries"] = [f["recovery_s"] for f in node["summary"]["faults"]["list"] if f.get("recovery_s") is not None]
    node["fingerprints"] = read_fingerprints(run_dir / "fingerprints.txt")
    return node


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# -- the determinism quorum --------------------------------------------------------------------------

def quorum(fps: dict[str, dict[tuple[int, int], str]]) -> dict[str, dict[str, Any]]:
    """Compare the nodes of one class step by step. At each (step, rank) the nodes that ran it vote (a node
    slower than the others has fewer steps: it votes on those it has); a node outvoted by a strict majority
    is a `minority` from there on, and where the values differ with no strict majority the nodes that differ
    are `ambiguous`. Per node: `status` agrees / minority / ambiguous / alone, and where it parted, `step`,
    `ranks`, `votes`; `steps_compared`: the steps it was compared on with at least one other node."""
    names = sorted(fps)
    out: dict[str, dict[str, Any]] = {n: {"status": "agrees", "step": None, "ranks": [], "votes": None,
                                          "steps_compared": 0} for n in names}
    if len(names) < 2:
        for n in names:
            out[n]["status"] = "alone"
        return out
    by_step: dict[int, set[int]] = defaultdict(set)
    for f in fps.values():
        for s, r in f:
            by_step[s].add(r)
    active = set(names)
    for step in sorted(by_step):
        if len(active) < 2:
            break
        flagged: dict[str, tuple[str, list[int], str]] = {}
        compared: set[str] = set()
        for rank in sorted(by_step[step]):
            voters = sorted(n for n in active if (step, rank) in fps[n])
            if len(voters) < 2:
                continue
            compared.update(voters)
            votes = Counter(fps[n][(step, rank)] for n in voters)
            if len(votes) == 1:
                continue
            value, count = votes.most_common(1)[0]
            tie = count * 2 <= len(voters)
            for n in voters:
                mine = fps[n][(step, rank)]
                if not tie and mine == value:
                    continue
                status = "ambiguous" if tie else "minority"
                why = (f"{count} of {len(voters)} nodes agree, no strict majority" if tie
                       else f"{count} of {len(voters)} nodes hold {value}, this node {mine}")
                prev = flagged.get(n)
                flagged[n] = ((status if prev is None or prev[0] == status else "ambiguous"),
                              (prev[1] if prev else []) + [rank], prev[2] if prev else why)
        for n in compared:
            out[n]["steps_compared"] += 1
        for n, (status, ranks, why) in flagged.items():
            out[n].update(status=status, step=step, ranks=ranks, votes=why)
            active.discard(n)
    return out


# -- the verdict -------------------------------------------------------------------------------------

def _class_key(cls: dict[str, Any] | None) -> str:
    return json.dumps(cls or {}, sort_keys=True)


def judge_fleet(fleet_dir: str | Path, thresholds: dict[str, Any] | None = None,
                history: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    """The fleet's verdict from its directory (see the module's docstring); `history`: each node's record in
    earlier fleets (`history.node_record`), for the repeat offenders."""
    fleet_dir = Path(fleet_dir)
    th = {**THRESHOLDS, **(thresholds or {})}
    node_dirs = sorted(p for p in (fleet_dir / "nodes").iterdir() if p.is_dir()) if (fleet_dir / "nodes").is_dir() else []
    nodes = {p.name: load_node(p, th["min_steps_per_period"]) for p in node_dirs}
    classes: dict[str, list[str]] = defaultdict(list)
    for name, n in nodes.items():
        if n["state"] == "done":
            classes[_class_key(n["class"])].append(name)
    reasons: dict[str, list[tuple[str, str]]] = {name: [] for name in nodes}
    quorums: dict[str, dict[str, Any]] = {}
    speeds: dict[str, dict[str, Any]] = {}
    slow_ckpt: dict[str, dict[str, Any]] = {}
    slow_recovery: dict[str, dict[str, Any]] = {}
    for members in classes.values():
        slow_ckpt.update(slow_samples({m: nodes[m]["checkpoints"] for m in members}, th["slow_checkpoint_ratio"],
                                      th["significance"], th["min_samples"]))
        slow_recovery.update(slow_samples({m: nodes[m]["recoveries"] for m in members}, th["slow_recovery_ratio"],
                                          th["significance"], th["min_samples"]))
        quorums.update(quorum({m: nodes[m]["fingerprints"] for m in members}))
        # periods end on the same wall-clock instants on every node: compared index by index
        keys = sorted({k for m in members for k in nodes[m]["periods"]})
        table = {m: [nodes[m]["periods"][k]["step_s"] if k in nodes[m]["periods"] else None for k in keys]
                 for m in members}
        speeds.update(persistent_outliers(table, th["slow_ratio"], th["significance"], th["min_periods"]))
    out_nodes: dict[str, dict[str, Any]] = {}
    for name, n in sorted(nodes.items()):
        r = reasons[name]
        if n["state"] != "done":
            r.append(("faulty", f"no result: {n['error']}"))
        else:
            s = n["summary"]
            q = quorums.get(name, {"status": "alone"})
            if q["status"] == "minority":
                r.append(("faulty", f"SDC suspect: outvoted by the determinism quorum at step {q['step']} on rank(s) "
                                    f"{', '.join(map(str, q['ranks']))} ({q['votes']}; per-step loss and gradient bits)"))
            elif q["status"] == "ambiguous":
                r.append(("degraded", f"determinism quorum ambiguous at step {q['step']} on rank(s) "
                                      f"{', '.join(map(str, q['ranks']))} ({q['votes']}): cannot tell which node is "
                                      "wrong"))
            if s.get("error"):
                r.append(("faulty", f"its burn-in ended in an error: {s['error']}"))
            if not s["recovery"]["ok"]:
                bad = [f for f in s["faults"]["list"] if not f["ok"]]
                windows = [w for w in s["recovery"]["windows"] if not w["exact"]]
                r.append(("faulty", f"recovery: {len(bad)} fault(s) not recovered as expected"
                                    + (f" ({', '.join(sorted({f['outcome'] for f in bad}))})" if bad else "")
                                    + (f", {len(windows)} replayed window(s) not bit-exact" if windows else "")))
            for rank in s["health"]["ranks"]:
                if rank["verdict"] != "healthy":
                    r.append((rank["verdict"], f"rank {rank['rank']}: {'; '.join(rank['reasons'])}"))
            sp = speeds.get(name)
            if sp and sp["outlier"]:
                wait = _wait_share(n)
                r.append(("degraded", f"slow: step time {sp['score']:.2f}x its class's median in {sp['above']} of "
                                      f"{sp['periods']} periods (sign test p = {sp['p_value']:.2g}; thresholds "
                                      f"{th['slow_ratio']:.2f}x, p < {th['significance']:g})"
                                      + (f"; its ranks waited for a CPU {wait:.0%} of their compute time"
                                         if wait is not None else "")))
            for what, judged, key in (("checkpoint saves", slow_ckpt, "slow_checkpoint_ratio"),
                                      ("recoveries", slow_recovery, "slow_recovery_ratio")):
                j = judged.get(name)
                if j and j["outlier"]:
                    r.append(("degraded", f"slow {what}: median {j['ratio']:.2f}x the class's other nodes' over "
                                          f"{j['samples']} (Mann-Whitney p = {j['p_value']:.2g}; thresholds "
                                          f"{th[key]:.2f}x, p < {th['significance']:g})"))
        levels = [lvl for lvl, _ in r]
        verdict = "faulty" if "faulty" in levels else "degraded" if "degraded" in levels else "healthy"
        out_nodes[name] = _node_row(name, n, verdict, [txt for _, txt in r], quorums.get(name), speeds.get(name))
    # lemons: nodes ranked by findings; the share the top k hold; repeat offenders from the history
    ranking = sorted(out_nodes, key=lambda k: (-VERDICTS.index(out_nodes[k]["verdict"]),
                                               -len(out_nodes[k]["reasons"]), k))
    total = sum(len(x["reasons"]) for x in out_nodes.values())
    top = {str(k): (sum(len(out_nodes[m]["reasons"]) for m in ranking[:k]) / total if total else 0.0)
           for k in range(1, min(th["top_k"], len(ranking)) + 1)}
    history = history or {}
    repeat = sorted(name for name, rec in history.items()
                    if rec.get("not_healthy", 0) >= 1 and out_nodes.get(name, {}).get("verdict") != "healthy")
    for name, rec in history.items():
        if name in out_nodes:
            out_nodes[name]["history"] = rec
    counts = Counter(x["verdict"] for x in out_nodes.values())
    meta = fleet_meta(fleet_dir)
    return {"schema_version": SCHEMA_VERSION, "kind": "fleet", "fleet_id": meta.get("fleet_id") or fleet_dir.name,
            "fleet_dir": str(fleet_dir), "scenario": meta.get("scenario"), "seed": meta.get("seed"),
            "duration_s": meta.get("duration_s"), "started_at": meta.get("started_at"),
            "ok": bool(out_nodes) and counts.get("healthy", 0) == len(out_nodes),
            "counts": {v: counts.get(v, 0) for v in VERDICTS},
            "classes": [{"class": json.loads(k), "nodes": sorted(v)} for k, v in sorted(classes.items())],
            "nodes": out_nodes, "ranking": ranking,
            "concentration": {"findings": total, "top_k_share": top},
            "repeat_offenders": repeat, "thresholds": th,
            "method": {"quorum": "per-step loss bits of every rank, compared across the nodes of a class; the strict "
                                 "majority wins", "speed": "mean step time per roll-up period against the other "
                                 "nodes' median in that period; slow when at or above slow_ratio in most periods "
                                 "by a one-sided sign test at `significance`"}}


def _wait_share(n: dict[str, Any]) -> float | None:
    ps = [p for p in n["periods"].values() if p["compute_s"] > 0]
    return min(1.0, statistics.median(p["cpu_wait_s"] / p["compute_s"] for p in ps)) if ps else None


def fleet_meta(fleet_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((fleet_dir / "fleet-run.json").read_text())
    except (OSError, ValueError):
        return {}


def _node_row(name: str, n: dict[str, Any], verdict: str, reasons: list[str], q: dict[str, Any] | None,
              sp: dict[str, Any] | None) -> dict[str, Any]:
    s = n["summary"] or {}
    periods = list(n["periods"].values())
    recov = [f["recovery_s"] for f in s.get("faults", {}).get("list", []) if f.get("recovery_s") is not None]
    unexplained = s.get("health", {}).get("unexplained_failures", [])
    return {"node": name, "verdict": verdict, "reasons": reasons, "class": n["class"], "state": n["state"],
            "run_dir": n["run_dir"],
            "metrics": {"step_s": _median([p["step_s"] for p in periods]),
                        "compute_s": _median([p["compute_s"] for p in periods]),
                        "cpu_wait_share": _wait_share(n), "recovery_s": _median(recov),
                        "checkpoint_s": n.get("checkpoint_s"),
                        "faults": s.get("faults", {}).get("fired"),
                        "unexplained_failures": sum(g["count"] for g in unexplained),
                        "unexplained_by_signature": {g["signature"]: g["count"] for g in unexplained},
                        "goodput_steps": s.get("steps", {}).get("goodput_steps")},
            "quorum": q, "speed": sp,
            "ranks": [{"rank": r["rank"], "verdict": r["verdict"]} for r in s.get("health", {}).get("ranks", [])]}


# -- reports -----------------------------------------------------------------------------------------

METRICS = (("step_s", "step time"), ("compute_s", "compute"), ("cpu_wait_share", "CPU wait"),
           ("recovery_s", "recovery"), ("checkpoint_s", "checkpoint"), ("unexplained_failures", "unexplained failures"))


def write_fleet_reports(fleet: dict[str, Any], fleet_dir: str | Path) -> None:
    """fleet.json, fleet.md, fleet.html (a node x metric heat map, the ranking), results-summary.jsonl (a line
    per node, SuperBench's shape: `node` and `benchmark/metric` keys), junit.xml (a testcase per node) and
    metrics.prom (`burnin_node_health{node}`)."""
    d = Path(fleet_dir)
    atomic_write_text(d / "fleet.json", json.dumps(fleet, indent=1, sort_keys=True))
    atomic_write_text(d / "fleet.md", _markdown(fleet))
    atomic_write_text(d / "fleet.html", _html(fleet))
    lines = []
    for name, n in sorted(fleet["nodes"].items()):
        m, q = n["metrics"], n["quorum"] or {}
        row = {"node": name, "verdict": n["verdict"]}
        row.update({f"burnin/{k}": m[k] for k in ("step_s", "compute_s", "cpu_wait_share", "recovery_s",
                                                   "checkpoint_s", "unexplained_failures", "goodput_steps")})
        row["burnin/sdc_first_divergent_step"] = q.get("step")
        lines.append(json.dumps(row, sort_keys=True))
    atomic_write_text(d / "results-summary.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    cases = [(f"node {name}", n["verdict"] == "healthy", f"{n['verdict']}: {'; '.join(n['reasons'])}")
             for name, n in sorted(fleet["nodes"].items())]
    atomic_write_text(d / "junit.xml", junit_xml(f"fleet {fleet['fleet_id']}", cases, wall_s=0.0,
                                                 started_at=fleet.get("started_at") or 0.0,
                                                 properties={"scenario": fleet.get("scenario") or "",
                                                             "seed": fleet.get("seed")}))
    registry = node_metrics(fleet)
    write_to_textfile(str(d / "metrics.prom"), registry)


def node_metrics(fleet: dict[str, Any], only: str | None = None) -> Any:
    """A registry with each node's health (0 healthy, 1 degraded, 2 faulty) and step time (`only`: one node's,
    for a push grouped by node)."""
    reg = CollectorRegistry()
    health = Gauge("burnin_node_health", "A fleet burn-in's verdict per node: 0 healthy, 1 degraded, 2 faulty.",
                   ["node"], registry=reg)
    step = Gauge("burnin_node_step_seconds", "A node's step time in a fleet burn-in (the median of its periods' "
                 "means).", ["node"], registry=reg)
    for name, n in sorted(fleet["nodes"].items()):
        if only is not None and name != only:
            continue
        health.labels(node=name).set(VERDICTS.index(n["verdict"]))
        if n["metrics"]["step_s"] is not None:
            step.labels(node=name).set(n["metrics"]["step_s"])
    if only is None:
        nodes = Gauge("burnin_fleet_nodes", "Nodes of a fleet burn-in by verdict.", ["verdict"], registry=reg)
        for v in VERDICTS:
            nodes.labels(verdict=v).set(fleet["counts"][v])
    return reg


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "–"
    if key == "cpu_wait_share":
        return f"{v:.0%}"
    if key in ("step_s", "compute_s", "checkpoint_s"):
        return f"{v * 1000:.1f} ms"
    if key == "recovery_s":
        return f"{v:.2f} s"
    return str(v)


def _markdown(fleet: dict[str, Any]) -> str:
    th = {**THRESHOLDS, **fleet["thresholds"]}  # a fleet.json from before a threshold existed renders too
    c = fleet["counts"]
    lines = [f"# Fleet burn-in {fleet['fleet_id']}", "",
             f"Scenario {fleet.get('scenario')}, seed {fleet.get('seed')}, {len(fleet['nodes'])} node(s): "
             f"{c['healthy']} healthy, {c['degraded']} degraded, {c['faulty']} faulty. "
             f"**{'PASS' if fleet['ok'] else 'FAIL'}**", "",
             "| node | verdict | " + " | ".join(label for _, label in METRICS) + " | quorum | reasons |",
             "|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for name in fleet["ranking"]:
        n = fleet["nodes"][name]
        q = n["quorum"] or {}
        qtxt = q.get("status", "–") + (f" (step {q['step']})" if q.get("step") is not None else "")
        lines.append(f"| {name} | {n['verdict']} | " + " | ".join(_fmt(k, n["metrics"][k]) for k, _ in METRICS)
                     + f" | {qtxt} | {'; '.join(n['reasons']) or '–'} |")
    share = ", ".join(f"top {k}: {v:.0%}" for k, v in fleet["concentration"]["top_k_share"].items())
    lines += ["", f"Findings: {fleet['concentration']['findings']} in all ({share or 'none'}). Repeat offenders "
                  f"(not healthy in an earlier fleet and now): {', '.join(fleet['repeat_offenders']) or 'none'}.", "",
              f"Thresholds: slow at {th['slow_ratio']}x the class's median of mean step times in most periods, p < "
              f"{th['significance']} (one-sided sign test, at least {th['min_periods']} periods of "
              f"{th['min_steps_per_period']}+ steps); slow checkpoint saves or recoveries at {th['slow_checkpoint_ratio']}x / "
              f"{th['slow_recovery_ratio']}x the other nodes' (Mann-Whitney, p < {th['significance']}, at least "
              f"{th['min_samples']} of them); quorum: the strict majority of a class's nodes, per step and rank, on "
              "the loss and gradient bits.", ""]
    for cls in fleet["classes"]:
        lines.append(f"- class {json.dumps(cls['class'], sort_keys=True)}: {', '.join(cls['nodes'])}")
    return "\n".join(lines) + "\n"


def _html(fleet: dict[str, Any]) -> str:
    """One page: the verdicts, a node x metric heat map (each cell shaded by its ratio to the fleet's median
    of that metric), the reasons."""
    e = html.escape
    colors = {"healthy": "#2e7d32", "degraded": "#ef6c00", "faulty": "#c62828"}
    medians = {}
    for key, _ in METRICS:
        xs = [n["metrics"][key] for n in fleet["nodes"].values() if n["metrics"][key] is not None]
        medians[key] = statistics.median(xs) if xs else None
    rows = []
    for name in fleet["ranking"]:
        n = fleet["nodes"][name]
        cells = []
        for key, _ in METRICS:
            v, med = n["metrics"][key], medians[key]
            if v is None:
                shade = "#eee"
            else:
                ratio = (v / med) if med else (1.0 if not v else 2.0)
                heat = max(0.0, min(1.0, (ratio - 1.0) / 0.5))
                shade = f"rgba(198, 40, 40, {heat:.2f})"
            cells.append(f'<td style="background:{shade}" title="{e(str(v))}">{e(_fmt(key, v))}</td>')
        q = n.get("quorum") or {}
        qtxt = q.get("status", "–") + (f" (step {q['step']})" if q.get("step") is not None else "")
        rows.append(f'<tr data-node="{e(name)}" data-verdict="{e(n["verdict"])}"><th>{e(name)}</th>'
                    f'<td style="color:{colors[n["verdict"]]};font-weight:bold">{e(n["verdict"])}</td>'
                    f'{"".join(cells)}<td>{e(qtxt)}</td><td>{e("; ".join(n["reasons"]) or "–")}</td></tr>')
    head = "".join(f"<th>{e(label)}</th>" for _, label in METRICS) + "<th>quorum</th>"
    c = fleet["counts"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Fleet burn-in {e(fleet['fleet_id'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head>
<body><h1>Fleet burn-in {e(fleet['fleet_id'])}</h1>
<p id="summary">{'PASS' if fleet['ok'] else 'FAIL'}: {c['healthy']} healthy, {c['degraded']} degraded,
{c['faulty']} faulty (scenario {e(str(fleet.get('scenario')))}, seed {e(str(fleet.get('seed')))})</p>
<h2>Nodes by findings</h2>
<p>Each cell is shaded by its ratio to the fleet's median of that metric (white: at or below it; full red: 1.5x
or more).</p>
<table id="heatmap"><tr><th>node</th><th>verdict</th>{head}<th>reasons</th></tr>
{''.join(rows)}</table>
</body></html>
"""
