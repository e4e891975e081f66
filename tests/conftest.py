"""Shared test set-up: an isolated golden cache and state directory, and helpers to run the CLI.

Set BURNIN_CI=1 (as .ci/run does) to make tests that need something a CI machine has (root,
network namespaces, Prometheus) fail instead of skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

CI = os.environ.get("BURNIN_CI") == "1"
# A suite started in the background by a shell without job control (`make test &` in a script) inherits
# SIGINT ignored, and so would every burnin process it starts: the tests that press Ctrl-C on a run
# found it ignored. A handler here makes the runs' SIGINT the default again (exec resets handlers).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Kernel tests run Triton in the interpreter on CPU tensors; triton fixes the mode when first imported.
os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # One golden cache for the whole session, shared by the xdist workers (the cache is safe under
    # concurrent writers): scenarios with the same workload share a golden run.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = shared / "burnin-cache"
    cache.mkdir(exist_ok=True)
    os.environ["BURNIN_CACHE_DIR"] = str(cache)
    os.environ["BURNIN_GOLDEN_CACHE_MAX"] = "0"  # no bound: the suite's ~40 workloads each computed once
    os.environ["BURNIN_STATE_DIR"] = str(tmp_path_factory.mktemp("burnin-state"))
    # The run history of the whole session, away from the user's (tests that read it set their own).
    os.environ["BURNIN_HISTORY"] = str(tmp_path_factory.mktemp("burnin-history") / "history.sqlite")
    # Memory snapshots in shared memory of this session's own: a test's `burnin cleanup --force` sweeps
    # every snapshot directory it finds, and must not sweep those of the runs another xdist worker has
    # going. (The state directory, where runs register, is this session's already.)
    shm = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else base
    session_shm = shm / f"burnin-tests-{os.getpid()}"
    session_shm.mkdir(exist_ok=True)
    os.environ["BURNIN_SHM_DIR"] = str(session_shm)
    yield
    shutil.rmtree(session_shm, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _warm_pool(_isolated_dirs: None) -> Iterator[None]:
    """One `burnin pool serve` per test process, for every run the tests start: a run forks its ranks from
    the server's warm zygote instead of paying a start-up of its own (~4 s of CPU each; the suite starts
    ~100 runs). BURNIN_TEST_POOL=0 runs the suite with each run's own pool instead. Tests of a run's own
    pool, or of what a supervisor's death leaves, take BURNIN_POOL out of their runs' environment."""
    if os.environ.get("BURNIN_TEST_POOL", "1") == "0":
        yield
        return
    d = Path(tempfile.mkdtemp(prefix="bnpool-"))
    sock = d / "pool.sock"
    log = open(d / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "burnin", "pool", "serve", "--socket", str(sock)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(500):
        if sock.exists() or proc.poll() is not None:
            break
        time.sleep(0.01)
    if not sock.exists():
        raise RuntimeError(f"burnin pool serve did not start: {(d / 'server.log').read_text()[-2000:]}")
    os.environ["BURNIN_POOL"] = str(sock)
    yield
    os.environ.pop("BURNIN_POOL", None)
    t0 = time.monotonic()
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
    if proc.returncode != 0 or time.monotonic() - t0 > 5:  # an anomaly: keep the server's log to read
        keep = Path(tempfile.gettempdir()) / f"burnin-pool-{os.getpid()}.log"
        shutil.copy(d / "server.log", keep)
        sys.stderr.write(f"\nburnin pool serve took {time.monotonic() - t0:.1f} s to stop (status "
                         f"{proc.returncode}); its log: {keep}\n")
    shutil.rmtree(d, ignore_errors=True)


#: Wall seconds per module in a whole run on 2 cores (`BURNIN_TEST_CPU`, docs/performance.md). Only the
#: order matters: the Makefile runs xdist with `--dist loadscope --no-loadscope-reorder`, a module goes
#: to one worker whole, and the heaviest are handed out first so that the two workers end together
#: (xdist's own order, by number of tests, handed the three-test torchrun module out last). A module
#: not listed counts 5 s.
MODULE_SECONDS = {
    "test_network.py": 168, "test_external.py": 280, "test_burn_in.py": 165, "test_fleet.py": 130, "test_torchrun.py": 110, "test_regressions.py": 126,
    "test_sdc.py": 115, "test_html_report.py": 78, "test_e2e.py": 65, "test_pool_server.py": 50,
    "test_spares.py": 61, "test_sharded.py": 90, "test_pytest_plugin.py": 56, "test_lightning.py": 46,
    "test_snapshots.py": 42, "test_cli.py": 42, "test_schedules.py": 36, "test_memory_faults.py": 32,
    "test_recovery_campaign.py": 30, "test_user_loop.py": 29, "test_resume_from.py": 25, "test_cli_bad_input.py": 22,
    "test_forecast.py": 21, "test_prometheus.py": 18, "test_attribution.py": 15, "test_workload.py": 10,
    "test_validation.py": 9, "test_scenarios.py": 9, "test_golden_cache.py": 7, "test_kernels.py": 7,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (-MODULE_SECONDS.get(item.path.name, 5), str(item.path), order[id(item)]))
    if not any("gpu" in item.keywords for item in items):
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def gloo(tmp_path_factory: pytest.TempPathFactory):
    """A real gloo process group of one rank in this process (checkpoint saves gather over it)."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))
    yield
    dist.destroy_process_group()


