"""What a search leaves behind: one row per trial, the best trial, results.json and two plots.

Pure functions over Tune's ResultGrid (and the trial rows our recipe reports), so the table a
person reads, the JSON a pipeline reads and the plots all come from the same rows.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import job_status
from .ranking import best_row
from .spec import FineTuneJob, FreezingSpec
from .spec.progress import ProgressDocument
from .spec.search import dropped_params

if TYPE_CHECKING:
    from .preflight import Prepared

CHECKPOINT_KEY = "checkpoint_path"  # what ray.tune.integration.ray_train.TuneReportCallback adds
STATUS_FINISHED, STATUS_EARLY, STATUS_STOPPED, STATUS_FAILED = "finished", "early-stopped", "stopped by scheduler", "failed"


def collect(job: FineTuneJob, grid, totals) -> list[dict[str, Any]]:
    """One row per trial, in trial order."""
    key, mode = job.spec.ranked_metric()
    trials = []
    for result in grid:
        params = dict(result.config or {})
        history = _history(result)
        evals = [r for r in history if key in r and not r.get("baseline")]
        best = best_row(evals, key, mode)
        last = history[-1] if history else {}
        total = totals.steps(params)
        trial_job = totals.trial_job(params)
        checkpoints = [(r[CHECKPOINT_KEY], r) for r in history if r.get(CHECKPOINT_KEY)]
        best_ckpt = best_row([r for _, r in checkpoints], key, mode)
        trials.append({
            "trial": Path(result.path).name,
            "params": params,
            "unused_params": dropped_params(trial_job.spec, params),
            "freezing": trial_job.spec.freezing.strategy,
            "strategy": strategy_label(trial_job.spec.freezing),
            # what the workers reported (recipe): parameters the optimizer trains, of all the model's;
            # peak memory per worker, the most any rank used (over every start of the trial)
            "trainable_params": _count(history, "trainable_params"),
            "total_params": _count(history, "total_params"),
            "peak_memory_mib": max((r["peak_memory_mib"] for r in history if r.get("peak_memory_mib") is not None), default=None),
            "schedule": trial_job.spec.lr_schedule.type,
            "status": _status(result, last, total),
            "error": _error_line(result.error),
            "steps": last.get("step", 0),
            "total_steps": total,
            "metric": key,
            "value": best.get(key) if best else None,
            "best_step": best.get("step") if best else None,
            "loss_at_best": best.get("eval_loss") if best else None,  # the tie-break after the metric (best_trial)
            "last_value": evals[-1].get(key) if evals else None,
            "checkpoint": best_ckpt.get(CHECKPOINT_KEY) if best_ckpt else None,
            "checkpoints": checkpoints,
            "history": [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_") or k in {"train_loss", "baseline", "time_total_s"}} for r in history],
        })
    return sorted(trials, key=lambda t: trial_order(t["trial"]))


def trial_order(name: str) -> tuple[int, str]:
    """trial_02 before trial_10 before trial_100 (tuning.trial_name pads to two digits only)."""
    number = name.rpartition("_")[2]
    return (int(number) if number.isdigit() else 1 << 30, name)


TRIAL_TIEBREAK = ("loss_at_best", "best_step")


def best_trial(job: FineTuneJob, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial whose best evaluation is the best reported by any trial (any step, any status).
    Trials with the same best value: the one with the lower validation loss at that evaluation,
    then the one that reached it in fewer steps, then the earlier trial (`trials` is in trial
    order). README's "Evaluation" section documents this rule."""
    best = best_row(trials, "value", job.spec.ranked_metric()[1], tiebreak=TRIAL_TIEBREAK)
    if not best:
        return {}
    return {
        "trial": best["trial"], "strategy": best["strategy"], "params": best["params"], "metric": best["metric"], "value": best["value"],
        "step": best["best_step"], "checkpoint": best["checkpoint"], "checkpoints": best["checkpoints"],
    }


def results(job: FineTuneJob, prepared: Prepared, trials: list[dict[str, Any]], best: dict[str, Any], test: dict[str, Any],
            model_dir: Path | None, run_dir: Path, concurrency: int, started: float, preflight_seconds: float) -> dict[str, Any]:
    search = job.spec.search
    assert search is not None
    baseline: dict[str, Any] = next((r for t in trials for r in t["history"] if r.get("baseline")), {})
    best_eval: dict[str, Any] = next((r for t in trials if t["trial"] == best.get("trial") for r in t["history"]
                                      if r.get("step") == best.get("step") and not r.get("baseline")), {})
    strip = lambda row: {k[5:]: v for k, v in (row or {}).items() if k.startswith("eval_")}  # noqa: E731
    return {
        "job": job.name,
        "run": run_dir.name,
        "finished": datetime.now(UTC).isoformat(),
        "kind": "search",
        "search": {
            "algorithm": search.algorithm,
            "scheduler": search.scheduler.type,
            "metric": job.spec.ranked_metric()[0],
            "mode": job.spec.ranked_metric()[1],
            "trials": len(trials),
            "max_concurrent_trials": concurrency,
            "trial_steps": sum(t["steps"] for t in trials),
            "space": {p: d.model_dump(exclude_none=True) for p, d in search.space.items()},
        },
        "model": str(model_dir) if model_dir else None,
        "best": {k: v for k, v in best.items() if k != "checkpoints"},
        "metrics": {"validation": {"baseline": strip(baseline), "finetuned": strip(best_eval)}, "test": test},
        "trials": [{k: v for k, v in t.items() if k != "checkpoints"} for t in trials],
        "timings": {"total_seconds": time.time() - started, "preflight_seconds": preflight_seconds},
        "data": prepared.data_stats(),
        "config": {"spec": job.spec.to_manifest()},
    }


