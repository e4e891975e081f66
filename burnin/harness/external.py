"""A run whose recovery is the system under test's own (`recovery.mode: external`): torchft.

burnin starts what a torchft job runs (the lighthouse, one torchrun per replica group, each group's
ranks attached with `burnin.rank.observe`), injects the faults, watches, and restarts and restores
nothing: torchrun restarts a group whose rank died, torchelastic's file timer ends a hung rank, and
torchft heals a group that comes back from a live peer. At the end every process of the run is
accounted for (found by the spec path in its environment) and none is left running.

The groups reach the lighthouse through a relay of burnin's (one per group, on loopback), so a group
can be cut off from its coordinator (`network.coordinator_cut`) while it still reaches its peers.

The run's `events.jsonl` holds this launcher's events (the lighthouse, each group's torchrun and its
exit, the cuts) and the ranks' streams (`ranks/rank<R>.jsonl`), in time order; `burnin.reports.external`
judges it.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from burnin.core.events import EventWriter, Tail, read_events
from burnin.core.files import atomic_write_text
from burnin.core.procs import EXTERNAL_SPEC_ENV, environ_of, kill_group, proc_state
from burnin.errors import HarnessError, UserError
from burnin.harness import cleanup
from burnin.scenarios.schema import EXTERNAL_ONLY, Scenario

__all__ = ["ExternalRun", "lighthouse_binary", "run_processes"]

POLL_S = 0.1
#: steps in a row with every group taking part before the next fault is armed: the system has settled
STABLE_STEPS = 3


def lighthouse_binary() -> str:
    """torchft's lighthouse, installed beside this Python (the `burnin[torchft]` extra) or on PATH."""
    path = shutil.which("torchft_lighthouse", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                      os.environ.get("PATH", "")]))
    if path is None:
        raise UserError("recovery.mode external with system torchft needs torchft (its torchft_lighthouse): "
                        "pip install 'burnin[torchft]'")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(spec_path: str | Path) -> list[int]:
    """Every live process that carries this run's spec path in its environment: the lighthouse, the
    torchrun agents, their ranks and whatever those started."""
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and int(e.name) != os.getpid()
            and (environ_of(int(e.name)) or {}).get(EXTERNAL_SPEC_ENV) == str(spec_path)]


