"""`finetune preview`: the first training examples exactly as the trainer will see them.

Why: how a prompt and its completion are joined, which chat template renders a conversation and
which tokens carry the loss decide what a fine-tuned model learns, and none of it shows in a
loss curve. This prints the first N examples of the training split as token ids decoded back
to text, with the trained tokens (label != -100) marked, so nobody has to guess the format.

The examples are the preflight's sample (data_sample.py): the train file's first rows with text,
read, rendered, truncated and tokenized exactly as a run's ingest does it, in file order (a run
trains on a seeded shuffle of the whole file). No Ray, no model weights, nothing read past the
rows shown: seconds on a file of any size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .chat import IGNORE_INDEX
from .data import DataError, TokenizedSplit
from .data_sample import check
from .modeling import load_tokenizer, offline_if_local, resolve_model_dir
from .sources import SourceError
from .spec import FineTuneJob, SpecError

OPEN, CLOSE = "[[", "]]"
GREEN, RESET = "\x1b[1;32m", "\x1b[0m"


@dataclass
class Preview:
    """What the preview shows: the split's first examples and how they were made."""

    tokenizer: Any
    split: TokenizedSplit
    labels: list[str] | None  # classification: each example's label cell, as the file has it
    rows_read: int  # training rows that went into tokenizing
    source: str  # how rows became text, in words


def load(job: FineTuneJob, n: int) -> Preview:
    """The first `n` training examples, tokenized as a run tokenizes them; SpecError names the field."""
    spec = job.spec
    offline_if_local(spec.model.source)
    try:
        model_dir = resolve_model_dir(spec.model, spec.storage)
        tokenizer = load_tokenizer(model_dir, spec.model)
    except SourceError as err:
        raise SpecError([("spec.model.source", str(err))]) from None
    except (OSError, ValueError) as err:
        raise SpecError([("spec.model.source", f"cannot load a tokenizer from {spec.model.source}: {err}")]) from None
    cap = min(n, spec.data.max_train_samples or n)
    data = spec.data.model_copy(update={"validation": None, "test": None})  # the train file's rows are shown
    try:
        sample = check(data, spec.model.task, tokenizer, storage=spec.storage, rows=cap)
    except DataError as err:
        raise err.as_spec_error() from None
    frame = sample.frames["train"]
    labels = frame[data.label_field].astype(str).tolist() if spec.model.task == "sequence-classification" else None
    return Preview(tokenizer, sample.train, labels, len(frame), describe(job))


PACKED = "; whole examples packed into maxSeqLength blocks, each attending only to itself (packing.py)"


def describe(job: FineTuneJob) -> str:
    """How a row becomes an example, in one line: what the manifest chose, defaults spelled out."""
    data = job.spec.data
    if job.spec.model.task == "sequence-classification":
        return f"sequence-classification: textField {data.text_field!r}, label from {data.label_field!r}"
    fmt = data.resolved_format()
    if fmt == "text":
        how = "loss on every token" + (PACKED if data.packing else ", one text per example")
        return f"format text (textField {data.text_field!r}): {how}"
    template = data.resolved_chat_template()
    shown = {"auto": "auto (the tokenizer's own)", "none": "none (prompt, then completion, then EOS)"}.get(
        template, f"from the spec ({len(template)} characters)"
    )
    fields = (f"messagesField {data.messages_field!r}" if fmt == "messages"
              else "promptField {!r}, completionField {!r}".format(*data.prompt_columns()))  # fmt: skip
    return f"format {fmt} ({fields}), chatTemplate {shown}" + (PACKED if data.packing else "")


def lines(preview: Preview, limit: int, *, color: bool) -> list[str]:
    """The preview as text lines; `color`: trained spans in bold green instead of [[ ]] markers."""
    split = preview.split
    out = [f"{len(split)} training example(s) exactly as tokenized; {preview.source}; maxSeqLength {limit}"]
    if preview.labels is None:
        out.append("trained tokens (those with a loss) are " + ("in bold green" if color else f"between {OPEN} and {CLOSE}"))
    examples = split.examples if split.examples is not None else len(split)  # packed: examples inside the blocks
    if examples < preview.rows_read:
        out.append(f"({preview.rows_read - examples} of the first {preview.rows_read} rows dropped: no trained token left)")
    for i in range(len(split)):
        ids = np.asarray(split.input_ids[i])
        cut = " (cut at maxSeqLength)" if len(ids) >= limit else ""
        if preview.labels is not None:
            label = preview.labels[i]
            out += [f"--- example {i + 1}: {len(ids)} tokens{cut}, label {label!r}", _decode(preview.tokenizer, ids)]
            continue
        trained = np.asarray(split.labels[i]) != IGNORE_INDEX
        what = f"example {i + 1}: {len(ids)} tokens{cut}"
        if split.position_ids is not None:  # a packed block: examples start where the positions restart at 0
            what = f"block {i + 1}: {len(ids)} tokens, {int((split.position_ids[i] == 0).sum())} example(s)"
        out += [f"--- {what}, {int(trained.sum())} trained", marked(preview.tokenizer, ids, trained, color=color)]
    return out


def marked(tokenizer: Any, ids: np.ndarray, trained: np.ndarray, *, color: bool) -> str:
    """The decoded ids with each run of trained tokens wrapped in markers (or colour)."""
    parts = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            text = _decode(tokenizer, ids[start:end])
            if trained[start]:
                text = f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}"
            parts.append(text)
            start = end
    return "".join(parts)


def _decode(tokenizer: Any, ids: np.ndarray) -> str:
    # Special tokens stay (<|im_start|>, EOS): they are part of what is trained on.
    return tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
