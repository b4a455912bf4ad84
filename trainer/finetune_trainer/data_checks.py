"""The data checks a new user misses, counted while the ingest (ingest.py, ingest_checks.py) reads the files.

Three things make a fine-tune quietly worse than it looks, and none of them shows in the loss:

* rows dropped because their text or label is empty: counted per split and per spec field
  (`dropped_empty_by_field`); above `spec.data.maxDroppedFraction` of a file the data is refused,
  since a file that lost a tenth of its rows is usually read with the wrong column or encoding;
* a class the classifier's head has but the training rows never show (`classes_missing_from_train`);
  the ingest refuses it when no row of the train file has it, and warns when only the rows
  left for training after `validationSplit`/`testSplit`/`maxTrainSamples` lack it (see
  `missing_classes` for why);
* held-out rows whose text is also a training row's (`duplicates_of_train`): leakage, which makes
  validation and test scores lie. Reported, never refused: deduplicating is the user's call.

Everything here is linear in the rows and touches no tokenizer: a row count per column and one
64-bit hash per row, so `finetune validate` stays bounded however large the files are. This
module imports no torch (the driver-side rule of tests/unit/test_architecture.py).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from .spec import DataSpec

log = logging.getLogger(__name__)

HELD_OUT = ("validation", "test")


def empty_cells(frame: pd.DataFrame, columns: dict[str, str]) -> tuple[np.ndarray, dict[str, int]]:
    """Which rows to keep (no required cell missing or blank), and per spec field how many rows
    have that field's cell empty. A row empty in two fields counts under both; the rows dropped
    are `(~keep).sum()`."""
    keep = np.ones(len(frame), dtype=bool)
    by_field: dict[str, int] = {}
    for spec_field, column in columns.items():
        values = frame[column]
        blank = (values.isna() | values.astype(str).str.strip().eq("")).to_numpy(dtype=bool)
        by_field[spec_field] = int(blank.sum())
        keep &= ~blank
    return keep, by_field


def dropped_share_problem(
    split: str, path: str, read: int, dropped: int, by_field: dict[str, int], limit: float
) -> str | None:
    """The refusal message when more than `limit` of a file's rows were dropped, else None."""
    if read == 0 or dropped / read <= limit:
        return None
    reasons = ", ".join(f"{field} empty in {n}" for field, n in by_field.items() if n)
    return (
        f"{dropped} of {read} rows of {split} ({path}) have an empty text or label "
        f"({_percent(dropped / read)}, over the {_percent(limit)} allowed): {reasons}; check the column names "
        "and the file's encoding, or raise spec.data.maxDroppedFraction (up to 1) to train on the rest"
    )


def _percent(share: float) -> str:
    """10%, 10.4%, 0.5%: never "10%, over the 10% allowed" for a share just above the limit."""
    return f"{100 * share:.3g}%"


def text_hashes(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """One 64-bit hash per row of the input text columns, after the normalisation every tokenizer
    applies anyway: leading, trailing and repeated whitespace does not make a text different.
    Case is kept: a cased model sees "Good" and "good" as different inputs."""
    normal = pd.DataFrame(
        {c: frame[c].astype(str).str.replace(r"\s+", " ", regex=True).str.strip() for c in columns}
    )
    return pd.util.hash_pandas_object(normal, index=False).to_numpy()


def missing_classes(names: list[str], counts: np.ndarray) -> list[str]:
    """Classes with no example among `counts` (one count per class id).

    Why a class missing from the whole train file is refused while one missing only from the rows
    left for training is a warning: in the first case the spec and the data disagree (a class in
    `spec.data.labels` that no row has, labels numbered 1..K, which make class 0 a class of its
    own, or `numLabels` above the ids the data uses); the head then gets a class whose logit
    training only ever pushes down, so the model can never predict it and every metric averaged
    over classes silently loses it. Nothing can make that run right but fixing the spec or the
    data. In the second case the data has the class and the user's own caps or split fractions
    left it out (a smoke run with `maxTrainSamples: 8` is the common one): a loud warning with the
    figures says so, and refusing would only break a run the user chose to make small.
    """
    return [name for name, n in zip(names, counts.tolist(), strict=True) if n == 0]


def class_not_in_file(data: DataSpec, names: list[str], ids: np.ndarray, num_labels: int | None) -> str | None:
    """The refusal (`spec.<field>: message`) for classes no row of the train file has (`ids`: the
    file's class ids), naming the field that made the class: spec.data.labels, spec.model.numLabels
    (classes above the data's ids), or spec.data.labelField (integer labels with a gap, as 1..K)."""
    missing = missing_classes(names, np.bincount(ids, minlength=len(names)))
    if not missing:
        return None
    shown = ", ".join(repr(m) for m in missing[:10]) + (" ..." if len(missing) > 10 else "")
    where = f"column {data.label_field!r} of spec.data.train ({data.train.path})"
    if data.labels is not None:
        return (f"spec.data.labels: class(es) {shown} never occur in {where}; the model would get a "
                "class it never learns: remove them from labels, or add training rows with them")
    top = int(ids.max())
    if num_labels is not None and all(names.index(m) > top for m in missing):
        return (f"spec.model.numLabels: {num_labels}, but the class ids in {where} stop at {top}; "
                f"class(es) {shown} would never be learned: lower numLabels to {top + 1}")
    return (f"spec.data.labelField: integer labels are class ids 0..{len(names) - 1}, and {shown} never "
            f"occur in {where} (labels numbered from 1?); renumber from 0, or name the classes in "
            "spec.data.labels")


def summary(stats: dict[str, Any]) -> list[str]:
    """The lines `finetune validate` prints about these checks: figures, not advice."""
    lines = []
    dropped = stats.get("dropped_empty", {})
    parts = []
    for split, n in dropped.items():
        by_field = stats["dropped_empty_by_field"][split]
        why = ", ".join(f"{field} {k}" for field, k in by_field.items() if k)
        parts.append(f"{split} {n} of {stats['file_rows'][split]}" + (f" ({why})" if why else ""))
    lines.append(f"dropped for an empty text or label: {'; '.join(parts)}")
    if untrained := stats.get("dropped_untrained"):
        shown = ", ".join(f"{split} {n} of {stats['table_rows'][split]}" for split, n in untrained.items())
        lines.append(f"dropped with no trained token left (prompt fills maxSeqLength, or no assistant turn): {shown}")
    dupes = stats.get("duplicates_of_train", {})
    if dupes:
        shown = ", ".join(f"{split} {n} of {stats['table_rows'][split]}" for split, n in dupes.items())
        lines.append(f"held-out rows whose text is also in train: {shown}")
    if "classes_missing_from_train" in stats:
        missing = stats["classes_missing_from_train"]
        lines.append(f"classes with no training row: {', '.join(missing) if missing else 'none'}")
    return lines


def warn(stats: dict[str, Any]) -> None:
    """Warnings about findings that do not refuse the data, through the logger: in `finetune
    validate`'s output and in every run's log, which both come through the preflight."""
    for split, n in stats.get("duplicates_of_train", {}).items():
        if n:
            log.warning(
                "%d of %d %s rows have the same text as a training row: their scores measure memory, "
                "not generalisation; deduplicate the files", n, stats["table_rows"][split], split,
            )
    missing = stats.get("classes_missing_from_train")
    if missing:
        log.warning(
            "class(es) %s have no row among the %d training rows (the train file has them, the "
            "held-out splits or maxTrainSamples took them): the model never learns them; use "
            "more training rows", ", ".join(missing), stats["table_rows"]["train"],
        )
