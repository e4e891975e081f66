"""Campaigns: many trials of drawn faults, outcome rates with confidence intervals, a detector scorecard.

Each trial picks one of the scenario's faults and draws its varying parameters (`vary:`) from a
per-trial seed, so the same seed gives the same trials and the same summary. The trials run in one
group of rank processes (see `campaign_worker`); a trial that crashes a rank is recorded as
detected by the crash, and the group restarts and goes on with the next trial. Every finished
trial is appended to `trials.jsonl` at once, so an interrupted campaign resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from burnin.core.events import read_events
from burnin.core.files import atomic_write
from burnin.errors import UserError, oneline as _show
from burnin.harness import recovery_campaign
from burnin.harness.preflight import check_device, check_out_dir
from burnin.harness.runner import make_run_dir, new_run_id
from burnin.harness.supervisor import Supervisor
from burnin.reports import history as hist
from burnin.reports.html import write_campaign_report
from burnin.reports.metrics import Metrics
from burnin.reports.effects import EFFECTS, HARMFUL, classify_effect, detector_harm, effect_rates, noise_band
from burnin.reports.trials import CAMPAIGN_SCHEMA_VERSION, judge_trial, outcome_rates, wilson
from burnin.reports.writers import write_html_safely
from burnin.scenarios.campaign import draw_controls, draw_trials, is_recovery_campaign
from burnin.scenarios.schema import Scenario

__all__ = ["run_campaign", "summarize"]

def summarize(scenario: Scenario, trials: list[dict[str, Any]], reference: dict[str, Any] | None) -> dict[str, Any]:
    """Outcome rates with Wilson intervals, the effect classes of the silent outcomes against the noise band
    the control trials measured, and the detector scorecard. Deterministic for a seed."""
    controls = [t for t in trials if t.get("control")]
    trials = [t for t in trials if not t.get("control")]
    band = noise_band(controls, reference)
    judged = sorted((classify_effect(judge_trial(t), t, reference, band) for t in trials), key=lambda t: t["trial"])
    n = len(judged)
    outcomes = outcome_rates([t["outcome"] for t in judged])
    detectors = sorted({d for t in judged for d in t["detectors"]} |
                       {name for name, v in scenario.detectors.model_dump().items() if v is not None})
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for t in judged:
        groups[(t["target"] or "?", t["bit_class"] or "?", t.get("pattern") or "single")].append(t)
    scorecard = []
    for (target, bit_class, pattern), ts in sorted(groups.items()):
        row: dict[str, Any] = {"target": target, "bit_class": bit_class, "pattern": pattern, "trials": len(ts),
                               "detectors": {}}
        for d in detectors:
            hits = [t["latency_steps"][d] for t in ts if d in t["latency_steps"]]
            lo, hi = wilson(len(hits), len(ts))
            row["detectors"][d] = {"detected": len(hits), "rate": len(hits) / len(ts), "ci95": [lo, hi],
                                   "median_latency_steps": sorted(hits)[len(hits) // 2] if hits else None}
        sdc = sum(t["outcome"] == "sdc" for t in ts)
        row["sdc"] = {"count": sdc, "rate": sdc / len(ts), "ci95": list(wilson(sdc, len(ts)))}
        row["masked"] = sum(t["outcome"] == "masked" for t in ts)
        row["effects"] = {e: {"count": k, "rate": k / len(ts), "ci95": list(wilson(k, len(ts)))}
                          for e in EFFECTS for k in [sum(t.get("effect") == e for t in ts)]}
        # what the row's faults do when nothing acts on them (every trial whose unchecked run is known)
        known = [t["unchecked"]["effect"] for t in ts if t.get("unchecked") and t["unchecked"]["effect"]]
        row["unchecked"] = {"trials": len(known), **{e: known.count(e) for e in EFFECTS},
                            "harmful": {"count": (h := sum(e in HARMFUL for e in known)),
                                        "rate": h / len(known) if known else None,
                                        "ci95": list(wilson(h, len(known))) if known else [0.0, 1.0]}}
        scorecard.append(row)
    # Templates that say which effect their trials must have (deterministic demonstrations of each class).
    wrong = []
    checked = 0
    for t in judged:
        spec = scenario.faults[t["template"]] if t.get("template") is not None and t["template"] < len(scenario.faults) \
            else None
        if spec is None or spec.expect_effect is None:
            continue
        want = [spec.expect_effect] if isinstance(spec.expect_effect, str) else list(spec.expect_effect)
        got = (t.get("unchecked") or {}).get("effect")
        checked += 1
        if got not in want:
            wrong.append({"trial": t["trial"], "template": t["template"], "expected": want, "effect": got})
    ref_alarms = (reference or {}).get("false_alarms", [])
    fault_free_steps = (reference or {}).get("steps", 0)
    alarms_by_detector: dict[str, int] = defaultdict(int)
    for a in ref_alarms:
        alarms_by_detector[a["detector"]] += 1
    return {
        "schema_version": CAMPAIGN_SCHEMA_VERSION,
        "scenario": scenario.name,
        "seed": scenario.campaign.seed if scenario.campaign else None,
        "trials": n,
        "outcomes": outcomes,
        "effects": effect_rates(judged),
        "noise_band": band,
        "unchecked_effects": effect_rates([{"effect": t["unchecked"]["effect"]} for t in judged
                                           if t.get("unchecked") and t["unchecked"]["effect"]]),
        "detector_harm": detector_harm(judged, detectors),
        "effect_expectations": {"checked": checked, "failed": wrong},
        "scorecard": scorecard,
        "false_alarms": {"reference_window_steps": fault_free_steps, "reference": dict(alarms_by_detector),
                         "in_trials_before_fault": sum(t["false_alarms"] for t in judged)},
        "reference_state_hash": (reference or {}).get("state_hash"),
    }


def run_campaign(scenario: Scenario, out_dir: str | Path = "runs", *, trials: int | None = None,
                 seed: int | None = None, resume: str | Path | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None, metrics: Any = None,
                 history: str | None = None) -> dict[str, Any]:
    """Run (or resume) a campaign; returns the summary (also written to campaign.json)."""
    # Bad input stops here, before the run directory exists and before any rank starts.
    if resume is not None:
        run_dir = check_out_dir(resume, "--resume", must_exist=True,
                                fix="give the run directory of an interrupted campaign")
        trials, seed = read_campaign_meta(run_dir)
    else:
        c = scenario.campaign
        trials = trials if trials is not None else (c.trials if c else 0)
        seed = seed if seed is not None else (c.seed if c else 0)
        out = check_out_dir(out_dir)
    check_device(scenario)
    plan = draw_trials(scenario, trials, seed)
    if not is_recovery_campaign(scenario):
        plan += draw_controls(scenario, plan)  # the noise band's control trials, after the trials
    if resume is None:
        run_dir = make_run_dir(out, new_run_id(scenario.name), scenario.model_dump_json(indent=1))
        (run_dir / "campaign-meta.json").write_text(json.dumps({"trials": trials, "seed": seed}))
    log_path = run_dir / "trials.jsonl"
    done: dict[int, dict[str, Any]] = {}
    if log_path.exists():
        for rec in read_events(log_path):
            done[rec["trial"]] = rec
    log = open(log_path, "a", buffering=1, encoding="utf-8")
    state: dict[str, Any] = {"current": None, "reference": None}
    t0 = time.time()

    def remaining() -> dict[str, Any]:
        c = scenario.campaign
        return {"campaign": {"warmup": c.warmup, "window": c.window, "spread_windows": c.spread_windows,
                             "observe": c.observe,
                             "trials": [t for t in plan if t["trial"] not in done]}}

    def record(rec: dict[str, Any]) -> None:
        if rec["trial"] in done:
            return  # judged once: a trial is never counted twice
        done[rec["trial"]] = rec
        log.write(json.dumps(rec, separators=(",", ":")) + "\n")
        if metrics is not None and rec.get("kind") != "recovery" and not rec.get("control"):
            # (a recovery trial's run records its own; a control trial measures the noise band, no outcome)
            j = judge_trial(rec)
            metrics.fault_injected(j["fault"])
            metrics.outcome(j["fault"], j["outcome"])
            first = min(j["latency_steps"].items(), key=lambda kv: kv[1]) if j["latency_steps"] else (None, None)
            if j["detectors"] == ["crash"]:
                first = ("crash", None)
            metrics.judged_fault(j["fault"], j["outcome"], first[0], first[1], j["target"], j["bit_class"])

    def watch(ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "trial_started":
            state["current"] = ev["trial"]
        elif kind == "trial_done":
            state["current"] = None
            record({k: v for k, v in ev.items() if k not in ("t", "event", "rank", "attempt")})
        elif kind == "campaign_reference":
            state["reference"] = {"state_hash": ev["state_hash"], "false_alarms": ev["false_alarms"],
                                  "steps": ev["steps"], "window_s": ev["window_s"], "losses": ev.get("losses"),
                                  "eval_loss": ev.get("eval_loss"), "spread": ev.get("spread") or []}
        elif kind == "fault_error":
            # The trial's fault could not be applied: no outcome for it, and the campaign stops.
            state["error"] = f"trial {state['current']}: {ev['fault']} could not be applied: {ev['error']}"
        elif kind == "failure_detected" and state["current"] is not None and ev["cause"] != "harness":
            trial = state["current"]
            state["current"] = None
            record({"trial": trial, "template": plan[trial]["template"], "fault": plan[trial]["faults"][0],
                    "crash": f"{ev['cause']}: {ev['signature']}", "control": bool(plan[trial].get("control"))})
        if on_event:
            on_event({**ev, "trials_done": len(done), "trials_total": len(plan)})

    if metrics is None:
        metrics = Metrics()
    metrics.set_run(scenario.name, run_dir.name)
    recovery = is_recovery_campaign(scenario)
    try:
        if len(done) < trials and recovery:
            def on_trial(ev: dict[str, Any]) -> None:
                if on_event:
                    on_event({**ev, "trials_done": len(done), "trials_total": trials})

            recovery_campaign.run_trials(scenario, run_dir, run_dir.name, plan, done, record, on_trial, metrics)
        elif len(done) < len(plan):
            base = scenario.model_copy(update={"faults": []})
            Supervisor(base, run_dir, run_dir.name, metrics=metrics, on_event=watch, extra_spec=remaining).run()
    finally:
        log.close()
    if recovery:
        summary = recovery_campaign.summarize(scenario, list(done.values()))
        summary["complete"] = len(done) == trials
        summary["timing"] = {"wall_s": time.time() - t0}

        atomic_write(run_dir / "campaign.json", json.dumps(summary, indent=1).encode())
        atomic_write(run_dir / "campaign.md", recovery_campaign.markdown(summary, run_dir).encode())
        _write_html(run_dir, summary)
        metrics.write_textfile(run_dir / "metrics.prom")
        summary["run_dir"] = str(run_dir)
        _record(summary, done, history, t0)
        return summary
    if state["reference"] is not None:
        (run_dir / "reference.json").write_text(json.dumps(state["reference"]))
    elif (run_dir / "reference.json").exists():
        state["reference"] = json.loads((run_dir / "reference.json").read_text())
    summary = summarize(scenario, list(done.values()), state["reference"])
    summary["seed"] = seed  # the one the trials were drawn from (--seed, or the resumed campaign's)
    summary["complete"] = len(done) == len(plan)
    if state.get("error"):
        summary["error"] = state["error"]
    # Timing lives apart from the summary proper, which is a pure function of the seed.
    summary["timing"] = {"wall_s": time.time() - t0,
                         "reference_window_s": (state["reference"] or {}).get("window_s")}
    _write_reports(run_dir, summary)
    metrics.campaign_effects(summary)
    metrics.write_textfile(run_dir / "metrics.prom")
    summary["run_dir"] = str(run_dir)
    _record(summary, done, history, t0, state["reference"])
    return summary


def _record(summary: dict[str, Any], done: dict[int, Any], history: str | None, t0: float,
            reference: dict[str, Any] | None = None) -> None:
    trials = [done[k] for k in sorted(done) if not done[k].get("control")]  # controls measure the band only
    hist.record_campaign(summary, trials, hist.history_path(history), t0, reference)


def read_campaign_meta(run_dir: str | Path) -> tuple[int, int]:
    """(trials, seed) of the campaign in run_dir, or a one-line UserError naming --resume."""
    shown = _show(run_dir)
    try:
        meta = json.loads((Path(run_dir) / "campaign-meta.json").read_text())
        trials, seed = meta["trials"], meta["seed"]
        if not (isinstance(trials, int) and isinstance(seed, int) and trials >= 1 and seed >= 0):
            raise ValueError(f"trials {trials!r}, seed {seed!r}")
    except FileNotFoundError:
        raise UserError(f"--resume: {shown} is not a campaign run directory (no campaign-meta.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = " ".join(str(getattr(exc, "strerror", None) or exc).split())[:200]
        raise UserError(f"--resume: {shown}/campaign-meta.json is damaged ({reason}); "
                        "start a new campaign instead") from None
    return trials, seed


def _write_reports(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write(run_dir / "campaign.json", json.dumps(summary, indent=1).encode())
    lines = [f"# Campaign {summary['scenario']}: {summary['trials']} trials (seed {summary['seed']})", ""]
    if not summary.get("complete", True):
        lines += ["**Incomplete**: resume with `burnin campaign --resume " + str(run_dir) + "`", ""]
    lines += ["| outcome | trials | rate | 95 % CI (Wilson) |", "|---|---|---|---|"]
    for o, v in summary["outcomes"].items():
        lines.append(f"| {o} | {v['count']} | {v['rate']:.3f} | {v['ci95'][0]:.3f}–{v['ci95'][1]:.3f} |")
    eff, band = summary.get("effects"), summary.get("noise_band")
    if eff:
        lines += ["", f"## What the silent outcomes did ({eff['silent_trials']} masked or sdc trials)", "",
                  "| effect | trials | rate | 95 % CI (Wilson) |", "|---|---|---|---|"]
        for e in ("benign", "transient", "degraded", "diverged", "harmful"):
            v = eff[e]
            lines.append(f"| {e} | {v['count']} | {v['rate']:.3f} | {v['ci95'][0]:.3f}–{v['ci95'][1]:.3f} |")
        lines += ["", f"Noise band (relative to the fault-free window): final loss {band['final']:.3g}, held-out loss "
                      f"{band['eval']:.3g}, largest per-step deviation {band['step']:.3g}; measured from "
                      f"{band['how']}. Diverged: NaN/Inf, or {band['diverged_ratio']}x the reference's loss."]
    ee = summary.get("effect_expectations") or {}
    if ee.get("checked"):
        lines += ["", f"Effect expectations: {ee['checked'] - len(ee['failed'])} of {ee['checked']} trials had the "
                      "effect their fault expects" + "".join(f"; trial {w['trial']} (faults.{w['template']}): "
                                                             f"{w['effect']}, expected {' or '.join(w['expected'])}"
                                                             for w in ee["failed"])]
    harm = summary.get("detector_harm")
    if harm and harm["trials"]:
        lines += ["", f"## Detectors against harm ({harm['harmful']} harmful, {harm['benign']} benign of "
                      f"{harm['trials']} trials run unchecked; {harm['unknown']} unknown)", "",
                  "Share of the harmful trials each detector flags, and of the benign ones (a false alarm on a "
                  "corruption that does not matter), when nothing acts on the fault; Wilson 95 % CI.", "",
                  "| detector | harmful caught | 95 % CI | benign flagged | 95 % CI |", "|---|---|---|---|---|"]
        for d, v in harm["detectors"].items():
            hc, bf = v["harmful_caught"], v["benign_flagged"]
            lines.append(f"| {d} | {_share(hc)} | {hc['ci95'][0]:.3f}–{hc['ci95'][1]:.3f} | {_share(bf)} | "
                         f"{bf['ci95'][0]:.3f}–{bf['ci95'][1]:.3f} |")
        lines += ["", "Unchecked effect per target and bit class (what the faults do when nothing catches them):", "",
                  "| target | bit class | trials | " + " | ".join(EFFECTS) + " | harmful share |",
                  "|---|---|---|" + "---|" * (len(EFFECTS) + 1)]
        for row in summary["scorecard"]:
            u = row.get("unchecked") or {}
            if not u.get("trials"):
                continue
            label = row["bit_class"] + (f" ({row['pattern']})" if row.get("pattern", "single") != "single" else "")
            lines.append(f"| {row['target']} | {label} | {u['trials']} | " + " | ".join(str(u[e]) for e in EFFECTS)
                         + f" | {u['harmful']['rate']:.2f} |")
    lines += ["", "## Detector scorecard", "",
              "Detection rate per target and bit class (median latency in steps); `sdc` is the silent escape rate.", ""]
    dets = sorted({d for row in summary["scorecard"] for d in row["detectors"]})
    lines += ["| target | bit class | trials | " + " | ".join(dets) + " | sdc |",
              "|---|---|---|" + "---|" * (len(dets) + 1)]
    for row in summary["scorecard"]:
        cells = []
        for d in dets:
            v = row["detectors"].get(d)
            cells.append("–" if v is None else f"{v['rate']:.2f} ({v['median_latency_steps']})"
                         if v["detected"] else "0.00")
        label = row["bit_class"] + (f" ({row['pattern']})" if row.get("pattern", "single") != "single" else "")
        lines.append(f"| {row['target']} | {label} | {row['trials']} | " + " | ".join(cells)
                     + f" | {row['sdc']['rate']:.2f} |")
    fa = summary["false_alarms"]
    lines += ["", f"False alarms: {sum(fa['reference'].values())} in {fa['reference_window_steps']} fault-free "
                  f"reference steps; {fa['in_trials_before_fault']} in trial steps before the fault.", ""]
    atomic_write(run_dir / "campaign.md", "\n".join(lines).encode())
    _write_html(run_dir, summary)


def _share(v: dict[str, Any]) -> str:
    return "–" if v["rate"] is None else f"{v['count']}/{v['of']} ({v['rate']:.3f})"


def _write_html(run_dir: Path, summary: dict[str, Any]) -> None:
    """report.html, last: a failure to draw it costs a warning, never campaign.json or campaign.md."""
    write_html_safely(lambda: write_campaign_report(run_dir, summary), run_dir / "report.html")
