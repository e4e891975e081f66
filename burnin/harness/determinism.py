"""`burnin check-determinism`: does a workload (burnin's or a loop's own) give the same bits twice?

Exact verdicts need a deterministic loop: its golden run is the loop without faults, and a recovered
run must reach that state bit for bit. This runs the scenario's workload twice without faults, each
step reporting a digest of every parameter, optimizer tensor and RNG state (`trace_state` in the
ranks' spec), and names the first step and the first states where the two runs part: the loss of a
rank, then which tensors. A loop that is not deterministic can still be judged in tolerance mode
(`workload.compare: tolerance`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from burnin.core.events import read_events
from burnin.errors import HarnessError
from burnin.harness.runner import new_run_id
from burnin.harness.supervisor import Supervisor
from burnin.scenarios.schema import Debug, Expect

__all__ = ["Divergence", "check_determinism"]


@dataclass
class Divergence:
    """Where two fault-free runs of one workload first differ (None: they agree)."""

    steps: int
    step: int | None = None
    rank: int | None = None
    loss_differs: bool = False
    tensors: list[str] = field(default_factory=list)   # the states that differ at that step, by name
    final_equal: bool = True
    rngs: list[str] = field(default_factory=list)      # RNGs that differed (from the first step on): unseeded

    @property
    def deterministic(self) -> bool:
        return self.step is None and self.final_equal

    def text(self) -> str:
        rng = (f"; note: {', '.join(self.rngs)} started from different states in each run (unseeded): harmless "
               f"unless the loop draws from them" if self.rngs else "")
        if self.deterministic:
            return f"deterministic: two fault-free runs agree bit for bit at every step ({self.steps} steps){rng}"
        if self.step is None:
            return "not deterministic: every step agrees but the final states differ"
        what = []
        if self.tensors:
            shown = ", ".join(self.tensors[:6]) + (f" and {len(self.tensors) - 6} more" if len(self.tensors) > 6 else "")
            what.append(f"states {shown}")
        if self.loss_differs:
            what.append("the loss")
        return (f"not deterministic: the runs part at step {self.step} on rank {self.rank}: "
                f"{' and '.join(what) or 'the step'} differ; judge it with workload.compare: tolerance, "
                f"or make the loop deterministic (seeds, torch.use_deterministic_algorithms, threads){rng}")


def _trace(run_dir: Path) -> tuple[dict[tuple[int, int], dict[str, Any]], dict[int, str]]:
    steps: dict[tuple[int, int], dict[str, Any]] = {}
    finals: dict[int, str] = {}
    for ev in read_events(run_dir / "events.jsonl"):
        if ev.get("event") == "step_done":
            steps[(ev["step"], ev["rank"])] = ev
        elif ev.get("event") == "rank_finished":
            finals[ev["rank"]] = ev["state_hash"]
    return steps, finals


def compare_traces(a: Path, b: Path) -> Divergence:
    sa, fa = _trace(a)
    sb, fb = _trace(b)
    div = Divergence(steps=len({s for s, _ in sa}), final_equal=bool(fa) and fa == fb)
    # The verdict compares the loss, the parameters and the optimizer state; an RNG the loop never draws
    # from may differ forever without changing a bit of those (Python's and numpy's, unseeded), so RNGs
    # are reported beside the divergence, not as one.
    rngs: set[str] = set()
    for key in sorted(set(sa) & set(sb)):
        x, y = sa[key], sb[key]
        dx, dy = x.get("digests") or {}, y.get("digests") or {}
        differ = {n for n in set(dx) | set(dy) if dx.get(n) != dy.get(n)}
        rngs |= {n for n in differ if n.startswith("rng.")}
        tensors = sorted(n for n in differ if not n.startswith("rng."))
        loss = x["loss_bits"] != y["loss_bits"]
        if (tensors or loss) and div.step is None:
            div.step, div.rank, div.loss_differs, div.tensors = key[0], key[1], loss, tensors
    div.rngs = sorted(rngs)
    return div


def check_determinism(scenario: Any, out_dir: Path, on_event: Callable[[dict[str, Any]], None] | None = None,
                      keep: bool = False) -> Divergence:
    """Run the scenario's workload twice without faults and compare them step by step."""
    clean = scenario.model_copy(update={"faults": [], "debug": Debug(), "expect": Expect(), "campaign": None,
                                        "burn_in": None,
                                        "recovery": scenario.recovery.model_copy(update={"max_restarts": 0})})
    root = out_dir / new_run_id(f"{scenario.name}-determinism")
    dirs = []
    try:
        for i in range(2):
            run_dir = root / f"run{i}"
            if on_event:
                on_event({"event": "determinism_run", "run": i + 1})
            ok = Supervisor(clean, run_dir, run_id=f"{root.name}-{i}", golden=True, on_event=on_event,
                            extra_spec=lambda: {"trace_state": True}).run()
            if not ok:
                raise HarnessError(f"fault-free run {i + 1} failed; see {run_dir}/events.jsonl and {run_dir}/ranks/")
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            dirs.append(run_dir)
        return compare_traces(dirs[0], dirs[1])
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
