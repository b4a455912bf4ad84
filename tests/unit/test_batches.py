"""batches.collate pads a streamed batch exactly as the in-memory TokenizedSplit.batch does, so
moving to Ray Data changes no step's tensors."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from finetune_trainer.batches import EpochStream, collate
from finetune_trainer.data import TokenizedSplit
from finetune_trainer.epochs import EpochPlan


def _ragged(rows):
    column = np.empty(len(rows), dtype=object)
    column[:] = [np.asarray(r, dtype=np.int32) for r in rows]
    return column


def test_collate_matches_the_in_memory_batch_for_both_label_kinds():
    ids = [[5, 6, 7], [8], [9, 10]]
    types = [[0, 0, 1], [0], [1, 1]]
    classes = TokenizedSplit([np.asarray(r, dtype=np.int32) for r in ids], np.asarray([1, 0, 2]),
                             [np.asarray(r, dtype=np.int32) for r in types])
    want = classes.batch([0, 1, 2], pad_token_id=3)
    got = collate({"input_ids": _ragged(ids), "labels": np.asarray([1, 0, 2]), "token_type_ids": _ragged(types)}, 3)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    causal = TokenizedSplit([np.asarray(r, dtype=np.int32) for r in ids], [np.asarray(r, dtype=np.int32) for r in ids])
    want = causal.batch([2, 0], pad_token_id=0)
    got = collate({"input_ids": _ragged([ids[2], ids[0]]), "labels": _ragged([ids[2], ids[0]])}, 0)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert got["labels"].tolist() == [[9, 10, -100], [5, 6, 7]]


def test_gather_rebuilds_a_small_split_from_its_batches_for_both_label_kinds():
    """Validation and test reach the workers as datasets; gather must give evaluation the same
    rows, labels and token types as the in-memory split, whatever the batch edges."""
    from finetune_trainer.batches import gather

    ids = [[5, 6, 7], [8], [9, 10]]
    types = [[0, 0, 1], [0], [1, 1]]
    got = gather([{"input_ids": _ragged(ids[:2]), "labels": np.asarray([1, 0]), "token_type_ids": _ragged(types[:2])},
                  {"input_ids": _ragged(ids[2:]), "labels": np.asarray([2]), "token_type_ids": _ragged(types[2:])}])
    assert [r.tolist() for r in got.input_ids] == ids and got.labels.tolist() == [1, 0, 2]
    assert got.token_type_ids is not None and [r.tolist() for r in got.token_type_ids] == types
    causal = gather([{"input_ids": _ragged(ids[:1]), "labels": _ragged(ids[:1])},
                     {"input_ids": _ragged(ids[1:]), "labels": _ragged(ids[1:])}])
    assert isinstance(causal.labels, list) and [r.tolist() for r in causal.labels] == ids
    assert causal.token_type_ids is None and causal.num_tokens() == 6


def test_packed_blocks_collate_and_gather_as_the_in_memory_packed_split():
    """spec.data.packing on the stream: position ids restart per example and no attention mask is
    sent, exactly as TokenizedSplit.batch sends a packed split (packing.py says why)."""
    from finetune_trainer.batches import gather
    from finetune_trainer.packing import pack

    examples = [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]]
    blocks = pack(examples, examples, 5)
    split = TokenizedSplit(blocks.input_ids, blocks.labels, position_ids=blocks.position_ids, examples=blocks.examples)
    column = {"input_ids": _ragged(blocks.input_ids), "labels": _ragged(blocks.labels),
              "position_ids": _ragged(blocks.position_ids),
              "examples": np.asarray([int((p == 0).sum()) for p in blocks.position_ids])}
    want, got = split.batch(list(range(len(split))), pad_token_id=0), collate(column, 0)
    assert want.keys() == got.keys() and "attention_mask" not in got
    for key in want:
        assert torch.equal(want[key], got[key]), key
    back = gather([column])
    assert back.examples == 4 and back.position_ids is not None
    assert [p.tolist() for p in back.position_ids] == [p.tolist() for p in blocks.position_ids]


def test_per_token_labels_of_one_length_stay_per_token():
    """Ray hands a column whose rows all have one length (causal-lm examples cut to maxSeqLength) as
    one 2-D int array, not an object array: gather and collate must still treat it as per-token
    labels (test_samples' probes failed on the branch: "generated samples need causal-lm data")."""
    from finetune_trainer.batches import gather
    from finetune_trainer.generation import sample_prompts

    ids = [[5, 6, 7], [8, 9, 10]]
    labels = [[-100, 6, 7], [-100, -100, 10]]
    got = gather([{"input_ids": np.asarray(ids, dtype=np.int32), "labels": np.asarray(labels, dtype=np.int64)}])
    assert isinstance(got.labels, list) and [r.tolist() for r in got.labels] == labels
    assert [p.tolist() for p in sample_prompts(got, 2)] == [[5], [8, 9]]
    want = TokenizedSplit([np.asarray(r) for r in ids], [np.asarray(r) for r in labels]).batch([0, 1], pad_token_id=0)
    streamed = collate({"input_ids": np.asarray(ids, dtype=np.int32), "labels": np.asarray(labels, dtype=np.int64)}, 0)
    assert want.keys() == streamed.keys()
    for key in want:
        assert torch.equal(want[key], streamed[key]), key


def _reader(asked: list[int] | None = None):
    """Stands in for train_blocks.BlockReader over rows whose only token is their index + 1."""

    def read(rows):
        if asked is not None:
            asked.extend(int(r) for r in rows)
        ids = np.empty(len(rows), dtype=object)  # a ragged column, as Ray gives it
        ids[:] = [np.array([int(r) + 1]) for r in rows]
        return {"input_ids": ids, "labels": np.zeros(len(rows), dtype=np.int64)}
    return read


def _ids(item) -> list[int]:
    return [t - 1 for t in item[0]["input_ids"][:, 0].tolist()]


@pytest.mark.parametrize("world", [1, 2])
def test_epoch_stream_reads_each_rank_s_share_and_resumes_at_any_step(world):
    plan = EpochPlan(rows=21, world=world, micro_batch=2, accumulation=2)
    total = plan.steps_per_epoch * 2 + 1  # into a third epoch
    for rank in range(world):
        whole = [_ids(b) for b in EpochStream(plan, _reader(), seed=4, rank=rank, step=0, total_steps=total, pad_token_id=0)]
        assert len(whole) == total * 2
        epoch0 = [r for piece in plan.rank_rows(4, 0, rank) for r in piece.tolist()]
        assert [r for b in whole[: plan.micro_batches_per_epoch] for r in b] == epoch0[: plan.micro_batches_per_epoch * 2]
        for step in range(1, total):
            asked: list[int] = []
            resumed = [_ids(b) for b in EpochStream(plan, _reader(asked), seed=4, rank=rank, step=step, total_steps=total,
                                                     pad_token_id=0)]
            assert resumed == whole[step * 2 :], (rank, step)
            assert asked == [r for b in resumed for r in b]  # nothing before the position is read


def test_epoch_stream_reads_ahead_a_bounded_amount():
    plan = EpochPlan(rows=40, world=1, micro_batch=2, accumulation=2)
    asked: list[int] = []
    stream = EpochStream(plan, _reader(asked), seed=1, rank=0, step=0, total_steps=8, pad_token_id=0, ahead=2)
    for index, _ in enumerate(stream):
        time.sleep(0.01)
        assert len(asked) // 2 - (index + 1) <= 2 * 2 + 1  # the buffer, and the one micro-batch the reader holds


def test_epoch_stream_raises_what_its_reader_raised():
    plan = EpochPlan(rows=10, world=1, micro_batch=2, accumulation=1)
    calls = []

    def read(rows):
        calls.append(rows)
        if len(calls) == 4:
            raise ValueError("lost block")
        return _reader()(rows)

    stream = iter(EpochStream(plan, read, seed=0, rank=0, step=0, total_steps=8, pad_token_id=0))
    assert len([next(stream) for _ in range(3)]) == 3
    with pytest.raises(ValueError, match="lost block"):
        next(stream)
