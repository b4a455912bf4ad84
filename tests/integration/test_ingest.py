"""The Ray Data ingest (ingest.py) and its exact-resume arithmetic (epochs.py) on a real local Ray.

One setup, several checks (the suite's budget): the figures agree with data.prepare on the same
file; each rank's shard of an epoch is the same in a second execution and after re-ingesting in a
"new driver" (what `--resume` and a worker-group restart see); the shards are disjoint and equal;
epochs differ; a run resumed at step s reads exactly the uninterrupted run's micro-batches from s on.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from tests.integration import fault_kit, tiny


def _job_data(path, **extra):
    from finetune_trainer.spec import DataSpec

    return DataSpec.model_validate({"train": str(path), "validationSplit": 0.2, "testSplit": 0.1, "maxSeqLength": 32,
                                    **extra})


def _run_epoch(train, seed, epoch, world, batch):
    """Every rank's micro-batches of one epoch, as tuples of token ids, from the split the workers
    make of it (epoch_split); consumed in parallel, as Ray Train's workers do (streaming_split's
    iterators start an epoch together)."""
    import ray

    from finetune_trainer.epoch_split import split_epoch

    @ray.remote(num_cpus=0)
    def consume(it):
        return [tuple(tuple(int(t) for t in ids) for ids in b["input_ids"])
                for b in it.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True)]

    return ray.get([consume.remote(it) for it in split_epoch(train, seed, epoch, world)])


@pytest.mark.usefixtures("local_ray")
def test_ingest_figures_and_exact_epoch_shards(tmp_path):
    from finetune_trainer.data import prepare
    from finetune_trainer.epoch_split import EpochShards
    from finetune_trainer.epochs import EpochPlan
    from finetune_trainer.ingest import ingest

    rows = tiny.sentiment_rows(203, seed=3)
    rows[5]["text"], rows[77]["label"] = "", None  # two rows to drop
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, tok = _job_data(path), tiny.tokenizer()

    got = ingest(data, "sequence-classification", tok, seed=7)
    want = prepare(data, "sequence-classification", tok, seed=7)
    for key in ("rows", "file_rows", "dropped_empty", "dropped_empty_by_field"):
        assert got.stats[key] == want.stats[key], key
    assert sum(got.stats["tokens"].values()) == sum(want.stats["tokens"].values())  # same rows, other split order
    assert got.label_names == want.label_names == ["neg", "pos"]
    assert sum(got.stats["train_label_counts"].values()) == got.stats["rows"]["train"]

    world, batch, accum = 2, 8, 2
    plan = EpochPlan(rows=got.stats["rows"]["train"], world=world, micro_batch=batch, accumulation=accum)
    first = _run_epoch(got.train, 7, 1, world, batch)
    again = _run_epoch(got.train, 7, 1, world, batch)  # a worker-group restart splits the epoch again
    assert first == again
    flat = [[row for b in rank for row in b] for rank in first]
    assert [len(r) for r in flat] == [plan.rows_per_rank // batch * batch] * world  # equal shares
    assert not set(flat[0]) & set(flat[1])  # disjoint (rows are distinct enough here to tell apart)
    assert len(first[0]) >= plan.micro_batches_per_epoch
    zero = _run_epoch(got.train, 7, 0, world, batch)
    assert zero != first  # every epoch its own order

    # a new driver (--resume, a halving trial continued by a fresh process) ingests again: same shards
    fresh = ingest(data, "sequence-classification", tok, seed=7)
    redo = _run_epoch(fresh.train, 7, 1, world, batch)
    assert redo == first

    # resumed after step s: epoch and skip from the plan; the same micro-batches as the uninterrupted run
    uninterrupted = [rank[: plan.micro_batches_per_epoch] for rank in zero]
    step = plan.steps_per_epoch + 1
    epoch, skip = plan.position(step)
    assert epoch == 1
    resumed = [rank[skip : plan.micro_batches_per_epoch] for rank in redo]
    assert resumed == [rank[accum : plan.micro_batches_per_epoch] for rank in first]
    assert uninterrupted[0] != resumed[0]

    assert _run_epoch(fresh.train, 8, 1, world, batch) != first  # the job's seed decides the order

    # the workers' own split (epoch_split.EpochShards; one rank here): the epoch's shard is the
    # split's, and no more than two split coordinators live at once (this epoch's, the next one's)
    shards = EpochShards(fresh.train, seed=7, epochs=5, rank=0, world=1)
    for epoch in range(5):
        whole = [tuple(tuple(int(t) for t in ids) for ids in b["input_ids"])
                 for b in shards(epoch).iter_batches(batch_size=batch, batch_format="numpy", drop_last=True)]
        assert whole == _run_epoch(fresh.train, 7, epoch, 1, batch)[0]
        assert fault_kit.wait_for("at most two split coordinators", lambda: _coordinators() <= 2, 20)


def _coordinators() -> int:
    """Live SplitCoordinator actors on this machine (Ray titles an actor's process `ray::<Class>`)."""
    import psutil

    def title(p):
        with contextlib.suppress(psutil.Error):
            return " ".join(p.cmdline())
        return ""

    return sum(title(p).startswith("ray::SplitCoordinator") for p in psutil.process_iter())



def _loop(config):
    """A Ray Train worker that reads its micro-batches through EpochStream and writes them down
    (one file per rank: Ray's result carries rank 0's report only)."""
    import ray.train

    from finetune_trainer.batches import EpochStream
    from finetune_trainer.epoch_split import EpochShards

    plan, rank = config["plan"], ray.train.get_context().get_world_rank()
    shards = EpochShards(config["train"], seed=7, epochs=plan.epochs_for(config["total"]), rank=rank, world=plan.world)
    stream = EpochStream(plan, shards, step=config["step"], total_steps=config["total"], pad_token_id=0)
    seen = [[[int(t) for t, m in zip(row, mask, strict=True) if m] for row, mask in
             zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), strict=True)] for b, _ in stream]
    with open(f"{config['out']}/rank{rank}.json", "w") as out:
        json.dump({"seen": seen, "waited": stream.waited}, out)


