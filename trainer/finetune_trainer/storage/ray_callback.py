"""The one place a checkpoint becomes complete: a Ray Train callback on the controller.

Why the controller and not a worker: in Ray Train 2.60 every worker uploads its own files into
the shared `checkpoint_<timestamp>/` directory inside its `ray.train.report` (SYNC mode) and only
then puts its report on its result queue; the controller calls `UserCallback.after_report` once
it holds that report from *every* worker. So at `after_report` all files of the checkpoint are
in storage, and the marker written there is last. A marker written by rank 0 before its own
report could precede other ranks' uploads; one written after it would need an extra barrier.
If the controller dies before the marker is written, the directory simply never counts.

The marker lists every file with its SHA-256: taken from each worker's `_sha256_rank_<N>.json`
(the recipe writes it last into its folder) where the stored size matches, read back otherwise
(`integrity`); the controller never downloads a large checkpoint to hash it.
"""

from __future__ import annotations

from typing import Any, Literal

from ray.train import UserCallback

from .checkpoints import mark_complete, prune
from .s3 import Store


class CheckpointCompletion(UserCallback):
    """`RunConfig(callbacks=[CheckpointCompletion(store, keep_latest=1, keep_best=N, metric=..., mode=...)])`.

    After each reported checkpoint: write its `_COMPLETE.json` (step and numeric metrics from rank
    0's report), then, when `retention` is on, apply `prune` to that run's checkpoints. Storage
    errors propagate and fail the run: training on without checkpoints would only lose work later.
    """

    def __init__(self, store: Store, *, retention: bool = False, keep_latest: int = 1, keep_best: int = 0,
                 metric: str | None = None, mode: Literal["min", "max"] = "min"):
        self.store = store
        self.retention = retention
        self.keep_latest, self.keep_best, self.metric, self.mode = keep_latest, keep_best, metric, mode
        self.completed: list[str] = []

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is None:
            return
        row = metrics[0] if metrics else {}
        key = self.store.key_of(checkpoint.path)
        done = mark_complete(self.store, key, {"step": row.get("step"), "metrics": row})
        self.completed.append(done.key)
        if self.retention:
            prune(self.store, done.parent, keep_latest=self.keep_latest, keep_best=self.keep_best, metric=self.metric,
                  mode=self.mode)
