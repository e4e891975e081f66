"""A CPU cgroup of one's own: what gives each stand-in node of a local fleet its own share of the host's CPUs
(equal weights), and what makes one of them slow from outside (a CPU limit, or a CPU hog placed inside it).

cgroup v2 (`cpu.max`, `cpu.weight`) where the unified hierarchy has the cpu controller, else v1's cpu
controller (`cpu.cfs_quota_us`, `cpu.shares`). Needs root (or a delegated subtree); `available()` says
whether it can be had here and why not. A group is removed on `close()`: its processes go back to the
parent group first, so nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

__all__ = ["CpuGroup", "available", "sweep"]

_V2 = Path("/sys/fs/cgroup")
_V1 = Path("/sys/fs/cgroup/cpu")
_PERIOD_US = 100_000


def _root() -> tuple[Path, int] | None:
    """The directory new groups go under, and the cgroup version; None without a usable cpu controller."""
    ctl = _V2 / "cgroup.controllers"
    if ctl.is_file() and "cpu" in ctl.read_text().split():
        return _V2, 2
    if (_V1 / "cpu.shares").is_file():
        return _V1, 1
    return None


def available() -> str | None:
    """None when CPU cgroups can be made here, else why not (one line)."""
    found = _root()
    if found is None:
        return "no cgroup cpu controller is mounted (/sys/fs/cgroup)"
    root, _ = found
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (run as root, or with a delegated cgroup)"
    return None


def sweep() -> list[str]:
    """Remove the groups whose owner (the pid in their name) is gone and that hold no process: what a
    launcher killed before its teardown left. Returns the groups removed."""
    found = _root()
    removed: list[str] = []
    if found is None:
        return removed
    for path in found[0].glob("burnin-*"):
        owner = path.name.split("-")[1]
        if not owner.isdigit() or Path(f"/proc/{owner}").exists():
            continue
        try:
            if not (path / "cgroup.procs").read_text().split():
                path.rmdir()
                removed.append(path.name)
        except OSError:
            continue
    return removed


class CpuGroup:
    """A cgroup with the cpu controller, `burnin-<pid>-<name>` under the hierarchy's root (the pid: this
    process, its owner, so that `sweep` knows a group whose owner died)."""

    def __init__(self, name: str, *, weight: int = 100):
        found = _root()
        if found is None:
            raise OSError("no cgroup cpu controller is mounted (/sys/fs/cgroup)")
        root, self.version = found
        self.path = root / f"burnin-{os.getpid()}-{name}"
        self.path.mkdir(exist_ok=True)
        if self.version == 2:
            if "cpu" not in (root / "cgroup.subtree_control").read_text().split():
                (root / "cgroup.subtree_control").write_text("+cpu")
            (self.path / "cpu.weight").write_text(str(weight))
        else:
            (self.path / "cpu.shares").write_text(str(weight * 1024 // 100))

    def limit(self, cpus: float | None) -> None:
        """At most `cpus` CPUs' worth of time per period (None: no limit)."""
        if self.version == 2:
            (self.path / "cpu.max").write_text("max" if cpus is None else f"{int(cpus * _PERIOD_US)} {_PERIOD_US}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(_PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text("-1" if cpus is None else str(int(cpus * _PERIOD_US)))

    def add(self, pid: int) -> None:
        """Move process `pid` (and the children it makes from now on) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def kill(self, timeout_s: float = 10.0) -> None:
        """SIGKILL every process in the group, again until none is left (bounded): what a process group
        misses (children in sessions of their own) a cgroup holds all the same."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def close(self, timeout_s: float = 5.0) -> None:
        """Move what is left in the group back to the parent and remove the group (bounded)."""
        if not self.path.exists():
            return
        parent = self.path.parent / "cgroup.procs"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for pid in self.pids():
                try:
                    parent.write_text(str(pid))
                except OSError:
                    pass  # gone meanwhile
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)
