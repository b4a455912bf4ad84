"""Which rows a run trains on, in which order, and where a resumed run picks the stream up.

The contract (issue 18 item 2): a resumed run (a worker-group restart, `--resume`, a successive
halving trial continuing at a rung) sees exactly the micro-batches the uninterrupted run would
have seen, on any number of workers. With Ray Data no worker holds the whole set, so the order
cannot be an index permutation the worker applies (the in-memory path did that); it has to be a
property of the data streams themselves. The design:

* Epoch `e` is its own Ray Data dataset: the tokenized train split shuffled with
  `random_shuffle(seed=epoch_seed(seed, e))`. A seeded shuffle of the same blocks gives the same
  rows in the same order on every execution; the train split's block layout is fixed by the
  ingest (a fixed `override_num_blocks` on read, `preserve_order` on), so the blocks are the same
  whichever node count or CPU count executes it.
* Each epoch dataset is split between the workers with `streaming_split(world, equal=True)`, when
  the epoch begins (epoch_split.py: rank 0 splits, a broadcast hands out the shards; Ray Train's
  own route would split every epoch at the worker group's start). With `preserve_order` set, Ray's OutputSplitter drops its
  locality hints and hands each block, in stream order, to the split that has the fewest rows so
  far (ray/data/_internal/execution/operators/output_splitter.py): a pure function of the block
  sequence, so rank r's shard of epoch e is the same in every execution. `equal=True` gives each
  rank floor(N / world) rows, which is what `steps_per_epoch` counts with.
* One dataset per epoch rather than one dataset iterated E times: Ray re-executes a dataset with
  the same seed on every iteration (the same order each epoch), and one concatenated stream would
  let the splitter's balance carry over from one epoch into the next, so the shard of epoch 1
  would depend on whether epoch 0 was part of the execution. A resumed run starts its first
  epoch's split from scratch, exactly like the uninterrupted run did.
* Skip-to-position is therefore arithmetic only (`position`): a run resumed at optimizer step s
  opens epoch s // steps_per_epoch and drops the first (s % steps_per_epoch) * accumulation
  micro-batches of its own shard; every rank drops the same number, so the equal split's barrier
  (every iterator starts the epoch) holds. Nothing about the data position is stored in the
  checkpoint beyond the step, which it already holds.

Written by hand: Ray Train has no resumable data position (its shards restart at the epoch's
beginning after a worker-group restart); the arithmetic here is what connects our step counter
to Ray Data's deterministic streams. Pure: no Ray, no torch, so the driver can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

EPOCH_DATASET_PREFIX = "train_epoch_"
VALIDATION_DATASET = "validation"  # given whole to every worker (not split): evaluation shards it by index


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s shuffle; distinct per epoch, fixed by the job's seed.

    Ray Data takes a plain int; a linear mix keeps seeds of nearby jobs' epochs apart (seed 1's
    epoch 0 is not seed 0's epoch 1)."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must not be negative (seed {seed}, epoch {epoch})")
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**32)


def epoch_dataset_name(epoch: int) -> str:
    """The name of epoch `epoch`'s training stream (the Ray dashboard's Data view lists it)."""
    return f"{EPOCH_DATASET_PREFIX}{epoch}"


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
        """What `streaming_split(world, equal=True)` gives each rank of one epoch."""
        return self.rows // self.world

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: every rank the same number of full micro-batches
        (`TrainingSpec.steps_per_epoch`, which the driver uses without this module, agrees)."""
        return max(1, self.rows_per_rank // (self.micro_batch * self.accumulation))

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accumulation

    def epochs_for(self, total_steps: int) -> int:
        """How many epoch datasets a run of `total_steps` optimizer steps opens."""
        return max(1, -(-total_steps // self.steps_per_epoch))

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, micro-batches of this rank's shard to drop) for a run that continues after
        `step` completed optimizer steps. The same on every rank."""
        if step < 0:
            raise ValueError(f"step must not be negative: {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        return epoch, within * self.accumulation
