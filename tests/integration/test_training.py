"""Real Ray Train + real DeepSpeed ZeRO (gloo on CPU) + real transformers models, 2 workers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune_trainer.spec import parse_job

from . import tiny

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _run(tmp_path, doc):
    from finetune_trainer.run import run

    return run(parse_job(doc))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_fine_tune_learns_keeps_frozen_weights_and_reloads(local_ray, tmp_path, stage):
    """The real pre-trained MiniLM (22M parameters): a random tiny body learns too slowly to tell."""
    model_dir = tiny.minilm_dir()
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.sentiment_rows(400))
    doc = tiny.manifest(tmp_path, model_dir, data, deepspeed={"zeroStage": stage},
                        freezing={"strategy": "freezeBottom", "layers": 3}, output={"export": "last"},
                        data={"testSplit": 0.1}, training={"maxSteps": 20, "learningRate": 1e-4},
                        evaluation={"everySteps": 5})
    result = _run(tmp_path, doc)
    r = result.results

    # every evaluation reported, the first one the untouched model; a checkpoint for each after it
    steps = [row["step"] for row in r["history"]]
    assert steps == [0, 5, 10, 15, 20] and r["history"][0]["baseline"]
    status = json.loads((result.run_dir.parent / "status.json").read_text())  # what the operator reads
    assert (status["state"], status["kind"], status["step"], status["totalSteps"]) == ("finished", "single", 20, 20)
    assert status["bestTrial"]["value"] == r["best"]["value"] and status["bestCheckpoint"] == r["best"]["checkpoint"]
    assert len([p for p in result.run_dir.glob("checkpoint_*") if p.is_dir()]) == 4
    # it learned: validation loss fell, accuracy beat chance
    before, after = r["metrics"]["validation"]["baseline"], r["history"][-1]
    assert after["eval_loss"] < before["loss"] - 0.05
    assert after["eval_accuracy"] > 0.7

    # frozen: embeddings and layer 0 bit-identical to the pre-trained weights; layer 1 moved
    tuned = _weights(result.run_dir / "model")
    original = {k: v for k, v in _weights(model_dir).items() if "bert." + k in tuned}  # not buffers
    frozen = [k for k in original if k.startswith("embeddings.") or any(f".layer.{i}." in k for i in range(3))]
    trained = [k for k in original if ".layer.5." in k]
    assert frozen and trained
    for key in frozen:
        assert torch.equal(original[key], tuned["bert." + key]), key
    assert any(not torch.equal(original[k], tuned["bert." + k]) for k in trained)

    # the exported folder reloads as a plain HF model and scores what training reported
    from finetune_trainer.ingest import ingest
    from finetune_trainer.preflight import prepare_job
    from finetune_trainer.scoring import score_models

    job = parse_job(doc)
    prepared = prepare_job(job)
    # the run's validation split again (the ingest is deterministic: tests/integration/test_ingest.py)
    again = ingest(job.spec.data, job.spec.model.task, prepared.tokenizer, job.spec.training.seed)
    rescored = score_models(doc, {"m": str(result.run_dir / "model")}, again.validation, again.label_names,
                            prepared.tokenizer.pad_token_id)
    assert rescored["m"]["loss"] == pytest.approx(after["eval_loss"], rel=1e-4)
    assert (result.run_dir / "model" / "tokenizer.json").exists()
    saved = json.loads((result.run_dir / "results.json").read_text())
    assert saved["metrics"]["test"]["finetuned"]["accuracy"] > 0.7
    assert saved["throughput"]["tokens_per_second"] > 0 and saved["peak_memory_mib"] > 0
    # issue 18's figures: the input pipeline's share of training time, the tokenizing time per split
    assert 0 <= saved["throughput"]["input_wait_share"] < 1
    assert set(saved["data"]["tokenize_seconds"]) == {"train", "validation", "test"}


@pytest.mark.parametrize(("stage", "steps", "moved", "still"), [
    (2, 3, {"top"}, {"layer.1", "layer.0", "embeddings"}),
    (2, 4, {"top", "layer.1"}, {"layer.0", "embeddings"}),
    (3, 4, {"top", "layer.1"}, {"layer.0", "embeddings"}),
])
def test_gradual_unfreezing_opens_blocks_at_their_step(local_ray, tmp_path, stage, steps, moved, still):
    """unfreezeEvery: 3 -> layer.1 opens after step 3 (first update at step 4), layer.0 after step 6."""
    model_dir = tiny.make_model(tmp_path / "model", "bert")
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.sentiment_rows(300))
    doc = tiny.manifest(tmp_path, model_dir, data, deepspeed={"zeroStage": stage},
                        freezing={"strategy": "gradual", "unfreezeEvery": 3},
                        training={"maxSteps": steps, "weightDecay": 0.1}, evaluation={"everySteps": steps},
                        output={"export": "last"})
    result = _run(tmp_path, doc)
    original, tuned = _weights(model_dir), _weights(result.run_dir / "model")

    def block(name: str) -> str:
        if name.startswith("embeddings."):
            return "embeddings"
        if ".layer." in name:
            return "layer." + name.split(".layer.")[1].split(".")[0]
        return "top"

    diffs = {k: (original[k] - tuned["bert." + k]).abs().max().item() for k in original}
    changed = {block(k) for k, d in diffs.items() if d > 0}
    assert moved <= changed | {"top"}  # top = pooler (+ the new head, not in the original)
    assert not (changed & still), f"{changed & still} moved before their unfreeze step"
    assert "layer.1" in moved or "layer.1" not in changed


def test_causal_lm_perplexity_falls(local_ray, tmp_path):
    model_dir = tiny.make_model(tmp_path / "model", "llama")
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.text_rows(300))
    doc = tiny.manifest(tmp_path, model_dir, data, task="causal-lm", training={"maxSteps": 10},
                        evaluation={"everySteps": 5}, freezing={"strategy": "freezeBottom", "layers": 0.5})
    r = _run(tmp_path, doc).results
    before, after = r["metrics"]["validation"]["baseline"], r["metrics"]["validation"]["finetuned"]
    assert after["perplexity"] < before["perplexity"] * 0.5
    assert (r["model"] is not None) and "1 frozen" not in r["freezing"]


def test_early_stopping_ends_the_run_and_says_so(local_ray, tmp_path):
    """minDelta larger than any possible gain: the second trained evaluation exhausts patience 1."""
    model_dir = tiny.make_model(tmp_path / "model", "bert")
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.sentiment_rows(300))
    doc = tiny.manifest(tmp_path, model_dir, data, training={"maxSteps": 20},
                        evaluation={"everySteps": 2, "earlyStopping": {"patience": 1, "minDelta": 10.0}})
    r = _run(tmp_path, doc).results
    assert [row["step"] for row in r["history"]] == [0, 2, 4]
    assert r["early_stopped"] and r["steps"] == 4 and r["total_steps"] == 20
    assert r["model"] is not None  # the best evaluation's model is still exported


def test_more_frozen_layers_than_the_model_has_is_published_as_invalid_before_ray(tmp_path):
    """The operator never sees the model: the trainer's preflight finds this inside the cluster and
    says so in status.json (the operator's Stalled/InvalidSpec), before Ray or any data loading."""
    from finetune_trainer.run import run
    from finetune_trainer.spec import SpecError

    model = tiny.make_model(tmp_path / "model", "bert", layers=2)
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.sentiment_rows(50))
    doc = tiny.manifest(tmp_path, model, data, freezing={"strategy": "freezeBottom", "layers": 5})
    with pytest.raises(SpecError) as err:
        run(parse_job(doc))
    status = json.loads((tmp_path / "runs" / "t" / "status.json").read_text())
    assert (status["state"], status["kind"]) == ("invalid", "single")
    assert [p["path"] for p in status["problems"]] == ["spec.freezing.layers"] == [path for path, _ in err.value.problems]
    assert "5 exceeds the 2 layers" in status["problems"][0]["message"]
    assert [f.name for f in (tmp_path / "runs" / "t").iterdir()] == ["status.json"]  # no run folder: nothing started