#: A run that is still training long after it started, with a short golden run: rank 0 straggles a
#: second per step from step 6 on (the golden run is fault-free, so it takes seconds).
LONG_RUN = """\
name: long-run
workload: {model: tiny, ranks: 2, steps: 60, threads: 1}
faults:
  - {fault: process.straggler, rank: 0, step: 6, params: {delay_s: 1.0, steps: 50}, expect: [masked, recovered]}
"""


def long_run(tmp_path: Path) -> Path:
    path = tmp_path / "long-run.yaml"
    path.write_text(LONG_RUN)
    return path


def require_module(module: str, extra: str) -> None:
    """Skip a module's tests when `module` (installed by the `extra`) is missing; in CI, fail them."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        msg = f"needs {module} (the `{extra}` extra: pip install -e '.[dev,{extra}]', as `make setup` does)"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)


def main_in(directory: Path, argv: list[str]) -> tuple[int, str]:
    """`burnin ARGV` in this process, from `directory`, stopping after the checks that come before any
    work (`prepare_only`): (exit status, what it wrote to stderr)."""
    import contextlib
    import io

    from burnin.cli import main

    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv, prepare_only=True)
            except SystemExit as exc:  # argparse's own errors
                rc = exc.code
    finally:
        os.chdir(cwd)
    return rc, err.getvalue()


def burnin_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "burnin", *args]


def run_cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(burnin_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def run_dir_of(out: Path) -> Path:
    dirs = [d for d in out.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def summary_of(out: Path) -> dict:
    return json.loads((run_dir_of(out) / "summary.json").read_text())


def wait_for_steps(out: Path, proc: subprocess.Popen, steps: int = 6, timeout: float = 300) -> str:
    """Wait until the faulted run under `out` (not its golden run) has completed `steps` steps; its run id."""
    from burnin.core.events import read_events

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        dirs = [d for d in out.iterdir() if d.is_dir()] if out.exists() else []
        if dirs and (dirs[0] / "events.jsonl").exists():
            if sum(e["event"] == "step_done" for e in read_events(dirs[0] / "events.jsonl")) >= steps:
                return dirs[0].name
        time.sleep(0.1)
    raise AssertionError("the run did not start training in time")


def processes_of_run(run_id: str) -> list[int]:
    """Live (non-zombie) processes that carry this run id in their environment."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if f"BURNIN_RUN_ID={run_id}".encode() in env.split(b"\0") and state != "Z":
            found.append(int(proc.name))
    return found


# Where the suite's time goes: with BURNIN_TEST_CPU=FILE, one JSON line per test with its wall time and
# the CPU seconds of this process and of the processes it waited for (the runs it started). Ranks forked
# by the session's `burnin pool serve` are the server's children, not the test's: their CPU comes in
# once, with the last test of the worker, whose teardown stops the server.
_CPU_LOG = os.environ.get("BURNIN_TEST_CPU")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if not _CPU_LOG:
        yield
        return
    import resource
    import time

    def cpu() -> float:
        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))

    t0, c0 = time.perf_counter(), cpu()
    yield
    with open(_CPU_LOG, "a") as fh:
        fh.write(json.dumps({"test": item.nodeid, "wall_s": round(time.perf_counter() - t0, 2),
                             "cpu_s": round(cpu() - c0, 2)}) + "\n")
