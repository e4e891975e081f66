"""Scenarios: the schema a run is described in, the loader that checks it, and the bundled ones."""

from burnin.scenarios.loader import bundled_names, bundled_path, load_scenario, parse_scenario, resolve
from burnin.scenarios.schema import OUTCOMES, FaultSpec, Scenario, scenario_json_schema

__all__ = [
    "Scenario",
    "FaultSpec",
    "OUTCOMES",
    "load_scenario",
    "parse_scenario",
    "bundled_names",
    "bundled_path",
    "resolve",
    "scenario_json_schema",
]
