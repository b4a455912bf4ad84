"""The data checks a new user misses (data_checks.py), as pure functions: rows dropped for an
empty text or label and the maxDroppedFraction refusal's message, classes the training rows never
show, held-out rows that repeat a training text, and what `finetune validate` and a run's log say.

The ingest applies them to the whole data on Ray Data (ingest.py, ingest_checks.py); that they do,
with these figures and refusals, on real files, and `finetune validate` as a user runs it, are
tests/integration/test_data_semantics.py's. No Ray and no tokenizer here.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from finetune_trainer import data_checks
from finetune_trainer.spec import DataSpec


def spec(**fields) -> DataSpec:
    return DataSpec.model_validate(fields)


# ---- dropped rows -----------------------------------------------------------------------


def test_empty_cells_are_counted_per_field():
    frame = pd.DataFrame({"text": ["a", "", " ", "no label", "blank label", None, "ok"],
                          "label": ["x", "x", "y", None, "", None, "y"]})  # fmt: skip
    keep, by_field = data_checks.empty_cells(frame, {"textField": "text", "labelField": "label"})
    assert keep.tolist() == [True, False, False, False, False, False, True]
    # the row with both cells empty counts under both fields, once among the dropped
    assert by_field == {"textField": 3, "labelField": 3}
    assert int((~keep).sum()) == 5
    words = pd.DataFrame({"text": ["NA", "null", "None", "nan"], "label": ["a"] * 4})
    assert data_checks.empty_cells(words, {"textField": "text"})[0].all()  # text, not missing


def test_more_dropped_than_allowed_is_refused_naming_the_fields():
    by_field = {"textField": 1, "labelField": 1}
    message = data_checks.dropped_share_problem("train", "t.jsonl", 20, 2, by_field, 0.05)
    assert message is not None
    assert message.startswith("2 of 20 rows of train (t.jsonl) have an empty text or label")
    assert "(10%, over the 5% allowed): textField empty in 1, labelField empty in 1" in message
    assert data_checks.dropped_share_problem("train", "t.jsonl", 20, 2, by_field, 0.1) is None  # at the limit
    many = data_checks.dropped_share_problem("train", "m.jsonl", 95, 9, {"textField": 9, "labelField": 0}, 0.09)
    assert many is not None and "9 of 95 rows of train (m.jsonl)" in many
    assert "(9.47%, over the 9% allowed): textField empty in 9;" in many  # never "9%, over the 9% allowed"
    assert data_checks.dropped_share_problem("validation", "v.jsonl", 0, 0, {}, 0.1) is None


def test_max_dropped_fraction_is_a_share():
    from pydantic import ValidationError

    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValidationError):
            spec(train="t.jsonl", maxDroppedFraction=bad)
    assert spec(train="t.jsonl").max_dropped_fraction == 0.1


# ---- classes the training rows never show ---------------------------------------------------


def test_missing_classes_are_the_ones_with_no_rows():
    assert data_checks.missing_classes(["a", "b", "c"], np.array([3, 0, 0])) == ["b", "c"]
    assert data_checks.missing_classes(["a", "b"], np.array([1, 2])) == []


def test_a_class_no_train_row_has_is_refused_naming_the_field_that_made_it():
    listed = spec(train="t.jsonl", labels=["a", "neutral", "b"])
    message = data_checks.class_not_in_file(listed, ["a", "neutral", "b"], np.array([0, 2, 0, 2]), None)
    assert message is not None and message.startswith(
        "spec.data.labels: class(es) 'neutral' never occur in column 'label' of spec.data.train (t.jsonl)")
    data = spec(train="t.jsonl")
    from_one = data_checks.class_not_in_file(data, ["0", "1", "2", "3"], np.array([1, 2, 3, 1]), None)
    assert from_one is not None and from_one.startswith(
        "spec.data.labelField: integer labels are class ids 0..3, and '0' never occur")
    above = data_checks.class_not_in_file(data, ["0", "1", "2", "3"], np.array([0, 1, 1]), 4)
    assert above is not None and above.startswith(
        "spec.model.numLabels: 4, but the class ids in column 'label' of spec.data.train (t.jsonl) stop at 1; "
        "class(es) '2', '3' would never be learned: lower numLabels to 2")
    assert data_checks.class_not_in_file(data, ["a", "b"], np.array([0, 1, 1]), None) is None


def test_a_class_capped_out_of_training_is_a_warning(caplog):
    stats = {"classes_missing_from_train": ["b", "c"], "table_rows": {"train": 1, "validation": 6}}
    with caplog.at_level(logging.WARNING, logger="finetune_trainer"):
        data_checks.warn(stats)
    assert "class(es) b, c have no row among the 1 training rows" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune_trainer"):
        data_checks.warn({"classes_missing_from_train": [], "duplicates_of_train": {"validation": 0}, "table_rows": {"train": 9, "validation": 2}})
    assert caplog.text == ""


# ---- held-out rows that repeat a training text -----------------------------------------------


def test_the_key_is_the_input_text_with_whitespace_normalised_and_case_kept():
    hashes = data_checks.text_hashes(pd.DataFrame({"text": ["row 3", "  row   5 ", "Row 7", "row 3", "row 5", "row 7"]}), ["text"])
    assert hashes[0] == hashes[3] and hashes[1] == hashes[4]  # spaces do not make a text different
    assert hashes[2] != hashes[5]  # a cased model sees "Row 7" as another input
    pairs = pd.DataFrame({"p": ["q1", "q2", "q2", "q1"], "c": ["a1", "a2", "other", "a1"]})
    pair_hashes = data_checks.text_hashes(pairs, ["p", "c"])  # every input column is part of the key
    assert pair_hashes[0] == pair_hashes[3] and pair_hashes[1] != pair_hashes[2]


def test_held_out_duplicates_of_train_are_a_warning_per_split(caplog):
    stats = {"duplicates_of_train": {"validation": 3, "test": 1}, "table_rows": {"train": 20, "validation": 5, "test": 2}}
    with caplog.at_level(logging.WARNING, logger="finetune_trainer"):
        data_checks.warn(stats)
    assert "3 of 5 validation rows have the same text as a training row" in caplog.text
    assert "1 of 2 test rows" in caplog.text


# ---- what results.json and `finetune validate` show -------------------------------------------


def test_the_summary_lines_of_validate():
    stats = {
        "file_rows": {"train": 31, "validation": 7}, "table_rows": {"train": 24, "validation": 6},
        "dropped_empty": {"train": 1, "validation": 1},
        "dropped_empty_by_field": {"train": {"textField": 1, "labelField": 0},
                                   "validation": {"textField": 1, "labelField": 1}},
        "duplicates_of_train": {"validation": 2}, "classes_missing_from_train": ["c"],
    }  # fmt: skip
    stats = json.loads(json.dumps(stats))
    assert data_checks.summary(stats) == [
        "dropped for an empty text or label: train 1 of 31 (textField 1); validation 1 of 7 (textField 1, labelField 1)",
        "held-out rows whose text is also in train: validation 2 of 6",
        "classes with no training row: c",
    ]
    lm = {"file_rows": {"train": 11}, "table_rows": {"train": 11}, "dropped_empty": {"train": 0},
          "dropped_empty_by_field": {"train": {"textField": 0}}, "dropped_untrained": {"train": 1}}  # fmt: skip
    assert data_checks.summary(lm) == [
        "dropped for an empty text or label: train 0 of 11",
        "dropped with no trained token left (prompt fills maxSeqLength, or no assistant turn): train 1 of 11",
    ]
