"""One run of a scenario, end to end: golden record, faulted run, verdict, reports, metrics.

This is what `burnin run` and the pytest plugin call. The run directory it leaves behind holds
everything: the scenario, the event log, each rank's stream and log, the checkpoints, the golden
record, and the reports, which `rebuild_reports` can produce again from the event log alone.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any, Callable

from burnin.harness.events import read_events
from burnin.harness.golden import GoldenRecord, get_golden, golden_key
from burnin.harness.supervisor import Supervisor
from burnin.reports.result import RunResult
from burnin.reports.verdict import judge
from burnin.scenarios.schema import Scenario

__all__ = ["run_scenario", "rebuild_reports", "new_run_id"]


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so teardown runs as it does for Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def run_scenario(scenario: Scenario, out_dir: str | Path = "runs", *, metrics_port: int | None = None,
                 metrics_addr: str = "127.0.0.1", on_event: Callable[[dict[str, Any]], None] | None = None,
                 refresh_golden: bool = False, run_id: str | None = None) -> RunResult:
    from burnin.reports.metrics import Metrics
    from burnin.reports.writers import write_reports

    run_id = run_id or new_run_id(scenario.name)
    run_dir = Path(out_dir).resolve() / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "scenario.json").write_text(scenario.model_dump_json(indent=1))
    metrics = Metrics()
    metrics.set_run(scenario.name, run_id)
    if metrics_port is not None:
        server = metrics.serve(metrics_port, metrics_addr)
        if on_event:
            on_event({"event": "metrics_serving", "url": server.url, "t": time.time()})
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    key = golden_key(scenario)
    golden: GoldenRecord | None = None
    error = None
    try:
        if on_event:
            on_event({"event": "golden_started", "key": key, "t": time.time()})
        golden, cached = get_golden(scenario, refresh=refresh_golden, on_event=on_event)
        (run_dir / "golden.json").write_text(golden.to_json())
        if on_event:
            on_event({"event": "golden_ready", "key": key, "cached": cached, "wall_s": golden.wall_s,
                      "t": time.time()})
        Supervisor(scenario, run_dir, run_id, metrics=metrics, on_event=on_event).run()
    except (KeyboardInterrupt, _Terminated) as exc:
        error = "interrupted by SIGINT" if isinstance(exc, KeyboardInterrupt) else "terminated by SIGTERM"
        _finish(scenario, run_dir, run_id, key, golden, error, metrics, write_reports)
        raise KeyboardInterrupt(error) from None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    result = _finish(scenario, run_dir, run_id, key, golden, error, metrics, write_reports)
    metrics.stop()
    return result


def _finish(scenario: Scenario, run_dir: Path, run_id: str, key: str, golden: GoldenRecord | None,
            error: str | None, metrics: Any, write_reports: Callable[..., Any]) -> RunResult:
    events_path = run_dir / "events.jsonl"
    events = read_events(events_path) if events_path.exists() else []
    result = judge(events, scenario, golden, run_id=run_id, run_dir=str(run_dir), config_hash=key, error=error)
    metrics.from_result(result)
    write_reports(result, run_dir)
    metrics.write_textfile(run_dir / "metrics.prom")
    return result


def rebuild_reports(run_dir: str | Path) -> RunResult:
    """Judge a run again from its event log, scenario and golden record, and rewrite its reports."""
    from burnin.reports.metrics import Metrics
    from burnin.reports.writers import write_reports

    run_dir = Path(run_dir)
    scenario = Scenario.model_validate(json.loads((run_dir / "scenario.json").read_text()))
    golden_path = run_dir / "golden.json"
    golden = GoldenRecord.from_json(golden_path.read_text()) if golden_path.exists() else None
    events = read_events(run_dir / "events.jsonl")
    end = [e for e in events if e.get("event") == "run_finished"]
    error = None if end else "the supervisor ended before the run did (no run_finished event)"
    result = judge(events, scenario, golden, run_id=run_dir.name, run_dir=str(run_dir),
                   config_hash=golden.key if golden else "unknown", error=error)
    metrics = Metrics()
    metrics.set_run(scenario.name, run_dir.name)
    for ev in events:
        metrics.observe(ev)
    metrics.from_result(result)
    write_reports(result, run_dir)
    metrics.write_textfile(run_dir / "metrics.prom")
    return result


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
