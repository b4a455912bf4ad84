"""Step arithmetic on the spec (TrainingSpec), which the driver, the search's schedulers and the
recipe share without importing torch."""

from __future__ import annotations

import pytest

from finetune_trainer.spec.training import TrainingSpec


@pytest.mark.parametrize(("fields", "num_train", "world", "per_epoch", "total"), [
    ({"perDeviceBatchSize": 8}, 100, 1, 12, 12),  # 100 // 8: a partial batch is not a step
    ({"perDeviceBatchSize": 8}, 100, 2, 6, 6),  # each rank sees 50 rows
    ({"perDeviceBatchSize": 4, "gradientAccumulationSteps": 2}, 100, 1, 12, 12),
    ({"perDeviceBatchSize": 8, "epochs": 2.5}, 100, 1, 12, 30),
    ({"perDeviceBatchSize": 8, "epochs": 0.01}, 100, 1, 12, 1),  # at least one step
    ({"perDeviceBatchSize": 64}, 10, 2, 1, 1),  # fewer rows than a batch: still one step an epoch
    ({"perDeviceBatchSize": 8, "epochs": 3, "maxSteps": 7}, 100, 1, 12, 7),  # maxSteps wins
])
def test_steps_per_epoch_and_total(fields, num_train, world, per_epoch, total):
    spec = TrainingSpec.model_validate(fields)
    assert spec.steps_per_epoch(num_train, world) == per_epoch
    assert spec.total_steps(num_train, world) == total
