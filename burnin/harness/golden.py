"""Golden runs: the fault-free reference every faulted run is judged against, bit for bit.

A golden run is a real run of the same workload with no faults. Its record (per-step loss bits
of every rank, the state hash at each checkpoint, the final state hash) is cached under a key that
hashes everything that changes the bits: the workload config, the torch and burnin versions, the
Python version and the CPU. Faults, checkpoint spacing and timeouts do not change the bits.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

from burnin.errors import HarnessError
from burnin.harness.events import read_events
from burnin.scenarios.schema import Debug, Expect, Scenario

__all__ = ["GoldenRecord", "cache_dir", "golden_key", "record_from_events", "get_golden"]


@dataclass
class GoldenRecord:
    key: str
    state_hash: str
    loss_bits: dict[str, dict[str, str]]      # rank -> step -> float32 bits (hex)
    checkpoint_hashes: dict[str, str]         # checkpoint step -> state hash
    final_loss: float | None
    loss_floor: float | None
    wall_s: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "GoldenRecord":
        return cls(**json.loads(text))


def cache_dir() -> Path:
    return Path(os.environ.get("BURNIN_CACHE_DIR") or Path.home() / ".cache" / "burnin")


def _environment() -> dict[str, Any]:
    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "none"

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": ver("torch"), "triton": ver("triton"), "burnin": ver("burnin"),
            "python": sys.version.split()[0], "machine": platform.machine(), "cpu": cpu, "code": _code_fingerprint()}


def _code_fingerprint() -> str:
    """Hash of the sources that decide a run's bits, so a cache written by other code is not trusted."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in ("harness/worker.py", "harness/workload.py", "harness/state.py", "harness/guard.py",
                "harness/campaign_worker.py", *sorted(str(p.relative_to(root)) for p in (root / "kernels").glob("*.py"))):
        path = root / rel
        if path.is_file():
            h.update(rel.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def golden_key(scenario: Scenario) -> str:
    return scenario.golden_key(extra={"env": _environment()})


def record_from_events(events: list[dict[str, Any]], key: str) -> GoldenRecord:
    """The golden record of a finished run's events (the last execution of each step counts)."""
    loss: dict[str, dict[str, str]] = {}
    ckpts: dict[str, str] = {}
    final: dict[int, str] = {}
    final_loss = floor = None
    t0 = t1 = None
    for ev in events:
        kind = ev.get("event")
        if kind == "run_started":
            t0 = ev["t"]
        elif kind == "run_finished":
            t1 = ev["t"]
        elif kind == "step_done":
            loss.setdefault(str(ev["rank"]), {})[str(ev["step"])] = ev["loss_bits"]
            if ev["rank"] == 0:
                final_loss = ev["loss"]
        elif kind == "checkpoint_saved":
            ckpts[str(ev["checkpoint_step"])] = ev["state_hash"]
        elif kind == "rank_finished":
            final[ev["rank"]] = ev["state_hash"]
        elif kind == "resumed" and ev.get("rank") == 0:
            floor = ev.get("loss_floor")
    if not final or len(set(final.values())) != 1:
        raise HarnessError(f"golden run did not finish with agreeing replicas: {final}")
    return GoldenRecord(key=key, state_hash=final[0], loss_bits=loss, checkpoint_hashes=ckpts,
                        final_loss=final_loss, loss_floor=floor, wall_s=(t1 or 0) - (t0 or 0))


def get_golden(scenario: Scenario, *, refresh: bool = False,
               on_event: Callable[[dict[str, Any]], None] | None = None) -> tuple[GoldenRecord, bool]:
    """The golden record for this scenario's workload, and whether it came from the cache."""
    from burnin.harness.supervisor import Supervisor

    key = golden_key(scenario)
    path = cache_dir() / "golden" / key / "golden.json"
    if path.is_file() and not refresh:
        try:
            return GoldenRecord.from_json(path.read_text()), True
        except (ValueError, TypeError):
            pass  # a damaged cache entry is recomputed, not trusted
    # A golden run that needs a restart is not a reference: it gets none.
    clean = scenario.model_copy(update={"faults": [], "debug": Debug(), "expect": Expect(),
                                        "recovery": scenario.recovery.model_copy(update={"max_restarts": 0})})
    run_dir = path.parent / f"run-{int(time.time())}-{os.getpid()}"
    sup = Supervisor(clean, run_dir, run_id=f"golden-{key}-{os.getpid()}", golden=True, on_event=on_event)
    if not sup.run():
        raise HarnessError(f"the golden (fault-free) run failed; see {run_dir}/events.jsonl and {run_dir}/ranks/")
    record = record_from_events(read_events(run_dir / "events.jsonl"), key)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(record.to_json())
    os.replace(tmp, path)
    return record, False
