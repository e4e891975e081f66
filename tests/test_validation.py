"""Validation is complete at load time: what `burnin run` or `burnin campaign` would refuse or crash on,
`load_scenario` refuses first, with one line `file:line: field: message`.

Each kind of bad input has a case below (a small YAML text, the line, the field, a fragment of the
message). The model's tensor names and sizes that the checks use are worked out without torch
(`burnin.core.model_shapes`); they are compared here with the real model of every preset, and the
bounds with real injections into the tiny model. A property test checks that every fault a campaign
can draw from a scenario that loads is one the real model can take.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field

import burnin.faults.registry as registry
from burnin.errors import ScenarioError
from burnin.faults import Fault, register
from burnin.faults.base import COLLECTIVE_POINTS
from burnin.faults.corruption import TARGET_AT, TARGET_POINTS
from burnin.core import model_shapes
from burnin.scenarios import bundled_names, load_scenario
from burnin.scenarios.loader import parse_scenario
from burnin.scenarios.schema import (HEARTBEAT_PERIOD_S, MIN_HEARTBEAT_S, FaultSpec, Scenario,
                                     scenario_json_schema)

FILE = "s.yaml"


def refused(text: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, file=FILE)
    err = info.value
    line = str(err)
    assert len(line.splitlines()) == 1 and len(line) < 1200, line
    return err


def check(text: str, line: int, field: str, fragment: str) -> ScenarioError:
    err = refused(text)
    assert (err.file, err.line, err.field) == (FILE, line, field), str(err)
    assert str(err).startswith(f"{FILE}:{line}: {field}: "), str(err)
    assert fragment in err.message, str(err)
    return err


def fault(body: str, *, head: str = "workload: {steps: 20}\n") -> str:
    """A scenario whose one fault (a YAML mapping, indented by 4) starts on line 4."""
    return f"name: x\n{head}faults:\n" + "  - " + body.strip().replace("\n", "\n    ") + "\n"


# --- 1. vary: every value it can draw is checked ------------------------------------------------

VARY = [
    ("list choice the params refuse",
     fault("fault: corruption.bitflip\nstep: 3\nvary:\n  bit_class: [sign, exponant]"),
     7, "faults.0.vary.bit_class.1", "(got 'exponant')"),
    ("range end the params refuse",
     fault("fault: process.straggler\nstep: 3\nvary:\n  delay_s:\n    min: 1\n    max: 700"),
     9, "faults.0.vary.delay_s.max", "less than or equal to 600 (got 700)"),
    ("range start the params refuse",
     fault("fault: process.straggler\nstep: 3\nvary:\n  steps:\n    min: 0\n    max: 3"),
     8, "faults.0.vary.steps.min", "greater than or equal to 1 (got 0)"),
    ("empty list",
     fault("fault: process.straggler\nstep: 3\nvary:\n  delay_s: []"),
     7, "faults.0.vary.delay_s", "an empty list"),
    ("unknown key",
     fault("fault: process.straggler\nstep: 3\nvary:\n  dealy_s: [1]"),
     7, "faults.0.vary.dealy_s", "unknown key (did you mean 'delay_s'?); vary draws one of: rank, step, delay_s"),
    ("point is not drawn (a campaign would hand it to the params)",
     fault("fault: process.straggler\nstep: 3\nvary:\n  point: [before_forward]"),
     7, "faults.0.vary.point", "unknown key"),
    ("rank past the last",
     fault("fault: process.straggler\nstep: 3\nvary:\n  rank: [0, 1, 2]"),
     7, "faults.0.vary.rank.2", "rank 2 does not exist with workload.ranks=2"),
    ("rank range past the last",
     fault("fault: process.straggler\nstep: 3\nvary:\n  rank: {min: 0, max: 5}"),
     7, "faults.0.vary.rank.max", "rank 5 does not exist"),
    ("step past the end",
     fault("fault: process.straggler\nstep: 3\nvary:\n  step:\n    min: 3\n    max: 20"),
     9, "faults.0.vary.step.max", "step 20 is past the end of the run (workload.steps=20"),
    ("rank that is no number",
     fault("fault: process.straggler\nstep: 3\nvary:\n  rank: [0, one]"),
     7, "faults.0.vary.rank.1", "a rank is a whole number (got 'one')"),
    ("tensor the model lacks",
     fault("fault: corruption.bitflip\nstep: 3\nvary:\n  tensor: [wte.weight, wte.weigth]"),
     7, "faults.0.vary.tensor.1", "no parameter 'wte.weigth'"),
    ("index past a tensor's end",
     fault("fault: corruption.nan\nstep: 3\nparams: {target: grad, tensor: ln_f.bias}\nvary:\n  index: {min: 0, max: 128}"),
     8, "faults.0.vary.index.max", "index 128 is past the end of ln_f.bias (128 elements"),
    ("a drawn tensor too small for the index",
     fault("fault: corruption.nan\nstep: 3\nparams: {target: param, tensor: wte.weight, index: 500}\nvary:\n  tensor: [wte.weight, ln_f.bias]"),
     8, "faults.0.vary.tensor.1", "index 500 is past the end of ln_f.bias"),
    ("a drawn target not at hand at the point",
     fault("fault: corruption.bitflip\nstep: 3\npoint: after_backward\nparams: {target: grad}\n"
           "vary:\n  target: [grad, allreduce_payload, batch]"),
     9, "faults.0.vary.target.2", "target batch is at hand only at before_forward, not at after_backward"),
]


@pytest.mark.parametrize("text,line,field,fragment", [c[1:] for c in VARY], ids=[c[0] for c in VARY])
def test_vary(text, line, field, fragment):
    check(text, line, field, fragment)


def test_vary_that_draws_only_valid_faults_loads():
    sc = parse_scenario(fault(
        "fault: corruption.bitflip\nstep: 3\nparams: {target: grad, index: 100}\n"
        "vary: {rank: [0, 1], step: {min: 3, max: 19}, tensor: [wte.weight, blocks.1.ln_2.bias], "
        "index: {min: 0, max: 127}, bit: [0, 31], seed: {min: 0, max: 9}}"))
    assert set(sc.faults[0].vary) == {"rank", "step", "tensor", "index", "bit", "seed"}


def test_vary_with_too_many_combinations():
    choices = ", ".join(str(i) for i in range(200))
    check(fault(f"fault: corruption.bitflip\nstep: 3\nvary:\n  seed: [{choices}]\n  index: [{choices}]"),
          6, "faults.0.vary", "40000 combinations")


# --- 2. tensors and elements the model does not have ---------------------------------------------

TENSORS = [
    ("no such parameter",
     fault("fault: corruption.bitflip\nstep: 3\nparams:\n  target: param\n  tensor: wte.weigth"),
     8, "faults.0.params.tensor", "the tiny model has no parameter 'wte.weigth' for target param; did you mean 'wte.weight'?"),
    ("tied head weight is listed once, as wte.weight",
     fault("fault: corruption.bitflip\nstep: 3\nparams: {target: optimizer_state, tensor: lm_head.weight}"),
     6, "faults.0.params.tensor", "no parameter 'lm_head.weight'"),
    ("a parameter name where a module is meant",
     fault("fault: corruption.nan\nstep: 3\nparams: {target: activation, tensor: wte.weight}"),
     6, "faults.0.params.tensor", "no leaf module 'wte.weight' for target activation"),
    ("a layer the preset does not have",
     fault("fault: corruption.nan\nstep: 3\nparams: {target: grad_reduced, tensor: blocks.2.ln_1.weight}"),
     6, "faults.0.params.tensor", "no parameter 'blocks.2.ln_1.weight'"),
    ("index past the parameter's end",
     fault("fault: corruption.bitflip\nstep: 3\nparams: {target: param, tensor: blocks.0.ln_1.bias, index: 128}"),
     6, "faults.0.params.index", "index 128 is past the end of blocks.0.ln_1.bias (128 elements; indices 0..127)"),
    ("index past the smallest tensor a drawn one may be",
     fault("fault: corruption.nan\nstep: 3\nparams: {target: grad, index: 200}"),
     6, "faults.0.params.index", "the smallest, blocks.0.ln_1.weight, has 128 elements"),
    ("index past the position embedding's output (no batch dimension)",
     fault("fault: corruption.nan\nstep: 3\nparams: {target: activation, tensor: wpe, index: 1024}",
           head="workload: {steps: 20, batch_size: 2, seq_len: 8}\n"),
     6, "faults.0.params.index", "past the end of wpe (1024 elements"),
    ("index past the batch",
     fault("fault: corruption.bitflip\nstep: 3\nparams: {target: batch, index: 16}",
           head="workload: {steps: 20, batch_size: 2, seq_len: 8}\n"),
     6, "faults.0.params.index", "past the end of the batch (16 elements"),
    ("index past what bucket 0 surely holds",
     fault("fault: corruption.bitflip\nstep: 3\nparams: {target: allreduce_payload, index: 262144}"),
     6, "faults.0.params.index", "may be past the end of gradient bucket 0, which DDP sizes at run time"),
    ("a bigger preset's parameter",
     fault("fault: corruption.bitflip\nstep: 3\nparams: {target: param, tensor: blocks.3.mlp.c_fc.weight}"),
     6, "faults.0.params.tensor", "no parameter"),
    ("the batch at a point where there is none",
     fault("fault: corruption.bitflip\nstep: 3\npoint: after_optimizer_step\nparams: {target: batch}"),
     6, "faults.0.point", "target batch is at hand only at before_forward, not at after_optimizer_step"),
    ("AdamW moments before the first optimizer step",
     fault("fault: corruption.bitflip\nstep: 0\npoint: before_forward\nparams: {target: optimizer_state}"),
     5, "faults.0.step", "exist only after the first optimizer step"),
    ("NaN into integer tokens",
     fault("fault: corruption.nan\nstep: 3\nparams: {target: batch}"),
     6, "faults.0.params.target", "cannot hold nan"),
    ("a bit past a float32",
     fault("fault: corruption.bitflip\nstep: 3\nparams: {bit: 32}"),
     6, "faults.0.params.bit", "bit 32 is outside a float32 element"),
    ("exponent bits of an integer token",
     fault("fault: corruption.bitflip\nstep: 3\nparams: {target: batch, bit_class: exponent}"),
     6, "faults.0.params.bit_class", "no exponent bits"),
]


@pytest.mark.parametrize("text,line,field,fragment", [c[1:] for c in TENSORS], ids=[c[0] for c in TENSORS])
def test_tensor_and_index(text, line, field, fragment):
    check(text, line, field, fragment)


def test_tensors_that_exist_load():
    for params in ("{target: param, tensor: blocks.0.ln_1.bias, index: 127}",
                   "{target: activation, tensor: lm_head, index: 131071}",  # 8 x 64 tokens x 256 logits
                   "{target: allreduce_payload, index: 262143}",
                   "{target: batch, index: 511, bit: 63}",
                   "{target: grad, index: 127}"):
        parse_scenario(fault(f"fault: corruption.bitflip\nstep: 3\nparams: {params}",
                             head="workload: {steps: 20, batch_size: 8, seq_len: 64}\n"))
    parse_scenario(fault("fault: corruption.bitflip\nstep: 3\nparams: {target: param, tensor: blocks.11.mlp.c_fc.weight}",
                         head="workload: {steps: 20, model: gpt2-124m, seq_len: 16}\n"))


# --- 3. partitions ---------------------------------------------------------------------------------

PARTITIONS = [
    ("a rank that does not exist",
     fault("fault: network.partition\nstep: 3\nparams:\n  ranks: [1, 2]"), 7, "faults.0.params.ranks",
     "rank 2 does not exist with workload.ranks=2"),
    ("every rank",
     fault("fault: network.partition\nstep: 3\nparams: {ranks: [1, 0, 1]}"), 6, "faults.0.params.ranks",
     "cutting off ranks [0, 1] leaves no rank on the other side (workload.ranks=2)"),
    ("its own rank, the only one",
     fault("fault: network.partition\nstep: 3", head="workload: {ranks: 1, steps: 20}\n"), 4, "faults.0.fault",
     "cutting off rank 0 leaves no rank"),
    ("the simulated variant too",
     fault("fault: network.partition.simulated\nstep: 3\nparams: {ranks: [3]}"), 6, "faults.0.params.ranks",
     "rank 3 does not exist"),
    ("a drawn side that is every rank",
     fault("fault: network.partition\nstep: 3\nparams: {ranks: [1]}\nvary:\n  ranks: [[0], [0, 1]]"), 8,
     "faults.0.vary.ranks.1", "leaves no rank on the other side"),
]


@pytest.mark.parametrize("text,line,field,fragment", [c[1:] for c in PARTITIONS], ids=[c[0] for c in PARTITIONS])
def test_partition(text, line, field, fragment):
    check(text, line, field, fragment)


def test_partition_of_some_ranks_loads():
    parse_scenario(fault("fault: network.partition\nrank: 2\nstep: 3", head="workload: {ranks: 3, steps: 20}\n"))
    parse_scenario(fault("fault: network.partition\nstep: 3\nparams: {ranks: [0, 2]}", head="workload: {ranks: 3, steps: 20}\n"))
    assert load_scenario("partition").faults[0].params["ranks"] == [1]


# --- 4. heartbeat ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0.5", "0.99", "0", "-1"])
def test_heartbeat_shorter_than_four_beats(value):
    err = check(f"name: x\ntimeouts:\n  heartbeat_s: {value}\n", 3, "timeouts.heartbeat_s",
                f"must be at least {MIN_HEARTBEAT_S:g} s")
    assert f"every {HEARTBEAT_PERIOD_S:g} s" in err.message


def test_heartbeat_of_four_beats_loads_and_the_schema_says_so():
    assert MIN_HEARTBEAT_S == 4 * HEARTBEAT_PERIOD_S == 1.0
    assert parse_scenario("name: x\ntimeouts: {heartbeat_s: 1}\n").timeouts.heartbeat_s == 1.0
    prop = scenario_json_schema()["$defs"]["Timeouts"]["properties"]["heartbeat_s"]
    assert prop["minimum"] == MIN_HEARTBEAT_S


# --- 5. a checkpoint to corrupt -------------------------------------------------------------------

def test_checkpoint_corrupt_before_the_first_commit():
    check(fault("fault: storage.checkpoint_corrupt\nstep: 3", head="workload: {steps: 20}\ncheckpoint: {every: 5}\n"),
          6, "faults.0.step", "no checkpoint is committed by step 3: the first is saved after step 4 (checkpoint.every=5)")
    check(fault("fault: storage.checkpoint_corrupt\nstep: 6\nvary: {step: [6, 2]}",
                head="workload: {steps: 20}\ncheckpoint: {every: 5}\n"),
          7, "faults.0.vary.step.1", "no checkpoint is committed by step 2")


def test_checkpoint_corrupt_after_a_commit_loads():
    parse_scenario(fault("fault: storage.checkpoint_corrupt\nstep: 4", head="workload: {steps: 20}\ncheckpoint: {every: 5}\n"))
    # the last step always saves one
    parse_scenario(fault("fault: storage.checkpoint_corrupt\nstep: 9", head="workload: {steps: 10}\ncheckpoint: {every: 50}\n"))


def test_snapshot_corrupt_needs_a_snapshot():
    check(fault("fault: storage.snapshot_corrupt\nstep: 5", head="workload: {steps: 20}\ncheckpoint: {memory_every: 0}\n"),
          6, "faults.0.step", "there is no memory snapshot to damage (checkpoint.memory_every=0")
    check(fault("fault: storage.snapshot_corrupt\nstep: 1", head="workload: {steps: 20}\ncheckpoint: {memory_every: 3}\n"),
          6, "faults.0.step", "no memory snapshot is taken by step 1: the first is taken after step 2")
    check(fault("fault: storage.snapshot_corrupt\nstep: 6\nvary: {step: [6, 0]}",
                head="workload: {steps: 20}\ncheckpoint: {memory_every: 2}\n"),
          7, "faults.0.vary.step.1", "no memory snapshot is taken by step 0")


def test_snapshot_corrupt_after_a_snapshot_loads():
    parse_scenario(fault("fault: storage.snapshot_corrupt\nstep: 0", head="workload: {steps: 20}\n"))
    parse_scenario(fault("fault: storage.snapshot_corrupt\nstep: 2", head="workload: {steps: 20}\ncheckpoint: {memory_every: 3}\n"))
    with pytest.raises(ScenarioError) as info:
        parse_scenario(fault("fault: storage.snapshot_corrupt\nstep: 4", head="workload: {steps: 20}\n"),
                       file=FILE, overrides={"checkpoint.memory_every": 0})
    assert info.value.message.endswith("checkpoint.memory_every is set on the command line"), str(info.value)


def test_checkpoint_rule_names_an_override():
    with pytest.raises(ScenarioError) as info:
        parse_scenario(fault("fault: storage.checkpoint_corrupt\nstep: 4", head="workload: {steps: 20}\n"),
                       file=FILE, overrides={"checkpoint.every": 10})
    assert info.value.message.endswith("checkpoint.every is set on the command line"), str(info.value)


# --- 6. a boolean is no number ---------------------------------------------------------------------

BOOLEANS = [
    ("int field", "name: x\ncheckpoint:\n  every: 5\n  keep: true\n", 4, "checkpoint.keep"),
    ("workload", "name: x\nworkload: {ranks: true}\n", 2, "workload.ranks"),
    ("float field", "name: x\ntimeouts:\n  step_s: false\n", 3, "timeouts.step_s"),
    ("optional model", "name: x\ndetectors:\n  loss_spike: {z: true}\n", 3, "detectors.loss_spike.z"),
    ("campaign", "name: x\ncampaign:\n  trials: yes\n", 3, "campaign.trials"),
    ("optional int", "name: x\nexpect:\n  max_restarts: true\n", 3, "expect.max_restarts"),
    ("fault step", fault("fault: process.kill\nstep: true"), 5, "faults.0.step"),
    ("fault param", fault("fault: process.straggler\nstep: 3\nparams:\n  delay_s: true"), 7, "faults.0.params.delay_s"),
    ("int param", fault("fault: corruption.bitflip\nstep: 3\nparams: {index: false}"), 6, "faults.0.params.index"),
    ("list of ints", fault("fault: network.partition\nstep: 3\nparams:\n  ranks: [true]"), 7, "faults.0.params.ranks.0"),
    ("vary choice", fault("fault: process.straggler\nstep: 3\nvary:\n  steps: [1, true]"), 7, "faults.0.vary.steps.1"),
    ("vary range", fault("fault: process.straggler\nstep: 3\nvary:\n  steps: {min: false, max: 3}"), 7,
     "faults.0.vary.steps.min"),
    ("vary rank", fault("fault: process.straggler\nstep: 3\nvary:\n  rank: [true]"), 7, "faults.0.vary.rank.0"),
]


@pytest.mark.parametrize("text,line,field", [c[1:] for c in BOOLEANS], ids=[c[0] for c in BOOLEANS])
def test_boolean_for_a_number(text, line, field):
    check(text, line, field, "must be a number, not a boolean")


@pytest.mark.parametrize("text,line,field", [
    ("name: x\ndetectors:\n  loss_spike: {z: .inf}\n", 3, "detectors.loss_spike.z"),
    ("name: x\nworkload:\n  lr: .nan\n", 3, "workload.lr"),
    ("name: x\ntimeouts: {heartbeat_s: .nan}\n", 2, "timeouts.heartbeat_s"),
])
def test_numbers_are_finite(text, line, field):
    # scenario.json is strict JSON: an infinity would come back from it as null
    check(text, line, field, "must be a finite number")


def test_booleans_stay_booleans():
    sc = parse_scenario("name: x\nexpect: {exact: false, finish: true}\nnetwork: {isolate: false}\n")
    assert (sc.expect.exact, sc.network.isolate) == (False, False)


class _NestedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = 0


class _PluginParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(1, ge=0)
    ratio: float | None = None
    pair: tuple[int, float] = (0, 0.0)
    table: dict[str, int] = Field(default_factory=dict)
    nested: _NestedParams = Field(default_factory=_NestedParams)
    flag: bool = False
    either: int | bool = 0


@pytest.fixture
def plugin():
    """A third-party fault with numbers in every kind of place; unregistered afterwards."""
    before = dict(registry._REGISTRY)
    cls = register(type("PluginFault", (Fault,), {"name": "test.numbers", "summary": "s", "where": "in_rank",
                                                   "Params": _PluginParams, "inject": lambda self, ctx: {}}))
    yield cls
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


@pytest.mark.parametrize("params,field", [
    ("{count: true}", "count"), ("{ratio: true}", "ratio"), ("{pair: [1, true]}", "pair.1"),
    ("{table: {a: 1, b: false}}", "table.b"), ("{nested: {limit: true}}", "nested.limit"),
])
def test_boolean_in_a_plugin_params(plugin, params, field):
    check(fault(f"fault: test.numbers\nstep: 3\nparams: {params}"), 6, f"faults.0.params.{field}",
          "must be a number, not a boolean")


def test_plugin_params_that_take_booleans(plugin):
    sc = parse_scenario(fault("fault: test.numbers\nstep: 3\nparams: {flag: true, either: true, count: 2}"))
    assert sc.faults[0].build().params.either is True


# --- 7. values are cut, never echoed whole -----------------------------------------------------------

def test_unknown_fault_of_a_megabyte_is_cut():
    err = check(fault("fault: " + "a" * 1_000_000 + "\nstep: 3"), 4, "faults.0.fault", "unknown fault 'aaaa")
    assert len(str(err)) < 300


@pytest.mark.parametrize("text,field", [
    (fault("fault: process.exception\nstep: 3\npoint: '" + "p" * 100_000 + "'"), "faults.0.point"),
    (fault("fault: network.throttle\nstep: 3\nparams: {rate: '" + "9" * 100_000 + "'}"), "faults.0.params.rate"),
    (fault("fault: corruption.bitflip\nstep: 3\nparams: {tensor: '" + "t" * 100_000 + "'}"), "faults.0.params.tensor"),
    ("name: x\n? " + "k" * 100_000 + "\n: 1\n", "k" * 57 + "..."),
    (fault("fault: process.straggler\nstep: 3\nvary:\n  ? " + "v" * 100_000 + "\n  : [1]"), "faults.0.vary." + "v" * 57 + "..."),
    ("name: x\nworkload: {steps: " + "9" * 4000 + "}\n", "workload.steps"),
])
def test_long_values_are_cut(text, field):
    err = refused(text)
    assert err.field == field and len(str(err)) < 400, str(err)[:400]


def test_unknown_fault_in_the_registry_is_cut():
    with pytest.raises(registry.UnknownFault) as info:
        registry.get("process." + "x" * 10_000)
    assert len(str(info.value)) < 200


# --- campaigns: what draw_trials would refuse -------------------------------------------------------

CAMPAIGN = "workload: {steps: 20}\ncampaign: {warmup: 2, window: 5}\n"

CAMPAIGNS = [
    ("data and process faults in one", fault("fault: corruption.bitflip\nstep: 3", head=CAMPAIGN)
     + "  - {fault: process.kill, step: 3}\n", 5, "faults.0.fault", "not both"),
    ("an out-of-rank data fault", fault("fault: network.link_down\nstep: 3", head=CAMPAIGN), 5, "faults.0.fault",
     "a data-fault campaign runs in-rank faults only"),
    ("a fault that takes no seed", fault("fault: process.straggler\nstep: 3", head=CAMPAIGN), 5, "faults.0.fault",
     "takes none; a campaign can draw corruption.bitflip, corruption.kernel_tile, corruption.nan, corruption.stuck_bit"),
    ("a step outside the window", fault("fault: corruption.bitflip\nstep: 9", head=CAMPAIGN), 6, "faults.0.step",
     "step 9 is outside the campaign window 2..6"),
    ("a drawn step outside the window", fault("fault: corruption.bitflip\nstep: 3\nvary: {step: [3, 9]}", head=CAMPAIGN),
     7, "faults.0.vary.step.1", "step 9 is outside the campaign window 2..6"),
    ("no faults", "name: x\n" + CAMPAIGN, 3, "campaign", "a campaign needs at least one fault"),
]


@pytest.mark.parametrize("text,line,field,fragment", [c[1:] for c in CAMPAIGNS], ids=[c[0] for c in CAMPAIGNS])
def test_campaign(text, line, field, fragment):
    check(text, line, field, fragment)


def test_fixed_step_outside_the_window_is_fine_when_vary_draws_it():
    parse_scenario(fault("fault: corruption.bitflip\nstep: 0\nvary: {step: {min: 2, max: 6}}", head=CAMPAIGN))


# --- every bundled scenario, and no torch -----------------------------------------------------------

@pytest.mark.parametrize("name", bundled_names())
def test_bundled_scenarios_validate(name):
    assert load_scenario(name).name == name


def test_validation_imports_no_torch():
    code = ("import sys\nfrom burnin.scenarios import load_scenario, bundled_names\n"
            "from burnin.core import model_shapes\n"
            "for n in bundled_names(): load_scenario(n)\n"
            "model_shapes.layout('gpt2-124m', 8, 1024)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- the shapes known without torch are the real model's ---------------------------------------------

def _real(preset: str, batch_size: int, seq_len: int):
    """(parameter shapes, leaf module output sizes) of the real model, built on torch's meta device."""
    torch = pytest.importorskip("torch")
    from burnin.rank.workload import GPT, gpt_config

    with torch.device("meta"):
        model = GPT(gpt_config(preset, seq_len, 0.1, "torch"))
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    leaves = {n: m for n, m in model.named_modules() if n and not list(m.children())}
    outs: dict[str, int] = {}
    for n, m in leaves.items():
        m.register_forward_hook(lambda mod, args, out, n=n: outs.__setitem__(n, out.numel()))
    idx = torch.zeros((batch_size, seq_len), dtype=torch.long, device="meta")
    model(idx, idx)
    return params, list(leaves), outs


