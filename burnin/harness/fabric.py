"""The network fabric: one network namespace per rank, joined by veth pairs to a bridge in a hub namespace.

`NetnsFabric` implements the supervisor's fabric interface (`master_addr`, `setup`, `rank_command`,
`rank_env`, `teardown`) and the knobs network faults turn: a rank's link down and up, a qdisc on its
egress (`pfifo limit 0` drops everything, `tbf` limits the rate: this kernel has no `netem`), and a
partition (per-peer blackhole routes). Everything lives in namespaces the run creates; the root
namespace is never touched. Each namespace carries the run id and the supervisor's pid in the alias
of its `lo`, and the run is recorded under the state directory before anything is created, so
`burnin cleanup` can remove what a killed supervisor left.

`probe()` measures each rank's link from inside its namespace, for the straggler detector in
`burnin.harness.netwatch`. See docs/network.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from burnin.core import procs
from burnin.errors import HarnessError, PrivilegeError, UserError
from burnin.faults.network import SIMULATED, simulate
from burnin.harness import cleanup
from burnin.scenarios.schema import Scenario

__all__ = ["choose_fabric", "LocalFabric", "NetnsFabric", "privilege_problem", "short_id", "network_capabilities"]

PREFIX = "bn-"
_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21
PROBE_BYTES = 256 * 1024  # a chunk: ~2 ms through a healthy veth, ~0.1 s through 20 Mbit/s
PROBE_CHUNKS = 5


def short_id(run_id: str) -> str:
    """Six hex digits of the run id: namespace and interface names must stay short (IFNAMSIZ is 16)."""
    return hashlib.sha1(run_id.encode()).hexdigest()[:6]


def _caps() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def privilege_problem() -> str | None:
    """What is missing to build a fabric here, in a few words, or None when nothing is."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not on PATH"
    caps = _caps()
    if os.geteuid() != 0 and not (caps >> _CAP_NET_ADMIN & 1 and caps >> _CAP_SYS_ADMIN & 1):
        return "not root, and without CAP_NET_ADMIN and CAP_SYS_ADMIN"
    name = f"{PREFIX}check-{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {procs.first_line(made.stderr)}"
    _ip("netns", "del", name, check=False)
    return None


def network_capabilities() -> dict[str, str]:
    """For `burnin doctor`: namespaces and each qdisc kind, tried for real in a throwaway namespace."""
    problem = privilege_problem()
    out = {"network namespaces": "ok" if problem is None else f"no: {problem}"}
    trials = {"pfifo": ["pfifo", "limit", "0"], "tbf": ["tbf", "rate", "1mbit", "burst", "32kb", "latency", "100ms"],
              "netem": ["netem", "delay", "10ms"]}
    if problem is not None:
        return {**out, **{f"tc qdisc {kind}": "not tried (needs a namespace)" for kind in trials}}
    name = f"{PREFIX}doctor-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        for kind, args in trials.items():
            r = procs.run_tool(["tc", "-n", name, "qdisc", "replace", "dev", "lo", "root", *args], check=False)
            out[f"tc qdisc {kind}"] = "ok" if r.returncode == 0 else f"no: {procs.first_line(r.stderr)}"
    finally:
        _ip("netns", "del", name, check=False)
    return out


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return procs.run_tool(["ip", *args], check=check)


def _subnet(run_id: str) -> str:
    """A /24 of 10/8 picked by the run id: only ever used inside this run's namespaces."""
    h = int(hashlib.sha1(run_id.encode()).hexdigest()[6:12], 16)
    return f"10.{128 + h % 64}.{(h >> 6) % 256}"


class LocalFabric:
    """How ranks reach each other: here, all on the host's loopback.

    The network fabric (per-rank network namespaces) implements the same methods, so the
    supervisor launches and addresses ranks the same way whatever carries their traffic.
    """

    master_addr = "127.0.0.1"
    #: every rank runs in the same place, so one warm zygote can fork every slot's spares
    slots_alike = True

    def setup(self, ranks: int) -> None:
        pass

    def rank_command(self, rank: int, argv: list[str]) -> list[str]:
        return argv

    def rank_env(self, rank: int) -> dict[str, str]:
        return {}

    def teardown(self) -> None:
        pass


