"""The rank worker: one process of the data-parallel group, training step by step.

Started by the supervisor with a torchrun-compatible environment: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, plus BURNIN_SPEC (the resolved run spec, JSON).
It resumes from the newest valid checkpoint, trains, calls the injector at named step points, and
writes every event to its own stream. The loop reads top to bottom, nanoGPT style.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import runpy
import select
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

from burnin.core.events import EventWriter
from burnin.core.procs import set_parent_death_signal
from burnin.errors import UserError
from burnin.faults import defect, registry
from burnin.kernels import _runtime
from burnin.rank.campaign_worker import run_trials
from burnin.rank.session import RunContext, Session, _set_current

__all__ = ["main", "run_rank", "run_entry", "train"]


def _heartbeat(path: Path, period_s: float) -> None:
    """Touch `path` every period from a daemon thread: stops when the process is stopped or dead."""
    path.touch()

    def beat() -> None:
        while True:
            os.utime(path)
            time.sleep(period_s)

    threading.Thread(target=beat, name="burnin-heartbeat", daemon=True).start()


def train(spec: dict[str, Any], ctx: Any) -> Any:
    """Train burnin's own workload to the last step (or run a campaign's trials), through the public
    rank API (`burnin.rank.session`) as a user's loop would. Returns the DDP module, which must not be
    freed before the process exits: freeing DDP's reducer joins a gloo thread that can wait forever
    for the GIL (seen at exit in benchmark runs), so `main` holds it until `os._exit`."""
    import torch  # lazy: torch; `import burnin.rank` stays torch-free
    import torch.distributed as dist  # lazy: torch; `import burnin.rank` stays torch-free
    from torch.nn.parallel import DistributedDataParallel as DDP  # lazy: torch; `import burnin.rank` stays torch-free

    from burnin.rank.workload import GPT, MarkovData, gpt_config, make_optimizer  # lazy: torch

    sc = spec["scenario"]
    w, to = sc["workload"], sc["timeouts"]
    rank, world_size = ctx.rank, ctx.world_size

    # -- Triton kernels run compiled on CUDA, interpreted on CPU; the mode is fixed when triton is
    # first imported, and use_deterministic_algorithms imports it: choose before.
    _runtime.prepare(w["device"])

    # -- determinism: pinned threads, deterministic kernels (measured: the thread count changes the bits)
    torch.set_num_threads(w["threads"])
    # (~1.2 s of a rank's start is torch._dynamo, imported by this call and by AdamW alike in torch 2.13)
    torch.use_deterministic_algorithms(True)

    # -- device and process group
    device_kind = w["device"]
    if device_kind == "auto":
        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    if device_kind == "cuda":
        ngpu = torch.cuda.device_count()
        if ngpu == 0:
            raise RuntimeError("workload.device is cuda but this machine has no CUDA device")
        # One GPU per rank: NCCL. Ranks sharing a GPU: NCCL refuses, gloo carries CUDA tensors.
        own_gpu = ngpu >= world_size
        device = torch.device("cuda", rank % ngpu)
        torch.cuda.set_device(device)
        backend = "nccl" if own_gpu else "gloo"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if rank != 0:
        _wait_for_store(to["connect_s"])
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=to["collective_s"]))
    ctx.announce_pg(device)

    # -- model, optimizer, data (identical init on every rank: seed before building)
    cfg = gpt_config(w["model"], w["seq_len"], w["dropout"], w["kernels"])
    torch.manual_seed(w["seed"])
    model = GPT(cfg).to(device)
    if w.get("parallel"):  # FSDP2 (HSDP with replicas) on a device mesh: each rank holds its shards
        from burnin.rank.sharding import shard_model  # lazy: torch; `import burnin.rank` stays torch-free

        shard_model(model, w["parallel"], world_size, device.type)
        ddp = model
    optimizer = make_optimizer(model, w["lr"], w["weight_decay"])
    data = MarkovData(w["seed"], cfg.vocab_size)
    # The ranks of a tensor-parallel group compute one replica together: one batch, one set of dropout
    # masks (their activations outside the split layers are the same tensor on each).
    tp = (w.get("parallel") or {}).get("tp", 1)
    data_rank = rank // tp
    # Each data-parallel rank draws its own dropout masks, as real data-parallel training does (a resume
    # puts back the saved RNG over this).
    torch.manual_seed(w["seed"] * 1_000_003 + 1 + data_rank)
    if not w.get("parallel"):
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ctx.extra["resumed"] = {"loss_floor": data.entropy_rate}
    # held-out data: steps -1, -2, ... of the same language, never trained on (training steps count from 0)
    held_out = [data.batch(-1 - k, 0, w["batch_size"], w["seq_len"], device) for k in range(w["eval_batches"])]

    def evaluate() -> Any:
        model.eval()  # no dropout; the inner module: no DDP hooks (a sharded model's collectives run on every rank)
        try:
            return torch.stack([model(x, y)[1] for x, y in held_out]).mean()
        finally:
            model.train()

    session = Session(ddp, optimizer, state={}, save=None, load=None, ddp_hook=True, ctx=ctx,
                      evaluate=evaluate if held_out else None)
    defect.install(model, rank, step_of=lambda: session.step)  # a simulated silent defect, where this node's
    # environment plants one

    def one_step(step: int) -> Any:
        # session.data_offset: a campaign's seed-spread windows train the same steps on other batches
        x, y = data.batch(step + session.data_offset, data_rank, w["batch_size"], w["seq_len"], device)
        _, loss = ddp(x, y)                    # before_forward: the forward pre-hook
        optimizer.zero_grad(set_to_none=True)
        loss.backward()                        # after_backward: the comm hook, on each local bucket
        optimizer.step()                       # after_allreduce and after_optimizer_step: the optimizer's hooks
        return loss

    if "campaign" in spec:
        from burnin.rank.state import state_hash  # lazy: torch; `import burnin.rank` stays torch-free

        session.resume()
        run_trials(spec["campaign"], session, lambda step: session.run_step(step, one_step), sc, rank, world_size,
                   ctx.events)
        ctx.events.emit("rank_finished", final_step=None, state_hash=state_hash(model, optimizer))
        dist.destroy_process_group()
        return ddp

    for step in session.steps():
        session.step_done(one_step(step))
    dist.destroy_process_group()
    return ddp


def run_entry(workload: dict[str, Any]) -> Any:
    """Run the loop a scenario names (`workload.entry`): a script, run as `python SCRIPT ARGS...` would
    run it (as `__main__`, its directory first on sys.path), or `module:function`, called with no
    arguments after `sys.argv` is set to the module name and the args. Returns what the function
    returned (a script: its globals), so nothing the loop built is freed before the process exits."""

    import torch  # lazy: torch; `import burnin.rank` stays torch-free

    entry, args = workload["entry"], list(workload.get("args") or [])
    # A spare was warmed up by burnin's own workload: put back what a fresh process would have.
    torch.use_deterministic_algorithms(False)
    if entry.endswith(".py"):
        sys.argv = [entry, *args]
        sys.path.insert(0, str(Path(entry).parent))
        return runpy.run_path(entry, run_name="__main__")
    module, _, func = entry.partition(":")
    sys.argv = [module, *args]
    return getattr(importlib.import_module(module), func)()


def _wait_for_store(limit_s: float) -> None:
    """Wait until rank 0's rendezvous store accepts connections. A client that finds the port closed
    backs off for about half a second before it tries again; warm spares reach this point within a
    few ms of each other, and a rank that came a moment before rank 0 lost that half second (seen in
    benchmarks/recovery.py as a bimodal restart time). Bounded: init_process_group has its own say after."""
    addr = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(addr, timeout=1.0):
                return
        except OSError:
            time.sleep(0.005)


def warm_up(device: str, threads: int, kernels: str, sharded: bool = False) -> None:
    """Pay, ahead of need, every import and first-call cost a rank pays before its first step: torch,
    determinism (which imports torch._dynamo), the first AdamW step (the rest of dynamo), torch.distributed
    and DDP (with `sharded`, FSDP2, DTensor and DCP too), the workload, the fault registry, and the Triton
    kernel in the loss (interpreter or compiler).
    Touches no RNG and no state that a run's bits depend on: a spare must train exactly as a new process."""
    _runtime.prepare(device)
    import torch  # lazy: torch; `import burnin.rank` stays torch-free
    import torch.distributed  # noqa: F401  # lazy: torch, preloaded by a spare
    from torch.nn.parallel import DistributedDataParallel  # noqa: F401  # lazy: torch, preloaded by a spare

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    from burnin.rank import state  # noqa: F401  # lazy: torch, preloaded by a spare
    from burnin.rank.workload import make_optimizer  # lazy: torch; `import burnin.rank` stays torch-free

    registry.all_faults()
    if sharded:  # FSDP2, DTensor, the device mesh, DCP: ~0.8 s of CPU a sharded rank would pay at its start
        import torch.distributed.checkpoint  # noqa: F401  # lazy: torch, preloaded by a spare
        from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: F401  # lazy: torch, preloaded by a spare
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401  # lazy: torch, preloaded by a spare
        from torch.distributed.fsdp import fully_shard  # noqa: F401  # lazy: torch, preloaded by a spare
        from torch.distributed.tensor import DTensor  # noqa: F401  # lazy: torch, preloaded by a spare

        from burnin.rank import sharding  # noqa: F401  # lazy: torch, preloaded by a spare
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda" if cuda else "cpu")
    layer = torch.nn.Linear(2, 2, bias=True).to(dev)
    opt = make_optimizer(layer, 1e-3, 0.1)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    if kernels == "triton":
        from burnin.kernels import reduction  # lazy: torch; `import burnin.rank` stays torch-free

        reduction.cross_entropy(torch.zeros(4, 8, device=dev), torch.zeros(4, dtype=torch.long, device=dev))