@pytest.mark.parametrize("preset", sorted(model_shapes.PRESETS))
def test_shapes_match_the_real_model(preset):
    from burnin.rank.workload import PRESETS

    assert model_shapes.PRESETS == PRESETS
    for batch_size, seq_len in ((3, 17), (1, 2)):
        params, leaves, outs = _real(preset, batch_size, seq_len)
        shapes = model_shapes.parameter_shapes(preset, seq_len)
        assert list(params.items()) == list(shapes.items())
        acts = model_shapes.activation_numels(preset, batch_size, seq_len)
        assert list(acts) == leaves and acts == outs
        lay = model_shapes.layout(preset, batch_size, seq_len)
        assert lay.batch_tokens == batch_size * seq_len
        assert lay.grad_elements == sum(model_shapes.layout(preset, 1, seq_len).params.values())


def test_ddp_first_bucket_constant_is_torchs():
    dist = pytest.importorskip("torch.distributed")
    assert model_shapes.DDP_FIRST_BUCKET_BYTES == dist._DEFAULT_FIRST_BUCKET_BYTES


# --- the bounds checked at load time are those of real injections --------------------------------------

B, T = 2, 8


def _inject_in_real_steps(target: str, tensor: str | None, index: int, steps: int = 2) -> list[dict]:
    """Train the tiny model `steps` steps under DDP (one gloo rank), as the worker does, and flip bit 0 of
    `index` in `target` at its point in every step; returns what each injection reported."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from burnin.faults.corruption import Bitflip, BitflipParams
    from burnin.rank.injector import RankContext
    from burnin.rank.workload import GPT, gpt_config, make_optimizer

    torch.manual_seed(0)
    model = GPT(gpt_config("tiny", T, 0.0, "torch"))
    optimizer = make_optimizer(model, 1e-3, 0.1)
    ddp = DDP(model)
    point = TARGET_POINTS[target]
    done: list[dict] = []
    state = {"step": 0}

    def fire(at: str, **tensors) -> None:
        if at != point:
            return
        fault = Bitflip(BitflipParams(target=target, tensor=tensor, index=index, bit=0))
        out = fault.inject(RankContext(0, 1, state["step"], at, model=model, optimizer=optimizer, tensors=tensors))
        if out.get("not_here"):
            return
        done.append(out)  # an activation's record is filled in by this step's forward

    def hook(_, bucket):
        fire("after_backward", bucket=bucket)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, hook)
    for step in range(steps):
        state["step"] = step
        x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(step))
        fire("before_forward", batch=x)
        _, loss = ddp(x, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        fire("after_allreduce")
        optimizer.step()
        fire("after_optimizer_step")
    return done


@pytest.mark.parametrize("target,tensor", [
    ("param", "blocks.1.ln_2.bias"), ("optimizer_state", "wpe.weight"), ("grad", "blocks.0.attn.c_attn.bias"),
    ("grad_reduced", "ln_f.weight"), ("activation", "wpe"), ("activation", "lm_head"), ("batch", None),
    ("allreduce_payload", None),
])
def test_last_element_allowed_is_there_and_the_next_is_refused(gloo, target, tensor):
    lay = model_shapes.layout("tiny", B, T)
    limit = {"batch": lay.batch_tokens, "allreduce_payload": lay.first_bucket_elements,
             "activation": lay.activations.get(tensor)}.get(target) or lay.params[tensor]
    head = f"workload: {{steps: 20, batch_size: {B}, seq_len: {T}}}\n"
    extra = f", tensor: {tensor}" if tensor else ""
    parse_scenario(fault(f"fault: corruption.bitflip\nstep: 3\nparams: {{target: {target}{extra}, index: {limit - 1}}}",
                         head=head))
    check(fault(f"fault: corruption.bitflip\nstep: 3\nparams: {{target: {target}{extra}, index: {limit}}}", head=head),
          6, "faults.0.params.index", f"index {limit} ")
    # the real run: the last element allowed exists in every step (step 0 and the rebuilt buckets after)
    reports = _inject_in_real_steps(target, tensor, limit - 1)
    assert len(reports) == 2 and all(r["index"] == limit - 1 for r in reports), reports


def test_allreduce_bucket_zero_holds_at_least_the_bound(gloo):
    """DDP's bucket 0 in real steps (before and after it rebuilds its buckets) holds at least
    `first_bucket_elements`, for a model with fewer gradients than that bound and one with more."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from burnin.rank.workload import GPT, gpt_config

    for preset in ("tiny", "small"):
        torch.manual_seed(0)
        ddp = DDP(GPT(gpt_config(preset, T, 0.0, "torch")))
        sizes: list[int] = []

        def hook(_, bucket):
            if bucket.index() == 0:
                sizes.append(bucket.buffer().numel())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, hook)
        for _ in range(3):
            x = torch.randint(0, 256, (B, T))
            ddp(x, x)[1].backward()
        lay = model_shapes.layout(preset, B, T)
        assert len(sizes) == 3 and min(sizes) >= lay.first_bucket_elements, (preset, sizes)
        assert sizes[0] == lay.grad_elements  # the first step: one bucket, every gradient


