"""The driver: one FineTuneJob from manifest to exported model on Ray (local or a cluster).

Reads top to bottom: preflight (everything checkable before Ray starts) -> Ray Train
TorchTrainer running `recipe.train_loop_per_worker` on N workers -> export the best checkpoint's
model -> score baseline and fine-tuned model on the test split -> results.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if not os.environ.get("RAY_ADDRESS"):
    # No cluster: a single-node Ray on loopback. Ray reads this when it is first imported (and its
    # raylet and workers inherit it); without it Ray advertises the machine's outward IP and
    # torch.distributed's rendezvous (MASTER_ADDR) follows it off loopback.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray

from . import job_status
from .ds_config import build_ds_config
from .evaluation import best_row
from .job_status import StatusPublisher
from .persist import MODEL_DIR, Persistence, open_storage
from .preflight import Prepared, prepare_job
from .recipe import total_steps, train_loop_per_worker
from .spec import FineTuneJob, SpecError


@ray.remote(num_cpus=0)
class ProgressTracker:
    """Rank 0 of every run (or trial) sends step progress and each reported row here; the driver polls it."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}
        self.by_trial: dict[str, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []

    def update(self, progress: dict[str, Any]) -> None:
        self.latest = progress
        if progress.get("trial"):
            self.by_trial[progress["trial"]] = progress

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def snapshot(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return self.latest, self.rows

    def trials(self) -> dict[str, dict[str, Any]]:
        return self.by_trial


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]


def init_ray() -> None:
    """Join the cluster when there is one (KubeRay sets RAY_ADDRESS); else a loopback-only local Ray.

    Ray token authentication needs nothing here, and must get nothing: ray.init reads RAY_AUTH_MODE
    and the token (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token)
    from the environment every Ray process inherits, which KubeRay's authOptions fills from the
    Secret it creates. A new local Ray (Ray 2.60) runs in token mode unless RAY_AUTH_MODE=disabled,
    writing a new ~/.ray/auth_token when no token is given. No token or auth variable may go into
    `runtime_env`: the dashboard's job API shows a job's env_vars. tests/integration/test_ray_auth.py.
    """
    if ray.is_initialized():
        return
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env})
        return
    env["GLOO_SOCKET_IFNAME"] = "lo"  # one machine: keep torch.distributed traffic on loopback
    # Ray's state API, inside workers, finds "the" local cluster by scanning for GCS processes and
    # gives up when there are two (another local Ray on the same machine, e.g. a second run).
    # Train's PlacementGroupCleaner then dies and a stopped trial's CPUs are never freed, so the
    # next trials wait forever. Choosing the GCS port lets every worker be told its cluster.
    port = _free_port()
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(
            address="local",  # a new instance, never one a stale /tmp/ray/ray_current_cluster points at
            include_dashboard=True,  # also serves Ray's state API, which Train needs to clean up workers
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": env},
            log_to_driver=True,
        )
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(job: FineTuneJob, *, on_progress: Callable[[dict, list], None] | None = None, run_id: str | None = None,
        resume: str | None = None) -> RunResult:
    """`resume` (none | latest | a checkpoint URI) overrides spec.storage.resume; `finetune run
    --resume` passes latest. A search resumes by restoring its latest Tune experiment."""
    if job.spec.search is not None:
        from .tuning import run_search

        return run_search(job, on_progress=on_progress, run_id=run_id, resume=resume)
    started = time.time()
    persistence = open_storage(job)  # S3 preflight: a bad endpoint or key fails here, before anything else
    prepared = prepare_reporting(job, persistence)
    preflight_seconds = time.time() - started
    init_ray()
    run_id = run_id or new_run_id()
    resume_from, resumed_step = persistence.resume_from(resume_mode(job, resume))
    tracker = ProgressTracker.remote()
    publisher = StatusPublisher.for_job(persistence.status_writer())
    shared = shared_config(prepared, tracker) | {"resume_from": resume_from}
    trainer = make_trainer(job, shared, persistence=persistence, storage_path=persistence.storage_path, name=run_id)
    listeners = [_status_listener(job, run_id, publisher), *([on_progress] if on_progress else [])]
    try:
        result = fit_polling(trainer.fit, lambda: ray.get(tracker.snapshot.remote(), timeout=5), listeners)
    except BaseException as err:
        publisher.publish(job_status.snapshot(job.name, run_id, kind="single", state="failed"))
        failure = persistence.storage_failure(err)
        if failure is not None:
            raise failure from err
        raise
    _, rows = ray.get(tracker.snapshot.remote())
    run_dir = persistence.local_dir / run_id
    checkpoints = persistence.complete_only([(c.path, m) for c, m in (result.best_checkpoints or [])], persistence.key(run_id))
    best = best_checkpoint(job, checkpoints)
    model_dir = export_model(job, checkpoints, prepared, run_dir, filesystem=persistence.filesystem) if best else None
    if best:
        best = {**best, "checkpoint": persistence.uri(best["checkpoint"])}
    test = score_test(prepared, model_dir) if prepared.data.test is not None else {}
    results = _results(prepared, rows, best, test, model_dir, run_dir, started, preflight_seconds)
    results["resumed_from"] = {"checkpoint": persistence.uri(resume_from.path), "step": resumed_step} if resume_from else None
    results = persistence.save_results(run_id, results, model_dir)
    final = rows[-1] if rows else {}
    best_trial = job_status.best_trial(run_id, best["metric"], best["value"], best["step"], checkpoint=best["checkpoint"]) if best else None
    publisher.publish(job_status.snapshot(job.name, run_id, kind="single", state="finished", trials={run_id: "completed"},
                                          step=final.get("step"), total_steps=results["total_steps"], best=best_trial,
                                          model=persistence.model_uri(run_id, model_dir)))
    return RunResult(run_dir, results)


