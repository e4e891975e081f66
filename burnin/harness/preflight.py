"""Checks of what a run needs from this machine, made before anything starts.

The scenario loader checks the scenario itself; this module checks it against the machine and the
flags: the output directory can really be written, the metrics endpoint can be bound, a `cuda`
workload has a CUDA device, network faults have the privilege for namespaces (or a fallback), a
campaign's trials can be drawn. Each failure is a one-line `UserError` (a `ScenarioError` with the
file and line where one is known) naming the flag or field and the fix. `burnin run`, `burnin
campaign` and `burnin validate` call these before the golden run, the metrics server, the run
directory or any rank process exists; `run_scenario` and `run_campaign` call them again for Python
callers. Nothing here imports torch: the CUDA probe asks a subprocess, and only when a driver is
present at all.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from burnin.errors import ScenarioError, UserError, oneline as _show, reason
from burnin.harness.external import lighthouse_binary
from burnin.harness.fabric import choose_fabric
from burnin.reports.endpoint import endpoint_error
from burnin.scenarios.campaign import draw_trials
from burnin.scenarios.loader import field_line, resolve

__all__ = [
    "check_out_dir",
    "check_metrics_endpoint",
    "cuda_device_count",
    "check_device",
    "check_network",
    "check_campaign",
    "check_scenario",
]

COMMAND_LINE = "<command line>"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a directory"


# --- the output directory -----------------------------------------------------------------------

def check_out_dir(out: str | Path, flag: str = "--out", *, must_exist: bool = False, fix: str | None = None) -> Path:
    """The absolute directory `out`, after proving a run directory can be created in it.

    Creates nothing that outlives the check: where `out` is missing, its nearest existing ancestor
    must be a directory in which an entry can really be made (tried, then removed: root passes
    `os.access` even on a read-only mount); `out` itself is created later, by the run.
    """
    text = str(out)
    fix = fix or ("give an existing, writable directory" if must_exist
                  else "give a writable directory (created if missing)")
    if not text.strip():
        raise UserError(f"{flag}: empty; {fix}, e.g. ./runs")
    try:
        path = Path(os.path.realpath(text))
    except (OSError, ValueError) as exc:
        raise UserError(f"{flag}: {_show(text)} is not a usable path ({reason(exc)}); {fix}") from None
    probe = path
    while True:
        try:
            st = os.stat(probe)
            break
        except (FileNotFoundError, NotADirectoryError):
            if must_exist and probe == path:
                raise UserError(f"{flag}: {_show(text)} does not exist; {fix}") from None
            if probe.parent == probe:
                raise UserError(f"{flag}: nothing of {_show(text)} exists; {fix}") from None
            probe = probe.parent
        except (OSError, ValueError) as exc:  # too long a name, a symlink loop, a NUL byte, no permission
            raise UserError(f"{flag}: cannot use {_show(text)} ({reason(exc)}); {fix}") from None
    if not stat.S_ISDIR(st.st_mode):
        if probe == path:
            raise UserError(f"{flag}: {_show(text)} is {_kind(st.st_mode)}, not a directory; {fix}")
        raise UserError(f"{flag}: {_show(text)} goes through {_show(probe)}, which is {_kind(st.st_mode)}, "
                        f"not a directory; {fix}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".burnin-write-check-", dir=probe))
    except OSError as exc:
        where = "" if probe == path else f" (the nearest existing part of {_show(text)})"
        raise UserError(f"{flag}: cannot create anything in {_show(probe)}{where}: {reason(exc)}; {fix}") from None
    return path


# --- the metrics endpoint -----------------------------------------------------------------------

def check_metrics_endpoint(port: int, addr: str = "127.0.0.1") -> None:
    """Prove addr:port can be listened on, as the metrics server will (SO_REUSEADDR), and let it go.

    The run binds the real server before it creates its run directory; this is the early check
    that lets `burnin run` refuse a port in use before it loads anything heavier.
    """
    if not 0 <= port <= 65535:
        raise endpoint_error(OverflowError(), addr, port)
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
    except (OSError, ValueError, OverflowError) as exc:
        raise endpoint_error(exc, addr, port) from None


# --- the device ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def cuda_device_count() -> tuple[int, str]:
    """(CUDA devices torch sees, why none when 0), without importing torch here.

    No /dev/nvidia* and no /proc/driver/nvidia: no CUDA, at once. Otherwise a subprocess asks torch
    (a few seconds), so CUDA_VISIBLE_DEVICES and a CPU-only torch are taken into account.
    """
    if not glob.glob("/dev/nvidia*") and not os.path.exists("/proc/driver/nvidia"):
        return 0, "no NVIDIA driver: no /dev/nvidia*, no /proc/driver/nvidia"
    code = "import torch; print(torch.cuda.device_count())"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 0, "torch did not say how many CUDA devices it sees within 300 s"
    except OSError as exc:
        return 0, f"cannot ask torch how many CUDA devices it sees: {reason(exc)}"
    answer = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and answer and answer[-1].isdigit():
        return int(answer[-1]), "torch sees no CUDA device (a CPU-only torch? CUDA_VISIBLE_DEVICES?)"
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return 0, f"torch cannot count CUDA devices: {_show(last)[:200]}"


def check_device(scenario: Any, source: str | Path | None = None, overrides: dict[str, Any] | None = None) -> None:
    """`workload.device: cuda` needs a CUDA device; `auto` takes what there is, `cpu` needs nothing. And
    `recovery.mode: external` needs its system under test installed (torchft's lighthouse)."""
    if scenario.recovery.mode == "external":
        try:
            lighthouse_binary()
        except UserError as exc:
            file, line = _where(source, "recovery.mode")
            raise ScenarioError(str(exc), file=file, line=line, field="recovery.mode") from None
    if scenario.workload.device != "cuda":
        return
    count, why = cuda_device_count()
    if count:
        return
    if overrides and "workload.device" in overrides:
        raise ScenarioError(f"--device cuda, but this machine has no CUDA device ({why}); use --device cpu or auto",
                            file=COMMAND_LINE, field="workload.device")
    file, line = _where(source, "workload.device")
    raise ScenarioError(f"cuda, but this machine has no CUDA device ({why}); set workload.device: cpu or auto, "
                        "or run with --device cpu or auto", file=file, line=line, field="workload.device")


# --- the network fabric and campaigns -----------------------------------------------------------

_FIELD = re.compile(r"\b(faults\.\d+(?:\.[a-z_]+)*|network\.[a-z_]+|campaign(?:\.[a-z_]+)?)\b")


def check_network(scenario: Any, source: str | Path | None = None, overrides: dict[str, Any] | None = None) -> None:
    """What `choose_fabric` refuses (a network fault without the privilege for namespaces and without
    `network.fallback: simulate`, a partition of all ranks), with the file and line of the field."""
    try:
        choose_fabric(scenario, "preflight")
    except ScenarioError:
        raise
    except UserError as exc:
        m = _FIELD.search(str(exc))
        if m is None or source is None:
            raise
        field = m.group(1)
        if overrides and any(field == k or field.startswith(k + ".") or k.startswith(field + ".") for k in overrides):
            where = COMMAND_LINE
        else:
            file, line = _where(source, field)
            where = file if line is None else f"{file}:{line}"
        raise type(exc)(f"{where}: {exc}") from None


def check_campaign(scenario: Any, source: str | Path | None = None, *, trials: int | None = None,
                   seed: int | None = None) -> list[dict[str, Any]]:
    """The campaign's trials, drawn as `run_campaign` will; a bad one fails with the file and line."""
    c = scenario.campaign
    trials = trials if trials is not None else (c.trials if c else 0)
    seed = seed if seed is not None else (c.seed if c else 0)
    try:
        return draw_trials(scenario, trials, seed)
    except ScenarioError as exc:
        if exc.file is not None or source is None:
            raise
        field, message = exc.field, exc.message
        m = re.fullmatch(r"([\w.]+): (.*)", message, re.S)
        if field is None and m:
            field, message = m.group(1), m.group(2)
        file, line = _where(source, field or "campaign")
        raise ScenarioError(message, file=file, line=line, field=field, more=exc.more) from None


def check_scenario(scenario: Any, source: str | Path | None = None, overrides: dict[str, Any] | None = None,
                   *, campaign: bool | None = None) -> None:
    """Everything `burnin validate` adds to the loader: the device, the fabric, and (for a scenario with a
    `campaign:` section, or `campaign=True`) the campaign's trials."""
    check_device(scenario, source, overrides)
    check_network(scenario, source, overrides)
    if campaign or (campaign is None and scenario.campaign is not None):
        check_campaign(scenario, source)


def _where(source: str | Path | None, field: str) -> tuple[str, int | None]:
    """The file a scenario came from and the line of `field` in it (or of its nearest parent)."""
    if source is None:
        return "<scenario>", None

    try:
        file = str(resolve(source))
    except UserError:
        return _show(source), None
    return _show(file), field_line(file, field)
