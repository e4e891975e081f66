"""The golden cache keeps what is in use and prunes the rest: no checkpoints of golden runs, no run
directories of processes that are gone, no stale temporary files, and no more than
$BURNIN_GOLDEN_CACHE_MAX records (least recently used go first)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from burnin.harness import golden as g
from conftest import burnin_cmd, processes_of_run, run_cli


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own (children inherit it); its `golden/` directory."""
    monkeypatch.setenv("BURNIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BURNIN_GOLDEN_CACHE_MAX", raising=False)
    root = tmp_path / "cache" / "golden"
    root.mkdir(parents=True)
    return root


@pytest.fixture
def other_live_pid():
    """A live process that is not this one (started now)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process
    return proc.pid


def make_record(root: Path, key: str, age_s: float = 0.0) -> Path:
    path = root / key / "golden.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"key": "%s"}' % key)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def make_run(key_dir: Path, pid: int, made: float | None = None) -> Path:
    """A golden run's directory as the supervisor leaves it: events, rank logs, checkpoints."""
    run = key_dir / f"run-{int(made if made is not None else time.time())}-{pid}"
    (run / "ranks").mkdir(parents=True)
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "events.jsonl").write_text('{"event": "run_started"}\n')
    (run / "ranks" / "rank0.log").write_text("log\n")
    (run / "checkpoints" / "step-000002" / "rank0.pt").write_bytes(b"\0" * 50_000)
    return run


def tree_bytes(path: Path) -> int:
    """What a removal reports: a file's size, or the sizes of everything under a directory."""
    if not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*"))


def checkpoints_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.name == "checkpoints" or p.suffix == ".pt"]


# -- pruning ----------------------------------------------------------------------------------------

def test_prune_removes_what_no_live_process_needs(cache: Path, other_live_pid: int) -> None:
    key = cache / "k1"
    record = make_record(cache, "k1")
    dead_run = make_run(key, dead_pid())
    mine = make_run(key, os.getpid())
    theirs = make_run(cache / "k2", other_live_pid)       # a golden run going on in another process
    recycled = make_run(cache / "k3", other_live_pid, made=time.time() - 3600)  # pid reused since
    orphan_key = cache / "k4"                                # only a dead run: the whole key goes
    orphan_run = make_run(orphan_key, dead_pid())
    stale_tmp = key / f"golden.tmp{dead_pid()}"
    stale_tmp.write_text("{")
    fresh_tmp = key / f"golden.tmp{other_live_pid}"
    fresh_tmp.write_text("{")
    old_tmp = key / f"golden.tmp{os.getpid()}"              # live owner, but written an hour ago
    old_tmp.write_text("{")
    os.utime(old_tmp, (time.time() - 2 * g.STALE_TMP_S,) * 2)
    trash = cache / f".trash-{dead_pid()}-abcd"              # a prune that died half way
    make_run(trash, 1)
    doomed = {dead_run: "run", recycled: "run", orphan_run: "run", stale_tmp: "tmp", old_tmp: "tmp",
              trash: "trash"}
    sizes = {p: tree_bytes(p) for p in doomed}

    report = g.prune_cache()

    removed = {Path(item["path"]): item for item in report["removed"]}
    assert {p: item["kind"] for p, item in removed.items()} == doomed
    assert {p: item["bytes"] for p, item in removed.items()} == sizes
    assert report["bytes"] == sum(sizes.values()) > 5 * 50_000
    for path in doomed:
        assert not path.exists(), path
    assert not orphan_key.exists()
    for path in (record, mine / "checkpoints", theirs / "checkpoints", fresh_tmp):
        assert path.exists(), path
    assert {Path(s["path"]) for s in report["skipped"]} == {mine, theirs}
    assert not [p for p in cache.iterdir() if p.name.startswith(".trash")]
    # Nothing more to do the second time.
    assert g.prune_cache()["removed"] == []


