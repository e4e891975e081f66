"""Scenario loading: bundled scenarios, overrides, one-line errors that point at the line, fuzzing."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from burnin.errors import ScenarioError
from burnin.scenarios import (
    Scenario,
    bundled_names,
    bundled_path,
    load_scenario,
    resolve,
    scenario_json_schema,
)
from burnin.scenarios.loader import COMMAND_LINE, SCHEMA_PATH

BAD = Path(__file__).with_name("bad_scenarios")
BUNDLED = ["corrupt-checkpoint", "corrupt-snapshot", "exception", "hang-rank", "kill-rank", "smoke"]


def _error(source, overrides=None) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        load_scenario(source, overrides)
    text = str(info.value)
    assert len(text.splitlines()) == 1, text
    return info.value


def _write_temp(data: bytes) -> Path:
    # hypothesis runs many examples per test call, so function-scoped tmp_path does not fit
    fd, name = tempfile.mkstemp(suffix=".yaml", prefix="scenario-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(name)


def _load_or_error(data: bytes, overrides=None) -> Scenario | ScenarioError:
    path = _write_temp(data)
    try:
        return load_scenario(path, overrides)
    except ScenarioError as exc:
        text = str(exc)
        assert len(text.splitlines()) == 1, text
        assert text.startswith(str(path)) or text.startswith(COMMAND_LINE), text
        return exc
    finally:
        path.unlink()


# --- bundled scenarios -------------------------------------------------------------------------

def test_bundled_names():
    assert set(BUNDLED) <= set(bundled_names())
    assert bundled_names() == sorted(bundled_names())


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "burnin" / "scenarios" / "bundled").glob("*.yaml")))
def test_every_bundled_scenario_loads_and_says_what_it_shows(name):
    s = load_scenario(name)
    assert s.name == name == bundled_path(name).stem
    assert s.description and (s.faults or (s.burn_in and s.burn_in.faults))
    assert bundled_path(name).read_text().startswith("#"), "each bundled file opens with what it shows"


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_scenario_loads(name):
    s = load_scenario(name)
    assert s.name == name == bundled_path(name).stem
    assert s.description
    assert (s.workload.model, s.workload.ranks, s.workload.threads) == ("tiny", 2, 1)
    assert (s.checkpoint.every, s.checkpoint.keep) == (5, 3)
    assert s.faults and all(f.expected == ["recovered"] for f in s.faults)
    assert bundled_path(name).read_text().startswith("#"), "each bundled file opens with what it shows"


def test_smoke_is_small_and_covers_the_basics():
    s = load_scenario("smoke")
    assert s.workload.steps <= 40 and s.recovery.max_restarts == 4
    assert [(f.fault, f.rank, f.step, f.at) for f in s.faults] == [
        ("process.kill", 1, 8, "between_steps"),
        ("process.exception", 0, 17, "before_forward"),
        ("storage.checkpoint_corrupt", 0, 22, "between_steps"),
        ("storage.snapshot_corrupt", 0, 23, "between_steps"),
        ("process.kill", 0, 23, "between_steps"),
    ]
    assert s.faults[2].params == {"mode": "flip", "file": "model"}
    assert s.faults[3].params == {"slots": "both"}  # both tiers damaged: the fallback reaches the disk
    assert s.checkpoint.memory_every == 1


def test_bundled_specifics():
    assert load_scenario("kill-rank").expect.max_restarts == 1
    assert load_scenario("hang-rank").timeouts.heartbeat_s == 3
    corrupt = load_scenario("corrupt-checkpoint")
    assert [f.fault for f in corrupt.faults] == ["storage.checkpoint_corrupt", "process.kill"]
    assert corrupt.faults[0].params["mode"] == "truncate"
    assert corrupt.checkpoint.memory_every == 0  # the disk tier alone
    snap = load_scenario("corrupt-snapshot")
    assert [(f.fault, f.rank, f.step) for f in snap.faults] == [("storage.snapshot_corrupt", 1, 12),
                                                                ("process.kill", 1, 12)]


def test_json_schema_file_is_current():
    assert json.loads(SCHEMA_PATH.read_text()) == scenario_json_schema(), (
        "scenario.schema.json is stale: python -c 'from burnin.scenarios.loader import "
        "write_json_schema; write_json_schema()'")


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_scenario_matches_json_schema(name):
    jsonschema = pytest.importorskip(
        "jsonschema", reason="the jsonschema package is not installed in this environment")
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(bundled_path(name).read_text()))


# --- where scenarios come from -----------------------------------------------------------------

def test_resolve(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\n")
    assert resolve(f) == f and resolve(str(f)) == f
    assert resolve("smoke") == resolve("smoke.yaml") == bundled_path("smoke")
    assert "did you mean 'smoke'?" in str(_error("smok"))
    assert str(_error(str(tmp_path / "nope.yaml"))) == f"{tmp_path / 'nope.yaml'}: no such file"
    assert "is not a file" in str(_error(tmp_path))


# --- overrides ---------------------------------------------------------------------------------

def test_overrides_apply():
    s = load_scenario("kill-rank", {"workload.ranks": 4, "workload.steps": 20, "faults.0.rank": 3})
    assert (s.workload.ranks, s.workload.steps, s.faults[0].rank) == (4, 20, 3)
    assert load_scenario("smoke", {"recovery.max_restarts": 0}).recovery.max_restarts == 0
    # a section the file leaves out is created
    assert load_scenario("exception", {"expect.max_restarts": 2}).expect.max_restarts == 2


def test_override_error_names_the_command_line():
    assert str(_error("smoke", {"workload.ranks": 0})) == (
        "<command line>: workload.ranks: must be greater than or equal to 1 (got 0)")
    err = _error("smoke", {"workload.rnaks": 3})
    assert (err.file, err.line, err.field) == (COMMAND_LINE, None, "workload.rnaks")
    assert "did you mean 'ranks'?" in err.message
    assert str(_error("smoke", {"name.x": 1})).startswith("<command line>: name.x: cannot set it")
    assert "no item '9'" in str(_error("smoke", {"faults.9.step": 1}))


def test_override_that_breaks_a_rule_in_the_file_says_so():
    err = _error("smoke", {"workload.steps": 10})
    assert err.file == str(bundled_path("smoke")) and err.field == "faults.1.step"
    assert err.message.endswith("workload.steps is set on the command line")


# --- bad scenarios: one line, the file, the line, the field ------------------------------------

# (file, line, field, a fragment of the message), each checked by hand against the file.
BAD_CASES = [
    ("unknown-top-key.yaml", 6, "faultz", "unknown key (did you mean 'faults'?); expected one of: name,"),
    ("unknown-nested-key.yaml", 5, "workload.rnaks", "did you mean 'ranks'?"),
    ("wrong-type.yaml", 5, "workload.steps", "must be a valid integer"),
    ("ranks-zero.yaml", 4, "workload.ranks", "greater than or equal to 1 (got 0)"),
    ("steps-negative.yaml", 5, "workload.steps", "greater than or equal to 1 (got -5)"),
    ("fault-rank-out-of-range.yaml", 11, "faults.1.rank", "rank 2 does not exist"),
    ("fault-step-past-end.yaml", 12, "faults.1.step", "step 20 is past the end of the run"),
    ("unknown-fault.yaml", 6, "faults.0.fault", "did you mean 'process.kill'?"),
    ("bad-param-value.yaml", 8, "faults.0.params.mode", "'flip', 'truncate' or 'delete' (got 'shred')"),
    ("unknown-param.yaml", 8, "faults.0.params.delay", "did you mean 'delay_s'?"),
    ("bad-point.yaml", 7, "faults.0.point", "acts at between_steps (or inside a sharded model's all_gather, reduce_scatter, replica_all_reduce, tp_all_reduce, ft_all_reduce), not at 'after_backward'"),
    ("duplicate-key.yaml", 7, "workload.steps", "duplicate key 'steps' (first at line 5)"),
    ("yaml-syntax.yaml", 6, None, "YAML syntax error"),
    ("tab-indent.yaml", 3, None, "YAML syntax error"),
    ("two-documents.yaml", 3, None, "a single document"),
    ("empty.yaml", None, None, "the file is empty"),
    ("top-level-list.yaml", 2, None, "the top level must be a mapping"),
    ("bad-expect-outcome.yaml", 7, "faults.0.expect", "'sdc', 'failed' or 'degraded' (got 'recoverd')"),
    ("bad-name.yaml", 2, "name", "(got 'my scenario!')"),
    ("missing-step.yaml", 4, "faults.0.step", "required key is missing"),
    ("workload-not-mapping.yaml", 3, "workload", "must be a mapping"),
    ("restarts-wrong-type.yaml", 4, "recovery.max_restarts", "must be a valid integer (got a list)"),
    ("key-not-text.yaml", 4, "debug", "key 'on' is read as a boolean"),
    ("not-utf8.yaml", 3, None, "not UTF-8"),
    ("alias-bomb.yaml", 8, "f", "more than 200000 values"),
]


def test_every_bad_file_is_in_the_table():
    assert sorted(p.name for p in BAD.glob("*.yaml")) == sorted(c[0] for c in BAD_CASES)


@pytest.mark.parametrize("name,line,field,fragment", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_scenario(name, line, field, fragment):
    path = BAD / name
    err = _error(path)
    text = str(err)
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert text.startswith(where), text
    assert (err.file, err.line, err.field) == (str(path), line, field), text
    if field is not None:
        assert text.startswith(f"{where}{field}: "), text
    assert fragment in text, text


# --- finer points ------------------------------------------------------------------------------

def _text_error(text: str, overrides=None) -> ScenarioError:
    result = _load_or_error(text.encode(), overrides)
    assert isinstance(result, ScenarioError), result
    return result


def test_errors_count_the_rest():
    err = _text_error("name: x\nworkload:\n  ranks: 0\n  steps: 0\n  seed: -1\n")
    assert (err.field, err.line, err.more) == ("workload.ranks", 3, 2)
    assert str(err).endswith("(and 2 more errors)")


def test_anchors_and_merge_keys(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("name: m\nworkload: {steps: 20}\nfaults:\n  - &k {fault: process.kill, rank: 1, step: 2}\n"
                 "  - <<: *k\n    step: 4\n  - <<: *k\n    step: 6\n    rank: 0\n")
    s = load_scenario(f)
    assert [(x.rank, x.step) for x in s.faults] == [(1, 2), (1, 4), (0, 6)]
    # a merged value that is wrong is reported where it is written
    f.write_text("name: m\nworkload: {steps: 20}\nfaults:\n  - &k {fault: process.kill, rank: 1, step: 2}\n"
                 "  - <<: *k\n    step: 40\n")
    err = _error(f)
    assert (err.field, err.line) == ("faults.1.step", 6)


def test_duplicate_key_inside_a_fault():
    err = _text_error("name: x\nfaults:\n  - fault: process.kill\n    step: 1\n    step: 2\n")
    assert (err.field, err.line) == ("faults.0.step", 5)


def test_recursive_alias_and_unsafe_tags():
    assert "recursive alias" in str(_text_error("name: x\nworkload: &a {debug: *a}\n"))
    err = _text_error("name: !!python/object:os.system x\n")
    assert (err.field, err.line) == ("name", 1)
    assert "!!set" not in str(_text_error("name: x\nfaults: !!set {a: null}\n"))


def test_strange_characters_stay_on_one_line():
    err = _text_error('name: x\n"a\\nb\\u2028c": 1\n')
    assert err.line == 2 and "\n" not in str(err) and "\\u2028" in err.field
    # a key that looks like pydantic's own location syntax is still the user's key
    err = _text_error("name: x\n'[x]': 1\n")
    assert (err.field, err.line) == ("'[x]'", 2)
    assert "cannot read" in str(_error("x" * 5000 + ".yaml"))


def test_comments_do_not_shift_lines():
    err = _text_error("# one\n\n# three\nname: x\n\nworkload:\n  # seven\n  ranks: -1\n")
    assert (err.field, err.line) == ("workload.ranks", 8)


def test_missing_name_points_at_the_first_key():
    err = _text_error("# comment\nworkload:\n  ranks: 1\n")
    assert (err.field, err.line, err.message) == ("name", 2, "required key is missing")


def test_too_big():
    err = _text_error("name: x\ndescription: " + "a" * (1 << 20) + "\n")
    assert "larger than 1 MiB" in err.message


def test_fault_with_no_params_rejects_params():
    err = _text_error("name: x\nfaults:\n  - fault: process.kill\n    step: 1\n    params: {signal: 9}\n")
    assert (err.field, err.line) == ("faults.0.params.signal", 5)
    assert "takes no params" in err.message


# --- fuzzing -----------------------------------------------------------------------------------

_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_yaml_tokens = st.sampled_from([
    "name", "workload", "faults", "steps", "ranks", "- ", ": ", "\n", "  ", "\t", "&a ", "*a", "<<",
    "!!str ", "!!int ", "!!timestamp ", "!!binary ", "!!set ", "!!python/none ", "{", "}", "[", "]",
    ",", "'", '"', "#", "---", "...", "?", "|", ">", "%YAML 1.1\n", "0x1F", "1e400", "~", "yes",
    "process.kill", "fault", "step", "params", "2001-02-30", "\u2028", "\x85", "9" * 5000,
])


@_FUZZ
@given(st.one_of(st.binary(max_size=400),
                 st.text(max_size=200).map(str.encode),
                 st.lists(_yaml_tokens, max_size=40).map(lambda t: "".join(t).encode())))
def test_fuzz_any_bytes(data):
    _load_or_error(data)


_VALID = yaml.safe_load(bundled_path("smoke").read_text())
# Scenarios with `vary:` and fault params of every kind, for mutations where validation is richest.
_VALID_DOCS = [
    _VALID,
    yaml.safe_load(bundled_path("sdc-campaign").read_text()),
    {"name": "varied", "workload": {"ranks": 3, "steps": 20, "batch_size": 2, "seq_len": 8},
     "checkpoint": {"every": 4},
     "faults": [
         {"fault": "corruption.bitflip", "rank": 1, "step": 5,
          "params": {"target": "param", "tensor": "wte.weight", "index": 5, "bit": 3},
          "vary": {"rank": [0, 2], "index": {"min": 0, "max": 127}, "target": ["param", "grad_reduced"],
                   "tensor": ["wte.weight", "ln_f.bias"], "bit": [0, 31]}},
         {"fault": "corruption.nan", "step": 6, "point": "before_forward",
          "params": {"target": "activation", "tensor": "wpe", "index": 1023}, "vary": {"step": {"min": 3, "max": 19}}},
         {"fault": "network.partition", "rank": 2, "step": 7, "params": {"ranks": [1], "duration_s": 2},
          "vary": {"ranks": [[1], [0, 2]], "duration_s": {"min": 1, "max": 9}}},
         {"fault": "storage.checkpoint_corrupt", "step": 8, "params": {"mode": "truncate", "keep_fraction": 0.25},
          "vary": {"step": [3, 19], "nbytes": {"min": 1, "max": 64}}},
         {"fault": "process.straggler", "step": 9, "params": {"delay_s": 0.1, "steps": 2}, "vary": {"steps": [1, 3]}},
     ]},
    # recovery.mode external (torchft): the system under test's own recovery, its groups and lighthouse
    {"name": "ft", "workload": {"entry": "json:loads", "ranks": 4, "steps": 30, "tolerance": {"window": 5}},
     "recovery": {"mode": "external", "external": {"replica_groups": 2, "max_restarts": 2,
                                                   "lighthouse": {"min_replicas": 1, "join_timeout_ms": 6000}}},
     "faults": [
         {"fault": "process.kill", "rank": 2, "step": 5},
         {"fault": "process.hang", "rank": 1, "step": 9, "point": "ft_all_reduce"},
         {"fault": "network.coordinator_cut", "rank": 3, "step": 12, "params": {"duration_s": 3}},
         {"fault": "corruption.bitflip", "rank": 0, "step": 14, "params": {"target": "allreduce_payload"}},
     ]},
]

_json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


# Values that sit on the edges the checks draw: tensor names, sizes, ranks, booleans, ranges.
_edge_values = st.sampled_from([
    True, False, 0, 1, 2, 3, -1, 127, 128, 1023, 1024, 262143, 262144, 2**31, 2**63, 0.5, 1e400, "nan",
    "wte.weight", "wpe", "ln_f.bias", "lm_head.weight", "blocks.9.ln_1.weight", "batch", "activation",
    "allreduce_payload", "optimizer_state", "grad", "exponent", "after_backward", "between_steps",
    "external", "ft_all_reduce", "network.coordinator_cut", "torchft",
    [], [[]], [0, 1, 2], [True], {"min": 0, "max": 3}, {"min": 3, "max": 0}, {"min": True, "max": 2},
    {"min": 0, "max": 2**40}, {"min": 0}, None,
])


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@_FUZZ
@given(st.data())
def test_fuzz_mutated_scenario(data):
    doc = copy.deepcopy(data.draw(st.sampled_from(_VALID_DOCS)))
    values = st.one_of(_json_like, _edge_values).map(copy.deepcopy)  # never mutate a sampled value
    keys = st.one_of(st.text(max_size=10), st.sampled_from(
        ["rank", "step", "point", "tensor", "index", "bit", "target", "ranks", "seed", "min", "max", "vary"]))
    for _ in range(data.draw(st.integers(1, 4))):
        paths = list(_paths(doc))
        # half the mutations go into `vary:` and `params:`, where one value stands for many faults
        deep = [p for p in paths if "vary" in p or "params" in p]
        path = data.draw(st.sampled_from(deep if deep and data.draw(st.booleans()) else paths))
        if not path:
            continue
        parent = doc
        for seg in path[:-1]:
            parent = parent[seg]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = data.draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(keys)] = data.draw(values)
    overrides = data.draw(st.dictionaries(
        st.sampled_from(["workload.ranks", "workload.steps", "faults.0.rank", "faults.1.params.mode",
                         "timeouts", "name.x", "faults.x", "", "a..b"]), _json_like, max_size=2))
    result = _load_or_error(yaml.safe_dump(doc, allow_unicode=True).encode(), overrides)
    assert isinstance(result, (Scenario, ScenarioError))
