"""The metrics endpoint's one error: why addr:port cannot be listened on, blaming the flag at fault.

Used by the check before a run starts (`burnin.harness.preflight.check_metrics_endpoint`) and by the
metrics server when it binds (`Metrics.serve`), so both say the same thing.
"""

from __future__ import annotations

import errno
import socket

from burnin.errors import UserError, reason
from burnin.errors import oneline as _show

__all__ = ["endpoint_error"]


def endpoint_error(exc: BaseException, addr: str, port: int) -> UserError:
    """The one-line error for a failure to listen on addr:port, blaming the flag at fault."""
    where, why = f"{_show(addr)}:{port}", reason(exc)
    if isinstance(exc, OverflowError) or not 0 <= port <= 65535:
        return UserError(f"--metrics-port: {port} is not a port; use 0-65535 (0 picks a free one)")
    if isinstance(exc, (socket.gaierror, ValueError)):  # ValueError: a NUL byte, IDNA (a label too long)
        return UserError(f"--metrics-addr: cannot resolve {_show(repr(addr))} ({why}); give an address or host "
                         "name of this machine, e.g. 127.0.0.1 or 0.0.0.0")
    code = getattr(exc, "errno", None)
    if code == errno.EADDRINUSE:
        return UserError(f"--metrics-port: port {port} is already in use on {_show(addr)}; pick another port, "
                         "or 0 for a free one")
    if code == errno.EADDRNOTAVAIL:
        return UserError(f"--metrics-addr: {_show(addr)} is not an address of this machine ({why}); use e.g. "
                         "127.0.0.1 or 0.0.0.0")
    if code in (errno.EACCES, errno.EPERM):
        return UserError(f"--metrics-port: not allowed to listen on {where} ({why}); use a port above 1023, "
                         "or 0 for a free one")
    return UserError(f"--metrics-addr/--metrics-port: cannot listen on {where} ({why}); "
                     "pick another address or port")
