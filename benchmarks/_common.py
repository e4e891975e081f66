"""What the benchmarks record about the machine they ran on: CPU pressure and a description."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any


def cpu_stall_us() -> int | None:
    """Microseconds some runnable task waited for a CPU since boot (Linux PSI), None without PSI."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(line.rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def pressure(stall_before: int | None, started: float) -> float | None:
    """Percent of the wall time since `started` in which some task waited for a CPU."""
    after = cpu_stall_us()
    if stall_before is None or after is None:
        return None
    return round(100 * (after - stall_before) / 1e6 / (time.time() - started), 1)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import torch

    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__}
