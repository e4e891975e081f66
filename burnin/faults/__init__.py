"""The fault catalogue: one small class per fault, a registry, entry-point plug-ins."""

from burnin.faults.base import COLLECTIVE_POINTS, POINTS, STEP_POINTS, Fault, NoParams
from burnin.faults.registry import UnknownFault, all_faults, get, names, register

__all__ = ["STEP_POINTS", "COLLECTIVE_POINTS", "POINTS", "Fault", "NoParams", "UnknownFault", "all_faults", "get", "names", "register"]
