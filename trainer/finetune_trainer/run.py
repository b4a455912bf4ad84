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

from .ds_config import build_ds_config
from .preflight import Prepared, prepare_job
from .recipe import MODEL_DIR, total_steps, train_loop_per_worker
from .spec import FineTuneJob

RESULTS_FILE = "results.json"


@ray.remote(num_cpus=0)
class ProgressTracker:
    """Rank 0 sends step progress and every reported row here; the driver polls it."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []

    def update(self, progress: dict[str, Any]) -> None:
        self.latest = progress

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def snapshot(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return self.latest, self.rows


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]


def init_ray() -> None:
    """Join the cluster when there is one (KubeRay sets RAY_ADDRESS); else a loopback-only local Ray."""
    if ray.is_initialized():
        return
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env})
        return
    env["GLOO_SOCKET_IFNAME"] = "lo"  # one machine: keep torch.distributed traffic on loopback
    ray.init(
        include_dashboard=True,  # also serves Ray's state API, which Train needs to clean up workers
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )


def run(job: FineTuneJob, *, on_progress: Callable[[dict, list], None] | None = None, run_id: str | None = None) -> RunResult:
    started = time.time()
    prepared = prepare_job(job)
    preflight_seconds = time.time() - started
    init_ray()
    spec = job.spec
    run_id = run_id or datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")
    job_dir = Path(spec.output.dir).resolve() / job.name
    tracker = ProgressTracker.remote()
    trainer = _trainer(prepared, job_dir, run_id, tracker)
    result = _fit_with_progress(trainer, tracker, on_progress)
    _, rows = ray.get(tracker.snapshot.remote())
    run_dir = job_dir / run_id
    model_dir, best = _export_best(result, prepared, run_dir)
    test = _score_test(prepared, model_dir) if prepared.data.test is not None else {}
    results = _results(prepared, rows, best, test, model_dir, run_dir, started, preflight_seconds)
    _write_json(run_dir / RESULTS_FILE, results)
    return RunResult(run_dir, results)


def _trainer(prepared: Prepared, job_dir: Path, run_id: str, tracker):
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = prepared.job.spec
    res = spec.resources
    worker_resources = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": prepared.job.model_dump(by_alias=True, mode="json"),
            "model_dir": prepared.model_dir,
            "data": ray.put(prepared.data),
            "pad_token_id": prepared.tokenizer.pad_token_id,
            "progress": tracker,
        },
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0, resources_per_worker=worker_resources),
        run_config=RunConfig(
            name=run_id,
            storage_path=str(job_dir),
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.output.keep_checkpoints,
                checkpoint_score_attribute=f"eval_{spec.evaluation.metric}",
                checkpoint_score_order=spec.evaluation.resolved_mode(),
            ),
        ),
    )


def _fit_with_progress(trainer, tracker, on_progress):
    if on_progress is None:
        return trainer.fit()
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.5):
            with contextlib.suppress(Exception):  # a slow poll must never break the run it reports on
                on_progress(*ray.get(tracker.snapshot.remote(), timeout=5))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        return trainer.fit()
    finally:
        done.set()
        thread.join()
        on_progress(*ray.get(tracker.snapshot.remote()))


def _export_best(result, prepared: Prepared, run_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """Copy the best checkpoint's Hugging Face model next to results.json, atomically."""
    spec = prepared.job.spec
    key = f"eval_{spec.evaluation.metric}"
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if m.get("has_model")]
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if key in m]
    pick = min if spec.evaluation.resolved_mode() == "min" else max
    if not scored:
        return None, {}
    checkpoint, metrics = pick(scored, key=lambda cm: cm[1][key])
    best = {"step": metrics["step"], "metric": key, "value": metrics[key], "checkpoint": checkpoint.path, "metrics": metrics}
    if spec.output.export == "none" or not candidates:
        return None, best
    if spec.output.export == "last":
        checkpoint, metrics = max(candidates, key=lambda cm: cm[1]["step"])
    else:
        checkpoint, metrics = pick(candidates, key=lambda cm: cm[1][key])
    target, partial = run_dir / MODEL_DIR, run_dir / (MODEL_DIR + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / MODEL_DIR, partial)
    prepared.tokenizer.save_pretrained(partial)
    if prepared.data.label_names:
        _label_names_into_config(partial / "config.json", prepared.data.label_names)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target, best


def _label_names_into_config(config_path: Path, names: list[str]) -> None:
    """So `pipeline("text-classification", model=...)` prints class names, not LABEL_0."""
    config = json.loads(config_path.read_text())
    config["id2label"] = dict(enumerate(names))
    config["label2id"] = {n: i for i, n in enumerate(names)}
    config_path.write_text(json.dumps(config, indent=2))


def _score_test(prepared: Prepared, model_dir: Path | None) -> dict[str, dict[str, float]]:
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


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