class NetnsFabric:
    """Per-rank network namespaces behind one bridge: real links that faults can take down."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        s = short_id(run_id)
        self.hub = f"{PREFIX}{s}-hub"
        self.bridge = f"{PREFIX}{s}-br"
        self.net = _subnet(run_id)
        self._s = s
        self.ranks = 0
        self._ipcmd = shutil.which("ip") or "ip"

    # -- names and addresses --------------------------------------------------------------------

    def namespace(self, rank: int) -> str:
        return f"{PREFIX}{self._s}-r{rank}"

    def interface(self, rank: int) -> str:
        return f"{PREFIX}{self._s}-r{rank}"     # the rank's side of its veth pair (13 chars at most)

    def hub_port(self, rank: int) -> str:
        return f"{PREFIX}{self._s}-h{rank}"     # the bridge's side

    def address(self, rank: int) -> str:
        return f"{self.net}.{rank + 1}"

    @property
    def master_addr(self) -> str:
        return self.address(0)  # the TCPStore lives in rank 0

    def namespaces(self) -> list[str]:
        return [self.hub] + [self.namespace(k) for k in range(self.ranks)]

    # -- the LocalFabric interface -----------------------------------------------------------------

    def setup(self, ranks: int) -> dict[str, Any]:
        if ranks > 250:
            raise HarnessError(f"a network fabric holds at most 250 ranks, not {ranks}")
        self.ranks = ranks
        # Recorded before anything exists, so a supervisor killed half-way still leaves a trace.
        cleanup.register_network(self.run_id, self.namespaces())
        mark = f"burnin run={self.run_id} supervisor={os.getpid()}:{procs.process_start_time(os.getpid())}"
        try:
            self._make_namespace(self.hub, mark)
            _ip("-n", self.hub, "link", "add", self.bridge, "type", "bridge")
            _ip("-n", self.hub, "addr", "add", f"{self.net}.254/24", "dev", self.bridge)  # the probe's source
            _ip("-n", self.hub, "link", "set", self.bridge, "up")
            for k in range(ranks):
                ns, dev, port = self.namespace(k), self.interface(k), self.hub_port(k)
                self._make_namespace(ns, mark)
                # Both ends are born inside our namespaces: nothing ever appears in the root namespace.
                _ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns)
                _ip("-n", self.hub, "link", "set", port, "master", self.bridge)
                _ip("-n", self.hub, "link", "set", port, "up")
                _ip("-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.teardown()
            raise
        return {"kind": "netns", "subnet": f"{self.net}.0/24", "namespaces": self.namespaces(),
                "interfaces": {k: self.interface(k) for k in range(ranks)}}

    def _make_namespace(self, ns: str, mark: str) -> None:
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "alias", mark)
        _ip("-n", ns, "link", "set", "lo", "up")

    def rank_command(self, rank: int, argv: list[str]) -> list[str]:
        return [self._ipcmd, "netns", "exec", self.namespace(rank), *argv]

    def rank_env(self, rank: int) -> dict[str, str]:
        # Without these gloo resolves the host name to 127.0.0.1 and the ranks never meet.
        dev = self.interface(rank)
        return {"GLOO_SOCKET_IFNAME": dev, "TP_SOCKET_IFNAME": dev}

    def teardown(self) -> None:
        """Remove every namespace, link and qdisc of the run; safe to call again."""
        existing = set(_list_namespaces())
        for k in range(self.ranks):
            if self.hub in existing:  # deleting one end of a veth pair deletes both
                _ip("-n", self.hub, "link", "del", self.hub_port(k), check=False)
        if self.hub in existing:
            _ip("-n", self.hub, "link", "del", self.bridge, check=False)
        for ns in self.namespaces():  # qdiscs and routes go with their namespace
            if ns in existing:
                _ip("netns", "del", ns, check=False)
        if not set(_list_namespaces()) & set(self.namespaces()):
            cleanup.unregister_network(self.run_id)

    # -- what faults do -----------------------------------------------------------------------------

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.ranks:
            raise HarnessError(f"rank {rank} is not part of this fabric (ranks 0..{self.ranks - 1})")

    def set_link(self, rank: int, up: bool) -> dict[str, Any]:
        """Take the rank's interface down (its end of the cable) or bring it back up."""
        self._check_rank(rank)
        # Down takes the subnet's route with it; the kernel puts it back when the link comes up.
        _ip("-n", self.namespace(rank), "link", "set", self.interface(rank), "up" if up else "down")
        return {"interface": self.interface(rank), "namespace": self.namespace(rank), "link": "up" if up else "down"}

    def set_qdisc(self, rank: int, args: list[str]) -> dict[str, Any]:
        """Replace the root qdisc on the rank's egress, e.g. ["pfifo", "limit", "0"] or ["tbf", "rate", ...]."""
        self._check_rank(rank)
        procs.run_tool(["tc", "-n", self.namespace(rank), "qdisc", "replace", "dev", self.interface(rank), "root", *args])
        return {"interface": self.interface(rank), "namespace": self.namespace(rank), "qdisc": " ".join(args)}

    def clear_qdisc(self, rank: int) -> dict[str, Any]:
        self._check_rank(rank)
        stats = self.qdisc_stats(rank)
        procs.run_tool(["tc", "-n", self.namespace(rank), "qdisc", "del", "dev", self.interface(rank), "root"], check=False)
        return {"interface": self.interface(rank), "qdisc": "default", "before_removal": stats}

    def partition(self, ranks: list[int], cut: bool) -> dict[str, Any]:
        """Cut `ranks` off from the others (or heal the cut): blackhole routes to each peer on the other side.

        The bridge here cannot filter (no VLAN filtering, no classifying qdiscs in this kernel), so the
        drop is per peer, in each rank's own routing table: packets across the cut vanish without an
        error, as they would behind a failed switch port.
        """
        side = set(ranks)
        for r in side:
            self._check_rank(r)
        rest = [k for k in range(self.ranks) if k not in side]
        if not side or not rest:
            raise HarnessError(f"a partition needs ranks on both sides; got {sorted(side)} of {self.ranks}")
        pairs = [(a, b) for a in range(self.ranks) for b in range(self.ranks) if (a in side) != (b in side)]
        for a, b in pairs:
            verb = "replace" if cut else "del"
            _ip("-n", self.namespace(a), "route", verb, "blackhole", f"{self.address(b)}/32", check=cut)
        return {"side": sorted(side), "rest": rest, "cut": cut, "routes": len(pairs)}

    # -- evidence ----------------------------------------------------------------------------------

    def qdisc_stats(self, rank: int) -> dict[str, Any]:
        """Counters of the root qdisc on the rank's egress (`tc -s qdisc`): sent, dropped, overlimits, backlog."""
        r = procs.run_tool(["tc", "-n", self.namespace(rank), "-s", "qdisc", "show", "dev", self.interface(rank)], check=False)
        return _parse_qdisc(r.stdout)

    def probe(self, nbytes: int = PROBE_BYTES, timeout_s: float = 2.0) -> dict[int, dict[str, float | None]]:
        """Each rank's link, measured from its own namespace: connect to the hub, then send `nbytes`.

        `connect_s` is a round trip that leaves through the rank's egress; `egress_bps` is how fast
        `nbytes` got through it. A dead link gives None for both. This measures the link whatever the
        training traffic looks like, and whatever made it slow (a qdisc here, a bad cable elsewhere).
        Runs on a thread of its own: it moves that thread between namespaces (setns), never the caller.
        """
        out: dict[int, dict[str, float | None]] = {}

        def work() -> None:
            for k in range(self.ranks):
                out[k] = _probe_link(self.hub, self.namespace(k), f"{self.net}.254", nbytes, timeout_s)

        t = threading.Thread(target=work, name="burnin-link-probe", daemon=True)
        t.start()
        t.join(timeout=self.ranks * (2 * timeout_s + 1) + 5)
        return out


