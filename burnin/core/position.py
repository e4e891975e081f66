"""Where a rank is: its step and the last step point it passed, one 8-byte word in a small shared file.

The rank writes it at every point (`Position`); the supervisor reads it (`read_position`) when it fires
a fault at an instant rather than at a point (a burn-in's), to record the step and point it hit.
"""

from __future__ import annotations

import mmap
import os
import struct

__all__ = ["Position", "read_position"]

#: Step points by number, for the position word (see Position).
_POINTS = ("before_forward", "after_backward", "after_allreduce", "after_optimizer_step", "between_steps")


class Position:
    """Where this rank is: its step and the last step point it passed, as one 8-byte word in a small
    shared file (`ranks/rank<r>.pos`), written at every point. The supervisor reads it when it fires a
    fault at an instant rather than at a point (a burn-in's), to record the step and point it hit."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, 8)
            self._mm = mmap.mmap(fd, 8)
        finally:
            os.close(fd)

    def set(self, step: int, point: str) -> None:
        struct.pack_into("<q", self._mm, 0, step * 8 + _POINTS.index(point) + 1)


def read_position(path: str) -> tuple[int, str] | None:
    """(step, last point passed) of a rank's position file; None before its first point."""
    try:
        with open(path, "rb") as fh:
            (word,) = struct.unpack("<q", fh.read(8))
    except (OSError, struct.error):
        return None
    if word <= 0:
        return None
    return word // 8, _POINTS[word % 8 - 1]
