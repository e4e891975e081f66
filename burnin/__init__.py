"""burnin: a fault-injection and reliability test harness for GPU training.

Runs real multi-rank PyTorch training, injects the faults that break large runs, checks that each
run recovers to exactly the state a fault-free run reaches, and counts failures and recoveries as
Prometheus metrics. Importing this package does not import torch, so the CLI stays cheap.
"""

from burnin.errors import BurninError, HarnessError, ScenarioError, UserError

__version__ = "0.1.0"

__all__ = ["__version__", "BurninError", "HarnessError", "ScenarioError", "UserError"]
