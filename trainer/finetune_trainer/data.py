"""From `spec.data` to tokenized train / validation / test splits the trainer batches.

Order of work, cheapest checks first: read each table, check the named columns exist,
drop rows without text (refused above `spec.data.maxDroppedFraction`), shuffle with the job's
seed (the quickstart corpus is sorted by label, so an unshuffled tail split would hold one class
only), carve the held-out splits, cap the row counts, count held-out rows that repeat a training
text, map labels (a class no training row has: `data_checks.missing_classes`), and only then
tokenize (batched, fast tokenizers). The checks' figures go into `stats`, which results.json
carries as its `data` section; data_checks.py says what each check is for.

causal-lm rows of format promptCompletion or messages are rendered (chat template) and given
their trained-token labels in chat.py; a bad conversation cell is named by its file row before
the shuffle.

Examples are stored unpadded (`list[np.ndarray]`); `TokenizedSplit.batch` pads a batch to
its own longest example, which is what makes short-text CPU training cheap. With
`spec.data.packing` the causal-lm examples (cut and labelled exactly as without it) are placed
side by side in blocks by packing.py, with position ids that restart per example: a split's
rows are then blocks, and its batches carry position_ids instead of an attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import chat, data_checks
from .packing import pack, pad_positions
from .sources import SourceError, resolve_local
from .spec import DataSource, DataSpec

IGNORE_INDEX = -100  # label value torch's cross-entropy skips: no loss on that token
SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """Data that does not fit the spec; the message names the spec field to fix."""


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


@dataclass
class PreparedData:
    """What `prepare` returns: the splits, class names (classification) and counts to log."""

    train: TokenizedSplit
    validation: TokenizedSplit | None
    test: TokenizedSplit | None
    label_names: list[str] | None
    stats: dict[str, Any] = field(default_factory=dict)
    reference: TokenizedSplit | None = None  # spec.evaluation.reference's text (reference.py; the preflight sets it)


def read_table(source: DataSource, where: str = "spec.data.train") -> pd.DataFrame:
    """Read one jsonl/csv/parquet file; `where` names the spec field in error messages."""
    try:
        path = resolve_local(source.path)
    except SourceError as err:
        raise DataError(f"{where}.path: {err}") from None
    fmt = source.resolved_format()
    try:
        if fmt == "csv":
            # Only empty cells are missing: a tweet that reads "NA" or "null" is still text.
            return pd.read_csv(
                path, encoding_errors=source.encoding_errors, keep_default_na=False, na_values=[""]
            )
        if fmt == "jsonl":
            # No dtype guessing: string labels such as "1" or dates stay as written.
            return pd.read_json(
                path, lines=True, dtype=False, encoding_errors=source.encoding_errors
            )
        if fmt == "parquet":
            return pd.read_parquet(path)
    except (ValueError, UnicodeDecodeError, OSError) as err:
        hint = "; try encodingErrors: replace" if isinstance(err, UnicodeDecodeError) else ""
        raise DataError(f"{where}: cannot read {source.path} as {fmt}: {err}{hint}") from err
    raise DataError(f"{where}.format: cannot tell the format of {source.path!r}; set format")


def prepare(
    data: DataSpec, task: str, tokenizer: Any, seed: int, num_labels: int | None = None, *, warn: bool = True
) -> PreparedData:
    """Read, check, split, label and tokenize `data` for `task`; raises `DataError`.

    `stats` holds, per split: `rows` (examples; blocks when packing), `tokens`,
    `table_rows` (rows that went into tokenizing); per file read: `file_rows`,
    `dropped_empty` (rows without text/label) and `dropped_empty_by_field` (per spec field, a
    row empty in two fields counts under both); `duplicates_of_train` (per held-out split, its
    rows whose text is also a training row's); for classification `train_label_counts` and
    `classes_missing_from_train`.
    """
    columns = _required_columns(data, task)
    stats: dict[str, Any] = {"rows": {}, "tokens": {}, "table_rows": {}, "file_rows": {},
                             "dropped_empty": {}, "dropped_empty_by_field": {}}  # fmt: skip
    frames = _read_frames(data, columns, seed, stats)
    full_train = frames["train"]
    assert full_train is not None
    _carve_and_cap(frames, data)
    stats["duplicates_of_train"] = data_checks.duplicates_by_split(frames, columns)
    label_names = None
    if task == "sequence-classification":
        # Classes come from the whole train file, so a split or a cap never changes them.
        label_names = _label_names(data, full_train[data.label_field], num_labels)
        ids = _label_ids(full_train[data.label_field], label_names, data)
        if problem := data_checks.class_not_in_file(data, label_names, ids, num_labels):
            raise DataError(problem)
    splits: dict[str, TokenizedSplit | None] = {}
    for name, frame in frames.items():
        if frame is None:
            splits[name] = None
            continue
        if len(frame) == 0:
            raise DataError(f"spec.data.{name}: no usable rows (all empty or capped to 0)")
        stats["table_rows"][name] = len(frame)
        if label_names is not None:
            labels = _label_ids(frame[data.label_field], label_names, data)
            split = _tokenize_classification(frame, labels, data, tokenizer)
            if name == "train":
                counts = np.bincount(labels, minlength=len(label_names))
                stats["train_label_counts"] = dict(zip(label_names, counts.tolist(), strict=True))
                stats["classes_missing_from_train"] = data_checks.missing_classes(label_names, counts)
        else:
            split = _tokenize_causal(frame, data, tokenizer, name)
        splits[name] = split
        stats["rows"][name] = len(split)
        if data.resolved_format() != "text":  # rows left with no trained token (a prompt filling maxSeqLength)
            stats.setdefault("dropped_untrained", {})[name] = len(frame) - (split.examples or len(split))
        stats["tokens"][name] = split.num_tokens()
    train = splits["train"]
    assert train is not None
    if warn:
        data_checks.warn(stats)
    return PreparedData(train, splits["validation"], splits["test"], label_names, stats)


def _read_frames(
    data: DataSpec, columns: dict[str, str], seed: int, stats: dict[str, Any]
) -> dict[str, pd.DataFrame | None]:
    """Each given file read, checked, cleaned and shuffled; None where a file is not given.

    Refuses a file that loses more than `spec.data.maxDroppedFraction` of its rows to empty
    cells, before anything is shuffled or tokenized.
    """
    frames: dict[str, pd.DataFrame | None] = {}
    for stream, name in enumerate(SPLITS):
        source = getattr(data, name)
        if source is None:
            frames[name] = None
            continue
        frame = read_table(source, f"spec.data.{name}")
        _check_columns(frame, columns, source.path)
        if "messagesField" in columns:  # before the shuffle, so a bad row is named by its place in the file
            try:
                cells = chat.check_messages(frame[data.messages_field], f"{name} ({source.path})", data.messages_field)
            except chat.ChatDataError as err:
                raise DataError(str(err)) from None
            frame[data.messages_field] = pd.Series(cells, index=frame.index, dtype=object)
        keep, by_field = data_checks.empty_cells(frame, columns)
        stats["file_rows"][name], stats["dropped_empty"][name] = len(frame), int((~keep).sum())
        stats["dropped_empty_by_field"][name] = by_field
        problem = data_checks.dropped_share_problem(
            name, source.path, len(frame), int((~keep).sum()), by_field, data.max_dropped_fraction
        )
        if problem:
            raise DataError(f"spec.data.maxDroppedFraction: {problem}")
        frame = frame.loc[keep].reset_index(drop=True)
        # Every file is shuffled, not only train: capped validation/test rows must be a
        # fair sample too. One generator per file keeps each order independent.
        order = np.random.default_rng([seed, stream]).permutation(len(frame))
        frames[name] = frame.iloc[order].reset_index(drop=True)
    return frames


def _carve_and_cap(frames: dict[str, pd.DataFrame | None], data: DataSpec) -> None:
    """Carve held-out splits from the shuffled train, then cap every split's rows.

    Validation is the head of the permutation, test its tail, train the middle: three
    disjoint slices, and each held-out split depends only on its own fraction (of the
    whole cleaned train file), so turning testSplit on never changes the validation rows.
    """
    train = frames["train"]
    assert train is not None
    n = len(train)
    n_val = _carve(n, data.validation, data.validation_split)
    n_test = _carve(n, data.test, data.test_split)
    if n_test + n_val >= n:
        raise DataError(
            f"spec.data.train: no training rows left ({n} usable rows, {n_test} for test, "
            f"{n_val} for validation); add data or lower validationSplit/testSplit"
        )
    if n_val:
        frames["validation"] = train.iloc[:n_val]
    if n_test:
        frames["test"] = train.iloc[n - n_test :]
    frames["train"] = train.iloc[n_val : n - n_test]
    caps = {"train": data.max_train_samples, "validation": data.max_eval_samples,
            "test": data.max_test_samples}  # fmt: skip
    for name, cap in caps.items():
        frame = frames[name]
        if frame is not None and cap is not None:
            frames[name] = frame.iloc[:cap]


def _required_columns(data: DataSpec, task: str) -> dict[str, str]:
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


def _check_columns(frame: pd.DataFrame, columns: dict[str, str], path: str) -> None:
    have = [str(c) for c in frame.columns]
    for spec_field, column in columns.items():
        if column not in frame.columns:
            raise DataError(
                f"spec.data.{spec_field}: column {column!r} not in {path}; "
                f"columns are: {', '.join(have) or '(none)'}"
            )


def _carve(n: int, file: DataSource | None, fraction: float | None) -> int:
    if file is not None or not fraction:
        return 0
    return max(1, round(n * fraction))


def _as_ints(values: pd.Series) -> np.ndarray | None:
    """The values as int64 if they are whole numbers (1 and 1.0 alike), else None."""
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return None
    array = values.to_numpy(dtype=np.float64)
    return array.astype(np.int64) if np.all(array == np.round(array)) else None


def _label_names(data: DataSpec, train_labels: pd.Series, num_labels: int | None) -> list[str]:
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


def _label_ids(values: pd.Series, names: list[str], data: DataSpec) -> np.ndarray:
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


def _tokenize_classification(
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


def _tokenize_causal(
    frame: pd.DataFrame, data: DataSpec, tokenizer: Any, split: str
) -> TokenizedSplit:
    eos = tokenizer.eos_token_id
    limit = data.max_seq_length
    if (fmt := data.resolved_format()) != "text":
        # Rendering, prompt/completion joining and the trained-token mask: chat.py.
        try:
            template = chat.template_for(data, tokenizer, warn=split == "train")
            rows = (frame[data.messages_field].tolist() if fmt == "messages"
                    else tuple(frame[c].astype(str).tolist() for c in data.prompt_columns()))  # fmt: skip
            chat_ids, chat_labels, _ = chat.encode(rows, tokenizer, template, limit, split)
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
