"""Bad input that the scenario loader cannot see: an --out that cannot hold a run directory, a metrics
endpoint that cannot be bound, a CUDA workload without CUDA, a network fault without namespaces.

Each ends in exit status 2 and one line on stderr naming the flag or field and the fix, before
anything starts: no golden run, no rank process, no metrics server, and no run directory left.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import CI, main_in, run_cli
from hypothesis import event, given, settings
from hypothesis import strategies as st

from burnin.errors import ScenarioError, UserError
from burnin.harness import preflight

NO_CUDA = preflight.cuda_device_count()[0] == 0


@pytest.fixture
def sandbox(tmp_path: Path):
    """A working directory, a fresh golden cache and state directory, and a marker in the environment
    that any process the command starts (golden run, ranks) would inherit."""
    work, cache, state = tmp_path / "work", tmp_path / "cache", tmp_path / "state"
    for d in (work, cache, state):
        d.mkdir()
    mark = uuid.uuid4().hex
    env = {"BURNIN_CACHE_DIR": str(cache), "BURNIN_STATE_DIR": str(state), "BURNIN_TEST_MARK": mark}
    return {"work": work, "cache": cache, "state": state, "mark": mark, "env": env}


def _marked_processes(mark: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"BURNIN_TEST_MARK={mark}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _files_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*"))


def refused(sb: dict, *args: str, needle: str | tuple[str, ...], env: dict[str, str] | None = None,
            watch: tuple[Path, ...] = ()) -> str:
    """Run the CLI in the sandbox; assert one line, exit 2, nothing started and nothing left behind."""
    before = {d: _files_under(d) for d in (sb["work"], *watch)}
    proc = run_cli(*args, timeout=60, cwd=sb["work"], env={**sb["env"], **(env or {})})
    assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in (needle,) if isinstance(needle, str) else needle:
        assert n in lines[0], (n, lines[0])
    for d, files in before.items():
        assert _files_under(d) == files, f"{args} left something in {d}"
    assert _files_under(sb["cache"]) == [], "a golden run started"
    assert not any(p.is_file() for p in sb["state"].rglob("*")), "a rank attempt was registered"
    assert _marked_processes(sb["mark"]) == [], "a process of the command outlived it"
    return lines[0]


# --- 1. --out that is not a writable directory ----------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path: Path):
    d = tmp_path / "ro"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        if CI:
            pytest.fail(f"cannot mount a read-only tmpfs: {r.stderr.strip()}")
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.parametrize("kind", ["regular-file", "dev-null", "proc", "through-a-file", "read-only-mount"])
def test_out_not_a_writable_directory(kind: str, sandbox: dict, request: pytest.FixtureRequest) -> None:
    work = sandbox["work"]
    (work / "afile").write_text("x")
    out = {"regular-file": str(work / "afile"), "dev-null": "/dev/null", "proc": "/proc/burnin-never/runs",
           "through-a-file": str(work / "afile" / "runs"),
           "read-only-mount": None}[kind]
    watch: tuple[Path, ...] = ()
    if out is None:
        ro = request.getfixturevalue("read_only_dir")
        out, watch = str(ro / "runs"), (ro,)
    for command in (("run", "smoke"), ("campaign", "sdc-campaign", "--trials", "2")):
        line = refused(sandbox, *command, "--out", out, needle="--out", watch=watch)
        assert "directory" in line, line
    assert not Path(out).exists() or not Path(out).is_dir()


def test_resume_not_a_campaign_directory(sandbox: dict, tmp_path: Path) -> None:
    (sandbox["work"] / "afile").write_text("x")
    for target in ("afile", "/dev/null", str(tmp_path / "missing"), str(sandbox["work"])):
        refused(sandbox, "campaign", "--resume", target, needle="--resume")
    damaged = sandbox["work"] / "damaged"
    damaged.mkdir()
    (damaged / "campaign-meta.json").write_text("{not json")
    refused(sandbox, "campaign", "--resume", str(damaged), needle=("--resume", "campaign-meta.json"))
    (damaged / "campaign-meta.json").write_text('{"trials": 3, "seed": 0}')
    (damaged / "scenario.json").write_text('{"name": 5}')
    refused(sandbox, "campaign", "--resume", str(damaged), needle=("--resume", "scenario.json"))


def test_missing_out_is_still_created_by_a_run_only(sandbox: dict) -> None:
    """A missing --out that can be created passes the check; the check itself creates nothing."""
    out = sandbox["work"] / "a" / "b"
    preflight.check_out_dir(out)
    assert not (sandbox["work"] / "a").exists()
    assert list(sandbox["work"].iterdir()) == []


# --- 2. the metrics endpoint ----------------------------------------------------------------------

@pytest.mark.parametrize("addr, needle", [("no.such.host.invalid", "--metrics-addr"), ("999.1.1.1", "--metrics-addr"),
                                          ("192.0.2.1", "--metrics-addr")])
def test_metrics_addr_unusable(addr: str, needle: str, sandbox: dict) -> None:
    line = refused(sandbox, "run", "smoke", "--out", "runs", "--metrics-port", "0", "--metrics-addr", addr,
                   needle=needle)
    assert addr in line


def test_metrics_port_in_use(sandbox: dict) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = refused(sandbox, "run", "smoke", "--out", "runs", "--metrics-port", str(port), needle="--metrics-port")
        assert str(port) in line and "in use" in line


def test_run_scenario_binds_before_the_run_directory(tmp_path: Path) -> None:
    """In process: a port in use, or an --out that is a file, leaves no run directory, no server, no thread."""
    import threading

    from burnin.harness.runner import run_scenario
    from burnin.scenarios import load_scenario

    threads = set(threading.enumerate())
    out = tmp_path / "new" / "runs"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match="--metrics-port"):
            run_scenario(load_scenario("smoke"), out, metrics_port=port)
    assert not (tmp_path / "new").exists()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="--out"):
        run_scenario(load_scenario("smoke"), tmp_path / "afile", metrics_port=port)
    with socket.socket() as again:  # the check came before the server: the port is free
        again.bind(("127.0.0.1", port))
    assert set(threading.enumerate()) <= threads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# --- 3. CUDA without CUDA, and network faults without namespaces --------------------------------

CUDA_SCENARIO = """\
name: wants-cuda
workload:
  ranks: 2
  steps: 4
  device: cuda
