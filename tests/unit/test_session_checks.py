"""The session's refusals once the data is ingested (rows known), before any worker starts."""

from __future__ import annotations

from finetune_trainer.session import _short_of_a_step
from finetune_trainer.spec import FineTuneJobSpec


def _spec(**training) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({"model": {"source": "models/tiny", "task": "sequence-classification"},
                                           "data": {"train": "data/train.jsonl"}, "training": training,
                                           "resources": {"workers": 2}})


def test_a_step_whose_micro_batch_gets_no_rows_is_refused_naming_the_field():
    assert _short_of_a_step(10, _spec(perDeviceBatchSize=4, gradientAccumulationSteps=2)) is None
    problem = _short_of_a_step(10, _spec(perDeviceBatchSize=4, gradientAccumulationSteps=3))
    assert problem is not None and problem.startswith("spec.training.gradientAccumulationSteps: 10 training rows give each")
    assert "micro-batch 3 would have no rows" in problem
    assert _short_of_a_step(1, _spec()).startswith("spec.resources.workers: ")
