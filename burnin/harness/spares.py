"""Warm spare ranks: processes that have paid a rank's start-up before they are needed.

A restart used to start a new interpreter per rank on the critical path: Python, `import torch`,
`torch.use_deterministic_algorithms` and the first AdamW step (each importing torch._dynamo), the
Triton kernel, the fault registry: ~2.5 s of the ~3 s a killed rank cost. Here that start-up is paid
once per rank slot and run, by a *zygote* (`burnin.rank.worker --zygote`, after
`burnin.rank.worker.warm_up`), and every rank process of the run is forked from it: a fork of the
warm interpreter costs ~30 ms where a cold start costs seconds, so the pool can keep one spare per
slot at all times, refill it at once after a restart, and hand the first attempt its ranks too (a
run pays one warm-up per slot, not one per rank plus one per spare).

A spare blocks on its own FIFO for an assignment: one line, the path of a JSON file with the rank's
environment (RANK, MASTER_PORT, BURNIN_SPEC, ...) and its log; from then on it is that rank,
indistinguishable from one started cold, and the FIFO is its stdin (the injector's "go" lines).

Processes and their parents: the zygote forks twice and the middle process exits, so the spare is
re-parented to the supervisor, which is a child subreaper (PR_SET_CHILD_SUBREAPER): the supervisor
waits for it and reads its exit status like any child's (`ForkedProc`). The spare leads its own
process group (teardown kills groups), sets its parent-death signal once it is the supervisor's, and
carries the run id in its environment for `burnin cleanup`, like a rank started cold.

The pool keeps one spare per rank slot. Where every slot runs alike (the loopback fabric), one zygote
forks them all, so a run pays one warm-up, not one per rank (~3.6 s of CPU and a few hundred MB each);
where a slot needs what only its own process can have (with the namespace fabric, a rank lives in its
own network namespace: the zygote is started inside it by the fabric's command, and its forks inherit
it), each slot has a zygote of its own. A slot whose spare is not
forked yet (the zygote still warming up, at run start or after a zygote died) waits for it: sooner
than a cold start, which pays the same warm-up; the `spare_used` event says it was not ready. No
torch here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from burnin.core import procs
from burnin.core.procs import become_subreaper
from burnin.harness.fabric import LocalFabric
from burnin.harness.pool_server import PoolLink, pool_key

__all__ = ["ForkedProc", "PooledProc", "Spare", "SparePool", "become_subreaper", "open_pool", "server_path",
           "spare_memory_ok", "rank_base_env"]

#: What one slot of the pool costs in memory (the zygote's resident set after the warm-up, measured on
#: the tiny model on CPU: ~380 MiB; its forks share most of it), with a margin: the pool is on by
#: default only where this much per rank is available.
SPARE_BUDGET_BYTES = 512 << 20

#: How long a slot waits for its zygote to fork a spare before the rank starts cold instead: a zygote's
#: warm-up takes 3-5 s on a warm page cache, up to ~30 s on a cold one (measured right after install).
FORK_WAIT_S = 120.0


class ForkedProc:
    """A spare as the supervisor sees it: what `subprocess.Popen` offers (pid, stdin, poll, wait,
    returncode), for a process that a zygote forked and the supervisor, its subreaper, reaps."""

    def __init__(self, pid: int, stdin: Any):
        self.pid, self.stdin = pid, stdin
        self.returncode: int | None = None
        self.args = [f"spare pid {pid}"]

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Not (yet) this process's child: the middle process of the zygote's double fork has not
            # exited yet, or the process is gone and was reaped elsewhere.
            if procs.proc_state(self.pid) not in (None, "Z", "X"):
                return None
            self.returncode = -9
            return self.returncode
        if pid == 0:
            return None
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.005)
        return self.returncode  # type: ignore[return-value]


class PooledProc(ForkedProc):
    """A spare forked by `burnin pool serve`: the server is its parent and reaper, and sends its exit
    status over the run's link; where the link is gone, a process that is gone counts as killed."""

    def __init__(self, pid: int, stdin: Any, link: PoolLink):
        super().__init__(pid, stdin)
        self.link = link

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        self.link.pump()
        if self.pid in self.link.exits:
            self.returncode = self.link.exits[self.pid]
        elif self.link.closed and procs.proc_state(self.pid) in (None, "Z", "X"):
            self.returncode = -9
        return self.returncode


