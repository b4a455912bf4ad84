"""The data checks of the ingest (ingest.py) on Ray Data datasets: text decoding by
encodingErrors, the empty-row counts and the maxDroppedFraction refusal, the label set, and the
held-out rows repeating a training text. data_checks.py says what each check is for; here they run
as per-batch map tasks whose small results are merged in the driver.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import data_checks

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from .spec import DataSpec


def decoded(batch: pa.Table, *, columns: list[str], errors: str, where: str, path: str, fmt: str) -> pa.Table:
    """The named columns as valid UTF-8 text, by the source's encodingErrors (strict, replace,
    ignore), as Python's decoder applies them to a text file. pyarrow reads a CSV column
    holding invalid UTF-8 as binary, and a JSON string without checking it (the error then comes
    from wherever it is first converted), so each named column is checked (pyarrow's full
    validation, in C++) and decoded in Python only when it is binary or fails the check."""
    import pyarrow as pa

    from .data import DataError

    for name in columns:
        if name not in batch.column_names:
            continue  # clean names the missing column
        column = batch.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            try:
                column.validate(full=True)
                continue
            except pa.ArrowInvalid:
                pass
        elif not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            continue
        try:
            values = [None if v is None else v.decode("utf-8", errors) for v in column.cast(pa.binary()).to_pylist()]
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: cannot read {path} as {fmt}: {err}; try encodingErrors: replace") from None
        batch = batch.set_column(batch.column_names.index(name), name, pa.array(values, pa.string()))
    return batch


def _empty_counts(batch: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """One row per batch: rows read, rows kept, and per spec field the rows with that cell empty."""
    keep, by_field = data_checks.empty_cells(batch, columns)
    return pd.DataFrame([{"read": len(batch), "kept": int(keep.sum()), **by_field}])


def summed(counts: ray.data.Dataset) -> dict[str, int]:
    """The columns of a one-row-per-batch count dataset, summed in the driver. Ray Data's own
    `sum()` is an aggregation through a hash shuffle (actors started for it): ~4 s on a 2-core
    machine even for 240 rows, paid by every run and resume; these rows are one per batch."""
    total: dict[str, int] = {}
    for row in counts.iter_rows():
        for key, value in row.items():
            total[key] = total.get(key, 0) + int(value)
    return total


def distinct(ds: ray.data.Dataset, column: str) -> list[Any]:
    """The distinct values of `column`, found per batch in tasks and merged in the driver (Ray
    Data's `unique()` is a hash-shuffle aggregation, as `summed` says). For label columns: few values."""

    def batch_values(batch: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"value": pd.unique(batch[column])})

    seen: dict[Any, None] = {}
    for row in ds.map_batches(batch_values, batch_format="pandas").iter_rows():
        seen.setdefault(row["value"], None)
    return list(seen)


def missing_column(have: list[str], columns: dict[str, str], path: str) -> str | None:
    """The refusal (`spec.data.<field>: ...`) for the first column the spec names that `have` lacks."""
    for spec_field, column in columns.items():
        if column not in have:
            return f"spec.data.{spec_field}: column {column!r} not in {path}; columns are: {', '.join(have) or '(none)'}"
    return None


def label_counts(ds: ray.data.Dataset, label_names: list[str], data: DataSpec) -> np.ndarray:
    """Rows per class id of a cleaned split, counted per batch in tasks (see `summed`)."""
    from .data import label_ids

    def per_batch(batch: pd.DataFrame) -> pd.DataFrame:
        counts = np.bincount(label_ids(batch[data.label_field], label_names, data), minlength=len(label_names))
        return pd.DataFrame([{str(i): int(n) for i, n in enumerate(counts)}])

    total = summed(ds.map_batches(per_batch, batch_format="pandas"))
    return np.array([total.get(str(i), 0) for i in range(len(label_names))], dtype=np.int64)


def _drop_empty(batch: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    keep, _ = data_checks.empty_cells(batch, columns)
    return batch.loc[keep].reset_index(drop=True)


def clean(ds: ray.data.Dataset, columns: dict[str, str], name: str, data: DataSpec,
          stats: dict[str, Any]) -> ray.data.Dataset:
    """The source with its empty rows dropped; refused (before any shuffle or tokenizing) when
    more than maxDroppedFraction of them are. One pass of per-batch counts finds them."""
    from .data import DataError

    if problem := missing_column(ds.columns() or [], columns, getattr(data, name).path):
        raise DataError(problem)
    counts = summed(ds.map_batches(partial(_empty_counts, columns=columns), batch_format="pandas"))
    read, kept = counts["read"], counts["kept"]
    by_field = {f: counts[f] for f in columns}
    stats["file_rows"][name], stats["dropped_empty"][name] = read, read - kept
    stats["dropped_empty_by_field"][name] = by_field
    problem = data_checks.dropped_share_problem(name, getattr(data, name).path, read, read - kept, by_field,
                                                data.max_dropped_fraction)
    if problem:
        raise DataError(f"spec.data.maxDroppedFraction: {problem}")
    return ds.map_batches(partial(_drop_empty, columns=columns), batch_format="pandas")


def duplicates_of_train(frames: dict[str, ray.data.Dataset | None], columns: dict[str, str]) -> dict[str, int]:
    """Per held-out split (carved and capped, as scored), its rows whose input text a train row
    (as trained on) also has; each such row counts, not each distinct text. The label is not part
    of the key: the same text under another label leaks just as much. The held-out splits' text hashes (small: capped splits)
    come to the driver; one pass over train's batches finds which of them train has, so no set of
    train's hashes is held anywhere."""
    inputs = [c for f, c in columns.items() if f != "labelField"]

    def hashes(batch: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"hash": data_checks.text_hashes(batch, inputs)})

    held = {name: np.concatenate([b["hash"] for b in ds.map_batches(hashes, batch_format="pandas").iter_batches(batch_format="numpy")]
                                 or [np.array([], dtype=np.uint64)])
            for name in data_checks.HELD_OUT if (ds := frames[name]) is not None}
    if not held:
        return {}
    wanted = np.unique(np.concatenate(list(held.values())))

    def found(batch: pd.DataFrame) -> pd.DataFrame:
        mine = data_checks.text_hashes(batch, inputs)
        return pd.DataFrame({"hash": np.unique(mine[np.isin(mine, wanted)])})

    train = frames["train"]
    assert train is not None
    in_train = [b["hash"] for b in train.map_batches(found, batch_format="pandas").iter_batches(batch_format="numpy")]
    seen = np.concatenate(in_train) if in_train else np.array([], dtype=np.uint64)
    return {name: int(np.isin(h, seen).sum()) for name, h in held.items()}
