"""TensorBoard event files of a run's evaluations (`spec.tracking.tensorboard`), written by the driver.

The driver sees every evaluation of every worker group and trial (the progress tracker's rows), so
one writer per run (one per trial of a search, in `tensorboard/<trial>/`, which TensorBoard shows as
separate runs) writes them all; the workers write nothing. Through TensorBoard's own
EventFileWriter and protos (what torch's SummaryWriter wraps), without importing torch here.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
# a row's keys that are not a measurement: positions, flags, the running best, a trial's sampled values
_NOT_METRICS = {"step", "best_step", "resumed_from_step", "trial", "baseline", "has_model", "early_stopped", "preempted"}


def row_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers a reported row measured (losses, metrics, learning rate, tokens/s, memory):
    one definition for TensorBoard and MLflow. Search parameters (dotted spec paths) and the
    running best (`best_*`) are left out: they are not curves of this run."""
    return {key: float(value) for key, value in row.items()
            if key not in _NOT_METRICS and not key.startswith("best_") and "." not in key
            and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)}


def tag(key: str) -> str:
    """eval_loss -> eval/loss, train_loss -> train/loss: TensorBoard groups scalars by the prefix."""
    for prefix in ("eval_", "train_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return key


class EventWriter:
    """Appends each new (trial, step) row once; a restarted driver starts a new event file beside
    the old ones, and TensorBoard merges the files of a folder."""

    def __init__(self, run_dir: Path):
        self.root = run_dir / TENSORBOARD_DIR
        self.writers: dict[str, Any] = {}
        self.written: set[tuple[str, int, bool]] = set()

    def write(self, rows: list[dict[str, Any]]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        for row in rows:
            if "step" not in row:
                continue
            key = (str(row.get("trial") or ""), int(row["step"]), bool(row.get("baseline")))
            if key in self.written:
                continue
            self.written.add(key)
            values = [Summary.Value(tag=tag(k), simple_value=v) for k, v in row_metrics(row).items()]
            self._writer(key[0]).add_event(Event(wall_time=time.time(), step=key[1], summary=Summary(value=values)))
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def _writer(self, trial: str):
        if trial not in self.writers:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            folder = self.root / trial if trial else self.root
            folder.mkdir(parents=True, exist_ok=True)
            self.writers[trial] = EventFileWriter(str(folder))
        return self.writers[trial]
