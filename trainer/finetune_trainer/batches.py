"""A streamed batch of the tokenized columns (ingest.py) as the tensors a model step takes.

Worker side (torch). Padding is to the batch's own longest example, TokenizedSplit.batch's rule
(data.py), which keeps short-text CPU steps cheap; the two go together once the in-memory path
is removed (DATA_INGEST_STATUS.md).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data import IGNORE_INDEX, TokenizedSplit
from .epochs import EpochPlan
from .packing import pad_positions


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
    """This rank's micro-batches, from a run's first (or resumed) step to its last: epochs.py says
    which rows of the train split, in which order, and where a resumed run starts; `reader` fetches
    them (train_blocks.BlockReader). Yields (tensors, tokens), tokens being the batch's real
    (unpadded) token count, counted on the host. `waited` is the seconds the loop spent waiting on
    the input, the figure item 6 of issue 18 reports as a share of training time.

    A thread reads and collates up to `ahead` steps of micro-batches while the loop trains (block
    fetches from other nodes and collating overlap the step). Written by hand: the rows come from
    epochs.py's order, not from a Ray Data iterator with its own prefetch."""

    def __init__(self, plan: EpochPlan, reader: Callable[[np.ndarray], dict[str, np.ndarray]], *, seed: int, rank: int,
                 step: int, total_steps: int, pad_token_id: int, ahead: int = 2):
        self.plan, self.reader, self.seed, self.rank = plan, reader, seed, rank
        self.step, self.total, self.pad, self.ahead = step, total_steps, pad_token_id, max(1, ahead)
        self.waited = 0.0

    def micro_batches(self) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        """The micro-batches in order, read in the calling thread (the read-ahead thread's work)."""
        plan = self.plan
        epoch, skip = plan.position(self.step)
        left = (self.total - self.step) * plan.accumulation  # micro-batches still to train on
        while left > 0:
            rows = _in_batches(plan.rank_rows(self.seed, epoch, self.rank, start=skip * plan.micro_batch), plan.micro_batch)
            for index in range(skip, plan.micro_batches_per_epoch):
                # every rank has rows_per_rank rows an epoch; the plan's micro-batches fit in them, the last one
                # short only when a rank holds less than one step (steps_per_epoch is at least 1)
                take = next(rows, None)
                if take is None:
                    raise RuntimeError(f"epoch {epoch}: rank {self.rank}'s {plan.rows_per_rank} rows end before micro-batch "
                                       f"{index} of the plan's {plan.micro_batches_per_epoch}")
                batch = self.reader(take)
                yield collate(batch, self.pad), int(sum(len(row) for row in batch["input_ids"]))
                left -= 1
                if left == 0:
                    return
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        left = (self.total - self.step) * self.plan.accumulation
        ahead = _ReadAhead(self.micro_batches(), capacity=self.ahead * self.plan.accumulation)
        try:
            for _ in range(left):
                clock = time.perf_counter()
                item = ahead.take()
                self.waited += time.perf_counter() - clock
                yield item
        finally:
            ahead.stop()


def _in_batches(pieces: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Row indices regrouped from pieces (epochs.rank_rows: one per chunk) into batches of `size`,
    the last one possibly short."""
    pending: list[np.ndarray] = []
    count = 0
    for piece in pieces:
        while len(piece):
            part, piece = piece[: size - count], piece[size - count :]
            pending.append(part)
            count += len(part)
            if count == size:
                yield np.concatenate(pending)
                pending, count = [], 0
    if count:
        yield np.concatenate(pending)


class _ReadAhead:
    """Items of an iterator, read by a daemon thread into a buffer of `capacity`; an error the
    iterator raised comes out of `take` in its place. A daemon: a thread blocked in a fetch when
    the worker ends never holds its exit."""

    _END = object()

    def __init__(self, items: Iterator[Any], capacity: int):
        self.items, self.capacity = items, max(1, capacity)
        self.buffer: collections.deque[Any] = collections.deque()
        self.changed = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._read, name="epoch-stream-read-ahead", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for item in self.items:
                with self.changed:
                    self.changed.wait_for(lambda: self.stopped or len(self.buffer) < self.capacity)
                    if self.stopped:
                        return
                    self.buffer.append(item)
                    self.changed.notify_all()
            last: Any = self._END
        except BaseException as err:  # handed to the loop, which raises it where it reads
            last = _Failed(err)
        with self.changed:
            self.buffer.append(last)
            self.changed.notify_all()

    def take(self) -> Any:
        with self.changed:
            self.changed.wait_for(lambda: bool(self.buffer))
            item = self.buffer.popleft()
            self.changed.notify_all()
        if item is self._END:
            raise RuntimeError("the training stream ended before the plan's last micro-batch")
        if isinstance(item, _Failed):
            raise item.error
        return item

    def stop(self) -> None:
        with self.changed:
            self.stopped = True
            self.changed.notify_all()


@dataclass
class _Failed:
    error: BaseException
