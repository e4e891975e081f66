"""Tests of the fault catalogue: the registry, entry-point plug-ins, and the storage fault on real files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import burnin.faults.registry as registry
from burnin.errors import CheckpointError, UserError
from burnin.faults import COLLECTIVE_POINTS, POINTS, STEP_POINTS, Fault, UnknownFault, get, names, register
from burnin.rank import checkpoint
from burnin.harness.supervisor import OutOfRankContext
from burnin.scenarios.schema import FaultSpec, Scenario

BUILT_IN = {
    "process.kill": "out_of_rank",
    "process.hang": "out_of_rank",
    "process.exception": "in_rank",
    "process.straggler": "in_rank",
    "storage.checkpoint_corrupt": "out_of_rank",
    "storage.snapshot_corrupt": "out_of_rank",
}


@pytest.fixture
def clean_registry():
    """Whatever a test registers is gone afterwards, and plug-ins are looked up afresh."""
    before = dict(registry._REGISTRY)
    loaded = registry._plugins_loaded
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)
    registry._plugins_loaded = loaded
    sys.modules.pop("myplugin_faults", None)


# -- the catalogue ----------------------------------------------------------------------------------


def test_built_in_catalogue() -> None:
    assert set(BUILT_IN) <= set(names())
    assert names() == sorted(names())
    for name, where in BUILT_IN.items():
        cls = get(name)
        assert cls.name == name
        assert cls.where == where
        assert cls.summary
        assert cls.points and set(cls.points) <= set(POINTS) and cls.points[0] in STEP_POINTS
        cls.Params()  # every parameter has a default
    assert [c.name for c in registry.all_faults()] == names()


def test_out_of_rank_faults_act_between_steps() -> None:
    """An out-of-rank fault holds the rank at a point until the supervisor has acted: between two steps,
    or (a kill, a hang) on its way into a sharded model's collective, its peers already in it."""
    for name in ("storage.checkpoint_corrupt", "storage.snapshot_corrupt"):
        assert get(name).points == ("between_steps",)
    for name in ("process.kill", "process.hang"):
        assert get(name).points == ("between_steps",) + COLLECTIVE_POINTS


@pytest.mark.parametrize("typo, closest", [
    ("process.kil", "process.kill"),
    ("proces.hang", "process.hang"),
    ("storage.checkpoint_corupt", "storage.checkpoint_corrupt"),
    ("process.exceptoin", "process.exception"),
])
def test_unknown_fault_suggests_the_closest(typo: str, closest: str) -> None:
    with pytest.raises(UnknownFault) as info:
        get(typo)
    assert str(info.value) == f"unknown fault {typo!r}: did you mean {closest!r}?"
    assert isinstance(info.value, UserError)


def test_unknown_fault_with_nothing_close_points_at_the_list() -> None:
    with pytest.raises(UnknownFault, match=r"unknown fault 'zzzz': `burnin list` shows the catalogue"):
        get("zzzz")


def _fault_class(name, points=("between_steps",)) -> type[Fault]:
    attrs = {"summary": "s", "where": "in_rank", "points": points, "inject": lambda self, ctx: {}}
    if name is not None:
        attrs["name"] = name
    return type("Custom", (Fault,), attrs)


@pytest.mark.parametrize("name", [None, "", "nodot", "process.", ".kill", "two words.x", "a..b"])
def test_register_rejects_a_bad_name(clean_registry, name) -> None:
    cls = _fault_class(name)
    with pytest.raises(TypeError, match="must be 'family.kind'"):
        register(cls)
    assert cls not in registry._REGISTRY.values()


@pytest.mark.parametrize("points", [("after_lunch",), ("before_forward", "between_step"), ()])
def test_register_rejects_a_bad_point(clean_registry, points) -> None:
    cls = _fault_class("test.badpoint", points)
    with pytest.raises(TypeError, match="points"):
        register(cls)
    with pytest.raises(UnknownFault):
        get("test.badpoint")


