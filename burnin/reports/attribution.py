"""Which injected faults explain a failure of the rank group, and which fault a detector finding pins.

One failure (one detection, one teardown, one restart) can explain several faults: two ranks killed
at the same step, a rank stopped while another is killed. The supervisor gathers evidence for a
moment after the first sign (each item: which watchdog saw what, on which rank, classified as a
cause), then every fault that is a candidate and whose effect that evidence shows is explained by
the failure. The rule, in full:

- Candidates are the faults that fired during the failed attempt and have not explained an
  earlier failure, plus recurring faults (a latent bug) whenever they have fired.
- A candidate is explained by an evidence item when the item's cause is one of the fault's
  `effects` and it appeared where the fault's effect shows (`effect_scope`): on the fault's
  target rank ("rank"), on any rank while the fault can still have that effect ("group", within
  `effect_window_s` of the injection), or, for "detector", when a detector finding of the same
  attempt pins the fault and the ranks raised `CorruptionDetected` (cause "corruption").
- The failure's primary fault (the one its recovery is reported under in the failure list) is the
  newest fault explaining the root evidence, else the newest explained fault.
- Evidence no candidate explains leaves the failure unexplained: an anomaly is reported, never
  pinned on a fault that could not have caused it. A harness error (a fault that could not be
  applied) is never attributed to a fault.

Torch-free: the supervisor and the verdict both import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

__all__ = ["Evidence", "Candidate", "explained_by", "pin_detection"]


@dataclass(frozen=True)
class Evidence:
    """One observation of a failure: which watchdog saw it, on which rank, classified as which cause."""

    detector: str
    rank: int | None
    cause: str
    detail: str
    time: float


@dataclass(frozen=True)
class Candidate:
    """A fault that may explain a failure: its index, target rank, effects and when it fired."""

    index: int
    step: int
    rank: int
    effects: tuple[str, ...]
    scope: str
    injected_at: float
    window_s: float | None = None


def explained_by(evidence: Sequence[Evidence], candidates: Iterable[Candidate],
                 pinned: set[int]) -> tuple[int | None, list[int]]:
    """(primary fault, every fault) that `evidence` explains; `pinned`: faults a detector finding
    of the attempt pins. The first item of `evidence` is the root, the others corroborate."""
    explained: list[Candidate] = []
    root_hits: list[Candidate] = []
    for c in candidates:
        hits = [e for e in evidence if _shows(c, e, pinned)]
        if hits:
            explained.append(c)
            if evidence and hits[0] is evidence[0]:
                root_hits.append(c)
    if not explained:
        return None, []

    def newest(cs: list[Candidate]) -> int:
        return max(cs, key=lambda c: (c.step, c.index)).index

    return newest(root_hits or explained), sorted(c.index for c in explained)


def _shows(c: Candidate, e: Evidence, pinned: set[int]) -> bool:
    if e.cause not in c.effects:
        return False
    if c.scope == "rank":
        return e.rank == c.rank
    if c.scope == "detector":
        return c.index in pinned
    # "group": anywhere, while the fault can still have that effect
    return e.time >= c.injected_at and (c.window_s is None or e.time <= c.injected_at + c.window_s)


def pin_detection(detection: dict[str, Any], first_injection: dict[int, float],
                  fault_ranks: Sequence[int], detector_scoped: Sequence[bool] | None = None) -> int | None:
    """The fault a detector finding is pinned on: the newest fault injected before it, preferring one
    aimed at a rank the detector named, and among those one whose effect a detector is what shows
    (`effect_scope == "detector"`: a bit flip, not a damaged checkpoint injected a moment later on the
    same rank). None: nothing was injected before it (a false alarm)."""
    before = [i for i, t in sorted(first_injection.items(), key=lambda x: x[1]) if t <= detection["t"]]
    if not before:
        return None
    odd = detection.get("odd_ranks") or []
    aimed = [i for i in before if fault_ranks[i] in odd] or before
    if detector_scoped is not None:
        aimed = [i for i in aimed if detector_scoped[i]] or aimed
    return aimed[-1]
