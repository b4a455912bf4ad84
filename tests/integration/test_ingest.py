"""The Ray Data ingest (ingest.py), the train split's blocks (train_blocks.py) and exact resume
(epochs.py) on a real local Ray.

One setup, several checks (the suite's budget): the figures of a file with two empty rows (counted,
carved and tokenized as the spec says); the blocks read back by index are the dataset in its order, and a re-ingest in a "new
driver" (what `--resume` sees) has the same rows in the same order; the seed changes it; and
through a real TorchTrainer a run resumed at step s reads exactly the uninterrupted run's
micro-batches from s on, on every rank. Shares and epochs are tests/unit/test_epochs.py's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.integration import tiny


def _job_data(path, **extra):
    from finetune_trainer.spec import DataSpec

    return DataSpec.model_validate({"train": str(path), "validationSplit": 0.2, "testSplit": 0.1, "maxSeqLength": 32,
                                    **extra})


def _token_rows(batch) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in ids) for ids in batch["input_ids"]]


@pytest.mark.usefixtures("local_ray")
def test_ingest_figures_and_the_train_split_s_blocks(tmp_path):
    from finetune_trainer.ingest import ingest
    from finetune_trainer.train_blocks import BlockReader

    rows = tiny.sentiment_rows(203, seed=3)
    rows[5]["text"], rows[77]["label"] = "", None  # two rows to drop
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, tok = _job_data(path), tiny.tokenizer()

    got = ingest(data, "sequence-classification", tok, seed=7)
    # 201 usable rows: validation round(0.2 * 201) = 40 off the head, test round(0.1 * 201) = 20 off the tail
    assert got.stats["file_rows"] == {"train": 203}
    assert got.stats["dropped_empty"] == {"train": 2}
    assert got.stats["dropped_empty_by_field"] == {"train": {"textField": 1, "labelField": 1}}
    assert got.stats["rows"] == got.stats["table_rows"] == {"train": 141, "validation": 40, "test": 20}
    kept = [r for i, r in enumerate(rows) if i not in (5, 77)]
    want_tokens = sum(len(tok(r["text"], truncation=True, max_length=32)["input_ids"]) for r in kept)
    assert sum(got.stats["tokens"].values()) == want_tokens  # every usable row tokenized once, in some split
    assert got.label_names == ["neg", "pos"]
    assert sum(got.stats["train_label_counts"].values()) == got.stats["rows"]["train"]

    # the workers' view: the blocks' references and rows, read back by index, are the dataset in its order
    blocks = got.train_blocks
    assert blocks.total == got.stats["rows"]["train"] and len(blocks.refs) == len(blocks.rows)
    in_order = [row for b in got.train.iter_batches(batch_format="numpy") for row in _token_rows(b)]
    reader = BlockReader(blocks, keep=1)
    assert _token_rows(reader.batch(np.arange(blocks.total))) == in_order
    picked = np.array([blocks.total - 1, 0, 5, blocks.total // 2])  # any rows, in the order asked, across blocks
    assert _token_rows(reader.batch(picked)) == [in_order[i] for i in picked]
    with pytest.raises(IndexError):
        reader.batch(np.array([blocks.total]))

    # a new driver (--resume, a halving trial continued by a fresh process) ingests again: the same rows
    # in the same order, which is all epochs.py's arithmetic needs for the same shares
    fresh = ingest(data, "sequence-classification", tok, seed=7)
    assert _token_rows(BlockReader(fresh.train_blocks).batch(np.arange(blocks.total))) == in_order
    other = ingest(data, "sequence-classification", tok, seed=8)
    assert [row for b in other.train.iter_batches(batch_format="numpy") for row in _token_rows(b)] != in_order


def _loop(config):
    """A Ray Train worker that reads its micro-batches through EpochStream and writes them down
    (one file per rank: Ray's result carries rank 0's report only)."""
    import ray.train

    from finetune_trainer.batches import EpochStream
    from finetune_trainer.train_blocks import BlockReader

    plan, rank = config["plan"], ray.train.get_context().get_world_rank()
    stream = EpochStream(plan, BlockReader(config["train"]).batch, seed=7, rank=rank, step=config["step"],
                         total_steps=config["total"], pad_token_id=0)
    seen = [[[int(t) for t, m in zip(row, mask, strict=True) if m] for row, mask in
             zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), strict=True)] for b, _ in stream]
    with open(f"{config['out']}/rank{rank}.json", "w") as out:
        json.dump({"seen": seen, "waited": stream.waited}, out)


@pytest.mark.usefixtures("local_ray")
def test_workers_resumed_mid_epoch_read_the_uninterrupted_run_s_micro_batches(tmp_path):
    """Through Ray Train itself (its workers, the block references in the loop's config, each rank
    fetching its own rows): a run started at step s reads, on every rank, exactly the
    uninterrupted run's micro-batches from step s on."""
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
        trainer = TorchTrainer(_loop, train_loop_config={"plan": plan, "step": step, "total": total, "out": str(out), "train": got.train_blocks},
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


@pytest.mark.usefixtures("local_ray")
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_cells_that_are_not_utf8_follow_encoding_errors(tmp_path, suffix):
    """pyarrow reads a CSV column with invalid UTF-8 as binary and a JSON string unchecked; the
    source's encodingErrors decides, as pandas' readers did (the quickstart's corpus has such cells)."""
    from finetune_trainer.data import DataError
    from finetune_trainer.ingest import ingest

    rows = [("caf\xe9".encode("latin-1"), b"pos")] + [(f"row {i} text".encode(), b"neg" if i % 2 else b"pos") for i in range(11)]
    path = tmp_path / f"train{suffix}"
    if suffix == ".csv":
        path.write_bytes(b"text,label\n" + b"".join(t + b"," + lab + b"\n" for t, lab in rows))
    else:
        path.write_bytes(b"".join(b'{"text": "' + t + b'", "label": "' + lab + b'"}\n' for t, lab in rows))
    with pytest.raises(DataError, match=r"^spec\.data\.train: cannot read .* try encodingErrors: replace"):
        ingest(_job_data(path), "sequence-classification", tiny.tokenizer(), seed=1)
    got = ingest(_job_data(path, train={"path": str(path), "encodingErrors": "replace"}), "sequence-classification",
                 tiny.tokenizer(), seed=1)
    assert got.stats["file_rows"] == {"train": 12} and got.stats["dropped_empty"] == {"train": 0}
    assert sum(got.stats["rows"].values()) == 12  # the replaced cell's row is trained or held out, not lost


@pytest.mark.usefixtures("local_ray")
def test_held_out_rows_repeating_a_training_text_are_counted_on_the_splits_trained_on(tmp_path):
    """data_checks' leakage figure from the ingest's own splits (the ones trained and scored on)."""
    from finetune_trainer.ingest import ingest

    same = "the very same text"
    rows = [{"text": same, "label": ["neg", "pos"][i % 2]} for i in range(30)] + tiny.sentiment_rows(100, seed=9)
    path = tiny.write_jsonl(tmp_path / "train.jsonl", rows)
    tok = tiny.tokenizer()
    got = ingest(_job_data(path), "sequence-classification", tok, seed=3)
    repeated = tuple(tok(same, truncation=True, max_length=32)["input_ids"])

    def count(split):
        return sum(row == repeated for b in split.iter_batches(batch_format="numpy") for row in _token_rows(b))

    assert count(got.train) > 0
    assert got.stats["duplicates_of_train"] == {"validation": count(got.validation), "test": count(got.test)}
    assert sum(got.stats["duplicates_of_train"].values()) > 0
    assert "dropped_untrained" not in got.stats  # classification: every row is trained on


@pytest.mark.usefixtures("local_ray")
def test_words_that_look_missing_are_text_and_integer_labels_are_ids(tmp_path):
    """data.read_table's read semantics on the Ray path (test_data's, for the in-memory reader): a
    cell reading "NA" or "null" is text, only an empty one is missing; integer labels are class ids."""
    from finetune_trainer.ingest import ingest

    words = ["NA", "null", "None", "nan"] * 5
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\n" + "".join(f"{w},{i % 2}\n" for i, w in enumerate(words)) + ",1\n")
    got = ingest(_job_data(csv), "sequence-classification", tiny.tokenizer(), seed=2)
    assert got.stats["file_rows"] == {"train": 21} and got.stats["dropped_empty"] == {"train": 1}
    assert got.label_names == ["0", "1"]
    jsonl = tiny.write_jsonl(tmp_path / "train.jsonl", [{"text": w, "label": i % 2} for i, w in enumerate(words)]
                             + [{"text": None, "label": 1}])
    got = ingest(_job_data(jsonl), "sequence-classification", tiny.tokenizer(), seed=2)
    assert got.stats["file_rows"] == {"train": 21} and got.stats["dropped_empty"] == {"train": 1}
    assert got.label_names == ["0", "1"]
