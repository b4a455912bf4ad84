"""One baseline evaluation per search (baseline.py): which trials may share one, checked against
real evaluations of a tiny model built the way a worker builds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from finetune_trainer import worker_model
from finetune_trainer.baseline import key
from finetune_trainer.data import TokenizedSplit
from finetune_trainer.evaluation import evaluate
from finetune_trainer.spec import FineTuneJobSpec, parse_job
from tests.tiny_models import minimal_manifest, tiny_bert

BASE: dict[str, Any] = {"training": {"learningRate": 1e-4, "seed": 42, "perDeviceBatchSize": 4},
                        "evaluation": {"everySteps": 5, "metric": "accuracy"}}
# fields a search varies that act only after the baseline: same key, and the same numbers
NEUTRAL = {
    "learning rate, weight decay, steps": {"training": {"learningRate": 3e-4, "weightDecay": 0.1, "maxSteps": 99, "seed": 42,
                                                        "perDeviceBatchSize": 4, "gradientAccumulationSteps": 2}},
    "schedule": {"lrSchedule": {"type": "cosine", "warmupRatio": 0.1}},
    "featureExtraction": {"freezing": {"strategy": "featureExtraction"}},
    "freezeBottom": {"freezing": {"strategy": "freezeBottom", "layers": 1}},
    "gradual": {"freezing": {"strategy": "gradual", "unfreezeEvery": 3}},
    "layer-wise decay": {"freezing": {"layerLrDecay": 0.8}},
    "evaluation interval, early stopping": {"evaluation": {"everySteps": 2, "metric": "accuracy", "earlyStopping": {"patience": 2}}},
    "where results go": {"output": {"dir": "elsewhere", "keepCheckpoints": 1}},
}
# fields that do change what the baseline computes, or may: a key of their own
DIFFERENT = {
    "seed (draws the new head)": {"training": {"learningRate": 1e-4, "seed": 7, "perDeviceBatchSize": 4}},
    "batch size (evaluation batches, padding)": {"training": {"learningRate": 1e-4, "seed": 42, "perDeviceBatchSize": 8}},
    "dropout": {"training": {"learningRate": 1e-4, "seed": 42, "perDeviceBatchSize": 4, "dropout": 0.3}},
    "evaluation metrics": {"evaluation": {"everySteps": 5, "metric": "f1", "metrics": ["f1"]}},
    "lora adds modules": {"freezing": {"strategy": "lora"}},
    "workers (shards)": {"resources": {"workers": 2}},
    "precision": {"deepspeed": {"precision": "bf16"}},
    "validation examples": {"data": {"train": "data/train.jsonl", "validationSplit": 0.1, "maxEvalSamples": 50}},
    "model": {"model": {"source": "models/other", "task": "sequence-classification"}},
}


def _spec(**changes: Any) -> FineTuneJobSpec:
    return parse_job(minimal_manifest(**(BASE | changes))).spec


@pytest.mark.parametrize("changes", NEUTRAL.values(), ids=NEUTRAL.keys())
def test_fields_acting_after_the_baseline_share_its_key(changes: dict[str, Any]) -> None:
    assert key(_spec(**changes)) == key(_spec())


@pytest.mark.parametrize("changes", DIFFERENT.values(), ids=DIFFERENT.keys())
def test_fields_that_can_change_the_baseline_get_a_key_of_their_own(changes: dict[str, Any]) -> None:
    assert key(_spec(**changes)) != key(_spec())


def test_lora_trials_share_only_with_the_same_adapters() -> None:
    r4, r8 = ({"freezing": {"strategy": "lora", "lora": {"r": r}}} for r in (4, 8))
    assert key(_spec(**r4)) == key(_spec(**r4)) != key(_spec(**r8))


@pytest.fixture(scope="module")
def model_and_split(tmp_path_factory) -> tuple[Path, TokenizedSplit]:
    folder = tmp_path_factory.mktemp("model")
    tiny_bert(2).bert.save_pretrained(folder)  # the pre-trained body; the head is new, drawn from the seed
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 64, size=int(rng.integers(3, 12))) for _ in range(37)]
    return folder, TokenizedSplit(input_ids=ids, labels=rng.integers(0, 3, size=37))


def _baseline(spec: FineTuneJobSpec, folder: Path, split: TokenizedSplit) -> dict[str, float]:
    """What recipe.setup + train compute at step 0: seed, build (freezing applied), evaluate."""
    torch.manual_seed(spec.training.seed)
    built = worker_model.build(spec, str(folder), num_labels=3, pad_token_id=0, steps_per_epoch=10)
    return evaluate(built.module, split, task="sequence-classification", batch_size=spec.training.per_device_batch_size * 2,
                    pad_token_id=0, device=torch.device("cpu"), num_labels=3)


def test_trials_sharing_a_key_evaluate_to_the_same_bits(model_and_split) -> None:
    """The rule's premise, on real evaluations: every neutral variant scores exactly as the base
    (==, not approx), and one that gets a key of its own (the seed) really scores differently."""
    folder, split = model_and_split
    expected = _baseline(_spec(), folder, split)
    for name, changes in NEUTRAL.items():
        assert _baseline(_spec(**changes), folder, split) == expected, name
    assert _baseline(_spec(**DIFFERENT["seed (draws the new head)"]), folder, split) != expected


def test_an_evaluation_draws_no_random_numbers(model_and_split) -> None:
    """A trial that reuses the search's baseline skips the evaluation: its training must start
    from the same generator state as one that evaluated (the same dropout masks)."""
    folder, split = model_and_split
    spec = _spec()
    torch.manual_seed(spec.training.seed)
    built = worker_model.build(spec, str(folder), num_labels=3, pad_token_id=0, steps_per_epoch=10)
    before = torch.get_rng_state()
    evaluate(built.module, split, task="sequence-classification", batch_size=8, pad_token_id=0, device=torch.device("cpu"), num_labels=3)
    assert torch.equal(torch.get_rng_state(), before)