# --- validate refuses what the campaign would refuse ---------------------------------------------------

_GOOD = {
    "rank": [0, 1],
    "step": [2, 5, 9],
    "target": ["param", "optimizer_state", "grad", "allreduce_payload", "grad_reduced", "activation", "batch"],
    "tensor": ["wte.weight", "wpe.weight", "blocks.0.ln_1.bias", "ln_f.weight", "wte", "wpe", "lm_head",
               "blocks.1.mlp.c_fc", None],
    "index": [0, 5, 15, 127, None],
    "bit": [0, 31, None],
    "bit_class": ["sign", "exponent", "mantissa_low", "any"],
    "state": ["exp_avg", "exp_avg_sq"],
    "seed": [0, 7, 2**31],
    "value": ["nan", "inf", "-inf"],
}
_BAD = {
    "rank": [2, -1, True], "step": [1, 10, 13, True],
    # (the targets inside a sharded model's collectives: this workload is DDP, which has none)
    "target": ["weights", "all_gather_output", "reduce_scatter_input", "replica_all_reduce_output"],
    "tensor": ["nope", "lm_head.weight", "blocks.0", "root"],
    "index": [16, 128, 1023, 1024, 262143, 262144, 10**6, -1, True], "bit": [32, 63, 64, True],
    "bit_class": ["bogus"], "state": ["x"], "seed": [-1, True], "value": ["zero"], "point": ["before_forward"],
    "bogus": [1],
}
_INT_KEYS = ("rank", "step", "index", "bit", "seed")


