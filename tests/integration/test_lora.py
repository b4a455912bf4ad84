"""LoRA-family adapters end to end: real Ray Train, real DeepSpeed ZeRO 0, 2 and 3 (gloo on CPU),
real PEFT on tiny transformers models. One run per stage; the stage-3 run is also the reference of
a run resumed from its middle checkpoint, which must end with the same adapter.

Each run checks what its checkpoints hold (only the adapters and their optimizer state, a small
fraction of the model) and what it exports (the adapter in PEFT's format; by default the merged
model, which AutoModelFor*.from_pretrained loads alone and which computes what base + adapter do)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_trainer.spec import parse_job

from . import tiny

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300),
              # PEFT 0.21's PeftModel reads transformers 5's deprecated is_gradient_checkpointing (adapters._quiet_peft)
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def _run(doc: dict, **kwargs):
    from finetune_trainer.run import run

    return run(parse_job(doc), **kwargs)


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _check_checkpoints_hold_only_adapters(run_dir: Path, weights: Path, results: dict) -> None:
    """DeepSpeed's module state of every checkpoint names adapter (and head) tensors only, and a
    checkpoint is a small fraction of the model's weights alone (a full fine-tuning checkpoint holds
    those weights plus, in fp32 training, three optimizer tensors per weight)."""
    from finetune_trainer.deepspeed_load import weights_only_load

    model_bytes = sum(t.numel() * t.element_size() for t in load_file(str(weights)).values())
    row = results["history"][-1]
    assert 0 < row["trainable_params"] < 0.02 * row["total_params"]
    for checkpoint in _checkpoints(run_dir):
        states = list(checkpoint.glob("deepspeed/state/*mp_rank_00_model_states.pt"))  # ZeRO-3: one per rank
        assert states
        for file in states:
            module = weights_only_load(str(file), map_location="cpu")["module"]
            params = [k for k in module if k.endswith((".weight", ".bias"))]  # not buffers (position ids)
            assert params and all("lora_" in k or "modules_to_save" in k for k in params), params[:5]
        size = _bytes(checkpoint)
        assert size < 0.1 * model_bytes, (checkpoint.name, size, model_bytes)
    print(f"checkpoint {size} bytes; the model's weights alone {model_bytes} bytes ({size / model_bytes:.1%})")


def _causal(tmp: Path, *, tied: bool = False, **sections) -> dict:
    model = tiny.make_model(tmp / "model", "llama", layers=2, tied=tied)
    data = tiny.write_jsonl(tmp / "train.jsonl", tiny.text_rows(240))
    return tiny.manifest(tmp, model, data, task="causal-lm", data={"testSplit": 0.1},
                         training={"maxSteps": 8, "learningRate": 2e-2}, **sections)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("stage", [0, 2])
def test_lora_trains_exports_and_scores_under_zero(local_ray, tmp_path, stage, capsys):
    """Stage 0: causal-lm with tied embeddings, rsLoRA on the top block only, merged export. Stage 2: classification of
    the real pre-trained MiniLM (a random tiny body learns too slowly to tell), where the new head
    trains whole (modules_to_save), adapter-only export scored through PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if stage == 0:
        # tied embeddings, as SmolLM2 has: the frozen head is the embeddings under a second name,
        # which must not be saved either (checkpoint_files._without_frozen)
        doc = _causal(tmp_path, tied=True, freezing={"strategy": "lora", "lora": {"r": 4, "useRslora": True, "layers": 1}},
                      deepspeed={"zeroStage": 0})
    else:
        data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.sentiment_rows(300))
        doc = tiny.manifest(tmp_path, tiny.minilm_dir(), data, data={"testSplit": 0.1}, training={"maxSteps": 12, "learningRate": 5e-3},
                            freezing={"strategy": "lora"}, output={"mergeAdapter": False})
    result = _run(doc)
    r, run_dir = result.results, result.run_dir
    exported, adapter = run_dir / "model", run_dir / "model" / "adapter"
    before, after = r["metrics"]["validation"]["baseline"], r["metrics"]["validation"]["finetuned"]
    assert after["loss"] < before["loss"] - 0.05, (before, after)
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["adapter"] == str(adapter) and saved["adapter_merged"] is (stage == 0)
    assert saved["metrics"]["test"]["finetuned"]["loss"] < saved["metrics"]["test"]["baseline"]["loss"]
    adapter_weights = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())

    if stage == 0:  # layers: 1 -> adapters on the top block alone; the merged model = base + adapter
        assert config["use_rslora"] and config["layers_to_transform"] == [1] and config["task_type"] == "CAUSAL_LM"
        assert adapter_weights and all(".layers.1." in k for k in adapter_weights)
        _check_checkpoints_hold_only_adapters(run_dir, exported / "model.safetensors", r)
        merged = AutoModelForCausalLM.from_pretrained(exported)
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
        original, tuned = base.state_dict(), merged.state_dict()
        changed = {k for k in original if not torch.equal(original[k], tuned[k])}
        assert changed and all(".layers.1." in k and "proj" in k for k in changed), changed
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), adapter)
        ids = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523, 102]])
        assert torch.allclose(_logits(merged, ids), _logits(peft, ids), atol=1e-5)
        _check_predict_generates_as_the_merged_model(run_dir, merged, capsys)
    else:  # the head trained whole; no merged model, the adapter scored on the base through PEFT
        assert not (exported / "config.json").exists() and (adapter / "tokenizer.json").exists()
        assert {k for k in adapter_weights if "classifier" in k} == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
        assert config["modules_to_save"] and "classifier" in config["modules_to_save"]
        assert after["accuracy"] > 0.7
        _check_classes_and_predict(run_dir, saved, capsys)
        _check_checkpoints_hold_only_adapters(run_dir, tiny.minilm_dir() / "model.safetensors", r)


