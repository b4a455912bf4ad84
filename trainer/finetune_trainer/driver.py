"""The driver's toolkit, shared by the single-run flow (`single`) and the search flow (`tuning`,
and each search trial, `trial`): Ray, the progress tracker, the TorchTrainer of a run or trial,
fit with progress polling, export of the chosen checkpoint's model, and the test-split scoring.

No flow lives here and nothing here imports a flow, so every flow imports this module and none
imports another (tests/unit/test_architecture.py checks for cycles). Torch is imported only inside
the Ray tasks and workers these functions start (`recipe`, `scoring`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.job_config import JobConfig

from . import environment, logs, phases
from .persist import ADAPTER_DIR, MODEL_DIR, Persistence
from .ranking import best_row
from .ray_metrics import TrainingMetrics
from .spec import FineTuneJob, SpecError

if TYPE_CHECKING:
    from .preflight import Prepared

log = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any], list[dict[str, Any]]], None]  # (latest progress, every reported row)

# How often Ray Train 2.60's controller polls its workers (default 2 s). Each worker hands its
# reports over through a queue of one (worker_group/worker.py: `queue.Queue(maxsize=1)`) that only
# that poll empties, so every report after the first blocks its worker until the next poll, and the
# run's end is noticed only at one: up to 2 s per evaluation and per run. On a local Ray (one
# machine, a few workers) the controller polls every 0.5 s: an 8-step tiny run with 3 reports took
# 15-17 s instead of 21-23 s, 2.5 s instead of 7 s from its first step to its end (measured with
# phases.py's marks on the 2-core dev machine). A cluster keeps Ray's default (a poll calls every
# worker); the variable set in the environment wins either way.
POLL_ENV, LOCAL_POLL_SECONDS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"
# Ray Train's state tracking: its runs, attempts and workers in the Ray dashboard's Train runs API
# (api/train/v2/runs; Ray 2.60's open-source UI has no page for it, Anyscale's console does), which
# otherwise answers "Train state data is not available". Read
# where a TorchTrainer is built: the driver (a plain run) and each trial's actor (a search), so it
# goes into this process' environment and the runtime env; rayjob.py sets it in a cluster's too.
STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"


@ray.remote(num_cpus=0)
class ProgressTracker:
    """Rank 0 of every run (or trial) sends step progress and each reported row here; the driver polls it.

    Also what the status says about the run's life (issue: surviving what clusters do): every
    start of a worker group (`started`, keyed by the TorchTrainer it belongs to, so a group that
    Ray Train restarts counts as a restart and a halving trial's next start does not), every resume
    (`resumed`: from which checkpoint and step, and the checkpoints skipped on the way, with why)
    and the newest checkpoint made complete (`checkpointed`, from storage.ray_callback). A search's
    trials also leave their baseline evaluation here, for the trials after them (baseline.py)."""

    RESUMES_KEPT = 20  # the newest; a run restarted more often than this still counts them all

    def __init__(self, metric_tags: dict[str, str] | None = None) -> None:
        # ray_metrics: the same reports as gauges on Ray's Prometheus endpoint (None: no gauges)
        self.metrics = TrainingMetrics(metric_tags) if metric_tags is not None else None
        self.latest: dict[str, Any] = {}
        self.by_trial: dict[str, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []
        self.starts: dict[str, int] = {}
        self.resumes: list[dict[str, Any]] = []
        self.last_checkpoint: dict[str, Any] | None = None
        self.baselines: dict[str, dict[str, Any]] = {}

    def update(self, progress: dict[str, Any]) -> None:
        self.latest = progress
        if progress.get("trial"):
            self.by_trial[progress["trial"]] = progress
        self._export(lambda metrics: metrics.progress(progress))

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._export(lambda metrics: metrics.row(row))

    def _export(self, call: Callable[[TrainingMetrics], None]) -> None:
        if self.metrics is None:
            return
        try:
            call(self.metrics)
        except Exception as err:  # Ray's metrics agent is an observer: it must never fail a report
            log.warning("training metrics: not exported (%s)", err)
            self.metrics = None

    def snapshot(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return self.latest, self.rows

    def trials(self) -> dict[str, dict[str, Any]]:
        return self.by_trial

    def started(self, start_id: str) -> None:
        self.starts[start_id] = self.starts.get(start_id, 0) + 1

    def resumed(self, info: dict[str, Any]) -> None:
        """`{"trial", "checkpoint", "step", "skipped": [{"checkpoint", "reason"}]}` (recipe._resume)."""
        self.resumes = [*self.resumes, {**info, "time": datetime.now(UTC).isoformat()}][-self.RESUMES_KEPT :]

    def baseline(self, key: str) -> dict[str, Any] | None:
        """A search's baseline evaluation already made under this key (baseline.py), if any."""
        return self.baselines.get(key)

    def remember_baseline(self, key: str, evaluated: dict[str, Any]) -> None:
        """`{"metrics", "samples", "trial"}` of a trial's baseline evaluation; the first one stays."""
        self.baselines.setdefault(key, evaluated)

    def checkpointed(self, info: dict[str, Any]) -> None:
        """`{"uri", "step", "time", "trial"}` of a checkpoint just marked complete."""
        self.last_checkpoint = info

    def lifecycle(self) -> dict[str, Any]:
        """Worker-group restarts in this attempt, the resumes, and the newest complete checkpoint."""
        return {"restarts": sum(n - 1 for n in self.starts.values()), "resumes": self.resumes,
                "last_checkpoint": self.last_checkpoint}


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]


