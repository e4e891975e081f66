"""One run of a scenario, end to end: golden record, faulted run, verdict, reports, metrics.

This is what `burnin run` calls, and what a Python caller uses. The run directory it leaves behind holds
everything: the scenario, the event log, each rank's stream and log, the checkpoints, the golden
record, and the reports, which `rebuild_reports` can produce again from the event log alone.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from burnin.core.events import read_events
from burnin.errors import UserError
from burnin.harness import torchrun
from burnin.harness.external import ExternalRun
from burnin.harness.fabric import choose_fabric
from burnin.harness.golden import GoldenRecord, get_golden, golden_cached, golden_key
from burnin.harness.preflight import check_device, check_out_dir
from burnin.harness.spares import open_pool
from burnin.harness.resume_from import install
from burnin.harness.supervisor import Supervisor, restarts_ranks
from burnin.reports import history as hist
from burnin.reports.metrics import Metrics
from burnin.reports.result import RunResult
from burnin.reports.verdict import judge
from burnin.reports.writers import write_reports
from burnin.scenarios.schema import Scenario

__all__ = ["run_scenario", "run_judged", "rebuild_reports", "new_run_id"]


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so teardown runs as it does for Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def run_scenario(scenario: Scenario, out_dir: str | Path = "runs", *, metrics_port: int | None = None,
                 metrics_addr: str = "127.0.0.1", on_event: Callable[[dict[str, Any]], None] | None = None,
                 refresh_golden: bool = False, run_id: str | None = None, metrics_linger_s: float = 0.0,
                 metrics_textfile: str | Path | None = None, pushgateway: str | None = None,
                 push_instance: str | None = None, history: str | None = None,
                 resume_from: Any = None) -> RunResult:
    # Bad input stops here, before anything starts and before the run directory exists: a missing
    # privilege, no CUDA device, an --out that cannot hold a run directory, a metrics port in use.
    run_id = run_id or new_run_id(scenario.name)
    scenario, fabric = choose_fabric(scenario, run_id)
    check_device(scenario)  # (torchft missing, for recovery.mode external: one line, before anything starts)
    external = scenario.recovery.mode == "external"
    out = check_out_dir(out_dir)
    metrics = Metrics()
    metrics.set_run(scenario.name, run_id)
    # The real server is bound before the run directory is made: no other process can take the port between.
    server = metrics.serve(metrics_port, metrics_addr) if metrics_port is not None else None
    run_dir = make_run_dir(out, run_id, scenario.model_dump_json(indent=1), metrics)
    if server is not None and on_event:
        on_event({"event": "metrics_serving", "url": server.url, "t": time.time()})
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    # the fault-free run to compare with: the scenario's own, or where it resumes another workload's
    # checkpoint, that workload's (resume_from.Source.reference)
    reference = resume_from.reference(scenario) if resume_from is not None else scenario
    key = golden_key(reference)
    golden: GoldenRecord | None = None
    error = usage = None
    pool = None
    try:
        if on_event:
            on_event({"event": "golden_started", "key": key, "t": time.time()})
        # A golden run to make shares the run's warm spares: one zygote's warm-up, not one per golden rank
        # plus the zygote's (where every rank runs alike: a namespace's zygote needs the fabric set up).
        lend = (refresh_golden or not golden_cached(reference)) and reference is scenario
        if lend and restarts_ranks(scenario) and getattr(fabric, "slots_alike", False):
            pool, _ = open_pool(scenario, run_dir, run_id, fabric)
        golden, cached = get_golden(reference, refresh=refresh_golden, on_event=on_event, pool=pool)
        (run_dir / "golden.json").write_text(golden.to_json())
        if on_event:
            on_event({"event": "golden_ready", "key": key, "cached": cached, "wall_s": golden.wall_s,
                      "t": time.time()})
        if resume_from is not None:  # another run's checkpoint: the newest of this run's (resume_from.install)
            install(resume_from, run_dir / "checkpoints")
        if external:  # the system under test recovers itself: launched, disturbed, watched
            launcher = ExternalRun(scenario, run_dir, run_id, on_event=on_event, metrics=metrics)
            launcher.run()
            if launcher.usage_error is not None:  # bad input a rank found: one line, exit 2
                usage = f"{scenario.workload.entry}: {launcher.usage_error} (run directory {run_dir})"
            supervisor = None
        else:
            supervisor = Supervisor(scenario, run_dir, run_id, metrics=metrics, on_event=on_event, fabric=fabric,
                                    pool=pool, resume_from=resume_from)
            supervisor.run()
        if supervisor is not None and supervisor.usage_error is not None:
            usage = f"{scenario.workload.entry or scenario.name}: {supervisor.usage_error} (run directory {run_dir})"
    except (KeyboardInterrupt, _Terminated) as exc:
        if pool is not None:
            pool.close()
            pool = None
        error = "interrupted by SIGINT" if isinstance(exc, KeyboardInterrupt) else "terminated by SIGTERM"
        _finish(scenario, run_dir, run_id, key, golden, error, metrics, write_reports, history)
        _export_metrics(metrics, scenario.name, metrics_textfile, pushgateway, push_instance)
        metrics.stop()
        raise KeyboardInterrupt(error) from None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, UserError):  # the golden run's rank found bad input
            usage = str(exc)
    finally:
        if pool is not None:
            pool.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    result = _finish(scenario, run_dir, run_id, key, golden, error, metrics, write_reports, history)
    _export_metrics(metrics, scenario.name, metrics_textfile, pushgateway, push_instance)
    try:
        metrics.stop(linger_s=metrics_linger_s)
    except KeyboardInterrupt:  # the run is over and reported: Ctrl-C only cuts the linger short
        metrics.stop()
    if usage is not None:  # bad input only a rank could see (a loop's own model): one line, exit 2
        raise UserError(usage)
    return result


def run_judged(scenario: Scenario, run_dir: Path, run_id: str, *, golden: GoldenRecord | None = None,
               pool: Any = None, fabric: Any = None, metrics: Any = None,
               judged_as: str | None = None) -> tuple[RunResult, list[dict[str, Any]]]:
    """One supervised run in `run_dir` (its ranks forked from `pool` when given, a pool that outlives it),
    judged against its golden run (`golden`, or the cached one): what a campaign trial or a shrink
    candidate is. Returns the result and the run's events; writes no reports."""
    golden = golden if golden is not None else get_golden(scenario)[0]
    Supervisor(scenario, run_dir, run_id, metrics=metrics, fabric=fabric, pool=pool).run()
    events = read_events(Path(run_dir) / "events.jsonl")
    result = judge(events, scenario, golden, run_id=judged_as or run_id, run_dir=str(run_dir),
                   config_hash=golden_key(scenario))
    return result, events


