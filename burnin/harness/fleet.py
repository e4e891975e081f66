"""A fleet burn-in: one burn-in per node, all at once, then one verdict for the fleet (`burnin.reports.fleet`).

Three ways to run one:

- **Under Slurm**: `srun -N 8 burnin fleet run SCENARIO --out DIR` (DIR on storage every node sees). Each task
  burns in its own node (`SLURMD_NODENAME`) into `DIR/nodes/<node>/`; the task of rank 0 then waits for every
  node of the step (`SLURM_NNODES`), judges the fleet, and with `--drain` takes the faulty nodes out of
  scheduling (`scontrol update NodeName=X State=DRAIN Reason="burnin: ..."`).
- **By hand on each node** (pdsh, a cron job): `burnin fleet run SCENARIO --node NAME --out DIR`, then
  `burnin fleet report DIR` once every node is done.
- **Locally**, for tests and demos: `burnin fleet run [SCENARIO] --local N --out DIR` runs N stand-in nodes on
  this host, each a process group of its own with its own node name (`node-1` ...) and, where cgroups can be
  made (root), a CPU cgroup of its own with equal weight (its share of the host, as a node has its own
  CPUs). `--plant FILE` makes some of them defective from outside their burn-ins: a CPU limit or a CPU hog in
  a node's cgroup (a slow node), a simulated silent defect in its ranks' environment
  (`burnin.faults.defect`). What was planted goes to `DIR/sealed/planted.json`, which the verdict never
  reads; `burnin fleet score DIR` scores the verdict against it afterwards (found, missed, false alarm).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from prometheus_client import push_to_gateway

from burnin.core import cgroups
from burnin.core.files import atomic_write_text
from burnin.errors import UserError
from burnin.faults import defect
from burnin.harness.burn_in import run_burn_in
from burnin.reports import fleet as fleet_report
from burnin.reports import history as hist

__all__ = ["run_node", "run_local_fleet", "report_fleet", "wait_for_nodes", "drain", "score", "parse_plant",
           "node_class", "slurm_task"]

#: A node name: what Slurm and a directory both accept.
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_node_name(name: str, flag: str = "--node") -> str:
    if not name or len(name) > 64 or not set(name) <= _NAME_OK or name.startswith("."):
        raise UserError(f"{flag}: {name!r} is not a node name; use letters, digits, '-', '_' and '.' (64 at most)")
    return name


def slurm_task() -> dict[str, Any] | None:
    """This process's place in a Slurm step (srun), or None outside one."""
    env = os.environ
    if "SLURM_PROCID" not in env or "SLURM_JOB_ID" not in env:
        return None
    try:
        return {"procid": int(env["SLURM_PROCID"]), "nnodes": int(env.get("SLURM_NNODES") or env.get("SLURM_NTASKS", "1")),
                "node": env.get("SLURMD_NODENAME") or platform.node(), "job": env["SLURM_JOB_ID"]}
    except ValueError:
        return None


def node_class(scenario: Any, seed: int) -> dict[str, Any]:
    """What must be the same for two nodes' per-step fingerprints to be comparable: the hardware (CPU model,
    GPU model), the software (torch), the job (scenario and seed)."""
    import torch  # lazy: torch

    gpu = None
    if scenario.workload.device != "cpu" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {"cpu": hist.cpu_model(), "gpu": gpu, "torch": torch.__version__, "scenario": scenario.name,
            "seed": seed, "config": _config_hash(scenario)}


def _config_hash(scenario: Any) -> str:
    return hashlib.sha256(scenario.model_dump_json().encode()).hexdigest()[:16]


# -- one node ----------------------------------------------------------------------------------------

