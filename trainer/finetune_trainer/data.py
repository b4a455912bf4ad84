"""How a row of `spec.data` becomes an example: the columns a task needs, the classes and their
ids, the held-out carve's size, and the tokenizing (truncation, EOS, chat rendering, packing).

These are the per-row and per-batch rules; ingest.py applies them to the whole data in Ray Data's
tasks (reading, cleaning, the seeded shuffle and the carve are its), and the preflight's sample
(data_sample.py) to the first rows of each file. One definition, so the two cannot differ.

causal-lm rows of format promptCompletion or messages are rendered (chat template) and given
their trained-token labels in chat.py.

Examples are stored unpadded (`list[np.ndarray]`); `TokenizedSplit.batch` pads a batch to
its own longest example, which is what makes short-text CPU training cheap. With
`spec.data.packing` the causal-lm examples (cut and labelled exactly as without it) are placed
side by side in blocks by packing.py, with position ids that restart per example: a split's
rows are then blocks, and its batches carry position_ids instead of an attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import chat
from .packing import pack, pad_positions
from .spec import DataSource, DataSpec, SpecError

IGNORE_INDEX = -100  # label value torch's cross-entropy skips: no loss on that token
SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """Data that does not fit the spec; the message names the spec field to fix."""

    def as_spec_error(self) -> SpecError:
        """The verdict: `spec.<field>: message` split into the field and what to do."""
        path, _, message = str(self).partition(": ")
        return SpecError([(path, message or str(self))])


@dataclass
class TokenizedSplit:
    """One split: unpadded token ids plus labels (class ids, or per-token labels for causal-lm)."""

    input_ids: list[np.ndarray]
    labels: np.ndarray | list[np.ndarray]
    token_type_ids: list[np.ndarray] | None = None
    position_ids: list[np.ndarray] | None = None  # packed causal-lm blocks (packing.py)
    examples: int | None = None  # examples inside the packed blocks; None: one example per row

    def __len__(self) -> int:
        return len(self.input_ids)

    def num_tokens(self) -> int:
        return int(sum(len(ids) for ids in self.input_ids))

    def tokens_in(self, indices: Sequence[int]) -> int:
        """Tokens (not padding) of the rows `indices`."""
        return int(sum(len(self.input_ids[i]) for i in indices))

    def batch(self, indices: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Examples `indices`, right-padded to the batch's longest; padded labels are -100.
        Packed blocks get position_ids and no attention_mask (packing.pad_positions says why)."""
        rows = [self.input_ids[i] for i in indices]
        width = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, row in enumerate(rows):
            ids[j, : len(row)] = row
            mask[j, : len(row)] = 1
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if isinstance(self.labels, np.ndarray):
            out["labels"] = torch.as_tensor(self.labels[list(indices)], dtype=torch.long)
        else:
            labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
            for j, i in enumerate(indices):
                labels[j, : len(self.labels[i])] = self.labels[i]
            out["labels"] = torch.from_numpy(labels)
        if self.position_ids is not None:
            out.pop("attention_mask")
            out["position_ids"] = torch.from_numpy(np.stack([pad_positions(self.position_ids[i], width) for i in indices]))
        if self.token_type_ids is not None:
            types = np.zeros((len(rows), width), dtype=np.int64)
            for j, i in enumerate(indices):
                types[j, : len(self.token_type_ids[i])] = self.token_type_ids[i]
            out["token_type_ids"] = torch.from_numpy(types)
        return out


def required_columns(data: DataSpec, task: str) -> dict[str, str]:
    """Spec field (camelCase, as the user wrote it) -> column that field names."""
    if task == "sequence-classification":
        cols = {"textField": data.text_field, "labelField": data.label_field}
        if data.text_pair_field:
            cols["textPairField"] = data.text_pair_field
        return cols
    fmt = data.resolved_format()
    if fmt == "messages":
        return {"messagesField": data.messages_field}
    if fmt == "promptCompletion":
        return dict(zip(("promptField", "completionField"), data.prompt_columns(), strict=True))
    return {"textField": data.text_field}


def carve(n: int, file: DataSource | None, fraction: float | None) -> int:
    """Rows a held-out split takes from the train file's `n` (none when it has its own file)."""
    if file is not None or not fraction:
        return 0
    return max(1, round(n * fraction))


def _as_ints(values: pd.Series) -> np.ndarray | None:
    """The values as int64 if they are whole numbers (1 and 1.0 alike), else None."""
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return None
    array = values.to_numpy(dtype=np.float64)
    return array.astype(np.int64) if np.all(array == np.round(array)) else None


