"""How this process runs its Triton kernels: compiled for CUDA tensors, interpreted for CPU tensors.

Triton fixes the mode when it is imported and when a kernel is defined (`@triton.jit` reads
TRITON_INTERPRET then), so the choice is made once per process, before anything imports triton:
`prepare("cpu")` sets TRITON_INTERPRET=1, `prepare("cuda")` unsets it. The interpreter runs the same kernel source
on the host with numpy: correct results and real raw-pointer loads and stores (a wild offset is a
real SIGSEGV, a few elements past the end a real silent overwrite), but its cost is per program
instance, so launchers give it few programs with large blocks.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["prepare", "interpreting", "check_device", "grid_rows"]

_ENV = "TRITON_INTERPRET"


def _env_interpret() -> bool:
    return os.environ.get(_ENV, "").strip().lower() in ("1", "true", "on", "yes")


def prepare(device: str) -> None:
    """Choose the mode for kernels on `device` ("cpu", "cuda" or "auto"), before triton is imported.

    Triton decides between interpreter and compiler when it is imported (its own library
    functions are defined then), and torch imports it on its own, e.g. in
    `torch.use_deterministic_algorithms`: call this first thing in a process.
    """
    global _INTERPRET
    if device == "auto":
        import torch  # lazy: torch, in the rank only

        device = "cuda" if torch.cuda.is_available() else "cpu"
    want = device == "cpu"
    if "triton" in sys.modules:
        if want != _triton_interprets():
            raise RuntimeError(
                f"triton was imported in {'interpreter' if not want else 'compiled'} mode before the kernels for "
                f"{device!r} were set up: call burnin.kernels._runtime.prepare({device!r}) before anything imports "
                f"triton (torch.use_deterministic_algorithms does), or set TRITON_INTERPRET="
                f"{'1' if want else ''} in the environment")
        _INTERPRET = want
        return
    if want:
        os.environ[_ENV] = "1"
    else:
        os.environ.pop(_ENV, None)
    _INTERPRET = want


def _triton_interprets() -> bool:
    """Whether the imported triton runs its kernels in the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction  # lazy: triton, only where a kernel runs
    import triton.language.standard as std  # lazy: triton, only where a kernel runs

    return isinstance(std.max, InterpretedFunction)


# Triton reads the variable when a kernel is defined; `prepare` keeps the two in step.
_INTERPRET = _env_interpret()


def interpreting() -> bool:
    """True when this process's kernels run in the Triton interpreter (on the host)."""
    return _INTERPRET


def check_device(t: Any, what: str) -> None:
    """Refuse a tensor the kernels of this process cannot run on, naming the fix."""
    if t.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError(
            f"{what} is a CPU tensor but Triton kernels here are compiled for CUDA: set TRITON_INTERPRET=1 "
            "in the environment (or call burnin.kernels._runtime.prepare('cpu')) before importing burnin.kernels")
    if t.device.type == "cuda" and _INTERPRET:
        raise RuntimeError(
            f"{what} is a CUDA tensor but TRITON_INTERPRET=1 makes the kernels run on the host: "
            "unset it to run them compiled")
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{what} is on {t.device}; the Triton kernels run on cpu (interpreter) or cuda")


def grid_rows(n_rows: int, row_elems: int, *, interp_elems: int = 1 << 17, compiled_elems: int = 1 << 12) -> int:
    """Rows per program: a power of two that keeps a block near the element budget of the mode.

    The interpreter pays per program instance, so it gets blocks of ~128k elements (a few
    programs); compiled kernels get small blocks and many programs to fill the GPU.
    """
    budget = interp_elems if _INTERPRET else compiled_elems
    rows = max(1, budget // max(1, row_elems))
    rows = 1 << (rows.bit_length() - 1)  # round down to a power of two
    cap = 1 << max(0, (n_rows - 1).bit_length())  # no bigger than the next power of two of n_rows
    return max(1, min(rows, cap))
