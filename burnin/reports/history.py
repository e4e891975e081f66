"""The run history: every run, campaign and burn-in records itself in a local SQLite file.

Where: `--history PATH`, else `$BURNIN_HISTORY`, else `$XDG_DATA_HOME/burnin/history.sqlite`
(`~/.local/share/burnin/history.sqlite`). `BURNIN_HISTORY=off` records nothing.

What: one row per run in `runs` (kind, scenario, config hash, outcome counts, whether it passed,
versions of burnin, torch and triton, the machine, and the git commit and dirty flag of the
directory it was started from when that is a repository), one row per fault in `faults` (outcome,
recovery seconds, lost steps) and one per failure in `failures` (signature, cause, rank, step,
which fault explained it or none). A campaign's trials are rows of `faults` with their trial
number. Each record is one transaction (WAL journal, a busy timeout): concurrent runs interleave
whole records, never halves. No server.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import quote
from typing import Any

from burnin.errors import UserError, oneline
from burnin.reports.effects import harmful_escapes
from burnin.reports.trials import judge_trial

__all__ = ["history_path", "connect", "record_run", "record_campaign", "record_burn_in", "select_runs",
           "record_fleet", "node_record", "machine_info", "git_info", "cpu_model"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,              -- run | campaign | burn-in | fleet
    scenario TEXT NOT NULL,
    config_hash TEXT,
    started_at REAL NOT NULL,
    finished_at REAL,
    ok INTEGER NOT NULL,             -- every expectation held (a burn-in: every rank healthy)
    run_dir TEXT,
    burnin_version TEXT, torch_version TEXT, triton_version TEXT,
    machine TEXT,                    -- JSON: hostname, cpu, gpu
    git_commit TEXT, git_dirty INTEGER, cwd TEXT,
    figures TEXT                     -- JSON: outcome counts, rates, recovery percentiles
);
CREATE TABLE IF NOT EXISTS faults (
    run_id TEXT NOT NULL, idx INTEGER NOT NULL, trial INTEGER, fault TEXT NOT NULL, rank INTEGER, step INTEGER,
    outcome TEXT NOT NULL, detected_by TEXT, recovery_s REAL, lost_steps INTEGER, exact INTEGER
);
CREATE TABLE IF NOT EXISTS failures (
    run_id TEXT NOT NULL, trial INTEGER, attempt INTEGER, signature TEXT NOT NULL, cause TEXT, detector TEXT,
    rank INTEGER, step INTEGER, explained_by TEXT, time REAL
);
CREATE TABLE IF NOT EXISTS nodes (
    run_id TEXT NOT NULL, node TEXT NOT NULL, verdict TEXT NOT NULL, findings INTEGER NOT NULL, reasons TEXT
);
CREATE INDEX IF NOT EXISTS runs_scenario ON runs (scenario, started_at);
CREATE INDEX IF NOT EXISTS nodes_node ON nodes (node);
CREATE INDEX IF NOT EXISTS failures_signature ON failures (signature);
"""


def history_path(flag: str | None = None) -> Path | None:
    """The database file, None when recording is off."""
    value = flag or os.environ.get("BURNIN_HISTORY")
    if value == "off":
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "burnin" / "history.sqlite"


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA busy_timeout=30000")
    con.executescript(SCHEMA)
    return con


def check_history(path: Path, *, flag: str = "--history", must_exist: bool = False) -> None:
    """Bad input stops here, with one line and nothing created: a history that is a directory, a file
    that is not an SQLite database or not burnin's, or (`must_exist`, for the commands that read it) no
    file at all."""
    shown = oneline(path)
    if not path.exists():
        if must_exist:
            raise UserError(f"{flag}: no history at {shown}; record runs first (`burnin run` records each one), "
                            "or give the path of an existing history")
        return
    if not path.is_file():
        raise UserError(f"{flag}: {shown} is not a file; give the path of a burnin history (an SQLite file)")
    _tables(path, flag)


def _tables(path: Path, flag: str = "--history") -> set[str]:
    """The tables of an existing history, read-only; a one-line UserError when it is no SQLite database,
    or one that burnin did not write."""
    try:
        con = _read_only(path)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise UserError(f"{flag}: {oneline(path)} is not a burnin history ({oneline(exc)}); give the path of one, "
                        "or of a new file") from None
    if tables and "runs" not in tables:
        raise UserError(f"{flag}: {oneline(path)} is an SQLite database but not a burnin history (it has no runs "
                        "table); give the path of a history, or of a new file")
    return tables


def reader(path: Path) -> sqlite3.Connection:
    """A read-only connection to an existing history (reading never creates nor changes the file)."""
    if "runs" not in _tables(path):
        raise UserError(f"--history: {oneline(path)} is empty: no runs recorded yet")
    con = _read_only(path)
    con.row_factory = sqlite3.Row
    return con


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{quote(str(path.absolute()))}?mode=ro", uri=True, timeout=30.0)