def init_ray(metadata: dict[str, str] | None = None) -> None:
    """Join the cluster when there is one (KubeRay sets RAY_ADDRESS); else a loopback-only local Ray.

    `metadata` (FineTuneJob.ray_job_metadata) names a local Ray's job after the FineTuneJob in the dashboard's Jobs
    view; in a cluster the RayJob's submission carries it (rayjob.py). Ray Train's state tracking
    (STATE_TRACKING_ENV) is on for the dashboard's Train runs unless the environment says otherwise.

    Ray token authentication needs nothing here, and must get nothing: ray.init reads RAY_AUTH_MODE
    and the token (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token)
    from the environment every Ray process inherits, which KubeRay's authOptions fills from the
    Secret it creates. A new local Ray (Ray 2.60) runs in token mode unless RAY_AUTH_MODE=disabled,
    writing a new ~/.ray/auth_token when no token is given. No token or auth variable may go into
    `runtime_env`: the dashboard's job API shows a job's env_vars. tests/integration/test_ray_auth.py.

    A local Ray's process environment (loopback, its GCS port) is the entry point's to set, before
    Ray is imported: `environment.prepare`. How much Ray and the workers say is `logs`'s (the
    verbosity the entry point gave `logs.configure`).
    """
    if ray.is_initialized():
        return
    level = logging.getLevelNamesMapping()[logs.ray_log_level()]  # ray.init takes the number
    os.environ[STATE_TRACKING_ENV] = os.environ.get(STATE_TRACKING_ENV, "1")  # this process builds a plain run's trainer
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
           STATE_TRACKING_ENV: os.environ[STATE_TRACKING_ENV]}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env | logs.worker_env(local=False)}, logging_level=level)
        return
    env |= logs.worker_env(local=True)
    env["GLOO_SOCKET_IFNAME"] = "lo"  # one machine: keep torch.distributed traffic on loopback
    env[POLL_ENV] = os.environ.get(POLL_ENV, LOCAL_POLL_SECONDS)
    address = environment.local_gcs_address()
    if address:  # every worker told its own cluster (environment's docstring says why)
        env["RAY_ADDRESS"] = address
    ray.init(
        address="local",  # a new instance, never one a stale /tmp/ray/ray_current_cluster points at
        include_dashboard=True,  # also serves Ray's state API, which Train needs to clean up workers
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env},
        job_config=JobConfig(metadata=dict(metadata or {})),
        log_to_driver=True,
        logging_level=level,
    )


def new_run_id() -> str:
    return datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_run_id(run_id: str) -> str:
    """A run id names a folder under the job's: one path segment, nothing that climbs out."""
    if not _RUN_ID.match(run_id) or ".." in run_id:
        raise SpecError([("--run-id", f"{run_id!r} is not a run name: 1-100 letters, digits, '.', '_' and '-', "
                                      "starting with a letter or digit, no '..'")])
    return run_id


def resume_mode(job: FineTuneJob, resume: str | None) -> str:
    """--resume / run(resume=) over spec.storage.resume; without spec.storage, auto (the spec's default)."""
    return resume or (job.spec.storage.resume if job.spec.storage else "auto")


def shared_config(prepared: Prepared, tracker: Any) -> dict[str, Any]:
    """What every worker of every run or trial reads besides its job. The data stays in Ray's
    object store where the ingest left it (`ingested`: make_trainer hands the workers the train
    split's block references and Ray Train the validation dataset; the forgetting probe's reference
    text, a materialized dataset too, each worker reads whole)."""
    ingested = prepared.data
    return {
        "model_dir": prepared.model_dir,
        "ingested": ingested,
        "train_rows": ingested.train_rows,
        "label_names": ingested.label_names,
        "reference": prepared.reference,  # a materialized dataset: block references, not rows
        "pad_token_id": prepared.tokenizer.pad_token_id,
        "progress": tracker,
    }


