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
import signal
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["state_dir", "register", "unregister", "kill_group", "sweep", "set_parent_death_signal"]


def state_dir() -> Path:
    d = Path(os.environ.get("BURNIN_STATE_DIR") or Path(tempfile.gettempdir()) / f"burnin-{os.getuid()}")
    (d / "runs").mkdir(parents=True, exist_ok=True)
    return d


def register(run_id: str, run_dir: Path, pids: list[int]) -> None:
    path = state_dir() / "runs" / f"{run_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "run_dir": str(run_dir), "supervisor_pid": os.getpid(),
                               "pids": pids}))
    os.replace(tmp, path)


def unregister(run_id: str) -> None:
    (state_dir() / "runs" / f"{run_id}.json").unlink(missing_ok=True)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by `pid` (ranks start their own session), then `pid` itself."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _run_id_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"BURNIN_RUN_ID="):
            return item.split(b"=", 1)[1].decode(errors="replace")
    return None


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
        if _alive(entry["supervisor_pid"]) and not force:
            report.append({"run_id": run_id, "action": "skipped", "why": "its supervisor is still running"})
            continue
        killed = []
        for pid in entry["pids"]:
            if _alive(pid) and _run_id_of(pid) == run_id:
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
        rid = _run_id_of(pid)
        if rid is None or not _is_worker(pid):
            continue
        try:
            ppid = int((proc / "stat").read_text().split(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == 1:  # orphaned: its supervisor is gone (never a rank of a live supervisor)
            kill_group(pid)
            report.append({"run_id": rid, "action": "cleaned", "killed": [pid], "orphan": True})
    return report


def _is_worker(pid: int) -> bool:
    try:
        return b"burnin.harness.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def set_parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if os.environ.get("BURNIN_WORKER_PDEATHSIG", "1") == "0":
        return  # tests turn it off to show that `burnin cleanup` alone removes leftovers
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    expected = os.environ.get("BURNIN_SUPERVISOR_PID")
    if expected and os.getppid() != int(expected):  # the parent died before the prctl took hold
        os.kill(os.getpid(), signal.SIGKILL)
