"""torchrun as the launcher beyond one machine: two real torchrun agents ("nodes") with c10d rendezvous.

Each agent starts `python -m burnin.rank SCENARIO --run-dir DIR` for its two ranks; a rank on node 1
SIGKILLs itself at its scheduled step, torchrun restarts the whole group on both nodes, the ranks
resume from the newest checkpoint in the shared run directory, and `burnin report DIR` judges the run
from the nodes' event streams against a golden run. The recipe is docs/torchrun.md's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CI, run_cli

pytestmark = pytest.mark.slow

SCENARIO = """\
name: torchrun-kill
workload: {model: tiny, ranks: 4, steps: 12, threads: 1, kernels: torch}
checkpoint: {every: 4, keep: 3}
timeouts: {collective_s: 30}
faults:
  - {fault: process.kill, rank: 3, step: 6, expect: recovered}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_nodes(scenario: Path, run_dir: Path, endpoint: str, *, wrap: tuple[list[str], list[str]] = ([], []),
                   extra: tuple[list[str], list[str]] = ([], []), rank_args: tuple[list[str], list[str]] = ([], []),
                   timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """Start two torchrun agents (node 0 hosts the c10d rendezvous), wait for both; `wrap` prefixes each
    agent's command (e.g. `ip netns exec NS`), `extra` adds to its torchrun flags, `rank_args` to its ranks'."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    agents = []
    for node in (0, 1):
        cmd = [*wrap[node], sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_dir.name,
               "--max-restarts", "3", "--monitor-interval", "0.1",
               # Both "nodes" are this machine: torchrun would take each for the rendezvous host (the
               # endpoint is local), and the second to bind the port fails. Say which one is.
               "--rdzv-conf", f"is_host={1 if node == 0 else 0}", *extra[node],
               "-m", "burnin.rank", str(scenario), "--run-dir", str(run_dir), *rank_args[node]]
        agents.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    done = []
    try:
        for a in agents:
            out, _ = a.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(a.args, a.returncode, out, ""))
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait()
    return done


def _judge(run_dir: Path) -> dict:
    proc = run_cli("report", str(run_dir), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "recovered" in proc.stdout and "restarted by torchrun" in proc.stdout
    return json.loads((run_dir / "summary.json").read_text())


def test_two_torchrun_nodes_restart_a_killed_rank_and_end_bit_exact(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text(SCENARIO)
    run_dir = tmp_path / "run"
    agents = torchrun_nodes(scenario, run_dir, f"127.0.0.1:{_free_port()}")
    for a in agents:
        assert a.returncode == 0, a.stdout[-4000:]
    s = _judge(run_dir)
    assert s["finished"] and s["exact"] and s["restarts"] == 1
    (f,) = s["faults"]
    assert f["outcome"] == "recovered" and f["cause"] == "killed" and f["rank"] == 3
    rec = f["recovery"]
    assert rec["new_ranks"] == "restarted by torchrun" and rec["resumed_from_step"] == 4
    assert all(rec[k] >= 0 for k in ("detection_s", "teardown_s", "restart_s", "checkpoint_load_s", "first_step_s"))
    assert f["lost_steps"] == 3  # steps 4, 5 and 6 ran again
    # Each node wrote its own ranks' streams; the killed rank is on node 1.
    streams = sorted(p.name for p in (run_dir / "ranks").glob("*.jsonl"))
    assert streams == ["rank0.node0.jsonl", "rank1.node0.jsonl", "rank2.node1.jsonl", "rank3.node1.jsonl"]
    # Judging again changes nothing (the golden run is kept in the run directory).
    assert _judge(run_dir)["faults"] == s["faults"]


def test_the_rank_entry_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text(SCENARIO.replace("process.kill, rank: 3, step: 6",
                                         "network.partition, rank: 1, step: 6"))
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = subprocess.run([sys.executable, "-m", "burnin.rank", str(scenario), "--run-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "needs the burnin supervisor" in proc.stderr, proc.stderr
    env["WORLD_SIZE"] = "2"
    proc = subprocess.run([sys.executable, "-m", "burnin.rank", str(scenario), "--run-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "torchrun started 2 ranks" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "burnin.rank", str(scenario), "--run-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "RANK"},
                          timeout=60)
    assert proc.returncode == 2 and "start this module with torchrun" in proc.stderr, proc.stderr
    scenario.write_text(SCENARIO.replace("process.kill, rank: 3, step: 6", "network.link_down, rank: 1, step: 6"))
    env["WORLD_SIZE"] = "4"
    proc = subprocess.run([sys.executable, "-m", "burnin.rank", str(scenario), "--run-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "name it with --node-interface NAME" in proc.stderr, proc.stderr
    for bad in ("../../etc", "no-such-nic0"):
        proc = subprocess.run([sys.executable, "-m", "burnin.rank", str(scenario), "--run-dir", str(tmp_path / "r"),
                               "--node-interface", bad], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 2 and "--node-interface: no interface" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()
    assert "Traceback" not in proc.stderr


NIC_SCENARIO = """\
name: torchrun-nic
workload: {model: tiny, ranks: 4, steps: 12, threads: 1, kernels: torch}
checkpoint: {every: 4, keep: 3}
timeouts: {collective_s: 4}
faults:
  - {fault: network.link_down, rank: 2, step: 6, params: {duration_s: 8}, expect: recovered}
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def test_a_node_cut_off_by_its_nic_is_restarted_by_torchrun(tmp_path: Path) -> None:
    """Each "node" in its own network namespace, joined by a veth pair: a rank of node 1 takes its node's
    interface down for longer than a collective may wait; the group fails, torchrun re-forms it once the
    link is back, and the run still ends bit-exact."""
    if os.geteuid() != 0:
        if CI:
            pytest.fail("needs root for network namespaces (BURNIN_CI=1)")
        pytest.skip("needs root for network namespaces")
    tag = f"{os.getpid() % 100000}"
    ns, dev = [f"burnin-tr{tag}-{n}" for n in "ab"], [f"btr{tag}{n}" for n in "ab"]
    net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    addr = [f"{net}.1", f"{net}.2"]
    try:
        for n in ns:
            _ip("netns", "add", n)
        _ip("link", "add", dev[0], "type", "veth", "peer", "name", dev[1])
        for i in (0, 1):
            _ip("link", "set", dev[i], "netns", ns[i])
            _ip("-n", ns[i], "addr", "add", f"{addr[i]}/24", "dev", dev[i])
            _ip("-n", ns[i], "link", "set", "lo", "up")
            _ip("-n", ns[i], "link", "set", dev[i], "up")
        scenario = tmp_path / "s.yaml"
        scenario.write_text(NIC_SCENARIO)
        run_dir = tmp_path / "run"
        wrap = [["ip", "netns", "exec", ns[i]] for i in (0, 1)]
        agents = torchrun_nodes(scenario, run_dir, f"{addr[0]}:29500", wrap=(wrap[0], wrap[1]),
                                extra=(["--local-addr", addr[0]], ["--local-addr", addr[1]]),
                                rank_args=(["--node-interface", dev[0]], ["--node-interface", dev[1]]))
        for a in agents:
            assert a.returncode == 0, a.stdout[-4000:]
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)
    s = _judge(run_dir)
    assert s["finished"] and s["exact"] and s["restarts"] >= 1
    (f,) = s["faults"]
    assert f["outcome"] == "recovered" and f["cause"] in ("network", "timeout", "hang")
    assert f["details"]["interface"] == dev[1] and f["details"]["scope"] == "node"

