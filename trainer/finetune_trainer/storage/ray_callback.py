"""The one place a checkpoint becomes complete: a Ray Train callback on the controller.

Why the controller and not a worker: in Ray Train 2.60 every worker uploads its own files into
the shared `checkpoint_<timestamp>/` directory inside its `ray.train.report` (SYNC mode) and only
then puts its report on its result queue; the controller calls `UserCallback.after_report` once
it holds that report from *every* worker. So at `after_report` all files of the checkpoint are
in storage, and the marker written there is last. A marker written by rank 0 before its own
report could precede other ranks' uploads; one written after it would need an extra barrier.
If the controller dies before the marker is written, the directory simply never counts.

Storage that throttles or blips must not cost work: every request retries within its budget
(`spec.storage.maxAttempts`, 8 by default, adaptive mode). A marker that still cannot be written leaves its checkpoint
uncounted, with a warning, and training goes on: the next checkpoint gets a marker of its own, and a
resume in between takes the newest complete checkpoint before it (`resume`; Ray Train still lists
the unmarked one as its latest, and the workers skip it). Only storage that refuses the job's keys
or has no bucket fails the run here: that does not heal by waiting. A failed retention prune is
logged and simply runs again at the next checkpoint (it looks at the whole run each time).

The marker lists every file with its SHA-256: taken from each worker's `_sha256_rank_<N>.json`
(the recipe writes it last into its folder) where the stored size matches, read back otherwise
(`integrity`); the controller never downloads a large checkpoint to hash it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Literal

from ray.train import UserCallback

from .checkpoints import mark_complete, prune
from .errors import AccessDenied, BucketMissing, StorageError
from .integrity import MARKER
from .s3 import Store

log = logging.getLogger(__name__)


class CheckpointCompletion(UserCallback):
    """`RunConfig(callbacks=[CheckpointCompletion(store, keep_latest=1, keep_best=N, metric=..., mode=...)])`.

    After each reported checkpoint: write its `_COMPLETE.json` (step and numeric metrics from rank
    0's report), then, when `retention` is on, apply `prune` to that run's checkpoints. A marker
    that cannot be written within its retries is logged and its checkpoint does not count (`failed`);
    AccessDenied and BucketMissing propagate and fail the run. A failed prune is logged and retried
    at the next checkpoint.
    """

    def __init__(self, store: Store, *, retention: bool = False, keep_latest: int = 1, keep_best: int = 0,
                 metric: str | None = None, mode: Literal["min", "max"] = "min", tracker: Any = None):
        self.store = store
        self.tracker = tracker  # driver.ProgressTracker: told of each checkpoint made complete (status.lastCheckpoint)
        self.retention = retention
        self.keep_latest, self.keep_best, self.metric, self.mode = keep_latest, keep_best, metric, mode
        self.completed: list[str] = []
        self.failed: list[str] = []  # checkpoints whose marker could not be written: never loaded, pruned later

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is None:
            return
        row = metrics[0] if metrics else {}
        key = self.store.key_of(checkpoint.path)
        try:
            done = mark_complete(self.store, key, {"step": row.get("step"), "metrics": row})
        except (AccessDenied, BucketMissing):
            raise  # the keys or the bucket are wrong: retrying at the next checkpoint will not help
        except StorageError as err:
            self.failed.append(key)
            log.warning("checkpoint %s (step %s) does not count: its %s could not be written (%s). Training goes on; "
                        "a resume before the next checkpoint uses the newest complete one before it",
                        self.store.uri(key), row.get("step"), MARKER, err)
            return
        self.completed.append(done.key)
        if self.tracker is not None:  # fire and forget: the status is told, training never waits on it
            self.tracker.checkpointed.remote({"uri": self.store.uri(done.key), "step": row.get("step"), "trial": row.get("trial"),
                                              "time": datetime.now(UTC).isoformat()})
        if self.retention:
            self._prune(done.parent)

    def _prune(self, run_key: str) -> None:
        """Retention over the whole run, so what a failed prune left is deleted by the next one."""
        try:
            prune(self.store, run_key, keep_latest=self.keep_latest, keep_best=self.keep_best, metric=self.metric,
                  mode=self.mode)
        except StorageError as err:
            log.warning("retention: old checkpoints under %s were not deleted (%s); tried again at the next checkpoint",
                        self.store.uri(run_key), err)