def prepare_reporting(job: FineTuneJob, persistence: Persistence) -> Prepared:
    """`prepare_job`, and a spec the model or data rule out (e.g. freezing.layers above the
    model's layer count) is also published as status.json `invalid`, so the operator, which never
    sees the model, can say which field to fix."""
    try:
        return prepare_job(job)
    except SpecError as err:
        kind = "search" if job.spec.search is not None else "single"
        StatusPublisher.for_job(persistence.status_writer()).publish(job_status.invalid(job.name, kind=kind, problems=err.problems))
        raise


def resume_mode(job: FineTuneJob, resume: str | None) -> str:
    return resume or (job.spec.storage.resume if job.spec.storage else "none")


def new_run_id() -> str:
    return datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")


def shared_config(prepared: Prepared, tracker) -> dict[str, Any]:
    """What every worker of every run or trial reads besides its job: one copy of the data in the object store."""
    return {
        "model_dir": prepared.model_dir,
        "data": ray.put(prepared.data),
        "pad_token_id": prepared.tokenizer.pad_token_id,
        "progress": tracker,
    }


def make_trainer(job: FineTuneJob, shared: dict[str, Any], *, persistence: Persistence, storage_path: str, name: str,
                 callbacks: list | None = None, trial: str | None = None):
    """The TorchTrainer of a run or a trial: checkpoints through `persistence` (marked complete by
    its callback, pruned by our retention), worker-group restarts from the latest complete one."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = job.spec.resources
    worker_resources = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})
    storage = persistence.run_config_args(job, storage_path=storage_path)
    storage["callbacks"] += callbacks or []
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.model_dump(by_alias=True, mode="json"), "trial": trial, "persistence": persistence, **shared},
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0, resources_per_worker=worker_resources),
        run_config=RunConfig(name=name, **storage),
    )


def fit_polling(fit: Callable[[], Any], snapshot: Callable[[], tuple[dict, list]], listeners: list[Callable[[dict, list], None]]):
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
    try:
        return fit()
    finally:
        done.set()
        thread.join()
        with contextlib.suppress(Exception):
            tell()


def _status_listener(job: FineTuneJob, run_id: str, publisher: StatusPublisher) -> Callable[[dict, list], None]:
    """status.json for a single run: its step, and its best evaluation so far; written when a new
    evaluation arrives or 10 s have passed, not at every poll."""
    key, mode = job.spec.ranked_metric()
    last: dict[str, Any] = {"rows": -1, "at": 0.0}

    def listen(latest: dict, rows: list) -> None:
        if len(rows) == last["rows"] and time.monotonic() - last["at"] < 10:
            return
        last.update(rows=len(rows), at=time.monotonic())
        top = best_row([r for r in rows if not r.get("baseline")], key, mode)
        best = job_status.best_trial(run_id, key, top[key], top["step"]) if top else None
        publisher.publish(job_status.snapshot(job.name, run_id, kind="single", state="running", step=latest.get("step"),
                                              total_steps=latest.get("total"), best=best))

    return listen


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
    """Copy the chosen checkpoint's Hugging Face model next to results.json, atomically."""
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
    if prepared.data.label_names:
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
    """Baseline and fine-tuned model on the test split, as one Ray task with a worker's resources."""
    from .scoring import score_models

    res = prepared.job.spec.resources
    task = ray.remote(score_models).options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker or 0)
    models = {"baseline": prepared.model_dir} | ({"finetuned": str(model_dir)} if model_dir else {})
    return ray.get(task.remote(prepared.job.model_dump(by_alias=True, mode="json"), models, prepared.data, prepared.tokenizer.pad_token_id))


def _results(prepared, rows, best, test, model_dir, run_dir, started, preflight_seconds) -> dict[str, Any]:
    spec = prepared.job.spec
    baseline = next((r for r in rows if r.get("baseline")), None)
    final = rows[-1] if rows else {}
    strip = lambda row: {k[5:]: v for k, v in (row or {}).items() if k.startswith("eval_")}  # noqa: E731
    return {
        "job": prepared.job.name,
        "run": run_dir.name,
        "finished": datetime.now(UTC).isoformat(),
        "model": str(model_dir) if model_dir else None,
        "best": best,
        "metrics": {
            "validation": {"baseline": strip(baseline), "finetuned": strip(best.get("metrics"))},
            "test": test,
        },
        "steps": final.get("step"),
        "total_steps": total_steps(prepared.job, len(prepared.data.train), spec.resources.workers),
        "early_stopped": bool(final.get("early_stopped")),
        "timings": {
            "total_seconds": time.time() - started,
            "preflight_seconds": preflight_seconds,
            "train_seconds": final.get("train_seconds"),
        },
        "throughput": {"train_tokens": final.get("train_tokens"), "tokens_per_second": final.get("tokens_per_second")},
        "peak_memory_mib": final.get("peak_memory_mib"),
        "freezing": prepared.plan.summary(),
        "data": prepared.data.stats,
        "history": rows,
        "config": {
            "spec": prepared.job.spec.to_manifest(),
            "deepspeed": build_ds_config(spec, world_size=spec.resources.workers, precision=final.get("precision", "resolved at run time")),
        },
    }
