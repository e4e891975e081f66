"""Nothing outlives a run: a registry of live rank processes, and the sweep behind `burnin cleanup`.

The supervisor registers each attempt's rank pids in a small file under the state directory and
removes it after teardown. Ranks also ask the kernel to SIGKILL them when the supervisor dies
(PR_SET_PDEATHSIG). If a supervisor is SIGKILLed anyway, `burnin cleanup` finds its registry file,
checks that the supervisor is gone, and kills whatever of its ranks is left, recognising them by
the run id in their environment so a recycled pid is never hit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from burnin.core import snapshots as snapshot
from burnin.core.procs import EXTERNAL_SPEC_ENV, alive, environ_of, kill_group, process_start_time, run_id_of, state_dir

__all__ = ["register", "unregister", "register_network", "unregister_network", "sweep"]


def register(run_id: str, run_dir: Path, pids: list[int]) -> None:
    path = state_dir() / "runs" / f"{run_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "run_dir": str(run_dir), "supervisor_pid": os.getpid(),
                               "pids": pids}))
    os.replace(tmp, path)


def unregister(run_id: str) -> None:
    (state_dir() / "runs" / f"{run_id}.json").unlink(missing_ok=True)


# -- network namespaces (burnin.harness.fabric) ------------------------------------------------------
# A run's namespaces are recorded before they are created and forgotten once they are gone. Each
# namespace also carries "burnin run=<id> supervisor=<pid>:<start>" as the alias of its `lo`, so
# leftovers are found even when the record is lost or lives in another state directory.

_MARK = re.compile(r"burnin run=(\S+) supervisor=(\d+):(\S+)")
_PROBE_NS = re.compile(r"bn-(?:check|doctor)-(\d+)")


def register_network(run_id: str, namespaces: list[str]) -> None:
    d = state_dir() / "net"
    d.mkdir(exist_ok=True)
    tmp = d / f"{run_id}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id, "supervisor_pid": os.getpid(),
                               "supervisor_start": process_start_time(os.getpid()), "namespaces": namespaces}))
    os.replace(tmp, d / f"{run_id}.json")


def unregister_network(run_id: str) -> None:
    (state_dir() / "net" / f"{run_id}.json").unlink(missing_ok=True)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def _supervisor_alive(pid: int, start: str | None) -> bool:
    return alive(pid) and (start in (None, "?") or process_start_time(pid) == start)


def _remove_namespace(ns: str) -> list[int]:
    """Kill what still runs inside one of our namespaces, then delete it (its links and qdiscs go with it)."""
    pids = [int(p) for p in _ip("netns", "pids", ns).stdout.split() if p.isdigit()]
    for pid in pids:
        kill_group(pid)
    _ip("netns", "del", ns)
    return pids


def _sweep_networks(force: bool) -> list[dict[str, Any]]:
    if shutil.which("ip") is None:
        return []
    try:
        listed = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        return []
    report: list[dict[str, Any]] = []
    done: set[str] = set()
    for path in sorted((state_dir() / "net").glob("*.json")) if (state_dir() / "net").is_dir() else []:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        done.update(entry["namespaces"])
        if _supervisor_alive(entry["supervisor_pid"], entry.get("supervisor_start")) and not force:
            report.append({"run_id": entry["run_id"], "action": "skipped", "why": "its supervisor is still running"})
            continue
        gone = [ns for ns in entry["namespaces"] if ns in listed]
        killed = [pid for ns in gone for pid in _remove_namespace(ns)]
        path.unlink(missing_ok=True)
        report.append({"run_id": entry["run_id"], "action": "cleaned", "killed": killed, "namespaces": gone})
    # Marked namespaces nobody recorded here: removed once their supervisor is gone, never before.
    orphans: dict[str, list[str]] = {}
    for ns in listed:
        if not ns.startswith("bn-") or ns in done:
            continue
        probe = _PROBE_NS.fullmatch(ns)  # a throwaway namespace of a privilege check or `burnin doctor`
        if probe and not alive(int(probe.group(1))):
            _remove_namespace(ns)
            continue
        m = _MARK.search(_ip("-n", ns, "-o", "link", "show", "lo").stdout)
        if m and not _supervisor_alive(int(m.group(2)), m.group(3)):
            orphans.setdefault(m.group(1), []).append(ns)
    for run_id, names in orphans.items():
        killed = [pid for ns in names for pid in _remove_namespace(ns)]
        report.append({"run_id": run_id, "action": "cleaned", "killed": killed, "namespaces": names, "orphan": True})
    return report


def sweep(force: bool = False) -> list[dict[str, Any]]:
    """Kill the leftovers of every run whose supervisor is gone (all runs with `force`).

    Returns one record per run looked at: what was found and what was done.
    """
    report = []
    for path in sorted((state_dir() / "runs").glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        run_id = entry["run_id"]
        if alive(entry["supervisor_pid"]) and not force:
            report.append({"run_id": run_id, "action": "skipped", "why": "its supervisor is still running"})
            continue
        killed = []
        for pid in entry["pids"]:
            if alive(pid) and run_id_of(pid) == run_id:
                kill_group(pid)
                killed.append(pid)
        path.unlink(missing_ok=True)
        report.append({"run_id": run_id, "action": "cleaned", "killed": killed, "run_dir": entry["run_dir"]})
    # Orphaned ranks of runs that never registered (or whose file was lost): any process carrying a
    # run id whose parent is gone.
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        pid = int(proc.name)
        rid = run_id_of(pid)
        if rid is None or not _is_worker(pid):
            continue
        try:
            ppid = int((proc / "stat").read_text().split(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == 1:  # orphaned: its supervisor is gone (never a rank of a live supervisor)
            kill_group(pid)
            report.append({"run_id": rid, "action": "cleaned", "killed": [pid], "orphan": True})
    # Memory snapshots (/dev/shm/burnin-<run id>) of runs whose supervisor is gone.
    for item in snapshot.sweep(force=force):
        if item["action"] == "cleaned":
            report.append({"run_id": item["run_id"], "action": "cleaned", "killed": [],
                           "snapshots": item["path"]})
    return report + _sweep_networks(force)


def _is_worker(pid: int) -> bool:
    """A rank of burnin's (its worker), or any process of an external-recovery run (a torchft rank, an
    agent, the lighthouse: each carries the run's spec path in its environment)."""
    try:
        if b"burnin.rank.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return True
    except OSError:
        return False
    return EXTERNAL_SPEC_ENV in (environ_of(pid) or {})