def final_status(job: FineTuneJob, run_id: str, trials: list[dict[str, Any]], best: dict[str, Any],
                 model_dir: Path | str | None) -> ProgressDocument:
    states = {STATUS_FINISHED: "completed", STATUS_EARLY: "completed", STATUS_STOPPED: "stopped", STATUS_FAILED: "failed"}
    best_trial = {**job_status.best_trial(best["trial"], best["metric"], best["value"], best["step"], params=best["params"],
                                          checkpoint=best["checkpoint"]), "strategy": best["strategy"]} if best else None
    return job_status.snapshot(
        job.name, run_id, kind="search", state="finished", trials={t["trial"]: states[t["status"]] for t in trials},
        total_trials=len(trials), best=best_trial, model=str(model_dir) if model_dir else None,
    )


def strategy_label(freezing: FreezingSpec) -> str:
    """How the trial table and status name a trial's strategy with its size: `lora r=16` (the
    adapter's own summary, with DoRA, rsLoRA and top-N layers), `freezeBottom 6` (blocks frozen,
    or the fraction), `gradual every 50`; the other strategies have no size."""
    if freezing.strategy == "lora":
        return freezing.lora_settings().summary()
    if freezing.strategy == "freezeBottom" and freezing.layers is not None:
        return f"freezeBottom {freezing.layers}"
    if freezing.strategy == "gradual" and freezing.unfreeze_every is not None:
        return f"gradual every {freezing.unfreeze_every}"
    return freezing.strategy


def fmt_params(params: dict[str, Any], unused: list[str] | tuple[str, ...] = ()) -> str:
    parts = []
    for path, value in params.items():
        short = path.rsplit(".", 1)[-1]
        shown = "n/a" if path in unused else f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{short}={shown}")
    return " ".join(parts)


def plot(job: FineTuneJob, trials: list[dict[str, Any]], run_dir: Path) -> list[str]:
    """learning_curves.png (the metric at every evaluation, per trial) and metric_by_choice.png
    (each trial's best metric grouped by freezing strategy and by LR schedule)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    if not any(t["history"] for t in trials):
        return []
    key = job.spec.ranked_metric()[0]
    label = key[5:]
    strategies = sorted({t["freezing"] for t in trials})
    schedules = sorted({t["schedule"] for t in trials})
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(strategies)}
    styles = {s: ("-", "--", ":", "-.")[i % 4] for i, s in enumerate(schedules)}
    run_dir.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for t in trials:
        points = [(r["step"], r[key]) for r in t["history"] if key in r]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, styles[t["schedule"]], color=colours[t["freezing"]], marker="o", markersize=3, label=f"{t['trial']}: {t['freezing']}, {t['schedule']}")
        if t["status"] == STATUS_STOPPED:
            ax.plot(xs[-1], ys[-1], "x", color="black", markersize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {label}")
    ax.set_title(f"{job.name}: learning curves (x = stopped by the scheduler)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    curves = run_dir / "learning_curves.png"
    fig.tight_layout()
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, field, groups in ((axes[0], "freezing", strategies), (axes[1], "schedule", schedules)):
        for i, group in enumerate(groups):
            members = [t for t in trials if t[field] == group and t["value"] is not None]
            if not members:
                continue
            values = [t["value"] for t in members]
            jitter = [i + (j - (len(values) - 1) / 2) * 0.06 for j in range(len(values))]
            colour = colours.get(group, "tab:blue") if field == "freezing" else "tab:blue"
            for x, t in zip(jitter, members, strict=True):  # hollow: stopped early, so its best had fewer steps
                stopped = t["status"] == STATUS_STOPPED
                ax.scatter([x], [t["value"]], facecolors="none" if stopped else colour, edgecolors=colour, zorder=3)
            ax.hlines(sum(values) / len(values), i - 0.25, i + 0.25, color="black", linewidth=1)
        ax.set_xticks(range(len(groups)), groups, rotation=20)
        ax.set_title(f"best {label} by {'freezing strategy' if field == 'freezing' else 'LR schedule'} (hollow: stopped early)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel(f"best validation {label} per trial (bar: mean)")
    by_choice = run_dir / "metric_by_choice.png"
    fig.tight_layout()
    fig.savefig(by_choice, dpi=110)
    plt.close(fig)
    return [str(curves), str(by_choice)]


def _history(result) -> list[dict[str, Any]]:
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return []
    rows = []
    for record in frame.to_dict("records"):
        rows.append({k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))})
    return sorted(rows, key=lambda r: (r.get("step", 0), not r.get("baseline")))


def _count(history: list[dict[str, Any]], key: str) -> int | None:
    """A count the trial reported (None when no row has it: a trial that failed before its first
    report). Tune's metrics frame holds it as a float where some rows lack it."""
    value = next((r[key] for r in reversed(history) if r.get(key) is not None), None)
    return int(value) if value is not None else None


def _status(result, last: dict[str, Any], total: int) -> str:
    if result.error is not None:
        return STATUS_FAILED
    if last.get("early_stopped"):
        return STATUS_EARLY
    return STATUS_FINISHED if last.get("step", 0) >= total else STATUS_STOPPED


def _error_line(error: BaseException | None) -> str | None:
    if error is None:
        return None
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__
