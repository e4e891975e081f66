"""A real Slurm cluster of N nodes on this one host, for tests: munged, slurmctld and one slurmd per node.

    with SlurmCluster(tmp_path, nodes=3) as cluster:      # start() on enter, stop() on exit
        out = cluster.run("srun", "-N3", "hostname")     # or cluster.run(["srun", "-N3", "hostname"])
        cluster.run("scontrol", "update", "NodeName=n2", "State=DRAIN", "Reason=why")
        assert cluster.drained() == {"n2": "why"}

Plain Python, stdlib only (no pytest in here). Needs root (SlurmUser and SlurmdUser are root: slurmd
launches job steps) and Debian's slurm-wlm + munge; `SlurmCluster.unavailable()` says why not, for a skip.

Everything lives under `root`: the slurm.conf, a munge key of its own and munged's socket (slurm.conf points
at it with AuthInfo=socket=..., so no variable is needed for srun/sinfo/scontrol, only SLURM_CONF), the
controller's StateSaveLocation, each node's SlurmdSpoolDir, the logs and the pid files. Nothing under /etc
or /var is read for the cluster or written: munged gets --socket/--key-file/--pid-file/--seed-file, and
`--force`, because it refuses a socket whose directory's parents are not searchable by all (pytest's
/tmp/pytest-of-root is 0700); slurm's plugstack.conf is looked for next to our slurm.conf (none there).
The one exception: when `root`'s path is too long for the unix sockets under it (munged's, and the ones
slurmstepd creates in the spool dir; sun_path is 108 bytes: root up to ~70 characters is fine), the daemons are given the same tree
through a short symlink /tmp/slurm-XXXXXX/r -> root, removed on stop().

Nodes are n1..nN, all NodeHostname=<this host> at NodeAddr=127.0.0.1, each slurmd on its own free port
(`slurmd -D -N nX`); SlurmdParameters=config_overrides lets cpus_per_node exceed the host's cores.
stop() ends the daemons and then every process still carrying this cluster's SLURM_CONF in its environment
(slurmstepd's, job tasks, slurmctld's slurmscriptd, and whatever was started with env()) and their
descendants, SIGTERM then SIGKILL, every wait bounded. An atexit hook calls stop() if the test forgets.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

# Variables that steer Slurm's clients (an enclosing job's SLURM_JOB_ID would make srun start a step of
# *that* job; SINFO_FORMAT etc. change the output we parse): none of the caller's reach this cluster.
_CLIENT_ENV_PREFIXES = ("SLURM_", "SRUN_", "SALLOC_", "SBATCH_", "SINFO_", "SQUEUE_", "SCONTROL_",
                        "SCANCEL_", "SACCT_", "SPANK_")
_SUN_PATH_MAX = 107  # a unix socket's path, in bytes (sun_path is 108 with its NUL)


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports free right now (all held open together, so no two are the same)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening(port: int) -> bool:
    """Whether something on this host listens on TCP port (from /proc/net: no connection made, so no
    "Zero Bytes were transmitted" in the daemon's log)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"  <{e}>"
    return "\n".join("  " + line for line in text[-lines:])


def _pid_alive(pid: int) -> bool:
    """Running, not a zombie (a zombie's /proc entry stays until its parent reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X")


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (ppid, environ) for every live process (environ b"" where unreadable)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] in ("Z", "X"):
                continue
            ppid = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            environ = b""
        out[pid] = (ppid, environ)
    return out


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 3, cpus_per_node: int = 2, *,
                 conf_overrides: dict[str, str] | None = None) -> None:
        """conf_overrides: slurm.conf keys to set or replace (e.g. {"SlurmdTimeout": "30"}); a value of
        None drops the key."""
        if nodes < 1 or cpus_per_node < 1:
            raise ValueError("nodes and cpus_per_node must be >= 1")
        self.root = Path(root).resolve()
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.hostname = socket.gethostname()
        self.conf_overrides = dict(conf_overrides or {})
        self._procs: dict[str, subprocess.Popen] = {}  # "munged", "slurmctld", "slurmd-n1", ...
        self._logs: list[IO[bytes]] = []
        self._alias_dir: str | None = None
        self._base = self.root  # the path the daemons are given: root, or a short symlink to it
        self.conf_path = self.root / "slurm.conf"
        self.ports: dict[str, int] = {}
        self._atexit_registered = False

    # -- availability --------------------------------------------------------------------------------

    @staticmethod
    def unavailable() -> str | None:
        """Why a cluster cannot start here (for a test's skip), or None."""
        if os.geteuid() != 0:
            return "needs root (SlurmdUser=root)"
        missing = [b for b in ("munged", "slurmctld", "slurmd", "srun", "sinfo", "scontrol")
                   if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
        if missing:
            return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
        return None

    # -- start ---------------------------------------------------------------------------------------

    def _exe(self, name: str) -> str:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if found is None:
            raise RuntimeError(f"{name} not found (apt-get install slurm-wlm munge)")
        return found

    @property
    def munge_socket(self) -> Path:
        return self._base / "munge" / "munge.socket"

    def _conf_text(self) -> str:
        b = self._base
        short_host = self.hostname.split(".")[0]
        opts: dict[str, str | None] = {
            "ClusterName": "burnin-test",
            "SlurmctldHost": f"{short_host}(127.0.0.1)",
            "SlurmctldPort": str(self.ports["slurmctld"]),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "StateSaveLocation": f"{b}/state",
            "SlurmdSpoolDir": f"{b}/spool/%n",
            "SlurmctldPidFile": f"{b}/run/slurmctld.pid",
            "SlurmdPidFile": f"{b}/run/slurmd-%n.pid",
            "SlurmctldLogFile": f"{b}/log/slurmctld.log",
            "SlurmdLogFile": f"{b}/log/slurmd-%n.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "SlurmdParameters": "config_overrides",  # the configured CPUs, not the host's
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SchedulerType": "sched/builtin",
            "MpiDefault": "none",
            "SwitchType": "switch/none",
            "MailProg": "/bin/true",
            "ReturnToService": "2",  # a DOWN node that registers again is back (DRAIN stays)
            "SlurmctldTimeout": "10",
            "SlurmdTimeout": "10",  # a silent slurmd is DOWN after 10 s
            "MessageTimeout": "10",
            "InactiveLimit": "0",
            "KillWait": "2",  # SIGTERM -> SIGKILL of a cancelled job's tasks
            "MinJobAge": "10",
            "BatchStartTimeout": "10",
        }
        opts.update(self.conf_overrides)
        lines = [f"{k}={v}" for k, v in opts.items() if v is not None]
        for name in self.node_names:
            lines.append(f"NodeName={name} NodeHostname={self.hostname} NodeAddr=127.0.0.1 "
                         f"Port={self.ports[name]} CPUs={self.cpus_per_node} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _spawn(self, key: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{key}.out", "ab")
        self._logs.append(log)
        self._procs[key] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
            start_new_session=True, close_fds=True)

    def start(self, timeout_s: float = 60) -> None:
        """Start munged, slurmctld and the slurmd's; return once `sinfo` shows every node idle. On
        failure or timeout: stop() what was started, and RuntimeError with the tails of the logs. A
        start() after stop() on the same root starts afresh (slurmctld -c: no node or job state kept,
        new ports; the munge key is kept)."""
        if self._procs:
            raise RuntimeError("cluster already started")
        try:
            self._start(time.monotonic() + timeout_s, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, deadline: float, timeout_s: float) -> None:
        if (why := self.unavailable()) is not None:
            raise RuntimeError(f"cannot start a Slurm cluster: {why}")
        self.root.mkdir(parents=True, exist_ok=True)
        # munged wants the socket's directory (and root, above it) searchable by all, and the key's
        # directory writable by its owner alone.
        os.chmod(self.root, 0o755)
        for sub in ("munge", "state", "run", "log", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
            os.chmod(self.root / sub, 0o755)
        for name in self.node_names:
            (self.root / "spool" / name).mkdir(exist_ok=True)
        # the longest socket under root: slurmstepd's spool/nN/nN_<job id>.<step id> (10 digits each)
        last = self.node_names[-1]
        if len(f"{self.root}/spool/{last}/{last}_") + 21 > _SUN_PATH_MAX:
            self._alias_dir = tempfile.mkdtemp(prefix="slurm-", dir="/tmp")
            os.chmod(self._alias_dir, 0o755)
            os.symlink(self.root, Path(self._alias_dir) / "r")
            self._base = Path(self._alias_dir) / "r"
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
        for stale in (self.root / "munge" / "munge.socket", self.root / "munge" / "munge.socket.lock"):
            stale.unlink(missing_ok=True)

        ports = _free_ports(self.nodes + 1)
        self.ports = {"slurmctld": ports[0], **dict(zip(self.node_names, ports[1:]))}
        self.conf_path.write_text(self._conf_text())

        m = self._base / "munge"
        self._spawn("munged", [self._exe("munged"), "--foreground", "--force",
                               f"--socket={m}/munge.socket", f"--key-file={m}/munge.key",
                               f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
                               "--num-threads=4"])
        self._wait_munge(deadline)
        self._spawn("slurmctld", [self._exe("slurmctld"), "-D", "-c"])
        self._wait_port("slurmctld", self.ports["slurmctld"], deadline)
        for name in self.node_names:
            self._spawn(f"slurmd-{name}", [self._exe("slurmd"), "-D", "-N", name])
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        self._wait_idle(deadline, timeout_s)

    def _check_daemons(self) -> None:
        for key, p in self._procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{key} exited with {p.returncode} while starting\n{self.logs()}")

    def _wait_munge(self, deadline: float) -> None:
        while True:
            self._check_daemons()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(self.munge_socket))
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not open {self.munge_socket} in time\n{self.logs()}")
            time.sleep(0.1)

    def _wait_port(self, what: str, port: int, deadline: float) -> None:
        """Until `what` listens on port (sinfo against a controller not yet listening sits in retries
        for seconds, and would not notice a controller that died at start)."""
        while True:
            self._check_daemons()
            if _listening(port):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on port {port} in time\n{self.logs()}")
            time.sleep(0.05)

    def node_states(self, timeout_s: float = 20) -> dict[str, str]:
        """node -> sinfo's compact state (idle, alloc, drain, down*, ...)."""
        r = self.run("sinfo", "-h", "-N", "-o", "%N %t", timeout_s=timeout_s)
        if r.returncode != 0:
            raise RuntimeError(f"sinfo failed ({r.returncode}): {r.stderr.strip()}")
        return dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip())

    def _wait_idle(self, deadline: float, timeout_s: float) -> None:
        states: dict[str, str] | str = "no answer yet"
        while True:
            self._check_daemons()
            remaining = deadline - time.monotonic()
            try:
                states = self.node_states(timeout_s=max(1.0, min(20.0, remaining)))
                if sorted(states) == sorted(self.node_names) and set(states.values()) == {"idle"}:
                    return
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                states = str(e)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the nodes were not all idle within {timeout_s:g} s: {states}\n"
                                   f"{self.logs()}")
            time.sleep(0.25)

    # -- use -----------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """os.environ without the caller's Slurm client variables, plus SLURM_CONF for this cluster (the
        munge socket comes from slurm.conf's AuthInfo)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CLIENT_ENV_PREFIXES)}
        env["SLURM_CONF"] = str(self._base / "slurm.conf")
        return env

    def run(self, *args: Any, timeout_s: float = 120, **kw: Any) -> subprocess.CompletedProcess:
        """Run a Slurm command: run("srun", "-N3", "hostname") or run(["srun", "-N3", "hostname"]).
        Text output captured, stdin /dev/null, no check; kw go to subprocess.run, and an env= there is
        laid over env(). On timeout the command is killed and subprocess.TimeoutExpired raised."""
        argv = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
        env = self.env()
        env.update(kw.pop("env", None) or {})
        kw.setdefault("capture_output", not ("stdout" in kw or "stderr" in kw))
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run([str(a) for a in argv], env=env, timeout=timeout_s, **kw)

    def drained(self) -> dict[str, str]:
        """node -> reason, for the nodes `sinfo -R` lists (DRAIN/DRAINING/DRAINED, and also DOWN or FAIL
        nodes with a reason such as "Not responding")."""
        r = self.run("sinfo", "-R", "-h", "-N", "-o", "%N|%E", timeout_s=30)
        if r.returncode != 0:
            raise RuntimeError(f"sinfo -R failed ({r.returncode}): {r.stderr.strip()}")
        out = {}
        for line in r.stdout.splitlines():
            if "|" in line:
                node, reason = line.split("|", 1)
                out[node.strip()] = reason.rstrip()
        return out

    def logs(self, lines: int = 25) -> str:
        """The tails of every daemon's log, for an error message."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            # slurmctld/slurmd -D write their log twice, to X.log and to stderr (X.out): X.out only
            # where X.log is missing or empty (a daemon that died before it opened its log)
            log = path.with_suffix(".log")
            if path.suffix == ".out" and log.exists() and log.stat().st_size > 0:
                continue
            parts.append(f"--- {path.name} ---\n{_tail(path, lines)}")
        return "\n".join(parts)

    # -- stop ----------------------------------------------------------------------------------------

    def _ours(self) -> set[int]:
        """Live processes with this cluster's SLURM_CONF in their environment, and their descendants;
        never this process or its ancestors."""
        marker = f"SLURM_CONF={self._base / 'slurm.conf'}".encode()
        procs = _processes()
        ours = {pid for pid, (_, environ) in procs.items() if marker in environ.split(b"\0")}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        stack = list(ours)
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in ours:
                    ours.add(child)
                    stack.append(child)
        spared, pid = set(), os.getpid()
        while pid > 1 and pid not in spared:
            spared.add(pid)
            pid = procs.get(pid, (1, b""))[0]
        return ours - spared

    @staticmethod
    def _signal(pids: set[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _terminate(self, pids: set[int], grace_s: float) -> None:
        """SIGTERM, wait up to grace_s, SIGKILL what remains, wait up to 5 s more."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            self._signal(pids, sig)
            end = time.monotonic() + wait_s
            while True:
                for p in self._procs.values():
                    p.poll()  # reap our own children so they leave /proc
                pids = {pid for pid in pids if _pid_alive(pid)}
                if not pids:
                    return
                if time.monotonic() > end:
                    break
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop slurmd's and slurmctld, then what they left (steps, tasks), then munged; SIGKILL for what
        outlives its SIGTERM (10 s for the daemons, 1 s for the rest). Well under a second normally; every
        wait bounded (under a minute even with processes stuck in the kernel). Idempotent."""
        if self._procs:
            slurm = {p.pid for k, p in self._procs.items() if k != "munged" and p.poll() is None}
            self._terminate(slurm, grace_s=10.0)
            # slurmstepd's, job tasks, slurmscriptd, and anything else started with env()
            munged = self._procs.get("munged")
            leftovers = self._ours() - ({munged.pid} if munged else set())
            self._terminate(leftovers, grace_s=1.0)
            if munged is not None and munged.poll() is None:
                self._terminate({munged.pid}, grace_s=5.0)
            self._terminate(self._ours(), grace_s=2.0)
            for p in self._procs.values():
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._alias_dir is not None:
            shutil.rmtree(self._alias_dir, ignore_errors=True)
            self._alias_dir = None
            self._base = self.root
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
