"""Golden runs: the fault-free reference every faulted run is judged against, bit for bit.

A golden run is a real run of the same workload with no faults. Its record (per-step loss bits
of every rank, the state hash at each checkpoint, the final state hash) is cached under a key that
hashes everything that changes the bits: the workload config, the torch and burnin versions, the
Python version and the CPU. Faults, checkpoint spacing and timeouts do not change the bits.

The cache (`$BURNIN_CACHE_DIR/golden/`, default `~/.cache/burnin/golden/`) keeps only what is in use:

    golden/<key>/golden.json           a record; its mtime says when it was last used (touched on use)
    golden/<key>/run-<time>-<pid>/     a golden run's run directory, while it runs. Removed once its
                                       record is written or it is interrupted; a failed run keeps its
                                       events and rank logs (never its checkpoints) for the error
                                       message, until its process is gone
    golden/<key>/golden.tmp<pid>       a record being written (then os.replace'd into place)
    golden/.trash-<pid>-<token>        something a prune is deleting
    golden/.lock                       serialises "is this key in use?" with "start a golden run here"

`prune_cache` (run after each golden run and on each cache hit, and by `burnin cleanup`) removes the
run directories whose process is gone (the pid in the name, checked against the process's start time
so a recycled pid does not keep a directory forever), stale temporary files, and the least recently
used records beyond the newest `$BURNIN_GOLDEN_CACHE_MAX` (default 32; 0: no bound). A key with a
golden run going on in a live process is never removed. A record removed under a reader is simply
recomputed. `clear_cache` (`burnin cleanup --golden`) removes every record.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import re
import secrets
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterator

from burnin.core.events import read_events
from burnin.core.procs import alive, process_start_time
from burnin.errors import HarnessError, UserError
from burnin.harness.external import ExternalRun
from burnin.harness.supervisor import Supervisor
from burnin.reports.history import cpu_model
from burnin.scenarios.schema import Debug, Expect, Scenario

__all__ = ["GoldenRecord", "cache_dir", "golden_key", "record_from_events", "get_golden", "cache_max",
           "prune_cache", "clear_cache", "CACHE_MAX_DEFAULT"]


@dataclass
class GoldenRecord:
    key: str
    state_hash: str
    loss_bits: dict[str, dict[str, str]]      # rank -> step -> float32 bits (hex)
    checkpoint_hashes: dict[str, str]         # checkpoint step -> state hash
    final_loss: float | None
    loss_floor: float | None
    wall_s: float
    state_norms: dict[str, float] | None = None  # rank 0's final tensors' L2 norms (tolerance comparisons)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "GoldenRecord":
        return cls(**json.loads(text))


def cache_dir() -> Path:
    return Path(os.environ.get("BURNIN_CACHE_DIR") or Path.home() / ".cache" / "burnin")


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "none"


def _environment() -> dict[str, Any]:
    ver = _version

    cpu = cpu_model()
    return {"torch": ver("torch"), "triton": ver("triton"), "burnin": ver("burnin"),
            "python": sys.version.split()[0], "machine": platform.machine(), "cpu": cpu, "code": _code_fingerprint()}


#: The rank-side sources that decide a run's bits (besides every file of kernels/ and integrations/).
BIT_SOURCES = ("rank/worker.py", "rank/session.py", "rank/workload.py", "rank/state.py", "rank/guard.py",
               "rank/campaign_worker.py", "rank/external.py")


def _code_fingerprint() -> str:
    """Hash of the sources that decide a run's bits, so a cache written by other code is not trusted. A
    listed source that is missing (moved, renamed) is an error, not a file quietly left out of the hash."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in (*BIT_SOURCES, *sorted(str(p.relative_to(root)) for p in (root / "kernels").glob("*.py")),
                *sorted(str(p.relative_to(root)) for p in (root / "integrations").glob("*.py"))):
        path = root / rel
        if not path.is_file():
            raise HarnessError(f"golden cache: burnin/{rel} is not there to fingerprint; update "
                               "burnin.harness.golden.BIT_SOURCES to where it moved")
        h.update(rel.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def golden_key(scenario: Scenario) -> str:
    extra: dict[str, Any] = {"env": _environment()}
    if scenario.workload.entry is not None:
        extra["entry"] = entry_fingerprint(scenario.workload.entry)
        # a framework's loop: its version decides bits too (Lightning's resume changed between 2.4 and 2.5)
        extra["frameworks"] = {pkg: _version(pkg) for pkg in ("lightning", "pytorch-lightning", "torchft")}
    if scenario.recovery.mode == "external":  # the groups split the batch: their number changes the bits
        extra["external"] = {"system": scenario.recovery.external.system,
                             "replica_groups": scenario.recovery.external.replica_groups}
    return scenario.golden_key(extra=extra)


def entry_fingerprint(entry: str) -> str:
    """Hash of the file a loop's entry runs (the script, or the module of `module:function`): an edited
    loop gets a new golden run. What that file imports is not followed: `--refresh-golden` after editing it."""
    path: str | None = entry if entry.endswith(".py") else None
    if path is None:
        try:
            found = importlib.util.find_spec(entry.partition(":")[0])
            path = found.origin if found is not None else None
        except (ImportError, ValueError):
            path = None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else "unknown"
    except OSError:
        return "unknown"


def record_from_events(events: list[dict[str, Any]], key: str) -> GoldenRecord:
    """The golden record of a finished run's events (the last execution of each step counts)."""
    loss: dict[str, dict[str, str]] = {}
    ckpts: dict[str, str] = {}
    final: dict[int, str] = {}
    shards: dict[Any, set[str]] = {}  # (an external run's sharded ranks: each shard agrees with its replicas)
    norms = None
    final_loss = floor = None
    t0 = t1 = None
    for ev in events:
        kind = ev.get("event")
        if kind == "run_started":
            t0 = ev["t"]
        elif kind == "run_finished":
            t1 = ev["t"]
        elif kind == "step_done" and ev.get("committed", True):  # (a torchft step not committed is not one)
            loss.setdefault(str(ev["rank"]), {})[str(ev["step"])] = ev["loss_bits"]
            if ev["rank"] == 0:
                final_loss = ev["loss"]
        elif kind == "checkpoint_saved":
            ckpts[str(ev["checkpoint_step"])] = ev["state_hash"]
        elif kind == "rank_finished":
            final[ev["rank"]] = ev["state_hash"]
            shards.setdefault(ev.get("shard"), set()).add(ev["state_hash"])
            if ev["rank"] == 0:
                norms = ev.get("state_norms")
        elif kind == "resumed" and ev.get("rank") == 0:
            floor = ev.get("loss_floor")
    if not final or any(len(hashes) != 1 for hashes in shards.values()):
        raise HarnessError(f"golden run did not finish with agreeing replicas: {final}")
    return GoldenRecord(key=key, state_hash=final[0], loss_bits=loss, checkpoint_hashes=ckpts,
                        final_loss=final_loss, loss_floor=floor, wall_s=(t1 or 0) - (t0 or 0), state_norms=norms)


def _record_path(key: str) -> Path:
    return cache_dir() / "golden" / key / "golden.json"


def golden_cached(scenario: Scenario) -> bool:
    """Whether this scenario's golden record is in the cache (a damaged one is remade all the same)."""
    return _record_path(golden_key(scenario)).is_file()


def get_golden(scenario: Scenario, *, refresh: bool = False,
               on_event: Callable[[dict[str, Any]], None] | None = None,
               pool: Any = None) -> tuple[GoldenRecord, bool]:
    """The golden record for this scenario's workload, and whether it came from the cache. A golden run
    that must be made takes its ranks from `pool` when given (the warm spares of the run it serves: one
    warm-up pays for both), else starts them cold."""
    key = golden_key(scenario)
    path = _record_path(key)
    if path.is_file() and not refresh:
        try:
            record = GoldenRecord.from_json(path.read_text())
        except (ValueError, TypeError):
            pass  # a damaged cache entry is recomputed, not trusted
        except OSError:
            pass  # pruned by another process between the check and the read: recomputed
        else:
            _touch(path)  # least recently used goes first
            _prune_quietly()
            return record, True
    # A golden run that needs a restart is not a reference: it gets none.
    clean = scenario.model_copy(update={"faults": [], "debug": Debug(), "expect": Expect(),
                                        "recovery": scenario.recovery.model_copy(update={"max_restarts": 0})})
    run_dir = _new_run_dir(path.parent)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    failed = False
    try:
        if scenario.recovery.mode == "external":  # the system under test, fault-free: its groups, its lighthouse
            launcher = ExternalRun(clean, run_dir, f"golden-{key}-{os.getpid()}", on_event=on_event, golden=True)
            finished = launcher.run()
            if not finished and launcher.usage_error is not None:  # bad input a rank found: one line, exit 2
                raise UserError(f"{scenario.workload.entry}: {launcher.usage_error} (in the golden run: {run_dir})")
            if not finished:
                raise HarnessError(f"the golden (fault-free) run of the system under test did not finish; see "
                                   f"{run_dir}/logs/ and {run_dir}/events.jsonl")
            sup = None
        else:
            sup = Supervisor(clean, run_dir, run_id=f"golden-{key}-{os.getpid()}", golden=True, on_event=on_event,
                             pool=pool)
        if sup is not None and not sup.run():
            failed = True
            if sup.usage_error is not None:  # bad input a rank found (a loop's misuse of burnin): one line, exit 2
                raise UserError(f"{scenario.workload.entry or scenario.name}: {sup.usage_error} (in the golden run: "
                                f"{run_dir}/ranks/)")
            raise HarnessError(f"the golden (fault-free) run failed{_why(run_dir)}; see {run_dir}/events.jsonl and "
                               f"{run_dir}/ranks/")
        record = record_from_events(read_events(run_dir / "events.jsonl"), key)
        tmp.write_text(record.to_json())
        os.replace(tmp, path)
    except Exception:
        failed = True
        raise
    finally:
        # The record is all that is needed. A failed run keeps its events and rank logs for the error
        # message (pruned once this process is gone), never its checkpoints; an interrupted one
        # (KeyboardInterrupt, SIGTERM) keeps nothing.
        tmp.unlink(missing_ok=True)
        _remove_tree(run_dir / "checkpoints" if failed else run_dir)
    _prune_quietly()
    return record, False


def _why(run_dir: Path) -> str:
    """What the first rank that failed said, for the error message (empty when none said anything)."""
    try:
        events = read_events(run_dir / "events.jsonl")
    except OSError:
        return ""
    err = next((e for e in events if e.get("event") == "rank_error"), None)
    if err is None:
        return ""
    text = f"{err.get('error_type')}: {err.get('message', '')}".splitlines()[0][:300]
    return f" (rank {err.get('rank')}: {text})"


# -- the cache: in use, kept; the rest, pruned ------------------------------------------------------

CACHE_MAX_DEFAULT = 32      # records kept (least recently used beyond go); $BURNIN_GOLDEN_CACHE_MAX
STALE_TMP_S = 3600.0        # a record being written that is older than this is a leftover, whoever owns it
_RUN_DIR = re.compile(r"run-(\d+)-(\d+)")
_TMP = re.compile(r"golden\.tmp(\d+)")
_TRASH = re.compile(r"\.trash-(\d+)-.*")


def cache_max() -> int:
    """How many records the cache keeps: $BURNIN_GOLDEN_CACHE_MAX (0: no bound), else CACHE_MAX_DEFAULT."""
    raw = os.environ.get("BURNIN_GOLDEN_CACHE_MAX", "").strip()
    try:
        n = int(raw)
    except ValueError:
        return CACHE_MAX_DEFAULT
    return n if n >= 0 else CACHE_MAX_DEFAULT


def _golden_root() -> Path:
    return cache_dir() / "golden"


@contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """Exclusive over the whole cache, held only for quick decisions and renames, never for a run."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _new_run_dir(key_dir: Path) -> Path:
    """Create this process's run directory under the lock, so no prune can take its key dir from under it."""
    root = key_dir.parent
    with _cache_lock(root):
        run_dir = key_dir / f"run-{int(time.time())}-{os.getpid()}"
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _start_epoch(pid: int) -> float | None:
    """When `pid` started, in seconds since the epoch (None when unknown)."""

    ticks = process_start_time(pid)
    try:
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + int(ticks) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return None


def _owner_alive(pid: int, since: float | None = None) -> bool:
    """Whether process `pid` lives and (given `since`, when its file was made) is the one that made it."""

    if not alive(pid):
        return False
    started = _start_epoch(pid) if since is not None else None
    # A process that started after the directory was made is a recycled pid (a few seconds' slack
    # for the whole-second timestamps).
    return started is None or started <= since + 5  # type: ignore[operator]


def _size(path: Path) -> int:
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for base, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


def _remove_tree(path: Path) -> None:
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():  # a file appeared while it went (a rank not yet gone): once more
                shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


_Doomed = list[tuple[Path, str, Path]]  # (what to delete, its kind, where it was)


def _scan(root: Path, *, bound: int, clear: bool, force: bool) -> tuple[_Doomed, list[dict[str, Any]], list[Path]]:
    """Decide, under the lock, what goes; what stays because it is in use; which key dirs may be empty."""
    doomed: _Doomed = []
    skipped: list[dict[str, Any]] = []
    records: list[tuple[float, Path]] = []
    in_use: set[Path] = set()
    keys: list[Path] = []
    now = time.time()
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.name.startswith("."):
            m = _TRASH.fullmatch(entry.name)
            if m and not _owner_alive(int(m.group(1))):  # a prune that died half way
                doomed.append((path, "trash", path))
            continue
        if not entry.is_dir(follow_symlinks=False):
            continue
        keys.append(path)
        try:
            items = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            continue
        for item in items:
            ipath = Path(item.path)
            run = _RUN_DIR.fullmatch(item.name)
            tmp = _TMP.fullmatch(item.name)
            if run and item.is_dir(follow_symlinks=False):
                pid = int(run.group(2))
                if _owner_alive(pid, float(run.group(1))) and not force:
                    in_use.add(path)
                    skipped.append({"path": str(ipath), "why": f"its golden run's process {pid} is still running"})
                else:
                    doomed.append((ipath, "run", ipath))
            elif tmp:
                try:
                    age = now - item.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if _owner_alive(int(tmp.group(1))) and age < STALE_TMP_S and not force:
                    in_use.add(path)
                else:
                    doomed.append((ipath, "tmp", ipath))
            elif item.name == "golden.json":
                try:
                    records.append((item.stat(follow_symlinks=False).st_mtime, path))
                except OSError:
                    pass
    records.sort(key=lambda r: r[0], reverse=True)
    # Least recently used beyond the bound go, unless in use (a prune keeps the record of a key being
    # recomputed; a clear takes the record and leaves the live run alone).
    gone = [key for i, (_, key) in enumerate(records) if clear or (bound and i >= bound and key not in in_use)]
    for key in gone:
        if key in in_use:
            doomed.append((key / "golden.json", "record", key / "golden.json"))
        else:
            doomed = [d for d in doomed if d[0].parent != key]  # the whole key dir goes, with them
            doomed.append((key, "record", key))
    empty = [key for key in keys if key not in in_use and key not in gone]
    return doomed, skipped, empty


def _sweep_cache(*, bound: int, clear: bool = False, force: bool = False) -> dict[str, Any]:
    root = _golden_root()
    report: dict[str, Any] = {"cache": str(root), "removed": [], "skipped": [], "bytes": 0}
    if not root.is_dir():
        return report
    trash: _Doomed = []
    with _cache_lock(root):
        doomed, report["skipped"], maybe_empty = _scan(root, bound=bound, clear=clear, force=force)
        for path, kind, origin in doomed:
            if kind == "trash":
                trash.append((path, kind, origin))
                continue
            dest = root / f".trash-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.rename(path, dest)  # atomic: from here on nobody can find it, and only one prune has it
            except OSError:
                continue  # gone already (another prune)
            trash.append((dest, kind, origin))
        for key in maybe_empty:
            try:
                key.rmdir()  # only when empty: a key dir with anything left in it stays
            except OSError:
                pass
    for path, kind, origin in trash:
        size = _size(path)
        _remove_tree(path)
        report["removed"].append({"path": str(origin), "kind": kind, "bytes": size})
        report["bytes"] += size
    return report


def prune_cache(max_keys: int | None = None) -> dict[str, Any]:
    """Remove what the golden cache does not need: run directories whose process is gone, stale
    temporary files, and the least recently used records beyond `max_keys` (default `cache_max()`).

    Returns {"cache", "removed": [{"path", "kind", "bytes"}], "skipped": [{"path", "why"}], "bytes"}.
    """
    return _sweep_cache(bound=cache_max() if max_keys is None else max_keys)


def clear_cache(force: bool = False) -> dict[str, Any]:
    """Remove every golden record and its directory. The run directory of a golden run still going in
    a live process stays (its record will be written when it ends) unless `force`. Same report as
    `prune_cache`."""
    return _sweep_cache(bound=0, clear=True, force=force)


def _prune_quietly() -> None:
    try:
        prune_cache()
    except OSError:
        pass  # a cache we cannot prune is no reason to fail a run