def _value(key: str) -> st.SearchStrategy:
    """Mostly values that are fine on their own, now and then one that is not."""
    good, bad = _GOOD.get(key), _BAD.get(key)
    return st.integers(0, 11).flatmap(lambda i: st.sampled_from(bad if (i == 11 or not good) and bad else good))


@st.composite
def _campaign_doc(draw: st.DrawFn) -> dict:
    name = draw(st.sampled_from(["corruption.bitflip", "corruption.nan"]))
    own = ["target", "tensor", "index", "state"] + (["bit", "bit_class"] if name == "corruption.bitflip" else ["value"])
    params = {k: draw(_value(k)) for k in draw(st.sets(st.sampled_from(own), max_size=4))}
    vary = {}
    keys = st.integers(0, 11).flatmap(lambda i: st.sampled_from(sorted(_BAD) if i == 11 else own + ["rank", "step", "seed"]))
    for key in draw(st.sets(keys, max_size=4)):
        if key in _INT_KEYS and draw(st.booleans()):
            ends = [draw(_value(key)) for _ in range(2)]
            if any(v is None for v in ends):
                continue
            vary[key] = {"min": min(ends), "max": max(ends)}
        else:
            vary[key] = draw(st.lists(_value(key), min_size=draw(st.sampled_from([1, 1, 1, 0])), max_size=3))
    spec = {"fault": name, "rank": draw(st.sampled_from([0, 1])), "step": draw(st.sampled_from([2, 5, 9, 1])),
            "params": params, "vary": vary}
    point = draw(st.sampled_from([None, None, "before_forward", "after_backward", "after_allreduce",
                                  "after_optimizer_step", "all_gather", "reduce_scatter"]))
    if point:
        spec["point"] = point
    return {"name": "fuzz", "workload": {"ranks": 2, "steps": 12, "batch_size": B, "seq_len": T},
            "campaign": {"trials": 20, "warmup": 2, "window": 8}, "faults": [spec]}


