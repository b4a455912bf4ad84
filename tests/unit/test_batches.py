"""batches.collate pads a streamed batch exactly as the in-memory TokenizedSplit.batch does, so
moving to Ray Data changes no step's tensors."""

from __future__ import annotations

import numpy as np
import torch

from finetune_trainer.batches import collate
from finetune_trainer.data import TokenizedSplit


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
