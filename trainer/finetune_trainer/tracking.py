"""Experiment tracking (`spec.tracking`): a run's evaluations, parameters, artifacts and model in
MLflow, and its evaluations as TensorBoard event files.

The driver does all of it (the workers' rows reach it through the progress tracker): opened when
the session has its run id, so a wrong address or refused credentials end the job in seconds,
before any training; fed every progress poll, so MLflow's charts move while the run trains;
finished from results.json's own histories (a restored search's earlier trials included), so
what MLflow shows and what results.json says are the same rows. A tracking server that stops
answering mid-run costs a warning, never the training run.

MLflow is used through its client (MlflowClient: experiments, runs, batches, artifacts, the model
registry); credentials are MLflow's own environment variables, never the spec (spec/tracking.py).
A search is a parent run with one nested run per trial (the `mlflow.parentRunId` tag, as
mlflow.start_run(nested=True) sets it). A new attempt of the same run (KubeRay's retry, `--run-id`)
continues the MLflow run tagged with its run id rather than starting a second one.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .spec import FineTuneJob
from .spec.tracking import MlflowSpec
from .tensorboard_events import TENSORBOARD_DIR, EventWriter, row_metrics

log = logging.getLogger(__name__)

RUN_TAG, TRIAL_TAG, JOB_TAG, KIND_TAG = "finetune.run", "finetune.trial", "finetune.job", "finetune.kind"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under this one
TRUNCATED = "...(truncated; the whole spec is in results.json)"
_KEY_CHARS = re.compile(r"[^\w.\- /:]")  # MLflow's allowed key characters (mlflow.utils.validation)
# a tracking server that does not answer: a few quick retries, not MLflow's default of 7 with a
# doubling backoff (minutes); the environment wins
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(RuntimeError):
    """The tracking server cannot be used: one line naming the field and what to check."""


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested mappings as dotted keys (`training.learningRate`); lists and scalars are leaves."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def params_of(manifest: dict[str, Any]) -> dict[str, str]:
    """The resolved spec as MLflow parameters, within MLflow's limits: keys of MLflow's characters
    and at most 250 of them, values at most 6000 characters (cut, and said so: results.json, an
    artifact of the run, has the whole spec). Values are JSON for anything but a string."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

    found: dict[str, str] = {}
    for path, value in flatten(manifest):
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
        key = _KEY_CHARS.sub("_", path)[:MAX_ENTITY_KEY_LENGTH]
        while key in found:  # two paths the rules above made equal: keep both
            key = key[: MAX_ENTITY_KEY_LENGTH - 1] + "~"
        found[key] = text
    return found