"""


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
def test_cuda_without_a_device(sandbox: dict) -> None:
    path = sandbox["work"].parent / "wants-cuda.yaml"
    path.write_text(CUDA_SCENARIO)
    for command in (("run", str(path)), ("validate", str(path)), ("campaign", str(path))):
        refused(sandbox, *command, needle=(f"{path}:5:", "workload.device", "cpu or auto"))
    line = refused(sandbox, "run", "smoke", "--device", "cuda", needle=("<command line>", "--device", "cpu or auto"))
    assert "workload.device" in line


def test_device_auto_is_accepted(sandbox: dict) -> None:
    from burnin.cli import main

    assert main(["run", "smoke", "--device", "auto", "--out", str(sandbox["work"] / "runs")],
                prepare_only=True) == 0
    assert not (sandbox["work"] / "runs").exists()


NET_SCENARIO = """\
name: net-no-privilege
workload: {ranks: 2, steps: 20}
faults:
  - fault: network.link_down
    rank: 1
    step: 10
    params: {duration_s: 1}
"""


def test_network_fault_without_privilege(sandbox: dict) -> None:
    """Without `ip` on PATH there are no namespaces: validate refuses what run refuses."""
    path = sandbox["work"].parent / "net.yaml"
    path.write_text(NET_SCENARIO)
    no_ip = {"PATH": "/nonexistent-bin"}
    for command in (("validate", str(path)), ("run", str(path))):
        refused(sandbox, *command, env=no_ip, needle=(f"{path}:4:", "faults.0", "network.fallback: simulate"))
    path.write_text(NET_SCENARIO.replace("workload:", "network: {fallback: simulate}\nworkload:"))
    proc = run_cli("validate", str(path), timeout=60, env=no_ip)
    assert proc.returncode == 0 and ": ok" in proc.stdout, proc.stderr


def test_validate_refuses_a_campaign_that_cannot_draw(sandbox: dict) -> None:
    path = sandbox["work"].parent / "camp.yaml"
    path.write_text("name: camp\nworkload: {ranks: 2, steps: 20}\ncampaign: {trials: 3, warmup: 2, window: 4}\n"
                    "faults:\n  - fault: corruption.bitflip\n    step: 3\n"
                    "  - fault: process.kill\n    rank: 1\n    step: 3\n")
    for command in (("validate", str(path)), ("campaign", str(path))):
        refused(sandbox, *command, needle=(f"{path}:5:", "faults.0.fault", "not both"))


def test_campaign_without_campaign_section_leaves_nothing(sandbox: dict) -> None:
    refused(sandbox, "campaign", "smoke", "--out", "runs", needle="campaign")


# --- the fuzz: every flag value ends in exit 2 with one line, or is accepted ---------------------

_ints = st.one_of(st.integers(-5, 70), st.sampled_from(["0", "-1", "1e3", "x", "", "99999999999999999999", "1_0",
                                                        " 3", "0x10", "2**63"]))
_paths = st.sampled_from(["runs", "a/b/c", "", " ", "/dev/null", "/dev/null/x", "/proc", "/proc/x/y", "/sys/x",
                          "afile", "afile/x", ".", "..", "runs/../runs", "x" * 300, "a/" + "y" * 300,
                          "/", "loop", "loop/x", "\x00", "ro"])


def _as_str(v: object) -> str:
    return str(v)


_flag_values = {
    "run": {
        "--out": _paths | st.text(max_size=12),
        "--metrics-port": st.one_of(st.integers(-10, 70000).map(_as_str), st.sampled_from(["0", "http", "-0", ""])),
        "--metrics-addr": st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "::", "localhost", "no.such.host.invalid",
                                           "999.1.1.1", "192.0.2.1", "", "a" * 300, "-1", "\x00", "[::1]"])
        | st.text(max_size=10),
        "--ranks": _ints.map(_as_str), "--steps": _ints.map(_as_str), "--seed": _ints.map(_as_str),
        "--threads": _ints.map(_as_str),
        "--device": st.sampled_from(["cpu", "auto", "cuda", "tpu", "", "CPU"]),
        "--metrics-linger": st.sampled_from(["0", "0.5", "-1", "nan", "inf", "-inf", "1e9", "3600", "x", ""]),
        "--metrics-textfile": _paths.map(lambda p: p + ".prom" if p and p[-1:].isalnum() else p) | _paths,
        "--pushgateway": st.sampled_from(["http://127.0.0.1:9091", "ftp://x", "http://", "", "x"]),
        "--push-instance": st.sampled_from(["node1", "", " "]),
        "--resume-from": st.sampled_from(["afile", "/dev/null", "missing", "ro", ".", "", "/proc", "\x00", "loop",
                                          "a" * 5000]) | _paths,
    },
    "campaign": {
        "--out": _paths | st.text(max_size=12),
        "--trials": st.one_of(st.integers(-3, 40), st.sampled_from([1_000_000 + 1, 10**12, -10**12])).map(_as_str),
        "--seed": st.one_of(st.integers(-3, 2**64), st.sampled_from(["x", ""])).map(_as_str),
        "--resume": st.sampled_from(["afile", "/dev/null", "missing", "ro", ".", "", "/proc", "\x00"]),
        "--history": _paths.map(lambda p: p + ".sqlite" if p and p[-1:].isalnum() else p) | _paths
        | st.sampled_from(["off", "notadb", "other.sqlite", "empty.sqlite"]),
    },
    "burn-in": {
        "--out": _paths | st.text(max_size=12),
        "--duration": st.sampled_from(["90", "10m", "2h", "1h30m", "4s", "8d", "0", "-5", "x", "", "1e3", "90s",
                                       "10m5", "nan", "h", "1.5h"]) | st.text(max_size=6),
        "--level": st.sampled_from(["quick", "medium", "long", "", "forever", "QUICK"]),
        "--seed": st.one_of(st.integers(-3, 2**64), st.sampled_from(["x", ""])).map(_as_str),
        "--history": _paths.map(lambda p: p + ".sqlite" if p and p[-1:].isalnum() else p) | st.just("off"),
        "--resume": st.sampled_from(["afile", "/dev/null", "missing", "ro", ".", "", "/proc", "\x00"]),
    },
    "fleet run": {
        "--duration": st.sampled_from(["60s", "10m", "4s", "0", "x", ""]) | st.text(max_size=6),
        "--level": st.sampled_from(["quick", "", "QUICK"]),
        "--seed": st.one_of(st.integers(-3, 2**64), st.sampled_from(["x", ""])).map(_as_str),
        "--local": st.one_of(st.integers(-2, 70), st.sampled_from([10**9, "x", ""])).map(_as_str),
        "--node": st.sampled_from(["n1", "node-7", "", "a b", "../x", ".hidden", "a" * 80, "\x00"])
        | st.text(max_size=8),
        "--plant": st.sampled_from(["afile", "missing", ".", "", "/dev/null", "plant-ok.yaml", "plant-bad.yaml"]),
        "--pushgateway": st.sampled_from(["http://127.0.0.1:9091", "ftp://x", "http://", "", "x"]),
        "--history": st.just("off") | st.sampled_from(["notadb", "other.sqlite"]),
    },
}
_flag_values["run"]["--history"] = _flag_values["campaign"]["--history"]
_scenarios = {"run": ["smoke", "kill-rank", "sdc-campaign", "no-such-one"],
              "campaign": ["sdc-campaign", "smoke", "no-such-one"],
              "burn-in": ["burn-in", "smoke", "no-such-one"],
              "fleet run": ["fleet", "burn-in", "smoke", "no-such-one"]}


@st.composite
def _argv(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(["run", "campaign", "burn-in", "fleet run"]))
    flags = draw(st.lists(st.sampled_from(sorted(_flag_values[command])), unique=True, max_size=4))
    if command == "campaign" and "--trials" not in flags and "--resume" not in flags:
        flags.append("--trials")  # sdc-campaign's own 200 trials are drawn fine but take a while
    argv = [*command.split(), draw(st.sampled_from(_scenarios[command]))]
    if command == "fleet run":  # its --out is required: a fleet directory of the user's choosing
        argv.append(f"--out={draw(_paths | st.text(max_size=12))}")
    for flag in flags:
        argv += [f"{flag}={draw(_flag_values[command][flag])}"]
    return argv


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("cli-fuzz")
    (d / "afile").write_text("x")
    (d / "notadb").write_bytes(b"SQLite format 2\x00 and then garbage")
    _other_database(d / "other.sqlite")
    (d / "empty.sqlite").write_bytes(b"")
    (d / "plant-ok.yaml").write_text("node-1: {silent: 'every=50,bit=10,rank=1'}\n")
    (d / "plant-bad.yaml").write_text("node-1: {slow: {cpu_fraction: 7}}\n")
    (d / "loop").symlink_to(d / "loop")
    (d / "ro").mkdir()
    # a read-only mount where root may mount one; a plain directory elsewhere
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(d / "ro")],
                             capture_output=True).returncode == 0
    try:
        yield d
    finally:
        if mounted:
            subprocess.run(["umount", str(d / "ro")], check=True)


@settings(max_examples=150, deadline=None)
@given(argv=_argv())
def test_fuzz_cli_flags(argv: list[str], fuzz_dir: Path) -> None:
    """In process, through the same checks `run`, `campaign`, `burn-in` and `fleet run` make before they start
    anything."""
    before = _files_under(fuzz_dir)
    rc, text = main_in(fuzz_dir, argv)
    event(f"exit {rc}")
    assert rc in (0, 2), (argv, rc, text)
    if rc == 2:
        assert len(text.strip().splitlines()) == 1, (argv, text)
    else:
        assert text == "", (argv, text)
    assert "Traceback" not in text
    assert _files_under(fuzz_dir) == before, argv  # the checks create nothing, even for an accepted --out


def test_fuzz_examples_accept_and_refuse(fuzz_dir: Path) -> None:
    """The fuzz's two outcomes both happen: a sound command line is accepted, each bad flag refused."""
    from burnin.cli import main

    cwd = os.getcwd()
    os.chdir(fuzz_dir)
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            assert main(["run", "smoke", "--out", "new/runs", "--metrics-port", "0"], prepare_only=True) == 0
            assert main(["campaign", "sdc-campaign", "--trials", "5", "--out", "new"], prepare_only=True) == 0
            assert main(["fleet", "run", "--local", "3", "--duration", "60s", "--out", "new/fleet", "--plant",
                         "plant-ok.yaml"], prepare_only=True) == 0
            assert main(["fleet", "run", "fleet", "--node", "n1", "--out", "new/fleet"], prepare_only=True) == 0
            assert err.getvalue() == ""
            for argv, needle in ((["run", "--out", "afile"], "--out"), (["run", "--metrics-linger", "nan"], "--metrics-linger"),
                                 (["run", "--metrics-port", "0", "--metrics-addr", "999.1.1.1"], "--metrics-addr"),
                                 (["campaign", "sdc-campaign", "--trials", "1000001"], "--trials"),
                                 (["campaign", "--resume", "afile"], "--resume"),
                                 (["run", "--metrics-textfile", "/dev/null"], "--metrics-textfile"),
                                 (["fleet", "run", "--out", "new", "--local", "2", "--plant", "plant-bad.yaml"],
                                  "cpu_fraction"),
                                 (["fleet", "run", "--out", "new", "--node", "a b"], "--node")):
                err.truncate(0)
                err.seek(0)
                assert main(argv, prepare_only=True) == 2, argv
                assert needle in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    finally:
        os.chdir(cwd)
    assert not (fuzz_dir / "new").exists()


