"""The event log: one JSON object per line, written and flushed as things happen.

Each rank appends to its own stream; the supervisor tails those streams and appends every event,
its own included, to the run's `events.jsonl`. A process killed mid-write leaves at most one torn
last line, which readers skip, so the log of a run that died is still readable.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["EventWriter", "Tail", "read_events", "rotated"]


class EventWriter:
    """Appends events to a JSON-lines file. Flushed on every event; fsync optional (slow)."""

    def __init__(self, path: str | Path, *, fsync: bool = False, rotate_bytes: int = 0, **fixed: Any):
        """`rotate_bytes`: once the file holds more, it becomes `<name>.1` (replacing the one before) and a
        new file starts, so a stream written for hours keeps at most two generations on disk (`Tail`
        follows the rename)."""
        self.path = Path(path)
        self._rotate_bytes = rotate_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A writer killed mid-line left a torn last line: end it, or the first event appended now
        # would be glued to it and skipped with it.
        try:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
        except OSError:  # no file yet, or an empty one
            torn = False
        # Line-buffered text in append mode: each write is one line that reaches the OS at once.
        self._fh = open(self.path, "a", buffering=1, encoding="utf-8")
        if torn:
            self._fh.write("\n")
        self._fsync = fsync
        self._fixed = fixed
        self._written = self.path.stat().st_size if rotate_bytes else 0

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"t": time.time(), "event": event, **self._fixed, **fields}
        self.write(record)
        return record

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        self._fh.write(line)
        if self._fsync:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        if self._rotate_bytes:
            self._written += len(line)
            if self._written >= self._rotate_bytes:
                self._fh.close()
                os.replace(self.path, rotated(self.path))
                self._fh = open(self.path, "a", buffering=1, encoding="utf-8")
                self._written = 0

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rotated(path: Path) -> Path:
    """Where a rotated stream's previous generation lives."""
    return path.with_name(path.name + ".1")


class Tail:
    """Reads the complete lines appended to a file since the last call (the file may not exist yet).
    Follows a rotation (`EventWriter(rotate_bytes=...)`): the rest of the old generation first, then
    the new file from its start."""

    def __init__(self, path: str | Path, *, from_end: bool = False):
        """`from_end`: only what is appended from now on (what is there belongs to someone earlier)."""
        self.path = Path(path)
        self._offset = self.path.stat().st_size if from_end and self.path.exists() else 0
        self._inode = self.path.stat().st_ino if self.path.exists() else None
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        chunk = b""
        try:
            with open(self.path, "rb") as fh:
                inode = os.fstat(fh.fileno()).st_ino
                if self._inode is not None and inode != self._inode:
                    chunk = self._rest_of_rotated()  # the writer rotated: finish the old generation first
                    self._offset = 0
                self._inode = inode
                fh.seek(self._offset)
                chunk += (new := fh.read())
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        self._offset += len(new)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the rest
        return [rec for rec in map(_parse, lines) if rec is not None]

    def _rest_of_rotated(self) -> bytes:
        try:
            with open(rotated(self.path), "rb") as fh:
                if os.fstat(fh.fileno()).st_ino != self._inode:
                    return b""  # rotated twice since the last read: that generation is gone
                fh.seek(self._offset)
                return fh.read()
        except FileNotFoundError:
            return b""


def _parse(line: bytes) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None  # torn by a kill mid-write
    return rec if isinstance(rec, dict) else None


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every well-formed event in a JSON-lines file, in file order."""
    with open(path, "rb") as fh:
        return [rec for rec in map(_parse, fh) if rec is not None]


def iter_kind(events: list[dict[str, Any]], *kinds: str) -> Iterator[dict[str, Any]]:
    return (e for e in events if e.get("event") in kinds)
