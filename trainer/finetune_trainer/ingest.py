"""From `spec.data` to Ray Data datasets: read, check, clean, shuffle, split, tokenize in tasks.

The one path the data takes into a run (issue 18): the driver builds a lazy plan and runs only
small aggregations (row counts, dropped-row counts, the label set); the rows live in Ray's object
store (spilled to disk when large), never in the driver's memory, and each worker fetches the
rows of its share of an epoch from the train split's blocks (train_blocks.py; epochs.py says
which rows, in which order, and how a resumed run finds its place). The preflight has seen only
the first rows of each file (data_sample.py); the whole data's problems are found here.

Order of work, cheapest checks first: the schema (columns the spec names) from the first block,
the empty-cell counts and the maxDroppedFraction refusal (one pass, no tokenizing; the checks on
datasets are ingest_checks.py), the seeded shuffle, the held-out splits carved off the shuffled
train (validation the head, test the tail, train the middle: `split_at_indices`, held in the
object store), the caps, and only then tokenizing, in parallel `map_batches` tasks with the
tokenizer shipped once per task (a fast tokenizer pickles). `count` stops before tokenizing
(`finetune validate`).

Determinism: `DataContext.execution_options.preserve_order` is set, every read has a fixed
`override_num_blocks` (the block layout must not depend on the cluster's CPU count, or the
seeded shuffles would differ between a run and its resumption on another cluster), and every
shuffle has an integer seed (Ray: the same order on every execution of the plan).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import data_checks, readers
from . import ingest_checks as checks
from .epochs import VALIDATION_DATASET, epoch_seed
from .train_blocks import TrainBlocks

SPLITS = ("train", "validation", "test")

if TYPE_CHECKING:
    import ray.data

    from .spec import DataSource, DataSpec, StorageSpec

log = logging.getLogger(__name__)

READ_BLOCKS = 8  # blocks per file read: fixed, see the module docstring (determinism)
TOKENIZE_BATCH = 512  # rows per map_batches call: big enough for the fast tokenizer's batching
# rows per block of the tokenized train split, which each worker fetches block by block (train_blocks.py,
# two kept). The read's blocks are a fixed count (READ_BLOCKS), so they grow with the file: at 100x the
# quickstart (3.8 M rows) a tokenized block held ~440 k rows, and the workers' peak memory grew by the
# two blocks they held (bench/data_scaling.py: 1100 -> 1318 MiB). Re-cut to a fixed row count, a
# worker's share of memory no longer depends on the data's size; the rows' order is unchanged.
TRAIN_BLOCK_ROWS = 4096


@dataclass
class Ingested:
    """The datasets a run trains and evaluates on, and the figures results.json carries."""

    train: ray.data.Dataset  # tokenized, materialized in the object store (the driver holds references)
    train_blocks: TrainBlocks  # its blocks' references and rows, in order: what the workers read from
    validation: ray.data.Dataset | None
    test: ray.data.Dataset | None
    label_names: list[str] | None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def train_rows(self) -> int:
        """Examples (packed blocks with spec.data.packing) of the train split."""
        return int(self.stats["rows"]["train"])

    def trainer_datasets(self) -> tuple[dict[str, ray.data.Dataset], Any]:
        """What a TorchTrainer is given: the validation split, whole to every worker (evaluation
        shards it by index). Not the train split: each worker fetches its rows of an epoch from
        `train_blocks`, which reach it in the loop's config (epochs.py says why)."""
        from ray.train import DataConfig

        datasets = {VALIDATION_DATASET: self.validation} if self.validation is not None else {}
        return datasets, DataConfig(datasets_to_split=[])


def configure_context() -> None:
    """What the exact-resume guarantee needs of Ray Data in this process (the driver): every pass
    keeps its rows in order, so the train split's row order, which epochs.py's arithmetic indexes,
    is the same in every ingest of the same files and seed."""
    import ray.data

    from . import logs

    logs.quiet_ray_data()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # the CLI's own progress lines are the ones users read
    # a DataError raised in a task reaches the driver as itself (in RayTaskError's `cause`, which
    # _data_error finds), not as a UserCodeException whose cause is lost on the way back
    ctx.raise_original_map_exception = True