def run_node(scenario: Any, fleet_dir: Path, node: str, *, duration_s: float, seed: int,
             on_event: Callable[[dict[str, Any]], None] | None = None, history: str | None = None) -> dict[str, Any]:
    """Burn in this node into `fleet_dir/nodes/<node>/`; writes its node.json (also when the burn-in breaks)."""
    # A node's processes are its own: ranks forked by a shared pool server (BURNIN_POOL) would live outside
    # whatever the node is (its machine, its cgroup) and be judged as the node's all the same.
    os.environ.pop("BURNIN_POOL", None)
    node_dir = fleet_dir / "nodes" / node
    try:
        node_dir.mkdir(parents=True)  # atomic: of two tasks on one node, one goes on
    except FileExistsError:
        raise UserError(f"--out: node {node} burned in in {fleet_dir} already (two tasks on one node? run one per "
                        "node: srun --ntasks-per-node 1); give a new fleet directory") from None
    started = time.time()
    meta: dict[str, Any] = {"node": node, "class": node_class(scenario, seed), "started_at": started,
                            "host": platform.node(), "pid": os.getpid()}
    atomic_write_text(node_dir / "started.json", json.dumps(meta, indent=1))
    summary = None
    try:
        summary = run_burn_in(scenario, node_dir, duration_s=duration_s, seed=seed, on_event=on_event,
                              history=history)
        meta.update(run_dir=Path(summary["run_dir"]).name, ok=summary["ok"])
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 -- the node's result says what broke; the fleet goes on
        meta["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    meta["ended_at"] = time.time()
    atomic_write_text(node_dir / "node.json", json.dumps(meta, indent=1))
    return {"meta": meta, "summary": summary}


def wait_for_nodes(fleet_dir: Path, count: int, timeout_s: float, say: Callable[[str], None] | None = None) -> list[str]:
    """Wait (bounded) until `count` nodes have a node.json; returns those still missing (started, unfinished)."""
    deadline = time.monotonic() + timeout_s
    last_said = 0.0
    while True:
        nodes = [p for p in (fleet_dir / "nodes").iterdir() if p.is_dir()] if (fleet_dir / "nodes").is_dir() else []
        done = [p.name for p in nodes if (p / "node.json").is_file()]
        if len(done) >= count or time.monotonic() >= deadline:
            return sorted(p.name for p in nodes if p.name not in done)
        if say and time.monotonic() - last_said >= 30:
            last_said = time.monotonic()
            say(f"waiting for the nodes: {len(done)} of {count} done")
        time.sleep(1.0)


# -- the report ----------------------------------------------------------------------------------------

def report_fleet(fleet_dir: Path, *, history: str | None = None, record: bool = False,
                 thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Judge the fleet in `fleet_dir` and write its reports; `record`: add it to the history (a fleet run does,
    a re-judgement does not)."""
    path = hist.history_path(history)
    names = sorted(p.name for p in (fleet_dir / "nodes").iterdir() if p.is_dir()) if (fleet_dir / "nodes").is_dir() else []
    fleet_id = (fleet_report.fleet_meta(fleet_dir).get("fleet_id") or fleet_dir.name)
    record_of = hist.node_record(path, names, exclude=fleet_id) if names else {}
    fleet = fleet_report.judge_fleet(fleet_dir, thresholds, history=record_of)
    fleet_report.write_fleet_reports(fleet, fleet_dir)
    if record:
        hist.record_fleet(fleet, path)
    return fleet


def push_nodes(fleet: dict[str, Any], gateway: str, timeout: float = 10.0) -> None:
    """Push each node's health to a Pushgateway, one group per node: {job="burnin", fleet, node}."""
    for name in sorted(fleet["nodes"]):
        push_to_gateway(gateway, job="burnin", registry=fleet_report.node_metrics(fleet, only=name),
                        grouping_key={"fleet": fleet["fleet_id"], "node": name}, timeout=timeout)


def drain(fleet: dict[str, Any], say: Callable[[str], None]) -> list[str]:
    """Take every faulty node out of scheduling with its first reason (`scontrol update ... State=DRAIN`);
    returns the nodes drained. A node scontrol refuses is a warning, not an error."""
    drained = []
    for name in fleet["ranking"]:
        n = fleet["nodes"][name]
        if n["verdict"] != "faulty":
            continue
        reason = "burnin: " + (n["reasons"][0] if n["reasons"] else "faulty")
        reason = " ".join(reason.replace('"', "'").split())[:120]
        try:
            proc = subprocess.run(["scontrol", "update", f"NodeName={name}", "State=DRAIN", f"Reason={reason}"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            say(f"warning: could not drain {name}: {exc}")
            continue
        if proc.returncode != 0:
            say(f"warning: could not drain {name}: {' '.join((proc.stderr or proc.stdout).split())[:200]}")
            continue
        drained.append(name)
        say(f"drained {name}: {reason}")
    return drained


# -- planted defects and the score -------------------------------------------------------------------

def parse_plant(path: str, n_nodes: int) -> dict[str, dict[str, Any]]:
    """A plant file: YAML, node name -> {slow: {cpu_fraction: F} | {hogs: N}, silent: "every=N,bit=B,rank=R"}."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"--plant: cannot read {path} ({exc.strerror or exc}); give a YAML file of defects") from None
    except yaml.YAMLError as exc:
        raise UserError(f"--plant: {path} is not YAML ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"--plant: {path}: expected a mapping of node names to defects, e.g. "
                        "`node-2: {slow: {cpu_fraction: 0.8}}`")
    names = {f"node-{k}" for k in range(1, n_nodes + 1)}
    out = {}
    for node, spec in data.items():
        where = f"--plant: {path}: {node}"
        if node not in names:
            raise UserError(f"{where}: no such node in a local fleet of {n_nodes} (node-1 .. node-{n_nodes})")
        if not isinstance(spec, dict) or not spec or set(spec) - {"slow", "silent"}:
            raise UserError(f"{where}: expected `slow:` and/or `silent:`")
        if "slow" in spec:
            slow = spec["slow"]
            ok = isinstance(slow, dict) and len(slow) == 1 and (
                (_number(slow.get("cpu_fraction")) and 0.05 <= slow["cpu_fraction"] < 1)
                or (isinstance(slow.get("hogs"), int) and not isinstance(slow["hogs"], bool) and 1 <= slow["hogs"] <= 64))
            if not ok:
                raise UserError(f"{where}.slow: expected {{cpu_fraction: F}} (0.05 to under 1: that share of a node's "
                                "CPU quota) or {hogs: N} (1..64 CPU hogs in the node's cgroup)")
            why = cgroups.available()
            if why:
                raise UserError(f"{where}.slow: a slow node needs a CPU cgroup of its own, and {why}")
        if "silent" in spec:
            try:
                defect.parse(str(spec["silent"]))
            except ValueError as exc:
                raise UserError(f"{where}.silent: {exc}") from None
        out[node] = spec
    return out


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def node_quota(n: int) -> float:
    """A stand-in node's CPUs: three quarters of the host's shared out (the rest for the supervisors' polling
    and whatever else runs here), at least a tenth of a CPU."""
    return max(0.1, 0.75 * (os.cpu_count() or 1) / n)


def score(fleet: dict[str, Any], planted: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The verdict against what was planted: a planted node found (not healthy; a silent defect found only as
    an SDC suspect or a failed recovery: faulty), missed, and false alarms (a node nothing was planted in that
    is not healthy)."""
    found, missed, false_alarms = [], [], []
    for name, n in sorted(fleet["nodes"].items()):
        spec = planted.get(name)
        if spec is None:
            if n["verdict"] != "healthy":
                false_alarms.append({"node": name, "verdict": n["verdict"], "reasons": n["reasons"]})
            continue
        hit = n["verdict"] == "faulty" if "silent" in spec else n["verdict"] != "healthy"
        (found if hit else missed).append({"node": name, "planted": spec, "verdict": n["verdict"],
                                           "reasons": n["reasons"]})
    return {"found": found, "missed": missed, "false_alarms": false_alarms,
            "planted": len(planted), "nodes": len(fleet["nodes"])}


# -- a local fleet -----------------------------------------------------------------------------------

def run_local_fleet(scenario_arg: str, scenario: Any, fleet_dir: Path, n: int, *, duration_s: float, seed: int,
                    plant: dict[str, dict[str, Any]] | None = None, history: str | None = None,
                    say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """N stand-in nodes on this host (see the module's docstring); returns the fleet's verdict."""
    plant = plant or {}
    fleet_id = fleet_dir.name
    names = [f"node-{k}" for k in range(1, n + 1)]
    fleet_dir.mkdir(parents=True, exist_ok=True)
    (fleet_dir / "logs").mkdir(exist_ok=True)
    atomic_write_text(fleet_dir / "fleet-run.json", json.dumps(
        {"fleet_id": fleet_id, "scenario": scenario.name, "seed": seed, "duration_s": duration_s,
         "started_at": time.time(), "mode": "local", "nodes": names}, indent=1))
    if plant:
        (fleet_dir / "sealed").mkdir(exist_ok=True)
        atomic_write_text(fleet_dir / "sealed" / "planted.json", json.dumps(plant, indent=1, sort_keys=True))
    why_not = cgroups.available()
    if why_not is None:
        cgroups.sweep()  # what an earlier launcher, killed before its teardown, left
    quota = node_quota(n)
    if why_not:
        say(f"no CPU cgroup per node ({why_not}): the nodes share the host's CPUs as plain processes")
    else:
        say(f"each node gets {quota:.2f} CPU of its own (a cgroup: quota and weight)")
    groups: dict[str, Any] = {}
    procs: dict[str, subprocess.Popen] = {}
    hogs: list[subprocess.Popen] = []
    logs = []
    try:
        for name in names:
            spec = plant.get(name, {})
            group = None
            if why_not is None:
                # its own CPUs: a quota, and a weight that puts it ahead of other work on the host
                group = groups[name] = cgroups.CpuGroup(f"{fleet_id}-{name}", weight=1000)
                group.limit(quota * float(spec.get("slow", {}).get("cpu_fraction", 1.0)))
            env = {k: v for k, v in os.environ.items() if k not in ("BURNIN_SIMULATED_DEFECT", "BURNIN_POOL")}
            if "silent" in spec:
                env["BURNIN_SIMULATED_DEFECT"] = str(spec["silent"])
            cmd = [sys.executable, "-m", "burnin", "fleet", "run", scenario_arg, "--node", name, "--out",
                   str(fleet_dir), "--duration", f"{duration_s:g}", "--seed", str(seed), "--quiet"]
            if history is not None:
                cmd += ["--history", history]
            log = open(fleet_dir / "logs" / f"{name}.log", "w")
            logs.append(log)
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True,
                                           preexec_fn=(lambda g=group: g.add(os.getpid())) if group else None)
            if "slow" in spec and "hogs" in spec["slow"]:
                for _ in range(int(spec["slow"]["hogs"])):  # a CPU hog beside the node's ranks, in its cgroup
                    hogs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True,
                                                 preexec_fn=lambda g=group: g.add(os.getpid())))
        say(f"{n} nodes burning in for {duration_s:g} s (seed {seed}): {', '.join(names)}; logs in "
            f"{fleet_dir / 'logs'}")
        t0 = time.monotonic()
        deadline = t0 + duration_s + max(300.0, duration_s)
        last = t0
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            if time.monotonic() - last >= 10:
                last = time.monotonic()
                running = sum(p.poll() is None for p in procs.values())
                elapsed = time.monotonic() - t0
                say(f"elapsed {elapsed:.0f}/{duration_s:g} s, {running} of {n} node(s) running" if elapsed < duration_s
                    else f"elapsed {elapsed:.0f} s: {running} of {n} node(s) replaying their fault windows")
        for name, p in procs.items():
            if p.poll() is None:
                say(f"{name}: still running past its time; stopped")
    finally:
        _stop_all([*procs.values(), *hogs], list(groups.values()))
        for log in logs:
            log.close()
    for name, p in procs.items():
        if p.returncode not in (0, 1):
            tail = (fleet_dir / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
            say(f"{name}: its burn-in exited with status {p.returncode}" + (f": {tail[0]}" if tail else ""))
    return report_fleet(fleet_dir, history=history, record=True)


def _stop_all(procs: list[subprocess.Popen], groups: list[Any], grace_s: float = 20.0) -> None:
    """End every node: SIGINT to each process group at once (a burn-in ends cleanly on it, its ranks with
    it), a shared grace period, then SIGKILL to what is left: the process groups, and everything in the
    nodes' cgroups (ranks live in sessions of their own); then the cgroups go."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
    for g in groups:
        g.kill()
        g.close()


def read_sealed(fleet_dir: Path, sealed: str | None) -> dict[str, dict[str, Any]]:
    path = Path(sealed) if sealed else fleet_dir / "sealed" / "planted.json"
    try:
        data = json.loads(path.read_text())
    except OSError:
        raise UserError(f"--sealed: no planted defects at {path}; give the sealed file a local fleet with --plant "
                        "wrote, or one you wrote for your own") from None
    except ValueError as exc:
        raise UserError(f"--sealed: {path} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"--sealed: {path}: expected a mapping of node names to what was planted")
    return data