def make_trainer(job: FineTuneJob, shared: dict[str, Any], *, persistence: Persistence, storage_path: str, name: str,
                 callbacks: list | None = None, trial: str | None = None):
    """The TorchTrainer of a run or a trial: checkpoints through `persistence` (marked complete by
    its callback, pruned by our retention), worker-group restarts from the latest complete one."""
    # the public names: Ray Train V2's classes at run time (V2 is Ray 2.60's default); a type checker
    # reads ray.train's unconditional V1 imports instead, hence the one ignore below
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = job.spec.resources
    shared = dict(shared)
    ingested = shared.pop("ingested")
    datasets, data_config = ingested.trainer_datasets()
    shared["train_blocks"] = ingested.train_blocks  # block references: each worker fetches its own rows (train_blocks.py)
    worker_resources = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})
    storage = persistence.run_config_args(job, storage_path=storage_path, tracker=shared.get("progress"))
    storage["callbacks"] += callbacks or []
    start_id = uuid.uuid4().hex  # this TorchTrainer's: a second setup under it is a worker-group restart
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.model_dump(by_alias=True, mode="json"), "trial": trial, "persistence": persistence,
                           "start_id": start_id, **shared},
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0, resources_per_worker=worker_resources),
        datasets=datasets, dataset_config=data_config,
        run_config=RunConfig(name=name, logging_config=LoggingConfig(log_level=logs.ray_log_level()), **storage),  # type: ignore[call-arg]  # V2's field (above)
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Every Train worker's loop: the recipe's, imported in the worker that runs it. The trainer
    pickles this function by reference, so where it is built (the driver of a run, the actor of
    each search trial, at every start and resume) nothing of the training side is imported:
    importing the recipe there (transformers, PEFT, our worker modules on top of the torch that
    ray.train.torch brings) cost each trial start seconds of CPU before its fit() began."""
    from .recipe import train_loop_per_worker as loop

    loop(config)


def fit_polling(fit: Callable[[], Any], snapshot: Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]],
                listeners: list[Listener]) -> Any:
    """fit() while a thread hands a progress snapshot to every listener each 0.5 s, and once at the end."""

    def tell() -> None:
        latest, rows = snapshot()
        for listener in listeners:
            listener(latest, rows)

    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.5):
            with contextlib.suppress(Exception):  # a slow poll must never break the run it reports on
                tell()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    phases.log.debug("%s %.3f", phases.FIT_MARKER, time.time())  # the origin of the workers' start-up marks (phases.py)
    try:
        return fit()
    finally:
        done.set()
        thread.join()
        with contextlib.suppress(Exception):
            tell()


def best_checkpoint(job: FineTuneJob, checkpoints: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The best-ranked checkpoint (`ranked_metric`: a trial's is the search's metric) among
    (path, reported metrics) pairs."""
    key, mode = job.spec.ranked_metric()
    best = best_row([metrics for _, metrics in checkpoints], key, mode)
    if not best:
        return {}
    path = next(path for path, metrics in checkpoints if metrics is best)
    return {"step": best["step"], "metric": key, "value": best[key], "checkpoint": path, "metrics": best}


def export_model(job: FineTuneJob, checkpoints: list[tuple[str, dict[str, Any]]], prepared: Prepared, run_dir: Path,
                 *, filesystem=None) -> Path | None:
    """Copy the chosen checkpoint's Hugging Face model next to results.json, atomically. An
    adapter's checkpoint holds the adapter alone (model/adapter/); with output.mergeAdapter the
    base with the adapter merged in is written beside it (model/), here, once."""
    from ray.train import Checkpoint

    spec = job.spec
    candidates = [(path, m) for path, m in checkpoints if m.get("has_model")]
    if spec.output.export == "none" or not candidates:
        return None
    if spec.output.export == "last":
        path = max(candidates, key=lambda pm: pm[1]["step"])[0]
    else:
        path = best_checkpoint(job, candidates)["checkpoint"]
    target, partial = run_dir / MODEL_DIR, run_dir / (MODEL_DIR + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with Checkpoint(path, filesystem=filesystem).as_directory() as folder:
        shutil.copytree(Path(folder) / MODEL_DIR, partial)
    prepared.tokenizer.save_pretrained(partial)
    adapter = partial / ADAPTER_DIR
    if adapter.is_dir():
        prepared.tokenizer.save_pretrained(adapter)  # the adapter folder is usable on its own, as PEFT users keep it
        if spec.output.merge_adapter:
            from .adapters import merge  # torch and PEFT, in the driver only for this

            merge(prepared.model_dir, adapter, partial, spec, num_labels=len(prepared.data.label_names or []) or None,
                  pad_token_id=prepared.tokenizer.pad_token_id)
    if prepared.data.label_names and (partial / "config.json").is_file():
        _label_names_into_config(partial / "config.json", prepared.data.label_names)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def _label_names_into_config(config_path: Path, names: list[str]) -> None:
    """So `pipeline("text-classification", model=...)` prints class names, not LABEL_0."""
    config = json.loads(config_path.read_text())
    config["id2label"] = dict(enumerate(names))
    config["label2id"] = {n: i for i, n in enumerate(names)}
    config_path.write_text(json.dumps(config, indent=2))


def score_test(prepared: Prepared, model_dir: Path | None) -> dict[str, dict[str, float]]:
    """Baseline and fine-tuned model on the test split, as one Ray task with a worker's resources
    (the split reaches it as its dataset, which the task reads whole: test is capped and small)."""
    from .scoring import score_models

    ingested = prepared.ingested
    assert ingested is not None and ingested.test is not None
    res = prepared.job.spec.resources
    task = ray.remote(score_models).options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker or 0)
    models = {"baseline": prepared.model_dir} | ({"finetuned": str(model_dir)} if model_dir else {})
    return ray.get(task.remote(prepared.job.model_dump(by_alias=True, mode="json"), models, ingested.test,
                               ingested.label_names, prepared.tokenizer.pad_token_id))