def _await_assignment() -> dict[str, Any] | None:
    """Block until the supervisor hands this spare a rank: one line on stdin, the path of the assignment
    (JSON: the rank's environment). Read byte by byte: later lines on stdin ("go") are the injector's.
    None at end of input (the pool was closed)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            return None
        line += byte
    return json.loads(Path(line.decode().strip()).read_text())


def _zygote(argv: list[str]) -> float | None:
    """The warm parent of a slot's spares (see burnin.harness.spares): warm up once, then fork a spare
    for each line on stdin (JSON: its FIFO, pid file, ready file and log). Returns in a forked spare,
    with the seconds the zygote's warm-up took, once the spare is the supervisor's child; the zygote
    itself exits at the end of its input (the pool was closed)."""
    device, threads, kernels = argv[argv.index("--zygote") + 1:argv.index("--zygote") + 4]
    t0 = time.time()
    warm_up(device, int(threads), kernels, sharded="sharded" in argv[argv.index("--zygote") + 4:])
    warm_s = time.time() - t0
    ready = os.environ.get("BURNIN_SPARE_READY")
    if ready:  # the pool counts ready zygotes by these files
        Path(ready).write_text(f"{warm_s:.3f}\n")
    supervisor = int(os.environ["BURNIN_SUPERVISOR_PID"])
    for line in sys.stdin.buffer:
        cmd = json.loads(line)
        middle = os.fork()
        if middle == 0:
            try:
                spare = os.fork()
            except OSError:
                os._exit(1)
            if spare:
                if cmd.get("report"):  # a pool server learns the pid of each fork it asked for
                    os.write(1, (json.dumps({"pid": spare, "tag": cmd["tag"]}) + "\n").encode())
                os._exit(0)  # the middle process: its exit hands the spare to the supervisor (or server)
            try:
                _become_spare(cmd, int(cmd.get("parent", supervisor)))
            except BaseException:  # noqa: BLE001 -- a spare that cannot start says why in the slot's log
                traceback.print_exc()
                os._exit(3)
            _prime(cmd.get("prime"))
            return warm_s
        os.waitpid(middle, 0)
    return None


def _prime(spec: dict[str, Any] | None) -> None:
    """A spare of a sharded run, while it waits: pay the first sharded optimizer step's one-time cost now
    (`sharding.prime`), unless an assignment is already waiting (then the rank comes first). A priming
    that fails only costs that time back later; the slot's log says why."""
    if not spec or select.select([0], [], [], 0)[0]:
        return
    try:
        from burnin.rank.sharding import prime  # lazy: torch; `import burnin.rank` stays torch-free

        prime(spec)
    except Exception as exc:  # noqa: BLE001 -- an optimisation: the spare still works unprimed
        print(f"spare {os.getpid()}: not primed: {type(exc).__name__}: {exc}", flush=True)


