"""The best trial the live status names (tuning.TrialEvents, while the search runs) follows the
same tie rule as results.json's (search_results.best_trial: the metric, then the lower validation
loss, then fewer steps, then the earlier trial), whatever order the trials report in."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from finetune_trainer import search_results
from finetune_trainer.ranking import best_row
from finetune_trainer.spec import parse_job
from finetune_trainer.tuning import TrialEvents, TrialTotals
from tests.tiny_models import minimal_manifest


@dataclass
class Trial:
    name: str
    config: dict[str, Any] = field(default_factory=lambda: {"training.learningRate": 1e-3})
    status: str = "RUNNING"
    last_result: dict[str, Any] | None = None

    def __str__(self) -> str:
        return self.name


class Publisher:
    def __init__(self) -> None:
        self.published: list[Any] = []

    def publish(self, snapshot: Any) -> None:  # a ProgressDocument: what status.json gets
        self.published.append(snapshot)


def _events(metric: str) -> tuple[TrialEvents, Publisher]:
    job = parse_job(minimal_manifest(search={"space": {"training.learningRate": {"choice": [1e-3, 1e-4, 1e-5]}},
                                             "metric": metric}))
    tracker = SimpleNamespace(record=SimpleNamespace(remote=lambda row: None))
    publisher = Publisher()
    return TrialEvents(tracker, TrialTotals(job, num_train=100), publisher, "run-x"), publisher  # type: ignore[arg-type]


def _results(metric: str) -> list[tuple[str, dict[str, Any]]]:
    key = f"eval_{metric}"
    return [  # the same accuracy three times: loss decides, then the step, then the trial
        ("trial_02", {key: 0.75, "eval_loss": 0.40, "step": 8}),
        ("trial_01", {key: 0.75, "eval_loss": 0.40, "step": 8}),
        ("trial_00", {key: 0.75, "eval_loss": 0.41, "step": 4}),
        ("trial_01", {key: 0.70, "eval_loss": 0.30, "step": 12}),  # lower loss, worse metric: not the best
        ("trial_02", {key: 0.75, "eval_loss": 0.40, "step": 6}),  # fewer steps to the same: the best
    ]


def test_a_tie_goes_to_the_trial_results_json_will_name_in_any_report_order() -> None:
    rows = _results("accuracy")
    final_rows = [{"trial": name, "value": r["eval_accuracy"], "loss_at_best": r["eval_loss"], "best_step": r["step"]}
                  for name, r in rows]
    final_rows.sort(key=lambda r: r["trial"])  # results.json lists trials in trial order
    want = best_row(final_rows, "value", "max", tiebreak=search_results.TRIAL_TIEBREAK)
    assert (want["trial"], want["best_step"]) == ("trial_02", 6)
    for order in itertools.permutations(rows):
        events, publisher = _events("accuracy")
        trials = {name: Trial(name) for name, _ in rows}
        for name, result in order:
            events.on_trial_result(0, list(trials.values()), trials[name], result)
        best = publisher.published[-1].best_trial
        assert best is not None and (best.name, best.step) == ("trial_02", 6), order


def test_a_baseline_row_or_a_missing_metric_never_becomes_the_best() -> None:
    events, publisher = _events("accuracy")
    trial = Trial("trial_00")
    events.on_trial_result(0, [trial], trial, {"eval_accuracy": 0.9, "eval_loss": 0.1, "step": 0, "baseline": True})
    events.on_trial_result(0, [trial], trial, {"eval_loss": 0.1, "step": 2})
    events.on_trial_result(0, [trial], trial, {"eval_accuracy": float("nan"), "eval_loss": 0.1, "step": 3})
    assert events.best is None
    events.on_trial_result(0, [trial], trial, {"eval_accuracy": 0.6, "eval_loss": 0.5, "step": 4})
    best = publisher.published[-1].best_trial
    assert best is not None and best.value == 0.6
