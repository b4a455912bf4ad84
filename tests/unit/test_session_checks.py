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


def test_a_search_whose_space_makes_a_trial_short_of_a_step_is_refused_naming_the_values():
    """The base spec fits 10 rows on 2 workers (5 each: one micro-batch of 4); the space's 3
    accumulation steps would leave a trial's later micro-batches empty: named before any trial."""
    from finetune_trainer.session import _trials_short_of_a_step

    spec = _spec(perDeviceBatchSize=4).model_copy(update={"search": None})
    doc = spec.model_dump(by_alias=True, mode="json")
    doc["search"] = {"algorithm": "grid", "space": {"training.gradientAccumulationSteps": {"choice": [1, 3]},
                                                     "training.learningRate": {"choice": [1e-4, 1e-3]}}}
    spec = FineTuneJobSpec.model_validate(doc)
    problems = _trials_short_of_a_step(10, spec)
    assert len(problems) == 1, problems  # one per distinct (batch, accumulation, workers), not per learning rate
    path, message = problems[0]
    assert path == "spec.search.space" and message.startswith("training.gradientAccumulationSteps=3: 10 training rows")
    assert "micro-batch 3 would have no rows" in message and "learningRate" not in message
    assert _trials_short_of_a_step(40, spec) == []
