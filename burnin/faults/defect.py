"""A simulated silent defect of a node: what a fleet burn-in must find without being told.

Real silent data corruption comes from hardware that computes wrong now and then (a marginal core, a bad
multiplier lane) while every health check passes. Without such hardware, this plug-in stands in for one:
the output of the model's last matmul (the logits' projection) gets one bit flipped in one element once
every `every` calls, on one rank of one node. It is switched on from outside burnin, by the environment
variable `BURNIN_SIMULATED_DEFECT` of that node's processes (`every=50,bit=10,rank=1`), the way a defect
lives in one machine and not in the job; the fleet's verdict never reads that variable (a local fleet
writes what it planted to a sealed file, read only to score the verdict afterwards). Labelled simulated:
the rank says so on its stderr when it arms the defect and at every flip.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

__all__ = ["ENV", "parse", "install"]

ENV = "BURNIN_SIMULATED_DEFECT"
_KEYS = {"every": (1, 10**9), "bit": (0, 31), "rank": (0, 1 << 20)}


def parse(text: str) -> dict[str, int]:
    """`every=N,bit=B,rank=R` (bit defaults to 10, rank to 0) -> dict; ValueError naming what is wrong."""
    out = {"bit": 10, "rank": 0}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in _KEYS:
            raise ValueError(f"{part!r}: expected every=N, bit=B or rank=R")
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not an integer") from None
        lo, hi = _KEYS[key]
        if not lo <= n <= hi:
            raise ValueError(f"{key}={n} is out of range {lo}..{hi}")
        out[key] = n
    if "every" not in out:
        raise ValueError("every=N is missing (flip once every N calls)")
    return out


def install(model: Any, rank: int, env: dict[str, str] | None = None,
            step_of: Callable[[], int] | None = None) -> dict[str, int] | None:
    """Arm the defect on `model` (a burnin GPT: its `lm_head`) when this process's environment asks for it
    on this rank; returns its settings, or None. `step_of`: the step being run, for the label."""
    text = (env if env is not None else os.environ).get(ENV)
    if not text:
        return None
    spec = parse(text)
    if spec["rank"] != rank:
        return None
    import torch  # lazy: torch

    from burnin.faults.bits import flip_bit_  # lazy: torch

    calls = [0]

    def hook(_module: Any, _inputs: Any, out: Any) -> Any:
        calls[0] += 1
        if calls[0] % spec["every"]:
            return None
        with torch.no_grad():
            was = out.detach().reshape(-1)[:1].to(torch.float32).clone()
            now = was.clone()
            flip_bit_(now, 0, spec["bit"])
        bad = out.clone()
        bad.view(-1)[:1] += (now - was).to(out.dtype)
        at = f" (step {step_of()})" if step_of is not None else ""
        print(f"burnin: SIMULATED DEFECT on rank {rank}: bit {spec['bit']} of the logits' first element flipped "
              f"at call {calls[0]} of this process{at}", file=sys.stderr, flush=True)
        return bad

    model.lm_head.register_forward_hook(hook)
    print(f"burnin: SIMULATED DEFECT armed on rank {rank} ({ENV}={text}): not a real fault", file=sys.stderr,
          flush=True)
    return spec
