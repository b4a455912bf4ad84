"""layers.discover: a transformers model mapped onto embeddings, the layer stack (bottom to top),
the top block and the task head, by structure alone. Tiny models built from configs; nothing is
downloaded."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the hub

from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from finetune_trainer.layers import LayerMap, UnmappableModel, discover
from tests.tiny_models import SMALL, tiny_bert, tiny_llama

N_LAYERS = 3


def bert(layers: int = N_LAYERS) -> nn.Module:
    return tiny_bert(layers)


def llama(*, tied: bool, layers: int = N_LAYERS) -> nn.Module:
    return tiny_llama(layers, tied=tied)


def gpt2(layers: int = N_LAYERS) -> nn.Module:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=64,
            n_positions=40,
            n_embd=16,
            n_layer=layers,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def distilbert(layers: int = N_LAYERS) -> nn.Module:
    return DistilBertForSequenceClassification(
        DistilBertConfig(
            **SMALL,
            dim=16,
            n_layers=layers,
            n_heads=2,
            hidden_dim=32,
        )
    )


def roberta(layers: int = N_LAYERS) -> nn.Module:
    return RobertaForSequenceClassification(
        RobertaConfig(
            **SMALL,
            hidden_size=16,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )


# name -> (builder, layer stack path, head parameters, embedding parameters, top parameters)
MODELS: dict[str, tuple[Callable[[], nn.Module], str, set[str], set[str], set[str]]] = {
    "bert": (
        bert,
        "bert.encoder.layer",
        {"classifier.weight", "classifier.bias"},
        {
            "bert.embeddings.word_embeddings.weight",
            "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight",
            "bert.embeddings.LayerNorm.weight",
            "bert.embeddings.LayerNorm.bias",
        },
        {
            "bert.pooler.dense.weight",
            "bert.pooler.dense.bias",
            "classifier.weight",
            "classifier.bias",
        },
    ),
    "llama-untied": (
        lambda: llama(tied=False),
        "model.layers",
        {"lm_head.weight"},
        {"model.embed_tokens.weight"},
        {"model.norm.weight", "lm_head.weight"},
    ),
    "llama-tied": (
        lambda: llama(tied=True),
        "model.layers",
        set(),  # lm_head.weight is the embedding matrix: no head weights of its own
        {"model.embed_tokens.weight"},
        {"model.norm.weight"},
    ),
    "gpt2": (
        gpt2,
        "transformer.h",
        set(),  # GPT-2 ties its LM head to wte
        {"transformer.wte.weight", "transformer.wpe.weight"},
        {"transformer.ln_f.weight", "transformer.ln_f.bias"},
    ),
    "distilbert": (
        distilbert,
        "distilbert.transformer.layer",
        {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"},
        {
            "distilbert.embeddings.word_embeddings.weight",
            "distilbert.embeddings.position_embeddings.weight",
            "distilbert.embeddings.LayerNorm.weight",
            "distilbert.embeddings.LayerNorm.bias",
        },
        {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"},
    ),
    "roberta": (
        roberta,
        "roberta.encoder.layer",
        {
            "classifier.dense.weight",
            "classifier.dense.bias",
            "classifier.out_proj.weight",
            "classifier.out_proj.bias",
        },
        {
            "roberta.embeddings.word_embeddings.weight",
            "roberta.embeddings.position_embeddings.weight",
            "roberta.embeddings.token_type_embeddings.weight",
            "roberta.embeddings.LayerNorm.weight",
            "roberta.embeddings.LayerNorm.bias",
        },
        {
            "classifier.dense.weight",
            "classifier.dense.bias",
            "classifier.out_proj.weight",
            "classifier.out_proj.bias",
        },
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def mapped(request) -> tuple[str, nn.Module, LayerMap]:
    torch.manual_seed(0)
    model = MODELS[request.param][0]()
    return request.param, model, discover(model)


def all_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def test_blocks_partition_every_parameter_exactly_once(mapped):
    _, model, layer_map = mapped
    listed = [p for block in layer_map.bottom_up() for p in block.params]
    assert sorted(listed) == sorted(all_names(model))
    assert len(listed) == len(set(listed)), "a parameter is in two blocks"


def test_layers_are_the_stack_bottom_to_top(mapped):
    name, model, layer_map = mapped
    stack = MODELS[name][1]
    assert layer_map.layer_stack == stack
    assert [b.name for b in layer_map.layers] == [f"layer.{i}" for i in range(N_LAYERS)]
    per_layer = {len(b.params) for b in layer_map.layers}
    assert len(per_layer) == 1 and per_layer.pop() > 0, (
        "identical layers hold the same number of tensors"
    )
    for i, block in enumerate(layer_map.layers):
        assert all(p.startswith(f"{stack}.{i}.") for p in block.params), block.params
        # in the model's own order, so the block reads like the layer
        assert list(block.params) == [n for n in all_names(model) if n.startswith(f"{stack}.{i}.")]


def test_embeddings_top_and_head_are_the_expected_parameters(mapped):
    name, _, layer_map = mapped
    _, _, head, embeddings, top = MODELS[name]
    assert set(layer_map.embeddings.params) == embeddings
    assert set(layer_map.top.params) == top
    assert set(layer_map.head_params) == head
    assert set(layer_map.head_params) <= set(layer_map.top.params), (
        "the task head sits in the top block"
    )
    assert [b.name for b in layer_map.bottom_up()] == [
        "embeddings",
        *[f"layer.{i}" for i in range(N_LAYERS)],
        "top",
    ]


def test_tied_llama_reports_no_lm_head_parameter():
    layer_map = discover(llama(tied=True))
    every = [p for block in layer_map.bottom_up() for p in block.params]
    assert not any(p.startswith("lm_head") for p in every)
    assert layer_map.head_params == ()


@pytest.mark.parametrize("layers", [1, 5])
def test_layer_count_follows_the_config(layers):
    layer_map = discover(bert(layers))
    assert len(layer_map.layers) == layers
    assert layer_map.layers[-1].params[0].startswith(f"bert.encoder.layer.{layers - 1}.")


def test_the_base_model_itself_maps_with_no_head():
    base = bert().bert  # BertModel: no task head around it
    layer_map = discover(base)
    assert layer_map.layer_stack == "encoder.layer"
    assert len(layer_map.layers) == N_LAYERS
    assert layer_map.head_params == ()
    assert set(layer_map.top.params) == {"pooler.dense.weight", "pooler.dense.bias"}


# --- models without a layer stack -----------------------------------------------------------


class _TinyConfig(PretrainedConfig):
    model_type = "unit-tiny"


class _NoStackModel(PreTrainedModel):
    """A transformers model whose blocks are plain attributes: no nn.ModuleList to find."""

    config_class = _TinyConfig
    base_model_prefix = "body"

    def __init__(self, config: _TinyConfig):
        super().__init__(config)
        self.body = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)


class _MixedListModel(nn.Module):
    """Its only ModuleList mixes layer types: not a stack of identical blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4)])


@pytest.mark.parametrize(
    ("build", "where"),
    [
        (lambda: _NoStackModel(_TinyConfig()), "under body"),
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "under the model"),
        (_MixedListModel, "under the model"),
        (
            lambda: nn.Sequential(nn.ModuleList([nn.ReLU(), nn.ReLU()]), nn.Linear(4, 2)),
            "under the model",
        ),
    ],
    ids=["pretrained-no-list", "sequential", "mixed-list", "list-without-weights"],
)
def test_a_model_without_a_layer_stack_is_unmappable_and_points_at_patterns(build, where):
    model = build()
    with pytest.raises(UnmappableModel) as err:
        discover(model)
    message = str(err.value)
    assert type(model).__name__ in message
    assert where in message
    assert "patterns" in message, "the message must offer the strategy that needs no layer stack"
    first = next(iter(model.named_parameters()))[0]
    assert first in message, "the message shows what parameter names look like, for writing regexes"


def test_unmappable_model_is_a_value_error():
    assert issubclass(UnmappableModel, ValueError)
