"""The figures of the HTML reports, drawn with matplotlib and returned as inline SVG markup.

Only report writers call this, after a run has ended: never a rank process, never the supervisor's
loop. matplotlib is imported inside the functions (a `Figure` drawn by its own canvas, no pyplot and
no global backend), so importing this module costs nothing. Every figure is one SVG string whose
element ids are prefixed with the figure's key, so several figures can share a page; the elements
a reader (or a browser test) looks for carry ids of their own, listed in docs/architecture.md
("Reports"): `loss-fault-<i>`, `timeline-restart-<n>`, and so on.

Colours come from the Okabe-Ito palette, which stays distinguishable to colour-blind readers.
"""

from __future__ import annotations

import io
import math
import re
import struct
from collections import defaultdict
from typing import Any, Iterable

__all__ = ["OUTCOME_COLORS", "PHASE_COLORS", "loss_plot", "timeline_plot", "rates_plot", "scorecard_plot",
           "recovery_phases_plot", "health_plot", "compare_plot"]

OUTCOME_COLORS = {"recovered": "#009E73", "masked": "#8C8C8C", "detected": "#E69F00", "sdc": "#D55E00",
                  "failed": "#000000", "degraded": "#56B4E9", "unverified": "#CC79A7"}
PHASES = ("detection", "teardown", "restart", "checkpoint_load", "first_step")
PHASE_COLORS = {"detection": "#E69F00", "teardown": "#D55E00", "restart": "#CC79A7", "checkpoint_load": "#0072B2",
                "first_step": "#009E73"}
#: ranks: blues and purples, apart from the outcome colours the fault markers use
RANK_COLORS = ("#0072B2", "#56B4E9", "#CC79A7", "#332288", "#44AA99", "#882255", "#88CCEE", "#AA4499")
GOLDEN_COLOR = "#BBBBBB"
MAX_RANK_LINES = 8

_STYLE = {
    "svg.fonttype": "none",        # text stays text: selectable, searchable, small
    "svg.hashsalt": "burnin",      # the same report twice is the same markup
    "font.size": 10,
    "font.family": "sans-serif",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "legend.frameon": False,
    "legend.fontsize": 9,
}


def _mpl() -> Any:
    import matplotlib  # lazy: matplotlib, only when a page is drawn

    return matplotlib


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # lazy: matplotlib, only when a page is drawn

    return Figure(figsize=(width, height), dpi=100)


def _svg(fig: Any, key: str) -> str:
    """The figure as an inline <svg>: no XML prologue or metadata, ids prefixed with `key`, sized by its viewBox."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", pad_inches=0.08, metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.S)
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)  # inline SVG in HTML needs neither

    def own(name: str) -> str:
        return name if name.startswith(key + "-") else f"{key}-{name}"

    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{own(m.group(1))}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{own(m.group(1))})", text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{own(m.group(1))}"', text)
    # responsive: the page's CSS gives the width, the viewBox the aspect ratio
    # responsive, but never drawn larger than it was made (its text would grow with it)
    def size(m: re.Match[str]) -> str:
        natural = float(m.group(2)) * 4 / 3  # pt -> CSS px
        return (f'<svg{m.group(1)} class="plot" role="img" preserveAspectRatio="xMidYMid meet" '
                f'style="max-width:{natural:.0f}px"')

    return re.sub(r'<svg([^>]*?) width="([0-9.]+)pt" height="[^"]*"', size, text, count=1)


def _draw(key: str, width: float, height: float, draw: Any, *args: Any, **kw: Any) -> str:
    with _mpl().rc_context(_STYLE):
        fig = _figure(width, height)
        draw(fig, *args, **kw)
        return _svg(fig, key)


def _t(text: Any) -> str:
    """Text for matplotlib: a `$` would start mathtext."""
    return str(text).replace("$", r"\$")


def _err(value: float, lo: float, hi: float) -> list[list[float]]:
    """Error bar lengths; an interval's end can sit a rounding error inside its point."""
    return [[max(0.0, value - lo)], [max(0.0, hi - value)]]


def _bits(hexbits: str) -> float:
    return struct.unpack(">f", bytes.fromhex(hexbits))[0]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# -- loss per step -----------------------------------------------------------------------------------

def _loss_of(ev: dict[str, Any]) -> float:
    loss = ev.get("loss")
    if isinstance(loss, str):  # "nan", "inf" as JSON writes them
        loss = float(loss)
    if loss is None and ev.get("loss_bits"):
        loss = _bits(ev["loss_bits"])
    return float("nan") if loss is None else float(loss)


_Replayed = list[tuple[int, int, list[tuple[int, float]]]]  # (rank, attempt, [(step, loss)])


