"""The single-run flow: one FineTuneJob without `spec.search`, as one Ray Train run.

Reads top to bottom, inside the session (session.py: storage, preflight, Ray, tracker, status):
the resume point (`--resume` or spec.storage.resume) -> a TorchTrainer running
`recipe.train_loop_per_worker` on N workers, its progress polled into status.json -> the best
complete checkpoint's model exported -> baseline and fine-tuned model scored on the test split ->
results.json, then the final status naming the best checkpoint and the model.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray

from . import class_report, eval_report, job_status
from .driver import Listener, RunResult, best_checkpoint, export_model, fit_polling, make_trainer, score_test
from .ds_config import build_ds_config
from .ranking import best_row, raise_if_diverged
from .session import DriverSession


def run_single(session: DriverSession, on_progress: Listener | None = None) -> RunResult:
    job, persistence, prepared, run_id = session.job, session.persistence, session.prepared, session.run_id
    # auto: on a new attempt of the run, its own latest complete checkpoint; else as the spec says
    if session.resume == "auto":
        resume_from, resumed_step = persistence.resume_from("latest", runs_under=run_id) if session.attempt > 1 else (None, None)
    else:
        resume_from, resumed_step = persistence.resume_from(session.resume)
    shared = session.shared() | {"resume_from": resume_from}
    trainer = make_trainer(job, shared, persistence=persistence, storage_path=persistence.storage_path, name=run_id)
    listeners = [_status_listener(session), *([on_progress] if on_progress else []), *session.tracking_listeners()]
    result = fit_polling(trainer.fit, lambda: ray.get(session.tracker.snapshot.remote(), timeout=5), listeners)
    _, rows = ray.get(session.tracker.snapshot.remote())
    if resume_from is not None:  # the curve before the resume point (and its baseline) lives in the checkpoint
        rows = persistence.history_until(resume_from.path, resumed_step or 0) + rows
    raise_if_diverged(rows)  # nonFiniteLoss: stop ended it: failed, reason NonFiniteLoss (the session publishes it)
    checkpoints = persistence.complete_only([(c.path, m) for c, m in (result.best_checkpoints or [])], persistence.key(run_id))
    best = best_checkpoint(job, checkpoints)
    model_dir = export_model(job, checkpoints, prepared, session.run_dir, filesystem=persistence.filesystem) if best else None
    if best:
        best = {**best, "checkpoint": persistence.uri(best["checkpoint"])}
    test = score_test(prepared, model_dir) if prepared.data.test is not None else {}
    results = _results(session, rows, best, test, model_dir)
    results["resumed_from"] = {"checkpoint": persistence.uri(resume_from.path), "step": resumed_step} if resume_from else None
    class_report.add_to_results(results, rows, session.run_dir)  # per-class figures and confusion_matrix.png (classification)
    results = persistence.save_results(run_id, results, model_dir)
    session.finish_tracking(results, model_dir)
    final = rows[-1] if rows else {}
    best_trial = job_status.best_trial(run_id, best["metric"], best["value"], best["step"], checkpoint=best["checkpoint"]) if best else None
    session.publish("finished", final=True, trials={run_id: "completed"}, step=final.get("step"), total_steps=results["total_steps"],
                    best=best_trial, model=persistence.model_uri(run_id, model_dir))
    return RunResult(session.run_dir, results)


def _status_listener(session: DriverSession) -> Listener:
    """status.json for a single run: its step, and its best evaluation so far; written when a new
    evaluation arrives or 10 s have passed, not at every poll."""
    key, mode = session.job.spec.ranked_metric()
    last: dict[str, Any] = {"rows": -1, "at": 0.0}

    def listen(latest: dict, rows: list) -> None:
        if len(rows) == last["rows"] and time.monotonic() - last["at"] < 10:
            return
        last.update(rows=len(rows), at=time.monotonic())
        top = best_row([r for r in rows if not r.get("baseline")], key, mode)
        best = job_status.best_trial(session.run_id, key, top[key], top["step"]) if top else None
        session.publish("running", step=latest.get("step"), total_steps=latest.get("total"), best=best)

    return listen


def _results(session: DriverSession, rows: list[dict[str, Any]], best: dict[str, Any], test: dict[str, Any],
             model_dir: Path | None) -> dict[str, Any]:
    prepared, spec = session.prepared, session.job.spec
    baseline = next((r for r in rows if r.get("baseline")), None)
    final = rows[-1] if rows else {}
    strip = lambda row: {k[5:]: v for k, v in (row or {}).items() if k.startswith("eval_")}  # noqa: E731
    return {
        "job": prepared.job.name,
        "run": session.run_id,
        "finished": datetime.now(UTC).isoformat(),
        "model": str(model_dir) if model_dir else None,
        "best": best,
        "metrics": {
            "validation": {"baseline": strip(baseline), "finetuned": strip(best.get("metrics"))},
            "test": test,
        },
        "steps": final.get("step"),
        "total_steps": spec.training.total_steps(prepared.data.train_rows, spec.resources.workers),
        "early_stopped": bool(final.get("early_stopped")),
        "timings": {
            "total_seconds": time.time() - session.started,
            "preflight_seconds": session.preflight_seconds,
            "train_seconds": final.get("train_seconds"),
        },
        "throughput": {"train_tokens": final.get("train_tokens"), "tokens_per_second": final.get("tokens_per_second"),
                       "input_wait_share": final.get("input_wait_share")},
        "peak_memory_mib": final.get("peak_memory_mib"),
        "freezing": prepared.plan.summary(),
        "data": prepared.data_stats(),
        "history": [{k: v for k, v in r.items() if k != "samples"} for r in rows],  # the samples have their own section
        "samples": eval_report.sample_sets(rows),
        "forgetting": eval_report.forgetting(rows, step=best.get("step")),  # the exported model's, against the baseline
        "config": {
            "spec": prepared.job.spec.to_manifest(),
            "deepspeed": build_ds_config(spec, world_size=spec.resources.workers, precision=final.get("precision", "resolved at run time")),
        },
    }