def test_register_rejects_a_second_class_under_a_taken_name(clean_registry) -> None:
    with pytest.raises(TypeError, match="registered twice"):
        register(_fault_class("process.kill"))
    assert get("process.kill").__module__ == "burnin.faults.process"


def test_register_adds_and_returns_the_class(clean_registry) -> None:
    cls = _fault_class("test.custom", ("after_backward", "between_steps"))
    assert register(cls) is cls
    assert register(cls) is cls  # registering the same class again is harmless
    assert get("test.custom") is cls
    assert "test.custom" in names()
    spec = FaultSpec.model_validate({"fault": "test.custom", "step": 1})
    assert spec.at == "after_backward" and isinstance(spec.build(), cls)


# -- entry-point plug-ins -----------------------------------------------------------------------------


def _write_plugin(root: Path, target: str = "myplugin_faults:SlowFault") -> None:
    dist_info = root / "myplugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[burnin.faults]\nslow = {target}\n")
    (root / "myplugin_faults.py").write_text(textwrap.dedent('''
        import time
        from pydantic import BaseModel, ConfigDict, Field
        from burnin.faults import Fault

        class SlowParams(BaseModel):
            model_config = ConfigDict(extra="forbid")
            delay_s: float = Field(0.01, gt=0)

        class SlowFault(Fault):
            name = "test.slow"
            summary = "a plug-in fault: sleep a little"
            where = "in_rank"
            points = ("before_forward", "between_steps")
            Params = SlowParams
            disruptive = False

            def inject(self, ctx):
                time.sleep(self.params.delay_s)
                return {"slept_s": self.params.delay_s}

        NOT_A_FAULT = 42
    '''))


def test_entry_point_plugin_joins_the_registry(clean_registry, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _write_plugin(tmp_path)
    names()  # plug-ins are looked up once, before the path has the new one
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnknownFault):
        get("test.slow")  # plug-ins already loaded before the path was there: not seen yet
    registry._plugins_loaded = False
    cls = get("test.slow")
    assert cls.__module__ == "myplugin_faults" and cls.__name__ == "SlowFault"
    assert "test.slow" in names()
    # A plug-in fault is a fault like any other: a scenario can name it and set its parameters.
    sc = Scenario.model_validate({"name": "p", "workload": {"ranks": 1, "steps": 3},
                                  "faults": [{"fault": "test.slow", "step": 1, "params": {"delay_s": 0.02}}]})
    fault = sc.faults[0].build()
    assert fault.inject(None) == {"slept_s": 0.02}
    with pytest.raises(ValueError, match="delay_s"):
        Scenario.model_validate({"name": "p", "faults": [{"fault": "test.slow", "step": 1,
                                                           "params": {"delay_s": -1}}]})


