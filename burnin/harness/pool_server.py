"""A warm pool that outlives runs: `burnin pool serve`, and the link a run's pool keeps to it.

A run's own pool (`burnin.harness.spares`) pays one zygote warm-up per run: ~4 s of CPU (import torch,
torch._dynamo through determinism and the first AdamW step, the Triton kernel) before its first rank
can start. A CI reliability suite that runs dozens of scenarios back to back pays it dozens of times.
`burnin pool serve --socket PATH` keeps warm zygotes across runs instead, and a run started with
`BURNIN_POOL=PATH` in its environment forks its ranks and spares from them: it pays no warm-up at all.

What a pooled rank is, and who owns it:
- A zygote serves one *key*: the interpreter, the device, the threads, the kernels, and every variable
  of the environment that torch or Triton read when they are imported (TORCH*, CUDA*, OMP*, TRITON*,
  PYTHONPATH, ...). A run whose key no zygote has gets a zygote of its own (at most `max_zygotes`, the
  least recently used goes), and waits for its warm-up once, as its own pool would.
- A spare is forked for one run: the run's whole environment and working directory replace the
  zygote's as it is forked, and its run id is written into the environment block the kernel shows as
  /proc/PID/environ (the zygote holds a placeholder for it), so `burnin cleanup`, `ps e` and a leak
  check see a pooled rank exactly as a rank the run started itself.
- The server is the spares' parent (a child subreaper): it reaps them and sends each exit status to
  the run that owns the spare, over the run's connection. A run's connection closes when its supervisor
  ends, however it ends (a SIGKILL included): the server then kills whatever of that run is left, so a
  pooled rank dies with its supervisor as a rank with a parent-death signal does. Spares carry a
  parent-death signal for the server: nothing outlives `burnin pool serve` either.

Protocol: JSON lines over a Unix stream socket. The run says `hello` (its key, the zygote's
environment, its ready file), then `fork` per spare (the FIFO, pid, ready and log files of
`burnin.harness.spares`, and the run's environment); the server answers `hello` once and `exit` per
spare that ended. Only the loopback fabric is pooled: a rank that lives in a network namespace is forked
inside it by its own run's zygote. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from burnin.core import procs

__all__ = ["serve", "PoolLink", "pool_key", "RUN_ID_SLOT"]

#: The room held for a run id in a zygote's environment block (see `burnin.rank.worker._stamp_environ`).
RUN_ID_SLOT = 200

#: Environment variables read when torch, Triton or the interpreter start: a zygote that was started
#: with other values would not train as a new process of the run would.
_KEY_PREFIXES = ("TORCH", "PYTORCH", "CUDA", "NCCL", "GLOO", "OMP_", "MKL_", "KMP_", "TRITON", "PYTHON",
                 "LD_", "CUBLAS", "NVIDIA", "HIP", "ROCM")


def pool_key(python: str, argv_tail: list[str], env: dict[str, str]) -> dict[str, Any]:
    """What a zygote must share with a run to fork its ranks: the interpreter, `--zygote DEVICE THREADS
    KERNELS`, and the environment variables read at import time."""
    return {"python": python, "argv": list(argv_tail),
            "env": {k: v for k, v in sorted(env.items()) if k.startswith(_KEY_PREFIXES)}}


def _send(sock: socket.socket, msg: dict[str, Any]) -> bool:
    try:
        sock.sendall((json.dumps(msg) + "\n").encode())
        return True
    except OSError:
        return False


def _receive(read: Callable[[], bytes]) -> bytes | None:
    """One read of a non-blocking stream: its bytes, b"" at its end (or a broken one), None when nothing
    is there yet."""
    try:
        return read()
    except (BlockingIOError, InterruptedError):
        return None
    except (OSError, socket.timeout):
        return b""


def _lines(buf: bytes) -> tuple[list[bytes], bytes]:
    """The whole lines of `buf`, and what follows the last newline (the start of the next line)."""
    *lines, rest = buf.split(b"\n")
    return lines, rest


# -- the run's side ------------------------------------------------------------------------------------


class PoolLink:
    """A run's connection to `burnin pool serve`: its hello, its forks, the exit statuses of its spares."""

    def __init__(self, path: str, timeout_s: float = 5.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(path)
        self.sock.set_inheritable(False)
        self._buf = b""
        self.exits: dict[int, int] = {}
        self.closed = False
        self.server_pid: int | None = None
        self.zygote_pid: int | None = None

    def hello(self, key: dict[str, Any], env: dict[str, str], cwd: str, ready: str) -> dict[str, Any]:
        """Join the pool: the server's answer (`ok`, `zygote`, `server`, `warm`, or `why` not)."""
        if not _send(self.sock, {"op": "hello", "key": key, "env": env, "cwd": cwd, "ready": ready}):
            raise OSError("the pool server closed the connection")
        while True:
            msg = self._read(block=True)
            if msg is None:
                raise OSError("the pool server closed the connection")
            if msg.get("op") == "hello":
                self.sock.setblocking(False)
                self.server_pid, self.zygote_pid = msg.get("server"), msg.get("zygote")
                return msg

    def fork(self, cmd: dict[str, Any]) -> bool:
        if self.closed:
            return False
        self.sock.setblocking(True)
        try:
            return _send(self.sock, {"op": "fork", **cmd})
        finally:
            self.sock.setblocking(False)

    def pump(self) -> None:
        """Take in what the server has sent (exit statuses), without blocking."""
        while not self.closed:
            msg = self._read(block=False)
            if msg is None:
                return

    def _read(self, block: bool) -> dict[str, Any] | None:
        while b"\n" not in self._buf:
            chunk = _receive(lambda: self.sock.recv(65536))
            if chunk is None:
                return None
            if not chunk:
                self.closed = True
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if msg.get("op") == "exit":
            self.exits[int(msg["pid"])] = int(msg["code"])
        return msg

    def close(self) -> None:
        """Leave the pool: the server kills whatever of this run is still alive."""
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


# -- the server ----------------------------------------------------------------------------------------


@dataclass
class _Zygote:
    key: str
    proc: subprocess.Popen
    ready_file: Path
    started: float
    used: float
    waiting: list[str] = field(default_factory=list)   # clients' ready files to write once warm
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)  # tag -> fork command, until forked
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    out: bytes = b""
    inbox: bytes = b""
    warm_s: float | None = None


