"""The rank side: the training loop, the workload, state and RNG, checkpoints and memory snapshots,
the injector, detectors and guard. Imported by the supervisor for the torch-free parts (checkpoint
listing and verification, snapshot headers, model shapes); importing this package imports no torch."""

from burnin.rank.external import Observer, observe
from burnin.rank.session import RunContext, Session, attach, current

__all__ = ["attach", "Session", "RunContext", "current", "observe", "Observer"]
