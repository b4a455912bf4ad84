"""Training metrics on Ray's own Prometheus endpoint, through `ray.util.metrics`.

Every Ray node already serves its metrics for Prometheus (the head pod's `metrics` port, 8080 in
rayjob.HEAD_PORTS; a local Ray's `metrics_export_port`), and the Ray dashboard's Metrics view reads
the same series. The ProgressTracker actor (driver.py), which rank 0 of every run and trial already
reports to, sets these gauges, so they come from one process per job and need no extra port, server
or client library. Ray prefixes what it exports with `ray_`: `finetune_train_loss` is scraped as
`ray_finetune_train_loss`, the name the chart's Grafana dashboard queries
(helm/finetune-operator/dashboards/finetune.json; tests/unit/test_grafana_dashboard.py holds
them to the declarations below).

    finetune_train_loss{finetune_job,finetune_namespace,run,trial}            the latest training loss (rank 0's recent steps)
    finetune_training_step{finetune_job,finetune_namespace,run,trial}         the latest optimizer step
    finetune_eval_metric{finetune_job,finetune_namespace,run,trial,metric}    every evaluation's metrics (eval_loss, eval_accuracy, ...)
    finetune_tokens_per_second{finetune_job,finetune_namespace,run,trial}     training throughput, from a run's or trial's summary
    finetune_trials{finetune_job,finetune_namespace,run,state}                trials by state: running, stopped (by the scheduler), finished

A plain run is the trial "-". Values come from what the workers already report (recipe.py): no
extra collective or timer on the training side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from ray.util.metrics import Gauge

log = logging.getLogger(__name__)

RUN_TAGS = ("finetune_job", "finetune_namespace", "run")  # not job/namespace: Prometheus sets those on every scraped series
TRIAL_TAGS = (*RUN_TAGS, "trial")
NO_TRIAL = "-"
EVAL_PREFIX = "eval_"


def run_tags(namespace: str, job: str, run: str) -> dict[str, str]:
    return {"finetune_job": job, "finetune_namespace": namespace, "run": run}


class TrainingMetrics:
    """The gauges of one run (or search), tagged with its job and run. Not thread-safe: one owner (the tracker actor)."""

    def __init__(self, tags: Mapping[str, str]):
        self.tags = {key: str(tags.get(key, "")) for key in RUN_TAGS}
        self.loss = Gauge("finetune_train_loss", description="Latest training loss of a run or trial.", tag_keys=TRIAL_TAGS)
        self.step = Gauge("finetune_training_step", description="Latest optimizer step of a run or trial.", tag_keys=TRIAL_TAGS)
        self.eval_metric = Gauge("finetune_eval_metric", description="Latest evaluation metric of a run or trial, by metric.",
                                 tag_keys=(*TRIAL_TAGS, "metric"))
        self.tokens_per_second = Gauge("finetune_tokens_per_second", description="Training tokens per second of a run or trial.",
                                       tag_keys=TRIAL_TAGS)
        self.trials = Gauge("finetune_trials", description="Trials of a search (or the one run) by state.", tag_keys=(*RUN_TAGS, "state"))
        self.states: dict[str, str] = {}

    def progress(self, progress: Mapping[str, Any]) -> None:
        """One step report ({"trial", "step", "total", "loss", "lr"}, recipe._progress)."""
        tags = self._trial(progress.get("trial"))
        self._set(self.loss, progress.get("loss"), tags)
        self._set(self.step, progress.get("step"), tags)
        self._state(tags["trial"], "running")

    def row(self, row: Mapping[str, Any]) -> None:
        """One reported row: an evaluation (eval_* values; tokens_per_second in a run's last), or a search event."""
        tags = self._trial(row.get("trial"))
        if "event" in row:
            if "stopped" in str(row["event"]):
                self._state(tags["trial"], "stopped")
            return
        for key, value in row.items():
            if key.startswith(EVAL_PREFIX):
                self._set(self.eval_metric, value, tags | {"metric": key[len(EVAL_PREFIX):]})
        self._set(self.tokens_per_second, row.get("tokens_per_second"), tags)
        if "tokens_per_second" in row or row.get("early_stopped"):  # the summary: its last row
            self._state(tags["trial"], "stopped" if row.get("early_stopped") else "finished")
        elif not row.get("baseline"):
            self._state(tags["trial"], self.states.get(tags["trial"], "running"))

    def _trial(self, trial: Any) -> dict[str, str]:
        return self.tags | {"trial": str(trial) if trial else NO_TRIAL}

    def _state(self, trial: str, state: str) -> None:
        if self.states.get(trial) in ("stopped", "finished") and state == "running":
            return  # a late step report of a trial that has ended
        self.states[trial] = state
        for name in ("running", "stopped", "finished"):
            self.trials.set(sum(1 for s in self.states.values() if s == name), tags=self.tags | {"state": name})

    @staticmethod
    def _set(gauge: Gauge, value: Any, tags: dict[str, str]) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            gauge.set(float(value), tags=tags)
