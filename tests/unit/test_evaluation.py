"""evaluation: exact metrics from sums (accuracy, macro-F1, perplexity) and early stopping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finetune_trainer.data import TokenizedSplit
from finetune_trainer.evaluation import _metrics, evaluate
from finetune_trainer.ranking import EarlyStopping, best_row, is_better
from tests.tiny_models import tiny_bert, tiny_llama


def test_classification_metrics_from_a_confusion_matrix():
    # rows: actual, columns: predicted. class 0: 3/4 right, class 1: 1/2, class 2 never occurs
    confusion = torch.tensor([[3, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float64)
    m = _metrics("sequence-classification", loss_sum=6.0, count=6.0, confusion=confusion)
    assert m["loss"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(4 / 6)
    f1_0 = 2 * (3 / 4) * (3 / 4) / (3 / 4 + 3 / 4)
    f1_1 = 2 * (1 / 2) * (1 / 2) / (1 / 2 + 1 / 2)
    assert m["f1"] == pytest.approx((f1_0 + f1_1) / 2)  # absent class 2 is not averaged in


def test_causal_metrics_are_token_weighted():
    m = _metrics("causal-lm", loss_sum=20.0, count=10.0, confusion=torch.zeros(1, 1))
    assert m["loss"] == pytest.approx(2.0) and m["perplexity"] == pytest.approx(math.exp(2.0))


def _split(rows: list[list[int]], labels) -> TokenizedSplit:
    return TokenizedSplit([torch.tensor(r).numpy() for r in rows], labels)


def test_evaluate_matches_a_hand_computed_pass_for_classification():
    model = tiny_bert().eval()
    rows = [[2, 5, 7], [2, 9], [2, 4, 4, 6], [2, 8, 3]]
    labels = torch.tensor([0, 1, 2, 1])
    split = _split(rows, labels.numpy())
    got = evaluate(model, split, task="sequence-classification", batch_size=3, pad_token_id=0,
                   device=torch.device("cpu"), num_labels=3)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([r])).logits for r in rows])
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())


def test_evaluate_skips_masked_tokens_for_causal_lm():
    model = tiny_llama().eval()
    rows = [[5, 6, 7, 8], [9, 10, 11]]
    token_labels = [torch.tensor([-100, -100, 7, 8]).numpy(), torch.tensor([9, 10, 11]).numpy()]
    got = evaluate(model, _split(rows, token_labels), task="causal-lm", batch_size=2, pad_token_id=0,
                   device=torch.device("cpu"))
    total, count = 0.0, 0
    with torch.no_grad():
        for row, lab in zip(rows, token_labels, strict=True):
            logits = model(input_ids=torch.tensor([row])).logits[0, :-1]
            target = torch.tensor(lab[1:])
            total += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    assert got["tokens"] == count == 4
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize(("value", "best", "mode", "delta", "expected"), [
    (1.0, None, "min", 0.0, True),
    (0.9, 1.0, "min", 0.0, True),
    (1.0, 1.0, "min", 0.0, False),
    (0.95, 1.0, "min", 0.1, False),
    (0.85, 1.0, "min", 0.1, True),
    (0.8, 0.7, "max", 0.0, True),
    (0.75, 0.7, "max", 0.1, False),
])
def test_is_better(value, best, mode, delta, expected):
    assert is_better(value, best, mode, delta) is expected


def test_best_row_skips_rows_without_the_metric_and_follows_the_mode():
    rows = [{"step": 0}, {"step": 5, "eval_loss": 0.7}, {"step": 10, "eval_loss": 0.4}, {"step": 15, "eval_loss": None},
            {"step": 20, "eval_loss": 0.5}]
    assert best_row(rows, "eval_loss", "min")["step"] == 10
    assert best_row(rows, "eval_loss", "max")["step"] == 5
    assert best_row(rows[:1], "eval_loss", "min") == {} and best_row([], "eval_loss", "max") == {}


def test_early_stopping_counts_evaluations_without_enough_improvement():
    stopper = EarlyStopping(mode="max", patience=2, min_delta=0.01)
    assert [stopper.update(v) for v in (0.50, 0.60, 0.605, 0.61, 0.70, 0.70, 0.69)] == [
        False, False, False, True, False, False, True,
    ]
    assert stopper.best == 0.70
    restored = EarlyStopping(mode="max", patience=2, min_delta=0.01)
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == stopper.state_dict()


def test_no_patience_never_stops():
    stopper = EarlyStopping(mode="min", patience=None)
    assert not any(stopper.update(v) for v in (1.0, 2.0, 3.0, 4.0))
