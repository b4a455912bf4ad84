"""bench/asha_replay.py feeds recorded curves to Tune's ASHAScheduler: checked on orders whose
outcome asynchronous ASHA fixes (every trial better than all before it is promoted; every trial
worse than the first is stopped at the first rung)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
asha_replay = pytest.importorskip("asha_replay")

STEPS = 45  # rungs at 5 and 15 (grace 5, reduction factor 3), the end at 45
RATES = [1e-5, 2e-5, 3e-5, 4e-5]


def _report(curves_by_rank: list[float], seed: int) -> tuple[dict, dict]:
    """A grid of learning rates whose i-th trial in grid_order(seed) has a flat curve at
    curves_by_rank[i], one evaluation every 5 steps, 10 s apart."""
    from finetune_trainer.spec.search import grid_order

    report = {"args": {"steps": STEPS, "grace": 5, "every": 5, "concurrent": 1, "eval_samples": 50, "tolerance": 0.01},
              "space": {"training.learningRate": {"choice": RATES}}}
    order = [asha_replay._key(p) for p in grid_order(asha_replay._job(report, seed).spec.search, seed)]
    assert len(order) == len(RATES)
    curves = {key: [[s, value, 10.0 * s] for s in range(5, STEPS + 1, 5)] for key, value in zip(order, curves_by_rank, strict=True)}
    return report, curves


def test_trials_better_than_all_before_them_all_run_to_the_end():
    report, curves = _report([0.1, 0.2, 0.3, 0.4], seed=0)
    got = asha_replay.replay(report, 0, curves)
    assert got["trial_steps"] == 4 * STEPS and got["best"] == 0.4


def test_trials_worse_than_the_first_stop_at_the_first_rung():
    report, curves = _report([0.9, 0.2, 0.3, 0.4], seed=0)
    got = asha_replay.replay(report, 0, curves)
    assert sorted(got["stopped_at"].values()) == [5, 5, 5, STEPS]
    assert got["trial_steps"] == STEPS + 3 * 5 and got["best"] == 0.9
