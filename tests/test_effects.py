"""Effect classes of silent outcomes against a measured noise band (burnin.reports.effects), on records
shaped as a campaign's `trial_done` and `campaign_reference` write them; bad values of the new fields."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from burnin.errors import ScenarioError, UserError
from burnin.reports.effects import classify_effect, effect_rates, noise_band
from burnin.scenarios import load_scenario

REF = {"losses": [3.0, 2.9, 2.8, 2.7], "eval_loss": 2.75,
       "spread": [{"final_loss": 2.7 * 1.02, "eval_loss": 2.75 * 1.005, "losses": [3.0, 2.9 * 1.03, 2.8, 2.7 * 1.02]},
                  {"final_loss": 2.7 * 0.99, "eval_loss": 2.75, "losses": [3.0, 2.9, 2.8 * 0.98, 2.7 * 0.99]}]}


def _refused(tmp_path: Path, field: str, text: str) -> None:
    """The scenario `text` is refused at load with one line that names `field`."""
    path = tmp_path / f"{field}.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as exc:
        load_scenario(str(path))
    assert field in str(exc.value) and "\n" not in str(exc.value).strip(), str(exc.value)


def _trial(losses: list[float], eval_loss: float, outcome: str = "sdc") -> tuple[dict, dict]:
    return {"trial": 0, "outcome": outcome}, {"losses": losses, "eval_loss": eval_loss}


def test_the_band_is_the_larger_of_the_chaotic_floor_and_the_seed_spread() -> None:
    control = {"losses": [3.0, 2.9, 2.8 + 1e-6, 2.7 + 1e-6], "eval_loss": 2.75 + 1e-6, "control": True}
    band = noise_band([control], REF)
    assert band["measured"] and band["controls"] == 1 and band["spread_windows"] == 2
    assert band["final"] == pytest.approx(0.02) and band["eval"] == pytest.approx(0.005)
    assert band["step"] == pytest.approx(0.03)  # the median window's largest per-step difference (the upper of two)
    assert band["floor"]["final"] == pytest.approx(1e-6 / 2.7)
    none = noise_band([], {"losses": REF["losses"], "eval_loss": 2.75})
    assert not none["measured"] and none["final"] == none["step"] == 0.0 and "not measured" in none["how"]


def test_each_class_from_what_the_trial_did() -> None:
    band = noise_band([], REF)
    cases = {
        "benign": ([3.0, 2.9, 2.8, 2.7 * 1.01], 2.75 * 1.001),           # inside the band everywhere
        "transient": ([3.0, 2.9 * 1.5, 2.8, 2.7 * 1.01], 2.75),          # a spike that came back
        "degraded": ([3.0, 2.9, 2.8, 2.7 * 1.2], 2.75 * 1.1),            # ends outside the band
        "diverged": ([3.0, 2.9, math.nan, math.nan], math.nan),          # NaN
    }
    for want, (losses, ev) in cases.items():
        judged, rec = _trial(losses, ev)
        assert classify_effect(judged, rec, REF, band)["effect"] == want, want
    far = classify_effect(*_trial([3.0, 2.9, 2.8, 2.7 * 1.6], 2.75 * 1.7), REF, band)
    assert far["effect"] == "diverged"  # far above the reference's loss: no longer training
    assert classify_effect({"trial": 1, "outcome": "masked"}, {}, REF, band)["effect"] == "benign"
    assert "effect" not in classify_effect({"trial": 2, "outcome": "recovered"}, {}, REF, band)
    rates = effect_rates([classify_effect(*_trial(l, e), REF, band) for l, e in cases.values()])
    assert rates["silent_trials"] == 4 and rates["harmful"]["count"] == 3
    assert sum(rates[e]["count"] for e in ("benign", "transient", "degraded", "diverged")) == 4


def test_bad_values_of_the_new_fields_are_one_line_errors(tmp_path: Path) -> None:
    from burnin.rank.session import attach

    with pytest.raises(UserError) as exc:
        attach(object(), object(), evaluate=5)
    assert "evaluate" in str(exc.value) and "\n" not in str(exc.value)
    for field, value in (("controls", -1), ("spread_windows", 1000), ("controls", "many")):
        _refused(tmp_path, field, f"name: x\nworkload: {{model: tiny, ranks: 2, steps: 16}}\ncampaign: {{trials: 4, "
                                  f"{field}: {value}}}\nfaults:\n  - {{fault: corruption.bitflip, step: 9, params: "
                                  "{target: param}}\n")
    path = tmp_path / "eval.yaml"
    path.write_text("name: x\nworkload: {model: tiny, ranks: 2, steps: 16, eval_batches: -2}\n")
    with pytest.raises(ScenarioError) as exc:
        load_scenario(str(path))
    assert "eval_batches" in str(exc.value)


# -- faults beyond one bit -------------------------------------------------------------------------

def test_several_bits_in_one_word_and_a_warp_aligned_burst_of_elements() -> None:
    import random

    import torch

    from burnin.scenarios.schema import FaultSpec

    flip = FaultSpec.model_validate({"fault": "corruption.bitflip", "step": 3,
                                     "params": {"bit_class": "mantissa_high", "bits": 3, "burst": 32}}).build()
    t = torch.linspace(0.1, 1.0, 100)
    ref = t.clone()
    d = flip.corrupt(t, 45, random.Random(7))
    assert d["pattern"] == "burst multi-bit" and d["elements"] == [32, 64] and len(set(d["bits"])) == 3
    assert all(12 <= b <= 22 for b in d["bits"])  # float32 mantissa_high
    changed = (t.view(torch.int32) ^ ref.view(torch.int32)).nonzero().flatten().tolist()
    assert changed == list(range(32, 64))  # the 32 elements of the aligned run, nothing else
    xor = int((t.view(torch.int32)[45] ^ ref.view(torch.int32)[45]).item())
    assert sorted(b for b in range(32) if xor >> b & 1) == d["bits"]  # the same 3 bits in each
    one = FaultSpec.model_validate({"fault": "corruption.bitflip", "step": 3, "params": {"bit": 0}}).build()
    assert one.corrupt(torch.ones(4), 2, random.Random(0))["pattern"] == "single"


def test_a_pattern_that_does_not_fit_is_a_one_line_error_at_load(tmp_path: Path) -> None:
    cases = {
        "burst": "{target: param, tensor: blocks.0.ln_1.weight, burst: 4096}",   # 128 elements
        "bits": "{target: param, bit_class: sign, bits: 2}",                    # one sign bit
    }
    cases = {(k, "corruption.bitflip", ""): v for k, v in cases.items()}
    cases.update({
        ("times", "corruption.bitflip", ""): "{target: param, every: 2, times: 3}",  # a flip again undoes it
        ("kernels", "corruption.kernel_tile", ", kernels: torch"): "{seed: 1}",     # no Triton kernel to hit
        ("tensor", "corruption.stuck_bit", ""): "{tensor: blocks.9.ln_1.weight}",   # no such parameter
        ("steps", "corruption.stuck_bit", ""): "{steps: 0}",
    })
    for (field, fault, workload), params in cases.items():
        _refused(tmp_path, field, f"name: x\nworkload: {{model: tiny, ranks: 2, steps: 16{workload}}}\nfaults:\n"
                                  f"  - {{fault: {fault}, step: 9, params: {params}}}\n")
    ok = tmp_path / "vary.yaml"  # both drawable in a campaign
    ok.write_text("name: x\nworkload: {model: tiny, ranks: 2, steps: 16}\ncampaign: {trials: 4, warmup: 4, window: 4}\n"
                  "faults:\n  - {fault: corruption.bitflip, step: 5, params: {target: param, tensor: wte.weight},"
                  " vary: {bits: [1, 2, 3], burst: [1, 32]}}\n"
                  "  - {fault: corruption.bitflip, step: 5, params: {target: grad}, vary: {times: [1, 3], every: [1, 2]}}\n"
                  "  - {fault: corruption.stuck_bit, step: 5, vary: {region: [1, 32], value: [0, 1], steps: [1, 4]}}\n"
                  "  - {fault: corruption.kernel_tile, step: 5, vary: {bit_class: [exponent, mantissa_high]}}\n")
    load_scenario(str(ok))


@pytest.mark.slow
def test_a_stuck_region_a_recurring_flip_and_a_wrong_kernel_tile_in_a_real_run(tmp_path: Path) -> None:
    """A bit stuck at 0 over an aligned region of a parameter, forced after each of its steps' optimizer step;
    a flip of an activation that recurs every 2 steps; one wrong tile of the Triton loss kernel. Each acts as
    it says, in the event log of a real run, and the verdict counts how often each acted."""
    import json

    from conftest import run_cli, run_dir_of

    scenario = tmp_path / "beyond.yaml"
    scenario.write_text(
        "name: beyond-one-bit\nworkload: {model: tiny, ranks: 2, steps: 14, threads: 1}\nfaults:\n"
        "  - {fault: corruption.stuck_bit, rank: 0, step: 3, expect: [sdc, masked], params: {tensor: blocks.0.ln_1.weight,"
        " bit: 24, value: 0, region: 32, steps: 3, seed: 2}}\n"
        "  - {fault: corruption.bitflip, rank: 1, step: 6, expect: [sdc, masked], params: {target: activation,"
        " tensor: blocks.0.mlp.c_fc, bit_class: mantissa_high, every: 2, times: 3, seed: 1}}\n"
        "  - {fault: corruption.kernel_tile, rank: 1, step: 12, expect: [sdc, masked], params: {bit_class: exponent}}\n"
        "expect: {exact: false}\n")
    proc = run_cli("run", str(scenario), "--out", str(tmp_path / "runs"), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = run_dir_of(tmp_path / "runs")
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    acted = {}
    for ev in events:
        if ev["event"] in ("fault_injected", "fault_repeated"):
            acted.setdefault(ev["fault_index"], []).append((ev["step"], ev.get("details") or {}))
    stuck = acted[0]
    assert [s for s, _ in stuck] == [3, 4, 5]
    first = stuck[0][1]
    lo, hi = first["elements"]
    assert lo % 32 == 0 and hi - lo == 32 and lo <= first["index"] < hi and first["pattern"] == "stuck-at"
    assert all(0 <= d["changed"] <= 32 for _, d in stuck)
    assert [s for s, _ in acted[1]] == [6, 8, 10]                                # every 2 steps, 3 times
    assert [s for s, _ in acted[2]] == [12] and acted[2][0][1]["pattern"] == "tile"
    summary = json.loads((run / "summary.json").read_text())
    faults = summary["faults"]
    assert faults[0]["details"]["firings"] == 3 and faults[1]["details"]["firings"] == 3
    assert faults[0]["details"]["changed_total"] == sum(d["changed"] for _, d in stuck)


@pytest.mark.slow
def test_each_effect_class_from_a_deterministic_bundled_campaign(tmp_path: Path) -> None:
    """sdc-effects: one trial per class, each fault expecting its class; then the same trials judged against a
    wrong expectation fail the campaign, naming the trial."""
    import json

    from conftest import run_cli, run_dir_of

    from burnin.harness.campaign import summarize

    history = tmp_path / "history.sqlite"
    proc = run_cli("campaign", "sdc-effects", "--out", str(tmp_path / "runs"), "--history", str(history), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = run_dir_of(tmp_path / "runs")
    s = json.loads((run / "campaign.json").read_text())
    assert s["effect_expectations"] == {"checked": 4, "failed": []}
    assert [s["effects"][e]["count"] for e in ("benign", "transient", "degraded", "diverged")] == [1, 1, 1, 1]
    records = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
    assert [r["template"] for r in records if not r.get("control")] == [0, 1, 2, 3]  # draw: each
    # triage knows the classes: the harmful escapes are failures signed by class and place, the benign one is none
    tri = run_cli("triage", str(run), "--json", timeout=60)
    assert tri.returncode == 0, tri.stderr
    sigs = sorted(g["signature"] for g in json.loads(tri.stdout)["groups"])
    assert sigs == ["silent degraded: corruption.kernel_tile exponent", "silent diverged: corruption.bitflip param exponent",
                    "silent transient: corruption.kernel_tile mantissa_high"], sigs
    # ... from the campaign's directory and from the history alike
    tri = run_cli("triage", "--history", str(history), "--json", timeout=60)
    assert tri.returncode == 0, tri.stderr
    assert sorted(g["signature"] for g in json.loads(tri.stdout)["groups"]) == sigs
    sc = load_scenario("sdc-effects")
    wrong = sc.model_copy(update={"faults": [sc.faults[0], sc.faults[1].model_copy(update={"expect_effect": "benign"}),
                                             *sc.faults[2:]]})
    again = summarize(wrong, records, json.loads((run / "reference.json").read_text()))
    assert again["effect_expectations"]["failed"] == [{"trial": 1, "template": 1, "expected": ["benign"],
                                                       "effect": "transient"}]


def test_an_effect_expectation_outside_a_data_fault_campaign_is_a_one_line_error(tmp_path: Path) -> None:
    _refused(tmp_path, "expect_effect", "name: x\nworkload: {model: tiny, ranks: 2, steps: 16}\nfaults:\n"
             "  - {fault: corruption.bitflip, step: 9, params: {target: param}, expect_effect: benign}\n")
    _refused(tmp_path, "expect_effect", "name: x\nworkload: {model: tiny, ranks: 2, steps: 16}\ncampaign: {trials: 2, "
             "warmup: 4, window: 4}\nfaults:\n  - {fault: corruption.bitflip, step: 5, params: {target: param}, "
             "expect_effect: harmful}\n")
