"""Each epoch's training stream, split between the workers when the epoch begins, not before.

epochs.py says why every epoch is its own seeded shuffle of the train split, and its split
between the ranks starts from scratch. Ray Train's own route for that is a dataset per epoch given
to the TorchTrainer. `DataConfig.configure` then calls `streaming_split` on every one of them
when the worker group starts, and each split is a SplitCoordinator actor, a process of its own
(~2 s to start, ~120 MB). A run of 800 steps over 240 rows opens 54 epochs: 54 processes for the
whole run, most of them idle until their epoch (DATA_INGEST_STATUS.md measured this, and it
dominated a tiny run).

So the workers split each epoch themselves (written by hand: Ray Train has no lazy per-epoch
split). Rank 0 calls `streaming_split(world, equal=True)` on epoch e's dataset when the epoch
begins. It hands split i to rank i through one `broadcast_object_list` on a gloo group of its
own (the shards are asked for from EpochStream's read-ahead thread); Ray Data documents its split
iterators as picklable, so they can be passed to other processes. Rank 0 starts epoch e+1's split at the same moment, so its coordinator is up
by the time it is needed. At most two coordinators are alive. Each epoch's split is made exactly
as before (`preserve_order`, `equal=True`), so each rank's shard is unchanged, and so is the
exact-resume argument.

Rank 0 keeps the coordinators' handles (the actors live while their owner holds them) until the
next epoch's broadcast. Every rank reaches that broadcast only after its iterator of the epoch
before is done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .epochs import epoch_dataset_name, epoch_seed

if TYPE_CHECKING:
    import ray.data
    from ray.data import DataIterator

Broadcast = Callable[[Any], Any]  # rank 0's object in, the same object out on every rank


def epoch_dataset(train: ray.data.Dataset, seed: int, epoch: int) -> ray.data.Dataset:
    """Epoch `epoch`'s order of the train split: a seeded shuffle, executed in order.

    The workers may hold every CPU of the cluster (the quickstart: 2 workers x 1 CPU on 2 CPUs),
    and a shuffle task that waited for a free CPU would never start: the run would hang at its
    first batch. So its tasks reserve no CPU (they move blocks already tokenized)."""
    from ray.data import ExecutionOptions

    shuffled = train.random_shuffle(seed=epoch_seed(seed, epoch), num_cpus=0)
    shuffled.context.execution_options = ExecutionOptions(preserve_order=True)  # the split's determinism (epochs.py)
    shuffled.set_name(epoch_dataset_name(epoch))  # what the Ray dashboard's Data view lists
    return shuffled


def split_epoch(train: ray.data.Dataset, seed: int, epoch: int, world: int) -> list[DataIterator]:
    """`world` iterators over epoch `epoch`, rank i's shard from the i-th (one coordinator actor)."""
    return epoch_dataset(train, seed, epoch).streaming_split(world, equal=True)


def torch_broadcast() -> Broadcast:
    """A broadcast of rank 0's object to every rank on a gloo group of its own, made here (a
    collective: every rank makes it, in the same order as other groups). Its own group because
    the shards are handed out from EpochStream's read-ahead thread, while the loop's thread runs
    the step's collectives on Ray Train's process group: two threads must not share a group."""
    import torch.distributed as dist

    group = dist.new_group(backend="gloo")

    def broadcast(obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    return broadcast


class EpochShards:
    """`shards(epoch)`: this rank's iterator over epoch `epoch`. A collective: every rank calls it
    for the same epochs in the same order (EpochStream does, from the same plan), and every rank
    constructs it at the same point (it makes its broadcast's process group)."""

    def __init__(self, train: ray.data.Dataset, *, seed: int, epochs: int, rank: int, world: int,
                 broadcast: Broadcast | None = None):
        self.train, self.seed, self.epochs, self.rank, self.world = train, seed, epochs, rank, world
        self.broadcast = (broadcast or torch_broadcast()) if world > 1 else (lambda obj: obj)
        self._held: dict[int, list[DataIterator]] = {}  # rank 0: the splits whose coordinators must stay alive

    def __call__(self, epoch: int) -> DataIterator:
        held: dict[int, list[DataIterator]] = {}
        if self.rank == 0:
            held[epoch] = self._held.get(epoch) or split_epoch(self.train, self.seed, epoch, self.world)
            if epoch + 1 < self.epochs:  # the next one's coordinator starts while this epoch trains
                held[epoch + 1] = split_epoch(self.train, self.seed, epoch + 1, self.world)
        mine = self.broadcast(held.get(epoch))[self.rank]
        if self.rank == 0:  # only now: every rank is past the epoch before, its coordinator may go
            self._held = held
        return mine
