"""The rank worker: one process of the data-parallel group, training step by step.

Started by the supervisor with a torchrun-compatible environment: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, plus BURNIN_SPEC (the resolved run spec, JSON).
It resumes from the newest valid checkpoint, trains, calls the injector at named step points, and
writes every event to its own stream. The loop reads top to bottom, nanoGPT style.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

__all__ = ["main"]


def _heartbeat(path: Path, period_s: float) -> None:
    """Touch `path` every period from a daemon thread: stops when the process is stopped or dead."""
    path.touch()

    def beat() -> None:
        while True:
            os.utime(path)
            time.sleep(period_s)

    threading.Thread(target=beat, name="burnin-heartbeat", daemon=True).start()


def train(spec: dict[str, Any], rank: int, world_size: int, events: Any) -> Any:
    """Train to the last step (or run a campaign's trials). Returns the DDP module, which must not be
    freed before the process exits: freeing DDP's reducer joins a gloo thread that can wait forever
    for the GIL (seen at exit in benchmark runs), so `main` holds it until `os._exit`."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from burnin.rank import checkpoint
    from burnin.rank.guard import CorruptionDetected, Guard
    from burnin.rank.snapshot import SnapshotError
    from burnin.rank.injector import Injector
    from burnin.rank.state import capture_rank_state, loss_bits, restore_rank_state, state_hash
    from burnin.rank.workload import GPT, MarkovData, gpt_config, make_optimizer

    sc = spec["scenario"]
    w, ck, to = sc["workload"], sc["checkpoint"], sc["timeouts"]
    ckpt_dir = Path(spec["checkpoint_dir"])

    # -- Triton kernels run compiled on CUDA, interpreted on CPU; the mode is fixed when triton is
    # first imported, and use_deterministic_algorithms imports it: choose before.
    from burnin.kernels import _runtime
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
    events.emit("pg_ready", backend=backend, device=str(device))

    # -- model, optimizer, data (identical init on every rank: seed before building)
    cfg = gpt_config(w["model"], w["seq_len"], w["dropout"], w["kernels"])
    torch.manual_seed(w["seed"])
    model = GPT(cfg).to(device)
    optimizer = make_optimizer(model, w["lr"], w["weight_decay"])
    data = MarkovData(w["seed"], cfg.vocab_size)

    # -- resume: rank 0 picks the newest state that every rank has and that verifies, from the memory
    # snapshots (shared memory, the supervisor's) or the disk checkpoints, and tells the others
    t0 = time.time()
    snaps = _open_snapshots(spec, rank, world_size, events)
    tier, start_step = _choose_resume(ckpt_dir, snaps, rank, world_size, events)
    if tier is not None:
        if tier == "memory":
            model_state, rank_state = snaps.load(start_step, device)
        else:
            ckpt = checkpoint.Checkpoint(start_step, checkpoint._dir(ckpt_dir, start_step))
            model_state, rank_state = checkpoint.load(ckpt, rank, device)
        skip = spec["scenario"]["debug"]["skip_restore"]
        if "model" not in skip:
            model.load_state_dict(model_state["model"])
        if "optimizer" not in skip:
            optimizer.load_state_dict(model_state["optimizer"])
        restore_rank_state(rank_state, skip)
    else:
        # Each rank draws its own dropout masks, as real data-parallel training does.
        torch.manual_seed(w["seed"] * 1_000_003 + 1 + rank)
    if snaps is not None:  # snapshots after the resume point are of another history now
        snaps.discard(newer_than=start_step)
    events.emit("resumed", from_step=start_step if tier is not None else None, tier=tier,
                load_s=time.time() - t0, loss_floor=data.entropy_rate, params=model.num_params())

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    # The injector and guard in use (a campaign swaps the injector per trial); `step` is the step the
    # comm hook belongs to.
    # (a burn-in's clock: the instant its timed faults count from, and where this rank says its position)
    position = str(Path(spec["run_dir"]) / "ranks" / f"rank{rank}.pos") if spec.get("clock0") else None
    run = SimpleNamespace(step=start_step, guard=Guard(sc, rank, world_size, events, model, optimizer),
                          injector=Injector(sc["faults"], rank, world_size, events, set(spec["fired"]),
                                            go_timeout_s=to["connect_s"], clock0=spec.get("clock0"),
                                            position=position),
                          t_compute=None)
    ddp.register_comm_hook(run, _allreduce_hook)
    if start_step > 0:
        _prime_buckets(ddp, data, start_step, rank, w, device, optimizer)

    def one_step(step: int) -> tuple[float, str, float]:
        run.step, injector = step, run.injector
        run.t_compute = None
        # data
        x, y = data.batch(step, rank, w["batch_size"], w["seq_len"], device)
        injector.fire("before_forward", step, batch=x, model=model, optimizer=optimizer)
        # forward
        _, loss = ddp(x, y)
        # backward: the comm hook fires after_backward on each local bucket, then all-reduces it
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        injector.fire("after_allreduce", step, model=model, optimizer=optimizer)
        grad_norm = _grad_norm(model) if run.guard.needs_grad_norm else 0.0
        # optimizer
        optimizer.step()
        injector.fire("after_optimizer_step", step, model=model, optimizer=optimizer)
        return float(loss.item()), loss_bits(loss), grad_norm

    if "campaign" in spec:
        from burnin.rank.campaign_worker import run_trials

        run_trials(spec["campaign"], run, one_step, sc, rank, world_size, events)
        events.emit("rank_finished", final_step=None, state_hash=state_hash(model, optimizer))
        dist.destroy_process_group()
        return ddp

    guard, injector = run.guard, run.injector
    guard.start(start_step)
    memory_every = ck.get("memory_every", 0) if snaps is not None else 0

    # A burn-in ends at a step the supervisor writes to this file once its time is up (ahead of every
    # rank's position, so all ranks stop at the same step).
    stop_file, stop_at = spec.get("stop_file"), None
    step = start_step
    while step < w["steps"]:
        if stop_file is not None and stop_at is None and os.path.exists(stop_file):
            stop_at = int(Path(stop_file).read_text())
        if stop_at is not None and step >= stop_at:
            break
        t_step = time.perf_counter()
        guard.before_step(step)
        loss, bits, grad_norm = one_step(step)
        # detect: detectors, agreement across ranks, and rollback or recomputation when they find something
        try:
            next_step, loss, bits = guard.after_step(step, loss, bits, grad_norm, rerun=one_step)
        except CorruptionDetected:
            # The corruption may predate the finding, so a memory snapshot may hold it: restart from
            # the disk checkpoints, as without snapshots.
            if snaps is not None:
                snaps.discard()
            raise
        if next_step <= step:
            if snaps is not None:  # rolled back in process: later snapshots hold the undone steps
                snaps.discard(newer_than=next_step)
            step = next_step
            continue
        # log
        # compute_s: from the step's start to its first gradient bucket ready for the all-reduce, the part of
        # the step no peer waits in (a burn-in's straggler score)
        events.emit("step_done", step=step, loss=loss, loss_bits=bits, dt=time.perf_counter() - t_step,
                    compute_s=(run.t_compute - t_step) if run.t_compute is not None else None)
        # checkpoint
        done = step + 1
        if done % ck["every"] == 0 or done == w["steps"] or done == stop_at:
            t_ck = time.time()
            saved = checkpoint.save(ckpt_dir, done, rank, world_size, capture_rank_state(done),
                                    {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                                    if rank == 0 else None, keep=ck["keep"])
            if saved is not None:
                events.emit("checkpoint_saved", checkpoint_step=done, state_hash=state_hash(model, optimizer),
                            seconds=time.time() - t_ck)
        # memory snapshot: committed before the out-of-rank point, so a kill there loses nothing
        if memory_every and done % memory_every == 0:
            try:
                snaps.save(done, model, optimizer, capture_rank_state(done))
            except SnapshotError as exc:  # shared memory full: go on without; the disk tier remains
                events.emit("snapshot_failed", step=done, reason=str(exc))
                memory_every = 0
        injector.fire("between_steps", step, model=model, optimizer=optimizer)
        step = done

    events.emit("rank_finished", final_step=step - 1, state_hash=state_hash(model, optimizer))
    dist.destroy_process_group()
    return ddp


def _open_snapshots(spec: dict[str, Any], rank: int, world_size: int, events: Any) -> Any:
    """This rank's memory snapshot store, its slots verified (each bad one reported); None when the
    run keeps none (no directory from the supervisor: golden runs; `memory_every: 0`; campaigns)."""
    if not spec.get("snapshot_dir") or not spec["scenario"]["checkpoint"].get("memory_every") or "campaign" in spec:
        return None
    from burnin.rank.snapshot import RankSnapshots

    return RankSnapshots(spec["snapshot_dir"], rank, world_size,
                         on_reject=lambda path, step, why: events.emit("snapshot_rejected", snapshot_step=step,
                                                                       file=path.name, reason=why))


def _choose_resume(ckpt_dir: Path, snaps: Any, rank: int, world_size: int, events: Any) -> tuple[str | None, int]:
    """(tier, step) to resume from, the same on every rank: ("memory", s), ("disk", s) or (None, 0).

    Collective. Each rank offers the steps of its verified snapshots; rank 0 takes the newest one
    every rank has, verifies only the disk checkpoints newer than it (the newer tier wins; memory
    wins a tie: the same state, cheaper to load), and broadcasts the choice."""
    import torch.distributed as dist

    from burnin.rank import checkpoint
    from burnin.rank.snapshot import common_step

    offered: list[Any] = [None] * world_size
    if snaps is not None:
        dist.all_gather_object(offered, snaps.steps())
    choice: list[Any] = [(None, 0)]
    if rank == 0:
        memory = common_step(offered) if snaps is not None else None
        ckpt = checkpoint.newest_valid(
            ckpt_dir, world_size, above=memory,
            on_reject=lambda c, why: events.emit("checkpoint_rejected", checkpoint_step=c.step, reason=why))
        if ckpt is not None:
            choice = [("disk", ckpt.step)]
        elif memory is not None:
            choice = [("memory", memory)]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def _wait_for_store(limit_s: float) -> None:
    """Wait until rank 0's rendezvous store accepts connections. A client that finds the port closed
    backs off for about half a second before it tries again; warm spares reach this point within a
    few ms of each other, and a rank that came a moment before rank 0 lost that half second (seen in
    benchmarks/recovery.py as a bimodal restart time). Bounded: init_process_group has its own say after."""
    import socket

    addr = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(addr, timeout=1.0):
                return
        except OSError:
            time.sleep(0.005)


def _allreduce_hook(run, bucket):  # noqa: ANN001 -- DDP inspects the annotation: none, or a real GradBucket
    """DDP comm hook: the `after_backward` point on each local bucket, then the usual averaging.

    Always registered (golden runs too), so faulted and fault-free runs reduce the same way.
    """
    import torch.distributed as dist

    if run.t_compute is None:
        run.t_compute = time.perf_counter()
    run.injector.fire("after_backward", run.step, bucket=bucket, model=run.guard.model,
                      optimizer=run.guard.optimizer)
    buf = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _grad_norm(model: Any) -> float:
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                      for g in grads])))


