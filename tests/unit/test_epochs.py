"""epochs.py's arithmetic: where a resumed run continues, on any number of workers.

The Ray side (each rank's shard of an epoch is the same in every execution) is
tests/integration/test_ingest.py; here the step <-> (epoch, micro-batches to drop) mapping that
turns it into exact resume, checked against a replay of the uninterrupted run's micro-batches."""

from __future__ import annotations

import pytest

from finetune_trainer.epochs import EpochPlan, epoch_dataset_name, epoch_seed
from finetune_trainer.spec.training import TrainingSpec


def _stream(plan: EpochPlan, rank: int, epochs: int) -> list[tuple[int, int, int]]:
    """The uninterrupted run's micro-batches of `rank`, as (epoch, rank, index in the shard)."""
    return [(e, rank, i) for e in range(epochs) for i in range(plan.micro_batches_per_epoch)]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("accumulation", [1, 4])
def test_a_run_resumed_at_any_step_reads_the_uninterrupted_micro_batches(world, accumulation):
    plan = EpochPlan(rows=1003, world=world, micro_batch=4, accumulation=accumulation)
    total = plan.steps_per_epoch * 3 - 1
    epochs = plan.epochs_for(total)
    assert epochs == 3
    for rank in range(world):
        whole = _stream(plan, rank, epochs)[: total * accumulation]
        for step in range(total):
            epoch, skip = plan.position(step)
            resumed = [(e, rank, i) for e in range(epoch, epochs) for i in range(plan.micro_batches_per_epoch)
                       if e > epoch or i >= skip][: (total - step) * accumulation]
            assert resumed == whole[step * accumulation :], (world, step)


def test_the_plan_agrees_with_the_spec_steps_per_epoch():
    spec = TrainingSpec(perDeviceBatchSize=8, gradientAccumulationSteps=2, maxSteps=10)
    for rows in (16, 100, 1000, 12345):
        for world in (1, 2, 3, 5):
            plan = EpochPlan(rows=rows, world=world, micro_batch=8, accumulation=2)
            assert plan.steps_per_epoch == spec.steps_per_epoch(rows, world)


def test_seeds_and_names():
    assert epoch_seed(7, 0) != epoch_seed(7, 1) != epoch_seed(8, 0)
    assert epoch_seed(1, 0) != epoch_seed(0, 1)
    assert all(0 <= epoch_seed(2**40, e) < 2**32 for e in range(3))
    assert epoch_dataset_name(3) == "train_epoch_3"
    with pytest.raises(ValueError, match="negative"):
        epoch_seed(-1, 0)
    with pytest.raises(ValueError, match="at least 1"):
        EpochPlan(rows=0, world=1, micro_batch=1, accumulation=1)
    with pytest.raises(ValueError, match="negative"):
        EpochPlan(rows=10, world=1, micro_batch=1, accumulation=1).position(-1)