def _list_namespaces() -> list[str]:
    r = _ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _parse_qdisc(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    head = re.search(r"qdisc (\S+)", text)
    if head:
        out["kind"] = head.group(1)
    for key, pattern in (("sent_bytes", r"Sent (\d+) bytes"), ("dropped", r"dropped (\d+)"),
                         ("overlimits", r"overlimits (\d+)"), ("backlog_bytes", r"backlog (\d+)b")):
        m = re.search(pattern, text)
        if m:
            out[key] = int(m.group(1))
    return out


# -- the probe: sockets made inside the namespaces, from a thread of its own -------------------------

_CLONE_NEWNET = 0x40000000


@contextmanager
def _in_netns(name: str) -> Iterator[None]:
    """Move the calling thread (only it) into the named network namespace, and back afterwards.

    Sockets keep the namespace they were made in, so they may be used from anywhere afterwards.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if libc.setns(back, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(back)


def _probe_link(hub: str, ns: str, hub_addr: str, nbytes: int, timeout_s: float) -> dict[str, float | None]:
    result: dict[str, float | None] = {"connect_s": None, "egress_bps": None}
    try:
        with _in_netns(hub):
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return result
    try:
        with _in_netns(ns):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        server.close()
        return result
    with server, client:
        server.bind((hub_addr, 0))
        server.listen(1)
        server.settimeout(timeout_s)
        client.settimeout(timeout_s)
        t0 = time.perf_counter()
        try:
            client.connect(server.getsockname())
            conn, _ = server.accept()
        except OSError:
            return result  # no way through: the link is down or drops everything
        result["connect_s"] = time.perf_counter() - t0
        with conn:
            conn.settimeout(timeout_s)
            # Several chunks, each asked for and timed on its own; the fastest counts: a busy CPU
            # slows some chunks down, a slow link all of them.
            sender = threading.Thread(target=_send_on_request, args=(client, nbytes), daemon=True)
            sender.start()
            best, deadline = None, time.perf_counter() + timeout_s
            for _ in range(PROBE_CHUNKS):
                t0, got = time.perf_counter(), 0
                try:
                    conn.sendall(b"g")
                    while got < nbytes and time.perf_counter() < deadline:
                        data = conn.recv(65536)
                        if not data:
                            break
                        got += len(data)
                except OSError:
                    pass
                rate = got * 8 / max(time.perf_counter() - t0, 1e-6)
                best = rate if best is None else max(best, rate)
                if got < nbytes:
                    break  # out of time: the link is too slow for more
            result["egress_bps"] = best
            try:
                client.shutdown(socket.SHUT_RDWR)  # wakes the sender, whatever it is doing
            except OSError:
                pass
            sender.join(timeout=1)
    return result


def _send_on_request(sock: socket.socket, nbytes: int) -> None:
    payload = b"\0" * nbytes
    try:
        while sock.recv(1):
            sock.sendall(payload)
    except OSError:
        pass


def choose_fabric(scenario: Scenario, run_id: str) -> tuple[Scenario, Any]:
    """The fabric the ranks of this run talk over (None: the host's loopback), and the scenario as it runs.

    Per-rank network namespaces when a network fault is asked for or `network.isolate` is true.
    Golden runs always use loopback: which fabric carries the bytes does not change the bits. Without
    the privilege for namespaces: a one-line PrivilegeError, or with `network.fallback: simulate`,
    the network faults are swapped for their simulated variants and the reports say `simulated`.
    """
    real = [i for i, f in enumerate(scenario.faults) if f.fault in SIMULATED]
    isolate, fallback = scenario.network.isolate, scenario.network.fallback
    if not real and not isolate:
        return scenario, None
    what = f"faults.{real[0]} ({scenario.faults[real[0]].fault})" if real else "network.isolate: true"
    if isolate is False:
        if fallback == "simulate":
            return simulate(scenario), None
        raise UserError(f"scenario {scenario.name}: {what} needs per-rank network namespaces, but network.isolate "
                        "is false; drop it, or set network.fallback: simulate")
    problem = privilege_problem()
    if problem is None:
        return scenario, NetnsFabric(run_id)
    if fallback == "simulate":
        return simulate(scenario), None
    raise PrivilegeError(f"scenario {scenario.name}: {what} needs per-rank network namespaces, but {problem}; "
                         "run as root, or set network.fallback: simulate")
