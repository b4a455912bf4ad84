"""What each evaluation measures besides the validation metrics (the recipe's hook): the generated
samples (generation.py) and the perplexity on general text (reference.py), for causal-lm jobs
that ask for them in spec.evaluation. Every rank calls both at every evaluation: the reference
perplexity all-reduces its sums, and generation under ZeRO-3 is a collective at each token."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import TokenizedSplit
from .generation import SampleGenerator, sample_prompts
from .reference import perplexity
from .spec import FineTuneJob
from .spec.training import REFERENCE_METRIC


class EvaluationProbes:
    def __init__(self, job: FineTuneJob, validation: TokenizedSplit | None, reference: TokenizedSplit | None, *, model_dir: str,
                 device: torch.device, rank: int, world_size: int, pad_token_id: int):
        spec = job.spec
        self.reference = reference if spec.evaluation.reference is not None else None
        self.kw: dict[str, Any] = {"batch_size": spec.training.per_device_batch_size * 2, "pad_token_id": pad_token_id,
                                   "device": device, "rank": rank, "world_size": world_size}
        self.generator: SampleGenerator | None = None
        samples = spec.evaluation.samples
        if samples is not None and validation is not None:
            from .modeling import load_tokenizer

            self.generator = SampleGenerator(
                sample_prompts(validation, samples.count), samples, load_tokenizer(model_dir, spec.model),
                seed=spec.training.seed, device=device, zero3=spec.deepspeed.zero_stage == 3, rank=rank, world_size=world_size,
            )

    def measure(self, model: nn.Module) -> dict[str, float]:
        """`eval_referencePerplexity` when the job has a reference; nothing otherwise."""
        if self.reference is None:
            return {}
        return {f"eval_{REFERENCE_METRIC}": perplexity(model, self.reference, **self.kw)}

    def samples(self, model: nn.Module) -> list[dict[str, str]] | None:
        """[{prompt, completion}] on rank 0 (None elsewhere, and without spec.evaluation.samples)."""
        return self.generator.generate(model) if self.generator is not None else None
