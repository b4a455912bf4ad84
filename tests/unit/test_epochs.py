"""epochs.py's arithmetic: which rows each rank reads in an epoch, and where a resumed run
continues, on any number of workers. The Ray side (the rows fetched from the ingested split's
blocks, a real Ray Train run resumed mid-epoch) is tests/integration/test_ingest.py."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_trainer.epochs import CHUNK_ROWS, EpochPlan, epoch_seed
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
    with pytest.raises(ValueError, match="negative"):
        epoch_seed(-1, 0)
    with pytest.raises(ValueError, match="at least 1"):
        EpochPlan(rows=0, world=1, micro_batch=1, accumulation=1)
    with pytest.raises(ValueError, match="negative"):
        EpochPlan(rows=10, world=1, micro_batch=1, accumulation=1).position(-1)


def _share(plan: EpochPlan, seed: int, epoch: int, rank: int, start: int = 0) -> list[int]:
    return np.concatenate(list(plan.rank_rows(seed, epoch, rank, start)) or [np.array([], dtype=int)]).tolist()


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_each_epoch_gives_every_rank_an_equal_disjoint_share_of_a_permutation(world):
    rows = 3 * CHUNK_ROWS + 77  # a short last chunk
    plan = EpochPlan(rows=rows, world=world, micro_batch=4, accumulation=1)
    for epoch in range(3):
        shares = [_share(plan, 11, epoch, rank) for rank in range(world)]
        assert [len(s) for s in shares] == [rows // world] * world
        every = [r for s in shares for r in s]
        assert len(set(every)) == len(every) and set(every) <= set(range(rows))
        assert every == _share(EpochPlan(rows=rows, world=1, micro_batch=4, accumulation=1), 11, epoch, 0)[: len(every)]
    assert _share(plan, 11, 0, 0) != _share(plan, 11, 1, 0)  # every epoch its own order
    assert _share(plan, 11, 0, 0) != _share(plan, 12, 0, 0)  # the job's seed decides it


def test_rows_stay_within_their_chunk_and_are_mixed_inside_it():
    plan = EpochPlan(rows=4 * CHUNK_ROWS, world=1, micro_batch=4, accumulation=1)
    pieces = list(plan.rank_rows(5, 2, 0))
    assert len(pieces) == 4
    assert all(len({int(r) // CHUNK_ROWS for r in piece}) == 1 for piece in pieces)  # one chunk a piece
    assert sorted(int(p[0]) // CHUNK_ROWS for p in pieces) == [0, 1, 2, 3]
    assert all(p.tolist() != sorted(p.tolist()) for p in pieces)


@pytest.mark.parametrize("world", [1, 3])
def test_a_share_read_from_any_position_is_the_tail_of_the_whole_share(world):
    plan = EpochPlan(rows=2 * CHUNK_ROWS + 5, world=world, micro_batch=4, accumulation=1)
    for rank in range(world):
        whole = _share(plan, 3, 1, rank)
        for start in (0, 1, CHUNK_ROWS // world - 1, CHUNK_ROWS, len(whole) - 1, len(whole)):
            assert _share(plan, 3, 1, rank, start) == whole[start:], (rank, start)


def test_a_share_smaller_than_one_step_names_its_first_empty_micro_batch():
    assert EpochPlan(rows=100, world=2, micro_batch=4, accumulation=2).empty_micro_batch() is None
    assert EpochPlan(rows=10, world=2, micro_batch=4, accumulation=2).empty_micro_batch() is None  # 4 + 1 rows: short, not empty
    assert EpochPlan(rows=10, world=2, micro_batch=4, accumulation=3).empty_micro_batch() == 2  # 4, 1, then none
    assert EpochPlan(rows=3, world=4, micro_batch=2, accumulation=1).empty_micro_batch() == 0  # fewer rows than workers
