"""A streamed batch of the tokenized columns (ingest.py) as the tensors a model step takes.

Worker side (torch). Padding is to the batch's own longest example, TokenizedSplit.batch's rule
(data.py), which keeps short-text CPU steps cheap; the two go together once the in-memory path
is removed (DATA_INGEST_STATUS.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .data import IGNORE_INDEX


def collate(batch: dict[str, np.ndarray], pad_token_id: int) -> dict[str, Any]:
    """A numpy batch of the tokenized columns, right-padded to its longest example as torch
    tensors (padded labels are -100): TokenizedSplit.batch's rule, on a streamed batch."""
    rows = list(batch["input_ids"])
    width = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, row in enumerate(rows):
        ids[j, : len(row)] = row
        mask[j, : len(row)] = 1
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    labels = batch["labels"]
    if labels.dtype != object:
        out["labels"] = torch.as_tensor(labels, dtype=torch.long)
    else:
        padded = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        for j, row in enumerate(labels):
            padded[j, : len(row)] = row
        out["labels"] = torch.from_numpy(padded)
    if "token_type_ids" in batch:
        types = np.zeros((len(rows), width), dtype=np.int64)
        for j, row in enumerate(batch["token_type_ids"]):
            types[j, : len(row)] = row
        out["token_type_ids"] = torch.from_numpy(types)
    return out