def test_entry_point_plugin_shows_in_burnin_list(tmp_path: Path) -> None:
    _write_plugin(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "burnin", "list"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next((ln for ln in out.stdout.splitlines() if "test.slow" in ln), None)
    assert line is not None, out.stdout
    assert "in_rank" in line and "a plug-in fault: sleep a little" in line
    # without the plug-in on the path it is not there
    plain = subprocess.run([sys.executable, "-m", "burnin", "list"], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and "test.slow" not in plain.stdout and "process.kill" in plain.stdout


def test_broken_plugin_is_a_user_error_every_time(clean_registry, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _write_plugin(tmp_path, target="myplugin_missing:Nothing")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._plugins_loaded = False
    for _ in range(2):  # not just the first lookup: later ones must not quietly run without it
        with pytest.raises(UserError, match=r"fault plug-in 'slow' \(myplugin_missing:Nothing\) failed to load"):
            get("process.kill")


def test_plugin_object_that_is_not_a_fault_is_ignored(clean_registry, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _write_plugin(tmp_path, target="myplugin_faults:NOT_A_FAULT")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._plugins_loaded = False
    before = names()
    assert "test.slow" not in before and set(BUILT_IN) <= set(before)


# -- the storage fault on a real checkpoint ---------------------------------------------------------------




def _checkpoints(root: Path, steps: tuple[int, ...] = (5, 10)) -> None:
    from burnin.rank.state import capture_rank_state

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    for step in steps:
        checkpoint.save(root, step, 0, 1, capture_rank_state(step), {"model": model.state_dict()}, keep=5)


def _ctx(root: Path) -> OutOfRankContext:
    return OutOfRankContext(rank=0, step=12, point="between_steps", pid=os.getpid(), run_dir=root.parent, checkpoint_dir=root)


def _corrupt(params: dict) -> Fault:
    return FaultSpec.model_validate({"fault": "storage.checkpoint_corrupt", "step": 12, "params": params}).build()


@pytest.mark.parametrize("params, file, why", [
    ({"mode": "flip"}, "model.pt", r"model\.pt fails its SHA-256 check \(corrupted\)"),
    ({"mode": "flip", "nbytes": 1, "seed": 7, "file": "rank"}, "rank0.pt", r"rank0\.pt .*\(corrupted\)"),
    ({"mode": "truncate"}, "model.pt", r"model\.pt is \d+ bytes, the manifest says \d+ \(truncated\)"),
    ({"mode": "truncate", "keep_fraction": 0.0, "file": "rank"}, "rank0.pt", r"rank0\.pt is 0 bytes.*\(truncated\)"),
])
def test_checkpoint_corrupt_damages_the_newest_checkpoint(gloo, tmp_path: Path, params: dict, file: str,
                                                          why: str) -> None:
    root = tmp_path / "checkpoints"
    _checkpoints(root)
    newest = root / "step_00000010" / file
    size, before = newest.stat().st_size, newest.read_bytes()
    details = _corrupt(params).inject(_ctx(root))
    assert details["checkpoint_step"] == 10 and details["file"] == file and details["mode"] == params["mode"]
    after = newest.read_bytes()
    if params["mode"] == "flip":
        assert len(after) == size
        flipped = [i for i in range(size) if after[i] != before[i]]
        assert flipped == details["offsets"]
        assert len(flipped) == params.get("nbytes", 8)
        assert all(after[i] == before[i] ^ 0xFF for i in flipped)
    else:
        assert len(after) == details["kept"] == int(size * params.get("keep_fraction", 0.5))
        assert after == before[:len(after)]
    [older, damaged] = checkpoint.committed(root)
    with pytest.raises(CheckpointError, match=why):
        checkpoint.verify(damaged, 1)
    rejected: list[str] = []
    assert checkpoint.newest_valid(root, 1, on_reject=lambda c, r: rejected.append(r)) == older
    assert len(rejected) == 1 and ("corrupted" in rejected[0] or "truncated" in rejected[0])


def test_checkpoint_corrupt_with_the_same_seed_flips_the_same_bytes(gloo, tmp_path: Path) -> None:
    offsets = []
    for run in ("a", "b"):
        root = tmp_path / run / "checkpoints"
        _checkpoints(root, (5,))
        offsets.append(_corrupt({"seed": 3}).inject(_ctx(root))["offsets"])
    assert offsets[0] == offsets[1] and len(offsets[0]) == 8


def test_checkpoint_corrupt_without_a_checkpoint_cannot_be_applied(tmp_path: Path) -> None:
    """Nothing to damage is a harness error (validation refuses such a step), never a quiet no-op."""
    from burnin.errors import HarnessError

    root = tmp_path / "checkpoints"
    (root / "step_00000005").mkdir(parents=True)  # incomplete: no manifest
    with pytest.raises(HarnessError, match="no committed checkpoint"):
        _corrupt({"mode": "flip"}).inject(_ctx(root))
    assert list((root / "step_00000005").iterdir()) == []