class MlflowRun:
    """One job run in MLflow: the run (a search's parent) and, for a search, a nested run per trial."""

    def __init__(self, spec: MlflowSpec, job: FineTuneJob, run_id: str):
        self.spec, self.job, self.run_id = spec, job, run_id
        self.client: Any = None
        self.parent = ""
        self.trials: dict[str, str] = {}  # trial name -> MLflow run id
        self.logged: set[tuple[str, int, bool]] = set()  # (trial, step, baseline) rows already sent
        self.experiment_id = ""
        self.kind = "search" if job.spec.search else "single"

    # ------------------------------------------------------------------ start
    def open(self) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.client = MlflowClient(tracking_uri=self.spec.tracking_uri, registry_uri=self.spec.tracking_uri)
        experiment = self.spec.experiment or f"{self.job.metadata.namespace}/{self.job.name}"
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            earlier = self._find({RUN_TAG: self.run_id}, parent=None)
            if earlier:  # a new attempt of this run: go on in its MLflow run
                self.parent = earlier
                self.client.update_run(earlier, status="RUNNING")
                self.logged |= self._logged_steps(earlier, "")
            else:
                self.parent = self.client.create_run(self.experiment_id, run_name=self.spec.run_name or self.run_id, tags={
                    RUN_TAG: self.run_id, JOB_TAG: self.job.name, "finetune.namespace": self.job.metadata.namespace,
                    KIND_TAG: self.kind}).info.run_id
            self._log(self.parent, params=params_of(self.job.spec.to_manifest()))
        except (MlflowException, OSError) as err:
            raise TrackingError(f"spec.tracking.mlflow.trackingUri: {self.spec.tracking_uri}: {_one_line(err)}; check the address, "
                                "that the job's pods may connect to it (spec.cluster.network.egress), and the credentials "
                                "in MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN") from None
        log.info("MLflow: experiment %r, run %s at %s", experiment, self.parent, self.spec.tracking_uri)

    # ------------------------------------------------------------------ during the run
    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        """Every reported row not sent yet, as metrics at its step (the baseline at step 0)."""
        from mlflow.entities import Metric

        batches: dict[str, list[Any]] = {}
        for row in rows:
            if "step" not in row:
                continue
            trial = str(row.get("trial") or "")
            run = self._trial_run(trial) if trial else self.parent  # first: it learns what an earlier attempt sent
            key = (trial, int(row["step"]), bool(row.get("baseline")))
            if key in self.logged:
                continue
            stamp = int(row.get("time", 0) * 1000) or _now_ms()
            metrics = [Metric(name, value, stamp, key[1]) for name, value in row_metrics(row).items()]
            batches.setdefault(run, []).extend(metrics)
            self.logged.add(key)
        for run, metrics in batches.items():
            self._log(run, metrics=metrics)

    # ------------------------------------------------------------------ the end
    def finish(self, results: dict[str, Any], run_dir: Path, model_dir: Path | None) -> None:
        """What only the end knows: every trial's history and outcome, the best checkpoint, test
        scores, the artifacts (results.json, plots, event files) and the registered model."""
        for trial in results.get("trials", []):
            self.log_rows([{**row, "trial": trial["trial"]} for row in trial.get("history", [])])
            run = self._trial_run(trial["trial"])
            self._log(run, params={k: json.dumps(v) if not isinstance(v, str) else v for k, v in trial["params"].items()},
                      tags={"status": trial["status"], **({"best_checkpoint": trial["checkpoint"]} if trial.get("checkpoint") else {})})
            self.client.set_terminated(run, status="FAILED" if trial["status"] == "failed" else "FINISHED")
        self.log_rows(results.get("history", []))
        best = results.get("best") or {}
        summary = {f"best_{best['metric']}": best["value"]} if best.get("value") is not None else {}
        test = results.get("metrics", {}).get("test", {})
        summary |= {f"test_{k}": v for k, v in test.get("finetuned", {}).items()}
        summary |= {f"test_baseline_{k}": v for k, v in test.get("baseline", {}).items()}
        tps = (results.get("throughput") or {}).get("tokens_per_second")
        summary |= {"tokens_per_second": tps} if tps is not None else {}
        from mlflow.entities import Metric

        stamp = _now_ms()
        tags = {k: str(v) for k, v in {"best_checkpoint": best.get("checkpoint"), "best_trial": best.get("trial"),
                                       "model": results.get("model")}.items() if v}
        self._log(self.parent, metrics=[Metric(k, float(v), stamp, int(best.get("step") or 0)) for k, v in summary.items()
                                        if isinstance(v, int | float)], tags=tags)
        for name in ("results.json", *sorted(p.name for p in run_dir.glob("*.png"))):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.parent, str(run_dir / name))
        if (run_dir / TENSORBOARD_DIR).is_dir():
            self.client.log_artifacts(self.parent, str(run_dir / TENSORBOARD_DIR), TENSORBOARD_DIR)
        if self.spec.registered_model_name and model_dir is not None:
            self._register(model_dir)
        self.client.set_terminated(self.parent, status="FINISHED")

    def fail(self) -> None:
        for run in [*self.trials.values(), self.parent]:
            if run:
                self.client.set_terminated(run, status="FAILED")

    # ------------------------------------------------------------------ helpers
    def _register(self, model_dir: Path) -> None:
        """The exported model (safetensors, config, tokenizer) as the run's `model` artifact, and a
        new version of the registered model whose source is that artifact."""
        from mlflow.exceptions import MlflowException

        name = self.spec.registered_model_name
        assert name is not None
        self.client.log_artifacts(self.parent, str(model_dir), "model")
        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(self.parent).info.artifact_uri}/model"
        version = self.client.create_model_version(name, source, run_id=self.parent, tags={RUN_TAG: self.run_id})
        log.info("MLflow: registered model %s version %s", name, version.version)

    def _trial_run(self, trial: str) -> str:
        if trial not in self.trials:
            earlier = self._find({TRIAL_TAG: trial}, parent=self.parent)
            if earlier:
                self.logged |= self._logged_steps(earlier, trial)
            self.trials[trial] = earlier or self.client.create_run(self.experiment_id, run_name=trial, tags={
                PARENT_TAG: self.parent, TRIAL_TAG: trial, RUN_TAG: self.run_id, JOB_TAG: self.job.name}).info.run_id
        return self.trials[trial]

    def _find(self, tags: dict[str, str], parent: str | None) -> str:
        where = [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ([f"tags.`{PARENT_TAG}` = '{parent}'"] if parent else [])
        if parent is None:  # the job's own run, not one of its trials' (they carry the run tag too)
            where += [f"tags.`{JOB_TAG}` = '{self.job.name}'", f"tags.`{KIND_TAG}` = '{self.kind}'"]
        runs = self.client.search_runs([self.experiment_id], " and ".join(where), max_results=1)
        return runs[0].info.run_id if runs else ""

    def _logged_steps(self, run: str, trial: str) -> set[tuple[str, int, bool]]:
        """The steps an earlier attempt already sent, by eval_loss's history (every task evaluates
        the loss; step 0 is the baseline)."""
        return {(trial, m.step, m.step == 0) for m in self.client.get_metric_history(run, "eval_loss")}

    def _log(self, run: str, *, metrics: list | None = None, params: dict[str, str] | None = None,
             tags: dict[str, str] | None = None) -> None:
        """log_batch within MLflow's per-request limits (1000 metrics; 100 params and tags)."""
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

        metrics = metrics or []
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
        pairs = [Param(k, v) for k, v in (params or {}).items()]
        for start in range(0, len(pairs), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run, params=pairs[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        marks = [RunTag(k, v[:MAX_TAG_VAL_LENGTH]) for k, v in (tags or {}).items()]
        for start in range(0, len(marks), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run, tags=marks[start : start + MAX_PARAMS_TAGS_PER_BATCH])


class Tracking:
    """What a flow calls: `listener` in its progress listeners, `finish` after results.json,
    `fail` on the way out of a failed run. Nothing at all when spec.tracking asks for nothing."""

    def __init__(self, job: FineTuneJob, run_id: str, run_dir: Path):
        spec = job.spec.tracking
        self.mlflow = MlflowRun(spec.mlflow, job, run_id) if spec.mlflow else None
        self.events = EventWriter(run_dir) if spec.tensorboard else None
        self.run_dir = run_dir
        self._warned = False

    @classmethod
    def open(cls, job: FineTuneJob, run_id: str, run_dir: Path) -> Tracking:
        tracking = cls(job, run_id, run_dir)
        if tracking.mlflow:
            tracking.mlflow.open()
        return tracking

    def listener(self, latest: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        if self.events:
            self.events.write(rows)
        if self.mlflow:
            try:
                self.mlflow.log_rows(rows)
            except Exception as err:  # a tracker that stops answering must not stop training
                if not self._warned:
                    log.warning("MLflow: cannot log this evaluation (%s); the run goes on, and its end logs it again", _one_line(err))
                self._warned = True

    def finish(self, results: dict[str, Any], model_dir: Path | None, upload: Any = None) -> None:
        """`upload(local_dir, name)`: copies the event files to the run's storage (S3) when there is one."""
        if self.events:
            for trial in results.get("trials", []):  # a restored search's earlier trials too
                self.events.write([{**row, "trial": trial["trial"]} for row in trial.get("history", [])])
            self.events.write(results.get("history", []))
            self.events.close()
            if upload is not None:
                upload(self.run_dir / TENSORBOARD_DIR, TENSORBOARD_DIR)
        if self.mlflow:
            self.mlflow.finish(results, self.run_dir, model_dir)

    def fail(self) -> None:
        if self.events:
            self.events.close()
        if self.mlflow and self.mlflow.parent:
            try:
                self.mlflow.fail()
            except Exception as err:
                log.warning("MLflow: cannot mark the run failed: %s", _one_line(err))


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__
