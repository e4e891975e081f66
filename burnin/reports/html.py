"""report.html: one self-contained page per run, campaign, burn-in or comparison.

A small static page: a header with PASS/FAIL and the key figures, the tables a person reads first
(expectations, faults with their outcomes and recovery breakdowns, failures), then the plots
(`burnin.reports.plots`, inline SVG). No script, no stylesheet or font from anywhere: the page opens
from a CI artefact store or an air-gapped machine as it is. Every string that comes from a scenario,
a rank or an error message is escaped.

A plot that cannot be drawn leaves a note in its place and the rest of the page stands; the writers
call this module last, after the JSON, JUnit and Markdown reports, so nothing else depends on it.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any, Callable

from burnin.core.events import read_events
from burnin.core.files import atomic_write_text
from burnin.reports import plots
from burnin.reports.effects import EFFECTS
from burnin.reports.plots import OUTCOME_COLORS, PHASE_COLORS, PHASES
from burnin.reports.result import is_simulated, passed
from burnin.reports.verdict import exactness, judge_burn_in
from burnin.scenarios.schema import TRIAL_OUTCOMES

__all__ = ["write_run_report", "write_campaign_report", "write_burn_in_report", "write_compare_report",
           "run_page", "campaign_page", "burn_in_page", "compare_page", "rebuild"]

REPORT = "report.html"

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1d1f23;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1140px;margin:0 auto;padding:22px 30px 48px;background:#fff;min-height:100vh}
h1{font-size:25px;margin:0 0 2px;display:flex;align-items:center;gap:12px;flex-wrap:wrap}
h2{font-size:18px;margin:30px 0 8px;padding-bottom:4px;border-bottom:1px solid #e3e5e8}
p{margin:6px 0}
.verdict{display:inline-block;padding:2px 12px;border-radius:6px;color:#fff;font-size:18px;font-weight:700;letter-spacing:.05em}
.verdict.pass{background:#009E73}.verdict.fail{background:#D55E00}
.sub{color:#555;font-size:13.5px}
.kpis{display:grid;grid-template-columns:repeat(auto-fill,minmax(165px,1fr));gap:10px;margin:16px 0 6px}
.kpi{border:1px solid #e3e5e8;border-radius:8px;padding:8px 12px;background:#fbfbfc}
.kpi b{display:block;font-size:19px;font-variant-numeric:tabular-nums}
.kpi span{color:#555;font-size:12.5px}
.scroll{overflow-x:auto;margin:6px 0 14px}
table{border-collapse:collapse;width:100%;font-size:13.5px}
th,td{padding:5px 8px;border-bottom:1px solid #e6e8eb;text-align:left;vertical-align:top}
th{background:#f2f4f6;font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.badge{display:inline-block;padding:0 8px;border-radius:10px;font-size:12.5px;font-weight:600;white-space:nowrap}
.ok{color:#006B4F;font-weight:600}.bad{color:#B34700;font-weight:700}
.banner{padding:8px 12px;border-radius:6px;margin:10px 0}
.banner.warn{background:#FFF4D6;border:1px solid #E69F00}
.banner.error{background:#FDEBE3;border:1px solid #D55E00}
figure{margin:18px 0 26px}
figure svg.plot{width:100%;height:auto;display:block}
figcaption{font-size:13px;color:#444;margin-top:6px}
figcaption ul{margin:4px 0 0;padding-left:18px}
.plot-error{border:1px dashed #D55E00;border-radius:6px;padding:14px;color:#8A3300;background:#FFF6F0}
.phases{display:flex;height:9px;width:150px;border-radius:2px;overflow:hidden;background:#f0f0f0;margin:3px 0 2px}
.phases i{display:block;height:100%}
.small{font-size:12px;color:#555}
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 10px;vertical-align:-1px}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f2f4f6;padding:0 3px;border-radius:3px;word-break:break-all}
details summary{cursor:pointer;color:#0072B2;margin:4px 0}
footer{margin-top:34px;font-size:12.5px;color:#666}
footer a{color:#0072B2}
"""

#: outcome -> (background, text)
_OUTCOME_STYLE = {"recovered": ("#009E73", "#fff"), "masked": ("#8C8C8C", "#fff"), "detected": ("#E69F00", "#000"),
                  "sdc": ("#D55E00", "#fff"), "failed": ("#000000", "#fff"), "unverified": ("#CC79A7", "#000"),
                  "healthy": ("#009E73", "#fff"), "degraded": ("#E69F00", "#000"), "faulty": ("#D55E00", "#fff"),
                  "better": ("#009E73", "#fff"), "worse": ("#D55E00", "#fff"), "same": ("#0072B2", "#fff"),
                  "different": ("#CC79A7", "#000"), "not comparable": ("#8C8C8C", "#fff")}
_PHASE_LABELS = {"detection": "detection", "teardown": "teardown", "restart": "restart",
                 "checkpoint_load": "checkpoint load", "first_step": "first step"}


# -- small pieces ----------------------------------------------------------------------------------

class _Raw(str):
    """Markup this module built itself: not escaped again."""


def _e(value: Any) -> str:
    if isinstance(value, _Raw):
        return value
    return escape("–" if value is None else str(value), quote=True)


