"""The data a run trains on, read back from the real ingest (ingest.py on the session's local Ray)
into in-memory splits a test can index: what the tests of the data's semantics (carving, caps,
labels, tokenizing, the data checks' figures) assert on. Needs the `local_ray` fixture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune_trainer.data import TokenizedSplit


@dataclass
class Splits:
    """The ingest's splits read whole, in the order the ingest left them, with its figures."""

    train: TokenizedSplit
    validation: TokenizedSplit | None
    test: TokenizedSplit | None
    label_names: list[str] | None
    stats: dict[str, Any] = field(default_factory=dict)


def ingest_splits(data, task: str, tokenizer, seed: int, num_labels: int | None = None, storage=None) -> Splits:
    """`ingest(...)` with every split gathered (batches.gather, the workers' own reader of small splits)."""
    from finetune_trainer.batches import gather
    from finetune_trainer.ingest import ingest

    got = ingest(data, task, tokenizer, seed, storage=storage, num_labels=num_labels)

    def read(ds) -> TokenizedSplit | None:
        return gather(ds.iter_batches(batch_format="numpy")) if ds is not None else None

    train = read(got.train)
    assert train is not None
    return Splits(train, read(got.validation), read(got.test), got.label_names, got.stats)