def _die_with_parent() -> None:
    """In the lighthouse and each agent, before exec: SIGKILLed when burnin dies (their ranks, in sessions
    of their own, end on their timeouts, or by `burnin cleanup`)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _group_of(pid: int) -> int | None:
    """The replica group a process of the run belongs to (its REPLICA_GROUP_ID), None for the lighthouse."""
    group = (environ_of(pid) or {}).get("REPLICA_GROUP_ID", "")
    return int(group) if group.isdigit() else None


class Relay:
    """A TCP relay on loopback to `upstream`: what one replica group's connections to the lighthouse pass
    through. `cut(s)` stops moving bytes either way for s seconds (new connections wait too), then they
    flow again: a blackhole, as a partition looks to TCP."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self._listen = socket.socket()
        self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen.bind(("127.0.0.1", 0))
        self._listen.listen(64)
        self.port = self._listen.getsockname()[1]
        self._cut_until = 0.0
        self.bytes_up = 0  # what the group sent the lighthouse: its manager is heartbeating once this moves
        self._clients: set[socket.socket] = set()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"relay-{self.port}")
        self._thread.start()

    def cut(self, seconds: float) -> None:
        self._cut_until = time.monotonic() + seconds

    @property
    def is_cut(self) -> bool:
        return time.monotonic() < self._cut_until

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listen, selectors.EVENT_READ, None)
        peers: dict[socket.socket, socket.socket] = {}
        waiting: list[socket.socket] = []  # accepted during a cut: connected upstream once it is over
        while not self._stop.is_set():
            if not self.is_cut:
                for client in waiting:
                    self._join(client, sel, peers)
                waiting.clear()
            for key, _ in sel.select(timeout=POLL_S):
                sock = key.fileobj
                if sock is self._listen:
                    client, _ = self._listen.accept()
                    self._socks.append(client)
                    if self.is_cut:
                        waiting.append(client)
                    else:
                        self._join(client, sel, peers)
                    continue
                if self.is_cut:  # the bytes stay where they are: the kernel's buffers, then the sender's
                    time.sleep(POLL_S / 2)
                    continue
                other = peers.get(sock)
                try:
                    data = sock.recv(65536)
                    if data and other is not None:
                        other.sendall(data)
                        if sock in self._clients:
                            self.bytes_up += len(data)
                except OSError:
                    data = b""
                if not data:
                    for s in (sock, other):
                        if s is not None and s in peers:
                            sel.unregister(s)
                            peers.pop(s, None)
                            s.close()
        sel.close()

    def _join(self, client: socket.socket, sel: Any, peers: dict[socket.socket, socket.socket]) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        self._socks.append(up)
        self._clients.add(client)
        peers[client], peers[up] = up, client
        sel.register(client, selectors.EVENT_READ, None)
        sel.register(up, selectors.EVENT_READ, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for s in [self._listen, *self._socks]:
            try:
                s.close()
            except OSError:
                pass


class _CutContext:
    """What `network.coordinator_cut` acts through: the target group's relay."""

    def __init__(self, relay: Relay, group: int, schedule: Callable[[float, dict[str, Any]], None]):
        self.relay, self.group, self._schedule = relay, group, schedule

    def cut_coordinator(self, seconds: float) -> dict[str, Any]:
        self.relay.cut(seconds)
        self._schedule(seconds, {"group": self.group})
        return {"group": self.group, "duration_s": seconds, "via": "burnin's TCP relay to the lighthouse"}


class ExternalRun:
    """One run of the system under test, launched, disturbed and watched; `run()` returns whether every
    group finished, and leaves `events.jsonl` in the run directory."""

    def __init__(self, scenario: Scenario, run_dir: str | Path, run_id: str, *,
                 on_event: Callable[[dict[str, Any]], None] | None = None, golden: bool = False,
                 metrics: Any = None, burn_in_s: float | None = None):
        self.sc, self.run_dir, self.run_id = scenario, Path(run_dir), run_id
        self.on_event, self.golden, self.metrics = on_event, golden, metrics
        # a burn-in (burnin/harness/external_burn_in.py): the faults come at their `at_s` after the gang start,
        # and after burn_in_s the groups are told the step to stop after (`ranks/stop`) once they are settled
        self.burn_in_s = burn_in_s
        self.t_go: float | None = None
        self.ext = scenario.recovery.external
        self.groups = self.ext.replica_groups
        self.per_group = scenario.workload.ranks // self.groups
        self.group_restarts = 0 if golden else self.ext.group_restarts
        self.own: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.error: str | None = None
        self.usage_error: str | None = None  # bad input a rank found (a fault the loop has no place for)

    # -- events ---------------------------------------------------------------------------------

    def _emit(self, event: str, **fields: Any) -> None:
        record = {"t": time.time(), "event": event, "source": "launcher", **fields}
        with self._lock:
            self.own.append(record)
        if self.metrics is not None:
            self.metrics.observe(record)
        if self.on_event:
            self.on_event(record)

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> bool:
        sc, rd = self.sc, self.run_dir
        (rd / "ranks").mkdir(parents=True, exist_ok=True)
        (rd / "logs").mkdir(exist_ok=True)
        self.spec_path = rd / "external.json"
        not_in_rank = [i for i, f in enumerate(sc.faults) if f.fault in EXTERNAL_ONLY]
        self.spec_path.write_text(json.dumps({
            "scenario": sc.model_dump(mode="json"), "run_dir": str(rd), "ranks_per_group": self.per_group,
            "world_size": sc.workload.ranks, "not_in_rank": not_in_rank}))
        t0 = time.time()
        self._emit("run_started", scenario=sc.name, run_id=self.run_id, golden=self.golden, ranks=sc.workload.ranks,
                   steps=sc.workload.steps, launcher="external", system=self.ext.system, replica_groups=self.groups,
                   scenario_json=sc.model_dump(mode="json"))
        self.relays: list[Relay] = []
        self.agents: list[subprocess.Popen[bytes]] = []
        self.lighthouse: subprocess.Popen[bytes] | None = None
        finished = False
        try:
            self._start_lighthouse()
            self.relays = [Relay(("127.0.0.1", self.lh_port)) for _ in range(self.groups)]
            for g in range(self.groups):
                self._start_group(g)
            cleanup.register(self.run_id, rd, [p.pid for p in [self.lighthouse, *self.agents] if p is not None])
            finished = self._watch(t0)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            left = self._teardown()
            cleanup.unregister(self.run_id)
            self._emit("run_finished", finished=finished, error=self.error, left_running=left,
                       codes={g: p.returncode for g, p in enumerate(self.agents)})
            self._write_events()
        return finished

    def _env(self, **extra: str) -> dict[str, str]:
        # Each attempt's rank 0 hosts a store of its own (the loop's init_process_group), which torchft's
        # manager then joins: the agent's shared store keeps an attempt's keys into the next, where a rank
        # that starts late reads its peer's old address and the group's restart fails (gloo: "connectFullMesh
        # failed ... Connection refused").
        # BURNIN_RUN_ID: `burnin cleanup` finds what a supervisor that died left behind
        return {**os.environ, EXTERNAL_SPEC_ENV: str(self.spec_path), "PYTHONUNBUFFERED": "1", "BURNIN_RUN_ID": self.run_id,
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **extra}

    def _start_lighthouse(self) -> None:
        lh = self.ext.lighthouse
        self.lh_port = _free_port()
        argv = [lighthouse_binary(), "--min_replicas", str(lh.min_replicas), "--join_timeout_ms",
                str(lh.join_timeout_ms), "--quorum_tick_ms", str(lh.quorum_tick_ms), "--heartbeat_timeout_ms",
                str(lh.heartbeat_timeout_ms), "--bind", f"127.0.0.1:{self.lh_port}"]
        log = open(self.run_dir / "logs" / "lighthouse.log", "wb")
        self.lighthouse = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                           start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + self.sc.timeouts.connect_s
        while time.monotonic() < deadline:
            if self.lighthouse.poll() is not None:
                raise HarnessError(f"the torchft lighthouse exited at start ({self.lighthouse.returncode}); see "
                                   f"{self.run_dir}/logs/lighthouse.log")
            try:
                socket.create_connection(("127.0.0.1", self.lh_port), timeout=1).close()
                break
            except OSError:
                time.sleep(POLL_S)
        else:
            raise HarnessError(f"the torchft lighthouse did not listen within timeouts.connect_s="
                               f"{self.sc.timeouts.connect_s:g}")
        self._emit("lighthouse_started", pid=self.lighthouse.pid, port=self.lh_port, argv=argv[1:])

    def _start_group(self, g: int, launch: int = 0) -> None:
        wl = self.sc.workload
        port = _free_port()
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
                str(self.per_group), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--max-restarts", str(0 if self.golden else self.ext.max_restarts), "--monitor-interval", "0.1"]
        entry = wl.entry
        argv += ([entry] if entry.endswith(".py") else ["-m", entry.partition(":")[0]]) + list(wl.args)
        extra = {"TORCHFT_LIGHTHOUSE": f"http://127.0.0.1:{self.relays[g].port}", "REPLICA_GROUP_ID": str(g)}
        if self.ext.watchdog:
            extra["TORCHELASTIC_ENABLE_FILE_TIMER"] = "1"
            extra["TORCHELASTIC_TIMER_FILE"] = str(self.run_dir / "logs" / f"watchdog{g}.{launch}.pipe")
        log = open(self.run_dir / "logs" / f"group{g}.log", "ab")
        cwd = str(Path(entry).parent) if entry.endswith(".py") else None
        agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self._env(**extra), cwd=cwd,
                                 start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        if launch == 0:
            self.agents.append(agent)
        else:
            self.agents[g] = agent
        self._emit("group_started", group=g, pid=agent.pid, launch=launch,
                   ranks=list(range(g * self.per_group, (g + 1) * self.per_group)))
        if launch:  # `burnin cleanup` knows the new agent too
            cleanup.register(self.run_id, self.run_dir, [p.pid for p in [self.lighthouse, *self.agents] if p is not None])

    def _watch(self, t0: float) -> bool:
        """Until every group's torchrun has exited (or timeouts.run_s): follow the ranks' streams, arm the
        faults one at a time (fire the launcher's own), start a group again whose torchrun gave up."""
        sc = self.sc
        tails: dict[Path, Tail] = {}
        # The faults, one at a time in step order: the next is armed (a launcher's fault: fired) once its rank
        # has reached its step and every group has taken part in STABLE_STEPS steps in a row since the
        # fault before it fired; the ranks fire an armed fault of theirs at its point (burnin/rank/external.py)
        pending = [] if self.golden else sorted(enumerate(sc.faults), key=lambda x: (x[1].step, x[1].at_s or 0, x[0]))
        armed: tuple[int, Any] | None = None
        t_fired = 0.0
        (self.run_dir / "ranks" / "armed").mkdir(exist_ok=True)
        reached: dict[int, int] = {}  # rank -> newest step it committed
        stable: dict[int, int] = {}   # rank -> its steps committed in a row with every group, since the last fault
        exited: set[int] = set()
        launches = [0] * self.groups
        deadline = t0 + sc.timeouts.run_s
        started: set[int] = set()
        go, heartbeats = self.run_dir / "ranks" / "go", None
        stopping = False
        pace: list[float] = []  # the committed steps' durations, for the stop's margin
        self._last_progress = 0.0
        while len(exited) < len(self.agents):
            # the gang start: every rank up and every group's manager talking to the lighthouse, then a few
            # heartbeats more, so the lighthouse counts every group before the first quorum
            if not go.exists() and len(started) == sc.workload.ranks and all(r.bytes_up for r in self.relays):
                heartbeats = heartbeats or time.monotonic()
                if time.monotonic() - heartbeats > 0.5:
                    go.write_text("go")
                    self.t_go = time.time()
                    self._emit("gang_started")
            for path in sorted((self.run_dir / "ranks").glob("rank*.jsonl")):
                tail = tails.setdefault(path, Tail(path))
                for ev in tail.read():
                    if self.metrics is not None:  # live, as the supervisor feeds them
                        self.metrics.observe(ev)
                    if ev.get("event") == "rank_started":
                        started.add(ev["rank"])
                    if ev.get("event") == "step_done" and ev.get("committed"):
                        reached[ev["rank"]] = max(reached.get(ev["rank"], -1), ev["step"])
                        pace.append(ev.get("dt") or 0.0)
                        everyone = ev.get("participants", 0) >= self.groups and ev["t"] > t_fired
                        stable[ev["rank"]] = stable.get(ev["rank"], 0) + 1 if everyone else 0
                    if armed is not None and ev.get("event") == "fault_injected" and ev.get("fault_index") == armed[0]:
                        armed, t_fired, stable = None, ev["t"], {}
                    if ev.get("event") == "rank_error" and ev.get("error_type") == "UserError":
                        # the loop's use of burnin is wrong (one line, exit 2), not the system under test
                        self.usage_error = str(ev.get("message") or "UserError").splitlines()[0]
                        self.error = f"stopped: {self.usage_error}"
                        self._emit("run_stopped", why=self.error)
                        return False
                    if ev.get("event") == "fault_error":  # burnin's failure, not the system's: the run stops
                        self.error = "the run was stopped: a fault could not be applied"
                        self._emit("run_stopped", why=self.error, fault_index=ev["fault_index"])
                        return False
                    if self.on_event and ev.get("event") in ("step_done", "fault_injected", "ft_heal_started",
                                                             "ft_healed", "rank_started", "rank_finished"):
                        self.on_event(ev)
            now = time.time()
            if self.burn_in_s is not None and self.t_go is not None and not stopping:
                stopping = self._burn_in_clock(now, armed, reached, stable, pace, pending)
            # (a burn-in's arrival still waiting when its time is up never fires: the groups are let settle)
            at_s = pending[0][1].at_s if pending else None
            if armed is None and pending and not stopping and (at_s is None or (self.t_go is not None and (
                    self.t_go + at_s <= now and (self.burn_in_s is None or now < self.t_go + self.burn_in_s)))):
                i, f = pending[0]
                if reached.get(f.rank, -1) >= f.step - 1 and stable.get(f.rank, 0) >= STABLE_STEPS:
                    pending.pop(0)
                    if f.fault in EXTERNAL_ONLY:
                        self._fire(i, f, reached[f.rank])
                        t_fired, stable = time.time(), {}
                    else:
                        armed = (i, f)
                        (self.run_dir / "ranks" / "armed" / str(i)).write_text(str(reached[f.rank] + 1))
                        self._emit("fault_armed", fault_index=i, rank=f.rank, at_step=reached[f.rank] + 1)
            for g, agent in enumerate(self.agents):
                if g in exited or agent.poll() is None:
                    continue
                self._emit("group_exited", group=g, returncode=agent.returncode, launch=launches[g])
                left = self._stop_group(g)
                if agent.returncode != 0 and launches[g] < self.group_restarts:
                    # the scheduler's part (torchx, Kubernetes, Slurm's requeue): a replica group whose
                    # torchrun gave up is started again; torchft heals it
                    launches[g] += 1
                    self._emit("group_restarted", group=g, launch=launches[g], killed=left)
                    self._start_group(g, launches[g])
                else:
                    exited.add(g)
            if time.time() > deadline:  # the system under test's failure (it hung), not burnin's
                self._emit("run_timeout", run_s=sc.timeouts.run_s,
                           running=sorted(set(range(self.groups)) - exited))
                return False
            time.sleep(POLL_S)
        for g in range(self.groups):
            if self.agents[g].returncode != 0:
                return False
        return True

    def _burn_in_clock(self, now: float, armed: Any, reached: dict[int, int], stable: dict[int, int],
                       pace: list[float], pending: list[Any]) -> bool:
        """A burn-in's time: progress every 10 s; once burn_in_s is up and no fault is armed and every rank
        has committed STABLE_STEPS steps in a row with every group since the last fault, the step every group
        stops after (`ranks/stop`: the loops end when torchft's step reaches it), far enough ahead that none
        has passed it. Returns whether the stop is written."""
        elapsed = now - self.t_go
        if self.on_event and now - self._last_progress >= 10.0:
            self._last_progress = now
            self.on_event({"event": "burn_in_progress", "elapsed_s": elapsed, "step": max(reached.values(), default=-1),
                           "faults_fired": self._fired(), "t": now})
        if elapsed < self.burn_in_s or armed is not None:
            return False
        ranks = range(self.sc.workload.ranks)
        if not all(stable.get(r, 0) >= STABLE_STEPS for r in ranks):
            return False  # a group is still out (the last fault's heal): the stop waits for it
        recent = sorted(pace[-40:]) or [0.05]
        margin = 5 + int(1.0 / max(recent[len(recent) // 2], 1e-3))
        stop = max(reached.values()) + 1 + margin  # the number of steps: the last one committed is stop - 1
        atomic_write_text(self.run_dir / "ranks" / "stop", str(stop))
        self._emit("burn_in_stop", steps=stop, elapsed_s=elapsed, unfired=[i for i, _ in pending])
        return True

    def _fired(self) -> int:
        """Faults armed or fired so far (a rank's own injection is in its stream: counted when armed)."""
        with self._lock:
            return sum(1 for e in self.own if e["event"] in ("fault_armed", "fault_injected"))

    def _stop_group(self, g: int) -> list[dict[str, Any]]:
        """Every process of group `g` still running once its torchrun is gone (ranks an agent killed by its
        watchdog left behind), ended; what was found."""
        return self._kill_left([pid for pid in run_processes(self.spec_path)
                                if _group_of(pid) == g and pid != self.lighthouse.pid])

    def _kill_left(self, pids: list[int]) -> list[dict[str, Any]]:
        left = []
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
            except OSError:
                continue
            left.append({"pid": pid, "cmdline": cmd.strip()})
            kill_group(pid)
        deadline = time.monotonic() + 5
        while any(proc_state(p["pid"]) not in (None, "Z", "X") for p in left) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return left

    def _fire(self, index: int, spec: Any, reached: int) -> None:
        g = spec.rank // self.per_group
        fault = spec.build()

        def healed(seconds: float, details: dict[str, Any]) -> None:
            timer = threading.Timer(seconds, lambda: self._emit("coordinator_restored", fault_index=index, **details))
            timer.daemon = True
            timer.start()

        self._emit("fault_injected", fault_index=index, fault=fault.name, step=max(spec.step, reached + 1),
                   point="between_steps",
                   rank=spec.rank, where="launcher", simulated=False)
        try:
            details = fault.inject(_CutContext(self.relays[g], g, healed))
        except Exception as exc:
            self._emit("fault_error", fault_index=index, fault=fault.name, step=spec.step, error=str(exc)[:2000])
            return
        self._emit("fault_applied", fault_index=index, rank=spec.rank, details=details)

    def _teardown(self) -> list[dict[str, Any]]:
        """Stop what is still running: the agents (their ranks with them), then the lighthouse; then
        every process of the run that is left, by its environment. Returns what had to be killed after
        the agents were gone (reported: a leak of the system under test, or of burnin)."""
        for agent in self.agents:
            if agent.poll() is None:
                try:
                    os.killpg(agent.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + 10
        for agent in self.agents:
            try:
                agent.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_group(agent.pid)
                agent.wait()
        if self.lighthouse is not None and self.lighthouse.poll() is None:
            self.lighthouse.terminate()
            try:
                self.lighthouse.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill_group(self.lighthouse.pid)
                self.lighthouse.wait()
        for relay in self.relays:
            relay.close()
        return self._kill_left(run_processes(self.spec_path))

    def _write_events(self) -> None:
        events = list(self.own)
        for path in sorted((self.run_dir / "ranks").glob("rank*.jsonl")):
            events += read_events(path)
        events.sort(key=lambda e: e["t"])
        out = EventWriter(self.run_dir / "events.jsonl")
        for ev in events:
            out.write(ev)
