"""batches.collate pads a streamed batch exactly as the in-memory TokenizedSplit.batch does, so
moving to Ray Data changes no step's tensors."""

from __future__ import annotations

import threading
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


class _Shard:
    """Stands in for a Ray Data split iterator: `iter_batches` over fixed numpy batches of one
    epoch, or blocked (a drained node: the epoch's split never starts) until `release` is set."""

    def __init__(self, epoch: int, rows: int, blocked: threading.Event | None = None):
        self.epoch, self.rows, self.blocked = epoch, rows, blocked

    def iter_batches(self, *, batch_size, batch_format, drop_last):
        if self.blocked is not None:
            self.blocked.wait()
        for start in range(0, self.rows, batch_size):
            rows = range(start, min(start + batch_size, self.rows))
            ids = np.empty(len(rows), dtype=object)  # a ragged column, as Ray gives it
            ids[:] = [np.array([self.epoch * 1000 + i + 1]) for i in rows]
            yield {"input_ids": ids, "labels": np.zeros(len(rows), dtype=np.int64)}


def _ids(item) -> list[int]:
    return item[0]["input_ids"][:, 0].tolist()


def test_epoch_stream_reads_ahead_in_order_and_resumes_mid_epoch():
    plan = EpochPlan(rows=10, world=1, micro_batch=2, accumulation=1)  # 5 steps an epoch
    whole = [_ids(b) for b in EpochStream(plan, lambda e: _Shard(e, 10), step=0, total_steps=12, pad_token_id=0)]
    assert len(whole) == 12 and whole[5] == [1001, 1002]  # epoch 1 starts at step 5
    resumed = [_ids(b) for b in EpochStream(plan, lambda e: _Shard(e, 10), step=7, total_steps=12, pad_token_id=0)]
    assert resumed == whole[7:]


def test_epoch_stream_holds_its_lookahead_before_each_step():
    """Before step k is trained, steps k .. k+2 are already read (or the run ends first), and the
    reader stops at that: the buffer is bounded."""
    plan = EpochPlan(rows=8, world=1, micro_batch=2, accumulation=2)  # 2 steps an epoch, 4 micro-batches
    read: list[int] = []

    def shards(epoch):
        shard = _Shard(epoch, 8)
        original = shard.iter_batches

        def counted(**kwargs):
            for batch in original(**kwargs):
                read.append(epoch)
                yield batch
        shard.iter_batches = counted  # type: ignore[method-assign]
        return shard

    stream = EpochStream(plan, shards, step=0, total_steps=7, pad_token_id=0, lookahead=3)
    held = []
    for index, _ in enumerate(stream):
        if index % 2 == 0:
            held.append(len(read) - index)  # micro-batches read beyond the ones already taken
    need = [min(6, 14 - index) for index in range(0, 14, 2)]  # 3 steps of 2 micro-batches, or the rest of the 14
    assert all(h >= n for h, n in zip(held, need, strict=True)), (held, need)
    assert max(held) <= 6 + 1  # bounded: the buffer, and the one item the reader holds while it waits for room


def test_epoch_stream_after_a_notice_trains_what_it_holds_without_waiting_for_a_new_epoch():
    """A drained node starts no epoch split: with the notice seen, the steps already read ahead
    are trained and nothing waits on the epoch that cannot begin; without it the loop would."""
    plan = EpochPlan(rows=10, world=1, micro_batch=2, accumulation=1)  # 5 steps an epoch
    drained = threading.Event()  # never set: epoch 1's split never starts
    noticed = threading.Event()

    def shards(epoch):
        return _Shard(epoch, 10, blocked=drained if epoch > 0 else None)

    stream = EpochStream(plan, shards, step=0, total_steps=10, pad_token_id=0, lookahead=3, noticed=noticed.is_set)
    taken: list[list[int]] = []
    done = threading.Event()

    def train():
        for index, item in enumerate(stream):
            taken.append(_ids(item))
            if index == 1:
                noticed.set()  # the notice arrives during step 2; epoch 0 has 3 steps left
        done.set()

    threading.Thread(target=train, daemon=True).start()
    deadline = time.time() + 10
    while len(taken) < 5 and time.time() < deadline:
        time.sleep(0.05)
    assert [t[0] for t in taken] == [1, 3, 5, 7, 9]  # all of epoch 0, though epoch 1 can never begin
    assert not done.is_set()  # and nothing past it
    assert stream.waited < 5


def test_epoch_stream_raises_what_its_reader_raised():
    plan = EpochPlan(rows=10, world=1, micro_batch=2, accumulation=1)

    def shards(epoch):
        if epoch == 1:
            raise ValueError("no split")
        return _Shard(epoch, 10)

    stream = iter(EpochStream(plan, shards, step=0, total_steps=8, pad_token_id=0))
    got = [next(stream) for _ in range(5)]
    assert len(got) == 5
    with pytest.raises(ValueError, match="no split"):
        next(stream)