def cpu_model() -> str:
    """The CPU's model name (what makes float results differ between machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {"hostname": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version()}


def git_info(cwd: str | Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository `cwd` is in; (None, None) outside one or without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def _versions() -> dict[str, str | None]:
    out = {}
    for name in ("burnin", "torch", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _write(path: Path | None, run: dict[str, Any], faults: list[tuple], failures: list[tuple]) -> None:
    """One record, in one transaction. A history that cannot be written is a warning, never a failed run."""
    if path is None:
        return

    v = _versions()
    commit, dirty = git_info(os.getcwd())
    row = {**run, "burnin_version": v["burnin"], "torch_version": v["torch"], "triton_version": v["triton"],
           "machine": json.dumps(machine_info()), "git_commit": commit,
           "git_dirty": None if dirty is None else int(dirty), "cwd": os.getcwd()}
    cols = ", ".join(row)
    try:
        con = connect(path)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("DELETE FROM faults WHERE run_id = ?", (row["run_id"],))
            con.execute("DELETE FROM failures WHERE run_id = ?", (row["run_id"],))
            con.execute(f"INSERT OR REPLACE INTO runs ({cols}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
            con.executemany("INSERT INTO faults VALUES (?,?,?,?,?,?,?,?,?,?,?)", faults)
            con.executemany("INSERT INTO failures VALUES (?,?,?,?,?,?,?,?,?,?)", failures)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()
    except (sqlite3.Error, OSError) as exc:
        print(f"burnin: warning: not recorded in the history {path}: {exc}", file=sys.stderr)


def record_run(result: Any, path: Path | None) -> None:
    """A judged `burnin run` (a RunResult)."""
    counts: dict[str, int] = {}
    for f in result.faults:
        if f.injected:
            counts[f.outcome] = counts.get(f.outcome, 0) + 1
    figures = {"outcomes": counts, "exact": result.exact, "restarts": result.restarts,
               "failed_expectations": [e.name for e in result.expectations if not e.ok]}
    run = {"run_id": result.run_id, "kind": "run", "scenario": result.scenario, "config_hash": result.config_hash,
           "started_at": result.started_at, "finished_at": result.finished_at,
           "ok": int(bool(result.ok and result.error is None)), "run_dir": result.run_dir,
           "figures": json.dumps(figures)}
    faults = [(result.run_id, f.index, None, f.fault, f.rank, f.step, f.outcome, f.detected_by,
               f.recovery.total_s if f.recovery else None, f.lost_steps, int(result.exact))
              for f in result.faults if f.injected]
    failures = [(result.run_id, None, x.attempt, x.signature, x.cause, x.detector, x.rank, x.last_step,
                 _explained(result, x), x.time) for x in result.failures]
    _write(path, run, faults, failures)


def _explained(result: Any, failure: Any) -> str | None:
    idx = failure.fault_indices or ([failure.fault_index] if failure.fault_index is not None else [])
    names = sorted({result.faults[i].fault for i in idx if i < len(result.faults)})
    return ",".join(names) or None


def record_campaign(summary: dict[str, Any], trials: list[dict[str, Any]], path: Path | None,
                    started_at: float, reference: dict[str, Any] | None = None) -> None:
    """A campaign: its summary's figures, and each trial as a fault row (with its failures for process trials;
    for a data-fault campaign, each harmful silent escape as a failure signed by its effect class)."""
    run_id = Path(summary["run_dir"]).name
    figures = {k: summary.get(k) for k in ("kind", "trials", "outcomes", "exact", "seed", "complete", "effects",
                                           "unchecked_effects")}
    if summary.get("detector_harm"):
        figures["detector_harm_any"] = summary["detector_harm"]["detectors"].get("any")
    if summary.get("kind") == "recovery":
        figures["recovery_s"] = summary["recovery_s"]["total_s"]
    ok = summary.get("complete", False) and (summary.get("failed_expectations", 0) == 0 if summary.get("kind") == "recovery"
                                             else not summary.get("error"))
    run = {"run_id": run_id, "kind": "campaign", "scenario": summary["scenario"], "config_hash": None,
           "started_at": started_at, "finished_at": time.time(), "ok": int(bool(ok)), "run_dir": summary["run_dir"],
           "figures": json.dumps(figures, default=str)}
    faults, failures = [], []
    for t in trials:
        f = t["fault"]
        rec = t.get("recovery") or {}
        outcome = t.get("outcome")
        if outcome is None:  # a data-fault trial: judged by the campaign's own rule
            j = judge_trial(t)
            outcome, detected = j["outcome"], (j["detectors"][0] if j["detectors"] else None)
        else:
            detected = t.get("detected_by")
        faults.append((run_id, t.get("template", 0), t["trial"], f["fault"], f.get("rank"), f.get("step"), outcome,
                       detected, rec.get("total_s"), t.get("lost_steps"), None if t.get("exact") is None else int(t["exact"])))
        for sig in t.get("unexplained") or []:
            failures.append((run_id, t["trial"], None, sig, None, None, None, None, None, None))
        if t.get("crash"):
            failures.append((run_id, t["trial"], None, t["crash"], "crash", "crash", f.get("rank"), f.get("step"),
                             f["fault"], None))
    if summary.get("noise_band") and reference is not None:
        for e in harmful_escapes(trials, reference, summary["noise_band"]):
            failures.append((run_id, e["trial"], None, e["signature"], "sdc", None, e["rank"], e["step"], e["fault"],
                             None))
    _write(path, run, faults, failures)


def record_burn_in(summary: dict[str, Any], result: Any, path: Path | None, started_at: float) -> None:
    run_id = Path(summary["run_dir"]).name
    figures = {"health": {str(r["rank"]): r["verdict"] for r in summary["health"]["ranks"]},
               "faults": summary["faults"]["by_outcome"], "goodput_steps": summary["steps"]["goodput_steps"],
               "duration_s": summary["duration_s"]}
    run = {"run_id": run_id, "kind": "burn-in", "scenario": summary["scenario"], "config_hash": None,
           "started_at": started_at, "finished_at": time.time(), "ok": int(bool(summary["ok"])),
           "run_dir": summary["run_dir"], "figures": json.dumps(figures)}
    faults = [(run_id, f["index"], None, f["fault"], f["rank"], f["step"], f["outcome"], f["detected_by"],
               f["recovery_s"], f["lost_steps"], None) for f in summary["faults"]["list"]]
    failures = [(run_id, None, x.attempt, x.signature, x.cause, x.detector, x.rank, x.last_step,
                 _explained(result, x), x.time) for x in result.failures]
    _write(path, run, faults, failures)


def record_fleet(fleet: dict[str, Any], path: Path | None) -> None:
    """A fleet burn-in: one runs row (kind fleet) and a row per node (its verdict and findings), so the next
    fleet knows which nodes keep failing."""
    if path is None:
        return
    run_id = fleet["fleet_id"]
    counts: dict[str, int] = {}
    for n in fleet["nodes"].values():
        counts[n["verdict"]] = counts.get(n["verdict"], 0) + 1
    run = {"run_id": run_id, "kind": "fleet", "scenario": fleet["scenario"] or "?", "config_hash": None,
           "started_at": fleet["started_at"] or time.time(), "finished_at": time.time(), "ok": int(bool(fleet["ok"])),
           "run_dir": fleet["fleet_dir"], "figures": json.dumps({"nodes": counts})}
    _write(path, run, [], [])
    try:
        con = connect(path)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("DELETE FROM nodes WHERE run_id = ?", (run_id,))
            con.executemany("INSERT INTO nodes VALUES (?,?,?,?,?)",
                            [(run_id, name, n["verdict"], len(n["reasons"]), json.dumps(n["reasons"]))
                             for name, n in sorted(fleet["nodes"].items())])
            con.execute("COMMIT")
        finally:
            con.close()
    except (sqlite3.Error, OSError) as exc:
        print(f"burnin: warning: nodes not recorded in the history {path}: {exc}", file=sys.stderr)


def node_record(path: Path | None, nodes: list[str], exclude: str | None = None) -> dict[str, dict[str, int]]:
    """Per node, over the fleets recorded before (`exclude`: the fleet being judged): how many it took part
    in, how many times it was not healthy, and its findings in all."""
    out = {n: {"fleets": 0, "not_healthy": 0, "findings": 0} for n in nodes}
    if path is None or not path.is_file() or "nodes" not in _tables(path):
        return out
    con = _read_only(path)
    try:
        for node, verdict, findings in con.execute(
                f"SELECT node, verdict, findings FROM nodes WHERE run_id != ? AND node IN ({','.join('?' * len(nodes))})",
                [exclude or "", *nodes]):
            rec = out[node]
            rec["fleets"] += 1
            rec["not_healthy"] += verdict != "healthy"
            rec["findings"] += findings
    finally:
        con.close()
    return out


def select_runs(path: Path, *, scenario: str | None = None, kind: str | None = None, commit: str | None = None,
                limit: int | None = None) -> list[dict[str, Any]]:
    """Runs, newest first, filtered."""
    if not path.exists() or "runs" not in _tables(path):
        return []
    con = _read_only(path)
    con.row_factory = sqlite3.Row
    try:
        where, args = [], []
        for col, val in (("scenario", scenario), ("kind", kind)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if commit is not None:
            where.append("git_commit LIKE ?")
            args.append(commit + "%")
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY started_at DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [dict(r) for r in con.execute(sql, args)]
    finally:
        con.close()


def failures_of(path: Path, run_ids: list[str]) -> list[dict[str, Any]]:
    if not path.exists() or not run_ids:
        return []
    con = reader(path)
    try:
        q = f"SELECT * FROM failures WHERE run_id IN ({', '.join('?' * len(run_ids))})"
        return [dict(r) for r in con.execute(q, run_ids)]
    finally:
        con.close()
