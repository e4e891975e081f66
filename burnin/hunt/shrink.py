"""`burnin shrink RUN_DIR`: the smallest scenario that fails the way a run failed.

The run's *failure key*: the run-level expectations it failed (exact, finish, max_restarts, no
unexplained failures, harness), the (fault, outcome) of each guilty fault (one the verdict found at
the root of the failure: `sdc` at or before the first divergent step, or `failed`), and the
signatures of the failures no fault explained. A candidate fails *the same way* when its key is the
original's: the same failed expectations and the same guilty faults. Faults the verdict cleared
(`masked` damage nothing read, `recovered` recoveries, `unjudged` faults after the divergence) are
not in the key, so nothing keeps them. The schedule is shrunk as data, never as a seed: delta debugging
(ddmin) over the fault list, then each remaining fault simplified (an earlier step, by bisection;
rank 0 for rank 1 when the workload allows fewer ranks), then the run shortened to just past its
last fault, then fewer ranks. Every candidate is a real run (its golden run cached by workload) on
one pool of warm spares; the search stops at `--max-runs`. It prints each step and writes the
smallest failing scenario as YAML that `burnin run` takes.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from burnin.errors import UserError
from burnin.harness.fabric import choose_fabric
from burnin.harness.runner import rebuild_reports, run_judged
from burnin.harness.spares import open_pool
from burnin.scenarios.schema import Scenario

__all__ = ["failure_key", "shrink"]


def failure_key(result: Any) -> set[str]:
    """What identifies how a run failed. A fault expectation counts only when the fault itself escaped
    (`sdc`: the verdict names it among the faults that can have caused the divergence) or ended the run
    (`failed`): a fault judged `detected` because the run as a whole did not end exact is a consequence,
    already in "final state equals golden"."""
    key = set()
    for e in result.expectations:
        if e.ok:
            continue
        if e.name.startswith("fault["):
            idx = int(e.name.split("[", 1)[1].split("]", 1)[0])
            f = result.faults[idx] if idx < len(result.faults) else None
            if f is not None and f.outcome in ("sdc", "failed"):
                key.add(f"fault {f.fault} -> {f.outcome}")
        else:
            key.add(e.name)
    for f in result.failures:
        if f.fault_index is None:
            key.add(f"unexplained {f.signature}")
    if result.error:
        key.add("harness error")
    return key


class Runner:
    """Runs candidate scenarios (each a real run, judged against its golden run) on one pool of warm
    spares, counting them against the budget."""

    def __init__(self, out: Path, max_runs: int, say: Callable[[str], None]):
        self.out, self.max_runs, self.say, self.runs = out, max_runs, say, 0
        self.pool: Any = None
        self.ranks = 0

    def _pool(self, sc: Scenario) -> Any:
        """The pool, made for the first candidate; None for a candidate with another number of ranks."""
        if self.pool is None:
            self.pool, _ = open_pool(sc, self.out, "shrink")
            self.ranks = sc.workload.ranks
        return self.pool if self.ranks == sc.workload.ranks else None

    def fails_same(self, data: dict[str, Any], key0: set[str], what: str) -> bool | None:
        """True/False; None when the budget is spent."""
        if self.runs >= self.max_runs:
            return None
        self.runs += 1
        sc = Scenario.model_validate(data)
        run_id = f"shrink-{self.runs:03d}"
        sc, fabric = choose_fabric(sc, run_id)
        result, _ = run_judged(sc, self.out / run_id, run_id, fabric=fabric,
                               pool=self._pool(sc) if fabric is None else None)
        key = failure_key(result)
        same = bool(key) and key == key0
        self.say(f"run {self.runs:>3}/{self.max_runs}: {what}: "
                 + ("fails the same way" if same else "passes" if not key else "fails otherwise: " + ", ".join(sorted(key))))
        return same

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def ddmin(items: list[Any], test: Callable[[list[Any]], bool | None]) -> list[Any]:
    """Zeller's delta debugging: a 1-minimal sublist for which `test` holds (None from `test`: stop)."""
    n = 2
    while len(items) >= 2:
        size = -(-len(items) // n)
        subsets = [items[k:k + size] for k in range(0, len(items), size)]
        found = None
        for sub in subsets:
            ok = test(sub)
            if ok is None:
                return items
            if ok:
                found, n = sub, 2
                break
        if found is None and len(subsets) > 2:
            for k in range(len(subsets)):
                comp = [x for m, s in enumerate(subsets) if m != k for x in s]
                ok = test(comp)
                if ok is None:
                    return items
                if ok:
                    found, n = comp, max(n - 1, 2)
                    break
        if found is not None:
            items = found
            continue
        if n >= len(items):
            break
        n = min(len(items), 2 * n)
    return items


def shrink(run_dir: str | Path, *, max_runs: int = 40, out_file: str | Path | None = None,
           say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    run_dir = Path(run_dir)
    try:
        data = json.loads((run_dir / "scenario.json").read_text())
        Scenario.model_validate(data)
    except (OSError, ValueError) as exc:
        raise UserError(f"shrink: {run_dir} is not a run directory (scenario.json: {' '.join(str(exc).split())[:200]})") \
            from None
    if data.get("campaign") or data.get("burn_in"):
        raise UserError(f"shrink: {run_dir} is a campaign or a burn-in; shrink a run (a burn-in's schedule.yaml, run "
                        "with `burnin run`, is one)")
    if not (run_dir / "events.jsonl").exists():
        raise UserError(f"shrink: {run_dir} has no events.jsonl; give the directory of a finished run")
    result = rebuild_reports(run_dir)
    key0 = failure_key(result)
    if not key0:
        raise UserError(f"shrink: the run in {run_dir} failed no expectation; there is nothing to shrink")
    say(f"failure key: {', '.join(sorted(key0))}")
    work = Path(tempfile.mkdtemp(prefix="burnin-shrink-"))
    runner = Runner(work, max_runs, say)
    original = list(data["faults"])
    steps_taken: list[str] = []

    def with_faults(fs: list[dict[str, Any]], d: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**(d or data), "faults": fs}

    try:
        faults = original
        # 1. delta debugging over the fault list (none at all first: the failure may need no fault)
        if faults and runner.fails_same(with_faults([]), key0, "no faults") is True:
            faults = []
        faults = ddmin(faults, lambda fs: runner.fails_same(with_faults(fs), key0, f"faults {_names(fs)}"))
        if len(faults) < len(original):
            steps_taken.append(f"{len(original)} faults -> {len(faults)}: {_names(faults)}")
        # 2. each fault at an earlier step (bisection), then on rank 0
        for i in range(len(faults)):
            lo, hi = 0, faults[i]["step"]
            while lo < hi and runner.runs < max_runs:
                mid = (lo + hi) // 2
                cand = [dict(f) for f in faults]
                cand[i]["step"] = mid
                try:
                    Scenario.model_validate(with_faults(cand))
                except ValueError:  # e.g. no checkpoint yet to damage at that step
                    lo = mid + 1
                    continue
                if runner.fails_same(with_faults(cand), key0, f"{faults[i]['fault']} at step {mid}"):
                    faults, hi = cand, mid
                else:
                    lo = mid + 1
            if faults[i].get("rank", 0) != 0 and runner.runs < max_runs:
                cand = [dict(f) for f in faults]
                cand[i]["rank"] = 0
                if runner.fails_same(with_faults(cand), key0, f"{faults[i]['fault']} on rank 0"):
                    faults = cand
        steps_taken += [f"{f['fault']}: rank {f.get('rank', 0)}, step {f['step']}" for f in faults]
        # 3. a shorter run, just past its last fault
        last = max([f["step"] for f in faults] or [0])
        short = max(last + 3, 4)
        if short < data["workload"]["steps"] and runner.runs < max_runs:
            cand = {**with_faults(faults), "workload": {**data["workload"], "steps": short}}
            try:
                Scenario.model_validate(cand)
                if runner.fails_same(cand, key0, f"{short} steps"):
                    data = {**data, "workload": {**data["workload"], "steps": short}}
                    steps_taken.append(f"shortened to {short} steps")
            except ValueError:
                pass
    finally:
        runner.close()
        shutil.rmtree(work, ignore_errors=True)
    smallest = with_faults(faults)
    smallest["name"] = (data["name"] + "-shrunk")[:64]
    text = (f"# shrunk from {run_dir.name} in {runner.runs} runs: fails the same way ({', '.join(sorted(key0))})\n"
            + yaml.safe_dump(Scenario.model_validate(smallest).model_dump(mode="json", exclude_none=True),
                             sort_keys=False))
    target = Path(out_file) if out_file else run_dir / "shrunk.yaml"
    target.write_text(text)
    return {"key": sorted(key0), "runs": runner.runs, "faults": len(faults), "from_faults": len(original),
            "steps": steps_taken, "scenario": str(target)}


def _names(fs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{f['fault']}@{f['step']}" for f in fs) or "none"
