"""Reports of a run: the result model, Prometheus metrics, and the files a run dir holds.

The result dataclasses import eagerly (they are plain Python); metrics and writers load on first
use, so `import burnin.reports` pulls in neither prometheus_client nor rich, and never torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from burnin.reports.result import (
    SCHEMA_VERSION,
    Expectation,
    Failure,
    FaultResult,
    RecoveryBreakdown,
    RunResult,
)

if TYPE_CHECKING:
    from burnin.reports.metrics import Metrics, MetricsServer
    from burnin.reports.writers import render_console, render_plain, write_reports

__all__ = [
    "SCHEMA_VERSION",
    "RecoveryBreakdown",
    "Failure",
    "FaultResult",
    "Expectation",
    "RunResult",
    "Metrics",
    "MetricsServer",
    "write_reports",
    "render_console",
    "render_plain",
]

_LAZY = {
    "Metrics": "burnin.reports.metrics",
    "MetricsServer": "burnin.reports.metrics",
    "write_reports": "burnin.reports.writers",
    "render_console": "burnin.reports.writers",
    "render_plain": "burnin.reports.writers",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'burnin.reports' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