class SharedZygote:
    """What a run sees of the pool server's zygote for its key: `Popen`'s pid, poll, stdin and wait, where
    writing a fork command sends it with the run's environment, and stopping the pool leaves the zygote
    to the server."""

    def __init__(self, link: PoolLink, env: dict[str, str], cwd: str):
        self.link, self.env, self.cwd = link, env, cwd
        self.pid = link.zygote_pid or 0
        self.returncode: int | None = None
        self.stdin = self

    def write(self, data: bytes) -> int:
        if not self.link.fork({**json.loads(data), "env": self.env, "cwd": self.cwd}):
            raise BrokenPipeError("the pool server is gone")
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # the zygote is the server's, not this run's

    def poll(self) -> int | None:
        self.link.pump()
        if self.link.closed and self.returncode is None:
            self.returncode = -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode if self.returncode is not None else 0


@dataclass
class Zygote:
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


@dataclass
class Spare:
    slot: int
    zygote: Zygote
    requested: float
    fifo: Path
    pid_file: Path
    ready_file: Path
    stdin: Any = None
    proc: ForkedProc | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.ready_file.exists()

    def resolve(self) -> ForkedProc | None:
        """The forked process, once the zygote has said its pid."""
        if self.proc is None:
            try:
                text = self.pid_file.read_text()
            except OSError:
                return None
            if not text.endswith("\n"):
                return None
            link = getattr(self.zygote.proc, "link", None)
            self.proc = ForkedProc(int(text), self.stdin) if link is None else PooledProc(int(text), self.stdin, link)
        return self.proc

    def dead(self) -> bool:
        proc = self.resolve()
        if proc is not None:
            return proc.poll() is not None
        return self.zygote.proc.poll() is not None  # not forked, and never will be


def spare_memory_ok(ranks: int) -> bool:
    """Whether this machine has the memory for one spare per rank beside the ranks themselves."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 > 2 * ranks * SPARE_BUDGET_BYTES
    except (OSError, ValueError, IndexError):
        pass
    return False


def rank_base_env(scenario: Any, run_id: str) -> dict[str, str]:
    """The environment every rank process starts with; a rank's own variables come on top."""
    threads = str(scenario.workload.threads)
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "BURNIN_RUN_ID": run_id,
            "BURNIN_SUPERVISOR_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}


def open_pool(scenario: Any, run_dir: Path, run_id: str, fabric: Any = None, emit: Callable[..., Any] | None = None,
              python: str | None = None) -> tuple[SparePool | None, str | None]:
    """A started pool (one zygote per rank slot, each with a spare forked) for `scenario`'s ranks, or None
    and why not: `recovery.spares: false`; by default, too little memory; a kernel without child subreapers."""
    w = scenario.workload
    want = scenario.recovery.spares
    if want is False:
        return None, "recovery.spares is false"
    if want is None and not spare_memory_ok(w.ranks):
        return None, "not enough available memory for one spare per rank"
    if not become_subreaper():
        return None, "this kernel refuses PR_SET_CHILD_SUBREAPER, which the pool needs"
    (Path(run_dir) / "ranks").mkdir(parents=True, exist_ok=True)
    pool = SparePool(Path(run_dir), run_id, fabric or LocalFabric(), python or sys.executable,
                     rank_base_env(scenario, run_id), zygote_argv(scenario),
                     emit or (lambda *a, **k: None), prime=prime_spec(scenario))
    pool.join_server()
    pool.fill(range(w.ranks))  # the zygotes warm up once; the first attempt's ranks are their first forks
    return pool, None


def zygote_argv(scenario: Any) -> list[str]:
    """`--zygote DEVICE THREADS KERNELS [sharded]`: what a zygote warms up. `sharded` (burnin's model on a
    mesh, or a loop of the user's, which may shard its own) also imports FSDP2, DTensor, the device mesh
    and DCP: 0.8 s of CPU that a restarted rank of a sharded job paid on the recovery's critical path."""
    w = scenario.workload
    return ["--zygote", w.device, str(w.threads), w.kernels,
            *(["sharded"] if w.parallel is not None or w.entry is not None else [])]


def prime_spec(scenario: Any) -> dict[str, Any] | None:
    """What a spare of a sharded run of burnin's own model primes itself with (`sharding.prime`): the model,
    the optimizer's settings and the mesh. None where there is nothing to prime (DDP, a loop of the
    user's, whose model burnin does not know; a GPU, where the spare leaves the device alone)."""
    w = scenario.workload
    if w.parallel is None or w.entry is not None or w.device == "cuda" or w.parallel.tp > 1:
        return None  # (tensor parallel: the priming's placements are FSDP2's alone; not primed)
    return {"model": w.model, "seq_len": w.seq_len, "dropout": w.dropout, "kernels": w.kernels, "lr": w.lr,
            "weight_decay": w.weight_decay, "mesh": list(w.parallel.mesh(w.ranks))}


def server_path() -> str | None:
    """The socket of `burnin pool serve` that runs fork their ranks from (BURNIN_POOL), if any."""
    return os.environ.get("BURNIN_POOL") or None