def read(source: DataSource, where: str, storage: StorageSpec | None = None) -> ray.data.Dataset:
    """A lazy dataset of one jsonl/csv/parquet source (local, pkg:// or s3://), located and parsed
    as readers.py says: the preflight's sample reads the file's head the same way."""
    import ray.data

    from .data import DataError

    try:
        filesystem, path = readers.locate(source, where, storage)
    except readers.SourceUnreadable as err:
        raise DataError(str(err)) from None
    fmt = source.resolved_format()
    common: dict[str, Any] = {"filesystem": filesystem, "override_num_blocks": READ_BLOCKS, "file_extensions": None}
    try:
        if fmt == "jsonl":
            # pyarrow's JSON reader is line-delimited already (lines=True is the pandas reader, which takes no
            # filesystem, so no s3:// with our endpoint)
            return ray.data.read_json(path, **common)
        if fmt == "csv":
            return ray.data.read_csv(path, convert_options=readers.csv_convert_options(), **common)
        if fmt == "parquet":
            return ray.data.read_parquet(path, **common)
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: cannot read {source.path} as {fmt}: {err}") from err
    raise DataError(f"{where}.format: cannot tell the format of {source.path!r}; set format")


def _tokenize(batch: pd.DataFrame, *, data: DataSpec, tokenizer: Any, split: str,
              label_names: list[str] | None, where: str) -> dict[str, np.ndarray]:
    """map_batches' function: a pandas batch to columns of token ids (and labels), unpadded.
    With spec.data.packing the batch's examples come out as packed blocks (data.py packs them with
    packing.pack): a block never spans two batches, so a batch of TOKENIZE_BATCH rows fills its
    blocks nearly as well as the whole split would, and the result depends only on the rows' order.

    A task, not an actor pool: a pool's actors take seconds to start, and the fast tokenizer
    pickles into each task in milliseconds. The per-example encodings are data.py's (the same
    truncation, EOS and chat rules) that the preflight's sample (data_sample.py) is tokenized with.
    A conversation cell that is not a list of {role, content} messages is refused here, named by
    `where` and its text (a shuffled batch no longer knows its file row; the sample names the row)."""
    from . import chat
    from .data import label_ids, tokenize_causal, tokenize_classification

    # Ray gave this task one CPU and runs as many such tasks as there are CPUs; the fast tokenizer's
    # own thread pool would spread each of them over every core. Measured on 2 CPUs (the 10x file of
    # bench/data_scaling.py): with it 2 tasks tokenized 1.14x the rows/s of 1 (8623 rows/s); without it
    # 1.86x (9400 rows/s)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if label_names is not None:
        tokenized = tokenize_classification(batch, label_ids(batch[data.label_field], label_names, data), data, tokenizer)
    else:
        if data.resolved_format() == "messages":
            cells = chat.check_messages(batch[data.messages_field], where, data.messages_field, numbered=False)
            batch = batch.assign(**{data.messages_field: pd.Series(cells, index=batch.index, dtype=object)})
        tokenized = tokenize_causal(batch, data, tokenizer, split, whole_split=False)  # the split's count: ingest
    out = {"input_ids": _ragged(tokenized.input_ids)}
    out["labels"] = (np.asarray(tokenized.labels) if isinstance(tokenized.labels, np.ndarray)
                     else _ragged(tokenized.labels))
    if tokenized.token_type_ids is not None:
        out["token_type_ids"] = _ragged(tokenized.token_type_ids)
    if tokenized.position_ids is not None:  # spec.data.packing: blocks of whole examples (packing.pack, per batch)
        out["position_ids"] = _ragged(tokenized.position_ids)
        out["examples"] = np.fromiter((int((p == 0).sum()) for p in tokenized.position_ids), dtype=np.int64,
                                      count=len(tokenized.position_ids))
    out["num_tokens"] = np.fromiter((len(r) for r in tokenized.input_ids), dtype=np.int64,
                                    count=len(tokenized.input_ids))
    return out


def _data_error(err: BaseException) -> BaseException:
    """The DataError (or chat.ChatDataError) a Ray Data task raised, found in Ray's wrapping of it
    (RayTaskError's `cause`, UserCodeException's `__cause__`), so the message names the spec field
    without a remote traceback; `err` itself when no such error is inside."""
    from .chat import ChatDataError
    from .data import DataError

    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (DataError, ChatDataError)) and type(current) in (DataError, ChatDataError):
            return DataError(str(current))
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return err


def _reason(err: BaseException) -> str:
    """The innermost error's first line (Ray wraps a task's error in RayTaskError), shortened."""
    inner: BaseException = err
    while (cause := getattr(inner, "cause", None) or inner.__cause__) is not None and cause is not inner:
        inner = cause
    line = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
    return f"{type(inner).__name__}: {line}"[:300]


