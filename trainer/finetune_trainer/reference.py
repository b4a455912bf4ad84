"""The forgetting probe's data and figure: perplexity on general text (spec.evaluation.reference).

A domain fine-tune can get better at its data while getting worse at everything else
(catastrophic forgetting). The probe measures the model's perplexity on text unrelated to the
task, at the baseline and at every evaluation; the change from the baseline is the forgetting
(eval_report.forgetting). The text is a train-only plain-text data set (`as_data`): the preflight
checks its first rows (data_sample.py), the session's ingest reads, cleans, samples (maxSamples
rows picked with the job's seed) and tokenizes it in Ray Data's tasks, and each worker reads the
small materialized result whole; the number is evaluation.evaluate's exact token-weighted
perplexity, the same on 1 or N workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .data import DataError, TokenizedSplit
from .evaluation import evaluate
from .spec import DataSpec, FineTuneJob

if TYPE_CHECKING:
    import ray.data

WHERE = "spec.evaluation.reference"


def as_data(job: FineTuneJob) -> DataSpec | None:
    """The reference as plain-text training data: cut at data.maxSeqLength with EOS after a text
    that fits, at most maxSamples rows; None without a reference. Rows without text are skipped
    (maxDroppedFraction 1): a general corpus is not the job's data, and maxSamples counts the rows
    that have text."""
    spec = job.spec
    ref = spec.evaluation.reference
    if ref is None:
        return None
    return DataSpec(train=ref.data, text_field=ref.text_field, max_seq_length=spec.data.max_seq_length,
                    max_train_samples=ref.max_samples, max_dropped_fraction=1.0)


def check_reference(job: FineTuneJob, tokenizer: Any) -> None:
    """The preflight's check of the reference's first rows; DataError naming its fields."""
    from .data_sample import check

    data = as_data(job)
    if data is None:
        return
    try:
        check(data, "causal-lm", tokenizer, storage=job.spec.storage)
    except DataError as err:
        raise DataError(_renamed(str(err))) from None


def ingest_reference(job: FineTuneJob, tokenizer: Any) -> ray.data.Dataset | None:
    """The reference tokenized by the ingest, materialized in the object store; None without one."""
    from .ingest import ingest

    data = as_data(job)
    if data is None:
        return None
    try:
        return ingest(data, "causal-lm", tokenizer, job.spec.training.seed, storage=job.spec.storage).train
    except DataError as err:
        raise DataError(_renamed(str(err))) from None


def _renamed(message: str) -> str:
    """The data checks name spec.data fields; here they are the reference's."""
    for old, new in (("spec.data.train", f"{WHERE}.data"), ("spec.data.textField", f"{WHERE}.textField"),
                     ("spec.data.packing", f"{WHERE}.data")):
        message = message.replace(old, new)
    return message


def perplexity(model: nn.Module, split: TokenizedSplit, *, batch_size: int, pad_token_id: int, device: torch.device,
               rank: int = 0, world_size: int = 1) -> float:
    """The model's perplexity on the reference text (every rank takes part: the sums are all-reduced)."""
    return evaluate(model, split, task="causal-lm", batch_size=batch_size, pad_token_id=pad_token_id, device=device,
                    rank=rank, world_size=world_size)["perplexity"]
