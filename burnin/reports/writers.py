"""The files a run leaves in its run dir (summary.json, junit.xml, summary.md) and its terminal summary.

Every file is written to a temporary name and renamed into place, so a reader (CI, a dashboard,
`burnin compare`) never sees half a report, even when the supervisor dies while writing.
"""

from __future__ import annotations

import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from burnin.core.files import atomic_write_text
from burnin.reports.html import write_run_report
from burnin.reports.result import SCHEMA_VERSION, FaultResult, RunResult, is_simulated, passed
from burnin.reports.verdict import exactness

__all__ = ["write_reports", "write_html_safely", "render_console", "render_plain", "failure_groups"]

_PHASES = ("detection", "teardown", "restart", "checkpoint_load", "first_step")


def write_reports(result: RunResult, run_dir: Path, *, html: bool = False, events: list[dict[str, Any]] | None = None,
                  golden: Any = None) -> dict[str, Path]:
    """Write summary.json, junit.xml, summary.md and (with `html`: a run's own directory) report.html into
    run_dir; returns {"json"|"junit"|"markdown"|"html": path}.

    report.html is written last, from the run directory's event log and golden record (or `events` and
    `golden` when given), and cannot cost the others: a plot that fails leaves a note in the page, and a
    page that fails altogether leaves a one-line warning on stderr and no "html" entry.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = {
        "json": run_dir / "summary.json",
        "junit": run_dir / "junit.xml",
        "markdown": run_dir / "summary.md",
    }
    atomic_write_text(out["json"], _summary_json(result))
    atomic_write_text(out["junit"], _junit_xml(result))
    atomic_write_text(out["markdown"], _summary_md(result))
    if html:
        page = write_html_safely(lambda: _run_html(result, run_dir, events, golden), run_dir / "report.html")
        if page is not None:
            out["html"] = page
    return out


def _run_html(result: RunResult, run_dir: Path, events: list[dict[str, Any]] | None, golden: Any) -> Path:
    return write_run_report(result, run_dir, events=events, golden=golden)


def write_html_safely(write: Any, where: Path) -> Path | None:
    """Run `write` (which writes a report.html) so that nothing it raises costs the caller's other reports:
    a failure is one warning line on stderr."""
    try:
        return write()
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        print(f"burnin: warning: {where} not written: {reason}", file=sys.stderr)
        return None



# -- summary.json ---------------------------------------------------------------------------------

def _json_safe(obj: Any) -> Any:
    # A NaN loss is a result worth keeping, but bare NaN/Infinity is not JSON that jq or
    # browsers accept; write it as a string that float() reads back.
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _summary_json(result: RunResult) -> str:
    d = result.to_dict()
    d = {"schema_version": d.pop("schema_version", SCHEMA_VERSION), **d}
    d["passed"] = passed(result)
    d["failure_groups"] = failure_groups(result)
    # default=str: a stray object in a fault's details must not cost the whole report.
    return json.dumps(_json_safe(d), indent=2, allow_nan=False, default=str) + "\n"


def failure_groups(result: RunResult) -> list[dict[str, Any]]:
    """The run's failures grouped by signature (one root cause, one group), the biggest first.

    Each group: signature, count, causes, ranks, steps (the step each failure interrupted: the
    first one not completed by every rank, in the order the failures happened; a step that comes
    back is a replay that failed again) and faults (the scenario faults it was attributed to).
    """
    groups: dict[str, dict[str, Any]] = {}
    for x in result.failures:
        g = groups.setdefault(x.signature, {"signature": x.signature, "count": 0, "causes": [], "ranks": [],
                                            "steps": [], "faults": []})
        g["count"] += 1
        for key, values in (("causes", [x.cause]), ("ranks", [x.rank]), ("faults", x.fault_indices)):
            for value in values:
                if value is not None and value not in g[key]:
                    g[key].append(value)
        # None: no rank completed a step of that attempt, so the step is not known from the events.
        g["steps"].append(x.last_step + 1 if x.last_step is not None else None)
    for g in groups.values():
        g["ranks"].sort()
        g["faults"].sort()
    # Stable: equal counts keep the order of their first failure.
    return sorted(groups.values(), key=lambda g: -g["count"])


# -- junit.xml ------------------------------------------------------------------------------------

# XML 1.0 forbids most control characters; rank stderr (ANSI colours, NULs) is full of them.
_XML_ILLEGAL = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _x(value: Any) -> str:
    return _XML_ILLEGAL.sub("?", "" if value is None else str(value))


def junit_xml(suite_name: str, cases: list[tuple[str, bool, str]] | list[tuple[str, bool, str, bool]], *,
              wall_s: float, started_at: float, properties: dict[str, Any], error: str | None = None,
              system_out: str = "") -> str:
    """A JUnit document of one suite: a testcase per (name, ok, message[, skipped]), plus a `harness` testcase
    with an <error> when a harness error ended the run (JUnit's <error> keeps it apart from a failed check);
    a check nothing could judge is <skipped>."""
    elements: list[ET.Element] = []
    failures = errors = skipped = 0
    for name, ok, message, *rest in cases:
        case = ET.Element("testcase", classname=_x(suite_name), name=_x(name), time="0")
        if rest and rest[0]:
            skipped += 1
            ET.SubElement(case, "skipped", message=_x(message))
        elif not ok:
            failures += 1
            failure = ET.SubElement(case, "failure", message=_x(message), type="expectation")
            failure.text = _x(message)
        elements.append(case)
    if error is not None:
        errors += 1
        case = ET.Element("testcase", classname=_x(suite_name), name="harness", time="0")
        err = ET.SubElement(case, "error", message=_x(error.splitlines()[0] if error else ""), type="harness")
        err.text = _x(error)
        elements.append(case)
    counts = {"tests": str(len(elements)), "failures": str(failures), "errors": str(errors), "skipped": str(skipped),
              "time": f"{max(wall_s, 0.0):.3f}"}
    root = ET.Element("testsuites", name="burnin", **counts)
    # The JUnit schema's timestamp has no zone; it is UTC.
    stamp = datetime.fromtimestamp(started_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    suite = ET.SubElement(root, "testsuite", name=_x(suite_name), timestamp=stamp, **counts)
    props = ET.SubElement(suite, "properties")
    for key, value in properties.items():
        ET.SubElement(props, "property", name=key, value=_x(value))
    suite.extend(elements)
    ET.SubElement(suite, "system-out").text = _x(system_out)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _junit_xml(result: RunResult) -> str:
    props = {key: getattr(result, key) for key in ("run_id", "config_hash", "final_state_hash", "golden_state_hash",
                                                   "device")}
    props["simulated"] = str(is_simulated(result)).lower()
    return junit_xml(f"burnin.{result.scenario}", [(e.name, e.ok, e.message, e.skipped) for e in result.expectations],
                     wall_s=result.wall_s, started_at=result.started_at, properties=props, error=result.error,
                     system_out=render_plain(result))


# -- summary.md -----------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:.3f}"
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines





def _fault_label(f: FaultResult) -> str:
    return f"fault[{f.index}] {f.fault}@rank{f.rank}:step{f.step}"





def _loss_line(result: RunResult) -> str:
    if result.final_loss is None:
        return "no final loss"
    if result.loss_floor is None:
        return f"final loss {result.final_loss:.4f}"
    return (f"final loss {result.final_loss:.4f} vs floor {result.loss_floor:.4f} "
            f"({result.final_loss - result.loss_floor:+.4f} nats/token)")


def _summary_md(result: RunResult) -> str:
    verdict = "PASS" if passed(result) else "FAIL"
    lines = [f"# burnin {result.scenario}: {verdict}" + (" (simulated)" if is_simulated(result) else ""), ""]
    if is_simulated(result):
        sims = [_fault_label(f) for f in result.faults if f.simulated]
        which = f": {', '.join(sims)}" if sims else ""
        lines += [f"> **simulated**: some faults in this run were simulated, not real{which}.", ""]
    if result.error:
        lines += [f"> **harness error**: {_cell(result.error)}", ""]
    lines += [
        f"- run `{result.run_id}` in `{result.run_dir}`",
        f"- {result.ranks} ranks on {result.device}, {result.steps} steps "
        f"(reached {result.final_step if result.final_step is not None else '-'}), wall {result.wall_s:.1f} s",
        f"- config hash `{result.config_hash}`",
        f"- exactness: {exactness(result)}",
        f"- loss: {_loss_line(result)}",
        f"- restarts: {result.restarts}; steps executed by rank 0: {result.steps_executed}",
        "",
    ]

    lines += ["## Faults", ""]
    if result.faults:
        rows = []
        for f in result.faults:
            outcome = f.outcome + ("" if f.ok else " ✗") + ("" if f.injected else " (not injected)")
            rows.append([f.index, f.fault + (" (simulated)" if f.simulated else ""), f.rank, f.step, f.point,
                         outcome, ", ".join(f.expected), f.detected_by,
                         f.recovery.total_s if f.recovery else None, f.lost_steps])
        lines += _table(["#", "fault", "rank", "step", "point", "outcome", "expected", "detected by",
                         "recovery s", "lost steps"], rows)
    else:
        lines.append("No faults in this scenario.")
    lines.append("")

    recovered = [f for f in result.faults if f.recovery is not None]
    if recovered:
        lines += ["## Recovery breakdown (seconds)", ""]
        rows = [[f.index, f.fault, *(getattr(f.recovery, f"{p}_s") for p in _PHASES), f.recovery.total_s,
                 f.recovery.resumed_from_step, f.recovery.new_ranks or "-"] for f in recovered]
        lines += _table(["#", "fault", *_PHASES, "total", "resumed from step", "new ranks"], rows)
        lines.append("")

    lines += ["## Failures", ""]
    if result.failures:
        rows = [[x.attempt, x.cause, x.rank, x.detector, x.detail, f"`{x.signature}`"] for x in result.failures]
        lines += _table(["attempt", "cause", "rank", "detector", "detail", "signature"], rows)
    else:
        lines.append("No failures.")
    lines.append("")
    groups = failure_groups(result)
    if groups:
        lines += ["## Failure groups", ""]
        rows = [[f"`{g['signature']}`", g["count"], ", ".join(g["causes"]), ", ".join(map(str, g["ranks"])) or "-",
                 ", ".join("?" if st is None else str(st) for st in g["steps"]) or "-", ", ".join(map(str, g["faults"])) or "unexplained"]
                for g in groups]
        lines += _table(["signature", "count", "causes", "ranks", "steps", "faults"], rows)
        lines.append("")

    if result.expectations:
        lines += ["## Expectations", ""]
        for e in result.expectations:
            mark = "NOT JUDGED" if e.skipped else "PASS" if e.ok else "FAIL"
            lines.append(f"- {mark} {_cell(e.name)}" + (f": {_cell(e.message)}" if e.message else ""))
        lines.append("")
    return "\n".join(lines)


# -- terminal -------------------------------------------------------------------------------------

def render_plain(result: RunResult) -> str:
    """A few plain lines for pipes and CI logs: one per fault, then PASS/FAIL and the run dir."""
    lines = []
    for f in result.faults:
        extra = []
        if f.recovery is not None:
            extra.append(f"recovery {f.recovery.total_s:.2f}s"
                         + (f" ({f.recovery.new_ranks})" if f.recovery.new_ranks else ""))
        if f.lost_steps is not None:
            extra.append(f"lost {f.lost_steps} steps")
        if f.simulated:
            extra.append("simulated")
        if not f.injected:
            extra.append("not injected")
        if f.details.get("why"):
            extra.append(str(f.details["why"]))
        verdict = "not judged" if f.outcome == "unjudged" else "ok" if f.ok else "UNEXPECTED"
        lines.append(f"{_fault_label(f)} {f.point} -> {f.outcome} (expected {'|'.join(f.expected)}) "
                     f"{verdict}" + (f" [{', '.join(extra)}]" if extra else ""))
    if result.tolerance is not None and not result.exact:
        lines.append(exactness(result))
    if result.error:
        lines.append(f"harness error: {result.error.splitlines()[0] if result.error.strip() else result.error}")
    tail = " (simulated)" if is_simulated(result) else ""
    if result.tolerance is not None and not result.exact:
        tail += " (not exact: tolerance mode)"
    lines.append(f"{'PASS' if passed(result) else 'FAIL'} {result.scenario} {result.run_dir}{tail}")
    return "\n".join(lines)


def render_console(result: RunResult):
    """A rich Panel summarising the run for the terminal."""
    ok = passed(result)
    table = Table(box=None, pad_edge=False, show_edge=False)
    for col, justify in (("#", "right"), ("fault", "left"), ("rank", "right"), ("step", "right"),
                         ("point", "left"), ("outcome", "left"), ("expected", "left"), ("detected by", "left"),
                         ("recovery s", "right"), ("lost", "right")):
        table.add_column(col, justify=justify)
    for f in result.faults:
        # Text, not str: a cell from the scenario must not be read as rich markup.
        name = Text(f.fault)
        if f.simulated:
            name.append(" (simulated)", style="yellow")
        table.add_row(Text(str(f.index)), name, Text(str(f.rank)), Text(str(f.step)), Text(f.point),
                      Text(f.outcome, style="green" if f.ok else "bold red"), Text(", ".join(f.expected)),
                      Text(f.detected_by or "-"), Text(f"{f.recovery.total_s:.2f}" if f.recovery else "-"),
                      Text("-" if f.lost_steps is None else str(f.lost_steps)))

    parts: list[Any] = []
    if is_simulated(result):
        parts.append(Text("simulated: some faults were simulated, not real", style="bold yellow"))
    if result.error:
        parts.append(Text(f"harness error: {result.error}", style="bold red"))
    if result.faults:
        parts.append(table)
    exact = exactness(result).replace("**", "").replace("`", "")
    parts.append(Text(f"exactness: {exact}"))
    parts.append(Text(f"loss: {_loss_line(result)}"))
    parts.append(Text(f"restarts: {result.restarts}, failures: {len(result.failures)}, "
                      f"wall {result.wall_s:.1f} s, run dir {result.run_dir}"))
    title = Text.assemble(("PASS" if ok else "FAIL", "bold green" if ok else "bold red"), f"  {result.scenario}")
    return Panel(Group(*parts), title=title, title_align="left", border_style="green" if ok else "red")
