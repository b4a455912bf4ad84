"""A streamed batch of the tokenized columns (ingest.py) as the tensors a model step takes.

Worker side (torch). Padding is to the batch's own longest example, TokenizedSplit.batch's rule
(data.py), which keeps short-text CPU steps cheap; the two go together once the in-memory path
is removed (DATA_INGEST_STATUS.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .data import IGNORE_INDEX, TokenizedSplit
from .epochs import EpochPlan
from .packing import pad_positions

if TYPE_CHECKING:
    from ray.data import DataIterator


def per_token(labels: np.ndarray) -> bool:
    """Whether a numpy batch's labels column is per-token (causal-lm) rather than class ids. Ray
    gives a ragged column as an object array, but rows of one length (examples cut to maxSeqLength)
    as one 2-D int array: the number of dimensions tells, not the dtype alone."""
    return labels.dtype == object or labels.ndim > 1


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
    if not per_token(labels):
        out["labels"] = torch.tensor(labels, dtype=torch.long)  # a copy: Ray's numpy batches are read-only views
    else:
        padded = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        for j, row in enumerate(labels):
            padded[j, : len(row)] = row
        out["labels"] = torch.from_numpy(padded)
    if "position_ids" in batch:  # packed blocks: position ids and no attention mask (packing.pad_positions says why)
        out.pop("attention_mask")
        out["position_ids"] = torch.from_numpy(np.stack([pad_positions(p, width) for p in batch["position_ids"]]))
    if "token_type_ids" in batch:
        types = np.zeros((len(rows), width), dtype=np.int64)
        for j, row in enumerate(batch["token_type_ids"]):
            types[j, : len(row)] = row
        out["token_type_ids"] = torch.from_numpy(types)
    return out


def gather(batches: Iterable[dict[str, np.ndarray]]) -> TokenizedSplit:
    """A small split (validation, test) read whole from its dataset's numpy batches into the
    TokenizedSplit evaluation batches from. Held-out splits are capped and small; evaluating them
    all on every rank (evaluation.evaluate shards by index) needs them addressable by row."""
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    types: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    examples = 0
    class_labels: list[np.ndarray] = []
    for batch in batches:
        ids += list(batch["input_ids"])
        if per_token(batch["labels"]):
            labels += list(batch["labels"])
        else:
            class_labels.append(np.asarray(batch["labels"], dtype=np.int64))
        if "token_type_ids" in batch:
            types += list(batch["token_type_ids"])
        if "position_ids" in batch:
            positions += list(batch["position_ids"])
            examples += int(batch["examples"].sum())
    return TokenizedSplit(ids, np.concatenate(class_labels) if class_labels else labels, token_type_ids=types or None,
                          position_ids=positions or None, examples=examples if positions else None)


class EpochStream:
    """This rank's micro-batches, from a run's first (or resumed) step to its last, read from each
    epoch's shard (`shards(epoch)`: epoch_split.EpochShards; epochs.py: which rows, in which order,
    where a resumed run starts). `waited` is the seconds the loop spent waiting on the input
    pipeline, the figure item 6 of issue 18 reports as a share of training time. Yields (tensors,
    tokens), tokens being the batch's real (unpadded) token count, counted on the host."""

    def __init__(self, plan: EpochPlan, shards: Callable[[int], DataIterator], *, step: int, total_steps: int, pad_token_id: int):
        self.plan, self.shards, self.step, self.total, self.pad = plan, shards, step, total_steps, pad_token_id
        self.waited = 0.0

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        epoch, skip = self.plan.position(self.step)
        left = (self.total - self.step) * self.plan.accumulation  # micro-batches still to train on
        while left > 0:
            clock = time.perf_counter()
            shard = self.shards(epoch)
            self.waited += time.perf_counter() - clock
            batches = iter(shard.iter_batches(batch_size=self.plan.micro_batch, batch_format="numpy", drop_last=False))
            for index in range(self.plan.micro_batches_per_epoch):
                clock = time.perf_counter()
                batch = next(batches, None)
                self.waited += time.perf_counter() - clock
                # equal=True gives every rank rows_per_rank rows; the plan's micro-batches fit in them, the
                # last one short only when a rank holds less than one step (steps_per_epoch is at least 1)
                if batch is None:
                    raise RuntimeError(f"epoch {epoch}: the shard ended after {index} micro-batches, the plan counts "
                                       f"{self.plan.micro_batches_per_epoch}")
                if index < skip:
                    continue
                yield collate(batch, self.pad), int(sum(len(row) for row in batch["input_ids"]))
                left -= 1
                if left == 0:
                    return
            epoch, skip = epoch + 1, 0