def _ragged(rows: list[np.ndarray]) -> np.ndarray:
    column = np.empty(len(rows), dtype=object)
    column[:] = rows
    return column


def ingest(data: DataSpec, task: str, tokenizer: Any, seed: int, *, storage: StorageSpec | None = None,
           num_labels: int | None = None) -> Ingested:
    """Read, check, split, label and tokenize `data` for `task` on Ray Data; raises `DataError`.

    `stats` has, per split: `rows` (examples; packed blocks with spec.data.packing), `tokens`,
    `table_rows` (rows that went into tokenizing), `tokenize_seconds`; per file read: `file_rows`,
    `dropped_empty`, `dropped_empty_by_field` (a row empty in two fields counts under both);
    `duplicates_of_train` per held-out split; `dropped_untrained` (rows left with no trained token)
    for chat and prompt/completion data; `train_label_counts` and `classes_missing_from_train`
    for classification."""
    import time

    from .data import DataError

    stats = _new_stats()
    frames, label_names = _splits(data, task, seed, storage, num_labels, stats)
    stats["tokenize_seconds"] = {}
    out: dict[str, ray.data.Dataset | None] = {}
    for name, frame in frames.items():
        if frame is None:
            out[name] = None
            continue
        clock = time.perf_counter()
        where = f"{name} ({(getattr(data, name) or data.train).path})"  # a carved split's rows are the train file's
        tokenize = partial(_tokenize, data=data, tokenizer=tokenizer, split=name, label_names=label_names, where=where)
        try:
            tokenized = frame.map_batches(tokenize, batch_size=TOKENIZE_BATCH, batch_format="pandas")
            if name == "train":
                tokenized = tokenized.repartition(target_num_rows_per_block=TRAIN_BLOCK_ROWS)
            tokenized = tokenized.materialize()
        except Exception as err:  # a bad cell found in a task: Ray wraps the DataError; the user gets its message
            raise _data_error(err) from None
        stats["tokenize_seconds"][name] = time.perf_counter() - clock
        rows = tokenized.count()
        if rows == 0 and data.resolved_format() != "text":
            from .chat import no_trained_token

            raise DataError(no_trained_token(frame.count(), name, data.max_seq_length))
        if rows == 0:
            raise DataError(f"spec.data.{name}: no usable rows (all empty or capped to 0)")
        stats["rows"][name] = rows  # examples, or packed blocks
        stats["table_rows"][name] = frame.count()  # rows that went into tokenizing (materialized: metadata)
        # one streamed pass over the small columns for the figures: tokens, label counts, packed examples
        counting = label_names is not None and name == "train"
        figures = ["num_tokens", *(["labels"] if counting else []), *(["examples"] if data.packing and label_names is None else [])]
        tokens, examples, counts = 0, 0, np.zeros(len(label_names or []), dtype=np.int64)
        for part in tokenized.select_columns(figures).iter_batches(batch_format="numpy"):
            tokens += int(part["num_tokens"].sum())
            if counting:
                counts += np.bincount(part["labels"], minlength=len(counts))
            if "examples" in part:
                examples += int(part["examples"].sum())
        stats["tokens"][name] = tokens
        if "examples" in figures:
            stats.setdefault("packed_examples", {})[name] = examples
        if data.resolved_format() != "text":  # rows left with no trained token (a prompt filling maxSeqLength)
            stats.setdefault("dropped_untrained", {})[name] = stats["table_rows"][name] - (examples if "examples" in figures else rows)
        if counting and label_names is not None:
            _label_figures(stats, label_names, counts)
        out[name] = tokenized
    train_ds = out["train"]
    assert train_ds is not None
    return Ingested(train_ds, TrainBlocks.of(train_ds), out["validation"], out["test"], label_names, stats)


def count(data: DataSpec, task: str, seed: int, *, storage: StorageSpec | None = None,
          num_labels: int | None = None) -> dict[str, Any]:
    """`finetune validate`'s full counts: everything `ingest` reads, checks, carves and counts
    (its refusals included), streamed over the whole files, but nothing tokenized. `table_rows`
    per split are the rows a run would tokenize; the figures that need tokens (`rows` of packed
    blocks, `tokens`, `dropped_untrained`) are a run's."""
    stats = _new_stats()
    frames, label_names = _splits(data, task, seed, storage, num_labels, stats)
    for name, frame in frames.items():
        if frame is not None:
            stats["table_rows"][name] = frame.count()
    if label_names is not None:
        train = frames["train"]
        assert train is not None
        _label_figures(stats, label_names, checks.label_counts(train, label_names, data))
    return stats


