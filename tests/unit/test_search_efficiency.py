"""bench/search_efficiency.py's report: wall time of both arms and their ratio (issue 19), only
when the grid was timed in the same invocation."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
search_efficiency = pytest.importorskip("search_efficiency")

GRID = {"best": 0.745, "trial_steps": 3645, "wall_seconds": 3805.0, "trials": []}
ARM = {"best": 0.745, "trial_steps": 675, "wall_seconds": 1000.0}


def test_wall_ratio_of_arms_timed_together() -> None:
    compared = search_efficiency.compare(GRID, ARM)
    assert compared == {"trial_steps_ratio": 675 / 3645, "best_gap": 0.0, "wall_ratio": 1000.0 / 3805.0}


def test_no_wall_ratio_against_a_grid_from_another_run() -> None:
    """Another session's seconds (--grid-from) are not comparable: no ratio rather than a wrong one."""
    assert search_efficiency.compare(GRID | {"from": "earlier.json"}, ARM)["wall_ratio"] is None


def test_report_records_both_arms_wall_seconds_and_the_target(tmp_path: Path) -> None:
    args = Namespace(order_seeds=[0], scheduler="successiveHalving", tolerance=0.01)
    path = tmp_path / "r.json"
    for wall, met in ((1000.0, True), (1500.0, False)):
        arm = ARM | {"wall_seconds": wall}
        report = {"reference_grid": GRID, "runs": [arm | search_efficiency.compare(GRID, arm)]}
        search_efficiency._write(path, report, args)
        written = json.loads(path.read_text())
        assert written["wall_seconds"] == {"grid": 3805.0, "successiveHalving": [wall]}
        assert written["wall_ratio"] == pytest.approx(wall / 3805.0)
        assert written["target"]["wall_ratio_at_most"] == 0.30 and written["wall_met"] is met