def loss_series(events: list[dict[str, Any]]) -> tuple[dict[int, dict[int, float]], _Replayed]:
    """The run's losses: per rank the kept one of each step (its last execution, as the verdict counts it),
    and the executions a restart or rollback replayed, per (rank, attempt) run of steps."""
    kept: dict[int, dict[int, float]] = defaultdict(dict)
    execs: list[tuple[int, int, int, float, int]] = []  # rank, attempt, step, loss, order
    for n, ev in enumerate(e for e in events if e.get("event") == "step_done" and "rank" in e):
        loss = _loss_of(ev)
        kept[ev["rank"]][ev["step"]] = loss
        execs.append((ev["rank"], ev.get("attempt", 0), ev["step"], loss, n))
    last = {(r, s): n for r, _, s, _, n in execs}
    replaced: dict[tuple[int, int], list[tuple[int, float]]] = defaultdict(list)
    for r, a, s, loss, n in execs:
        if last[(r, s)] != n:
            replaced[(r, a)].append((s, loss))
    return dict(kept), [(r, a, pts) for (r, a), pts in sorted(replaced.items())]


def fault_marks(faults: list[Any], events: list[dict[str, Any]],
                params: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Where each injected fault goes on the loss plot: its step (a fault between steps halfway to the
    next), and the band of steps it lasted for a fault with a duration (a network fault's duration_s,
    turned into the steps completed meanwhile; a straggler's steps)."""
    injected = {ev["fault_index"]: ev for ev in events if ev.get("event") == "fault_injected"}
    step_times = sorted((ev["t"], ev["step"]) for ev in events if ev.get("event") == "step_done")
    marks = []
    for f in faults:
        ev = injected.get(f.index)
        if ev is None:
            continue
        step, point = ev.get("step", f.step), ev.get("point", f.point)
        x = step + 0.5 if point == "between_steps" else step
        p = params.get(f.index) or {}
        band = None
        duration = f.details.get("duration_s", p.get("duration_s"))
        if _finite(duration) and duration > 0:
            during = [s for t, s in step_times if ev["t"] <= t <= ev["t"] + duration]
            band = (x, max([x + 1, *(s + 1 for s in during)]))
        elif f.fault == "process.straggler":
            band = (step, step + int(p.get("steps", 1)))
        marks.append({"index": f.index, "fault": f.fault, "outcome": f.outcome, "step": step, "x": x, "band": band})
    return marks


def loss_plot(*, events: list[dict[str, Any]], golden_loss_bits: dict[str, dict[str, str]] | None, faults: list[Any],
              params: dict[int, dict[str, Any]], diverged_at: int | None, loss_floor: float | None,
              steps: int) -> tuple[str, list[dict[str, Any]]]:
    """Loss per step against the golden run, with the faults, the divergence point and the loss floor.
    Returns the SVG and the fault marks drawn (for the caption)."""
    kept, replaced = loss_series(events)
    marks = fault_marks(faults, events, params)
    golden = {int(s): _bits(b) for s, b in ((golden_loss_bits or {}).get("0") or {}).items()}
    svg = _draw("loss", 10, 4.6, _draw_loss, kept, replaced, golden, marks, diverged_at, loss_floor, steps)
    return svg, marks


def _tag_levels(xs: list[float], widths_px: list[float], px_per_unit: float) -> list[int]:
    """Greedy rows for labels along x: a label goes to the first row where it clears the one before it."""
    ends: list[float] = []
    levels = []
    for x, w in zip(xs, widths_px):
        left = x * px_per_unit - 4
        for lvl, end in enumerate(ends):
            if left > end:
                ends[lvl] = left + w + 10
                levels.append(lvl)
                break
        else:
            ends.append(left + w + 10)
            levels.append(len(ends) - 1)
    return levels


def _draw_loss(fig: Any, kept: dict[int, dict[int, float]], replaced: _Replayed,
               golden: dict[int, float], marks: list[dict[str, Any]], diverged_at: int | None,
               loss_floor: float | None, steps: int) -> None:
    ax = fig.add_subplot()
    few = steps <= 200
    if golden:
        xs = sorted(golden)
        (line,) = ax.plot(xs, [golden[s] for s in xs], color=GOLDEN_COLOR, lw=5, solid_capstyle="round",
                          label="golden run (rank 0)", zorder=1)
        line.set_gid("loss-golden")
    for r, a, pts in replaced:
        if r >= MAX_RANK_LINES:
            continue
        pts = sorted(pts)
        (line,) = ax.plot([s for s, _ in pts], [v if math.isfinite(v) else math.nan for _, v in pts],
                          color=RANK_COLORS[r % len(RANK_COLORS)], lw=1, alpha=0.35, ls="--", zorder=2,
                          label="replayed later (earlier execution)" if (r, a) == replaced[0][:2] else None)
        line.set_gid(f"loss-replayed-{r}-{a}")
    values: list[float] = list(golden.values())
    nonfinite_label = "non-finite loss"
    for r in sorted(kept)[:MAX_RANK_LINES]:
        xs = sorted(kept[r])
        ys = [kept[r][s] for s in xs]
        values += ys
        (line,) = ax.plot(xs, [y if math.isfinite(y) else math.nan for y in ys], color=RANK_COLORS[r % len(RANK_COLORS)],
                          lw=1.4, marker="o" if few else None, ms=2.5, label=f"rank {r}", zorder=3)
        line.set_gid(f"loss-rank-{r}")
        bad = [s for s, y in zip(xs, ys) if not math.isfinite(y)]
        if bad:
            ax.plot(bad, [1.0] * len(bad), "x", color="#D55E00", ms=7, mew=2, transform=ax.get_xaxis_transform(),
                    clip_on=False, label=nonfinite_label, zorder=5)
            nonfinite_label = None
    finite = [v for v in values if math.isfinite(v)]
    # a bit flip can send one loss to 1e30: keep the scale of the golden run, mark what leaves it
    if golden and finite:
        ref = max([v for v in golden.values() if math.isfinite(v)] or finite)
        top = ref * 1.25
        lo = min([*finite, loss_floor] if _finite(loss_floor) else finite)
        if max(finite) > ref * 3:
            out = [(s, y) for r in sorted(kept)[:MAX_RANK_LINES] for s, y in kept[r].items()
                   if math.isfinite(y) and y > top]
            ax.plot([s for s, _ in out], [top] * len(out), "^", color="#D55E00", ms=6, clip_on=False,
                    label="above the axis", zorder=5)
        ax.set_ylim(lo - 0.08 * (top - lo), top)
    ax.set_xlim(-0.5, max(steps - 0.5, 0.5))
    if _finite(loss_floor):
        line = ax.axhline(loss_floor, color="#555555", ls=(0, (6, 3)), lw=1, zorder=1)
        line.set_gid("loss-floor")
        txt = ax.annotate(f"loss floor {loss_floor:.3f} nats/token", (1, loss_floor), xycoords=("axes fraction", "data"),
                          xytext=(-4, 4), textcoords="offset points", ha="right", va="bottom", fontsize=9, color="#555555")
        txt.set_gid("loss-floor-label")
    if diverged_at is not None:
        line = ax.axvline(diverged_at, color="#D55E00", ls=":", lw=2, zorder=4)
        line.set_gid("loss-divergence")
        txt = ax.annotate(f"diverged at step {diverged_at}", (diverged_at, 0), xycoords=("data", "axes fraction"),
                          xytext=(4, 6), textcoords="offset points", ha="left", va="bottom", fontsize=9,
                          color="#D55E00", fontweight="bold")
        txt.set_gid("loss-divergence-label")
    # faults: a line (and a band) each, a tag above the plot in rows that do not overlap
    fig_w_px = fig.get_figwidth() * fig.dpi * 0.85
    px_per_step = fig_w_px / max(steps, 1)
    # many faults: numbers only (the caption names them)
    labels = [f"#{m['index']}" + (f" {m['fault']}" if len(marks) <= 12 else "") for m in marks]
    levels = _tag_levels([m["x"] + 0.5 for m in marks], [len(t) * 6.0 + 8 for t in labels], px_per_step)
    seen_outcomes = []
    for m, label, lvl in zip(marks, labels, levels):
        color = OUTCOME_COLORS.get(m["outcome"], "#000000")
        if m["band"] is not None:
            band = ax.axvspan(m["band"][0], m["band"][1], color=color, alpha=0.15, lw=0, zorder=0)
            band.set_gid(f"loss-fault-{m['index']}-band")
        line = ax.axvline(m["x"], color=color, ls="--", lw=1.3, zorder=4,
                          label=f"fault: {m['outcome']}" if m["outcome"] not in seen_outcomes else None)
        seen_outcomes.append(m["outcome"])
        line.set_gid(f"loss-fault-{m['index']}")
        txt = ax.annotate(_t(label), (m["x"], 1), xycoords=("data", "axes fraction"), xytext=(-3, 4 + 15 * lvl),
                          textcoords="offset points", ha="left", va="bottom", fontsize=8.5, color=color,
                          annotation_clip=False,
                          bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "lw": 0.8})
        txt.set_gid(f"loss-fault-{m['index']}-label")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(axis="y", color="#EEEEEE", lw=0.8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, handlelength=2.2)
    else:
        ax.text(0.5, 0.5, "no step completed", transform=ax.transAxes, ha="center", va="center", color="#555555")


# -- timeline of attempts ----------------------------------------------------------------------------

def timeline_data(events: list[dict[str, Any]], faults: list[Any], failures: list[Any]) -> dict[str, Any]:
    """What the timeline shows, in seconds since the run started: per (rank, attempt) its span and its
    steps; the faults, failures, restarts, rollbacks; and for each failure its recovery phases."""
    starts = [ev["t"] for ev in events if ev.get("event") == "run_started"]
    t0 = starts[0] if starts else min((ev["t"] for ev in events if "t" in ev), default=0.0)
    spans: dict[tuple[int, int], list[float]] = {}
    steps: dict[tuple[int, int], list[tuple[float, int]]] = defaultdict(list)
    for ev in events:
        if ev.get("rank") is None or ev.get("attempt") is None or "t" not in ev or ev.get("event") == "fault_injected":
            continue
        key = (ev["rank"], ev["attempt"])
        t = ev["t"] - t0
        span = spans.setdefault(key, [t, t])
        span[0], span[1] = min(span[0], t), max(span[1], t)
        if ev.get("event") == "step_done":
            steps[key].append((t, ev["step"]))
    outcome = {f.index: f.outcome for f in faults}
    duration = {f.index: f.details.get("duration_s") for f in faults}
    fault_pts = [{"index": ev["fault_index"], "fault": ev.get("fault"), "rank": ev.get("rank"), "t": ev["t"] - t0,
                  "outcome": outcome.get(ev["fault_index"], "failed"), "duration": duration.get(ev["fault_index"])}
                 for ev in events if ev.get("event") == "fault_injected"]
    detections = [{"t": ev["t"] - t0, "rank": ev.get("rank"), "detector": ev.get("detector")}
                  for ev in events if ev.get("event") == "detection" and "t" in ev]
    failure_pts = [{"k": k, "t": ev["detected_at"] - t0, "rank": ev.get("rank"), "cause": ev.get("cause"),
                    "attempt": ev.get("attempt")}
                   for k, ev in enumerate(e for e in events if e.get("event") == "failure_detected")]
    restarts = [{"n": ev.get("attempt"), "t": ev["t"] - t0} for ev in events if ev.get("event") == "restart"]
    rollbacks = [{"t": ev["t"] - t0, "rank": ev.get("rank"), "from": ev.get("from_step"), "to": ev.get("to_step")}
                 for ev in events if ev.get("event") == "rollback"]
    end = max((ev["t"] for ev in events if "t" in ev), default=t0) - t0
    return {"spans": spans, "steps": dict(steps), "faults": fault_pts, "failures": failure_pts, "restarts": restarts,
            "rollbacks": rollbacks, "detections": detections, "recoveries": _recoveries(faults, failures, t0), "end": end}


def _recoveries(faults: list[Any], failures: list[Any], t0: float) -> list[dict[str, Any]]:
    """Each failure's recovery phases as (phase, start, seconds), from the breakdown of the fault it is
    reported under (a recurring fault's own per-failure breakdowns, timed from each detection)."""
    by_index = {f.index: f for f in faults}
    out = []
    for k, x in enumerate(failures):
        f = by_index.get(x.fault_index) if x.fault_index is not None else None
        if f is None:
            continue
        parts = None
        for rec in f.details.get("recoveries") or []:
            if rec.get("attempt") == x.attempt and "detection_s" in rec:
                parts, start = rec, x.time
        if parts is None and f.recovery is not None and f.injected_at is not None:
            first = min((y.attempt for y in failures if f.index in y.fault_indices), default=x.attempt)
            if first == x.attempt:
                parts, start = f.recovery.to_dict(), f.injected_at
        if parts is None:
            continue
        t = start - t0
        segs = []
        for p in PHASES:
            d = max(0.0, float(parts.get(f"{p}_s") or 0.0))
            segs.append((p, t, d))
            t += d
        out.append({"k": k, "fault": f.index, "segments": segs, "total": sum(d for _, _, d in segs)})
    return out


def timeline_plot(*, events: list[dict[str, Any]], faults: list[Any], failures: list[Any],
                  ranks: int) -> tuple[str, dict[str, Any]]:
    """A Gantt chart of the attempts per rank, with faults, failures, restarts and the recovery phases."""
    data = timeline_data(events, faults, failures)
    height = 1.6 + 0.42 * (ranks + 1)
    return _draw("timeline", 10, min(height, 12), _draw_timeline, data, ranks), data


def _draw_timeline(fig: Any, d: dict[str, Any], ranks: int) -> None:
    ax = fig.add_subplot()
    end = max(d["end"], 1e-3)
    # from the first rank up: the start-up before it (warming the spare ranks) is said, not drawn
    up = min((t0 for t0, _ in d["spans"].values()), default=0.0)
    begin = max(0.0, up - 0.03 * (end - up)) if up > 0.15 * end else 0.0
    width = max(end - begin, 1e-3)
    px_per_s = fig.get_figwidth() * fig.dpi * 0.85 / width
    lane = ranks  # the recovery lane, under the ranks
    for (r, a), (t0, t1) in sorted(d["spans"].items()):
        bar = ax.barh(r, max(t1 - t0, width * 0.002), left=t0, height=0.56, color=("#D7E9F7", "#B9D7EF")[a % 2],
                      edgecolor="#0072B2", lw=0.8, zorder=2)
        bar.patches[0].set_gid(f"timeline-attempt-{r}-{a}")
        st = sorted(d["steps"].get((r, a), []))
        if st and len(st) <= 400:  # beyond, the ticks would fill the bar (and the page)
            ax.vlines([t for t, _ in st], r - 0.2, r + 0.2, color="#0072B2", lw=0.6, zorder=3)
        width_px = (t1 - t0) * px_per_s
        steps_of = sorted({s for _, s in st})
        if len(steps_of) > 1 and len(steps_of) == steps_of[-1] - steps_of[0] + 1:
            label = f"attempt {a} · steps {steps_of[0]}–{steps_of[-1]}"
        else:  # a burn-in logs only each attempt's first step
            label = f"attempt {a}" + (f" · from step {steps_of[0]}" if steps_of else "")
        # under the bar: above it is where the fault markers go
        if width_px > len(label) * 6.2:
            ax.text(t0 + 0.5 * (t1 - t0), r + 0.31, label, ha="center", va="top", fontsize=8, color="#0B3D66", zorder=4)
        elif width_px > 22:
            ax.text(t0 + 0.5 * (t1 - t0), r + 0.31, f"a{a}", ha="center", va="top", fontsize=8, color="#0B3D66", zorder=4)
    for n, rs in enumerate(d["restarts"]):
        line = ax.axvline(rs["t"], color="#555555", ls=(0, (2, 2)), lw=1, zorder=1)
        line.set_gid(f"timeline-restart-{rs['n'] if rs['n'] is not None else n}")
        txt = ax.annotate(f"restart {rs['n'] if rs['n'] is not None else n + 1}", (rs["t"], 1),
                          xycoords=("data", "axes fraction"), xytext=(2, 3 + 11 * (n % 2)), textcoords="offset points",
                          fontsize=8, color="#555555", ha="left", va="bottom", annotation_clip=False)
        txt.set_gid(f"timeline-restart-{rs['n'] if rs['n'] is not None else n}-label")
    seen: set[str] = set()
    by_rank: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for f in sorted(d["faults"], key=lambda f: f["t"]):
        by_rank[f["rank"] if f["rank"] is not None else 0].append(f)
    for rank, fs in by_rank.items():
        levels = _tag_levels([f["t"] - begin for f in fs], [7.0 * len(str(f["index"])) + 14 for f in fs], px_per_s)
        for f, lvl in zip(fs, levels):
            color = OUTCOME_COLORS.get(f["outcome"], "#000000")
            (m,) = ax.plot([f["t"]], [rank - 0.42], "v", color=color, ms=8, mec="white", mew=0.6, zorder=6,
                           label=f"fault: {f['outcome']}" if f["outcome"] not in seen else None)
            seen.add(f["outcome"])
            m.set_gid(f"timeline-fault-{f['index']}")
            if _finite(f.get("duration")) and f["duration"] > 0:  # how long it lasted, in seconds
                band = ax.barh(rank, f["duration"], left=f["t"], height=0.8, color=color, alpha=0.3, lw=0, zorder=2.5)
                band.patches[0].set_gid(f"timeline-fault-{f['index']}-band")
            ax.annotate(f"#{f['index']}", (f["t"], rank - 0.42), xytext=(5, 1 + 9 * lvl), textcoords="offset points",
                        fontsize=7.5, color=color, va="bottom", zorder=6)
    for x in d["failures"]:
        rows = [x["rank"]] if x["rank"] is not None else list(range(ranks))
        (m,) = ax.plot([x["t"]] * len(rows), rows, "X", color="#000000", ms=8, mec="white", mew=0.6, zorder=7,
                       label="failure detected" if x["k"] == 0 else None)
        m.set_gid(f"timeline-failure-{x['k']}")
    for k, rb in enumerate(d["rollbacks"]):
        # a ring wide enough to hold the detector finding that usually comes with it
        (m,) = ax.plot([rb["t"]], [rb["rank"] if rb["rank"] is not None else 0], "o", mfc="white", mec="#882255",
                       mew=1.8, ms=11, zorder=7, label="rollback" if k == 0 else None)
        m.set_gid(f"timeline-rollback-{k}")
    for k, det in enumerate(d["detections"]):
        (m,) = ax.plot([det["t"]], [det["rank"] if det["rank"] is not None else 0], "D", color="#E69F00", mec="#000000",
                       mew=0.6, ms=5.5, zorder=8, label="detector finding" if k == 0 else None)
        m.set_gid(f"timeline-detection-{k}")
    phases_seen: set[str] = set()
    for rec in d["recoveries"]:
        for p, t, dur in rec["segments"]:
            if dur <= 0:
                continue
            bar = ax.barh(lane, dur, left=t, height=0.5, color=PHASE_COLORS[p], zorder=3,
                          label=p.replace("_", " ") if p not in phases_seen else None)
            phases_seen.add(p)
            bar.patches[0].set_gid(f"timeline-recovery-{rec['k']}-{p}")
        if rec["total"] * px_per_s > 38:
            first = rec["segments"][0][1]
            ax.text(first + rec["total"] / 2, lane + 0.3, f"{rec['total']:.2f} s", ha="center", va="top", fontsize=7.5,
                    color="#333333")
    if d["recoveries"]:
        ax.set_yticks(list(range(ranks)) + [lane], [f"rank {r}" for r in range(ranks)] + ["recovery"])
        ax.set_ylim(lane + 0.7, -1.25)
    else:  # no recovery lane to show
        ax.set_yticks(list(range(ranks)), [f"rank {r}" for r in range(ranks)])
        ax.set_ylim(ranks - 0.3, -1.25)
    ax.set_xlim(begin, end + 0.01 * width)
    ax.set_xlabel("seconds since the run started")
    if begin > 0:
        ax.annotate(f"ranks up at {up:.1f} s", (0, 0), xycoords="axes fraction", xytext=(2, 3),
                    textcoords="offset points", fontsize=8, color="#555555", va="bottom")
    ax.grid(axis="x", color="#EEEEEE", lw=0.8)
    ax.spines["left"].set_visible(False)
    ax.tick_params(axis="y", length=0)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.55 / (ranks + 1.5) - 0.12),
                  ncol=min(len(handles), 6), handlelength=1.5)


