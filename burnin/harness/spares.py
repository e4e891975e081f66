"""Warm spare ranks: processes that have paid a rank's start-up before they are needed.

A restart used to start a new interpreter per rank on the critical path: Python, `import torch`,
`torch.use_deterministic_algorithms` and the first AdamW step (each importing torch._dynamo), the
Triton kernel, the fault registry: ~2.5 s of the ~3 s a killed rank cost. A spare does all of it
ahead of need (`burnin.harness.worker.warm_up`), then blocks on its stdin for an assignment: one
line, the path of a JSON file with the rank's environment (RANK, MASTER_PORT, BURNIN_SPEC, ...) and
its log. From then on it is that rank, indistinguishable from one started cold.

The pool keeps one spare per rank slot, because a slot may need what only its own process can
have (with the namespace fabric, a rank lives in its own network namespace: the spare is started
inside it, by the fabric's command). A restart tears the whole group down and hands every rank of
the new attempt to a spare; the pool starts replacements at once, in the background, and they warm
up while the new attempt trains. A slot whose spare is still warming (two failures back to back) is
handed that spare anyway (it becomes the rank as soon as it is warm, sooner than a cold start), and
the `spare_used` event says it was not ready. Spares obey the ranks' rules: they die with the
supervisor (PR_SET_PDEATHSIG), carry the run id for `burnin cleanup`, and are registered with the
attempt's pids. No torch here.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["Spare", "SparePool", "spare_memory_ok"]

#: What one spare costs in memory (resident set after the warm-up, measured on the tiny model on CPU:
#: ~270 MiB; benchmarks/recovery.py reports it), with a margin: the pool is on by default only where
#: this much per rank is available.
SPARE_BUDGET_BYTES = 512 << 20


@dataclass
class Spare:
    slot: int
    proc: subprocess.Popen
    started: float
    ready_file: Path

    @property
    def ready(self) -> bool:
        return self.ready_file.exists()

    def warm_s(self) -> float | None:
        try:
            return float(self.ready_file.read_text())
        except (OSError, ValueError):
            return None


def spare_memory_ok(ranks: int) -> bool:
    """Whether this machine has the memory for one spare per rank beside the ranks themselves."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 > 2 * ranks * SPARE_BUDGET_BYTES
    except (OSError, ValueError, IndexError):
        pass
    return False


class SparePool:
    def __init__(self, run_dir: Path, run_id: str, fabric: Any, python: str, env: dict[str, str],
                 argv_tail: list[str], emit: Callable[..., Any]):
        self.dir = run_dir / "ranks"
        self.run_id, self.fabric, self.python, self.env = run_id, fabric, python, env
        self.argv_tail = argv_tail      # --spare DEVICE THREADS KERNELS
        self.emit = emit
        self.spares: dict[int, Spare] = {}
        self._count = 0
        self.closed = False

    def fill(self, slots: range) -> None:
        """Start a spare for each slot that has none (or whose spare died)."""
        for slot in slots:
            spare = self.spares.get(slot)
            if spare is not None and spare.proc.poll() is None:
                continue
            if spare is not None:  # a spare that died while waiting: say so, start another
                self.emit("spare_lost", slot=slot, pid=spare.proc.pid, returncode=spare.proc.returncode)
                self._reap(spare)
            self.spares[slot] = self._start(slot)

    def take(self, slot: int) -> tuple[subprocess.Popen | None, dict[str, Any]]:
        """The spare for `slot` (None: there is none), and what to report about it."""
        spare = self.spares.pop(slot, None)
        if spare is None or spare.proc.poll() is not None:
            if spare is not None:
                self._reap(spare)
            return None, {"slot": slot, "why": "no spare for this slot (it died, or the pool is off)"}
        ready = spare.ready
        info = {"slot": slot, "pid": spare.proc.pid, "ready": ready, "age_s": round(time.time() - spare.started, 3)}
        if ready:
            info["warm_s"] = spare.warm_s()
        else:
            info["why"] = "its spare was still warming up (started %.2f s before)" % (time.time() - spare.started)
        return spare.proc, info

    def assign(self, proc: subprocess.Popen, rank: int, attempt: int, env: dict[str, str], log: Path) -> None:
        """Make the spare `proc` rank `rank` of `attempt`."""
        path = self.dir / f"assign-a{attempt}-r{rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"env": env, "log": str(log)}))
        os.replace(tmp, path)
        proc.stdin.write(f"{path}\n".encode())
        proc.stdin.flush()

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.spares.values() if s.proc.poll() is None]

    def ready_count(self) -> int:
        return sum(1 for s in self.spares.values() if s.proc.poll() is None and s.ready)

    def close(self) -> None:
        """Stop every spare: closing stdin ends a warm one; a kill ends the rest."""
        from burnin.harness import cleanup

        self.closed = True
        for spare in self.spares.values():
            try:
                spare.proc.stdin.close()
            except OSError:
                pass
        deadline = time.time() + 1.0
        for spare in self.spares.values():
            try:
                spare.proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                cleanup.kill_group(spare.proc.pid)
                spare.proc.wait(timeout=30)
            self._reap(spare)
        self.spares.clear()

    # -- internals ------------------------------------------------------------------------------

    def _start(self, slot: int) -> Spare:
        self._count += 1
        ready = self.dir / f"spare{slot}-{self._count}.ready"
        ready.unlink(missing_ok=True)
        env = {**self.env, **self.fabric.rank_env(slot), "BURNIN_SPARE_READY": str(ready)}
        argv = self.fabric.rank_command(slot, [self.python, "-m", "burnin.harness.worker", *self.argv_tail])
        with open(self.dir / f"spare{slot}.log", "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        spare = Spare(slot, proc, time.time(), ready)
        self.emit("spare_started", slot=slot, pid=proc.pid)
        return spare

    @staticmethod
    def _reap(spare: Spare) -> None:
        spare.ready_file.unlink(missing_ok=True)
        if spare.proc.stdin:
            try:
                spare.proc.stdin.close()
            except OSError:
                pass
