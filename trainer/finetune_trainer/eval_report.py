"""Generated samples and the forgetting figure, from the rows the recipe reports: for results.json,
the run's output, the summary and status.json. Driver side: no torch (generation.py and
reference.py make the rows' `samples` and `eval_referencePerplexity` on the workers).

A row with `samples` is one evaluation (the baseline's or a step's) of one run or trial:
`[{"prompt", "completion"}]`, the same prompts every time. Forgetting is the change of the
perplexity on general text (spec.evaluation.reference) from the baseline: +29% means the model
models that text 29% worse than before fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .spec.progress import STATUS_TRIALS
from .spec.training import REFERENCE_METRIC

REFERENCE_KEY = f"eval_{REFERENCE_METRIC}"
OUTPUT_CHARS = 160  # of a completion in the run's output: one line per sample


def sample_sets(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """results.json's `samples`: every evaluation's samples, in order (with its trial in a search)."""
    return [{**({"trial": r["trial"]} if r.get("trial") else {}), "step": r.get("step"), "baseline": bool(r.get("baseline")),
             "samples": r["samples"]} for r in rows if r.get("samples")]


def forgetting(rows: Iterable[dict[str, Any]], *, step: int | None = None) -> dict[str, Any] | None:
    """Reference perplexity before and after, for one run or trial's rows: after is the evaluation
    at `step` (the exported model's) or else the latest. None without a baseline and a later value."""
    rows = [r for r in rows if isinstance(r.get(REFERENCE_KEY), float)]
    before = next((r[REFERENCE_KEY] for r in rows if r.get("baseline")), None)
    evaluated = [r for r in rows if not r.get("baseline")]
    after = next((r for r in evaluated if r.get("step") == step), None) if step is not None else None
    after = after or (evaluated[-1] if evaluated else None)
    if before is None or after is None:
        return None
    return {"metric": REFERENCE_METRIC, "baseline": before, "finetuned": after[REFERENCE_KEY], "step": after.get("step"),
            "change": after[REFERENCE_KEY] / before - 1 if before else None}


def forgetting_text(figure: dict[str, Any]) -> str:
    """'general-text perplexity 24.10 -> 31.00, +29%': what the summary prints."""
    change = figure.get("change")
    shown = f", {change:+.0%}" if isinstance(change, float) else ""
    return f"general-text perplexity {figure['baseline']:.2f} -> {figure['finetuned']:.2f}{shown}"


def by_trial(rows: Iterable[dict[str, Any]]) -> dict[str | None, list[dict[str, Any]]]:
    """Evaluation rows grouped by trial (None: a single run), in the order trials first reported."""
    grouped: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        if "event" not in row:
            grouped.setdefault(row.get("trial"), []).append(row)
    return grouped


def status_fields(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """status.json's `samples` (each trial's latest, truncated by spec.progress) and `forgetting`
    (each trial's baseline -> latest), for the STATUS_TRIALS trials that evaluated last."""
    trials = by_trial(rows)
    last = {r.get("trial"): i for i, r in enumerate(rows) if "event" not in r}
    recent = sorted(trials, key=last.__getitem__)
    samples, figures = [], []
    for trial in recent[-STATUS_TRIALS:]:
        latest = next((r for r in reversed(trials[trial]) if r.get("samples")), None)
        if latest is not None:
            samples.append({"trial": trial, "step": latest.get("step"), "samples": latest["samples"]})
        figure = forgetting(trials[trial])
        if figure is not None:
            figures.append({"trial": trial, "baseline": figure["baseline"], "latest": figure["finetuned"],
                            "step": figure["step"], "change": figure["change"]})
    return {"samples": samples, "forgetting": figures}


def output_lines(row: dict[str, Any]) -> list[str]:
    """The run's output for one evaluation's samples: one compact line each (newlines shown as ⏎)."""
    lines = []
    for i, sample in enumerate(row.get("samples") or [], 1):
        text = " ".join(str(sample.get("completion", "")).replace("\n", " ⏎ ").split())
        lines.append(f"  sample {i}: {text[:OUTPUT_CHARS]}{'…' if len(text) > OUTPUT_CHARS else ''}")
    return lines


def add_to_search_results(results: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """A search's results.json: every trial's samples (from the tracker's rows), each trial's
    forgetting at its best step, and the best trial's as the search's."""
    results["samples"] = sample_sets(rows)
    for trial in results["trials"]:
        trial["forgetting"] = forgetting(trial.get("history") or [], step=trial.get("best_step"))
    best = results.get("best") or {}
    figure = next((t["forgetting"] for t in results["trials"] if t["trial"] == best.get("trial")), None)
    results["forgetting"] = {**figure, "trial": best["trial"]} if figure else None
