"""Generated samples: what the model writes for a few fixed held-out prompts (spec.evaluation.samples).

People judge a generative fine-tune by reading it, so the recipe generates at the baseline and at
every evaluation, for the same prompts each time, with the same seed: a change between two
evaluations is the model's, not the sampler's.

The prompts are the first `count` examples of the validation split, cut where their first trained
token is (label != -100): for prompt/completion or chat data that is the prompt exactly as training
rendered it (the chat template up to and including the assistant's generation prompt), whatever the
format, with no second rendering to drift from the first. Plain text trains on every token; its
prompt is the head of the text (`PLAIN_TEXT_PROMPT`).

The decoding loop is transformers' `generate`. Under ZeRO-3 each rank holds a shard of every
weight and a forward pass is a collective, so every rank generates and `synced_gpus=True` keeps a
rank whose sequences ended at EOS running dummy forwards until all ranks are done (transformers
5.24, GenerationMixin._has_unfinished_sequences). transformers only turns that on by itself when
it knows about ZeRO-3 through HfDeepSpeedConfig, which this trainer does not use: it is passed
explicitly. Under ZeRO 0-2 every rank has the whole model, so rank 0 generates alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import IGNORE_INDEX, TokenizedSplit
from .spec.training import SamplesSpec

PLAIN_TEXT_PROMPT = 16  # tokens of a plain-text example given as its prompt (at most half of it)


def sample_prompts(split: TokenizedSplit, count: int) -> list[np.ndarray]:
    """The token ids of the first `count` examples of `split` up to their first trained token."""
    if isinstance(split.labels, np.ndarray):
        raise ValueError("generated samples need causal-lm data (per-token labels)")
    prompts = []
    for ids, labels in zip(split.input_ids[:count], split.labels[:count], strict=True):
        trained = np.flatnonzero(np.asarray(labels) != IGNORE_INDEX)
        first = int(trained[0]) if len(trained) else len(ids)
        cut = first if first > 0 else max(1, min(PLAIN_TEXT_PROMPT, len(ids) // 2))
        prompts.append(np.asarray(ids[:cut], dtype=np.int64))
    return prompts


@dataclass
class SampleGenerator:
    """Generates for the fixed prompts; every rank calls `generate` (see the module docstring)."""

    prompts: list[np.ndarray]
    spec: SamplesSpec
    tokenizer: Any
    seed: int
    device: torch.device
    zero3: bool
    rank: int = 0
    world_size: int = 1

    def generate(self, model: nn.Module) -> list[dict[str, str]] | None:
        """[{prompt, completion}] on rank 0, None on the others. Leaves the global random state as it
        found it (a forked generator), so a resumed run's dropout masks are the uninterrupted run's."""
        synced = self.zero3 and self.world_size > 1
        if self.rank != 0 and not synced:
            return None
        was_training = model.training
        model.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        completions: list[list[int]] = []
        # a model with learned positions (GPT-2: 1024) cannot go past them: the budget stops there
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                for prompt in self.prompts:
                    budget = min(self.spec.max_new_tokens, positions - len(prompt)) if isinstance(positions, int) else self.spec.max_new_tokens
                    if budget < 1:  # every rank alike: the same prompts and model
                        completions.append([])
                        continue
                    ids = torch.as_tensor(prompt[None], device=self.device)
                    out = model.generate(  # type: ignore[operator]  # a PreTrainedModel's, behind nn.Module
                        input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=self._config(budget),
                        synced_gpus=synced,
                    )
                    completions.append(out[0, ids.shape[1]:].tolist())
        finally:
            if was_training:
                model.train()
        if self.rank != 0:
            return None
        return [
            {"prompt": self.tokenizer.decode(prompt.tolist()), "completion": self.tokenizer.decode(done, skip_special_tokens=True)}
            for prompt, done in zip(self.prompts, completions, strict=True)
        ]

    def _config(self, max_new_tokens: int) -> Any:
        """Built whole, not layered over the model's own generation config: the spec's decoding is
        what the samples show, whatever sampling defaults a checkpoint ships."""
        from transformers import GenerationConfig

        sampling = self.spec.temperature > 0
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampling,
            **({"temperature": self.spec.temperature, "top_k": None, "top_p": None} if sampling else {}),
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad,
        )
