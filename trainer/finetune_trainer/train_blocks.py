"""The ingested train split as its blocks in Ray's object store, and a worker's reads of its rows.

The driver keeps the tokenized train split materialized (ingest.py) and hands the workers only
the references to its blocks and their row counts (`TrainBlocks`): a few bytes per block, so a
trial or a restarted worker group gets them in its config. Each worker asks epochs.py which rows
of the split it trains on, in which order, and fetches just the blocks that hold them, a few at
a time (`BlockReader`): it never holds the whole split, and nothing new runs in Ray when an epoch
begins, which a drained node could not start.

Written by hand: Ray Data's per-worker route (`streaming_split`, through Ray Train's
`get_dataset_shard`) assigns blocks by its own greedy rule within one execution, starts a split
coordinator actor per dataset and a shuffle per epoch; a resumable, execution-independent order
is epochs.py's arithmetic, and reading given rows of a materialized dataset is this module.
Blocks are read with Ray Data's own BlockAccessor, so a batch has the layout `iter_batches`
gives (ragged columns as object arrays, equal-length ones as 2-D arrays).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import ray
    import ray.data


@dataclass(frozen=True)
class TrainBlocks:
    """The materialized train split: its blocks' references, in the split's row order, and rows."""

    refs: tuple[ray.ObjectRef, ...]
    rows: tuple[int, ...]

    @classmethod
    def of(cls, dataset: ray.data.Dataset) -> TrainBlocks:
        """A materialized dataset's blocks, in order (no data moves: metadata the driver has)."""
        refs: list[ray.ObjectRef] = []
        rows: list[int] = []
        for bundle in dataset.iter_internal_ref_bundles():
            for ref, meta in zip(bundle.block_refs, bundle.metadata, strict=True):
                if meta.num_rows is None:
                    raise RuntimeError("a materialized block without a row count")  # Ray sets it on materialize
                refs.append(ref)
                rows.append(meta.num_rows)
        return cls(tuple(refs), tuple(rows))

    @property
    def total(self) -> int:
        return sum(self.rows)


class BlockReader:
    """Rows of a TrainBlocks by index, as numpy batches; keeps the last `keep` blocks it fetched
    (a chunk of an epoch's order spans one or two blocks, and is read in several batches)."""

    def __init__(self, blocks: TrainBlocks, keep: int = 2):
        self.blocks = blocks
        self.starts = np.cumsum([0, *blocks.rows])  # block b holds rows [starts[b], starts[b + 1])
        self.keep = max(1, keep)
        self.cache: collections.OrderedDict[int, Any] = collections.OrderedDict()

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The rows `rows` (indices into the split), in that order, as one numpy batch."""
        from ray.data._internal.delegating_block_builder import DelegatingBlockBuilder
        from ray.data.block import BlockAccessor

        if len(rows) == 0:
            raise ValueError("an empty batch was asked for")
        if rows.min() < 0 or rows.max() >= self.starts[-1]:
            raise IndexError(f"rows outside the train split's {self.starts[-1]}")
        owners = np.searchsorted(self.starts, rows, side="right") - 1
        builder = DelegatingBlockBuilder()
        cuts = np.flatnonzero(np.diff(owners)) + 1  # runs of consecutive rows in one block
        for run in np.split(np.arange(len(rows)), cuts):
            owner = int(owners[run[0]])
            builder.add_block(BlockAccessor.for_block(self._block(owner)).take((rows[run] - self.starts[owner]).tolist()))
        return BlockAccessor.for_block(builder.build()).to_batch_format("numpy")

    def _block(self, index: int) -> Any:
        import ray

        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        block = ray.get(self.blocks.refs[index])
        self.cache[index] = block
        while len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return block
