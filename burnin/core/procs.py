"""Process state and death signals, and where burnin keeps its state: what the supervisor, the ranks and
`burnin cleanup` all need to know about processes, with no knowledge of either side.

A process is named for good by its pid and its start time (`process_start_time`), so a recycled pid
is never mistaken for the process a record names.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import tempfile
from pathlib import Path

from burnin.errors import HarnessError

__all__ = ["become_subreaper", "state_dir", "process_start_time", "proc_state", "alive", "run_id_of", "kill_group",
           "set_parent_death_signal", "run_tool", "first_line"]

_TOOL_TIMEOUT_S = 10.0


#: recovery.mode external: the path of the run's spec for its ranks, in the environment of every process of
#: the run (the lighthouse, the agents, the ranks), so the launcher and `burnin cleanup` find them all
EXTERNAL_SPEC_ENV = "BURNIN_EXTERNAL_SPEC"


def state_dir() -> Path:
    d = Path(os.environ.get("BURNIN_STATE_DIR") or Path(tempfile.gettempdir()) / f"burnin-{os.getuid()}")
    (d / "runs").mkdir(parents=True, exist_ok=True)
    return d


def process_start_time(pid: int) -> str:
    """When `pid` started, in clock ticks since boot: with the pid, it names one process for good."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by `pid` (ranks start their own session), then `pid` itself."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass


def proc_state(pid: int) -> str | None:
    """The one-letter state of a process (R, S, D, T, Z, ...), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b") ", 1)[1][:1].decode()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
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


def environ_of(pid: int) -> dict[str, str] | None:
    """A process's environment as it was started (None when it is gone or not ours to read)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item)


def run_id_of(pid: int) -> str | None:
    return (environ_of(pid) or {}).get("BURNIN_RUN_ID")


def set_parent_death_signal(parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere). The parent is the
    supervisor (`BURNIN_SUPERVISOR_PID`) unless `parent` says which: a pooled spare's is the pool server."""
    if os.environ.get("BURNIN_WORKER_PDEATHSIG", "1") == "0":
        return  # tests turn it off to show that `burnin cleanup` alone removes leftovers
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    expected = parent if parent is not None else os.environ.get("BURNIN_SUPERVISOR_PID")
    if expected and os.getppid() != int(expected):  # the parent died before the prctl took hold
        os.kill(os.getpid(), signal.SIGKILL)


def run_tool(argv: list[str], check: bool = True, timeout: float = _TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a system tool (`ip`, `tc`) with a bound on its time; HarnessError with its first error line when
    it fails (and `check`) or does not return."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"`{' '.join(argv)}` did not return within {timeout:g} s") from None
    if check and r.returncode != 0:
        raise HarnessError(f"`{' '.join(argv)}` failed: {first_line(r.stderr)}")
    return r


def first_line(text: str) -> str:
    return (text.strip().splitlines() or ["no error text"])[0]


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux >= 3.4), so that spares forked
    by a zygote are its children. False where the kernel refuses: then the pool stays off."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