class SparePool:
    def __init__(self, run_dir: Path, run_id: str, fabric: Any, python: str, env: dict[str, str],
                 argv_tail: list[str], emit: Callable[..., Any], prime: dict[str, Any] | None = None):
        self.dir = run_dir / "ranks"
        self.prime = prime              # what each spare primes itself with while it waits (sharded runs)
        self.run_id, self.fabric, self.python, self.env = run_id, fabric, python, env
        self.argv_tail = argv_tail      # --zygote DEVICE THREADS KERNELS [sharded]
        self.emit = emit
        self.zygotes: dict[int, Zygote] = {}
        self.spares: dict[int, Spare] = {}
        self._count = 0
        self._taken: list[Spare] = []   # spares handed out whose files may still be in use
        self.closed = False
        # every slot alike: one zygote serves them all (see _zygote)
        self.shared = bool(getattr(fabric, "slots_alike", False))
        self.link: PoolLink | None = None  # to `burnin pool serve`, when the run's ranks come from it

    def join_server(self) -> None:
        """Fork from the zygote of `burnin pool serve` (BURNIN_POOL) instead of starting one: where every
        slot runs alike and the server answers. Where it does not, say why, and keep a zygote of our own."""
        path = server_path()
        if path is None or not self.shared or self.fabric.rank_command(0, ["x"]) != ["x"]:
            return
        env = {**self.env, **self.fabric.rank_env(0)}
        try:
            link = PoolLink(path)
            answer = link.hello(pool_key(self.python, self.argv_tail, env), env, os.getcwd(),
                                str(self.dir / "zygote0-server.ready"))
        except (OSError, ValueError) as exc:
            self.emit("pool_server_unavailable", socket=path, why=str(exc) or type(exc).__name__)
            return
        self.link = link
        self._count += 1
        proc = SharedZygote(link, env, os.getcwd())
        ready = self.dir / "zygote0-server.ready"
        self.zygotes[0] = Zygote(0, proc, time.time(), ready)  # type: ignore[arg-type]
        self.emit("pool_joined", socket=path, server=answer.get("server"), zygote=answer.get("zygote"),
                  warm=bool(answer.get("warm")))

    def fill(self, slots: range) -> None:
        """Give each slot a spare (and a zygote to fork it) where it has none, or where they died; remove
        the files of spares that became ranks (a run with thousands of restarts leaves none behind)."""
        self._tidy()
        for slot in slots:
            spare = self.spares.get(slot)
            if spare is not None and not spare.dead():
                continue
            if spare is not None:  # a spare that died while waiting: say so, fork another
                self.emit("spare_lost", slot=slot, pid=spare.proc.pid if spare.proc else None,
                          returncode=spare.proc.returncode if spare.proc else None)
                self._drop(spare)
            self.spares[slot] = self._fork(self._zygote(slot), slot)

    def take(self, slot: int, wait_s: float = FORK_WAIT_S) -> tuple[ForkedProc | None, dict[str, Any]]:
        """The spare for `slot` (None: there is none), and what to report about it. A spare that is not
        forked yet (its zygote is warming up) is waited for, at most `wait_s`."""
        spare = self.spares.pop(slot, None)
        if spare is None:
            return None, {"slot": slot, "why": "no spare for this slot (the pool is off)"}
        t0 = time.time()
        ready, zygote_ready = spare.ready, spare.zygote.ready
        deadline = time.monotonic() + wait_s
        while spare.resolve() is None and spare.zygote.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc = spare.resolve()
        if proc is None or proc.poll() is not None:
            why = ("its zygote died before forking it" if spare.zygote.proc.poll() is not None else
                   "its spare died" if proc is not None else f"its zygote forked nothing in {wait_s:.0f} s")
            self._drop(spare)
            return None, {"slot": slot, "why": why}
        info: dict[str, Any] = {"slot": slot, "pid": proc.pid, "ready": ready,
                                "age_s": round(t0 - spare.requested, 3)}
        if ready:
            info["warm_s"] = spare.zygote.warm_s()
        else:
            info["waited_s"] = round(time.time() - t0, 3)
            info["why"] = ("its zygote was still warming up (started %.2f s before)" % (t0 - spare.zygote.started)
                           if not zygote_ready else "its spare was still being forked")
        self._taken.append(spare)
        self._tidy()
        return proc, info

    def assign(self, proc: ForkedProc, rank: int, attempt: int, env: dict[str, str], log: Path) -> None:
        """Make the spare `proc` rank `rank` of `attempt` (buffered in its FIFO if it is not reading yet)."""
        path = self.dir / f"assign-a{attempt}-r{rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"env": env, "log": str(log)}))
        os.replace(tmp, path)
        proc.stdin.write(f"{path}\n".encode())
        proc.stdin.flush()

    def pids(self) -> list[int]:
        """Every process of the pool that is alive and this run's: zygotes (not the server's) and spares."""
        out = [z.proc.pid for z in self.zygotes.values() if z.proc.poll() is None and self.link is None]
        return out + [s.proc.pid for s in self.spares.values() if s.proc is not None and s.proc.poll() is None]

    def ready_count(self) -> int:
        return sum(1 for s in self.spares.values() if not s.dead() and s.ready)

    def close(self) -> None:
        """Stop the pool: closing its stdin ends a zygote, closing its FIFO a spare; a kill the rest."""
        self.closed = True
        waiting: list[Any] = []
        for spare in self.spares.values():
            _close(spare.stdin)
            if spare.resolve() is not None:
                waiting.append(spare.proc)
        for z in self.zygotes.values():
            _close(z.proc.stdin)
            waiting.append(z.proc)
        deadline = time.time() + 1.0
        for proc in waiting:
            try:
                proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                procs.kill_group(proc.pid)
                proc.wait(timeout=30)
        for spare in self.spares.values():
            self._drop(spare)
            _unlink(spare)
        for z in self.zygotes.values():
            z.ready_file.unlink(missing_ok=True)
        for spare in self._taken:  # the FIFOs and files of the spares that became ranks
            _unlink(spare)
        self._taken.clear()
        self.spares.clear()
        self.zygotes.clear()
        if self.link is not None:  # the server kills whatever of this run is left
            self.link.close()
            (self.dir / "zygote0-server.ready").unlink(missing_ok=True)

    # -- internals ------------------------------------------------------------------------------

    def _zygote(self, slot: int) -> Zygote:
        # Where every rank runs alike (the loopback fabric), one zygote forks every slot's spares: a run
        # pays one warm-up, not one per rank. With per-rank namespaces, each slot has its own.
        home = 0 if self.shared else slot
        z = self.zygotes.get(home)
        if z is not None and z.proc.poll() is None:
            return z
        if self.link is not None:  # the server is gone: a zygote of our own from now on
            self.emit("pool_server_lost", socket=self.link.path)
            self.link = None
        if z is not None:
            self.emit("zygote_lost", slot=home, pid=z.proc.pid, returncode=z.proc.returncode, shared=self.shared)
            _close(z.proc.stdin)
            z.ready_file.unlink(missing_ok=True)
        self._count += 1
        ready = self.dir / f"zygote{home}-{self._count}.ready"
        ready.unlink(missing_ok=True)
        env = {**self.env, **self.fabric.rank_env(home), "BURNIN_SPARE_READY": str(ready)}
        argv = self.fabric.rank_command(home, [self.python, "-m", "burnin.rank.worker", *self.argv_tail])
        with open(self.dir / f"spare{home}.log", "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        z = self.zygotes[home] = Zygote(home, proc, time.time(), ready)
        self.emit("zygote_started", slot=home, pid=proc.pid, shared=self.shared)
        return z

    def _fork(self, z: Zygote, slot: int) -> Spare:
        self._count += 1
        base = self.dir / f"spare{slot}-{self._count}"
        fifo, pid_file, ready = (base.with_suffix(s) for s in (".fifo", ".pid", ".ready"))
        for p in (fifo, pid_file, ready):
            p.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        # Read-write: opening never blocks, and the spare sees end of input once this end is closed.
        stdin = os.fdopen(os.open(fifo, os.O_RDWR | os.O_CLOEXEC), "wb", buffering=0)
        spare = Spare(slot, z, time.time(), fifo, pid_file, ready, stdin)
        cmd = {"fifo": str(fifo), "pid_file": str(pid_file), "ready": str(ready),
               "log": str(self.dir / f"spare{slot}.log"),
               # a slot's spare becomes that rank: it primes for that rank's place on the mesh
               **({"prime": {**self.prime, "rank": slot}} if self.prime else {})}
        try:
            z.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            z.proc.stdin.flush()
        except OSError:
            pass  # the zygote died: the spare is found dead, and the slot gets a new zygote at the next fill
        self.emit("spare_started", slot=slot, zygote=z.proc.pid)
        return spare

    def _drop(self, spare: Spare) -> None:
        _close(spare.stdin)
        _unlink(spare)

    def _tidy(self) -> None:
        """A taken spare's files go once it has opened its FIFO (it says so with its ready file) or died."""
        keep = []
        for spare in self._taken:
            if spare.ready or spare.dead():
                _unlink(spare)
            else:
                keep.append(spare)
        self._taken = keep


def _unlink(spare: Spare) -> None:
    for path in (spare.fifo, spare.pid_file, spare.ready_file):
        path.unlink(missing_ok=True)


def _close(f: Any) -> None:
    if f is not None:
        try:
            f.close()
        except OSError:
            pass