def _prime_buckets(ddp: Any, data: Any, step: int, rank: int, w: dict[str, Any], device: Any,
                   optimizer: Any) -> None:
    """Make a resumed group all-reduce with the bucket layout of an uninterrupted run.

    DDP rebuilds its gradient buckets once, after the first backward of each DDP instance. An
    uninterrupted run reduces step 0 with the initial layout and every later step with the
    rebuilt one; a group resumed at step k would reduce step k with the initial layout. With
    three or more ranks the ring all-reduce sums an element in an order that depends on its
    position in the bucket, so that one step would differ in its last bits (measured: 3 ranks,
    resume at 10, loss bits differ from step 11 on). One throwaway backward, with every RNG put
    back and the gradients dropped, triggers the rebuild first; parameters are not touched.
    """
    import torch

    from burnin.rank.state import capture_rank_state, restore_rank_state

    saved = capture_rank_state(step)
    x, y = data.batch(step, rank, w["batch_size"], w["seq_len"], device)
    _, loss = ddp(x, y)
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    restore_rank_state(saved)
    del x, y, loss
    torch.distributed.barrier()


def warm_up(device: str, threads: int, kernels: str) -> None:
    """Pay, ahead of need, every import and first-call cost a rank pays before its first step: torch,
    determinism (which imports torch._dynamo), the first AdamW step (the rest of dynamo), torch.distributed
    and DDP, the workload, the fault registry, and the Triton kernel in the loss (interpreter or compiler).
    Touches no RNG and no state that a run's bits depend on: a spare must train exactly as a new process."""
    from burnin.kernels import _runtime
    _runtime.prepare(device)
    import torch
    import torch.distributed  # noqa: F401
    from torch.nn.parallel import DistributedDataParallel  # noqa: F401

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    from burnin.faults import registry
    from burnin.rank import checkpoint, guard, injector, state  # noqa: F401
    from burnin.rank.workload import make_optimizer

    registry.all_faults()
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda" if cuda else "cpu")
    layer = torch.nn.Linear(2, 2, bias=True).to(dev)
    opt = make_optimizer(layer, 1e-3, 0.1)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    if kernels == "triton":
        from burnin.kernels import reduction

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
    warm_up(device, int(threads), kernels)
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
                spare = os.fork() == 0
            except OSError:
                os._exit(1)
            if not spare:
                os._exit(0)  # the middle process: its exit hands the spare to the supervisor
            try:
                _become_spare(cmd, supervisor)
            except BaseException:  # noqa: BLE001 -- a spare that cannot start says why in the slot's log
                traceback.print_exc()
                os._exit(3)
            return warm_s
        os.waitpid(middle, 0)
    return None