# -- campaigns, burn-ins, comparisons ----------------------------------------------------------------

def rates_plot(key: str, rows: list[dict[str, Any]], title: str = "") -> str:
    """Horizontal bars of rates with their 95 % intervals; rows: label, rate, ci95, k, n, color."""
    return _draw(key, 8.5, 0.9 + 0.38 * max(len(rows), 1), _draw_rates, key, rows, title)


def _draw_rates(fig: Any, key: str, rows: list[dict[str, Any]], title: str) -> None:
    ax = fig.add_subplot()
    ys = list(range(len(rows)))
    for y, row in zip(ys, rows):
        lo, hi = row["ci95"]
        bar = ax.barh(y, row["rate"], height=0.6, color=row.get("color", "#0072B2"), alpha=0.85, zorder=2)
        bar.patches[0].set_gid(f"{key}-bar-{y}")
        ax.errorbar([row["rate"]], [y], xerr=_err(row["rate"], lo, hi), fmt="none", ecolor="#222222",
                    elinewidth=1.2, capsize=4, zorder=3)
        ax.text(1.02, y, f"{row['rate']:.3f}  [{lo:.3f}, {hi:.3f}]  ({row['k']}/{row['n']})", va="center", fontsize=8.5,
                transform=ax.get_yaxis_transform(), clip_on=False)
    ax.set_yticks(ys, [_t(r["label"]) for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel("rate, with its 95 % Wilson interval")
    ax.grid(axis="x", color="#EEEEEE", lw=0.8)
    if title:
        ax.set_title(_t(title))


def scorecard_plot(scorecard: list[dict[str, Any]]) -> str:
    """The detector scorecard as a heat map: a row per target × bit class, a column per detector (its
    detection rate), and the silent escape (sdc) rate beside it."""
    rows = max(len(scorecard), 1)
    dets = sorted({d for row in scorecard for d in row["detectors"]})
    return _draw("scorecard", min(3.2 + 1.15 * (len(dets) + 1), 12), 1.3 + 0.5 * rows, _draw_scorecard, scorecard, dets)


def _draw_scorecard(fig: Any, scorecard: list[dict[str, Any]], dets: list[str]) -> None:
    import numpy as np  # lazy: numpy

    gs = fig.add_gridspec(1, 2, width_ratios=[max(len(dets), 1), 1], wspace=0.08)
    ax, ax_sdc = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    labels = [f"{r['target']} / {r['bit_class']}"
              + (f" ({r['pattern']})" if r.get("pattern", "single") != "single" else "") + f"  (n={r['trials']})"
              for r in scorecard]
    rates = np.array([[row["detectors"][d]["rate"] if d in row["detectors"] else np.nan for d in dets]
                      for row in scorecard] or [[np.nan]], dtype=float).reshape(len(scorecard) or 1, max(len(dets), 1))
    sdc = np.array([[row["sdc"]["rate"]] for row in scorecard] or [[np.nan]], dtype=float)
    im = ax.imshow(rates, cmap="cividis", vmin=0, vmax=1, aspect="auto")
    im.set_gid("scorecard-detectors")
    im2 = ax_sdc.imshow(sdc, cmap="Oranges", vmin=0, vmax=1, aspect="auto")
    im2.set_gid("scorecard-sdc")
    for i, row in enumerate(scorecard):
        for j, d in enumerate(dets):
            v = row["detectors"].get(d)
            if v is None:
                continue
            txt = f"{v['rate']:.2f}\n{v['detected']}/{row['trials']}"
            if v.get("median_latency_steps") is not None:
                txt += f" · +{v['median_latency_steps']} steps"
            ax.text(j, i, txt, ha="center", va="center", fontsize=9, color="white" if v["rate"] < 0.55 else "black",
                    gid=f"scorecard-cell-{i}-{j}")
        s = row["sdc"]
        ax_sdc.text(0, i, f"{s['rate']:.2f}\n{s['count']}/{row['trials']}", ha="center", va="center", fontsize=8,
                    color="white" if s["rate"] > 0.6 else "black", gid=f"scorecard-sdc-{i}")
    ax.set_xticks(range(len(dets)), [_t(d) for d in dets] or ["(no detector)"])
    ax.set_yticks(range(len(labels)), [_t(x) for x in labels] or [""])
    ax_sdc.set_xticks([0], ["sdc (silent)"])
    ax_sdc.set_yticks([])
    for a in (ax, ax_sdc):
        a.xaxis.tick_top()
        a.tick_params(length=0)
        for s in a.spines.values():
            s.set_visible(False)
    cb = fig.colorbar(im, ax=[ax, ax_sdc], orientation="horizontal", fraction=0.06, pad=0.04, aspect=40)
    cb.set_label("detection rate (cividis) · sdc rate (orange)", fontsize=8.5)


def recovery_phases_plot(by_fault: dict[str, dict[str, Any]]) -> str:
    """Recovery time per fault kind: the median of each phase stacked, the p90 and p99 of the total marked."""
    return _draw("phases", 9.5, 1.3 + 0.55 * max(len(by_fault), 1), _draw_phases, by_fault)


def _draw_phases(fig: Any, by_fault: dict[str, dict[str, Any]]) -> None:
    ax = fig.add_subplot()
    names = list(by_fault)
    for y, name in enumerate(names):
        rec = by_fault[name]["recovery_s"]
        left = 0.0
        for p in PHASES:
            v = (rec.get(f"{p}_s") or {}).get("p50")
            if not v:
                continue
            bar = ax.barh(y, v, left=left, height=0.55, color=PHASE_COLORS[p],
                          label=p.replace("_", " ") if y == 0 else None)
            bar.patches[0].set_gid(f"phases-{y}-{p}")
            left += v
        total = rec.get("total_s") or {}
        for q, marker in (("p90", "|"), ("p99", "d")):
            if total.get(q) is not None:
                ax.plot([total[q]], [y], marker, color="#000000", ms=10 if marker == "|" else 5, mew=2,
                        label=f"total {q}" if y == 0 else None, zorder=4)
        if total.get("p50") is not None:
            ax.text(max(left, total.get("p99") or 0) * 1.02 + 0.01, y,
                    f"p50 {total['p50']:.2f} s · p90 {total['p90']:.2f} · p99 {total['p99']:.2f} (n={total['n']})",
                    va="center", fontsize=8.5)
    ax.set_yticks(range(len(names)), [_t(n) for n in names])
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel("seconds (median of each phase, stacked)")
    xmax = max([((b["recovery_s"].get("total_s") or {}).get("p99") or 0) for b in by_fault.values()] + [0.1])
    ax.set_xlim(0, xmax * 1.9)
    ax.grid(axis="x", color="#EEEEEE", lw=0.8)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(names) < 3 else -0.12), ncol=7)


