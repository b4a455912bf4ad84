"""The preflight's look at the data: the first rows of each file, read, checked and tokenized as a
run reads, checks and tokenizes the whole files, in the driver, in about a second, before Ray starts.

Why a sample: the whole data is the ingest's (ingest.py, Ray Data's tasks), which a run reaches
only after Ray is up, and `finetune validate` must stay bounded on files of any size. Most wrong
manifests show in the first rows: a missing file, a format that does not parse, a column the spec
names that the file lacks, a conversation cell that is not a list of messages (named by its file
row here: the sample is the file's head), a label spec.data.labels does not list, a chat template
that does not render, or renders without the model's EOS; and a file the head holds whole with no
row that keeps a trained token within maxSeqLength. What only the whole data can show (the share
of empty rows, the classes of the whole train file, numLabels, rows left for training, rows left
without a trained token, the held-out rows repeating train) the ingest refuses or reports with the
same messages.

One reading: `readers.head` parses with the ingest's parsers and options, the columns are decoded
by ingest_checks.decoded, and the rows are tokenized by data.py's functions, as the ingest's
tasks tokenize them. `finetune preview` shows this sample: the file's first rows, not the run's
shuffled order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import chat, data_checks, readers
from .data import (
    SPLITS,
    DataError,
    TokenizedSplit,
    label_ids,
    required_columns,
    tokenize_causal,
    tokenize_classification,
)
from .ingest_checks import decoded, missing_column
from .spec import DataSource, DataSpec, StorageSpec

SAMPLE_ROWS = 200  # rows read from the head of each file: a second of tokenizing, every format's problems in view


@dataclass
class Sample:
    """The first rows of each given file, as a run would see them."""

    frames: dict[str, pd.DataFrame]  # rows with every required cell, in file order
    train: TokenizedSplit  # the train file's sample tokenized (packed blocks with spec.data.packing)


def check(data: DataSpec, task: str, tokenizer, *, storage: StorageSpec | None = None,
          rows: int = SAMPLE_ROWS) -> Sample:
    """Read the head of every file and tokenize it; raises DataError naming the spec field."""
    columns = required_columns(data, task)
    frames: dict[str, pd.DataFrame] = {}
    tokenized: dict[str, TokenizedSplit] = {}
    for name in SPLITS:
        source = getattr(data, name)
        if source is None:
            continue
        try:
            frame = read_head(source, f"spec.data.{name}", columns, rows, storage)
        except DataError:
            if "messagesField" in columns and source.resolved_format() == "jsonl":
                _name_bad_cell(source, name, data.messages_field, rows, storage)  # raises when a cell is why
            raise
        if "messagesField" in columns:  # the file's own row numbers: the head is in file order
            try:
                cells = chat.check_messages(frame[data.messages_field], f"{name} ({source.path})", data.messages_field)
            except chat.ChatDataError as err:
                raise DataError(str(err)) from None
            frame[data.messages_field] = pd.Series(cells, index=frame.index, dtype=object)
        whole_file = len(frame) < rows  # the head is all the file has
        keep, _ = data_checks.empty_cells(frame, columns)
        frame = frame.loc[keep].reset_index(drop=True)
        frames[name] = frame
        tokenized[name] = _tokenize(frame, data, task, tokenizer, name)
        if whole_file and len(frame) and not len(tokenized[name]) and "textField" not in columns:
            # not one row of the whole file keeps a trained token: so neither will any split a run carves
            # or caps from it, which the ingest refuses; say so now (of a longer file's head, not known)
            raise DataError(chat.no_trained_token(len(frame), name, data.max_seq_length))
    return Sample(frames, tokenized["train"])


def _name_bad_cell(source: DataSource, split: str, column: str, rows: int, storage: StorageSpec | None) -> None:
    """pyarrow's JSON reader refuses a column whose cells are of mixed types (a conversation cell
    that is text, a number, or a message that is a list, among lists of {role, content} objects),
    naming neither the spec field nor, always, the bad row. When that is why the head did not
    parse, the first bad cell is named as chat.check_messages names it (spec.data.messagesField,
    the file row, what is wrong), its lines read as Python's json reads them; else nothing is
    raised and the reader's own message stands."""
    where = f"spec.data.{split}"
    try:
        filesystem, path = readers.locate(source, where, storage)
        with filesystem.open_input_stream(path) as f:
            lines = readers.first_lines(f, rows).splitlines()
        cells = pd.Series([json.loads(line).get(column) for line in lines], dtype=object)
    except (OSError, ValueError, AttributeError, readers.SourceUnreadable):
        return  # not JSON objects line by line: the reader's message says what is wrong
    try:
        chat.check_messages(cells, f"{split} ({source.path})", column)
    except chat.ChatDataError as err:
        raise DataError(str(err)) from None


def read_head(source: DataSource, where: str, columns: dict[str, str], rows: int,
              storage: StorageSpec | None = None) -> pd.DataFrame:
    """The first `rows` rows of one source, its named columns decoded by the source's
    encodingErrors, as a pandas frame (what the ingest's batches are)."""
    try:
        table = readers.head(source, where, rows, storage)
    except readers.SourceUnreadable as err:
        raise DataError(str(err)) from None
    if problem := missing_column(table.column_names, columns, source.path):
        raise DataError(problem)
    table = decoded(table, columns=list(columns.values()), errors=source.encoding_errors, where=where,
                    path=source.path, fmt=str(source.resolved_format()))
    return table.to_pandas()


def _tokenize(frame: pd.DataFrame, data: DataSpec, task: str, tokenizer, split: str) -> TokenizedSplit:
    """The rows tokenized as ingest._tokenize does in Ray's tasks. Classification labels are checked
    against spec.data.labels when it lists them (the classes of a whole file are the ingest's); the
    ids are then only for display (preview shows the label cell itself)."""
    if frame.empty:  # a head of empty rows: what the whole file holds is the ingest's to say
        return TokenizedSplit([], np.zeros(0, dtype=np.int64) if task == "sequence-classification" else [])
    if task == "sequence-classification":
        ids = (label_ids(frame[data.label_field], list(data.labels), data) if data.labels is not None
               else np.zeros(len(frame), dtype=np.int64))
        return tokenize_classification(frame, ids, data, tokenizer)
    return tokenize_causal(frame, data, tokenizer, split, warn=split == "train", whole_split=False)
