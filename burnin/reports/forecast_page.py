"""The forecast's console table, plot and page (`burnin forecast`; the model is burnin/reports/forecast.py)."""

from __future__ import annotations

import html
import io
import os
from pathlib import Path
from typing import Any

from burnin.errors import UserError, oneline
from burnin.reports.forecast import TIERS, evaluate, kind as policy_kind

__all__ = ["render_text", "plot_svg", "render_html", "write_html"]


def _pct(g: float) -> str:
    return f"{100 * g:.2f} %"


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms" if s < 0.1 else f"{s:.2f} s"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size * (2 if unit != "min" else 1):
            return f"{s / size:.1f} {unit}"
    return f"{s:.1f} s"


def _gpus(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


def _interval(p: dict[str, Any]) -> str:
    if p["interval_s"] is None:
        return "none needed"
    return f"{_dur(p['interval_s'])} ({p['interval_steps']:,.0f} steps)"


def _snapshots(p: dict[str, Any]) -> str:
    k = p["snapshot_every_steps"]
    return "-" if k is None else f"every {k:,} step{'s' if k > 1 else ''}"


_PHASE_WORDS = {"detection_s": "detection", "teardown_s": "teardown", "restart_s": "restart",
                "checkpoint_load_s": "load", "first_step_s": "first step"}


def _recoveries(tiers: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each recovery kind once (tiers share them), in the order the tiers name them."""
    seen: dict[str, dict[str, Any]] = {}
    for t in tiers.values():
        for kind, r in t["recovery"].items():
            seen.setdefault(kind, r)
    return list(seen.items())


def render_text(f: dict[str, Any]) -> str:
    """The console report: goodput and the best intervals per tier and GPU count, then the inputs and where
    each came from."""
    fm, src, inp = f["failure_model"], f["source"], f["inputs"]
    head = ["".ljust(21)] + [f"{_gpus(n) + ' GPUs':>22}" for n in f["gpus"]]
    tiers = f["tiers"]
    lines = [f"Forecast for {src['kind']} {oneline(src['scenario'])} ({oneline(src['path'])})",
             f"failure model {oneline(fm['name'])}: {fm['total']} interruptions in {fm['days']:g} days on "
             f"{fm['gpus']:,} GPUs; {100 * fm['share_by_scope']['machine']:.0f} % take a machine out of the job",
             "", "goodput: expected share of wall time spent on training that is kept", "  ".join(head)]
    for name, t in tiers.items():
        lines.append("  ".join([(name + ("" if t["how"] == "measured" else " *")).ljust(21)]
                               + [f"{_pct(p['goodput']):>22}" for p in t["points"]]))
    lines += ["", "best checkpoint interval (Daly's), and in steps", "  ".join(head)]
    for name, t in tiers.items():
        lines.append("  ".join([name.ljust(21)] + [f"{_interval(p):>22}" for p in t["points"]]))
    lines.append("  ".join(["in-memory snapshot".ljust(21)]
                           + [f"{_snapshots(p):>22}" for p in tiers["in-memory snapshots"]["points"]]))
    lines.append("  ".join(["between interruptions".ljust(21)]
                           + [f"{_dur(p['mtbf_s']):>22}" for p in tiers["warm spares"]["points"]]))
    mem, warm = tiers["in-memory snapshots"]["points"], tiers["warm spares"]["points"]
    same = [_gpus(p["gpus"]) for p, q in zip(mem, warm) if p["goodput"] < q["goodput"] + 5e-5]
    if same:
        lines.append(f"(at {', '.join(same)} GPUs in-memory snapshots gain nothing over warm spares: a checkpoint "
                     f"costs {_dur(inp['checkpoint_s']['value'])}, cheap enough to take often)")
    lines += ["", "inputs (measured: from the input; given: a flag; assumed: a stand-in, with its reason)"]
    for key, label in (("checkpoint_s", "checkpoint cost"), ("step_s", "step time"),
                       ("snapshot_s", "snapshot cost")):
        v = inp[key]
        lines.append(f"  {label}: {_dur(v['value'])}, {v['how']}: {v['where']}")
    lines.append(f"  restarts measured: {src['restarts']} ("
                 + ", ".join(f"{n} {k}" for k, n in src["restarts_by_kind"].items()) + ")")
    for kind, r in _recoveries(tiers):
        parts = " + ".join(f"{_PHASE_WORDS[p]} {_dur(v['value'])}" for p, v in r["phases"].items())
        lost = (f"; {r['lost_steps']['value']:.2g} steps lost beyond the snapshot interval"
                if r["lost_steps"] else "")
        lines.append(f"  recovery, {kind}: {_dur(r['downtime_s'])}, {r['how']} ({parts}){lost}")
        for p, v in r["phases"].items():
            if v["how"] != "measured":
                lines.append(f"      {_PHASE_WORDS[p]}: {v['where']}")
    if any(t["how"] != "measured" for t in tiers.values()):
        lines.append("  * a part of this tier's recovery was not measured by the input: assumed as stated")
    lines.append(f"  failure model: {oneline(fm['source'])}")
    return "\n".join(lines)


_COLORS = {"disk restart": "#c0392b", "warm spares": "#2e86c1", "in-memory snapshots": "#229954"}


def plot_svg(f: dict[str, Any]) -> str:
    """Goodput against GPU count (log x), a line per tier, as an SVG element (matplotlib, no display)."""
    from matplotlib import rc_context  # lazy: matplotlib, only when a page is drawn
    from matplotlib.figure import Figure  # lazy: matplotlib, only when a page is drawn
    from matplotlib.ticker import FuncFormatter  # lazy: matplotlib, only when a page is drawn

    lo, hi = min([1000, *f["gpus"]]), max([100000, *f["gpus"]])
    grid = sorted({*f["gpus"], *(round(lo * (hi / lo) ** (i / 80)) for i in range(81))})
    ckpt, step, snap = (f["inputs"][k]["value"] for k in ("checkpoint_s", "step_s", "snapshot_s"))
    rates = f["failure_model"]["per_gpu_s_by_scope"]
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "burnin-forecast", "font.size": 10}):
        fig = Figure(figsize=(7.5, 4.2))
        ax = fig.add_subplot()
        for name, t in f["tiers"].items():
            policy = TIERS[name]
            costs = {p: t["recovery"][policy_kind(p)]["cost_s"] for p in policy.values()}
            ys = [100 * evaluate(policy, costs, rates, n, ckpt, step, snap)["goodput"] for n in grid]
            ax.plot(grid, ys, color=_COLORS[name], label=name + ("" if t["how"] == "measured" else " (assumed)"))
            ax.plot([p["gpus"] for p in t["points"]], [100 * p["goodput"] for p in t["points"]], "o",
                    color=_COLORS[name])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"))
        ax.set_xlabel("GPUs in the job")
        ax.set_ylabel("goodput (% of wall time)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower left")
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def render_html(f: dict[str, Any], svg: str) -> str:
    """A self-contained page: the plot (inline SVG in the figure `forecast-plot`), the tables, the inputs,
    the failure model and its mapping to tiers, and the assumptions in words. Text from the input and
    the failure model is escaped."""
    e = html.escape
    fm, src, inp, tiers = f["failure_model"], f["source"], f["inputs"], f["tiers"]

    def row(head: str, cells: list[str]) -> str:
        return f"<tr><th>{head}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"

    gh = "".join(f"<th>{_gpus(n)} GPUs</th>" for n in f["gpus"])
    good = "".join(row(e(n) + ("" if t["how"] == "measured" else " (assumed)"), [_pct(p["goodput"]) for p in t["points"]])
                   for n, t in tiers.items())
    good += row("mean time between interruptions", [e(_dur(p["mtbf_s"])) for p in tiers["warm spares"]["points"]])
    ivl = "".join(row(e(n), [f"{e(_interval(p))}<br><small>Young: {e(_dur(p['interval_young_s']))}</small>"
                             for p in t["points"]]) for n, t in tiers.items())
    ivl += row("in-memory snapshot", [e(_snapshots(p)) for p in tiers["in-memory snapshots"]["points"]])
    rows = [row(label, [e(_dur(inp[k]["value"])), e(inp[k]["how"]), e(inp[k]["where"])])
            for k, label in (("checkpoint_s", "checkpoint cost δ"), ("step_s", "step time"),
                             ("snapshot_s", "snapshot cost δ<sub>m</sub>"))]
    for kind, r in _recoveries(tiers):
        rows.append(row(f"recovery, {e(kind)}", [f"<b>{e(_dur(r['downtime_s']))}</b>", e(r["how"]),
                                                 "the sum of:"]))
        rows += [row(f"&nbsp;&nbsp;{_PHASE_WORDS[p]}", [e(_dur(v["value"])), e(v["how"]), e(v["where"])])
                 for p, v in r["phases"].items()]
        if r["lost_steps"]:
            v = r["lost_steps"]
            rows.append(row("&nbsp;&nbsp;lost steps", [f"{v['value']:.3g}", e(v["how"]), e(v["where"])]))
    tier_list = "".join(f"<li><b>{e(n)}</b>: {e(t['what'])}.</li>" for n, t in tiers.items())
    cats = "".join(row(e(c["name"]), [e(c["group"]), str(c["count"]), f"{100 * c['count'] / fm['total']:.1f} %",
                                      e(c["scope"]), "disk" if c["scope"] == "machine" else "memory", e(c["why"])])
                   for c in fm["categories"])
    url = f' (<a href="{e(fm["url"])}">{e(fm["url"])}</a>)' if fm.get("url") else ""
    planned = f" {fm['planned']} planned interruptions in the same time are not counted." if fm.get("planned") else ""
    assumptions = "".join(f"<li>{e(a)}</li>" for a in f["assumptions"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>burnin forecast: {e(src['scenario'])}</title>
<style>body{{font:14px/1.45 system-ui,sans-serif;max-width:62em;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}}thead th{{background:#f3f3f3}}figure{{margin:1em 0}}
svg{{max-width:100%;height:auto}}code{{background:#f3f3f3;padding:0 .2em}}</style></head><body>
<h1>Goodput forecast: {e(src['scenario'])}</h1>
<p>What the recovery burnin measured in <code>{e(src['path'])}</code> (a {e(src['kind'])}, {src['restarts']}
restarts) would be worth on larger jobs, under the failure model <b>{e(fm['name'])}</b>: {e(fm['title'])}.
Goodput is the expected share of wall time spent on training that is kept.</p>
<figure id="forecast-plot">{svg}<figcaption>Expected goodput against the GPU count of the job, a line per recovery
tier, each at its best checkpoint (and snapshot) interval; dots at the counts in the tables.</figcaption></figure>
<h2>Goodput</h2><table><thead><tr><th>tier</th>{gh}</tr></thead><tbody>{good}</tbody></table>
<h2>Best intervals</h2><p>Daly's optimum checkpoint interval for the interruptions each tier resumes from disk
(Young's first-order one below it), in time and in steps; for the in-memory tier, the best whole number of steps
between snapshots.</p>
<table><thead><tr><th>tier</th>{gh}</tr></thead><tbody>{ivl}</tbody></table>
<h2>Recovery tiers</h2><ul>{tier_list}</ul>
<h2>Inputs</h2><p><i>measured</i>: from the input directory; <i>given</i>: a flag; <i>assumed</i>: a stand-in,
with its reason. A tier is measured when every part of its recovery is. Restarts measured: {src['restarts']}
({e(", ".join(f"{n} {k}" for k, n in src["restarts_by_kind"].items()))}).</p>
<table><thead><tr><th>input</th><th>value</th><th>how</th><th>where from</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<h2>Failure model</h2><p>{e(fm['source'])}{url}: {fm['total']} unexpected interruptions in {fm['days']:g} days on
{fm['gpus']:,} GPUs, {fm['per_gpu_hour']:.3g} per GPU-hour, one every {e(_dur(fm['mtbf_observed_s']))} at that
size.{planned} Scope <i>machine</i>: a machine, or a GPU of it, leaves the job; its ranks move to another machine
and its in-memory snapshots are out of reach, so every tier resumes it from disk. Scope <i>process</i>: the
machines stay up; the in-memory tier resumes it from the snapshot.</p>
<table><thead><tr><th>cause</th><th>group</th><th>count</th><th>share</th><th>scope</th>
<th>in-memory tier resumes from</th><th>why this scope</th></tr></thead><tbody>{cats}</tbody></table>
<h2>The model</h2>
<p>Interruptions arrive at rate λ = N × the per-GPU rate, summed over causes. Those a tier resumes from disk
(rate λ<sub>d</sub>, mean time between them M = 1/λ<sub>d</sub>) each cost the recovery time R and the work since
the newest checkpoint. With a checkpoint of cost δ after every τ of work, the share of wall time that is useful is
U(τ, δ, R, M) = τ / (M e<sup>R/M</sup> (e<sup>(τ+δ)/M</sup> − 1)) (Daly 2006, exact for exponential failures that
may also strike during checkpoints and restarts; to first order 1 − δ/τ − (R + τ/2)/M: half an interval lost per
failure). τ is Daly's optimum, τ = √(2δM) [1 + ⅓ √(δ/2M) + ⅑ δ/2M] − δ (τ = M when δ ≥ 2M); Young's first-order
τ = √(2δM) (Young 1974) is shown beside it.</p>
<p>The in-memory tier is a second level of the same model (as in multi-level checkpointing, Moody et al. 2010):
interruptions it resumes from memory (rate λ<sub>m</sub>) each cost R<sub>m</sub> (plus any completed steps the
input's resumes lost beyond the snapshot interval) and the work since the newest snapshot; a snapshot of cost
δ<sub>m</sub> every k steps gives U(k × step, δ<sub>m</sub>, R<sub>m</sub>, 1/λ<sub>m</sub>), at the best whole k.
Goodput is the product of the two levels' U: to first order their wastes add.</p>
<h2>Assumptions</h2><ul>{assumptions}</ul>
</body></html>
"""


def write_html(path: Path, text: str) -> None:
    """Write the page atomically (a temporary file beside it, renamed over it); a one-line UserError
    naming --out when it cannot be written."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise UserError(f"--out: cannot write {oneline(path)} ({exc.strerror or exc}); give --out FILE in a "
                        "writable directory") from None