def _become_spare(cmd: dict[str, Any], parent: int) -> None:
    """In the zygote's grandchild: lead a process group, say the pid, wait to be the child of `parent` (the
    supervisor, or `burnin pool serve`: a subreaper), take its parent-death signal, read the FIFO as
    stdin, write to the slot's log. Forked by a pool server for a run, first become that run's process:
    its environment (with its run id where /proc shows it) and its working directory."""
    os.setsid()
    if "env" in cmd:
        _join_run(cmd["env"], cmd["cwd"])
    tmp = cmd["pid_file"] + ".tmp"
    Path(tmp).write_text(f"{os.getpid()}\n")
    os.replace(tmp, cmd["pid_file"])
    deadline = time.monotonic() + 10.0
    while os.getppid() != parent and time.monotonic() < deadline:
        time.sleep(0.001)
    if os.getppid() != parent:
        os._exit(3)  # the parent is gone, or is not a subreaper: no one would ever reap this rank
    set_parent_death_signal(parent)
    fd = os.open(cmd["fifo"], os.O_RDONLY)  # the supervisor holds the FIFO open: never blocks
    os.dup2(fd, 0)
    os.close(fd)
    log = os.open(cmd["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for out in (1, 2):
        os.dup2(log, out)
    os.close(log)
    Path(cmd["ready"]).write_text("ready\n")


def _join_run(env: dict[str, str], cwd: str) -> None:
    """A spare of a shared zygote (`burnin pool serve`) becomes a process of the run it was forked for:
    the run's environment replaces the zygote's (the variables read at import time are the same: that
    is the pool's key), the run's directory is its own, and the run id is written where /proc shows it."""
    zygote_cwd = os.getcwd()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if sys.path and sys.path[0] == zygote_cwd:  # `python -m` put the zygote's directory first
        sys.path[0] = cwd
    _stamp_environ("BURNIN_RUN_ID", env.get("BURNIN_RUN_ID", ""))


def _stamp_environ(name: str, value: str) -> bool:
    """Write `value` over the placeholder of `name` in this process's initial environment block, in place:
    the block is what the kernel shows as /proc/PID/environ, which `burnin cleanup` and leak checks read
    (os.environ changes only the interpreter's copy). The zygote was started with room for it. False
    where there is no placeholder, or no room."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end: fields 50 and 51 of stat
    except (OSError, IndexError, ValueError):
        return False
    block = ctypes.string_at(start, end - start)
    marker = name.encode() + b"="
    at = 0 if block.startswith(marker) else block.find(b"\0" + marker) + 1
    if at <= 0 and not block.startswith(marker):
        return False
    begin = at + len(marker)
    stop = block.find(b"\0", begin)
    stop = len(block) if stop < 0 else stop
    data = value.encode()
    if len(data) > stop - begin:
        return False
    ctypes.memmove(start + begin, data + b"\0" * (stop - begin - len(data)), stop - begin)
    return True


def _spare(argv: list[str]) -> float | None:
    """A warm spare: forked from the slot's warm zygote, it waits for an assignment and becomes the
    assigned rank. Returns the seconds the zygote's warm-up took, None when the pool closed first."""
    warm_s = _zygote(argv)
    if warm_s is None:
        return None
    assignment = _await_assignment()
    if assignment is None:
        return None
    os.environ.update(assignment["env"])
    # From here on, this process is the rank: its output goes where a new rank's would.
    log = os.open(assignment["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for fd in (1, 2):
        os.dup2(log, fd)
    os.close(log)
    return warm_s


def main(argv: list[str] | None = None) -> int:
    set_parent_death_signal()
    argv = sys.argv[1:] if argv is None else argv
    warm_s = None
    if "--zygote" in argv:
        warm_s = _spare(argv)
        if warm_s is None:
            os._exit(0)
    spec = json.loads(Path(os.environ["BURNIN_SPEC"]).read_text())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    rank_dir = Path(spec["run_dir"]) / "ranks"
    events = EventWriter(rank_dir / f"rank{rank}.jsonl", rank=rank, attempt=spec["attempt"],
                         rotate_bytes=spec.get("rotate_bytes", 0))
    _heartbeat(rank_dir / f"rank{rank}.heartbeat", spec["heartbeat_period_s"])
    events.emit("rank_started", pid=os.getpid(), spare=warm_s is not None,
                **({"warm_s": warm_s} if warm_s is not None else {}))
    run_rank(spec, RunContext(spec, rank, world_size, events))


def run_rank(spec: dict[str, Any], ctx: Any) -> None:
    """Be rank `ctx.rank` of the run until the end: burnin's workload, or the scenario's own entry
    (`workload.entry`). Never returns: the process ends with os._exit (0 once the rank finished)."""
    _set_current(ctx)
    try:
        if spec["scenario"]["workload"].get("entry"):
            keep = run_entry(spec["scenario"]["workload"])  # noqa: F841 -- freed only by os._exit
            if not ctx.finished:
                raise UserError(f"{spec['scenario']['workload']['entry']} returned without finishing its steps: "
                                "loop over burnin.rank.attach(...).steps() to the end")
        else:
            keep = train(spec, ctx)  # noqa: F841 -- freed only by os._exit
    except BaseException as exc:  # report, then die: the supervisor decides what happens next
        if isinstance(exc, SystemExit) and exc.code in (0, None) and ctx.finished:
            pass  # the loop's script ended with sys.exit(0) after its last step
        else:
            tb = traceback.format_exception(exc)
            if ctx.events is None:  # torchrun, before the group formed: stderr is all there is
                sys.stderr.write("".join(tb))
                os._exit(1)
            ctx.events.emit("rank_error", error_type=type(exc).__name__, message=str(exc)[:2000],
                        traceback="".join(tb[-6:])[-4000:])
            sys.stderr.write("".join(tb))
            sys.stderr.flush()
            os._exit(1)  # skip interpreter teardown: a broken process group can hang it
    ctx.events.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written and the group is destroyed: interpreter teardown (DDP, gloo and torch
    # finalizers) took 1-3 s per rank here, during which the heartbeat thread is already gone.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
