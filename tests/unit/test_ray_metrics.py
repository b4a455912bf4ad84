"""The trial-state bookkeeping behind `finetune_trials` (ray_metrics.py), from the rows a search
reports; the export itself is read back from Ray's endpoint in tests/integration/test_ray_dashboard.py."""

from __future__ import annotations

from finetune_trainer.ray_metrics import NO_TRIAL, TrainingMetrics, run_tags


def test_trials_move_from_running_to_stopped_or_finished_and_stay_there():
    metrics = TrainingMetrics(run_tags("team-a", "demo", "run-1"))
    assert metrics.tags == {"finetune_job": "demo", "finetune_namespace": "team-a", "run": "run-1"}
    metrics.progress({"trial": "t1", "step": 1, "loss": 0.7})
    metrics.progress({"trial": "t2", "step": 1, "loss": float("nan")})  # not exported, but the trial runs
    metrics.row({"trial": "t1", "step": 2, "eval_loss": 0.5, "train_loss": 0.6})
    assert metrics.states == {"t1": "running", "t2": "running"}
    metrics.row({"trial": "t2", "event": "stopped by the scheduler at step 2"})
    metrics.row({"trial": "t1", "step": 4, "eval_loss": 0.4, "tokens_per_second": 812.0, "early_stopped": False})
    metrics.progress({"trial": "t2", "step": 2, "loss": 0.9})  # a late step report of a stopped trial
    assert metrics.states == {"t1": "finished", "t2": "stopped"}
    metrics.row({"trial": "t3", "step": 2, "eval_loss": 0.5, "early_stopped": True, "tokens_per_second": 700.0})
    assert metrics.states["t3"] == "stopped"  # early stopping (patience) ends a trial too


def test_a_plain_run_is_one_trial():
    metrics = TrainingMetrics(run_tags("default", "quickstart", "run-1"))
    metrics.row({"step": 0, "eval_loss": 0.9, "baseline": True})
    assert metrics.states == {}
    metrics.progress({"trial": None, "step": 3, "loss": 0.5})
    metrics.row({"step": 4, "eval_loss": 0.4, "tokens_per_second": 900.0})
    assert metrics.states == {NO_TRIAL: "finished"}
