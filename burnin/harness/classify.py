"""How the supervisor names a failure: the cause of a rank's exit or error, and its signature.

A signature is the failure with everything incidental erased (numbers, addresses, paths), so
failures with one root cause group together in the reports whatever step or rank they hit.
"""

from __future__ import annotations

import re
import signal

__all__ = ["classify_exit", "classify_error", "signature"]

# ("Application timeout caused pair closure": gloo's words when a pair's peer went silent past the timeout)
_NETWORK_TEXT = re.compile(r"\b(timed out|connection (closed|reset|refused)|broken pipe|gloo|nccl|"
                           r"socket|recv|send|network|unreachable|pair closure)\b", re.I)
_IMA_TEXT = re.compile(r"illegal memory access|an illegal instruction|misaligned address", re.I)


def classify_exit(returncode: int) -> tuple[str, str]:
    """(cause, detail) of a rank that exited with `returncode` (negative: killed by that signal)."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:  # real-time signals have no name in the enum
            return "signal", f"signal {-returncode}"
        if sig == signal.SIGKILL:
            return "killed", sig.name
        if sig in (signal.SIGSEGV, signal.SIGBUS):
            return "illegal_memory_access", sig.name
        return "signal", sig.name
    return "exit", f"exit code {returncode}"


def classify_error(error_type: str, message: str) -> str:
    """Cause of a Python exception a rank reported before dying."""
    if _IMA_TEXT.search(message):
        return "illegal_memory_access"
    if error_type == "InjectedFault":
        return "exception"
    if error_type == "CorruptionDetected":
        return "corruption"
    if _NETWORK_TEXT.search(message) or error_type in ("DistBackendError", "DistNetworkError"):
        return "network"
    return "exception"


def signature(cause: str, detail: str) -> str:
    """Failures with one root cause share a signature: numbers, addresses and paths are erased."""
    text = detail.splitlines()[0] if detail else ""
    text = re.sub(r"0x[0-9a-fA-F]+", "0x?", text)
    text = re.sub(r"(/[\w.\-]+)+", "<path>", text)
    text = re.sub(r"\d+", "N", text)
    return f"{cause}: {text[:160]}".rstrip(": ")