def make_run_dir(out: Path, run_id: str, scenario_json: str, metrics: Any = None) -> Path:
    """Create out/run_id (and out, if missing) with scenario.json in it; on failure remove what was
    made, stop `metrics`' server, and raise a one-line UserError."""

    run_dir = out / run_id
    # The outermost directory this call creates; None if run_dir is there already (never removed).
    first_new = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
        (run_dir / "scenario.json").write_text(scenario_json)
    except OSError as exc:
        if first_new is not None and first_new.exists():
            shutil.rmtree(first_new, ignore_errors=True)
        if metrics is not None:
            metrics.stop()
        raise UserError(f"--out: cannot create the run directory {run_dir}: {exc.strerror or exc}; "
                        "give a writable directory") from None
    return run_dir


def _export_metrics(metrics: Any, scenario: str, textfile: str | Path | None, pushgateway: str | None,
                    push_instance: str | None) -> None:
    """Send the judged run's metrics where the user asked, besides the run directory's metrics.prom.

    Neither is part of the verdict: a failure is one warning line on stderr, and the run's exit
    status stands (a CI job must not fail because its monitoring is down).
    """
    if textfile is not None:
        try:
            metrics.write_textfile(textfile)
        except OSError as exc:
            print(f"burnin: warning: metrics textfile {textfile} not written: {exc}", file=sys.stderr)
    if pushgateway:
        try:
            metrics.push(pushgateway, scenario, push_instance or socket.gethostname())
        except Exception as exc:  # urllib's errors, timeouts, a refused connection: all just a warning
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            print(f"burnin: warning: metrics not pushed to {pushgateway}: {reason}", file=sys.stderr)


def _finish(scenario: Scenario, run_dir: Path, run_id: str, key: str, golden: GoldenRecord | None,
            error: str | None, metrics: Any, write_reports: Callable[..., Any],
            history: str | None = None) -> RunResult:
    events_path = run_dir / "events.jsonl"
    events = read_events(events_path) if events_path.exists() else []
    result = judge(events, scenario, golden, run_id=run_id, run_dir=str(run_dir), config_hash=key, error=error)
    metrics.from_result(result)
    write_reports(result, run_dir, html=True, events=events, golden=golden)
    metrics.write_textfile(run_dir / "metrics.prom")
    hist.record_run(result, hist.history_path(history))
    return result


def rebuild_reports(run_dir: str | Path, on_event: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Judge a run again from its event log, scenario and golden record, and rewrite its reports. A torchrun
    run (burnin/harness/torchrun.py) has its event log assembled from its ranks' streams first, and its
    golden run made (or taken from the cache) the first time."""
    run_dir = Path(run_dir)
    scenario = Scenario.model_validate(json.loads((run_dir / "scenario.json").read_text()))
    golden_path = run_dir / "golden.json"
    if torchrun.is_torchrun_run(run_dir):
        torchrun.assemble(run_dir, scenario)
        if not golden_path.exists():
            if on_event:
                on_event({"event": "golden_started", "key": golden_key(scenario), "t": time.time()})
            golden_path.write_text(get_golden(scenario, on_event=on_event)[0].to_json())
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
    write_reports(result, run_dir, html=True, events=events, golden=golden)
    metrics.write_textfile(run_dir / "metrics.prom")
    return result


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
