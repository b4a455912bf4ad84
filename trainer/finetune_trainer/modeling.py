"""Loading the pre-trained model and its tokenizer from where the spec says they are."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .spec import ModelSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(spec: ModelSpec) -> str:
    """A local folder for local/pkg:// sources (GGUF files are converted once), else the hub name."""
    from .sources import is_hub_name, resolve_local

    if is_hub_name(spec.source):
        return spec.source
    path = resolve_local(spec.source)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import materialize_gguf

        return str(materialize_gguf(path))
    return str(path)


def load_tokenizer(model_dir: str, spec: ModelSpec):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if tok.pad_token_id is None:
        # Decoder tokenizers often ship without a pad token; padding positions are masked out of
        # attention and loss, so reusing EOS is the usual, harmless choice.
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str, spec: ModelSpec, *, num_labels: int | None, dropout: float | None, pad_token_id: int | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    common = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    config = AutoConfig.from_pretrained(model_dir, **common)
    if dropout is not None:
        for key, value in list(config.to_dict().items()):
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, dropout)
    if spec.task == "sequence-classification":
        config.num_labels = num_labels or config.num_labels
        if config.pad_token_id is None:
            config.pad_token_id = pad_token_id
        cls = AutoModelForSequenceClassification
    else:
        cls = AutoModelForCausalLM
    dtype = _DTYPES.get(spec.dtype, torch.float32)
    model = cls.from_pretrained(model_dir, config=config, dtype=dtype, **common)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def offline_if_local(source: str) -> None:
    """Local sources must never reach for the hub (there may be no network at all)."""
    from .sources import is_hub_name

    if not is_hub_name(source):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def count_layers(model_dir: str) -> int | None:
    """The layer count from config.json alone (cheap: no weights), for checks before training."""
    import json

    path = Path(model_dir) / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None