def _new_stats() -> dict[str, Any]:
    return {"rows": {}, "tokens": {}, "table_rows": {}, "file_rows": {}, "dropped_empty": {}, "dropped_empty_by_field": {}}


def _label_figures(stats: dict[str, Any], label_names: list[str], counts: np.ndarray) -> None:
    stats["train_label_counts"] = dict(zip(label_names, counts.tolist(), strict=True))
    stats["classes_missing_from_train"] = data_checks.missing_classes(label_names, counts)


def _splits(data: DataSpec, task: str, seed: int, storage: StorageSpec | None, num_labels: int | None,
            stats: dict[str, Any]) -> tuple[dict[str, ray.data.Dataset | None], list[str] | None]:
    """Every file read, decoded, cleaned (refused above maxDroppedFraction) and shuffled by the
    job's seed; the held-out splits carved and every split capped; the class names of the whole
    train file (classification). The splits stay in the object store."""
    from .data import DataError, label_ids, label_names_of, required_columns  # lazily: data.py imports torch

    configure_context()
    columns = required_columns(data, task)
    frames: dict[str, ray.data.Dataset | None] = {}
    for stream, name in enumerate(SPLITS):
        source = getattr(data, name)
        if source is None:
            frames[name] = None
            continue
        # Each step below is a pass over the data; the read rows and the cleaned, shuffled ones are kept in
        # the object store (spilled to disk when large, never in the driver) so no pass reads the files again
        where = f"spec.data.{name}"
        decode = partial(checks.decoded, columns=list(columns.values()), errors=source.encoding_errors, where=where,
                         path=source.path, fmt=source.resolved_format())
        try:
            raw = read(source, where, storage).map_batches(decode, batch_format="pyarrow").materialize()
        except Exception as err:  # a cell that is not UTF-8 under encodingErrors: strict, raised in a task
            found = _data_error(err)
            if isinstance(found, DataError):
                raise found from None
            # the file did not parse past the preflight's sample (a row of mixed types, a broken line), or
            # could not be read (storage): one line naming the field, not Ray's remote traceback
            raise DataError(f"{where}: cannot read {source.path} as {source.resolved_format()}: {_reason(err)}") from None
        cleaned = checks.clean(raw, columns, name, data, stats)
        frames[name] = cleaned.random_shuffle(seed=epoch_seed(seed, 1_000 + stream)).materialize()  # one order per file
    label_names = None
    if task == "sequence-classification":
        train = frames["train"]
        assert train is not None
        # classes come from the whole train file (before carving and caps), so a split or a cap never changes them
        values = pd.Series(checks.distinct(train, data.label_field))
        label_names = label_names_of(data, values, num_labels)
        if problem := data_checks.class_not_in_file(data, label_names, label_ids(values, label_names, data), num_labels):
            raise DataError(problem)
    _carve_and_cap(frames, data)
    if label_names is not None:  # a held-out label the classes lack: named now, before any tokenizing (and by validate)
        for name in data_checks.HELD_OUT:
            if (held := frames[name]) is not None:
                label_ids(pd.Series(checks.distinct(held, data.label_field)), label_names, data)
    stats["duplicates_of_train"] = checks.duplicates_of_train(frames, columns)
    return frames, label_names


def _carve_and_cap(frames: dict[str, ray.data.Dataset | None], data: DataSpec) -> None:
    """data.py's carving on datasets: validation the head of the shuffled train, test its tail.
    `split_at_indices` materializes the pieces in the object store, not in the driver."""
    from .data import DataError, carve

    train = frames["train"]
    assert train is not None
    n = train.count()
    n_val = carve(n, data.validation, data.validation_split)
    n_test = carve(n, data.test, data.test_split)
    if n_test + n_val >= n:
        raise DataError(f"spec.data.train: no training rows left ({n} usable rows, {n_test} for test, "
                        f"{n_val} for validation); add data or lower validationSplit/testSplit")
    head, middle, tail = train.split_at_indices([n_val, n - n_test])
    if n_val:
        frames["validation"] = head
    if n_test:
        frames["test"] = tail
    frames["train"] = middle
    caps = {"train": data.max_train_samples, "validation": data.max_eval_samples, "test": data.max_test_samples}
    for name, cap in caps.items():
        frame = frames[name]
        if frame is not None and cap is not None:
            frames[name] = frame.limit(cap)
