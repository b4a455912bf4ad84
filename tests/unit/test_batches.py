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