def test_check_device_names_the_file_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without running torch: the error for a file says file:line, for the flag <command line>."""
    from burnin.scenarios import load_scenario

    monkeypatch.setattr(preflight, "cuda_device_count", lambda: (0, "pretend"))
    path = tmp_path / "c.yaml"
    path.write_text(CUDA_SCENARIO)
    with pytest.raises(ScenarioError) as exc:
        preflight.check_device(load_scenario(path), path)
    assert str(exc.value).startswith(f"{path}:5: workload.device: cuda, but this machine has no CUDA device (pretend)")
    with pytest.raises(ScenarioError) as exc:
        preflight.check_device(load_scenario("smoke", {"workload.device": "cuda"}), "smoke", {"workload.device": "cuda"})
    assert str(exc.value).startswith("<command line>: workload.device: --device cuda")
    preflight.check_device(load_scenario("smoke", {"workload.device": "auto"}), "smoke")  # auto: what there is
    monkeypatch.setattr(preflight, "cuda_device_count", lambda: (1, ""))
    preflight.check_device(load_scenario(path), path)


def test_cuda_probe_asks_torch_only_when_a_driver_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, answer[0], answer[1], answer[2])

    probe = preflight.cuda_device_count.__wrapped__  # not the cached one
    monkeypatch.setattr(preflight.subprocess, "run", fake_run)
    monkeypatch.setattr(preflight.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(preflight.os.path, "exists", lambda p: False)
    assert probe()[0] == 0 and calls == []  # no driver: no subprocess, no torch
    monkeypatch.setattr(preflight.glob, "glob", lambda pattern: ["/dev/nvidia0", "/dev/nvidiactl"])
    answer = (0, "2\n", "")
    assert probe() == (2, "torch sees no CUDA device (a CPU-only torch? CUDA_VISIBLE_DEVICES?)")
    assert "torch.cuda.device_count()" in calls[-1][-1]
    answer = (0, "0\n", "")
    assert probe()[0] == 0
    answer = (1, "", "Traceback ...\nModuleNotFoundError: No module named 'torch'\n")
    count, why = probe()
    assert count == 0 and "No module named 'torch'" in why and "\n" not in why


# -- the history a reading command is given -------------------------------------------------------------


def _other_database(path: Path) -> None:
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (x TEXT)")
    con.commit()
    con.close()


def _main(argv: list[str]) -> tuple[int, str, str]:
    from burnin.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


_READERS = [["history"], ["history", "--json"], ["triage"], ["compare", "history:smoke", "history:smoke"]]


@pytest.mark.parametrize("command", _READERS, ids=lambda c: " ".join(c))
@pytest.mark.parametrize("kind", ["not-a-database", "another-database", "missing", "missing-directory", "directory"])
def test_a_history_that_is_not_one(command: list[str], kind: str, tmp_path: Path) -> None:
    """`history`, `triage` and `compare history:` refuse a history they cannot read, in one line and exit 2,
    and create nothing."""
    path = {"not-a-database": tmp_path / "h.db", "another-database": tmp_path / "other.sqlite",
            "missing": tmp_path / "none.sqlite", "missing-directory": tmp_path / "no" / "such" / "h.db",
            "directory": tmp_path}[kind]
    if kind == "not-a-database":
        path.write_text("this is not an SQLite database\n")
    elif kind == "another-database":
        _other_database(path)
    before = _files_under(tmp_path)
    rc, out, err = _main([*command, "--history", str(path)])
    assert rc == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("burnin: error: --history: "), err
    assert "Traceback" not in err
    assert _files_under(tmp_path) == before


def test_history_without_a_flag_and_nothing_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURNIN_HISTORY", str(tmp_path / "never" / "h.sqlite"))
    rc, out, err = _main(["history"])
    assert rc == 0 and "no runs recorded yet" in out and err == ""
    assert not (tmp_path / "never").exists()


@settings(max_examples=60, deadline=None)
@given(content=st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: b"SQLite format 3\x00" + b)),
       command=st.sampled_from(_READERS))
def test_fuzz_history_files(content: bytes, command: list[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Whatever bytes the history file holds, a reading command lists it or refuses it in one line; it
    never writes to it."""
    path = tmp_path_factory.mktemp("fuzz-history") / "h.sqlite"
    path.write_bytes(content)
    rc, out, err = _main([*command, "--history", str(path)])
    event(f"exit {rc}")
    assert rc in (0, 2), (content, rc, err)
    if rc == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("burnin: error: "), (content, err)
    assert "Traceback" not in err
    assert path.read_bytes() == content