_REAL: dict = {}


def _real_tiny() -> dict:
    if not _REAL:
        params, _, outs = _real("tiny", B, T)
        sizes = {n: math.prod(s) for n, s in params.items()}
        _REAL.update(params=sizes, activations=outs, batch=B * T,
                     payload=min(sum(sizes.values()), (1 << 20) // 4))
    return _REAL


def _runs_in_a_real_rank(fault_name: str, spec: dict, p) -> bool:
    """Whether this drawn fault would be applied in a rank of the tiny model, judged from the real
    model (not from model_shapes): the target is at hand, the tensor exists, the element is there."""
    real = _real_tiny()
    point = spec.get("point") or TARGET_POINTS[p.target]
    if point in COLLECTIVE_POINTS:  # a DDP workload has no all-gather or reduce-scatter to act in
        return False
    if p.target in TARGET_AT and point not in TARGET_AT[p.target]:
        return False
    if p.target == "optimizer_state" and point != "after_optimizer_step" and spec["step"] == 0:
        return False
    if p.target == "batch":
        sizes = {"batch": real["batch"]}
        if fault_name == "corruption.nan" or (p.bit is None and p.bit_class == "exponent"):
            return False
    else:
        sizes = real["activations"] if p.target == "activation" else real["params"]
        if p.tensor is not None:
            if p.tensor not in sizes:
                return False
            sizes = {p.tensor: sizes[p.tensor]}
        if fault_name == "corruption.bitflip" and p.bit is not None and p.bit >= 32:
            return False
    if p.index is None:
        return True
    limit = real["payload"] if p.target == "allreduce_payload" else min(sizes.values())
    return p.index < limit


def _drawable(spec: dict) -> list[dict]:
    """Every fault `vary` can draw: each combination of its choices and range ends."""
    keys = sorted(spec["vary"])
    choices = [v if isinstance(v, list) else [v["min"], v["max"]] for v in (spec["vary"][k] for k in keys)]
    out = []
    for combo in itertools.product(*choices):
        s = {**spec, "params": dict(spec["params"]), "vary": {}}
        for k, v in zip(keys, combo):
            if k in ("rank", "step"):
                s[k] = v
            else:
                s["params"][k] = v
        out.append(s)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_campaign_doc(), seed=st.integers(0, 2**16))
def test_what_validate_accepts_every_campaign_trial_can_run(doc, seed):
    from burnin.scenarios.campaign import draw_trials

    try:
        sc = parse_scenario(yaml.safe_dump(doc), file=FILE)
    except ScenarioError as exc:
        event(f"refused: {exc.message[:40]}")
        return
    event("accepted")
    spec = json.loads(sc.faults[0].model_dump_json())
    cls = registry.get(spec["fault"])
    # every combination of drawable values, with the campaign's own seed at both ends
    for drawn in _drawable(spec):
        for s in (0, 2**31 - 1):
            if "seed" not in spec["vary"]:
                drawn["params"]["seed"] = s
            assert type(drawn["rank"]) is int and 0 <= drawn["rank"] < 2, drawn
            assert type(drawn["step"]) is int and 2 <= drawn["step"] < 10, drawn
            assert not any(type(v) is bool for v in drawn["params"].values()), drawn
            FaultSpec.model_validate(drawn)
            assert _runs_in_a_real_rank(spec["fault"], drawn, cls.Params.model_validate(drawn["params"])), drawn
    # and the campaign's own draw takes it
    for trial in draw_trials(sc, 20, seed):
        (drawn,) = trial["faults"]
        assert _runs_in_a_real_rank(drawn["fault"], drawn, cls.Params.model_validate(drawn["params"])), drawn


def test_a_drawn_scenario_round_trips_through_json():
    sc = load_scenario("sdc-campaign")
    again = Scenario.model_validate(json.loads(sc.model_dump_json()))
    assert again == sc