def test_lora_under_zero3_resumes_to_the_same_adapter_and_exports_gathered(local_ray, tmp_path):
    """DoRA under ZeRO-3: an uninterrupted run, then a run resumed from its step-4 checkpoint (the
    base loaded from the pre-trained source, the adapters and their optimizer state from the
    checkpoint) ends with the same adapter and final evaluation; the export gathers the shards."""
    from transformers import AutoModelForCausalLM

    doc = _causal(tmp_path, freezing={"strategy": "lora", "lora": {"useDora": True}}, deepspeed={"zeroStage": 3},
                  evaluation={"everySteps": 4}, output={"export": "last"})
    reference = _run(doc)
    ref_dir = reference.run_dir
    _check_checkpoints_hold_only_adapters(ref_dir, ref_dir / "model" / "model.safetensors", reference.results)
    # interrupted after step 4: its later checkpoints never written, the run resumed from the latest
    later = [c for c in _checkpoints(ref_dir) if json.loads((c / "trainer_state.json").read_text())["step"] > 4]
    assert later and len(_checkpoints(ref_dir)) == len(later) + 1
    for checkpoint in later:
        shutil.rmtree(checkpoint)

    resumed = _run(doc, resume="latest")
    assert resumed.results["history"][-1]["resumed_from_step"] == 4
    ours = load_file(str(resumed.run_dir / "model" / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(ref_dir / "model" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and any("lora_magnitude_vector" in k for k in ours)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    print(f"largest adapter difference from the uninterrupted run: {worst:.2e}")
    assert worst == 0.0
    assert resumed.results["history"][-1]["eval_loss"] == reference.results["history"][-1]["eval_loss"]

    # gathered under ZeRO-3: full tensors in the adapter, and a merged model that loads alone
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    q = base.model.layers[0].self_attn.q_proj.weight
    a = next(v for k, v in theirs.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    assert a.shape == (8, q.shape[1])
    merged = AutoModelForCausalLM.from_pretrained(ref_dir / "model")
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, q)


def _predict_json(capsys, *argv: str) -> list[dict]:
    from finetune_trainer.cli import main

    capsys.readouterr()
    assert main(["predict", *argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def _check_predict_generates_as_the_merged_model(run_dir: Path, merged, capsys) -> None:
    """`finetune predict` on this run (format text: the prompt is the plain text) writes what the
    exported model's own greedy decoding writes, with the samples default of 64 new tokens."""
    from transformers import AutoTokenizer, GenerationConfig

    row = _predict_json(capsys, str(run_dir), "--text", "the cat sat on")[0]
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    ids = torch.tensor([tok("the cat sat on")["input_ids"][:-1]])  # the prompt goes on: no trailing [SEP] (EOS here)
    config = GenerationConfig(max_new_tokens=64, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        want = merged.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, ids.shape[1]:]
    assert row["completion"] == tok.decode(want, skip_special_tokens=True) and row["completion"].strip()


def _check_classes_and_predict(run_dir: Path, saved: dict, capsys) -> None:
    """results.json's classes agree with the run's own metrics, the plot exists, and predict (an
    adapter-only export, loaded onto MiniLM through PEFT) calls the obvious texts right."""
    classes = saved["classes"]
    validation, finetuned = classes["validation"], saved["metrics"]["validation"]["finetuned"]
    assert validation["step"] == saved["best"]["step"] and validation["labels"] == list(saved["data"]["train_label_counts"])
    assert sum(map(sum, validation["confusion"])) == saved["data"]["rows"]["validation"]
    assert validation["macro_f1"] == pytest.approx(finetuned["f1"]) and validation["accuracy"] == pytest.approx(finetuned["accuracy"])
    test = classes["test"]["finetuned"]
    assert test["accuracy"] == pytest.approx(saved["metrics"]["test"]["finetuned"]["accuracy"])
    assert "confusion" not in saved["metrics"]["test"]["finetuned"] and all("confusion" not in r for r in saved["history"])
    assert Path(classes["plot"]).is_file()
    rows = _predict_json(capsys, str(run_dir), "--text", "it was a great lovely day", "--text", "the film was awful and sad")
    assert [r["label"] for r in rows] == ["pos", "neg"] and all(max(r["probabilities"].values()) > 0.5 for r in rows)