def label_names_of(data: DataSpec, train_labels: pd.Series, num_labels: int | None) -> list[str]:
    """The classes in id order: spec.data.labels, else integer ids 0..K-1 as they are, else the
    train file's distinct labels sorted (`train_labels`: its values, or only the distinct ones)."""
    if data.labels is not None:
        names = list(data.labels)
    elif (ints := _as_ints(train_labels)) is not None and ints.min() >= 0:
        # Integer class ids 0..K-1 are used as they are; names are the ids.
        k = max(int(ints.max()) + 1, num_labels or 0)
        names = [str(i) for i in range(k)]
    elif ints is not None:
        names = [str(v) for v in sorted(set(ints.tolist()))]
    else:
        names = sorted({str(v) for v in train_labels})
    if len(names) < 2:
        raise DataError(
            f"spec.data.labelField: column {data.label_field!r} has only {names} in train; "
            "classification needs at least 2 classes"
        )
    if num_labels is not None and num_labels != len(names):
        raise DataError(
            f"spec.model.numLabels: {num_labels}, but the data has {len(names)} classes "
            f"({', '.join(names)}); fix numLabels or set spec.data.labels"
        )
    return names


def label_ids(values: pd.Series, names: list[str], data: DataSpec) -> np.ndarray:
    """Each label's class id; DataError naming spec.data.labels for a label no class has."""
    index = {name: i for i, name in enumerate(names)}
    ints = _as_ints(values)
    keys = [str(v) for v in ints.tolist()] if ints is not None else [str(v) for v in values]
    ids = np.fromiter((index.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
    if ints is not None and (ids < 0).any() and ints.min() >= 0 and ints.max() < len(names):
        ids = ints  # integer ids with spec.data.labels naming them in id order
    if (ids < 0).any():
        unknown = sorted({k for k, i in zip(keys, ids.tolist(), strict=True) if i < 0})
        shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise DataError(
            f"spec.data.labels: labels {shown} in column {data.label_field!r} are not among the "
            f"classes [{', '.join(names)}]; list every class in spec.data.labels"
        )
    return ids


def tokenize_classification(
    frame: pd.DataFrame, labels: np.ndarray, data: DataSpec, tokenizer: Any
) -> TokenizedSplit:
    texts = frame[data.text_field].astype(str).tolist()
    pairs = frame[data.text_pair_field].astype(str).tolist() if data.text_pair_field else None
    enc = tokenizer(
        texts, pairs, truncation=True, max_length=data.max_seq_length, padding=False,
        return_attention_mask=False, return_token_type_ids=pairs is not None,
    )  # fmt: skip
    types = enc.get("token_type_ids") if pairs is not None else None
    return TokenizedSplit(
        input_ids=_arrays(enc["input_ids"]),
        labels=labels,
        token_type_ids=_arrays(types) if types is not None else None,
    )


def tokenize_causal(frame: pd.DataFrame, data: DataSpec, tokenizer: Any, split: str, *, warn: bool = False,
                    whole_split: bool = True) -> TokenizedSplit:
    """The rows as causal-lm examples (packed blocks with spec.data.packing). `warn`: say what the
    chat template choice means (the preflight's sample does, once; the ingest's tasks do not).
    `whole_split`: chat.encode's (False for one batch of the ingest)."""
    eos = tokenizer.eos_token_id
    limit = data.max_seq_length
    if (fmt := data.resolved_format()) != "text":
        # Rendering, prompt/completion joining and the trained-token mask: chat.py.
        try:
            template = chat.template_for(data, tokenizer, warn=warn)
            rows = (frame[data.messages_field].tolist() if fmt == "messages"
                    else tuple(frame[c].astype(str).tolist() for c in data.prompt_columns()))  # fmt: skip
            chat_ids, chat_labels, _ = chat.encode(rows, tokenizer, template, limit, split, warn=warn, whole_split=whole_split)
        except chat.ChatDataError as err:
            raise DataError(str(err)) from None
        examples = TokenizedSplit(_arrays(chat_ids), _arrays(chat_labels))
    else:
        texts = frame[data.text_field].astype(str).tolist()
        # One token of headroom tells a text that fits (gets EOS) from one cut short (no EOS).
        seqs = tokenizer(texts, truncation=True, max_length=limit + 1)["input_ids"]
        ids = _arrays([_with_eos(s, eos) if len(s) < limit else s[:limit] for s in seqs])
        examples = TokenizedSplit(ids, ids)  # labels are the inputs; the model shifts them
    if not data.packing:
        return examples
    # Validation and test are packed too: the same examples and loss tokens as unpacked, so the
    # per-token loss and perplexity are the same numbers (each example's first token has no loss
    # either way). Rows are capped before packing.
    assert isinstance(examples.labels, list)
    blocks = pack(examples.input_ids, examples.labels, limit)
    return TokenizedSplit(blocks.input_ids, blocks.labels, position_ids=blocks.position_ids, examples=blocks.examples)


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return [*ids, eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _arrays(rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    return [np.asarray(r, dtype=np.int32) for r in rows]
