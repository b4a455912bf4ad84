"""Ranking with numbers that are not finite (issue 16, item 6): a NaN or infinite metric is worse
than anything, is never the best row, and never freezes the best value early stopping keeps."""

from __future__ import annotations

import math

import pytest

from finetune_trainer.ranking import EarlyStopping, best_row, finite, is_better

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_a_non_finite_value_is_never_better(mode, bad):
    assert not is_better(bad, None, mode)  # not even as the first value seen
    assert not is_better(bad, 0.5, mode)


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_any_finite_value_beats_a_non_finite_best(mode, bad):
    assert is_better(123.0, bad, mode)
    assert is_better(-1e30, bad, mode, min_delta=5.0)


def test_finite_comparisons_are_unchanged():
    assert is_better(0.4, 0.5, "min") and not is_better(0.5, 0.4, "min")
    assert is_better(0.6, 0.5, "max") and not is_better(0.55, 0.5, "max", min_delta=0.1)
    assert is_better(1.0, None, "max")
    assert finite(0) and finite(1.5) and not finite(True) and not finite(None) and not finite("1")


@pytest.mark.parametrize(("mode", "want"), [("min", 0.7), ("max", 0.9)])
def test_best_row_skips_rows_whose_metric_is_not_finite(mode, want):
    rows = [{"step": 1, "m": NAN}, {"step": 2, "m": 0.9}, {"step": 3, "m": -INF}, {"step": 4, "m": INF},
            {"step": 5, "m": 0.7}, {"step": 6}, {"step": 7, "m": None}]
    assert best_row(rows, "m", mode)["m"] == want
    assert best_row([{"m": NAN}, {"m": INF}], "m", mode) == {}


def test_a_nan_first_evaluation_does_not_freeze_the_best():
    stopper = EarlyStopping(mode="min", patience=3)
    assert not stopper.update(NAN)
    assert stopper.best is None and stopper.bad_evals == 1  # counted as no improvement, not kept
    assert not stopper.update(0.9)
    assert stopper.best == 0.9 and stopper.bad_evals == 0  # the first finite value is the best
    assert not stopper.update(0.8)
    assert stopper.best == 0.8


def test_non_finite_evaluations_run_out_the_patience():
    stopper = EarlyStopping(mode="max", patience=2)
    stopper.update(0.5)
    assert not stopper.update(NAN)
    assert stopper.update(INF)  # +inf accuracy is no improvement either: patience spent
    assert stopper.best == 0.5


def test_a_best_loaded_as_nan_from_an_old_checkpoint_is_replaced():
    stopper = EarlyStopping(mode="min", patience=2)
    stopper.load_state_dict({"best": NAN, "bad_evals": 1, "history": [NAN]})
    assert not stopper.update(2.0)
    assert stopper.best == 2.0 and stopper.bad_evals == 0


# ---------------------------------------------------------------- ties (issue 20, item 6)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_tied_checkpoints_go_to_the_earlier_step_whatever_the_order_reported(mode):
    rows = [{"step": 30, "m": 0.5}, {"step": 10, "m": 0.5}, {"step": 20, "m": 0.5}, {"step": 40, "m": 0.4 if mode == "max" else 0.6}]
    assert best_row(rows, "m", mode)["step"] == 10


def test_tiebreak_keys_in_order_then_the_earlier_row():
    rows = [{"trial": "a", "value": 0.9, "loss_at_best": 0.7, "best_step": 5},
            {"trial": "b", "value": 0.9, "loss_at_best": 0.5, "best_step": 50},
            {"trial": "c", "value": 0.9, "loss_at_best": 0.5, "best_step": 20},
            {"trial": "d", "value": 0.9, "loss_at_best": 0.5, "best_step": 20},
            {"trial": "e", "value": 0.8, "loss_at_best": 0.1, "best_step": 1}]
    tiebreak = ("loss_at_best", "best_step")
    assert best_row(rows, "value", "max", tiebreak=tiebreak)["trial"] == "c"  # lower loss, fewer steps, then first
    # a tied row without the tie-break value comes after those with it
    assert best_row([{"value": 1.0}, {"value": 1.0, "loss_at_best": 9.0}], "value", "max", tiebreak=tiebreak) == {"value": 1.0, "loss_at_best": 9.0}


def test_search_best_trial_rule_and_trial_order():
    from finetune_trainer.search_results import TRIAL_TIEBREAK, trial_order

    names = ["trial_100", "trial_11", "trial_02", "trial_x"]
    assert sorted(names, key=trial_order) == ["trial_02", "trial_11", "trial_100", "trial_x"]
    trials = sorted(({"trial": n, "value": 0.75, "loss_at_best": 0.3, "best_step": 8} for n in names), key=lambda t: trial_order(t["trial"]))
    assert best_row(trials, "value", "max", tiebreak=TRIAL_TIEBREAK)["trial"] == "trial_02"
