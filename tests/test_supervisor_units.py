"""Unit tests of what the supervisor is built from: failure classification and signatures, the event
log (writer, tail, reader), and the registry and sweep behind `burnin cleanup`."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from burnin.core import procs
from burnin.core.events import EventWriter, Tail, read_events
from burnin.errors import InjectedFault
from burnin.harness import cleanup
from burnin.harness.supervisor import classify_error, classify_exit, signature

CAUSES = ("killed", "hang", "exception", "illegal_memory_access", "network", "signal", "timeout", "exit")

# -- classify_exit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("returncode, expected", [
    (-signal.SIGKILL, ("killed", "SIGKILL")),
    (-signal.SIGSEGV, ("illegal_memory_access", "SIGSEGV")),
    (-signal.SIGBUS, ("illegal_memory_access", "SIGBUS")),
    (-signal.SIGABRT, ("signal", "SIGABRT")),
    (-signal.SIGTERM, ("signal", "SIGTERM")),
    (1, ("exit", "exit code 1")),
    (0, ("exit", "exit code 0")),
    (137, ("exit", "exit code 137")),
])
def test_classify_exit(returncode: int, expected: tuple[str, str]) -> None:
    assert classify_exit(returncode) == expected


def _no_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@pytest.mark.parametrize("sig, cause", [
    (signal.SIGKILL, "killed"),
    (signal.SIGSEGV, "illegal_memory_access"),
    (signal.SIGABRT, "signal"),
    (signal.SIGRTMIN + 6, "signal"),  # a real-time signal: no name in signal.Signals
])
def test_classify_exit_of_a_real_process(sig: int, cause: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], preexec_fn=_no_core)
    os.kill(proc.pid, sig)
    rc = proc.wait(timeout=10)
    assert rc == -sig
    got_cause, detail = classify_exit(rc)
    assert got_cause == cause
    assert detail == (signal.Signals(sig).name if sig < signal.SIGRTMIN else f"signal {int(sig)}")


@given(st.integers(min_value=-64, max_value=255))
def test_classify_exit_never_raises(returncode: int) -> None:
    cause, detail = classify_exit(returncode)
    assert cause in CAUSES and detail


# -- classify_error --------------------------------------------------------------------------------


@pytest.mark.parametrize("error_type, message, cause", [
    ("InjectedFault", "burnin injected process.exception at step 3 (between_steps) on rank 1", "exception"),
    ("RuntimeError", "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                     "[127.0.0.1]:29500", "network"),
    ("RuntimeError", "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                     "10000ms for recv operation to complete", "network"),
    ("DistBackendError", "Timed out waiting 10000ms for recv", "network"),
    ("RuntimeError", "Got the following error when running the callback: RuntimeError: Application timeout "
                     "caused pair closure", "network"),
    ("DistNetworkError", "failed to connect", "network"),
    ("RuntimeError", "Connection reset by peer", "network"),
    ("RuntimeError", "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                     "asynchronously reported at some other API call", "illegal_memory_access"),
    ("AcceleratorError", "CUDA error: misaligned address", "illegal_memory_access"),
    ("ValueError", "bad", "exception"),
    ("RuntimeError", "mat1 and mat2 shapes cannot be multiplied (8x64 and 32x64)", "exception"),
    ("KeyError", "'transformer.h.0.attn.weight'", "exception"),
])
def test_classify_error(error_type: str, message: str, cause: str) -> None:
    assert classify_error(error_type, message) == cause


def test_classify_error_of_the_injected_exception_class() -> None:
    exc = InjectedFault("burnin injected process.exception at step 7 (before_forward) on rank 0")
    assert classify_error(type(exc).__name__, str(exc)) == "exception"


# -- signature -------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [
    ("exit code 1", "exit code 137"),
    ("RuntimeError: Timed out waiting 10000ms for recv", "RuntimeError: Timed out waiting 30000ms for recv"),
    ("segfault at 0x7f3a2c001000 in /usr/lib/x86_64-linux-gnu/libc.so.6",
     "segfault at 0x55d0e4a3b2c0 in /opt/conda/lib/libc.so.6"),
    ("Connection closed by peer [127.0.0.1]:29500\nTraceback line 1", "Connection closed by peer [127.0.0.1]:41233"),
    ("ValueError: bad value in /tmp/pytest-3/run-17/ranks/rank0.jsonl", "ValueError: bad value in /home/u/x.jsonl"),
])
def test_signature_erases_numbers_addresses_and_paths(a: str, b: str) -> None:
    assert signature("network", a) == signature("network", b)


def test_signature_separates_different_causes_and_messages() -> None:
    assert signature("killed", "SIGKILL") != signature("signal", "SIGKILL")
    assert signature("exception", "ValueError: bad") != signature("exception", "KeyError: 'step'")
    assert signature("killed", "SIGKILL") == "killed: SIGKILL"
    assert signature("timeout", "") == "timeout"
    assert signature("exit", "exit code 1") == "exit: exit code N"


def _text_of(sig: str, cause: str) -> str:
    return sig[len(cause) + 2:] if sig != cause else ""


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CAUSES), st.text())
def test_signature_is_stable_under_renormalising(cause: str, detail: str) -> None:
    sig = signature(cause, detail)
    assert sig == cause or sig.startswith(cause + ": ")
    text = _text_of(sig, cause)
    assert len(text) <= 160
    assert not re.search(r"\d", text)
    assert "\n" not in text
    assert signature(cause, text) == sig  # a signature's text is its own signature


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(CAUSES), st.text(alphabet="abc /:.0123456789x", max_size=80),
       st.integers(0, 10**12), st.integers(0, 2**48))
def test_signature_ignores_the_number_in_a_message(cause: str, prefix: str, n: int, addr: int) -> None:
    a = signature(cause, f"{prefix} code {n} at {hex(addr)}")
    b = signature(cause, f"{prefix} code {n + 1} at {hex(addr + 4096)}")
    assert a == b


# -- events: writer, tail, reader -------------------------------------------------------------------


def test_event_writer_flushes_each_event(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "events.jsonl"
    w = EventWriter(path, rank=1, attempt=0)
    ev = w.emit("step_done", step=3, loss_bits="3f800000", where=Path("/x"))
    # Visible to another reader at once, without closing the writer.
    [line] = path.read_text().splitlines()
    assert json.loads(line) == {"t": ev["t"], "event": "step_done", "rank": 1, "attempt": 0, "step": 3,
                                "loss_bits": "3f800000", "where": "/x"}  # what JSON cannot hold, as text
    w.close()
    w.close()  # twice is fine
    with EventWriter(path, fsync=True) as w2:
        w2.emit("second")
    assert [e["event"] for e in read_events(path)] == ["step_done", "second"]


def test_tail_holds_a_partial_line_back_until_it_is_complete(tmp_path: Path) -> None:
    path = tmp_path / "rank0.jsonl"
    tail = Tail(path)
    assert tail.read() == []  # no file yet
    with open(path, "ab") as fh:
        fh.write(b'{"event":"a","n":1}\n{"event":"b","n":')
        fh.flush()
        assert tail.read() == [{"event": "a", "n": 1}]
        assert tail.read() == []
        fh.write(b"2")
        fh.flush()
        assert tail.read() == []
        fh.write(b'}\n{"event":"c"}\n')
        fh.flush()
        assert tail.read() == [{"event": "b", "n": 2}, {"event": "c"}]
        assert tail.read() == []


def test_tail_skips_torn_and_garbage_lines(tmp_path: Path) -> None:
    path = tmp_path / "rank0.jsonl"
    path.write_bytes(b'{"event":"a"}\n{"event":"to\n\xff\xfe not utf-8\n[1, 2]\n"a string"\n\n{"event":"b"}\n')
    assert Tail(path).read() == [{"event": "a"}, {"event": "b"}]
    assert read_events(path) == [{"event": "a"}, {"event": "b"}]


def test_read_events_of_a_log_with_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        for i in range(5):
            w.emit("step_done", step=i)
    line = json.dumps({"t": 1.0, "event": "step_done", "step": 5}).encode()
    with open(path, "ab") as fh:
        fh.write(line[: len(line) // 2])  # the writer died half-way through this one
    assert [e["step"] for e in read_events(path)] == [0, 1, 2, 3, 4]


def test_writer_appending_after_a_torn_line_loses_nothing(tmp_path: Path) -> None:
    # A rank killed mid-line, then the next attempt appends to the same stream.
    path = tmp_path / "rank0.jsonl"
    tail = Tail(path)
    with EventWriter(path, attempt=0) as w:
        w.emit("step_done", step=0)
    with open(path, "ab") as fh:
        fh.write(b'{"t":1.0,"event":"step_d')
    assert [e["event"] for e in tail.read()] == ["step_done"]
    with EventWriter(path, attempt=1) as w:
        w.emit("pg_ready")
    assert [(e["event"], e["attempt"]) for e in read_events(path)] == [("step_done", 0), ("pg_ready", 1)]
    assert [e["event"] for e in tail.read()] == ["pg_ready"]


_TICKER = """
import sys
from burnin.core.events import EventWriter
w = EventWriter(sys.argv[1], rank=0)
i = 0
while True:
    w.emit("tick", i=i, pad="x" * (i * 7919 % 3000))
    i += 1
