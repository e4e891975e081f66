"""Live progress of a run: a rich display on a terminal, plain lines in a pipe or CI log.

Both are fed the run's events as they happen; neither decides anything.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["make_progress", "PlainProgress", "RichProgress"]

# Events worth a line of their own, and how to say them.
_LINES = {
    "golden_started": lambda e: f"golden run {e['key']}: computing the fault-free reference",
    "golden_ready": lambda e: (f"golden run {e['key']}: " + ("cached" if e["cached"] else f"done in {e['wall_s']:.1f} s")),
    "metrics_serving": lambda e: f"metrics at {e['url']}",
    "attempt_started": lambda e: f"attempt {e['attempt']}: launching ranks",
    "fault_injected": lambda e: f"fault[{e['fault_index']}] {e['fault']} injected on rank {e['rank']} at step {e['step']} ({e['point']})",
    "failure_detected": lambda e: (f"failure: {e['cause']} on rank {e['rank']} by {e['detector']}: "
                                   f"{e['detail'].splitlines()[0][:120] if e['detail'] else ''}"
                                   + (f" (explains faults {e['fault_indices']})" if len(e.get("fault_indices") or []) > 1
                                      else "")),
    "fault_error": lambda e: f"fault[{e['fault_index']}] {e['fault']} could not be applied: {e['error'][:160]}",
    "recovery_abandoned": lambda e: f"not restarting: {e['reason']}",
    "checkpoint_rejected": lambda e: f"checkpoint {e['checkpoint_step']} rejected: {e['reason']}",
    "restart": lambda e: f"restart {e['attempt']}",
    "recovery_exhausted": lambda e: f"giving up after {e['restarts']} restarts",
    "run_finished": lambda e: "run finished" if e["finished"] else "run ended before its last step",
}


def _line(ev: dict[str, Any]) -> str | None:
    kind = ev.get("event")
    if kind == "resumed" and ev.get("rank") == 0:
        src = ev.get("from_step")
        what = "the in-memory snapshot of step" if ev.get("tier") == "memory" else "checkpoint"
        return f"resumed from {what} {src}" if src is not None else None
    fmt = _LINES.get(kind)
    if fmt is None or (kind == "attempt_started" and ev.get("golden")):
        return None
    try:
        return fmt(ev)
    except (KeyError, TypeError, AttributeError):
        return None


class PlainProgress:
    """One line per notable event, and the step count every tenth of the run."""

    def __init__(self, steps: int, stream: TextIO | None = None):
        self.steps, self.stream = steps, stream or sys.stderr
        self._every = max(1, steps // 10)
        self._t0 = time.time()
        self._golden = False

    def on_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "golden_started":
            self._golden = True
        elif kind == "golden_ready":
            self._golden = False
        if self._golden and kind not in ("golden_started",):
            return  # the golden run's own events are not the user's run
        text = _line(ev)
        if kind == "step_done" and ev.get("rank") == 0 and ((ev["step"] + 1) % self._every == 0):
            text = f"step {ev['step'] + 1}/{self.steps} loss {ev['loss']:.4f}"
        if text:
            self.stream.write(f"[{time.time() - self._t0:7.1f}s] {text}\n")
            self.stream.flush()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class RichProgress:
    """A progress bar with the run's counters, and the notable events scrolling above it."""

    def __init__(self, steps: int, title: str):
        self.console = Console(stderr=True)
        self.steps = steps
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console,
                                 transient=False)
        self._golden = self.progress.add_task("golden", total=steps, info="", visible=False)
        self._task = self.progress.add_task(title, total=steps, info="", visible=False)
        self._in_golden = False
        self._faults = self._restarts = 0
        self._loss = float("nan")

    def on_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "golden_started":
            self._in_golden = True
            self.progress.update(self._golden, visible=True, info="fault-free reference")
        elif kind == "golden_ready":
            self._in_golden = False
            self.progress.update(self._golden, completed=self.steps, visible=True,
                                 info="cached" if ev["cached"] else "computed")
            self.progress.update(self._task, visible=True)
        elif kind == "step_done" and ev.get("rank") == 0:
            task = self._golden if self._in_golden else self._task
            self._loss = ev["loss"]
            self.progress.update(task, completed=ev["step"] + 1)
        elif kind == "fault_injected" and not self._in_golden:
            self._faults += 1
        elif kind == "restart" and not self._in_golden:
            self._restarts += 1
        if not self._in_golden:
            self.progress.update(self._task, info=f"loss {self._loss:.3f}  faults {self._faults}  "
                                                  f"restarts {self._restarts}")
            text = _line(ev)
            if text and kind not in ("golden_started", "golden_ready"):
                self.progress.console.print(f"  {text}", markup=False, highlight=False)

    def __enter__(self) -> "RichProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


class CampaignProgress:
    """Trials done out of the total: a bar on a terminal, a line every tenth in a pipe."""

    def __init__(self, total: int, title: str):
        self.total, self.title = total, title
        self._every = max(1, total // 10)
        self._t0 = time.time()
        self._bar = None
        if sys.stderr.isatty():
            self._bar = Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task(title, total=total)

    def on_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind not in ("trial_done", "failure_detected", "campaign_reference", "restart"):
            return
        done = ev.get("trials_done", 0)
        if ev.get("trials_total"):  # the control trials of the noise band come after the trials
            self.total = ev["trials_total"]
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=self.total)
            return
        if kind == "trial_done" and done % self._every and done != self.total:
            return
        text = {"campaign_reference": "reference window ready",
                "failure_detected": f"a rank failed ({ev.get('cause')}); restarting",
                "restart": "restarted"}.get(kind, f"trials {done}/{self.total}")
        sys.stderr.write(f"[{time.time() - self._t0:7.1f}s] {text}\n")
        sys.stderr.flush()

    def __enter__(self) -> "CampaignProgress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def make_campaign_progress(total: int, title: str, *, quiet: bool = False) -> Any:
    return _Silent() if quiet else CampaignProgress(total, title)


def make_progress(steps: int, title: str, *, quiet: bool = False) -> Any:
    if quiet:
        return _Silent()
    if sys.stderr.isatty():
        return RichProgress(steps, title)
    return PlainProgress(steps)


class _Silent:
    def on_event(self, ev: dict[str, Any]) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: object) -> None:
        pass