def health_plot(*, rollups: list[dict[str, Any]], ranks: list[dict[str, Any]], faults: Iterable[dict[str, Any]],
                straggler_ratio: float) -> str:
    """Each rank's median compute time per step over the burn-in (one point per roll-up period), the
    straggler threshold, the faults as they fired, and each rank's final verdict."""
    return _draw("health", 10, 3.8, _draw_health, rollups, ranks, list(faults), straggler_ratio)


def _draw_health(fig: Any, rollups: list[dict[str, Any]], ranks: list[dict[str, Any]], faults: list[dict[str, Any]],
                 straggler_ratio: float) -> None:
    ax = fig.add_subplot()
    verdict_style = {"healthy": ("#009E73", "o"), "degraded": ("#E69F00", "s"), "faulty": ("#D55E00", "X")}
    medians = []
    for r in ranks:
        rank = r["rank"]
        pts = [(p["elapsed_s"], p["ranks"][str(rank)]["median_compute_s"] * 1000) for p in rollups
               if str(rank) in p.get("ranks", {})]
        if not pts:
            continue
        color = RANK_COLORS[rank % len(RANK_COLORS)]
        (line,) = ax.plot([x for x, _ in pts], [y for _, y in pts], "-o", ms=3, lw=1.4, color=color, label=f"rank {rank}")
        line.set_gid(f"health-rank-{rank}")
        vcolor, vmark = verdict_style.get(r["verdict"], ("#000000", "o"))
        ax.plot([pts[-1][0]], [pts[-1][1]], vmark, ms=9, color=vcolor, mec="white", zorder=5)
        ax.annotate(f"rank {rank}: {r['verdict']}", pts[-1], xytext=(8, 0), textcoords="offset points", va="center",
                    fontsize=8.5, color=vcolor, fontweight="bold", annotation_clip=False, gid=f"health-verdict-{rank}")
        if r.get("median_compute_s"):
            medians.append(r["median_compute_s"] * 1000)
    if medians:
        line = ax.axhline(min(medians) * straggler_ratio, color="#D55E00", ls="--", lw=1,
                          label=f"straggler threshold ({straggler_ratio:.2f}× the best rank)")
        line.set_gid("health-threshold")
    seen: set[str] = set()
    for f in faults:
        if f.get("fired_at_s") is None:
            continue
        color = OUTCOME_COLORS.get(f.get("outcome"), "#000000")
        ax.plot([f["fired_at_s"]], [0], "|", ms=12, mew=2, color=color, transform=ax.get_xaxis_transform(),
                clip_on=False, label=f"fault: {f.get('outcome')}" if f.get("outcome") not in seen else None,
                gid=f"health-fault-{f['index']}")
        seen.add(f.get("outcome"))
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds into the burn-in")
    ax.set_ylabel("median compute per step (ms)")
    ax.grid(axis="y", color="#EEEEEE", lw=0.8)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)


