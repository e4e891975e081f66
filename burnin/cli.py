"""The `burnin` command.

Exit status: 0 when every expectation of the scenario holds, 1 when one does not, 2 on bad input
(printed as one line naming the file, field and fix), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from burnin.errors import BurninError, HarnessError, ScenarioError, UserError, oneline

__all__ = ["main"]

DEFAULT_SCENARIO = "smoke"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: bad flags are bad input like any other."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"burnin: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="burnin", description="Fault-injection and reliability test harness for GPU training.")
    p.add_argument("--version", action="version", version=f"burnin {__import__('burnin').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run a scenario: golden run, faulted run, verdict, reports")
    run.add_argument("scenario", nargs="?", default=DEFAULT_SCENARIO,
                     help=f"a scenario file or a bundled scenario name (default: {DEFAULT_SCENARIO})")
    run.add_argument("--ranks", type=int, help="override workload.ranks")
    run.add_argument("--steps", type=int, help="override workload.steps")
    run.add_argument("--seed", type=int, help="override workload.seed")
    run.add_argument("--threads", type=int, help="override workload.threads")
    run.add_argument("--device", choices=["cpu", "cuda", "auto"], help="override workload.device")
    run.add_argument("--out", default="runs", help="directory for run directories (default: ./runs)")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port during the run")
    run.add_argument("--metrics-addr", default="127.0.0.1", help="address for --metrics-port (default: 127.0.0.1)")
    run.add_argument("--metrics-linger", type=float, default=0.0, metavar="SECONDS",
                     help="after the run, keep --metrics-port up until it is scraped once more (so the final "
                          "outcomes reach Prometheus), at most this long (default: 0)")
    run.add_argument("--metrics-textfile", metavar="PATH",
                     help="also write the final metrics here, atomically (for node_exporter's textfile collector)")
    run.add_argument("--pushgateway", metavar="URL",
                     help="push the final metrics to this Prometheus Pushgateway (http or https URL), grouped by "
                          "job=\"burnin\", scenario and instance")
    run.add_argument("--push-instance", metavar="NAME", help="the `instance` of the push (default: the host name)")
    run.add_argument("--resume-from", metavar="PATH",
                     help="start from another run's checkpoint (its run directory: the newest that verifies; or "
                          "RUN/checkpoints/step_N), also one written on another world size or mesh (DCP reshards; "
                          "judged in tolerance mode, saying why)")
    run.add_argument("--refresh-golden", action="store_true", help="recompute the golden run even if cached")
    run.add_argument("--isolate-network", action="store_const", const=True, default=None,
                     help="run each rank in its own network namespace (sets network.isolate; needs root)")
    run.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    run.add_argument("--history", metavar="PATH", help="record the result in this SQLite history (default: "
                                                            "$BURNIN_HISTORY, else ~/.local/share/burnin/history.sqlite; "
                                                            "`off`: none)")

    camp = sub.add_parser("campaign", help="run many trials of drawn faults: outcome rates and a detector scorecard")
    camp.add_argument("scenario", nargs="?", help="a scenario with a `campaign:` section (file or bundled name)")
    camp.add_argument("--trials", type=int, help="override campaign.trials")
    camp.add_argument("--seed", type=int, help="override campaign.seed")
    camp.add_argument("--out", default="runs", help="directory for run directories (default: ./runs)")
    camp.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted campaign")
    camp.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    camp.add_argument("--history", metavar="PATH", help="record the result in this SQLite history (default: "
                                                            "$BURNIN_HISTORY, else ~/.local/share/burnin/history.sqlite; "
                                                            "`off`: none)")

    from burnin.scenarios.burn_in import LEVELS

    burn = sub.add_parser("burn-in", help="train for a stated time under a random fault mix; a health verdict per rank")
    burn.add_argument("scenario", nargs="?", default="burn-in",
                      help="a scenario with a `burn_in:` section (file or bundled name; default: burn-in)")
    length = burn.add_mutually_exclusive_group()
    length.add_argument("--duration", help="how long: 90, 90s, 10m, 2h, 1h30m (default: burn_in.duration_s)")
    length.add_argument("--level", choices=list(LEVELS),
                        help="a stated length: " + ", ".join(f"{k} {v['cpu'] // 60 if v['cpu'] >= 60 else v['cpu']}"
                                                             f"{' min' if v['cpu'] >= 60 else ' s'} on CPU, "
                                                             f"{v['cuda'] // 60} min on GPU"
                                                             for k, v in LEVELS.items()))
    burn.add_argument("--seed", type=int, help="override burn_in.seed (same seed, same schedule)")
    burn.add_argument("--resume", metavar="RUN_DIR", help="continue a burn-in whose supervisor died, from its "
                                                          "newest checkpoint and where its timeline stopped")
    burn.add_argument("--out", default="runs", help="directory for run directories (default: ./runs)")
    burn.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    burn.add_argument("--history", metavar="PATH", help="record the result in this SQLite history (default: "
                                                            "$BURNIN_HISTORY, else ~/.local/share/burnin/history.sqlite; "
                                                            "`off`: none)")

    fleet = sub.add_parser("fleet", help="burn in many nodes at once (Slurm, by hand, or --local stand-ins); one "
                                         "verdict per node, lemons named, faulty nodes drained")
    fsub = fleet.add_subparsers(dest="fleet_command", metavar="{run,report,score}")
    frun = fsub.add_parser("run", help="burn in this node (under srun: every node of the step), or --local N "
                                       "stand-in nodes on this host; then judge the fleet")
    frun.add_argument("scenario", nargs="?", default="fleet",
                      help="a scenario with a `burn_in:` section (file or bundled name; default: fleet)")
    flen = frun.add_mutually_exclusive_group()
    flen.add_argument("--duration", help="how long each node burns in: 60s, 10m, 2h (default: burn_in.duration_s)")
    flen.add_argument("--level", choices=list(LEVELS), help="a stated length, as `burnin burn-in --level`")
    frun.add_argument("--seed", type=int, help="override burn_in.seed; every node runs the same job and schedule")
    frun.add_argument("--out", required=True, metavar="DIR",
                      help="the fleet directory (on storage every node sees, under Slurm): nodes/<name>/ per node")
    where = frun.add_mutually_exclusive_group()
    where.add_argument("--local", type=int, metavar="N", help="run N stand-in nodes on this host (1..64)")
    where.add_argument("--node", metavar="NAME", help="this node's name (default: $SLURMD_NODENAME under Slurm, "
                                                      "else the host name)")
    frun.add_argument("--plant", metavar="FILE", help="with --local: defects to plant from outside the nodes' "
                                                      "burn-ins (YAML: node-2: {slow: {cpu_fraction: 0.8}}, node-3: "
                                                      "{silent: \"every=50,bit=10,rank=1\"}), sealed for scoring")
    frun.add_argument("--drain", action="store_true", help="under Slurm: drain every faulty node with its reason "
                                                          "(scontrol update NodeName=X State=DRAIN Reason=...)")
    frun.add_argument("--pushgateway", metavar="URL", help="push each node's health to this Pushgateway, grouped "
                                                          "by fleet and node")
    frun.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    frun.add_argument("--history", metavar="PATH", help="record the fleet (and each node's record) in this SQLite "
                                                        "history (default: $BURNIN_HISTORY, else "
                                                        "~/.local/share/burnin/history.sqlite; `off`: none)")
    frep = fsub.add_parser("report", help="judge a fleet directory again and rewrite its reports")
    frep.add_argument("dir", metavar="DIR", help="a fleet directory (nodes/<name>/ per node)")
    frep.add_argument("--drain", action="store_true", help="drain every faulty node with its reason (Slurm)")
    frep.add_argument("--pushgateway", metavar="URL", help="push each node's health to this Pushgateway")
    frep.add_argument("--history", metavar="PATH", help="the history that knows earlier fleets' nodes (read only)")
    fsc = fsub.add_parser("score", help="score a fleet's verdict against the defects that were planted")
    fsc.add_argument("dir", metavar="DIR", help="a judged fleet directory")
    fsc.add_argument("--sealed", metavar="FILE", help="what was planted (default: DIR/sealed/planted.json)")

    cmp_ = sub.add_parser("compare", help="is B better, the same or worse than A? Rates and recovery times, with "
                                          "intervals and exact tests")
    cmp_.add_argument("a", help="a run, campaign or burn-in directory, or history:SCENARIO[@COMMIT]")
    cmp_.add_argument("b", help="the same, for the other side")
    cmp_.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    cmp_.add_argument("--margin", type=float, default=0.05,
                      help="rates are `same` when the 95 %% interval of the difference is within +/- this (default 0.05)")
    cmp_.add_argument("--fail-on", choices=["worse", "not-comparable", "never"], default="never",
                      help="exit 1 when a metric is worse (or worse or not comparable); default: never")
    cmp_.add_argument("--json", action="store_true", help="JSON instead of Markdown")
    cmp_.add_argument("--html", metavar="PATH", help="also write the comparison as a self-contained page with "
                                                     "plots (both sides with their intervals) to PATH")
    cmp_.add_argument("--history", metavar="PATH", help="the SQLite history for history: selections")

    tri = sub.add_parser("triage", help="failures grouped by signature across runs, against a baseline")
    tri.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="runs to triage (default: the history's)")
    tri.add_argument("--history", metavar="PATH", help="the SQLite history (default: as for run)")
    tri.add_argument("--scenario", help="history: only this scenario")
    tri.add_argument("--commit", help="history: only runs at this git commit (a prefix will do)")
    tri.add_argument("--baseline", action="append", metavar="RUN_DIR", help="a baseline run (repeat for more)")
    tri.add_argument("--baseline-commit", metavar="COMMIT", help="the baseline: the history's runs at this commit")
    tri.add_argument("--json", action="store_true", help="JSON instead of Markdown")

    bis = sub.add_parser("bisect", help="a check for `git bisect run`: exit 0 good, 1 bad, 125 skip")
    bis.add_argument("scenario", help="the scenario to run at each revision (file or bundled name)")
    bis.add_argument("--repeats", type=int, default=1, help="runs per revision (default 1)")
    bis.add_argument("--threshold", type=float, default=0.0,
                     help="rate mode: bad when this share of the repeats fail or more, good when none does, skip (125) "
                          "in between (default 0: any failure is bad)")
    bis.add_argument("--out", default=None, help="directory for run directories (default: a temporary one, removed)")
    bis.add_argument("--history", metavar="PATH", help="record each run in this SQLite history")

    shr = sub.add_parser("shrink", help="the smallest scenario that fails the way a run failed")
    shr.add_argument("run_dir", help="the directory of a run that failed an expectation")
    shr.add_argument("--max-runs", type=int, default=40, help="at most this many candidate runs (default 40)")
    shr.add_argument("--out", metavar="FILE", help="where to write the smallest scenario (default: RUN_DIR/shrunk.yaml)")

    hist = sub.add_parser("history", help="list recorded runs, campaigns and burn-ins")
    hist.add_argument("--history", metavar="PATH", help="the SQLite history (default: as for run)")
    hist.add_argument("--scenario", help="only this scenario")
    hist.add_argument("--kind", choices=["run", "campaign", "burn-in", "fleet"], help="only this kind")
    hist.add_argument("--commit", help="only runs started at this git commit (a prefix will do)")
    hist.add_argument("--limit", type=int, default=20, help="at most this many, newest first (default 20; 0: all)")
    hist.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    sub.add_parser("list", help="list the fault catalogue and the bundled scenarios")

    det = sub.add_parser("check-determinism", help="run a scenario's workload twice without faults and say whether "
                                                   "the bits agree, and where they first part")
    det.add_argument("scenario", nargs="?", default=DEFAULT_SCENARIO, help="a scenario file or bundled name")
    det.add_argument("--ranks", type=int, help="override workload.ranks")
    det.add_argument("--steps", type=int, help="override workload.steps")
    det.add_argument("--out", default="runs", help="where the two runs are made (removed after; default: runs)")
    det.add_argument("--keep", action="store_true", help="keep the two runs' directories")

    val = sub.add_parser("validate", help="check scenario files without running them")
    val.add_argument("files", nargs="+", metavar="FILE")

    sub.add_parser("schema", help="print the scenario JSON Schema (for editors)")

    clean = sub.add_parser("cleanup", help="remove what a killed supervisor left behind (rank processes, "
                                           "network namespaces)")
    clean.add_argument("--force", action="store_true", help="also runs whose supervisor still lives")
    clean.add_argument("--golden", nargs="?", const="all", choices=["all", "prune"],
                       help="the golden cache: `all` (the default) removes every cached golden record and its "
                            "directories; `prune` only what is not needed (plain cleanup prunes too)")

    pool = sub.add_parser("pool", help="keep warm ranks across runs: runs started with BURNIN_POOL=SOCKET fork "
                                       "their ranks from it and pay no start-up")
    pool_sub = pool.add_subparsers(dest="pool_command", metavar="ACTION", parser_class=_Parser, required=True)
    serve = pool_sub.add_parser("serve", help="serve warm zygotes on a Unix socket until SIGTERM or Ctrl-C")
    serve.add_argument("--socket", required=True, metavar="PATH", help="the Unix socket to listen on")
    serve.add_argument("--max-zygotes", type=int, default=4, metavar="N",
                       help="at most this many interpreters kept warm (one per device, threads, kernels and "
                            "import-time environment; default 4)")
    serve.add_argument("--idle-exit", type=float, metavar="S", help="stop after S seconds without a run")

    rep = sub.add_parser("report", help="rebuild a run's reports (report.html too) from its event log, or a campaign's or burn-in's report.html; judge a torchrun run")
    rep.add_argument("run_dir")

    sub.add_parser("doctor", help="what this machine offers burnin: root, namespaces, qdiscs, GPU, Triton, Prometheus")

    rules = sub.add_parser("rules", help="the shipped Prometheus rules, their unit tests and the Grafana dashboard")
    rules.add_argument("--dir", help="copy them into this directory (default: print where they are installed)")

    fc = sub.add_parser("forecast", help="expected goodput at 1k-100k GPUs per recovery tier, from a run's measured "
                                         "recovery and a failure model; a table and a page with the plot")
    fc.add_argument("source", metavar="DIR", help="a run, campaign or burn-in directory")
    fc.add_argument("--gpus", default="1000,10000,100000", metavar="N,N,...",
                    help="GPU counts, comma-separated; k and M suffixes work (default: 1000,10000,100000)")
    fc.add_argument("--failure-model", default="llama3", metavar="NAME|FILE",
                    help="a bundled failure model (llama3: Meta's 54 days on 16,384 GPUs) or a YAML/JSON file "
                         "(docs/forecast.md; default: llama3)")
    fc.add_argument("--checkpoint-seconds", type=float, metavar="S",
                    help="the cost of one checkpoint (default: the mean save time the input measured)")
    fc.add_argument("--step-seconds", type=float, metavar="S",
                    help="the time of one training step (default: measured); converts lost steps to time")
    fc.add_argument("--snapshot-seconds", type=float, metavar="S",
                    help="the in-memory snapshot's cost per step (default: measured between steps)")
    fc.add_argument("--sdc-per-gpu-day", type=float, metavar="R",
                    help="a data-fault campaign's forecast: silent data corruption events per GPU per day (default: "
                         "the failure model's `Silent data corruption` interruptions, a lower bound)")
    fc.add_argument("--json", action="store_true", help="print the forecast as JSON instead of the table")
    fc.add_argument("--out", metavar="FILE", help="the HTML page with the plot (default: DIR/forecast.html)")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {"ranks": "workload.ranks", "steps": "workload.steps", "seed": "workload.seed",
             "threads": "workload.threads", "device": "workload.device", "isolate_network": "network.isolate"}
    return {path: getattr(args, flag) for flag, path in pairs.items() if getattr(args, flag) is not None}


def _prepare_run(args: argparse.Namespace) -> Any:
    """Check everything `burnin run` needs (flags, scenario, device, fabric, --out, the metrics endpoint)
    and return the scenario; starts nothing and creates nothing."""
    from burnin.harness import preflight
    from burnin.scenarios import load_scenario

    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise UserError(f"--metrics-port: {args.metrics_port} is not a port; use 0-65535 (0 picks a free one)")
    _check_metrics_flags(args)
    _check_history_flag(args.history)
    overrides = _overrides(args)
    scenario = load_scenario(args.scenario, overrides=overrides)
    preflight.check_device(scenario, args.scenario, overrides)
    preflight.check_network(scenario, args.scenario, overrides)
    preflight.check_out_dir(args.out)
    if args.metrics_port is not None:
        preflight.check_metrics_endpoint(args.metrics_port, args.metrics_addr)
    args.source = None
    if getattr(args, "resume_from", None) is not None:
        from burnin.harness.resume_from import resolve

        scenario, args.source = resolve(args.resume_from, scenario)
    return scenario


def _cmd_run(args: argparse.Namespace) -> int:
    from burnin.harness.runner import run_scenario
    from burnin.reports.console import make_progress
    from burnin.reports.result import passed
    from burnin.reports.writers import render_console, render_plain

    scenario = _prepare_run(args)
    if getattr(args, "prepare_only", False):
        return 0
    with make_progress(scenario.workload.steps, scenario.name, quiet=args.quiet) as progress:
        result = run_scenario(scenario, args.out, metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
                              on_event=progress.on_event, refresh_golden=args.refresh_golden,
                              metrics_linger_s=args.metrics_linger, metrics_textfile=args.metrics_textfile,
                              pushgateway=args.pushgateway, push_instance=args.push_instance, history=args.history,
                              resume_from=args.source)
    if sys.stdout.isatty():
        from rich.console import Console

        Console().print(render_console(result))
    else:
        print(render_plain(result))
    return 0 if passed(result) else 1


def _check_metrics_flags(args: argparse.Namespace) -> None:
    from urllib.parse import urlsplit

    if not 0 <= args.metrics_linger <= 3600:
        raise UserError(f"--metrics-linger: {args.metrics_linger} is out of range; use 0-3600 seconds")
    if args.pushgateway is not None:
        url = urlsplit(args.pushgateway)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise UserError(f"--pushgateway: {args.pushgateway!r} is not an http(s) URL; "
                            "use e.g. http://127.0.0.1:9091")
    if args.push_instance is not None and not args.push_instance.strip():
        raise UserError("--push-instance: empty; give a name, or leave the flag out for the host name")
    if args.metrics_textfile is not None:
        from burnin.harness.preflight import check_out_dir

        path = Path(args.metrics_textfile)
        try:
            kind_ok = not path.exists() or path.is_file()
        except (OSError, ValueError):
            kind_ok = False
        if not args.metrics_textfile.strip() or not kind_ok:
            raise UserError(f"--metrics-textfile: {oneline(args.metrics_textfile)!r} is not a file path; give the path "
                            "of a file to write (its directory must exist), e.g. /var/lib/node_exporter/burnin.prom")
        check_out_dir(path.absolute().parent, "--metrics-textfile", must_exist=True)


def _prepare_campaign(args: argparse.Namespace) -> tuple[Any, int]:
    """Check everything `burnin campaign` needs (flags, scenario, device, the drawn trials, --out or
    --resume) and return the scenario and its number of trials; starts nothing and creates nothing."""
    from burnin.harness import preflight
    from burnin.harness.campaign import read_campaign_meta
    from burnin.scenarios import load_scenario
    from burnin.scenarios.schema import Campaign, Scenario

    _check_history_flag(args.history)

    # the bound campaign.trials has in the schema
    max_trials = next(m.le for m in Campaign.model_fields["trials"].metadata if getattr(m, "le", None) is not None)

    if args.resume:
        run_dir = preflight.check_out_dir(args.resume, "--resume", must_exist=True,
                                          fix="give the run directory of an interrupted campaign")
        trials, seed = read_campaign_meta(run_dir)
        try:
            scenario = Scenario.model_validate(json.loads((run_dir / "scenario.json").read_text()))
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            reason = " ".join(str(getattr(exc, "strerror", None) or exc).split())[:200]
            raise UserError(f"--resume: {oneline(run_dir)}/scenario.json is damaged ({reason}); "
                            "start a new campaign instead") from None
        source = None
    else:
        if not args.scenario:
            raise UserError("campaign: name a scenario with a `campaign:` section, e.g. `burnin campaign sdc-campaign`")
        if args.trials is not None and not 1 <= args.trials <= max_trials:
            raise UserError(f"--trials: {args.trials} is out of range; use 1-{max_trials}")
        if args.seed is not None and args.seed < 0:
            raise UserError(f"--seed: {args.seed} is out of range; use 0 or more")
        scenario = load_scenario(args.scenario)
        source = args.scenario
        trials, seed = args.trials, args.seed
        preflight.check_out_dir(args.out)
    preflight.check_device(scenario, source)
    plan = preflight.check_campaign(scenario, source, trials=trials, seed=seed)
    return scenario, len(plan)


def _cmd_campaign(args: argparse.Namespace) -> int:
    from burnin.harness.campaign import run_campaign
    from burnin.reports.console import make_campaign_progress

    scenario, trials = _prepare_campaign(args)
    if getattr(args, "prepare_only", False):
        return 0
    with make_campaign_progress(trials, scenario.name, quiet=args.quiet) as progress:
        summary = run_campaign(scenario, args.out, trials=args.trials, seed=args.seed, resume=args.resume,
                               on_event=progress.on_event, history=args.history)
    o = summary["outcomes"]
    recovery = summary.get("kind") == "recovery"
    # (`degraded` is an outcome of a system that recovers itself: a data-fault campaign never has one)
    print(f"{summary['scenario']}: {summary['trials']} trials  " + "  ".join(
        f"{k} {v['count']} ({v['rate']:.1%}, {v['ci95'][0]:.1%}-{v['ci95'][1]:.1%})" for k, v in o.items()
        if recovery or k != "degraded" or v["count"]))
    if recovery:
        return _report_recovery_campaign(summary)
    eff, band = summary.get("effects"), summary.get("noise_band")
    if eff and band and eff["silent_trials"]:
        print(f"effects of the {eff['silent_trials']} silent trials: " + ", ".join(
            f"{e} {eff[e]['count']}" for e in ("benign", "transient", "degraded", "diverged"))
            + f"; harmful {eff['harmful']['rate']:.1%} ({eff['harmful']['ci95'][0]:.1%}-{eff['harmful']['ci95'][1]:.1%});"
            f" noise band: final loss {band['final']:.2%}, held-out {band['eval']:.2%}, per step {band['step']:.2%}")
    fa = summary["false_alarms"]
    print(f"false alarms: {sum(fa['reference'].values())} in the fault-free reference; "
          f"wall {summary['timing']['wall_s']:.0f} s")
    if summary.get("error"):
        print(f"burnin: harness error: {summary['error']}", file=sys.stderr)
    wrong = (summary.get("effect_expectations") or {}).get("failed") or []
    for w in wrong[:5]:
        print(f"burnin: trial {w['trial']} (faults.{w['template']}): effect {w['effect']}, expected "
              f"{' or '.join(w['expected'])}", file=sys.stderr)
    ok = summary["complete"] and not fa["reference"] and not wrong
    print(f"{'PASS' if ok else 'FAIL'} {summary['run_dir']}")
    return 0 if ok else 1


def _report_recovery_campaign(summary: dict[str, Any]) -> int:
    """The console lines of a process-fault campaign; exit 0 when every trial was bit-exact and ended as
    its fault expects, with nothing unexplained."""
    for name, b in summary["by_fault"].items():
        t = b["recovery_s"]["total_s"]
        times = f"recovery p50 {t['p50']:.2f} s, p90 {t['p90']:.2f} s, p99 {t['p99']:.2f} s" if t["p50"] is not None \
            else "no recovery"
        exact = "" if summary.get("comparison") == "invariants" else f"exact {b['exact']['count']}, "
        print(f"  {name}: {b['trials']} trials, {exact}{times}, lost steps max {b['lost_steps']['max']}")
    ex = summary["exact"]
    exactness = ("not exact (judged by the invariants: recovery.mode external)" if summary.get("comparison") ==
                 "invariants" else f"exact {ex['count']}/{summary['trials']}")
    print(f"{exactness}; unexplained failures {summary['unexplained_failures']}; "
          f"wall {summary['timing']['wall_s']:.0f} s")
    for e in summary["errors"][:5]:
        print(f"burnin: trial {e['trial']}: {e['error']}", file=sys.stderr)
    ok = summary["complete"] and summary["failed_expectations"] == 0
    print(f"{'PASS' if ok else 'FAIL'} {summary['run_dir']}")
    return 0 if ok else 1


def _prepare_burn_in(args: argparse.Namespace) -> tuple[Any, float, int]:
    """Check everything `burnin burn-in` needs; returns (scenario, duration in seconds, seed)."""
    from burnin.harness import preflight
    from burnin.harness.burn_in import LEVELS, draw_schedule, parse_duration
    from burnin.scenarios import load_scenario

    _check_history_flag(args.history)

    if args.resume is not None:
        from burnin.harness.burn_in import read_resume_state

        given = [flag for flag, v in (("--duration", args.duration), ("--level", args.level), ("--seed", args.seed))
                 if v is not None]
        if given or args.scenario != "burn-in":
            what = given[0] if given else "a scenario"
            raise UserError(f"--resume: {what} cannot be given with --resume (the burn-in keeps its own); drop it")
        run_dir = preflight.check_out_dir(args.resume, "--resume", must_exist=True,
                                          fix="give the run directory of a burn-in")
        scenario, duration, seed, _, _ = read_resume_state(run_dir)
        if scenario.recovery.mode == "external":
            raise UserError(f"--resume: the burn-in in {run_dir} ran a job that recovers itself (recovery.mode "
                            "external), whose state lived in its processes, gone with the burn-in's; start a new one")
        preflight.check_device(scenario, args.resume, {})
        return scenario, duration, seed
    scenario = load_scenario(args.scenario)
    if scenario.burn_in is None:
        raise UserError(f"{args.scenario}: burn_in: this scenario has no `burn_in:` section; add one (duration_s, "
                        "faults with per_hour or mtbf_s), or run the bundled one: `burnin burn-in`")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UserError(f"--seed: {args.seed} is out of range; use 0 to {2**63 - 1}")
    seed = args.seed if args.seed is not None else scenario.burn_in.seed
    if args.duration is not None:
        duration = parse_duration(args.duration)
    elif args.level is not None:
        device = scenario.workload.device
        if device == "auto":
            device = "cuda" if preflight.cuda_device_count()[0] else "cpu"
        duration = float(LEVELS[args.level][device])
    else:
        duration = scenario.burn_in.duration_s
    b = scenario.burn_in
    if b.quiet_start_s + b.quiet_end_s >= duration:
        raise UserError(f"--duration: {duration:g} s leaves no time for faults after burn_in.quiet_start_s "
                        f"({b.quiet_start_s:g}) and before burn_in.quiet_end_s ({b.quiet_end_s:g}); run longer")
    draw_schedule(scenario, duration, seed)  # a rate that draws too many faults is refused here
    preflight.check_device(scenario, args.scenario, {})
    preflight.check_network(scenario, args.scenario, {})
    preflight.check_out_dir(args.out)
    return scenario, duration, seed


def _cmd_burn_in(args: argparse.Namespace) -> int:
    import time

    from burnin.harness.burn_in import run_burn_in

    scenario, duration, seed = _prepare_burn_in(args)
    if getattr(args, "prepare_only", False):
        return 0
    t0 = time.time()

    def say(ev: dict[str, Any]) -> None:
        if args.quiet:
            return
        kind = ev.get("event")
        text = None
        if kind == "burn_in_progress":
            text = (f"elapsed {ev['elapsed_s']:.0f}/{duration:.0f} s, step {ev['step']}, "
                    f"{ev['faults_fired']} faults so far")
        elif kind == "fault_injected":
            text = f"fault {ev['fault']} on rank {ev['rank']} at step {ev['step']} ({ev['point']})"
        elif kind == "failure_detected":
            text = f"failure: {ev['cause']} on rank {ev.get('rank')} ({'explained' if ev.get('fault_indices') else 'UNEXPLAINED'})"
        elif kind == "ft_healed":
            text = f"rank {ev.get('rank')} (replica group {ev.get('group')}) healed from a peer"
        elif kind == "golden_started" and "steps" in ev:
            text = f"the reference: {ev['steps']} steps of the same groups without faults"
        elif kind == "window_replay":
            text = f"verifying window {ev['k'] + 1}/{ev['of']}: steps {ev['start']}-{ev['end']} replayed without faults"
        if text:
            print(f"[{time.time() - t0:7.1f}s] {text}", file=sys.stderr, flush=True)

    if scenario.recovery.mode == "external":  # the job recovers itself: launched, disturbed, watched, judged
        from burnin.harness.external_burn_in import run_external_burn_in

        summary = run_external_burn_in(scenario, args.out, duration_s=duration, seed=seed, on_event=say,
                                       history=args.history)
    else:
        summary = run_burn_in(None if args.resume else scenario, args.out, duration_s=duration, seed=seed,
                              on_event=say, resume=args.resume, history=args.history)
    for r in summary["health"]["ranks"]:
        print(f"rank {r['rank']}: {r['verdict']}" + (f" ({'; '.join(r['reasons'])})" if r["reasons"] else ""))
    f = summary["faults"]
    print(f"faults: {f['fired']} fired ({', '.join(f'{k} {v}' for k, v in sorted(f['by_outcome'].items())) or 'none'}); "
          f"restarts {summary['restarts']}; goodput {summary['steps']['useful']}/{summary['steps']['executed']} steps; "
          f"wall {summary['wall_s']:.0f} s")
    if summary.get("interrupted"):
        print(f"burnin: {summary['interrupted']}", file=sys.stderr)
    print(f"{'PASS' if summary['ok'] else 'FAIL'} {summary['run_dir']}")
    return 0 if summary["ok"] else 1


def _check_history_flag(value: str | None, *, reading: bool = False) -> None:
    """--history names a file: a new one, or a burnin history (commands that only read it: an existing one)."""
    if value is None or value == "off":
        return
    from burnin.harness.preflight import check_out_dir
    from burnin.reports.history import check_history

    path = Path(value)
    try:
        is_dir = "\x00" in value or path.is_dir()
    except (OSError, ValueError):
        is_dir = True
    if not value.strip() or is_dir:
        raise UserError(f"--history: {oneline(value)!r} is not a file path; give the path of a SQLite file "
                        "(created if missing), or `off`")
    if not reading:
        check_out_dir(path.absolute().parent, "--history")
    try:
        check_history(path, must_exist=reading)
    except OSError as exc:  # a path too long, a component that is a file, no permission
        raise UserError(f"--history: cannot use {oneline(value)!r} ({oneline(exc.strerror or exc)}); give the path "
                        "of a SQLite file") from None


def _cmd_compare(args: argparse.Namespace) -> int:
    from burnin.hunt.compare import compare, load_side, markdown

    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha: {args.alpha} is not a significance level; use a number between 0 and 1, e.g. 0.05")
    if not 0 < args.margin < 1:
        raise UserError(f"--margin: {args.margin} is not a rate difference; use a number between 0 and 1, e.g. 0.05")
    _check_history_flag(args.history, reading=any(side.startswith("history:") for side in (args.a, args.b)))
    if args.html is not None:
        from burnin.harness.preflight import check_out_dir

        try:
            is_dir = "\x00" in args.html or Path(args.html).is_dir()
        except (OSError, ValueError):
            is_dir = True
        if not args.html.strip() or is_dir:
            raise UserError(f"--html: {oneline(args.html)!r} is not a file path; give the path of the page to write, "
                            "e.g. compare.html")
        check_out_dir(Path(args.html).absolute().parent, "--html")
    a, b = load_side(args.a, args.history), load_side(args.b, args.history)
    result = compare(a, b, alpha=args.alpha, margin=args.margin)
    print(json.dumps(result, indent=1) if args.json else markdown(result), end="" if not args.json else "\n")
    if args.html is not None:
        from burnin.reports.html import write_compare_report

        try:
            Path(args.html).absolute().parent.mkdir(parents=True, exist_ok=True)
            write_compare_report(result, Path(args.html).absolute())
        except OSError as exc:
            raise UserError(f"--html: cannot write {oneline(args.html)}: {exc.strerror or exc}") from None
    bad = {"worse"} if args.fail_on == "worse" else {"worse", "not comparable"} if args.fail_on == "not-comparable" \
        else set()
    return 1 if any(m["verdict"] in bad for m in result["metrics"]) else 0


def _cmd_triage(args: argparse.Namespace) -> int:
    from burnin.hunt import triage as tr

    _check_history_flag(args.history, reading=not args.run_dirs)
    if args.run_dirs:
        runs, failures = tr.collect_dirs(args.run_dirs)
    else:
        runs, failures = tr.collect_history(args.history, scenario=args.scenario, commit=args.commit)
    baseline, earlier = None, None
    if args.baseline and args.baseline_commit:
        raise UserError("--baseline: give run directories or --baseline-commit, not both")
    if args.baseline:
        baseline = tr.collect_dirs(args.baseline)
    elif args.baseline_commit:
        baseline = tr.collect_history(args.history, scenario=args.scenario, commit=args.baseline_commit)
    if baseline is not None and baseline[0]:
        first = min(r["started_at"] for r in baseline[0])
        try:
            earlier = {f["signature"] for f in tr.collect_history(args.history, scenario=args.scenario, until=first)[1]}
        except UserError:
            earlier = set()
    result = tr.triage(runs, failures, baseline, earlier)
    print(json.dumps(result, indent=1, default=list) if args.json else tr.markdown(result), end="")
    return 0


def _cmd_bisect(args: argparse.Namespace) -> int:
    """`git bisect run burnin bisect SCENARIO`: 0 good, 1 bad, 125 skip (this revision cannot be set up, or
    the rate is undecided). A mistake in the flags exits 128, which stops `git bisect run` (2 would mark
    the revision bad)."""
    import shutil
    import tempfile

    from burnin.harness.runner import run_scenario
    from burnin.reports.result import passed
    from burnin.scenarios import load_scenario

    problem = None
    if not 1 <= args.repeats <= 1000:
        problem = f"--repeats: {args.repeats} is out of range; use 1-1000"
    elif not 0 <= args.threshold <= 1:
        problem = f"--threshold: {args.threshold} is not a share of the repeats; use 0-1"
    if problem:
        print(f"burnin: error: {problem} (exit 128: stops git bisect run)", file=sys.stderr)
        return 128
    try:
        _check_history_flag(args.history)
        scenario = load_scenario(args.scenario)
        from burnin.harness import preflight

        preflight.check_device(scenario, args.scenario, {})
        preflight.check_network(scenario, args.scenario, {})
    except (BurninError, OSError) as exc:
        print(f"burnin: {oneline(str(exc))} (exit 125: this revision is skipped)", file=sys.stderr)
        return 125
    out = args.out or tempfile.mkdtemp(prefix="burnin-bisect-")
    fails = 0
    try:
        for k in range(args.repeats):
            try:
                result = run_scenario(scenario, out, history=args.history)
            except (BurninError, OSError) as exc:
                print(f"burnin: {oneline(str(exc))} (exit 125: this revision is skipped)", file=sys.stderr)
                return 125
            bad = not passed(result)
            fails += bad
            failed = [e.name for e in result.expectations if not e.ok]
            print(f"run {k + 1}/{args.repeats}: {'FAIL (' + ', '.join(failed) + ')' if bad else 'pass'}", flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    rate = fails / args.repeats
    if fails == 0:
        verdict, code = "good", 0
    elif rate >= args.threshold:
        verdict, code = "bad", 1
    else:
        verdict, code = "undecided", 125
    print(f"{verdict}: {fails}/{args.repeats} runs failed (threshold {args.threshold:g})")
    return code


def _cmd_shrink(args: argparse.Namespace) -> int:
    from burnin.hunt.shrink import shrink

    if not 1 <= args.max_runs <= 10_000:
        raise UserError(f"--max-runs: {args.max_runs} is out of range; use 1-10000")
    if args.out is not None:
        from burnin.harness.preflight import check_out_dir

        check_out_dir(Path(args.out).absolute().parent, "--out", must_exist=True)
    out = shrink(args.run_dir, max_runs=args.max_runs, out_file=args.out)
    for step in out["steps"]:
        print(f"  {step}")
    print(f"{out['from_faults']} faults -> {out['faults']} in {out['runs']} runs; the smallest failing scenario: "
          f"{out['scenario']}")
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    import datetime

    from burnin.reports import history as hist

    _check_history_flag(args.history, reading=True)
    if args.limit < 0:
        raise UserError(f"--limit: {args.limit} is negative; give 0 (all) or more")
    path = hist.history_path(args.history)
    if path is None:
        raise UserError("--history: the history is off (BURNIN_HISTORY=off); give a path")
    if not path.exists():  # the default place (or $BURNIN_HISTORY), before anything was recorded
        print(f"no runs recorded yet: no history at {path}")
        return 0
    hist.check_history(path, flag="BURNIN_HISTORY" if os.environ.get("BURNIN_HISTORY") and not args.history
                       else "--history")
    rows = hist.select_runs(path, scenario=args.scenario, kind=args.kind, commit=args.commit, limit=args.limit or None)
    if args.json:
        for r in rows:
            print(json.dumps({**r, "machine": json.loads(r["machine"] or "{}"), "figures": json.loads(r["figures"] or "{}")}))
        return 0
    if not rows:
        print(f"no runs recorded in {path}" + (" that match" if (args.scenario or args.kind or args.commit) else ""))
        return 0
    print(f"{'started':<19}  {'kind':<8}  {'scenario':<22}  {'ok':<4}  {'commit':<10}  figures")
    for r in rows:
        when = datetime.datetime.fromtimestamp(r["started_at"]).strftime("%Y-%m-%d %H:%M:%S")
        fig = json.loads(r["figures"] or "{}")
        brief = fig.get("outcomes") or fig.get("health") or {}
        if isinstance(brief, dict) and brief and isinstance(next(iter(brief.values())), dict):
            brief = {k: v.get("count") for k, v in brief.items() if v.get("count")}
        commit = (r["git_commit"] or "-")[:8] + ("+" if r["git_dirty"] else "")
        print(f"{when:<19}  {r['kind']:<8}  {r['scenario'][:22]:<22}  {'yes' if r['ok'] else 'NO':<4}  {commit:<10}  "
              + " ".join(f"{k}={v}" for k, v in brief.items()))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from burnin.faults import all_faults
    from burnin.scenarios import bundled_names, load_scenario

    print("faults:")
    for cls in all_faults():
        tag = " (simulated)" if cls.simulated else ""
        print(f"  {cls.name:<28} {cls.where:<12} {cls.summary}{tag}")
    print("scenarios:")
    for name in bundled_names():
        sc = load_scenario(name)
        first = sc.description.strip().splitlines()[0] if sc.description.strip() else ""
        print(f"  {name:<28} {first}")
    return 0


def _cmd_check_determinism(args: argparse.Namespace) -> int:
    from burnin.harness import preflight
    from burnin.harness.determinism import check_determinism
    from burnin.scenarios import load_scenario

    overrides = {p: v for p, v in (("workload.ranks", args.ranks), ("workload.steps", args.steps)) if v is not None}
    # The two runs have no faults: the scenario's must not stop a shorter or smaller run.
    scenario = load_scenario(args.scenario, overrides={**overrides, "faults": [], "campaign": None, "burn_in": None})
    preflight.check_device(scenario, args.scenario, overrides)
    out = preflight.check_out_dir(args.out)

    def progress(ev: dict[str, Any]) -> None:
        if ev.get("event") == "determinism_run":
            print(f"fault-free run {ev['run']} of 2 ...", file=sys.stderr, flush=True)

    div = check_determinism(scenario, out, on_event=progress, keep=args.keep)
    print(f"{scenario.name}: {div.text()}")
    return 0 if div.deterministic else 1


def _cmd_validate(args: argparse.Namespace) -> int:
    from burnin.harness.preflight import check_scenario
    from burnin.scenarios import load_scenario

    status = 0
    for f in args.files:
        try:
            try:
                source: str | Path = Path(f) if Path(f).exists() else f
            except (OSError, ValueError):  # a name too long, a NUL byte: the loader says why
                source = f
            sc = load_scenario(source)
            # what `run` and `campaign` check before they start: the device, the network fabric, the trials
            check_scenario(sc, source)
            print(f"{f}: ok ({sc.name}: {len(sc.faults)} faults, {sc.workload.ranks} ranks, {sc.workload.steps} steps)")
        except UserError as exc:
            print(str(exc), file=sys.stderr)
            status = 2
    return status


def _cmd_schema(args: argparse.Namespace) -> int:
    from burnin.scenarios import scenario_json_schema

    print(json.dumps(scenario_json_schema(), indent=2))
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from burnin.harness.cleanup import sweep
    from burnin.harness.golden import clear_cache, prune_cache

    report = sweep(force=args.force)
    from burnin.core import cgroups

    for name in cgroups.sweep():
        print(f"removed the empty cgroup {name} (its fleet launcher is gone)")
    for item in report:
        if item["action"] == "cleaned":
            ns = f", removed network namespace(s) {item['namespaces']}" if item.get("namespaces") else ""
            ns += f", removed memory snapshots {item['snapshots']}" if item.get("snapshots") else ""
            print(f"{item['run_id']}: killed {len(item['killed'])} leftover process(es) {item['killed']}{ns}")
        else:
            print(f"{item['run_id']}: {item['action']} ({item['why']})")
    # The golden cache: pruned always (what no run needs), cleared with --golden.
    golden = clear_cache(force=args.force) if args.golden == "all" else prune_cache()
    for item in golden["removed"]:
        print(f"golden cache: removed {item['kind']} {item['path']} ({item['bytes']} bytes)")
    for item in golden["skipped"] if args.golden else []:
        print(f"golden cache: kept {item['path']} ({item['why']})")
    if args.golden or golden["removed"]:
        print(f"golden cache {golden['cache']}: removed {len(golden['removed'])} item(s), {golden['bytes']} bytes")
    if not report and not golden["removed"] and not args.golden:
        print("nothing to clean up")
    return 0


def _cmd_pool(args: argparse.Namespace) -> int:
    """`burnin pool serve`: checks its flags and socket before it starts (one line, exit 2)."""
    import socket as _socket

    from burnin.harness.pool_server import serve

    path = Path(args.socket)
    if args.max_zygotes < 1:
        raise UserError(f"--max-zygotes: {args.max_zygotes} keeps nothing warm; use 1 or more")
    if args.idle_exit is not None and not args.idle_exit > 0:
        raise UserError(f"--idle-exit: {args.idle_exit:g} is not a time; use seconds > 0")
    if len(str(path.absolute()).encode()) > 107:
        raise UserError(f"--socket: {path} is longer than a Unix socket path may be (107 bytes); use a shorter one")
    if not path.parent.is_dir():
        raise UserError(f"--socket: {path.parent} is not a directory; create it or choose another path")
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"--socket: {path.parent} is not writable; choose another path")
    if path.exists() or path.is_symlink():
        probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise UserError(f"--socket: {path} is already served by another `burnin pool serve`; stop it or "
                            "choose another path")
        except OSError:
            if not path.is_socket():
                raise UserError(f"--socket: {path} exists and is not a socket; remove it or choose another "
                                "path") from None
        finally:
            probe.close()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return serve(str(path), max_zygotes=args.max_zygotes, idle_exit_s=args.idle_exit)


def _cmd_doctor(args: argparse.Namespace) -> int:
    """One line per capability; never imports torch or triton (only looks them up)."""
    import importlib.util
    import os
    import shutil

    from burnin.harness.fabric import network_capabilities

    def have(ok: bool, yes: str, no: str) -> str:
        return yes if ok else f"no: {no}"

    lines = {"root": have(os.geteuid() == 0, "yes", f"running as uid {os.geteuid()}")}
    lines.update(network_capabilities())
    smi, driver = shutil.which("nvidia-smi"), os.path.isdir("/proc/driver/nvidia")
    lines["GPU"] = have(bool(smi or driver), f"NVIDIA driver present ({smi or '/proc/driver/nvidia'})",
                        "no nvidia-smi, no /proc/driver/nvidia (CPU only)")
    triton = importlib.util.find_spec("triton")  # found, not imported: importing it costs seconds
    lines["Triton"] = have(triton is not None, f"installed ({triton.origin if triton else ''})", "not installed")
    for tool in ("prometheus", "pushgateway", "promtool", "chromium"):
        path = shutil.which(tool) or (shutil.which("prometheus-pushgateway") if tool == "pushgateway" else None)
        lines[tool] = have(path is not None, str(path), "not on PATH")
    for name, value in lines.items():
        print(f"{name + ':':<22} {value}")
    return 0


def _golden_progress(ev: dict[str, Any]) -> None:
    if ev.get("event") == "golden_started":
        print(f"golden run {ev['key']}: computing the fault-free reference", file=sys.stderr)


def _cmd_report(args: argparse.Namespace) -> int:
    from burnin.harness.runner import rebuild_reports
    from burnin.reports.result import passed
    from burnin.reports.writers import render_plain

    from burnin.harness.torchrun import is_torchrun_run

    run_dir = Path(args.run_dir)
    if (run_dir / "campaign.json").is_file() or (run_dir / "burn-in.json").is_file():
        from burnin.reports import html

        print(f"rebuilt {html.rebuild(run_dir)}")  # their summaries are written as they go; the page is rebuilt
        return 0
    torchrun = is_torchrun_run(run_dir) and (run_dir / "scenario.json").is_file()
    if not torchrun and (not (run_dir / "events.jsonl").is_file() or not (run_dir / "scenario.json").is_file()):
        raise UserError(f"{run_dir}: not a burnin run directory (needs events.jsonl and scenario.json, or the "
                        f"torchrun.json of a torchrun run)")
    result = rebuild_reports(run_dir, on_event=_golden_progress if torchrun else None)
    print(render_plain(result))
    return 0 if passed(result) else 1


def _cmd_forecast(args: argparse.Namespace) -> int:
    import math

    from burnin.reports import forecast as fc
    from burnin.reports import forecast_page as fp
    from burnin.reports.failure_models import load as load_failure_model

    gpus = fc.parse_gpus(args.gpus)
    for flag, value, zero in (("--checkpoint-seconds", args.checkpoint_seconds, False),
                              ("--step-seconds", args.step_seconds, False),
                              ("--snapshot-seconds", args.snapshot_seconds, True)):
        if value is not None and not ((zero and value == 0) or (math.isfinite(value) and 1e-6 <= value <= 1e7)):
            raise UserError(f"{flag}: {value:g} is out of range; give seconds from 1e-6 to 1e7"
                            + (" (or 0)" if zero else ""))
    out = Path(args.out) if args.out else Path(args.source) / "forecast.html"
    if args.out is not None and ("\x00" in args.out or out.is_dir() or not out.parent.is_dir()):
        raise UserError(f"--out: {oneline(args.out)!r} is not a file path in an existing directory; give the path of "
                        "the page to write, e.g. forecast.html")
    sdc_rate = getattr(args, "sdc_per_gpu_day", None)
    if sdc_rate is not None and not (math.isfinite(sdc_rate) and 0 < sdc_rate <= 1e3):
        raise UserError(f"--sdc-per-gpu-day: {sdc_rate:g} is out of range; give events per GPU per day, above 0 and at "
                        "most 1000")
    model = load_failure_model(args.failure_model)
    if fc.is_sdc_campaign(args.source):
        # a data-fault campaign: harmful silent corruptions per day, not goodput (it measured no recovery)
        result = fc.sdc_forecast(args.source, model, gpus, per_gpu_day=sdc_rate)
        if getattr(args, "prepare_only", False):
            return 0
        from burnin.core.files import atomic_write

        atomic_write(Path(args.source) / "forecast-sdc.json", json.dumps(result, indent=1).encode())
        print(json.dumps(result, indent=1, allow_nan=False) if args.json else fc.sdc_text(result))
        return 0
    if sdc_rate is not None:
        raise UserError(f"--sdc-per-gpu-day: {oneline(args.source)} is not a data-fault campaign with effect classes; "
                        "the flag forecasts a bit-flip campaign (e.g. `burnin campaign sdc-campaign`)")
    measured = fc.read_source(args.source)
    result = fc.forecast(measured, model, gpus, checkpoint_s=args.checkpoint_seconds, step_s=args.step_seconds,
                         snapshot_s=args.snapshot_seconds)
    if getattr(args, "prepare_only", False):
        return 0
    fp.write_html(out, fp.render_html(result, fp.plot_svg(result)))
    if args.json:
        print(json.dumps({**result, "page": str(out)}, indent=1, allow_nan=False))
    else:
        print(fp.render_text(result))
        print(f"plot and page: {out}")
    return 0


def _cmd_rules(args: argparse.Namespace) -> int:
    from importlib.resources import files

    src = files("burnin.reports") / "prometheus"
    names = ("rules.yml", "rules_test.yml", "dashboard.json")
    if args.dir is None:
        for name in names:
            print(src / name)
        return 0
    dest = Path(args.dir)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            (dest / name).write_bytes((src / name).read_bytes())
            print(dest / name)
    except OSError as exc:
        raise UserError(f"--dir: cannot write into {dest}: {exc.strerror or exc}") from None
    return 0


def _check_pushgateway(url: str | None) -> None:
    if url is None:
        return
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--pushgateway: {url!r} is not an http(s) URL; give one such as http://localhost:9091")


def _cmd_fleet(args: argparse.Namespace) -> int:
    import time
    from types import SimpleNamespace

    from burnin.harness import fleet as fl
    from burnin.harness import preflight

    if args.fleet_command is None:
        raise UserError("fleet: say what to do: `burnin fleet run`, `burnin fleet report DIR` or "
                        "`burnin fleet score DIR`")
    t0 = time.time()

    def say(text: str) -> None:
        if not getattr(args, "quiet", False):
            print(f"[{time.time() - t0:7.1f}s] {text}", file=sys.stderr, flush=True)

    if args.fleet_command == "score":
        fleet_dir = preflight.check_out_dir(args.dir, "DIR", must_exist=True, fix="give a judged fleet directory")
        try:
            fleet = json.loads((fleet_dir / "fleet.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"DIR: {fleet_dir} holds no readable fleet.json; judge it first: "
                            f"`burnin fleet report {fleet_dir}`") from None
        planted = fl.read_sealed(fleet_dir, args.sealed)
        result = fl.score(fleet, planted)
        from burnin.core.files import atomic_write_text

        atomic_write_text(fleet_dir / "score.json", json.dumps(result, indent=1, sort_keys=True))
        print(f"planted {result['planted']} in {result['nodes']} nodes: found {len(result['found'])}, missed "
              f"{len(result['missed'])}, false alarms {len(result['false_alarms'])}")
        for row in result["missed"]:
            print(f"missed {row['node']} ({row['planted']}): {row['verdict']}")
        for row in result["false_alarms"]:
            print(f"false alarm {row['node']}: {row['verdict']} ({'; '.join(row['reasons'])})")
        return 0 if not result["missed"] and not result["false_alarms"] else 1
    _check_pushgateway(args.pushgateway)
    if args.fleet_command == "report":
        _check_history_flag(args.history)
        fleet_dir = preflight.check_out_dir(args.dir, "DIR", must_exist=True, fix="give a fleet directory")
        if not (fleet_dir / "nodes").is_dir() or not any((fleet_dir / "nodes").iterdir()):
            raise UserError(f"DIR: {fleet_dir} is not a fleet directory (no nodes/<name>/ in it); give the --out of "
                            "a `burnin fleet run`")
        fleet = fl.report_fleet(fleet_dir, history=args.history)
        return _fleet_end(args, fleet, say)
    # fleet run: check everything first
    if args.local is not None and not 1 <= args.local <= 64:
        raise UserError(f"--local: {args.local} nodes; give 1 to 64")
    if args.plant and args.local is None:
        raise UserError("--plant: defects are planted in a local fleet only; add --local N")
    if args.drain and args.local is not None:
        raise UserError("--drain: stand-in nodes are no Slurm nodes; drain under srun (drop --local)")
    burn = SimpleNamespace(scenario=args.scenario, duration=args.duration, level=args.level, seed=args.seed,
                           resume=None, out=args.out, history=args.history)
    scenario, duration, seed = _prepare_burn_in(burn)
    if scenario.recovery.mode == "external":
        raise UserError(f"{args.scenario}: recovery.mode external: a fleet burns in burnin's own recovery; use a "
                        "scenario with recovery.mode restart")
    fleet_dir = preflight.check_out_dir(args.out)
    task = fl.slurm_task() if args.local is None else None
    plant = fl.parse_plant(args.plant, args.local) if args.plant else None
    if args.local is not None:
        if (fleet_dir / "nodes").is_dir() and any((fleet_dir / "nodes").iterdir()):
            raise UserError(f"--out: {fleet_dir} holds a fleet already (nodes/ is not empty); give a new directory")
        if args.prepare_only:
            return 0
        fleet = fl.run_local_fleet(args.scenario, scenario, fleet_dir, args.local, duration_s=duration, seed=seed,
                                   plant=plant, history=args.history, say=say)
        return _fleet_end(args, fleet, say)
    node = fl.check_node_name(args.node or (task["node"] if task else __import__("platform").node()))
    if (fleet_dir / "nodes" / node / "started.json").exists():
        raise UserError(f"--out: node {node} burned in in {fleet_dir} already (nodes/{node}); give a new fleet "
                        "directory")
    if args.prepare_only:
        return 0
    if task is not None and task["procid"] == 0:
        from burnin.core.files import atomic_write_text

        fleet_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(fleet_dir / "fleet-run.json", json.dumps(
            {"fleet_id": fleet_dir.name, "scenario": scenario.name, "seed": seed, "duration_s": duration,
             "started_at": time.time(), "mode": "slurm", "job": task["job"], "nodes": task["nnodes"]}, indent=1))
    say(f"node {node}: burning in for {duration:g} s (seed {seed})")
    res = fl.run_node(scenario, fleet_dir, node, duration_s=duration, seed=seed, history=args.history)
    meta = res["meta"]
    print(f"node {node}: " + (f"error: {meta['error']}" if meta.get("error") else
                               f"{'PASS' if meta['ok'] else 'FAIL'} {fleet_dir / 'nodes' / node / meta['run_dir']}"))
    if task is None:
        return 0 if meta.get("ok") else 1
    if task["procid"] != 0:
        return 0  # the node's result is in its directory; rank 0 of the step judges the fleet
    missing = fl.wait_for_nodes(fleet_dir, task["nnodes"], timeout_s=max(600.0, duration), say=say)
    if missing:
        say(f"nodes that did not finish: {', '.join(missing)}")
    fleet = fl.report_fleet(fleet_dir, history=args.history, record=True)
    return _fleet_end(args, fleet, say)


def _fleet_end(args: argparse.Namespace, fleet: dict[str, Any], say: Any) -> int:
    from burnin.harness import fleet as fl

    for name in fleet["ranking"]:
        n = fleet["nodes"][name]
        print(f"node {name}: {n['verdict']}" + (f" ({'; '.join(n['reasons'])})" if n["reasons"] else ""))
    c = fleet["counts"]
    share = fleet["concentration"]["top_k_share"]
    print(f"fleet: {c['healthy']} healthy, {c['degraded']} degraded, {c['faulty']} faulty"
          + (f"; the top node holds {share['1']:.0%} of {fleet['concentration']['findings']} findings"
             if fleet["concentration"]["findings"] else "")
          + (f"; repeat offenders: {', '.join(fleet['repeat_offenders'])}" if fleet["repeat_offenders"] else ""))
    if getattr(args, "drain", False):
        fl.drain(fleet, say)
    if getattr(args, "pushgateway", None):
        try:
            fl.push_nodes(fleet, args.pushgateway)
        except OSError as exc:
            print(f"burnin: warning: push to {args.pushgateway} failed: {exc}", file=sys.stderr)
    print(f"{'PASS' if fleet['ok'] else 'FAIL'} {fleet['fleet_dir']}")
    return 0 if fleet["ok"] else 1


_COMMANDS = {"fleet": _cmd_fleet, "run": _cmd_run, "campaign": _cmd_campaign, "burn-in": _cmd_burn_in, "history": _cmd_history, "compare": _cmd_compare, "triage": _cmd_triage, "bisect": _cmd_bisect, "shrink": _cmd_shrink, "list": _cmd_list, "validate": _cmd_validate, "schema": _cmd_schema,
             "cleanup": _cmd_cleanup, "report": _cmd_report, "check-determinism": _cmd_check_determinism, "rules": _cmd_rules, "doctor": _cmd_doctor, "forecast": _cmd_forecast, "pool": _cmd_pool}


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("terminated by SIGTERM")


def main(argv: list[str] | None = None, *, prepare_only: bool = False) -> int:
    """Run the command line `argv`. With `prepare_only`, `run` and `campaign` check everything they
    need and return 0 (or fail as they would) without starting anything: what tests fuzz."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.prepare_only = prepare_only
    # SIGTERM ends every command as Ctrl-C does: teardown runs, nothing is left behind.
    if not prepare_only:
        signal.signal(signal.SIGTERM, _terminated)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _COMMANDS[args.command](args)
    except UserError as exc:
        # A scenario error already reads `file:line: field: message`, which editors can jump to.
        print(str(exc) if isinstance(exc, ScenarioError) else f"burnin: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"burnin: {exc or 'interrupted'}; partial reports are in the run directory", file=sys.stderr)
        return 130
    except HarnessError as exc:
        print(f"burnin: harness error: {exc}", file=sys.stderr)
        return 1
    except BurninError as exc:
        print(f"burnin: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
