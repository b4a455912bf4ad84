"""Per-class precision/recall/F1 and the confusion matrix (issue 20, item 6): from the counts the
evaluation all-reduces, into results.json's `classes` and confusion_matrix.png."""

from __future__ import annotations

import json

import pytest
import torch

from finetune_trainer.class_report import MAX_CLASSES, PLOT_FILE, add_to_results, report
from finetune_trainer.data import TokenizedSplit
from finetune_trainer.evaluation import _metrics, evaluate
from tests.tiny_models import tiny_bert

# rows: true class, columns: predicted. cat: 3 of 4 right; dog: 1 of 2; bird never occurs but is predicted once
CONFUSION = [[3, 1, 0], [0, 1, 1], [0, 0, 0]]
LABELS = ["cat", "dog", "bird"]


def test_per_class_figures_by_their_definitions_and_macro_f1_over_present_classes():
    r = report(CONFUSION, LABELS)
    cat, dog, bird = r["per_class"]
    assert (cat["precision"], cat["recall"], cat["support"]) == (1.0, 0.75, 4)  # 3 predicted cat, all right
    assert (dog["precision"], dog["recall"], dog["support"]) == (0.5, 0.5, 2)
    assert (bird["precision"], bird["recall"], bird["f1"], bird["support"]) == (0.0, 0.0, 0.0, 0)
    assert cat["f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert r["macro_f1"] == pytest.approx((cat["f1"] + dog["f1"]) / 2)  # bird is absent: not averaged in
    assert r["classes_absent"] == ["bird"] and r["accuracy"] == pytest.approx(4 / 6)
    # the same f1 as the metric the run ranks by
    m = _metrics("sequence-classification", 6.0, 6.0, torch.tensor(CONFUSION, dtype=torch.float64))
    assert m["f1"] == pytest.approx(r["macro_f1"]) and m["confusion"] == CONFUSION


def test_evaluate_returns_the_confusion_of_the_models_own_predictions():
    model = tiny_bert().eval()
    rows = [[2, 5, 7], [2, 9], [2, 4, 4, 6], [2, 8, 3], [2, 11]]
    labels = torch.tensor([0, 1, 2, 1, 0])
    split = TokenizedSplit([torch.tensor(r).numpy() for r in rows], labels.numpy())
    got = evaluate(model, split, task="sequence-classification", batch_size=2, pad_token_id=0, device=torch.device("cpu"), num_labels=3)
    want = [[0] * 3 for _ in range(3)]
    with torch.no_grad():
        for row, label in zip(rows, labels.tolist(), strict=True):
            want[label][int(model(input_ids=torch.tensor([row])).logits.argmax())] += 1
    assert got["confusion"] == want
    big = _metrics("sequence-classification", 1.0, 1.0, torch.zeros(MAX_CLASSES + 1, MAX_CLASSES + 1, dtype=torch.float64))
    assert "confusion" not in big  # not carried past MAX_CLASSES classes


def test_results_get_the_exported_checkpoints_report_the_tests_and_a_png(tmp_path):
    import matplotlib.image

    rows = [
        {"trial": "trial_00", "step": 4, "baseline": True, "eval_f1": 0.1, "confusion": [[1, 1, 0], [1, 1, 0], [0, 0, 0]]},
        {"trial": "trial_00", "step": 8, "eval_f1": 0.5, "confusion": [[2, 0, 0], [2, 0, 0], [0, 0, 0]]},
        {"trial": "trial_01", "step": 8, "eval_f1": 0.7, "confusion": CONFUSION},
        {"trial": "trial_01", "step": 12, "eval_f1": 0.6, "confusion": [[4, 0, 0], [2, 0, 0], [0, 0, 0]]},
    ]
    results = {
        "best": {"trial": "trial_01", "step": 8},
        "data": {"train_label_counts": dict(zip(LABELS, [5, 5, 1], strict=True))},
        "metrics": {"test": {"baseline": {"loss": 1.0, "confusion": [[0, 4, 0], [0, 2, 0], [0, 0, 0]]},
                             "finetuned": {"loss": 0.5, "confusion": CONFUSION}}},
        "history": [dict(r) for r in rows],
    }
    add_to_results(results, rows, tmp_path)
    classes = results["classes"]
    assert classes["validation"]["trial"] == "trial_01" and classes["validation"]["step"] == 8
    assert classes["validation"]["confusion"] == CONFUSION and classes["validation"]["labels"] == LABELS
    assert classes["test"]["baseline"]["per_class"][1]["recall"] == 1.0
    assert results["metrics"]["test"]["finetuned"] == {"loss": 0.5}  # the matrices live in `classes` only
    assert all("confusion" not in r for r in results["history"])
    json.dumps(results, allow_nan=False)
    image = matplotlib.image.imread(classes["plot"])
    assert classes["plot"] == str(tmp_path / PLOT_FILE) and image.shape[0] > 200 and image.shape[1] > 2 * 200  # two panels

    # a best step whose matrix is gone (rows from a checkpoint's history after a resume): said, not guessed
    later = {"best": {"step": 8}, "data": {"train_label_counts": {"a": 1, "b": 1}}, "metrics": {"test": {}}}
    add_to_results(later, [{"step": 8, "eval_loss": 1.0}], tmp_path / "other")
    assert later["classes"] == {"validation": None, "test": None, "plot": None}


def test_a_causal_lm_gets_no_class_report(tmp_path):
    results = {"best": {"step": 4}, "data": {}, "metrics": {"test": {"finetuned": {"loss": 2.0, "perplexity": 7.4}}}}
    add_to_results(results, [{"step": 4, "eval_loss": 2.0}], tmp_path)
    assert "classes" not in results and not (tmp_path / PLOT_FILE).exists()


def test_the_runs_summary_points_at_the_plot_and_at_predict(tmp_path, capsys):
    from finetune_trainer import report

    results = {"job": "j", "run": "r", "metrics": {"validation": {"baseline": {}, "finetuned": {}}, "test": {}},
               "steps": 5, "total_steps": 5, "early_stopped": False, "timings": {"train_seconds": 1.0, "total_seconds": 2.0},
               "throughput": {"tokens_per_second": 10.0}, "peak_memory_mib": 1.0, "model": str(tmp_path / "model"),
               "classes": {"validation": None, "test": None, "plot": str(tmp_path / PLOT_FILE)}}
    report.print_summary(results, tmp_path)
    out = capsys.readouterr().out
    assert f"per-class figures: results.json classes, {tmp_path / PLOT_FILE}" in out
    assert f"try it: finetune predict {tmp_path} --text" in out