@dataclass
class _Client:
    sock: socket.socket
    buf: bytes = b""
    zygote: _Zygote | None = None
    pids: set[int] = field(default_factory=set)


class _Server:
    def __init__(self, path: str, python: str, max_zygotes: int, log: Callable[[str], None], work: Path):
        self.path, self.python, self.max_zygotes, self.log, self.work = path, python, max_zygotes, log, work
        self.sel = selectors.DefaultSelector()
        self.zygotes: dict[str, _Zygote] = {}
        self.clients: dict[int, _Client] = {}          # fileno -> client
        self.owner: dict[int, _Client] = {}            # spare pid -> client
        self.unclaimed: dict[int, int] = {}            # exit statuses of pids not yet reported as forked
        self.tags: dict[str, _Client] = {}
        self.retired: dict[int, _Zygote] = {}          # zygotes stopped to make room, until reaped
        self.count = 0
        self.stop = False

    # zygotes ------------------------------------------------------------------------------------------
    def zygote_for(self, key: dict[str, Any], env: dict[str, str], cwd: str) -> _Zygote:
        k = json.dumps(key, sort_keys=True)
        z = self.zygotes.get(k)
        if z is not None and z.proc.returncode is None:
            z.used = time.time()
            return z
        live = [x for x in self.zygotes.values() if x.proc.returncode is None]
        # The least recently used goes (its forks are the runs', and stay), if no run is using it now:
        # where every one is, the server keeps one more than it was told rather than strand a run.
        in_use = {c.zygote.key for c in self.clients.values() if c.zygote is not None}
        idle_ones = [x for x in live if not x.pending and x.key not in in_use]
        if len(live) >= self.max_zygotes and idle_ones:
            idle = min(idle_ones, key=lambda x: x.used)
            self.log(f"zygote {idle.proc.pid} stopped: at most {self.max_zygotes} keys are kept warm")
            self.zygotes.pop(idle.key)
            self.retired[idle.proc.pid] = idle
            self._stop_zygote(idle)
        self.count += 1
        ready = self.work / f"zygote{self.count}.ready"
        zenv = {**env, "BURNIN_RUN_ID": "?" * RUN_ID_SLOT, "BURNIN_SUPERVISOR_PID": str(os.getpid()),
                "BURNIN_SPARE_READY": str(ready), "BURNIN_POOL_ZYGOTE": "1"}
        zenv.pop("BURNIN_POOL", None)
        with open(self.work / "zygotes.log", "ab") as err:
            proc = subprocess.Popen([key["python"], "-m", "burnin.rank.worker", *key["argv"]], env=zenv, cwd=cwd,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        os.set_blocking(proc.stdout.fileno(), False)
        os.set_blocking(proc.stdin.fileno(), False)
        z = _Zygote(k, proc, ready, time.time(), time.time(), env=env, cwd=cwd)
        old = self.zygotes.get(k)
        if old is not None:  # it died: what it had not forked yet goes to the new one
            z.pending, z.waiting = old.pending, old.waiting
            for cmd in z.pending.values():
                self._to_zygote(z, cmd)
        self.zygotes[k] = z
        self.sel.register(proc.stdout, selectors.EVENT_READ, ("zygote", z))
        self.log(f"zygote {proc.pid} warming up for {key['argv']} (key {hashlib.sha1(k.encode()).hexdigest()[:8]}: "
                 f"{' '.join(f'{n}={v}' for n, v in key['env'].items() if not n.startswith('PYTHONPATH'))[:300]})")
        return z

    def _to_zygote(self, z: _Zygote, cmd: dict[str, Any]) -> None:
        """Queue a fork command for `z` (each carries a run's environment: a few KB). Written as the pipe
        takes it, from the loop: a zygote still warming up reads nothing, and a server blocked on a full
        pipe would serve no one else, nor stop when told."""
        z.inbox += (json.dumps(cmd) + "\n").encode()
        self.flush(z)

    def flush(self, z: _Zygote) -> None:
        if z.inbox and z.proc.returncode is None:
            try:
                sent = os.write(z.proc.stdin.fileno(), z.inbox)
                z.inbox = z.inbox[sent:]
            except BlockingIOError:
                pass
            except OSError:
                z.inbox = b""  # it died: reaped, replaced, and its pending commands sent again

    def _stop_zygote(self, z: _Zygote) -> None:
        procs.kill_group(z.proc.pid)

    def check_ready(self) -> None:
        for z in self.zygotes.values():
            if z.warm_s is None and z.proc.returncode is None and z.ready_file.exists():
                try:
                    z.warm_s = float(z.ready_file.read_text())
                except (OSError, ValueError):
                    continue
                self.log(f"zygote {z.proc.pid} warm after {z.warm_s:.2f} s")
            if z.warm_s is not None and z.waiting:
                for path in z.waiting:
                    try:
                        Path(path).write_text(f"{z.warm_s:.3f}\n")
                    except OSError:
                        pass
                z.waiting.clear()

    def zygote_output(self, z: _Zygote) -> None:
        chunk = _receive(lambda: os.read(z.proc.stdout.fileno(), 65536))
        if chunk is None:
            return
        if not chunk:
            self.sel.unregister(z.proc.stdout)
            return
        lines, z.out = _lines(z.out + chunk)
        for line in lines:
            try:
                msg = json.loads(line)
                pid, tag = int(msg["pid"]), str(msg["tag"])
            except (ValueError, KeyError, TypeError):
                continue
            z.pending.pop(tag, None)
            client = self.tags.pop(tag, None)
            if client is None or client.sock.fileno() < 0:  # its run left before the fork: not needed
                procs.kill_group(pid)
                continue
            client.pids.add(pid)
            self.owner[pid] = client
            if pid in self.unclaimed:
                self.exited(pid, self.unclaimed.pop(pid))

    # clients -------------------------------------------------------------------------------------------
    def accept(self, lsock: socket.socket) -> None:
        try:
            sock, _ = lsock.accept()
        except OSError:
            return
        sock.setblocking(False)
        c = _Client(sock)
        self.clients[sock.fileno()] = c
        self.sel.register(sock, selectors.EVENT_READ, ("client", c))

    def client_input(self, c: _Client) -> None:
        chunk = _receive(lambda: c.sock.recv(65536))
        if chunk is None:
            return
        if not chunk:
            self.drop(c)
            return
        lines, c.buf = _lines(c.buf + chunk)
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                self.drop(c)
                return
            if msg.get("op") == "hello":
                z = c.zygote = self.zygote_for(msg["key"], msg["env"], msg["cwd"])
                z.waiting.append(msg["ready"])
                _send(c.sock, {"op": "hello", "ok": True, "server": os.getpid(), "zygote": z.proc.pid,
                               "warm": z.warm_s is not None})
                self.check_ready()
            elif msg.get("op") == "fork" and c.zygote is not None:
                self.count += 1
                tag = f"{os.getpid()}-{self.count}"
                cmd = {k: v for k, v in msg.items() if k != "op"}
                cmd.update(tag=tag, parent=os.getpid(), report=True)
                self.tags[tag] = c
                z = self.zygotes.get(c.zygote.key)  # the live zygote of that key (it may have been replaced)
                if z is None or z.proc.returncode is not None:
                    z = self.zygote_for(json.loads(c.zygote.key), c.zygote.env, c.zygote.cwd)
                z.pending[tag] = cmd
                z.used = time.time()
                self._to_zygote(z, cmd)

    def drop(self, c: _Client) -> None:
        """A run left (its supervisor ended, however): whatever of it is alive goes with it."""
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        self.clients.pop(c.sock.fileno(), None)
        for pid in c.pids:
            procs.kill_group(pid)
        for tag in [t for t, owner in self.tags.items() if owner is c]:
            self.tags.pop(tag)
            for z in self.zygotes.values():
                z.pending.pop(tag, None)
        c.sock.close()

    # children ------------------------------------------------------------------------------------------
    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if pid in self.retired:
                self.retired.pop(pid).proc.returncode = code
                continue
            for z in self.zygotes.values():
                if z.proc.pid == pid:
                    z.proc.returncode = code
                    self.log(f"zygote {pid} ended ({code})")
                    if z.pending and not self.stop:  # forks still owed: a new zygote makes them
                        self.zygote_for(json.loads(z.key), z.env, z.cwd)
                    break
            else:
                if pid in self.owner:
                    self.exited(pid, code)
                else:  # forked, but the zygote's report of it is still on its way
                    self.unclaimed[pid] = code
                    if len(self.unclaimed) > 10000:
                        self.unclaimed.pop(next(iter(self.unclaimed)))

    def exited(self, pid: int, code: int) -> None:
        c = self.owner.pop(pid)
        c.pids.discard(pid)
        if c.sock.fileno() >= 0:
            _send(c.sock, {"op": "exit", "pid": pid, "code": code})

    def shutdown(self) -> None:
        self.stop = True
        for c in list(self.clients.values()):
            self.drop(c)
        for z in self.zygotes.values():
            if z.proc.returncode is None:
                procs.kill_group(z.proc.pid)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            self.reap()
            if all(z.proc.returncode is not None for z in self.zygotes.values()):
                break
            time.sleep(0.01)


def serve(path: str, *, python: str | None = None, max_zygotes: int = 4, idle_exit_s: float | None = None,
          log: Callable[[str], None] | None = None) -> int:
    """Serve warm spares on the Unix socket `path` until SIGTERM or SIGINT (or `idle_exit_s` without a
    run). Returns the exit status."""
    say = log or (lambda text: print(f"burnin pool: {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True))
    if not procs.become_subreaper():
        say("this kernel refuses PR_SET_CHILD_SUBREAPER, which the pool needs")
        return 1
    sock_path = Path(path)
    work = sock_path.parent / f".{sock_path.name}.d"
    work.mkdir(parents=True, exist_ok=True)
    sock_path.unlink(missing_ok=True)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(sock_path))
    lsock.listen(64)
    lsock.setblocking(False)
    server = _Server(str(sock_path), python or sys.executable, max_zygotes, say, work)
    server.sel.register(lsock, selectors.EVENT_READ, ("listen", None))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    server.sel.register(wake_r, selectors.EVENT_READ, ("wake", None))
    old_fd = signal.set_wakeup_fd(wake_w)

    def on_stop(signum: int, frame: Any) -> None:
        server.stop = True

    old = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    old_chld = signal.signal(signal.SIGCHLD, lambda s, f: None)
    say(f"serving warm spares on {sock_path} (pid {os.getpid()})")
    last_client = time.monotonic()
    try:
        while not server.stop:
            owed = any(z.inbox for z in server.zygotes.values())
            for key, _ in server.sel.select(timeout=0.005 if owed else 0.2):
                kind, obj = key.data
                if kind == "listen":
                    server.accept(lsock)
                elif kind == "client":
                    server.client_input(obj)
                elif kind == "zygote":
                    server.zygote_output(obj)
                else:
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
            server.reap()
            server.check_ready()
            for z in server.zygotes.values():
                server.flush(z)
            if server.clients:
                last_client = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - last_client > idle_exit_s:
                say(f"no run for {idle_exit_s:g} s: stopping")
                break
    finally:
        say(f"stopping: {len(server.clients)} run(s) connected, {len(server.owner)} of their process(es) alive")
        server.shutdown()
        signal.set_wakeup_fd(old_fd)
        for s, h in old.items():
            signal.signal(s, h)
        signal.signal(signal.SIGCHLD, old_chld)
        lsock.close()
        sock_path.unlink(missing_ok=True)
        for p in work.glob("zygote*.ready"):
            p.unlink(missing_ok=True)
        say("stopped")
    return 0
