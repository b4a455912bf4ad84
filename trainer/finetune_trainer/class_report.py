"""Per-class precision, recall and F1 and the confusion matrix of a classifier, for results.json
and confusion_matrix.png. Driver side: no torch.

The counts come from evaluation.evaluate, which all-reduces one confusion matrix over the ranks
(rows: the true class, columns: the predicted one): the validation split's at the best
checkpoint's evaluation (results' `best`: the exported one unless output.export is last) (the recipe hands each evaluation's matrix to the progress tracker, as it
does samples) and the test split's from scoring. Everything else is derived here from those
counts, the way scikit-learn's classification_report defines it (a class never predicted has
precision 0; one absent from the split has recall 0 and support 0). `f1` in the metrics is the
macro average over the classes present in the split (support > 0), which is what evaluation.py
computes: an absent class would otherwise count as an F1 of 0 that no prediction could change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFUSION_KEY = "confusion"  # in a tracker row (recipe) and a test score (scoring), taken out of results' metrics
MAX_CLASSES = 100  # a matrix past this many classes (10,000 cells per evaluation) is not carried
PLOT_FILE = "confusion_matrix.png"


def report(confusion: list[list[float]], labels: list[str] | None) -> dict[str, Any]:
    """{labels, per_class: [{label, precision, recall, f1, support}], confusion, accuracy, macro_f1}."""
    k = len(confusion)
    names = list(labels) if labels and len(labels) == k else [str(i) for i in range(k)]
    counts = [[int(c) for c in row] for row in confusion]
    predicted = [sum(counts[t][p] for t in range(k)) for p in range(k)]
    per_class: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        correct, support = counts[i][i], sum(counts[i])
        precision = correct / predicted[i] if predicted[i] else 0.0
        recall = correct / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"label": name, "precision": precision, "recall": recall, "f1": f1, "support": support})
    present = [c for c in per_class if c["support"]]
    total = sum(c["support"] for c in per_class)
    return {
        "labels": names,
        "per_class": per_class,
        "confusion": counts,
        "accuracy": sum(counts[i][i] for i in range(k)) / total if total else 0.0,
        "macro_f1": sum(c["f1"] for c in present) / len(present) if present else 0.0,  # = metrics' f1
        "classes_absent": [c["label"] for c in per_class if not c["support"]],
    }


def add_to_results(results: dict[str, Any], rows: list[dict[str, Any]], run_dir: Path) -> None:
    """results["classes"]: the best checkpoint's validation report (`best`'s trial and step,
    from the tracker's rows) and the test split's (moved out of metrics.test), and the PNG beside
    results.json. Nothing for causal-lm. None where a matrix is missing (a best step from before a
    resume, whose rows came back from the checkpoint without it; more than MAX_CLASSES classes)."""
    counts = (results.get("data") or {}).get("train_label_counts")
    labels = list(counts) if isinstance(counts, dict) else None
    test = (results.get("metrics") or {}).get("test") or {}
    test_matrix = {name: scores.pop(CONFUSION_KEY) for name, scores in test.items() if isinstance(scores, dict) and CONFUSION_KEY in scores}
    if isinstance(results.get("history"), list):  # a single run's: the matrices live in `classes` only
        results["history"] = without_matrices(results["history"])
    if labels is None and not test_matrix and not any(CONFUSION_KEY in r for r in rows):
        return  # not a classifier
    best = results.get("best") or {}
    found = next((r for r in rows if r.get(CONFUSION_KEY) and not r.get("baseline") and r.get("step") == best.get("step")
                  and r.get("trial") == best.get("trial")), None)
    classes: dict[str, Any] = {
        "validation": {"step": best.get("step"), **({"trial": best["trial"]} if best.get("trial") else {}),
                       **report(found[CONFUSION_KEY], labels)} if found else None,
        "test": {name: report(matrix, labels) for name, matrix in test_matrix.items()} or None,
        "plot": None,
    }
    try:
        classes["plot"] = plot(classes, run_dir)
    except (OSError, ValueError) as err:  # a plot is a convenience: the numbers are in results.json
        log.warning("confusion matrix plot not written: %s", err)
    results["classes"] = classes


def without_matrices(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as results.json's history keeps them: the per-evaluation matrices are in `classes`."""
    return [{k: v for k, v in r.items() if k != CONFUSION_KEY} for r in rows]


def plot(classes: dict[str, Any], run_dir: Path) -> str | None:
    """confusion_matrix.png: the validation split's (the exported checkpoint) and the test split's
    fine-tuned model's, each cell the count and its share of the true class (row)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    panels = []
    if classes.get("validation"):
        v = classes["validation"]
        panels.append((f"validation, step {v['step']}" + (f" ({v['trial']})" if v.get("trial") else ""), v))
    if classes.get("test") and "finetuned" in classes["test"]:
        panels.append(("test, fine-tuned model", classes["test"]["finetuned"]))
    if not panels:
        return None
    k = len(panels[0][1]["labels"])
    size = min(4 + 0.45 * k, 14)
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (title, rep) in zip(axes[0], panels, strict=True):
        counts = rep["confusion"]
        shares = [[c / max(sum(row), 1) for c in row] for row in counts]
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        if k <= 30:  # numbers stay readable
            for t in range(k):
                for p in range(k):
                    ax.text(p, t, f"{counts[t][p]}\n{shares[t][p]:.0%}", ha="center", va="center", fontsize=7,
                            color="white" if shares[t][p] > 0.5 else "black")
        ax.set_xticks(range(k), rep["labels"], rotation=45, ha="right")
        ax.set_yticks(range(k), rep["labels"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}\naccuracy {rep['accuracy']:.3f}, macro-F1 {rep['macro_f1']:.3f}")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / PLOT_FILE
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
