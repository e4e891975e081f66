"""What a burn-in's run is, as a plain scenario: its workload for as many steps as the time allows, with
the faults that were drawn. The burn-in runs it; reports judge a finished burn-in again from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from burnin.scenarios.schema import MAX_STEPS, Scenario

__all__ = ["LEVELS", "runtime_scenario", "burn_in_run"]

#: The burn-in lengths `--level` names, in seconds, by device.
LEVELS = {"quick": {"cpu": 90, "cuda": 300}, "medium": {"cpu": 600, "cuda": 1800},
          "long": {"cpu": 3600, "cuda": 7200}}


def runtime_scenario(scenario: Scenario, schedule: list[dict[str, Any]], duration_s: float) -> Scenario:
    """The run the burn-in is: its workload for as many steps as the time allows, the drawn faults."""
    data = scenario.model_dump(mode="json")
    data["workload"] = {**data["workload"], "steps": MAX_STEPS}
    data["faults"] = [{k: v for k, v in f.items() if k != "kind"} for f in schedule]
    data["campaign"] = None
    t = data["timeouts"]
    data["timeouts"] = {**t, "run_s": min(7 * 86400, duration_s + max(300.0, t["connect_s"] * 2))}
    data["recovery"] = {**data["recovery"], "max_restarts": max(data["recovery"]["max_restarts"], len(schedule) + 10)}
    return Scenario.model_validate(data)


def burn_in_run(run_dir: str | Path) -> Scenario:
    """The scenario a finished burn-in ran, from its run directory (`scenario.json`, `schedule-drawn.json`)."""
    run_dir = Path(run_dir)
    scenario = Scenario.model_validate(json.loads((run_dir / "scenario.json").read_text()))
    drawn = json.loads((run_dir / "schedule-drawn.json").read_text())
    return runtime_scenario(scenario, list(drawn["faults"]), float(drawn["duration_s"]))