def test_lru_bound_keeps_the_newest_records_and_those_in_use(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(6):
        make_record(cache, f"k{i}", age_s=100 - 10 * i)      # k5 is the most recently used
    make_run(cache / "k0", os.getpid())                      # the oldest, but a golden run is going on in it
    monkeypatch.setenv("BURNIN_GOLDEN_CACHE_MAX", "3")
    report = g.prune_cache()
    assert sorted(Path(i["path"]).name for i in report["removed"]) == ["k1", "k2"]
    assert {i["kind"] for i in report["removed"]} == {"record"}
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == ["k0", "k3", "k4", "k5"]
    # Using a record makes it the newest: with a bound of 2, k3 stays and k4 goes.
    os.utime(cache / "k3" / "golden.json")
    assert [Path(i["path"]).name for i in g.prune_cache(max_keys=2)["removed"]] == ["k4"]
    # No bound: nothing goes.
    assert g.prune_cache(max_keys=0)["removed"] == []
    monkeypatch.setenv("BURNIN_GOLDEN_CACHE_MAX", "0")
    assert g.cache_max() == 0 and g.prune_cache()["removed"] == []


@pytest.mark.parametrize("raw, expected", [("", g.CACHE_MAX_DEFAULT), ("7", 7), (" 0 ", 0),
                                           ("-1", g.CACHE_MAX_DEFAULT), ("lots", g.CACHE_MAX_DEFAULT)])
def test_cache_max_from_the_environment(raw: str, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURNIN_GOLDEN_CACHE_MAX", raw)
    assert g.cache_max() == expected


def test_prune_of_a_missing_cache_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURNIN_CACHE_DIR", str(tmp_path / "nowhere"))
    assert g.prune_cache()["removed"] == [] and g.clear_cache()["removed"] == []
    assert not (tmp_path / "nowhere").exists()


def test_a_new_run_dir_is_in_use_at_once(cache: Path) -> None:
    """The run directory is made under the cache lock, so an eviction can never take it."""
    make_record(cache, "old", age_s=1000)
    run = g._new_run_dir(cache / "old")
    assert g.prune_cache(max_keys=0)["removed"] == []
    report = g.clear_cache()
    assert [Path(i["path"]) for i in report["removed"]] == [cache / "old" / "golden.json"]
    assert run.is_dir() and [Path(s["path"]) for s in report["skipped"]] == [run]


# -- burnin cleanup ---------------------------------------------------------------------------------

def test_cleanup_golden_clears_the_cache(cache: Path) -> None:
    make_record(cache, "a")
    make_record(cache, "b")
    make_run(cache / "a", dead_pid())
    live = make_run(cache / "b", os.getpid())  # this test's process: alive, so the CLI keeps it
    total = tree_bytes(cache / "a") + tree_bytes(cache / "b" / "golden.json")

    proc = run_cli("cleanup", "--golden")
    assert proc.returncode == 0, proc.stderr
    assert f"removed 2 item(s), {total} bytes" in proc.stdout, proc.stdout
    assert f"removed record {cache / 'a'}" in proc.stdout
    assert f"kept {live}" in proc.stdout and "still running" in proc.stdout
    assert not (cache / "a").exists() and not (cache / "b" / "golden.json").exists()
    assert live.is_dir()

    proc = run_cli("cleanup", "--golden", "--force")  # the live run's directory too
    assert proc.returncode == 0, proc.stderr
    assert not (cache / "b").exists()
    assert [p for p in cache.iterdir() if not p.name.startswith(".")] == []

    proc = run_cli("cleanup", "--golden")
    assert proc.returncode == 0 and "removed 0 item(s), 0 bytes" in proc.stdout, proc.stdout


def test_cleanup_prunes_and_golden_prune_honours_the_bound(cache: Path) -> None:
    make_record(cache, "old", age_s=100)
    make_record(cache, "new")
    dead = make_run(cache / "new", dead_pid())
    proc = run_cli("cleanup")  # plain cleanup prunes: the dead run goes, both records stay
    assert proc.returncode == 0, proc.stderr
    assert f"removed run {dead}" in proc.stdout and "nothing to clean up" not in proc.stdout
    assert not dead.exists() and (cache / "old" / "golden.json").exists()

    proc = run_cli("cleanup", "--golden", "prune", env={"BURNIN_GOLDEN_CACHE_MAX": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"removed record {cache / 'old'}" in proc.stdout and "removed 1 item(s)" in proc.stdout
    assert (cache / "new" / "golden.json").exists() and not (cache / "old").exists()

    proc = run_cli("cleanup")
    assert proc.returncode == 0 and "nothing to clean up" in proc.stdout, proc.stdout


def test_cleanup_golden_rejects_an_unknown_mode() -> None:
    proc = run_cli("cleanup", "--golden", "everything")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


# -- real golden runs -------------------------------------------------------------------------------

@pytest.mark.slow
def test_golden_run_leaves_only_its_record(cache: Path) -> None:
    from burnin.scenarios.loader import parse_scenario

    scenario = parse_scenario("name: g\nworkload: {steps: 4}\ncheckpoint: {every: 2}\n")
    seen: list[str] = []
    record, cached = g.get_golden(scenario, on_event=lambda ev: seen.append(ev.get("event", "")))
    assert not cached and record.checkpoint_hashes  # it did write checkpoints while it ran
    assert "checkpoint_saved" in seen
    key_dir = cache / record.key
    assert sorted(p.name for p in key_dir.iterdir()) == ["golden.json"]
    assert checkpoints_under(cache.parent) == []
    # A hit touches the record (least recently used goes first) and leaves the cache as it was.
    old = time.time() - 1000
    os.utime(key_dir / "golden.json", (old, old))
    again, cached = g.get_golden(scenario)
    assert cached and again == record
    assert (key_dir / "golden.json").stat().st_mtime > old + 900
    assert sorted(p.name for p in key_dir.iterdir()) == ["golden.json"]


def _golden_run_dir(cache: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """Wait until the golden run of `proc` has saved a checkpoint in the cache; its run directory."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        runs = list(cache.glob(f"*/run-*-{proc.pid}"))
        if runs and list(runs[0].glob("checkpoints/*/manifest.json")):
            return runs[0]
        time.sleep(0.05)
    raise AssertionError("the golden run did not save a checkpoint in time")


_LONG = ["--steps", "400", "--refresh-golden", "--quiet"]


def _long_scenario(tmp_path: Path) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nworkload: {steps: 400}\ncheckpoint: {every: 2, keep: 3}\n")
    return path


@pytest.mark.slow
def test_interrupted_golden_run_leaves_no_checkpoints(cache: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(burnin_cmd("run", str(_long_scenario(tmp_path)), "--out", str(tmp_path / "runs"), *_LONG),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run = _golden_run_dir(cache, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert not run.exists()
    assert checkpoints_under(cache.parent) == []
    assert [p for p in cache.glob("*/*") if p.name != "golden.json"] == []


@pytest.mark.slow
def test_failed_golden_run_keeps_its_logs_not_its_checkpoints(cache: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(burnin_cmd("run", str(_long_scenario(tmp_path)), "--out", str(tmp_path / "runs"), *_LONG),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run = _golden_run_dir(cache, proc)
        ranks = processes_of_run(f"golden-{run.parent.name}-{proc.pid}")
        assert ranks
        os.kill(ranks[-1], signal.SIGKILL)  # the golden run allows no restart: it fails
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, out + err
    assert "golden (fault-free) run failed" in out + err and str(run) in out + err
    # What the message points at is there; the checkpoints are not.
    assert (run / "events.jsonl").is_file() and (run / "ranks").is_dir()
    assert checkpoints_under(cache.parent) == []
    # Its process is gone: the next prune takes the rest.
    report = g.prune_cache()
    assert [Path(i["path"]) for i in report["removed"]] == [run]
    assert not run.exists()


def test_the_code_fingerprint_reads_every_source_it_names() -> None:
    """The golden key's code fingerprint names the rank-side sources that decide a run's bits: each is
    there (a moved one would otherwise have been left out of the hash without a word)."""
    root = Path(g.__file__).resolve().parent.parent
    assert all((root / rel).is_file() for rel in g.BIT_SOURCES), g.BIT_SOURCES
    assert len(g._code_fingerprint()) == 16
