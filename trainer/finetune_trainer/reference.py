"""The forgetting probe's data and figure: perplexity on general text (spec.evaluation.reference).

A domain fine-tune can get better at its data while getting worse at everything else
(catastrophic forgetting). The probe measures the model's perplexity on text unrelated to the
task, at the baseline and at every evaluation; the change from the baseline is the forgetting
(eval_report.forgetting). The text is read, cleaned, sampled and tokenized by the data pipeline
(data.prepare, as a train-only plain-text data set), once, in the driver's preflight, and travels
to the workers with the other splits; the number is evaluation.evaluate's exact token-weighted
perplexity, the same on 1 or N workers.
"""

from __future__ import annotations

import torch
from torch import nn

from .data import DataError, TokenizedSplit, prepare
from .evaluation import evaluate
from .spec import DataSpec, FineTuneJob

WHERE = "spec.evaluation.reference"


def prepare_reference(job: FineTuneJob, tokenizer) -> TokenizedSplit | None:
    """The reference text tokenized like plain-text training data (cut at data.maxSeqLength, EOS
    after a text that fits), at most maxSamples rows picked with the job's seed; None without a
    reference. Raises DataError naming the spec.evaluation.reference field to fix."""
    spec = job.spec
    ref = spec.evaluation.reference
    if ref is None:
        return None
    # rows without text are skipped (maxDroppedFraction 1): a general corpus is not the job's data,
    # and maxSamples counts the rows that have text
    as_data = DataSpec(train=ref.data, text_field=ref.text_field, max_seq_length=spec.data.max_seq_length,
                       max_train_samples=ref.max_samples, max_dropped_fraction=1.0)
    try:
        return prepare(as_data, "causal-lm", tokenizer, spec.training.seed).train
    except DataError as err:
        raise DataError(_renamed(str(err))) from None


def _renamed(message: str) -> str:
    """data.prepare names spec.data fields; here they are the reference's."""
    for old, new in (("spec.data.train", f"{WHERE}.data"), ("spec.data.textField", f"{WHERE}.textField"),
                     ("spec.data.packing", f"{WHERE}.data")):
        message = message.replace(old, new)
    return message


def perplexity(model: nn.Module, split: TokenizedSplit, *, batch_size: int, pad_token_id: int, device: torch.device,
               rank: int = 0, world_size: int = 1) -> float:
    """The model's perplexity on the reference text (every rank takes part: the sums are all-reduced)."""
    return evaluate(model, split, task="causal-lm", batch_size=batch_size, pad_token_id=pad_token_id, device=device,
                    rank=rank, world_size=world_size)["perplexity"]
