"""Tiny transformers models built from configs (no downloads), shared by the unit tests.

Sizes are irrelevant to what the tests check (parameter names, block structure, optimizer
behaviour); only the layer count and head tying vary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

SMALL = {"vocab_size": 64, "max_position_embeddings": 40}


def tiny_bert(layers: int = 2, **config: Any) -> nn.Module:
    """A 3-class BertForSequenceClassification, seeded so every call gives the same weights."""
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(**SMALL, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                   intermediate_size=32, num_labels=3, **config)
    )


def tiny_llama(layers: int = 2, *, tied: bool = False, **config: Any) -> nn.Module:
    """`config` overrides SMALL (e.g. vocab_size=len(tokenizer) for a model that reads real text)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(**{**SMALL, **config}, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                    num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=tied)
    )


def minimal_manifest(**sections: Any) -> dict[str, Any]:
    """A valid classification FineTuneJob on CPU; `sections` replace whole spec sections."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "unit"},
        "spec": {
            "model": {"source": "models/tiny", "task": "sequence-classification"},
            "data": {"train": "data/train.jsonl", "validationSplit": 0.1},
            **sections,
        },
    }
