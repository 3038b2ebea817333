"""The fleet queueing model (bench/fleet_model.py): its arithmetic, on workloads small enough to check by
hand, and its command on the default 200k x 200k image."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def _model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fleet_model", REPO / "bench" / "fleet_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["fleet_model"] = module
    spec.loader.exec_module(module)
    return module


def test_the_workload_is_the_pipelines_own_grid() -> None:
    fm = _model()
    load = fm.workload(8192, 8192, 2048, 512)  # the demo's scene: 25 regions, 361 tiles (as it reports)
    assert (load.regions, load.tiles) == (25, 361)


def test_one_worker_runs_every_region_in_turn_and_more_workers_split_them() -> None:
    fm = _model()
    load = fm.Workload(1000, 1000, (100, 100, 100, 100))
    fleet = fm.Fleet(
        tiles_per_s=10.0, region_overhead_s=1.0, merge_s=0.0, backlog_per_instance=1, max_workers=1
    )
    assert fm.simulate(load, fleet, launch=False).seconds == 4 * (1.0 + 10.0)
    two = fm.simulate(load, fm._with(fleet, max_workers=2), launch=False)
    assert (two.workers, two.seconds) == (2, 2 * 11.0)
    # The fleet never grows past the backlog target: 4 regions at 2 per instance -> 2 workers.
    assert (
        fm.simulate(load, fm._with(fleet, max_workers=8, backlog_per_instance=2), launch=False).workers == 2
    )


def test_a_launched_fleet_pays_reaction_start_up_and_the_scale_in_tail() -> None:
    fm = _model()
    load = fm.Workload(1000, 1000, (60,))
    fleet = fm.Fleet(
        tiles_per_s=1.0,
        region_overhead_s=0.0,
        startup_s=100.0,
        scale_reaction_s=20.0,
        scale_in_s=900.0,
        merge_s=0.0,
        price_per_hour=3.6,
    )
    outcome = fm.simulate(load, fleet)
    assert outcome.seconds == 20 + 100 + 60
    assert outcome.instance_hours == (100 + 60 + 900) / 3600
    assert abs(outcome.cost - outcome.instance_hours * 3.6) < 1e-9


def test_the_default_plan_names_a_fleet_for_the_hour() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fleet_model.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "625 regions, 199,809 tiles" in done.stdout
    assert "RESULT workers_for_deadline=" in done.stdout