"""


def test_a_writer_killed_mid_stream_leaves_a_readable_log(tmp_path: Path) -> None:
    path = tmp_path / "rank0.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _TICKER, str(path)])
    tail = Tail(path)
    seen: list[dict] = []
    try:
        deadline = time.time() + 20
        while len(seen) < 3000 and time.time() < deadline:
            seen += tail.read()
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert len(seen) >= 3000
    seen += tail.read()
    events = read_events(path)
    assert events == seen
    assert [e["i"] for e in events] == list(range(len(events)))  # no gap, no duplicate
    # At most the last line is incomplete; everything before it parses.
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    assert len(complete.splitlines()) == len(events)
    # and a writer that carries on after it (the next attempt) is read in full
    with EventWriter(path, rank=0) as w:
        w.emit("resumed")
    assert tail.read()[-1]["event"] == "resumed"
    assert read_events(path)[:-1] == events and read_events(path)[-1]["event"] == "resumed"


# -- cleanup: the registry and the sweep ----------------------------------------------------------


@pytest.fixture
def spawned():
    """Processes a test starts; whatever is left of them is killed and reaped afterwards."""
    started: list[subprocess.Popen] = []

    def spawn(run_id: str | None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "BURNIN_RUN_ID"}
        if run_id is not None:
            env["BURNIN_RUN_ID"] = run_id
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
        started.append(p)
        return p

    yield spawn
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def _run_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def _entry(run_id: str) -> Path:
    return procs.state_dir() / "runs" / f"{run_id}.json"


def _register_from_dead_supervisor(run_id: str, run_dir: Path, pids: list[int]) -> int:
    """Register `pids` from a process that then exits, as a SIGKILLed supervisor would leave them."""
    code = "import json, sys; from burnin.harness import cleanup; cleanup.register(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))"
    sup = subprocess.Popen([sys.executable, "-c", code, run_id, str(run_dir), json.dumps(pids)])
    assert sup.wait(timeout=30) == 0
    assert not procs.alive(sup.pid)
    return sup.pid


def _alive(p: subprocess.Popen) -> bool:
    return p.poll() is None


def test_register_and_unregister(tmp_path: Path) -> None:
    run_id = _run_id()
    assert procs.state_dir() == Path(os.environ["BURNIN_STATE_DIR"])
    cleanup.register(run_id, tmp_path, [11, 12])
    assert json.loads(_entry(run_id).read_text()) == {"run_id": run_id, "run_dir": str(tmp_path),
                                                     "supervisor_pid": os.getpid(), "pids": [11, 12]}
    assert not list((procs.state_dir() / "runs").glob("*.tmp"))
    cleanup.unregister(run_id)
    assert not _entry(run_id).exists()
    cleanup.unregister(run_id)  # already gone: fine


def test_sweep_kills_the_leftovers_of_a_dead_supervisor(tmp_path: Path, spawned) -> None:
    run_id = _run_id()
    leftover = spawned(run_id)
    sup_pid = _register_from_dead_supervisor(run_id, tmp_path, [leftover.pid])
    assert json.loads(_entry(run_id).read_text())["supervisor_pid"] == sup_pid
    report = [r for r in cleanup.sweep() if r["run_id"] == run_id]
    assert report == [{"run_id": run_id, "action": "cleaned", "killed": [leftover.pid], "run_dir": str(tmp_path)}]
    assert leftover.wait(timeout=10) == -signal.SIGKILL
    assert not _entry(run_id).exists()


def test_sweep_leaves_a_run_whose_supervisor_lives(tmp_path: Path, spawned) -> None:
    run_id = _run_id()
    rank = spawned(run_id)
    cleanup.register(run_id, tmp_path, [rank.pid])  # this process is its supervisor, and alive
    try:
        report = [r for r in cleanup.sweep() if r["run_id"] == run_id]
        assert report == [{"run_id": run_id, "action": "skipped", "why": "its supervisor is still running"}]
        time.sleep(0.1)
        assert _alive(rank)
        assert _entry(run_id).exists()
    finally:
        cleanup.unregister(run_id)


@pytest.mark.parametrize("env_run_id", [None, "some-other-run"])
def test_sweep_kills_no_process_without_the_run_id(tmp_path: Path, spawned, env_run_id) -> None:
    # A pid in the registry may have been recycled by an unrelated process: the run id tells them apart.
    run_id = _run_id()
    stranger = spawned(env_run_id)
    _register_from_dead_supervisor(run_id, tmp_path, [stranger.pid])
    report = [r for r in cleanup.sweep() if r["run_id"] == run_id]
    assert report == [{"run_id": run_id, "action": "cleaned", "killed": [], "run_dir": str(tmp_path)}]
    time.sleep(0.1)
    assert _alive(stranger)
    assert not _entry(run_id).exists()


def test_sweep_drops_an_unreadable_registry_file() -> None:
    bad = procs.state_dir() / "runs" / f"{_run_id()}.json"
    bad.write_text('{"run_id": "x", "pi')
    cleanup.sweep()
    assert not bad.exists()


def test_kill_group_kills_the_whole_process_group() -> None:
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print(p.pid, flush=True); time.sleep(60)")
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(leader.stdout.readline())
        assert procs.alive(child)
        procs.kill_group(leader.pid)
        assert leader.wait(timeout=10) == -signal.SIGKILL
        deadline = time.time() + 10
        while procs.alive(child) and time.time() < deadline:
            time.sleep(0.02)
        assert not procs.alive(child)
        procs.kill_group(leader.pid)  # already gone: no error
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()
        leader.stdout.close()


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_a_signal_fault_on_a_rank_that_already_exited_acts_on_nothing_and_says_so(reaped: bool) -> None:
    """A burn-in's timed kill can race another fault's failure: the rank exits a moment before the signal.
    Whether its parent reaped it already (a pool server does at once) or it is still a zombie (a
    supervisor reaps at its next poll), the fault says it acted on nothing, and is no harness error."""
    from types import SimpleNamespace

    from burnin.faults.process import Hang, Kill

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    if reaped:
        proc.wait()
    else:
        while procs.proc_state(proc.pid) != "Z":
            time.sleep(0.01)
    try:
        for fault in (Kill(), Hang()):
            details = fault.inject(SimpleNamespace(pid=proc.pid))
            assert details["target_exited"] and details["pid"] == proc.pid
    finally:
        proc.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert "target_exited" not in Kill().inject(SimpleNamespace(pid=live.pid))
        assert live.wait(timeout=10) == -signal.SIGKILL
    finally:
        live.kill()
        live.wait()