def compare_plot(comparison: dict[str, Any]) -> str:
    """Both sides of a comparison with their intervals (rates), and the difference B - A with its
    interval against the `same` margin."""
    rates = [m for m in comparison["metrics"] if "rate" in m["a"]]
    return _draw("compare", 10, 1.2 + 0.62 * max(len(rates), 1), _draw_compare, comparison, rates)


def _draw_compare(fig: Any, c: dict[str, Any], rates: list[dict[str, Any]]) -> None:
    verdict_colors = {"better": "#009E73", "worse": "#D55E00", "same": "#0072B2", "different": "#CC79A7",
                      "not comparable": "#8C8C8C"}
    ax, axd = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2], "wspace": 0.08})
    for y, m in enumerate(rates):
        for side, dy, color, marker in (("a", -0.15, "#56B4E9", "o"), ("b", 0.15, "#0072B2", "s")):
            s = m[side]
            lo, hi = s["ci95"]
            eb = ax.errorbar([s["rate"]], [y + dy], xerr=_err(s["rate"], lo, hi), fmt=marker, color=color,
                             ms=6, capsize=3, elinewidth=1.4, label=f"{side.upper()}: {_t(c[side])}" if y == 0 else None)
            eb.lines[0].set_gid(f"compare-{side}-{y}")  # the point (a gid for the whole would repeat on its bars)
        if m.get("ci95"):
            lo, hi = m["ci95"]
            color = verdict_colors.get(m["verdict"], "#000000")
            eb = axd.errorbar([m["difference"]], [y], xerr=_err(m["difference"], lo, hi), fmt="D",
                              color=color, ms=6, capsize=3, elinewidth=1.6)
            eb.lines[0].set_gid(f"compare-diff-{y}")
            axd.annotate(m["verdict"], (1, y), xycoords=("axes fraction", "data"), xytext=(6, 0),
                         textcoords="offset points", va="center", fontsize=8.5, color=color, fontweight="bold",
                         annotation_clip=False)
    axd.axvspan(-c["margin"], c["margin"], color="#0072B2", alpha=0.08, lw=0, label=f"±{c['margin']} (same)")
    axd.axvline(0, color="#555555", lw=0.8)
    ax.set_yticks(range(len(rates)), [_t(m["metric"]) for m in rates] or [""])
    ax.set_ylim(len(rates) - 0.5, -0.5)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("rate with its 95 % Wilson interval")
    axd.set_xlabel("B − A with its 95 % interval")
    lim = max([abs(v) for m in rates if m.get("ci95") for v in m["ci95"]] + [c["margin"] * 1.5, 0.1])
    axd.set_xlim(-lim * 1.1, lim * 1.1)
    for a in (ax, axd):
        a.grid(axis="x", color="#EEEEEE", lw=0.8)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(rates) < 4 else -0.12), ncol=2)
    axd.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(rates) < 4 else -0.12), ncol=1)
