"""`finetune predict` (issue 20, item 4) on runs exported as the driver exports them (model/ with the
tokenizer and class names, or model/adapter/ alone, and results.json with the spec), built from
tiny configs in the test's folder: the numbers printed are the model's own, prompts go through
the run's chat template, and nothing in a model folder runs or is unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_trainer.cli import EXIT_INVALID, main
from finetune_trainer.driver import _label_names_into_config
from finetune_trainer.spec import FineTuneJob
from tests.integration import tiny

LABELS = ["neg", "pos"]
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def _results(tmp: Path, base: Path, task: str, **data: Any) -> dict[str, Any]:
    doc = tiny.manifest(tmp, base, tmp / "train.jsonl", task=task, data=data, evaluation={"samples": {"maxNewTokens": 6}})
    spec = FineTuneJob.model_validate(doc).spec
    return {"config": {"spec": spec.to_manifest()}, "data": {"train_label_counts": {"neg": 5, "pos": 7}} if task != "causal-lm" else {}}


def _write_run(run: Path, results: dict[str, Any]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps(results))
    return run


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    """A full fine-tune of a tiny BERT classifier, exported: model/ with weights, tokenizer, class names."""
    from transformers import AutoModelForSequenceClassification

    tmp = tmp_path_factory.mktemp("cls")
    base = tiny.make_model(tmp / "base", "bert")
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    run = _write_run(tmp / "runs" / "t" / "run-1", _results(tmp, base, "sequence-classification"))
    model.save_pretrained(run / "model")
    tiny.tokenizer().save_pretrained(run / "model")
    _label_names_into_config(run / "model" / "config.json", LABELS)
    return run


def _expected_probs(model, tok, text: str) -> list[float]:
    with torch.no_grad():
        batch = tok(text, truncation=True, max_length=32, return_tensors="pt")
        return torch.softmax(model.eval()(**batch).logits[0], -1).tolist()


def _json_lines(capsys) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_a_classifier_prints_its_class_and_the_models_own_probabilities(classifier_run, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["a great and lovely film", "awful sad day " * 40]  # the second is cut to maxSeqLength 32, as in training
    assert main(["predict", str(classifier_run), "--text", texts[0], "--text", texts[1], "--json"]) == 0
    rows = _json_lines(capsys)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_run / "model")
    tok = AutoTokenizer.from_pretrained(classifier_run / "model")
    assert [r["text"] for r in rows] == texts
    for row, text in zip(rows, texts, strict=True):
        want = _expected_probs(model, tok, text)
        assert list(row["probabilities"]) == LABELS
        assert list(row["probabilities"].values()) == pytest.approx(want, abs=1e-6)
        assert row["label"] == LABELS[max(range(2), key=want.__getitem__)]
    inputs = classifier_run.parent / "inputs.txt"
    inputs.write_text(f"{texts[0]}\n\n{texts[1]}\n")  # one input per line, blank lines skipped
    assert main(["predict", str(classifier_run), "--file", str(inputs), "--json"]) == 0
    assert _json_lines(capsys) == rows
    # the model folder itself works too, and the plain output names the class and each probability
    assert main(["predict", str(classifier_run / "model"), "--text", texts[0]]) == 0
    out = capsys.readouterr().out
    assert f"{rows[0]['label']}  (neg {rows[0]['probabilities']['neg']:.3f}, pos" in out


def test_an_adapter_only_classifier_loads_onto_its_base_through_peft(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from finetune_trainer.adapters import _quiet_peft, wrap
    from finetune_trainer.spec.adapters import LoraSpec

    base = tiny.make_model(tmp_path / "base", "bert")
    torch.manual_seed(2)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=0)
    wrapped = wrap(model, LoraSpec(r=2), "sequence-classification")
    with torch.no_grad():  # a trained adapter: B is zero when PEFT makes it
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    run = _write_run(tmp_path / "run", _results(tmp_path, base, "sequence-classification"))
    with _quiet_peft():
        wrapped.save_pretrained(run / "model" / "adapter")
    tiny.tokenizer().save_pretrained(run / "model" / "adapter")
    assert not (run / "model" / "config.json").exists()

    assert main(["predict", str(run), "--text", "good happy day", "--json"]) == 0
    row = _json_lines(capsys)[0]
    torch.manual_seed(9)  # a different random head: only the adapter's saved head can make the numbers agree
    with _quiet_peft():
        again = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=0),
                                          run / "model" / "adapter")
    assert list(row["probabilities"].values()) == pytest.approx(_expected_probs(again, tiny.tokenizer(), "good happy day"), abs=1e-6)
    assert list(row["probabilities"]) == LABELS

    results = json.loads((run / "results.json").read_text())
    results["config"]["spec"]["model"]["source"] = str(tmp_path / "gone")
    (run / "results.json").write_text(json.dumps(results))
    assert main(["predict", str(run), "--text", "x"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "base model" in err and "--base" in err
    assert main(["predict", str(run), "--text", "good happy day", "--base", str(base), "--json"]) == 0
    assert _json_lines(capsys)[0]["probabilities"] == pytest.approx(row["probabilities"])


def test_a_causal_lm_generates_from_the_runs_chat_template_with_its_settings(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = tiny.make_model(tmp_path / "base", "llama")
    run = _write_run(tmp_path / "run", _results(tmp_path, base, "causal-lm", promptField="q", completionField="a", chatTemplate=TEMPLATE))
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(run / "model")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "model")

    assert main(["predict", str(run), "--text", "what is two", "--json"]) == 0
    row = _json_lines(capsys)[0]
    tok = AutoTokenizer.from_pretrained(run / "model")
    prompt = "[user] what is two [assistant] "  # the spec's template with the generation prompt
    assert row["prompt"] == tok.decode(tok(prompt, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, ids.shape[1]:]
    assert row["completion"] == tok.decode(want, skip_special_tokens=True)  # the run's samples.maxNewTokens: 6
    assert len(want) == 6

    assert main(["predict", str(run), "--text", "what is two", "--max-new-tokens", "2", "--json"]) == 0
    assert len(tok(_json_lines(capsys)[0]["completion"], add_special_tokens=False)["input_ids"]) <= 2
    assert main(["predict", str(run), "--text", "two " * 40]) == EXIT_INVALID  # above the run's maxSeqLength 32
    assert "above the run's data.maxSeqLength 32" in capsys.readouterr().err


def test_pickled_weights_and_the_models_own_code_are_refused(classifier_run, tmp_path, capsys):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(classifier_run / "model", pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert main(["predict", str(pickled), "--text", "x"]) == EXIT_INVALID
    assert "no *.safetensors weights (pickled .bin weights are never loaded)" in capsys.readouterr().err

    remote = tmp_path / "remote"
    shutil.copytree(classifier_run / "model", remote)
    marker = tmp_path / "ran"
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import BertConfig as EvilConfig\n")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilConfig"}
    (remote / "config.json").write_text(json.dumps(config))
    # a known model_type: transformers' own class, the folder's code not run, and the user told so
    assert main(["predict", str(remote), "--text", "x"]) == 0
    assert "ships its own code (auto_map), which is not run" in capsys.readouterr().err
    assert not marker.exists()
    # a type only the folder's code knows: refused, naming the flag
    config["model_type"] = "evil-bert"
    (remote / "config.json").write_text(json.dumps(config))
    assert main(["predict", str(remote), "--text", "x"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and "Traceback" not in err, err
    assert not marker.exists()


def test_wrong_targets_and_inputs_get_one_line_naming_the_fix(classifier_run, tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    empty_run = _write_run(tmp_path / "noexport", {"config": {}})
    long_text = "x" * 40_000
    lines = tmp_path / "many.txt"
    lines.write_text("hi\n" * 300)
    cases = [
        ([str(tmp_path / "missing"), "--text", "x"], "no such folder; give a run's folder"),
        ([str(binary), "--text", "x"], "is a file, not a folder"),
        ([str(empty_run), "--text", "x"], "the run exported no model"),
        ([str(tmp_path), "--text", "x"], "no model in"),
        ([str(classifier_run), "--file", str(binary)], "not a text file (binary, or not UTF-8)"),
        ([str(classifier_run), "--file", str(tmp_path / "nope.txt")], "--file"),
        ([str(classifier_run), "--file", str(lines)], "300 inputs, above 256"),
        ([str(classifier_run), "--text", long_text], "40000 characters, above"),
    ]
    for argv, message in cases:
        assert main(["predict", *argv]) == EXIT_INVALID, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