def _become_spare(cmd: dict[str, str], supervisor: int) -> None:
    """In the zygote's grandchild: lead a process group, say the pid, wait to be the supervisor's child
    (it is a subreaper), take its parent-death signal, read the FIFO as stdin, write to the slot's log."""
    from burnin.harness.cleanup import set_parent_death_signal

    os.setsid()
    tmp = cmd["pid_file"] + ".tmp"
    Path(tmp).write_text(f"{os.getpid()}\n")
    os.replace(tmp, cmd["pid_file"])
    deadline = time.monotonic() + 10.0
    while os.getppid() != supervisor and time.monotonic() < deadline:
        time.sleep(0.001)
    if os.getppid() != supervisor:
        os._exit(3)  # the supervisor is gone, or is not a subreaper: no one would ever reap this rank
    set_parent_death_signal()
    fd = os.open(cmd["fifo"], os.O_RDONLY)  # the supervisor holds the FIFO open: never blocks
    os.dup2(fd, 0)
    os.close(fd)
    log = os.open(cmd["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for out in (1, 2):
        os.dup2(log, out)
    os.close(log)
    Path(cmd["ready"]).write_text("ready\n")


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
    from burnin.harness.cleanup import set_parent_death_signal
    from burnin.harness.events import EventWriter

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
    try:
        keep = train(spec, rank, world_size, events)  # noqa: F841 -- freed only by os._exit
    except BaseException as exc:  # report, then die: the supervisor decides what happens next
        tb = traceback.format_exception(exc)
        events.emit("rank_error", error_type=type(exc).__name__, message=str(exc)[:2000],
                    traceback="".join(tb[-6:])[-4000:])
        sys.stderr.write("".join(tb))
        sys.stderr.flush()
        os._exit(1)  # skip interpreter teardown: a broken process group can hang it
    events.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written and the group is destroyed: interpreter teardown (DDP, gloo and torch
    # finalizers) took 1-3 s per rank here, during which the heartbeat thread is already gone.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
