"""Where a rank is: its step and the last step point it passed, one 8-byte word in a small shared file.

The rank writes it at every point (`Position`); the supervisor reads it (`read_position`) when it fires
a fault at an instant rather than at a point (a burn-in's), to record the step and point it hit.
"""

from __future__ import annotations

import mmap
import os
import struct

__all__ = ["Position", "read_position"]

#: Points by number, for the position word (see Position): the step points, then the points inside a
#: sharded model's collectives (a fault on what a collective received fires at `<point>.out`: the same).
_POINTS = ("before_forward", "after_backward", "after_allreduce", "after_optimizer_step", "between_steps",
           "all_gather", "reduce_scatter", "replica_all_reduce", "tp_all_reduce")
_NUMBER = {**{p: i + 1 for i, p in enumerate(_POINTS)}, **{f"{p}.out": i + 1 for i, p in enumerate(_POINTS)}}
_SLOTS = 16  # points per step in the word (room for more)


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
        struct.pack_into("<q", self._mm, 0, step * _SLOTS + _NUMBER[point])


def read_position(path: str) -> tuple[int, str] | None:
    """(step, last point passed) of a rank's position file; None before its first point."""
    try:
        with open(path, "rb") as fh:
            (word,) = struct.unpack("<q", fh.read(8))
    except (OSError, struct.error):
        return None
    if word <= 0 or not 1 <= word % _SLOTS <= len(_POINTS):
        return None
    return word // _SLOTS, _POINTS[word % _SLOTS - 1]