def _num(value: Any, fmt: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–" if value is None else str(value)
    return format(value, fmt) if isinstance(value, float) else str(value)


def _badge(word: str) -> _Raw:
    bg, fg = _OUTCOME_STYLE.get(word, ("#555555", "#fff"))
    return _Raw(f'<span class="badge" style="background:{bg};color:{fg}">{_e(word)}</span>')


def _verdict(ok: bool) -> _Raw:
    word = "PASS" if ok else "FAIL"
    return _Raw(f'<span id="verdict" class="verdict {word.lower()}" data-verdict="{word}">{word}</span>')


def _kpis(items: list[tuple[str, Any]]) -> str:
    cells = "".join(f'<div class="kpi"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in items)
    return f'<section id="key-figures" class="kpis">{cells}</section>'


def _table(tid: str, header: list[str], rows: list[list[Any]], *, num: set[int] = frozenset(),
           row_attrs: list[str] | None = None) -> str:
    head = "".join(f'<th{" class=num" if i in num else ""}>{_e(h)}</th>' for i, h in enumerate(header))
    body = []
    for k, row in enumerate(rows):
        attrs = f" {row_attrs[k]}" if row_attrs else ""
        cells = "".join(f'<td{" class=num" if i in num else ""}>{_e(v)}</td>' for i, v in enumerate(row))
        body.append(f"<tr{attrs}>{cells}</tr>")
    return (f'<div class="scroll"><table id="{tid}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


def _plot(draw: Callable[[], str]) -> tuple[str, bool]:
    """The plot's SVG, or a note saying why it could not be drawn (the page is written all the same)."""
    try:
        return draw(), True
    except Exception as exc:  # a plot is never worth the page
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        return (f'<div class="plot-error">This plot could not be drawn ({_e(reason)}). The tables above and the '
                f"other reports are complete.</div>"), False


def _wrap(fid: str, inner: str, ok: bool, caption: str, attrs: str = "") -> str:
    cls = "" if ok else ' class="plot-failed"'
    return f'<figure id="{fid}"{cls}{attrs}>{inner}<figcaption>{caption}</figcaption></figure>'


def _figure(fid: str, caption: str, draw: Callable[[], str], attrs: str = "") -> str:
    inner, ok = _plot(draw)
    return _wrap(fid, inner, ok, caption, attrs)


def _page(title: str, body: str, files: list[tuple[str, str]] = ()) -> str:
    links = " · ".join(f'<a href="{_e(href)}">{_e(label)}</a>' for href, label in files)
    foot = f"<footer>{'Files: ' + links if links else ''}<br>Written by burnin; self-contained, open it anywhere.</footer>"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body><main>\n{body}\n{foot}\n</main></body></html>\n")


def _files(run_dir: Path, names: list[str]) -> list[tuple[str, str]]:
    return [(n, n) for n in names if (run_dir / n).exists()]


def _utc(t: float | None) -> str:
    if not t:
        return "–"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _write(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    return read_events(path) if path.exists() else []


def _phase_bar(rec: dict[str, Any], scale: float) -> _Raw:
    """A recovery breakdown as a small stacked bar (its width: the total against the slowest shown) and numbers."""
    total = rec.get("total_s") or sum(rec.get(f"{p}_s") or 0 for p in PHASES)
    segs = "".join(f'<i style="width:{100 * (rec.get(f"{p}_s") or 0) / total if total else 0:.2f}%;'
                   f'background:{PHASE_COLORS[p]}" title="{_PHASE_LABELS[p]} {rec.get(f"{p}_s") or 0:.3f} s"></i>'
                   for p in PHASES)
    width = max(8.0, 150 * total / scale) if scale else 150
    nums = " + ".join(f"{rec.get(f'{p}_s') or 0:.2f}" for p in PHASES)
    named = "; ".join(f"{_PHASE_LABELS[p]} {rec.get(f'{p}_s') or 0:.3f} s" for p in PHASES)
    return _Raw(f'<b>{total:.2f} s</b><div class="phases" style="width:{width:.0f}px">{segs}</div>'
                f'<span class="small" style="white-space:nowrap" title="{_e(named)}">{_e(nums)}</span>')


def _phase_legend() -> str:
    return ('<p class="small legend">Recovery phases, in this order:' +
            "".join(f'<i style="background:{PHASE_COLORS[p]}"></i>{_PHASE_LABELS[p]}' for p in PHASES) + "</p>")


# -- a run -----------------------------------------------------------------------------------------

def _fault_params(scenario: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    faults = (scenario or {}).get("faults") or []
    return {i: dict(f.get("params") or {}) for i, f in enumerate(faults) if isinstance(f, dict)}


def run_page(result: Any, *, events: list[dict[str, Any]], golden: Any = None,
             scenario: dict[str, Any] | None = None, files: list[tuple[str, str]] = ()) -> str:
    """The page of one run: verdict, key figures, expectations, faults, failures, loss and timeline plots."""
    ok = passed(result)
    desc = (scenario or {}).get("description") or ""
    outcomes: dict[str, int] = {}
    for f in result.faults:
        outcomes[f.outcome] = outcomes.get(f.outcome, 0) + 1
    totals = [f.recovery.total_s for f in result.faults if f.recovery is not None]
    injected = sum(f.injected for f in result.faults)
    body = [f"<header><h1>{_verdict(ok)} <span>burnin · {_e(result.scenario)}</span></h1>"]
    if desc:
        body.append(f'<p id="description">{_e(desc)}</p>')
    body.append(f'<p class="sub">run <code>{_e(result.run_id)}</code> · started {_e(_utc(result.started_at))} · '
                f"{_e(result.ranks)} ranks on {_e(result.device)} · config <code>{_e(result.config_hash)}</code></p>")
    if is_simulated(result):
        sims = ", ".join(f"fault[{f.index}] {f.fault}" for f in result.faults if f.simulated)
        body.append(f'<div class="banner warn"><b>simulated</b>: some faults in this run were simulated, not real'
                    f"{': ' + _e(sims) if sims else ''}.</div>")
    if result.error:
        body.append(f'<div class="banner error"><b>harness error</b>: {_e(result.error)}</div>')
    exact = "exact" if result.exact else ("within tolerance" if result.matched else "differs")
    body.append(_kpis([
        ("faults injected (of scheduled)", f"{injected} of {len(result.faults)}"),
        ("outcomes", ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())) or "none"),
        ("final state vs golden run", exact if result.golden_state_hash else "no golden run"),
        ("restarts" + (" · rollbacks" if result.rollbacks else ""),
         f"{result.restarts}" + (f" · {result.rollbacks}" if result.rollbacks else "")),
        ("recovery, slowest", f"{max(totals):.2f} s" if totals else "–"),
        ("steps completed by every rank", f"{result.final_step + 1 if result.final_step is not None else 0} of "
                                          f"{result.steps}"),
        ("step executions (rank 0, replays included)", result.steps_executed),
        ("final loss (floor)", f"{result.final_loss:.3f} ({result.loss_floor:.3f})"
         if _finite(result.final_loss) and _finite(result.loss_floor) else _num(result.final_loss, ".3f")),
        ("wall time", f"{result.wall_s:.1f} s"),
    ]))
    body.append(f'<p id="exactness" class="sub">{_e(exactness(result).replace("**", "").replace("`", ""))}</p>')
    body.append("</header>")

    body.append("<h2>Expectations</h2>")
    rows = [[_Raw(f'<span class="{"ok" if e.ok else "bad"}">{"PASS" if e.ok else "FAIL"}</span>'), e.name, e.message]
            for e in result.expectations]
    body.append(_table("expectations", ["", "expectation", "detail"], rows) if rows else "<p>No expectations.</p>")

    body.append("<h2>Faults</h2>")
    if result.faults:
        scale = max(totals) if totals else 0.0
        rows, attrs = [], []
        for f in result.faults:
            outcome = _Raw(_badge(f.outcome) + ("" if f.ok else ' <span class="bad">unexpected</span>')
                           + ("" if f.injected else ' <span class="small">never fired</span>')
                           + (' <span class="small">simulated</span>' if f.simulated else ""))
            rec = _phase_bar(f.recovery.to_dict(), scale) if f.recovery is not None else "–"
            resumed = "–"
            if f.recovery is not None:
                resumed = f"step {f.recovery.resumed_from_step}"
                if f.recovery.new_ranks:
                    resumed += f" ({f.recovery.new_ranks})"
            name = _Raw(f'{_e(f.fault)}<br><span class="small">{_e(f.point)}</span>')
            outcome = _Raw(outcome + f'<br><span class="small">expected {_e(" or ".join(f.expected))}</span>')
            seen = "–" if f.detected_by is None else _Raw(
                f"{_e(f.detected_by)}" + (f'<br><span class="small">after {f.detection_latency_s:.3f} s</span>'
                                          if f.detection_latency_s is not None else ""))
            rows.append([f.index, name, f.rank, f.step, outcome, seen, rec, f.lost_steps, resumed])
            attrs.append(f'data-fault="{f.index}" data-outcome="{_e(f.outcome)}"')
        body.append(_table("faults", ["#", "fault", "rank", "step", "outcome", "detected by", "recovery", "lost steps",
                                      "resumed from"], rows, num={0, 2, 3, 7}, row_attrs=attrs))
        if totals:
            body.append(_phase_legend())
    else:
        body.append("<p>No faults in this scenario.</p>")

    body.append("<h2>Failures</h2>")
    if result.failures:
        rows = [[x.attempt, f"{x.time - result.started_at:.2f}", x.cause, x.rank, x.detector, x.detail,
                 _Raw(f"<code>{_e(x.signature)}</code>"),
                 ", ".join(map(str, x.fault_indices)) or _Raw('<span class="bad">unexplained</span>')]
                for x in result.failures]
        body.append(_table("failures", ["attempt", "at (s)", "cause", "rank", "detector", "detail", "signature",
                                        "faults it explains"], rows, num={0, 1, 3}))
    else:
        body.append("<p>No failures.</p>")

    body.append("<h2>Loss against the golden run</h2>")
    body.append(_loss_figure(result, events, golden, scenario))
    body.append("<h2>Timeline</h2>")
    body.append(_timeline_figure(result.faults, result.failures, events, result.ranks,
                                 "Each bar is one attempt of one rank, from its first event to its last; ticks are "
                                 "completed steps."))
    return _page(f"{'PASS' if ok else 'FAIL'} · burnin {result.scenario}", "\n".join(body), files)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _loss_figure(result: Any, events: list[dict[str, Any]], golden: Any, scenario: dict[str, Any] | None) -> str:
    loss_bits = getattr(golden, "loss_bits", None) if golden is not None and not isinstance(golden, dict) \
        else (golden or {}).get("loss_bits")
    drawn: dict[str, Any] = {}

    def draw() -> str:
        svg, drawn["marks"] = plots.loss_plot(events=events, golden_loss_bits=loss_bits, faults=result.faults,
                                              params=_fault_params(scenario), diverged_at=result.diverged_at_step,
                                              loss_floor=result.loss_floor, steps=result.steps)
        return svg

    caption_parts = []
    inner, ok = _plot(draw)
    marks = drawn.get("marks")
    if marks is None:  # failed: say what would have been marked
        marks = [{"index": f.index, "fault": f.fault, "step": f.step, "band": None, "outcome": f.outcome}
                 for f in result.faults if f.injected]
    items = "".join(f'<li data-fault="{m["index"]}" data-step="{m["step"]}">#{m["index"]} {_e(m["fault"])} at step '
                    f'{m["step"]}{" (band: the steps it lasted)" if m.get("band") else ""}: {_badge(m["outcome"])}</li>'
                    for m in marks)
    caption_parts.append("Loss per step of each rank (the last execution of each step, as the verdict counts it; "
                         "executions a restart replayed are dashed and faint) over the golden run's rank 0 "
                         "(thick grey). Dashed verticals: the faults, coloured by outcome (a fault between steps is "
                         "drawn halfway to the next step); shaded: how long a fault with a duration lasted.")
    if result.diverged_at_step is not None:
        caption_parts.append(f"Dotted vermillion: the first step whose loss bits differ from the golden run's "
                             f"({result.diverged_at_step}).")
    if _finite(result.loss_floor):
        caption_parts.append("Horizontal dashed: the loss floor, the entropy of the synthetic data.")
    if not loss_bits:
        caption_parts.append("No golden record was found for this run.")
    caption = _e(" ".join(caption_parts)) + (f"<ul>{items}</ul>" if items else "")
    ids = " ".join(str(m["index"]) for m in marks)
    attrs = f' data-faults="{ids}" data-marked="{len(marks)}"'
    return _wrap("loss-plot", inner, ok, caption, attrs)


def _timeline_figure(faults: list[Any], failures: list[Any], events: list[dict[str, Any]], ranks: int, lead: str) -> str:
    drawn: dict[str, Any] = {}

    def draw() -> str:
        svg, drawn["data"] = plots.timeline_plot(events=events, faults=faults, failures=failures, ranks=ranks)
        return svg

    inner, ok = _plot(draw)
    restarts = sum(1 for ev in events if ev.get("event") == "restart")
    rollbacks = sum(1 for ev in events if ev.get("event") == "rollback")
    detections = sum(1 for ev in events if ev.get("event") == "detection")
    caption = _e(f"{lead} Triangles: faults as they fired (coloured by outcome; shaded: how long a fault with a "
                 f"duration lasted); crosses: failures as the supervisor detected them; dotted verticals: the "
                 f"{restarts} restart(s)"
                 + (f"; diamonds: the {detections} detector finding(s)" if detections else "")
                 + (f"; rings: the {rollbacks} in-process rollback(s)" if rollbacks else "")
                 + (". The recovery lane stacks each failure's phases from the fault to the first step after the "
                    "resume." if failures else "."))
    caption += _phase_legend() if failures else ""
    attrs = f' data-restarts="{restarts}" data-failures="{len(failures)}" data-rollbacks="{rollbacks}"'
    return _wrap("timeline-plot", inner, ok, caption, attrs)


def write_run_report(result: Any, run_dir: str | Path, *, events: list[dict[str, Any]] | None = None,
                     golden: Any = None) -> Path:
    """Write run_dir/report.html from the result and the run directory's event log, golden record and scenario."""
    run_dir = Path(run_dir)
    if events is None:
        events = _read_events(run_dir)
    if golden is None:
        golden = _read_json(run_dir / "golden.json")
    scenario = _read_json(run_dir / "scenario.json")
    files = _files(run_dir, ["summary.md", "summary.json", "junit.xml", "events.jsonl", "golden.json",
                             "scenario.json"])
    return _write(run_dir / REPORT, run_page(result, events=events, golden=golden, scenario=scenario, files=files))


# -- campaigns -------------------------------------------------------------------------------------

def _rate_rows(outcomes: dict[str, dict[str, Any]], n: int) -> list[dict[str, Any]]:
    return [{"label": o, "rate": v["rate"], "ci95": v["ci95"], "k": v["count"], "n": n,
             "color": OUTCOME_COLORS.get(o, "#0072B2")} for o, v in outcomes.items()]


def _outcomes_table(outcomes: dict[str, dict[str, Any]]) -> str:
    rows = [[_badge(o), v["count"], f"{v['rate']:.3f}", f"{v['ci95'][0]:.3f} – {v['ci95'][1]:.3f}"]
            for o, v in outcomes.items()]
    return _table("outcomes", ["outcome", "trials", "rate", "95 % interval (Wilson)"], rows, num={1, 2, 3})


def campaign_page(summary: dict[str, Any], run_dir: str | Path = "") -> str:
    """The page of a campaign: outcome rates with their intervals, and the detector scorecard (data
    faults) or the recovery times per phase (process faults)."""
    recovery = summary.get("kind") == "recovery"
    n = summary.get("trials", 0)
    body = [f"<header><h1><span>{'Recovery campaign' if recovery else 'Campaign'} · {_e(summary.get('scenario'))}"
            f"</span></h1>",
            f'<p class="sub">{_e(n)} trials · seed {_e(summary.get("seed"))}'
            + (f" · {summary['timing']['wall_s']:.0f} s" if (summary.get("timing") or {}).get("wall_s") else "")
            + (f" · <code>{_e(run_dir)}</code>" if run_dir else "") + "</p>"]
    if not summary.get("complete", True):
        body.append(f'<div class="banner warn"><b>incomplete</b>: resume with <code>burnin campaign --resume '
                    f"{_e(run_dir)}</code></div>")
    if summary.get("error"):
        body.append(f'<div class="banner error"><b>harness error</b>: {_e(summary["error"])}</div>')
    out = summary.get("outcomes") or {}
    kp = [("trials", n)]
    for o in TRIAL_OUTCOMES:
        if o in out and (out[o]["count"] or o == "sdc"):
            v = out[o]
            kp.append((f"{o} (95 % interval)", f"{v['rate']:.2f} ({v['ci95'][0]:.2f}–{v['ci95'][1]:.2f})"))
    if recovery:
        ex = summary.get("exact") or {}
        if ex:
            kp.append(("bit-exact (95 % interval)", f"{ex['count']}/{n} ({ex['ci95'][0]:.2f}–{ex['ci95'][1]:.2f})"))
        kp.append(("unexplained failures", summary.get("unexplained_failures", 0)))
        total = (summary.get("recovery_s") or {}).get("total_s") or {}
        if total.get("p50") is not None:
            kp.append(("recovery p50 / p99", f"{total['p50']:.2f} / {total['p99']:.2f} s"))
    else:
        fa = summary.get("false_alarms") or {}
        kp.append(("false alarms (reference steps)",
                   f"{sum((fa.get('reference') or {}).values())} ({fa.get('reference_window_steps', 0)})"))
    body += [_kpis(kp), "</header>", "<h2>Outcome rates</h2>", _outcomes_table(out),
             _figure("outcomes-plot", _e("Each outcome's share of the trials, with its 95 % Wilson interval."),
                     lambda: plots.rates_plot("outcomes", _rate_rows(out, n)))]
    if recovery:
        body.append(_recovery_sections(summary))
    else:
        body.append(_effects_section(summary))
        body.append(_scorecard_section(summary))
    name = "campaign.md"
    files = _files(Path(run_dir), [name, "campaign.json", "trials.jsonl", "metrics.prom"]) if run_dir else []
    return _page(f"burnin campaign {summary.get('scenario')}", "\n".join(body), files)


def _bit_label(row: dict[str, Any]) -> str:
    """A scorecard row's bit class, with its pattern when it is not a single bit (multi-bit, burst)."""
    pattern = row.get("pattern", "single")
    return row["bit_class"] if pattern == "single" else f"{row['bit_class']} ({pattern})"


def _ci(v: dict[str, Any]) -> str:
    return f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"


def _effects_section(summary: dict[str, Any]) -> str:
    """What the silent outcomes did against the noise band, and the detectors against harm (the trials run
    unchecked): absent from a campaign written before either existed."""
    eff, band, harm = summary.get("effects"), summary.get("noise_band"), summary.get("detector_harm")
    parts = []
    if eff and band:
        parts.append(f"<h2>What the silent outcomes did ({_e(eff['silent_trials'])} masked or sdc trials)</h2>")
        rows = [[e, eff[e]["count"], f"{eff[e]['rate']:.3f}", _ci(eff[e])]
                for e in ("benign", "transient", "degraded", "diverged", "harmful")]
        parts.append(_table("effects", ["effect", "trials", "rate", "95 % interval"], rows, num={1, 2}))
        parts.append(f"<p>Noise band, relative to the fault-free window: final loss {band['final']:.3g}, held-out loss "
                     f"{band['eval']:.3g}, largest per-step deviation {band['step']:.3g}; {_e(band['how'])}. Diverged: "
                     f"NaN/Inf, or {_e(band['diverged_ratio'])}x the reference's loss.</p>")
    if harm and harm.get("trials"):
        parts.append(f"<h2>Detectors against harm</h2><p>{_e(harm['harmful'])} harmful and {_e(harm['benign'])} benign "
                     f"of {_e(harm['trials'])} trials run unchecked ({_e(harm['unknown'])} unknown): {_e(harm['how'])}.</p>")
        rows = []
        for d, v in harm["detectors"].items():
            hc, bf = v["harmful_caught"], v["benign_flagged"]
            rows.append([d, f"{hc['count']}/{hc['of']}", "–" if hc["rate"] is None else f"{hc['rate']:.3f} {_ci(hc)}",
                         f"{bf['count']}/{bf['of']}", "–" if bf["rate"] is None else f"{bf['rate']:.3f} {_ci(bf)}"])
        parts.append(_table("detector-harm", ["detector", "harmful caught", "share (95 %)", "benign flagged",
                                              "share (95 %)"], rows))
        rows = [[row["target"], _bit_label(row), u["trials"], *(u[e] for e in EFFECTS),
                 f"{u['harmful']['rate']:.2f} {_ci(u['harmful'])}"]
                for row in summary.get("scorecard") or [] for u in [row.get("unchecked") or {}] if u.get("trials")]
        parts.append("<details><summary>Unchecked effect per target and bit class (what the faults do when nothing "
                     "catches them)</summary>"
                     + _table("unchecked", ["target", "bit class", "trials", *EFFECTS, "harmful share"], rows,
                              num={2, 3, 4, 5, 6}) + "</details>")
    return "\n".join(parts)


def _scorecard_section(summary: dict[str, Any]) -> str:
    card = summary.get("scorecard") or []
    dets = sorted({d for row in card for d in row["detectors"]})
    parts = ["<h2>Detector scorecard</h2>",
             _figure("scorecard-plot", _e("Detection rate of each detector per target and bit class (the cell: rate, "
                                          "detected/trials, median latency in steps), and the silent escape (sdc) "
                                          "rate beside it."), lambda: plots.scorecard_plot(card),
                     attrs=f' data-rows="{len(card)}" data-detectors="{_e(" ".join(dets))}"')]
    rows = []
    for row in card:
        cells = []
        for d in dets:
            v = row["detectors"].get(d)
            cells.append("–" if v is None else f"{v['rate']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"
                         + (f" · {v['median_latency_steps']} steps" if v.get("median_latency_steps") is not None else ""))
        s = row["sdc"]
        rows.append([row["target"], _bit_label(row), row["trials"], *cells,
                     f"{s['rate']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]", row.get("masked", 0)])
    parts.append("<details><summary>The scorecard as a table (rates with 95 % intervals)</summary>"
                 + _table("scorecard", ["target", "bit class", "trials", *dets, "sdc", "masked"], rows, num={2})
                 + "</details>")
    fa = summary.get("false_alarms") or {}
    parts.append(f"<p>False alarms: {_e(sum((fa.get('reference') or {}).values()))} in "
                 f"{_e(fa.get('reference_window_steps', 0))} fault-free reference steps; "
                 f"{_e(fa.get('in_trials_before_fault', 0))} in trial steps before the fault.</p>")
    return "\n".join(parts)


def _recovery_sections(summary: dict[str, Any]) -> str:
    by_fault = summary.get("by_fault") or {}
    parts = ["<h2>By fault</h2>"]
    rows = []
    for name, b in by_fault.items():
        o = b["outcomes"]
        cells = [f"{o[k]['count']} ({o[k]['ci95'][0]:.2f}–{o[k]['ci95'][1]:.2f})" if o[k]["count"] else "0"
                 for k in TRIAL_OUTCOMES]
        lost = b["lost_steps"]
        rows.append([name, b["trials"], *cells, f"{b['exact']['count']}/{b['trials']}",
                     lost["max"] if lost["max"] is not None else "–",
                     ", ".join(f"{k}: {v}" for k, v in b["tiers"].items())])
    parts.append(_table("by-fault", ["fault", "trials", *TRIAL_OUTCOMES, "exact",
                                     "lost steps (max)", "resumed from"], rows, num={1}))
    parts.append("<h2>Recovery time</h2>")
    parts.append(_figure("phases-plot", _e("Per fault: the median of each recovery phase, stacked; the bar and the "
                                           "diamond mark the 90th and 99th percentiles of the total."),
                         lambda: plots.recovery_phases_plot(by_fault)))
    rows = []
    for name, b in by_fault.items():
        cells = []
        for p in ("detection_s", "teardown_s", "restart_s", "checkpoint_load_s", "first_step_s", "total_s"):
            v = b["recovery_s"][p]
            cells.append("–" if v["p50"] is None else f"{v['p50']:.3f} / {v['p90']:.3f} / {v['p99']:.3f}")
        rows.append([name, *cells])
    parts.append(_table("recovery-times", ["fault (s: p50 / p90 / p99)", "detection", "teardown", "restart",
                                           "checkpoint load", "first step", "total"], rows))
    if summary.get("errors"):
        parts.append("<h2>Harness errors</h2>")
        parts.append(_table("errors", ["trial", "error"], [[x["trial"], x["error"]] for x in summary["errors"]]))
    return "\n".join(parts)


def write_campaign_report(run_dir: str | Path, summary: dict[str, Any] | None = None) -> Path:
    run_dir = Path(run_dir)
    summary = summary if summary is not None else json.loads((run_dir / "campaign.json").read_text())
    return _write(run_dir / REPORT, campaign_page(summary, run_dir))


# -- burn-ins --------------------------------------------------------------------------------------

class _Fault:
    """The slice of a FaultResult the timeline reads, for a burn-in's faults."""

    def __init__(self, index: int, outcome: str, fault: str):
        self.index, self.outcome, self.fault = index, outcome, fault
        self.details: dict[str, Any] = {}
        self.recovery = None
        self.injected_at = None


def burn_in_page(summary: dict[str, Any], *, events: list[dict[str, Any]], run_dir: str | Path = "",
                 judged: Any = None) -> str:
    """The page of a burn-in: the verdict, each rank's health over time and at the end, the faults, the timeline."""
    h = summary.get("health") or {"ranks": [], "thresholds": {}, "unexplained_failures": []}
    faults = (summary.get("faults") or {}).get("list") or []
    steps = summary.get("steps") or {}
    body = [f"<header><h1>{_verdict(bool(summary.get('ok')))} <span>burn-in · {_e(summary.get('scenario'))}</span></h1>",
            f'<p class="sub">seed {_e(summary.get("seed"))} · asked {_num(summary.get("duration_s"), ".0f")} s'
            + (f" · <code>{_e(run_dir)}</code>" if run_dir else "") + "</p>"]
    if summary.get("interrupted"):
        body.append(f'<div class="banner warn"><b>{_e(summary["interrupted"])}</b></div>')
    if summary.get("error"):
        body.append(f'<div class="banner error"><b>harness error</b>: {_e(summary["error"])}</div>')
    verdicts = [r["verdict"] for r in h["ranks"]]
    external = summary.get("comparison") == "invariants"  # recovery by the system under test (torchft)
    body.append(_kpis([
        ("wall time", f"{summary.get('wall_s', 0):.0f} s"),
        ("ranks healthy", f"{verdicts.count('healthy')} of {len(verdicts)}"),
        ("faults fired (scheduled)", f"{summary['faults']['fired']} ({summary['faults']['scheduled']})"
         if summary.get("faults") else "–"),
        ("faults recovered, invariants held" if external else "faults recovered exactly",
         "yes" if (summary.get("recovery") or {}).get("ok") else "no"),
        ("restarts", summary.get("restarts", 0)),
        ("goodput (group-steps committed / of all groups)" if external else "goodput (useful / executed steps)",
         f"{steps.get('useful')} / {steps.get('executed')}"),
    ]))
    if external:
        body.append(f'<p class="small">Recovery by the system under test ({_e(summary.get("system"))}, recovery.mode: '
                    "external): judged by its invariants, not bit for bit; compute per step is each rank's forward "
                    "time.</p>")
    body.append("</header><h2>Health per rank</h2>")
    rows = [[r["rank"], _badge(r["verdict"]), _num(r.get("straggler_score")),
             f"{r['median_compute_s'] * 1000:.1f} ms" if r.get("median_compute_s") else "–",
             r.get("unexplained_failures", 0), "; ".join(r.get("reasons") or []) or "–"] for r in h["ranks"]]
    body.append(_table("health", ["rank", "verdict", "straggler score", "median compute/step", "unexplained failures",
                                  "reasons"], rows, num={0, 2, 3, 4},
                       row_attrs=[f'data-rank="{r["rank"]}" data-verdict="{_e(r["verdict"])}"' for r in h["ranks"]]))
    th = h.get("thresholds") or {}
    body.append(f'<p class="small">Thresholds: straggler at {_e(th.get("straggler_ratio"))}× the best rank; slowed '
                f'down at {_e(th.get("slowdown_ratio"))}× its own best period; a lemon at '
                f'{_e(th.get("lemon_failures"))} unexplained failures.</p>')
    rollups = [{k: v for k, v in ev.items()} for ev in events if ev.get("event") == "burn_in_rollup"]
    body.append(_figure("health-plot", _e("Each rank's median compute time per step in each roll-up period, over the "
                                          "burn-in, with its final verdict; the dashed line is the straggler threshold, "
                                          "the ticks at the bottom the faults as they fired (coloured by outcome)."),
                        lambda: plots.health_plot(rollups=rollups, ranks=h["ranks"], faults=faults,
                                                  straggler_ratio=float(th.get("straggler_ratio") or 1.1)),
                        attrs=f' data-ranks="{len(h["ranks"])}"'))
    if h.get("unexplained_failures"):
        body.append("<h2>Failures no injected fault explains</h2>")
        body.append(_table("unexplained", ["signature", "rank", "count", "cause"],
                           [[_Raw(f"<code>{_e(g['signature'])}</code>"), g["rank"], g["count"], g["cause"]]
                            for g in h["unexplained_failures"]], num={1, 2}))
    body.append("<h2>Faults</h2>")
    if faults:
        rows = [[f["index"], f["fault"], f["rank"], _num(f.get("fired_at_s"), ".1f"), f.get("step"), f.get("phase"),
                 _Raw(_badge(f["outcome"]) + ("" if f.get("ok", True) else ' <span class="bad">unexpected</span>')),
                 f.get("detected_by"), _num(f.get("recovery_s")), f.get("lost_steps")] for f in faults]
        body.append(_table("faults", ["#", "fault", "rank", "at (s)", "step", "landed in", "outcome", "detected by",
                                      "recovery (s)", "lost steps"], rows, num={0, 2, 3, 4, 8, 9},
                           row_attrs=[f'data-fault="{f["index"]}" data-outcome="{_e(f["outcome"])}"' for f in faults]))
    else:
        body.append("<p>No fault fired.</p>")
    body.append("<h2>Timeline</h2>")
    if judged is not None:
        tl_faults, tl_failures, ranks = judged.faults, judged.failures, judged.ranks
        by = {f["index"]: f["outcome"] for f in faults}
        for f in tl_faults:  # the burn-in's outcomes (verified by replay), not the bare run's
            f.outcome = by.get(f.index, f.outcome)
    else:
        tl_faults = [_Fault(f["index"], f["outcome"], f["fault"]) for f in faults]
        tl_failures, ranks = [], len(h["ranks"]) or 1
    body.append(_timeline_figure(tl_faults, tl_failures, events, ranks, "Each bar is one attempt of one rank."))
    wins = (summary.get("recovery") or {}).get("windows") or []
    if external:
        body.append("<h2>Invariants</h2>")
        body.append(_table("invariants", ["invariant", "held", "evidence"], [
            [i["name"], _Raw(f'<span class="{"ok" if i["ok"] else "bad"}">{"yes" if i["ok"] else "NO"}</span>'),
             i["message"]] for i in summary["recovery"].get("invariants") or []]))
    else:
        body.append("<h2>Verification windows</h2>")
        body.append("<p>Each stretch with faults was replayed without them from its first checkpoint; the state hash "
                    "at its last checkpoint must match.</p>")
        body.append(_table("windows", ["from step", "to step", "faults", "exact"],
                           [[w["start"], w["end"], ", ".join(map(str, w["faults"])),
                             _Raw(f'<span class="{"ok" if w["exact"] else "bad"}">{"yes" if w["exact"] else "NO"}</span>')]
                            for w in wins], num={0, 1}) if wins else "<p>No window to replay.</p>")
    files = _files(Path(run_dir), ["burn-in.md", "burn-in.json", "junit.xml", "schedule.yaml", "events.jsonl",
                                   "metrics.prom"]) if run_dir else []
    return _page(f"{'PASS' if summary.get('ok') else 'FAIL'} · burnin burn-in {summary.get('scenario')}",
                 "\n".join(body), files)


def write_burn_in_report(run_dir: str | Path, summary: dict[str, Any] | None = None,
                         events: list[dict[str, Any]] | None = None) -> Path:
    run_dir = Path(run_dir)
    summary = summary if summary is not None else json.loads((run_dir / "burn-in.json").read_text())
    events = events if events is not None else _read_events(run_dir)
    try:
        judged = judge_burn_in(run_dir, events)
    except Exception:  # the timeline then goes without recovery phases
        judged = None
    return _write(run_dir / REPORT, burn_in_page(summary, events=events, run_dir=run_dir, judged=judged))


# -- comparisons -----------------------------------------------------------------------------------

def compare_page(c: dict[str, Any]) -> str:
    """`burnin compare` as a page: both sides of every rate with their intervals, the difference and the verdict."""
    worse = c.get("worse") or []
    body = [f"<header><h1><span>{_e(c['b'])} against {_e(c['a'])}</span></h1>",
            f'<p class="sub">A: <code>{_e(c["a"])}</code> · B: <code>{_e(c["b"])}</code> · '
            f"{'paired: both sides ran the same trials' if c.get('paired') else 'unpaired samples'} · "
            f"alpha {_e(c.get('alpha'))} · <i>same</i> needs the interval within ±{_e(c.get('margin'))}</p>",
            _kpis([("metrics", len(c["metrics"])), ("worse", ", ".join(worse) or "none"),
                   ("better", ", ".join(m["metric"] for m in c["metrics"] if m["verdict"] == "better") or "none"),
                   ("not comparable", sum(m["verdict"] == "not comparable" for m in c["metrics"]))]),
            "</header><h2>Metrics</h2>"]
    rows, attrs = [], []
    for m in c["metrics"]:
        if "rate" in m["a"]:
            a = f"{m['a']['rate']:.3f} ({m['a']['k']}/{m['a']['n']}) [{m['a']['ci95'][0]:.3f}, {m['a']['ci95'][1]:.3f}]"
            b = f"{m['b']['rate']:.3f} ({m['b']['k']}/{m['b']['n']}) [{m['b']['ci95'][0]:.3f}, {m['b']['ci95'][1]:.3f}]"
            diff = (f"{m['difference']:+.3f} [{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}]" if m.get("ci95") else "–")
        else:
            a = f"median {m['a']['median']:.3f} (n {m['a']['n']})" if m["a"]["median"] is not None else "–"
            b = f"median {m['b']['median']:.3f} (n {m['b']['n']})" if m["b"]["median"] is not None else "–"
            diff = f"ratio {m['ratio_of_medians']:.2f}" if m.get("ratio_of_medians") else "–"
        verdict = _Raw(_badge(m["verdict"]) + (f' <span class="small">needs ~{_e(m["trials_needed"])} a side</span>'
                                               if m.get("trials_needed") else ""))
        rows.append([m["metric"], a, b, diff, m.get("test") or "–", _num(m.get("p"), ".3g"), verdict, m.get("why")])
        attrs.append(f'data-metric="{_e(m["metric"])}" data-verdict="{_e(m["verdict"])}"')
    body.append(_table("metrics", ["metric", "A (95 % interval)", "B (95 % interval)", "B − A (95 % interval)", "test",
                                   "p", "verdict", "why"], rows, row_attrs=attrs))
    body.append(_figure("compare-plot", _e("Left: each rate on both sides, with its 95 % Wilson interval (A light, "
                                           "B dark). Right: the difference B − A with its 95 % interval, against the "
                                           "band within which the two count as the same."),
                        lambda: plots.compare_plot(c)))
    return _page(f"burnin compare: {c['b']} against {c['a']}", "\n".join(body))


def write_compare_report(c: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    return _write(path, compare_page(c))


# -- rebuilding ------------------------------------------------------------------------------------

def rebuild(run_dir: str | Path) -> Path:
    """Write report.html again for a campaign or burn-in directory from its summary and event log (a run's
    page is rebuilt with its other reports, by `burnin report`)."""
    run_dir = Path(run_dir)
    if (run_dir / "burn-in.json").exists():
        return write_burn_in_report(run_dir)
    if (run_dir / "campaign.json").exists():
        return write_campaign_report(run_dir)
    raise FileNotFoundError(f"{run_dir}: neither campaign.json nor burn-in.json")

