"""Which rows a run trains on, in which order, and where a resumed run picks the stream up.

The contract (issue 18 item 2): a resumed run (a worker-group restart, `--resume`, a successive
halving trial continuing at a rung) sees exactly the micro-batches the uninterrupted run would
have seen, on any number of workers. With Ray Data no worker holds the whole set, so the order
cannot be a permutation of the whole set that a worker applies to rows it has; it is a pure
function of (rows, seed, epoch, rank) that says which rows of the ingested train split each rank
reads, and the rank fetches only those (train_blocks.py). The design:

* The ingest shuffles every file once with the job's seed and keeps the tokenized train split in
  Ray's object store in a fixed row order (ingest.py). An epoch's order permutes *chunks* of that
  order, `CHUNK_ROWS` consecutive rows each, with a generator seeded by (seed, epoch), and the rows
  inside every chunk with one seeded by (seed, epoch, chunk). That is the order Hugging Face's
  streaming datasets and Ray Data's `randomize_block_order` + local shuffle give: a full shuffle
  once, then per epoch a shuffle of chunks and within them, bounded by a chunk. It needs no Ray work
  when an epoch begins. A seeded `random_shuffle` per epoch did (new tasks, and a split coordinator
  actor per epoch, ~2-3 s each on a 2-core machine: longer than a tiny run's epoch), and a drained
  node starts no new work, so a preemption's save could wait on an epoch that never began
  (DATA_INGEST_STATUS.md).
* Rank r takes positions [r * n, (r + 1) * n) of the epoch's order, n = rows // world: equal
  shares, what `steps_per_epoch` counts with; the last rows // world remainder is not trained that
  epoch (as the in-memory path dropped it). The shares depend on nothing but the figures, so they
  are the same in every execution, after a worker-group restart and after a re-ingest.
* Skip-to-position is arithmetic (`position`): a run resumed at optimizer step s opens epoch
  s // steps_per_epoch and starts its share (s % steps_per_epoch) * accumulation micro-batches in;
  nothing about the data position is stored in the checkpoint beyond the step, which it already
  holds, and nothing before the position is read.

Written by hand: Ray Train has no resumable data position (its dataset shards restart at the
epoch's beginning after a worker-group restart) and no per-rank order that does not depend on the
execution; the arithmetic here connects our step counter to the rows. Pure: numpy only, no Ray, no
torch, so the driver can import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

CHUNK_ROWS = 512  # rows an epoch's order keeps together (module docstring); a worker holds about one chunk's blocks
VALIDATION_DATASET = "validation"  # given whole to every worker (not split): evaluation shards it by index


def epoch_seed(seed: int, epoch: int) -> int:
    """A Ray Data shuffle's seed for stream `epoch` of a job (the ingest's once-per-file shuffle),
    fixed by the job's seed. Ray Data takes a plain int; a linear mix keeps the seeds of nearby
    jobs' streams apart (seed 1's stream 0 is not seed 0's stream 1)."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must not be negative (seed {seed}, epoch {epoch})")
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**32)


@dataclass(frozen=True)
class EpochPlan:
    """The arithmetic of one run's training stream: rows, workers, batch shape."""

    rows: int  # rows in the train split
    world: int  # Ray Train workers
    micro_batch: int  # spec.training.perDeviceBatchSize
    accumulation: int  # spec.training.gradientAccumulationSteps

    def __post_init__(self) -> None:
        if min(self.rows, self.world, self.micro_batch, self.accumulation) < 1:
            raise ValueError(f"every figure of the plan must be at least 1: {self}")

    @property
    def rows_per_rank(self) -> int:
        """Rows each rank reads in one epoch (`rank_rows`): equal shares."""
        return self.rows // self.world

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: every rank the same number of full micro-batches
        (`TrainingSpec.steps_per_epoch`, which the driver uses without this module, agrees)."""
        return max(1, self.rows_per_rank // (self.micro_batch * self.accumulation))

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accumulation

    def empty_micro_batch(self) -> int | None:
        """The first micro-batch of an epoch that no row of a rank's share reaches, or None. Only a
        share smaller than one optimizer step has one (steps_per_epoch is at least 1): its last
        micro-batch is short, and with gradient accumulation the ones after it would be empty."""
        first_empty = -(-self.rows_per_rank // self.micro_batch)
        return first_empty if first_empty < self.micro_batches_per_epoch else None

    def epochs_for(self, total_steps: int) -> int:
        """How many epochs a run of `total_steps` optimizer steps opens."""
        return max(1, -(-total_steps // self.steps_per_epoch))

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, micro-batches of this rank's shard to drop) for a run that continues after
        `step` completed optimizer steps. The same on every rank."""
        if step < 0:
            raise ValueError(f"step must not be negative: {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        return epoch, within * self.accumulation

    def rank_rows(self, seed: int, epoch: int, rank: int, start: int = 0) -> Iterator[np.ndarray]:
        """Rows (indices into the ingested train split) of `rank`'s share of epoch `epoch`, in order,
        from position `start` of the share on, in pieces of at most one chunk."""
        n = self.rows_per_rank
        first, stop = rank * n + start, (rank + 1) * n
        at = 0  # position in the epoch's order where the current chunk begins
        for chunk in np.random.default_rng([seed, epoch]).permutation(-(-self.rows // CHUNK_ROWS)):
            begin = int(chunk) * CHUNK_ROWS
            size = min(self.rows, begin + CHUNK_ROWS) - begin
            low, high = max(first, at), min(stop, at + size)
            if low < high:
                inside = np.random.default_rng([seed, epoch, int(chunk)]).permutation(size)
                yield begin + inside[low - at : high - at]
            at += size
            if at >= stop:
                return
