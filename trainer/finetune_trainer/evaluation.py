"""Held-out evaluation that gives the same numbers on 1 or N workers (ranking and early stopping,
which need no torch, are in `ranking`).

Each rank scores a disjoint shard and the *sums* (loss, tokens, confusion matrix) are
all-reduced, so accuracy, macro-F1 and perplexity are exact, not an average of averages.
`f1` is the macro average of the per-class F1 over the classes present in the split (those
with at least one true example). A classification's result also carries the confusion matrix
itself (`confusion`, up to class_report.MAX_CLASSES classes), from which class_report derives
the per-class figures; callers keep only the metrics they report.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .class_report import CONFUSION_KEY, MAX_CLASSES
from .data import TokenizedSplit
from .packing import forward_kwargs


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: TokenizedSplit,
    *,
    task: str,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    num_labels: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    indices = list(range(rank, len(split), world_size))
    k = num_labels or 1
    confusion = torch.zeros(k, k, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(indices), batch_size):
        batch = {key: v.to(device) for key, v in split.batch(indices[start : start + batch_size], pad_token_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch, **forward_kwargs(batch)).logits.float()  # packed: no KV cache (packing.py)
        if task == "sequence-classification":
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            count += labels.numel()
            pred = logits.argmax(-1)
            confusion.index_put_((labels, pred), torch.ones_like(labels, dtype=torch.float64), accumulate=True)
        else:
            shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
            loss_sum += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").double()
            count += (shift_labels != -100).sum()
    if world_size > 1 and dist.is_initialized():
        for tensor in (loss_sum, count, confusion):
            dist.all_reduce(tensor)
    if was_training:
        model.train()
    return _metrics(task, loss_sum.item(), count.item(), confusion.cpu())


def _metrics(task: str, loss_sum: float, count: float, confusion: torch.Tensor) -> dict[str, Any]:
    loss = loss_sum / max(count, 1.0)
    if task != "sequence-classification":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
    correct = confusion.diag()
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = torch.where(predicted > 0, correct / predicted.clamp(min=1), torch.zeros_like(correct))
    recall = torch.where(actual > 0, correct / actual.clamp(min=1), torch.zeros_like(correct))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(correct))
    present = actual > 0  # macro-F1 over the classes that occur in the held-out data
    return {
        "loss": loss,
        "accuracy": correct.sum().item() / max(count, 1.0),
        "f1": f1[present].mean().item() if present.any() else 0.0,
        "examples": count,
        **({CONFUSION_KEY: confusion.round().long().tolist()} if len(confusion) <= MAX_CLASSES else {}),
    }