@pytest.mark.usefixtures("local_ray")
def test_workers_resumed_mid_epoch_read_the_uninterrupted_run_s_micro_batches(tmp_path):
    """Through Ray Train itself (its workers and process group; rank 0 splits each epoch as it
    begins and broadcasts the shards, epoch_split): a run started at step s reads, on every rank,
    exactly the uninterrupted run's micro-batches from step s on."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from finetune_trainer.epochs import EpochPlan
    from finetune_trainer.ingest import ingest

    path = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.sentiment_rows(150, seed=4))
    got = ingest(_job_data(path), "sequence-classification", tiny.tokenizer(), seed=7)
    world, batch, accum = 2, 4, 2
    plan = EpochPlan(rows=got.stats["rows"]["train"], world=world, micro_batch=batch, accumulation=accum)
    total = plan.steps_per_epoch + 3  # into the second epoch

    def run(step, name):
        out = tmp_path / name
        out.mkdir()
        trainer = TorchTrainer(_loop, train_loop_config={"plan": plan, "step": step, "total": total, "out": str(out), "train": got.train},
                               scaling_config=ScalingConfig(num_workers=world, resources_per_worker={"CPU": 0.5}),
                               run_config=RunConfig(name=name, storage_path=str(tmp_path / "ray")))
        trainer.fit()
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]

    whole = run(0, "whole")
    assert [len(r["seen"]) for r in whole] == [total * accum] * world
    step = plan.steps_per_epoch - 1  # resumed inside epoch 0, crossing into epoch 1
    resumed = run(step, "resumed")
    for rank in range(world):
        assert resumed[rank]["seen"] == whole[rank]["seen"][step * accum :], rank
    assert whole[0]["seen"] != whole[1]["seen"]
    assert all(r["waited"] >= 0 for r in whole)
