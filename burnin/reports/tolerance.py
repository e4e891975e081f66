"""The arithmetic of a tolerance comparison, shared by the verdicts (burnin's own runs in tolerance mode,
and the runs of a system that recovers itself): loss bits as floats, relative differences, windows."""

from __future__ import annotations

import math
import struct
from collections import defaultdict

__all__ = ["bits_float", "rdiff", "windowed"]


def bits_float(bits: str) -> float:
    """A float32 loss from its bits (hex, as `step_done` carries them)."""
    return struct.unpack(">f", bytes.fromhex(bits))[0]


def rdiff(a: float, b: float) -> float:
    """|a - b| relative to b; infinite when either is not finite (a NaN never hides in a maximum)."""
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(b), 1e-12)


def windowed(means: dict[int, float], window: int) -> dict[int, float]:
    """Step means averaged over windows of `window` steps, keyed by each window's first step (a window
    counts the steps of it that were run)."""
    if window == 1:
        return means
    acc: dict[int, list[float]] = defaultdict(list)
    for step, value in means.items():
        acc[step - step % window].append(value)
    return {start: sum(v) / len(v) for start, v in acc.items()}
