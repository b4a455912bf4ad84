"""modeling: the spec's model options reach the loaded model (dropout, head, checkpointing, dtype)."""

from __future__ import annotations

import pytest
import torch

from finetune_trainer.modeling import load_model, skeleton
from finetune_trainer.spec import ModelSpec
from tests.tiny_models import tiny_bert, tiny_llama


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    tiny_bert().base_model.save_pretrained(folder)  # a pre-trained body without a task head
    return str(folder)


def test_classification_head_dropout_and_checkpointing(bert_dir):
    spec = ModelSpec(source=bert_dir, task="sequence-classification", gradient_checkpointing=True)
    model = load_model(bert_dir, spec, num_labels=5, dropout=0.0, pad_token_id=0)
    assert model.config.num_labels == 5 and model.classifier.out_features == 5
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    assert model.is_activation_checkpointing


def test_dtype_is_honoured(bert_dir):
    spec = ModelSpec(source=bert_dir, task="sequence-classification", dtype="bfloat16")
    model = load_model(bert_dir, spec, num_labels=2, dropout=None, pad_token_id=0)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.hidden_dropout_prob == 0.1  # untouched without an override


def test_skeleton_has_the_loaded_models_names_and_no_weights(bert_dir, tmp_path):
    spec = ModelSpec(source=bert_dir, task="sequence-classification")
    meta = skeleton(bert_dir, spec, num_labels=4)
    real = load_model(bert_dir, spec, num_labels=4, dropout=None, pad_token_id=0)
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in real.named_parameters()]
    assert all(p.device.type == "meta" for p in meta.parameters())
    llama_dir = tmp_path / "llama"
    tiny_llama().save_pretrained(llama_dir)
    causal = skeleton(str(llama_dir), ModelSpec(source=str(llama_dir), task="causal-lm"), num_labels=None)
    assert type(causal).__name__ == "LlamaForCausalLM"
