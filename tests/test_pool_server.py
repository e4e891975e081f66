"""`burnin pool serve`: warm zygotes shared by runs, ranks that are the runs' own, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import burnin_cmd, long_run, processes_of_run, run_cli, run_dir_of, summary_of, wait_for_steps

from burnin.core import procs
from burnin.core.events import read_events
from burnin.harness.pool_server import PoolLink, pool_key

pytestmark = pytest.mark.slow


class Server:
    def __init__(self, max_zygotes: int = 4) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bnpt-"))
        self.sock = self.dir / "pool.sock"
        self.log = self.dir / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(burnin_cmd("pool", "serve", "--socket", str(self.sock), "--max-zygotes",
                                                    str(max_zygotes)),
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while not self.sock.exists():
            assert self.proc.poll() is None and time.time() < deadline, self.log.read_text()
            time.sleep(0.01)

    def env(self) -> dict[str, str]:
        return {"BURNIN_POOL": str(self.sock)}

    def children(self) -> list[int]:
        out = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        out.append(int(p.name))
                except (OSError, IndexError, ValueError):
                    pass
        return out


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    s = Server(**getattr(request, "param", {}))
    yield s
    if s.proc.poll() is None:
        os.killpg(s.proc.pid, signal.SIGKILL)
        s.proc.wait()
    for pid in s.children():
        procs.kill_group(pid)
    subprocess.run(["rm", "-rf", str(s.dir)])


def _events(out: Path) -> list[dict]:
    return read_events(run_dir_of(out) / "events.jsonl")


@pytest.mark.parametrize("server", [{"max_zygotes": 1}], indirect=True)
def test_runs_fork_every_rank_from_the_servers_zygote_and_leave_nothing(server: Server, tmp_path: Path) -> None:
    first = run_cli("run", "kill-rank", "--out", str(tmp_path / "a"), env=server.env())
    assert first.returncode == 0, first.stdout + first.stderr
    s = summary_of(tmp_path / "a")
    assert s["exact"] and [f["outcome"] for f in s["faults"]] == ["recovered"]
    events = _events(tmp_path / "a")
    (joined,) = [e for e in events if e["event"] == "pool_joined"]
    assert joined["server"] == server.proc.pid
    assert not [e for e in events if e["event"] in ("zygote_started", "spare_missing")]
    started = [e for e in events if e["event"] == "rank_started"]
    assert len(started) == 4 and all(e["spare"] for e in started)
    assert processes_of_run(run_dir_of(tmp_path / "a").name) == []
    # A second run of the same key finds the zygote warm; another thread count gets a zygote of its own,
    # and with room for one, the idle zygote of the first key goes.
    second = run_cli("run", "kill-rank", "--out", str(tmp_path / "b"), env=server.env())
    assert second.returncode == 0, second.stdout + second.stderr
    (joined2,) = [e for e in _events(tmp_path / "b") if e["event"] == "pool_joined"]
    assert joined2["warm"] and joined2["zygote"] == joined["zygote"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    link = PoolLink(str(server.sock))
    other = link.hello(pool_key(sys.executable, ["--zygote", "cpu", "2", "triton"], env), env, os.getcwd(),
                       str(tmp_path / "other.ready"))
    assert other["ok"] and not other["warm"] and other["zygote"] != joined["zygote"]
    deadline = time.time() + 120
    while not (tmp_path / "other.ready").exists():  # the server says when its warm-up is done
        assert time.time() < deadline
        time.sleep(0.05)
    log = server.log.read_text()
    assert log.count("warming up") == 2 and log.count("stopped: at most 1 keys") == 1, log
    # SIGTERM: the server stops its zygotes and removes its socket.
    deadline = time.time() + 30
    while server.children() != [other["zygote"]]:  # the first key's zygote is gone, reaped
        assert time.time() < deadline, server.children()
        time.sleep(0.05)
    zygotes = server.children()
    link.close()
    server.proc.terminate()
    assert server.proc.wait(timeout=30) == 0
    assert not server.sock.exists()
    assert not [pid for pid in zygotes if procs.alive(pid)]


def test_a_pooled_rank_is_the_runs_own_and_dies_with_its_supervisor(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    proc = subprocess.Popen(burnin_cmd("run", str(long_run(tmp_path)), "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **server.env()})
    run_id = wait_for_steps(out, proc, steps=2)
    # Found by its run id in /proc/PID/environ (as `burnin cleanup` finds ranks), in the run's directory,
    # and the server's child: its ranks and its spares.
    mine = processes_of_run(run_id)
    assert len(mine) >= 2
    for pid in mine:
        assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == server.proc.pid
        assert os.readlink(f"/proc/{pid}/cwd") == os.getcwd()
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.time() + 30
    while processes_of_run(run_id) and time.time() < deadline:
        time.sleep(0.05)
    assert processes_of_run(run_id) == []
    assert server.proc.poll() is None  # the server goes on serving: the next run joins it
    again = run_cli("run", "kill-rank", "--out", str(tmp_path / "again"), env=server.env())
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_run_without_the_server_keeps_a_zygote_of_its_own_and_says_why(tmp_path: Path) -> None:
    gone = tmp_path / "no-such.sock"
    proc = run_cli("run", "kill-rank", "--out", str(tmp_path), env={"BURNIN_POOL": str(gone)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = _events(tmp_path)
    (why,) = [e for e in events if e["event"] == "pool_server_unavailable"]
    assert why["socket"] == str(gone) and why["why"]
    assert [e for e in events if e["event"] == "zygote_started"]


@pytest.mark.parametrize("argv, words", [
    (["--socket", "/nonexistent-dir/pool.sock"], "is not a directory"),
    (["--socket", "/tmp/" + "x" * 120], "longer than a Unix socket path"),
    (["--socket", "SOCK", "--max-zygotes", "0"], "--max-zygotes"),
    (["--socket", "SOCK", "--idle-exit", "-1"], "--idle-exit"),
    (["--socket", "FILE"], "is not a socket"),
    ([], "--socket"),
])
def test_pool_serve_refuses_bad_flags_in_one_line(argv: list[str], words: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    argv = [str(tmp_path / "p.sock") if a == "SOCK" else str(tmp_path / "file") if a == "FILE" else a for a in argv]
    r = subprocess.run([sys.executable, "-m", "burnin", "pool", "serve", *argv], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and len(r.stderr.strip().splitlines()) <= 2 and "Traceback" not in r.stderr
    assert not (tmp_path / "p.sock").exists()


def test_a_served_socket_is_not_taken_twice(server: Server) -> None:
    r = subprocess.run(burnin_cmd("pool", "serve", "--socket", str(server.sock)), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "already served" in r.stderr, r.stderr
    assert server.proc.poll() is None and server.sock.exists()
