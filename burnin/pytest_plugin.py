"""burnin's pytest plug-in: run a scenario inside a test and fail the test when an expectation fails.

Two ways in:

- the marker ``@pytest.mark.burnin("kill-rank", steps=16)`` runs the scenario for one test (the test
  body, if it wants the result, asks for the ``burnin_result`` fixture);
- the fixture ``burnin_run(scenario, **overrides)`` runs one from inside a test and returns its
  `RunResult`.

A scenario is a bundled name, a file (a relative path is looked up next to the test file first),
YAML text, a dict, or a `Scenario`. A failed expectation fails the test with one message listing
each failed expectation, the run directory and its report; bad input (an unknown scenario, invalid
YAML) fails it with burnin's one-line error. The summary's figures go into the test's JUnit
properties. Loaded through the ``pytest11`` entry point; importing it imports neither torch nor
the harness, which load only when a test runs a scenario.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from burnin.errors import HarnessError, ScenarioError, UserError, oneline, short

__all__ = ["burnin_run", "burnin_result", "failure_message", "junit_properties"]

#: keyword arguments that stand for a workload field, as the CLI's flags do (`--steps 16`)
_SHORTCUTS = ("ranks", "steps", "seed", "threads", "device")

_MARKER = ("burnin(scenario='smoke', *, check=True, steps=None, ranks=None, seed=None, threads=None, "
           "device=None, overrides=None): run a burnin scenario (a bundled name, a file, YAML text, a dict or "
           "a Scenario) for this test; the test fails when one of its expectations does not hold. The result "
           "is the `burnin_result` fixture.")


@dataclass
class _Settings:
    out: Path | None       # None: a directory under pytest's basetemp, made on first use
    history: str | None    # a path, "off", or None for $BURNIN_HISTORY


@dataclass
class _MarkerRun:
    check: bool
    result: Any = None
    error: str | None = None


_SETTINGS = pytest.StashKey[_Settings]()
_MARKED = pytest.StashKey[_MarkerRun]()
_RUNS = pytest.StashKey[int]()


# --- options, ini keys, marker ------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("burnin", "burnin fault-injection runs")
    group.addoption("--burnin-out", metavar="DIR", default=None,
                    help="directory for the run directories of burnin scenarios (default: burnin/ under pytest's "
                         "basetemp; ini: burnin_out)")
    group.addoption("--burnin-history", metavar="PATH", default=None,
                    help="record each run in this SQLite history, or `off` (default: $BURNIN_HISTORY, else off; "
                         "ini: burnin_history)")
    parser.addini("burnin_out", "directory for the run directories of burnin scenarios (relative to the ini file)",
                  default=None)
    parser.addini("burnin_history", "SQLite history burnin runs are recorded in, or `off` (relative to the ini "
                                    "file)", default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER)
    try:
        config.stash[_SETTINGS] = _settings(config)
    except UserError as exc:
        raise pytest.UsageError(str(exc)) from None


def _settings(config: pytest.Config) -> _Settings:
    """--burnin-out and --burnin-history (or their ini keys), checked now: a bad one stops the session
    before any test runs, in one line."""
    here = config.invocation_params.dir
    ini_dir = config.inipath.parent if config.inipath else config.rootpath
    values = {}
    for key in ("out", "history"):
        flag, ini = config.getoption(f"burnin_{key}"), config.getini(f"burnin_{key}")
        if flag is not None:
            values[key] = (flag, f"--burnin-{key}", here)
        elif ini:
            values[key] = (str(ini).strip(), f"burnin_{key} (ini {config.inipath})", ini_dir)
    out = history = None
    if "out" in values:
        from burnin.harness.preflight import check_out_dir

        value, where, base = values["out"]
        out = check_out_dir(base / value if value.strip() else value, where)
    if "history" in values:
        value, where, base = values["history"]
        history = value if value == "off" else _check_history(value, where, base)
    elif not os.environ.get("BURNIN_HISTORY"):
        history = "off"  # a test session records no history unless asked to
    return _Settings(out, history)


def _check_history(value: str, where: str, base: Path) -> str:
    from burnin.harness.preflight import check_out_dir

    try:
        path = base / value
        bad = not value.strip() or "\x00" in value or path.is_dir()
    except (OSError, ValueError):
        bad = True
    if bad:
        raise UserError(f"{where}: {oneline(value)!r} is not a file path; give the path of a SQLite file "
                        "(created if missing), or `off`")
    check_out_dir(path.parent, where)
    return str(path)


# --- the fixtures -------------------------------------------------------------------------------

@pytest.fixture
def burnin_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Run a burnin scenario: ``burnin_run(scenario="smoke", *, check=True, overrides=None, **shortcuts)``.

    `scenario`: a bundled name, a file, YAML text, a dict or a `Scenario`; `steps=`, `ranks=`, `seed=`,
    `threads=`, `device=` and `overrides={"dotted.path": value}` change it. Returns the `RunResult`;
    with `check` (the default) the test fails when an expectation does not hold.
    """
    node = request.node
    base = Path(request.path).parent

    def run(scenario: Any = "smoke", *, check: bool = True, overrides: Mapping[str, Any] | None = None,
            **shortcuts: Any) -> Any:
        try:
            result = _run(node, tmp_path_factory, scenario, _overrides(shortcuts, overrides, check), base)
        except (UserError, HarnessError) as exc:
            raise pytest.fail.Exception(_one_line(exc), pytrace=False) from None
        if check and not _passed(result):
            pytest.fail(failure_message(result), pytrace=False)
        return result

    return run


@pytest.fixture
def burnin_result(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The `RunResult` of the scenario this test's ``@pytest.mark.burnin(...)`` marker names.

    The run happens while the test is set up; its verdict is given when the test is called, so a failed
    expectation or bad input fails the test (not its set-up).
    """
    marker = request.node.get_closest_marker("burnin")
    if marker is None:
        pytest.fail(f"burnin_result: {request.node.name} has no @pytest.mark.burnin(SCENARIO, ...) marker; "
                    "add one, or call the burnin_run fixture", pytrace=False)
    state = _MarkerRun(check=True)
    request.node.stash[_MARKED] = state
    try:
        scenario, check, overrides = _marker_args(marker)
        state.check = check
        state.result = _run(request.node, tmp_path_factory, scenario, overrides, Path(request.path).parent)
    except (UserError, HarnessError) as exc:
        state.error = _one_line(exc)
    return state.result


@pytest.fixture(autouse=True)
def _burnin_marker(request: pytest.FixtureRequest) -> None:
    # A marked test need not ask for burnin_result: the marker alone runs the scenario.
    if request.node.get_closest_marker("burnin") is not None:
        request.getfixturevalue("burnin_result")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    state = item.stash.get(_MARKED, None)
    if state is None:
        return
    if state.error is not None:
        pytest.fail(state.error, pytrace=False)
    if state.check and not _passed(state.result):
        pytest.fail(failure_message(state.result), pytrace=False)


# --- running ------------------------------------------------------------------------------------

def _marker_args(marker: pytest.Mark) -> tuple[Any, bool, dict[str, Any]]:
    kwargs = dict(marker.kwargs)
    if len(marker.args) > 1 or (marker.args and "scenario" in kwargs):
        raise UserError("@pytest.mark.burnin: give one scenario (a bundled name, a file, YAML text, a dict or a "
                        f"Scenario), not {len(marker.args) + ('scenario' in kwargs)}")
    scenario = marker.args[0] if marker.args else kwargs.pop("scenario", "smoke")
    check = kwargs.pop("check", True)
    overrides = kwargs.pop("overrides", None)
    return scenario, check, _overrides(kwargs, overrides, check, "@pytest.mark.burnin")


def _overrides(shortcuts: Mapping[str, Any], overrides: Mapping[str, Any] | None, check: Any,
               where: str = "burnin_run") -> dict[str, Any]:
    """The dotted-path overrides the loader applies, from `steps=16`-style keywords and `overrides=`."""
    if not isinstance(check, bool):
        raise UserError(f"{where}: check={short(check)} is not a bool; give True (fail the test on a failed "
                        "expectation) or False (inspect the result yourself)")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise UserError(f"{where}: overrides={short(overrides)} is not a mapping; give dotted paths and values, "
                        "e.g. overrides={'checkpoint.every': 2}")
    out: dict[str, Any] = {}
    for key, value in shortcuts.items():
        if key in _SHORTCUTS:
            out[f"workload.{key}"] = value
        elif "." in key:
            out[key] = value
        else:
            raise UserError(f"{where}: unknown argument {key}={short(value)}; use {', '.join(_SHORTCUTS)}, check, "
                            "or overrides={'dotted.path': value}")
    out.update(overrides or {})
    return out


def _run(node: pytest.Item, tmp_path_factory: pytest.TempPathFactory, scenario: Any, overrides: dict[str, Any],
         base: Path) -> Any:
    loaded = _load(scenario, overrides, base)
    from burnin.harness.runner import run_scenario

    settings = node.config.stash[_SETTINGS]
    out = settings.out or tmp_path_factory.getbasetemp() / "burnin"
    result = run_scenario(loaded, out, history=settings.history)
    n = node.stash.get(_RUNS, 0) + 1
    node.stash[_RUNS] = n
    node.user_properties.extend(junit_properties(result, "burnin" if n == 1 else f"burnin[{n}]"))
    return result


def _load(scenario: Any, overrides: dict[str, Any], base: Path) -> Any:
    """A validated `Scenario` from whatever the test gave."""
    from burnin.scenarios import Scenario, load_scenario, parse_scenario

    text = file = None
    if isinstance(scenario, Scenario):
        if not overrides:
            return scenario
        text, file = scenario.model_dump_json(), f"<scenario {scenario.name}>"
    elif isinstance(scenario, Mapping):
        text, file = json.dumps(dict(scenario), default=str), "<scenario dict>"
    elif isinstance(scenario, str) and ("\n" in scenario or scenario.lstrip().startswith("{")):
        text, file = scenario, "<scenario text>"
    if text is not None:
        # A scenario written in the test has the test's folder as its own: a loop's `workload.entry:
        # train.py` is found there, as a scenario file's is found beside the file.
        return parse_scenario(text, file=file, overrides=overrides, base=base)
    if isinstance(scenario, (str, os.PathLike)):
        try:
            near = base / scenario
            if not Path(scenario).is_absolute() and near.is_file():
                scenario = near
        except (OSError, ValueError):
            pass  # the loader says what is wrong with the name
        return load_scenario(scenario, overrides=overrides)
    raise UserError(f"scenario: {short(scenario)} is a {type(scenario).__name__}; give a bundled name, a file, "
                    "YAML text, a dict or a Scenario")


def _passed(result: Any) -> bool:
    return result.ok and result.error is None


def _one_line(exc: Exception) -> str:
    # As the CLI prints them: a scenario error reads `file:line: field: message`, which editors can jump to.
    if isinstance(exc, ScenarioError):
        return str(exc)
    kind = "harness error" if isinstance(exc, HarnessError) else "error"
    return f"burnin: {kind}: {exc}"


# --- what a test reports ------------------------------------------------------------------------

def failure_message(result: Any) -> str:
    """Why a run failed, for people: each failed expectation, then where the run and its report are."""
    failed = [e for e in result.expectations if not e.ok]
    lines = [f"burnin: scenario {result.scenario}: {len(failed)} of {len(result.expectations)} expectations failed"]
    lines += [f"  {e.name}: {e.message}" for e in failed]
    if result.error and not any(e.name == "harness" for e in failed):
        lines.append(f"  harness: {result.error}")
    lines.append(f"run dir: {result.run_dir}")
    lines.append(f"report:  {Path(result.run_dir) / 'summary.md'}")
    return "\n".join(lines)


def junit_properties(result: Any, prefix: str = "burnin") -> list[tuple[str, str]]:
    """The summary's figures as (name, value) pairs for a JUnit testcase's <properties>."""
    def flag(b: bool) -> str:
        return "true" if b else "false"

    props = [("scenario", result.scenario), ("run_dir", result.run_dir), ("passed", flag(_passed(result))),
             ("exact", flag(result.exact)), ("restarts", result.restarts), ("rollbacks", result.rollbacks),
             ("expectations_failed", sum(not e.ok for e in result.expectations)),
             ("wall_s", f"{result.wall_s:.3f}")]
    outcomes: dict[str, int] = {}
    for f in result.faults:
        outcomes[f.outcome] = outcomes.get(f.outcome, 0) + 1
    props += [(f"outcome.{k}", v) for k, v in sorted(outcomes.items())]
    times, lost = [], []
    for f in result.faults:
        props.append((f"fault.{f.index}", f"{f.fault}@rank{f.rank}:step{f.step} {f.outcome}"))
        if f.recovery is not None:
            times.append(f.recovery.total_s)
            props.append((f"fault.{f.index}.recovery_s", f"{f.recovery.total_s:.3f}"))
        if f.lost_steps is not None:
            lost.append(f.lost_steps)
            props.append((f"fault.{f.index}.lost_steps", f.lost_steps))
    if times:
        props.append(("recovery_s.max", f"{max(times):.3f}"))
    if lost:
        props.append(("lost_steps.total", sum(lost)))
    return [(f"{prefix}.{name}", str(value)) for name, value in props]
