"""The FineTuneJob CRD: generated from the spec, structural (so the API server takes it), in
agreement with the spec about what is valid, and the chart's copy is the generated one."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from finetune_operator.crd import CHART_CRD_PATH, REGENERATE, SchemaError, build_crd, openapi_schema
from finetune_operator.status_model import (
    ALLOWED_TRANSITIONS,
    BestTrial,
    Condition,
    FineTuneJobStatus,
    Phase,
    TrialCounts,
    can_transition,
)
from finetune_trainer.spec import TrainingSpec, load_document, parse_job
from tests.kube_emulator.schema import admit, structural_problems
from tests.tiny_models import minimal_manifest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))
CRD = build_crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


def _walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}" if path else name)
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.*")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")


NODES = dict(_walk(SCHEMA))


def errors(document: dict[str, Any]) -> list[str]:
    """What the API server says to `kubectl apply` of `document` under this CRD: the emulator's
    admission (tests/kube_emulator/schema.py), unknown fields refused as kubectl's strict
    field validation refuses them."""
    _, unknown, causes = admit(document, SCHEMA)
    return [f"{path}: unknown field" for path in unknown] + [f"{path}: {message}" for path, message in causes]


# --- identity ------------------------------------------------------------------------------


def test_names_scope_and_version():
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert (spec["group"], spec["scope"]) == ("finetune.dev", "Namespaced")
    assert spec["names"] == {"kind": "FineTuneJob", "listKind": "FineTuneJobList", "plural": "finetunejobs",
                             "singular": "finetunejob", "shortNames": ["ftj"], "categories": ["finetune", "ml"]}
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [("v1alpha1", True, True)]
    assert VERSION["subresources"] == {"status": {}}


def test_printer_columns():
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert [c["name"] for c in VERSION["additionalPrinterColumns"] if "priority" not in c] == ["Phase", "Best", "Trials", "Age"]
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert (columns["Best"]["jsonPath"], columns["Best"]["type"]) == (".status.bestTrial.value", "number")
    assert (columns["Strategy"]["jsonPath"], columns["Strategy"]["priority"]) == (".status.bestTrial.strategy", 1)  # -o wide
    assert columns["Trials"]["jsonPath"] == ".status.trialsDone"
    assert (columns["Age"]["jsonPath"], columns["Age"]["type"]) == (".metadata.creationTimestamp", "date")
    for column in columns.values():  # every column points at a field the schema has
        if column["jsonPath"].startswith(".status"):
            assert column["jsonPath"][1:] in NODES, column


# --- structural --------------------------------------------------------------------------


def test_the_generated_schema_is_structural():
    assert structural_problems(SCHEMA) == []


def test_no_refs_no_null_unions_no_pydantic_leftovers():
    text = yaml.safe_dump(SCHEMA)
    for word in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "type: 'null'", "title:", "const:"):
        assert word not in text, word


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "object", "properties": {"a": {"description": "no type"}}}, "non-empty type"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}, "$ref"),
        ({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}},
                                                 "additionalProperties": {"type": "string"}}}}, "mutually exclusive"),
        ({"type": "object", "properties": {"a": {"type": "object", "additionalProperties": False}}}, "not a boolean"),
        ({"type": "object", "properties": {"a": {"type": "null"}}}, "is not one of"),
        ({"type": "object", "properties": {"a": {"type": "string", "anyOf": [{"type": "string"}, {"type": "integer"}]}}},
         "type is not allowed inside anyOf"),
        ({"type": "object", "properties": {"a": {"type": "object", "anyOf": [{"properties": {"b": {"type": "string"}}}]}}},
         "must also be specified outside"),
        ({"type": "object", "properties": {"metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}}},
         "only metadata.name"),
        ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 1, "default": 0}}},
         "should be greater than or equal to 1"),
        ({"type": "object", "properties": {"a": {"type": "string", "enum": ["x"], "default": "y"}}}, "Unsupported value"),
        ({"type": "object", "properties": {"a": {"type": "string", "default": None}}}, "not nullable"),
        ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True, "items": {"type": "string"}}}},
         "uniqueItems"),
        ({"type": "object", "properties": {"a": {"type": "string", "x-kubernetes-preserve-unknown-fields": False}}},
         "must be true"),
        ({"type": "object", "properties": {"a": {"type": "integer", "x-kubernetes-int-or-string": True}}},
         "must not set a type"),
        ({"type": "string"}, "root must be type: object"),
    ],
)
def test_the_structural_checker_catches_each_rule(schema, words):
    found = structural_problems(schema)
    assert any(words in f for f in found), found


def test_the_int_or_string_forms_are_structural():
    schema = {"type": "object", "properties": {
        "a": {"x-kubernetes-int-or-string": True},
        "b": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
    }}
    assert structural_problems(schema) == []


# --- faithful to the spec --------------------------------------------------------------------


def test_descriptions_bounds_enums_and_defaults_carry_over():
    rate = NODES["spec.training.learningRate"]
    assert rate["description"] == TrainingSpec.model_fields["learning_rate"].description
    assert (rate["type"], rate["minimum"], rate["exclusiveMinimum"], rate["maximum"], rate["default"]) == ("number", 0, True, 1, 5e-05)
    assert NODES["spec.deepspeed.zeroStage"] == {**NODES["spec.deepspeed.zeroStage"], "enum": [0, 1, 2, 3], "type": "integer", "default": 2}
    assert NODES["spec.model.task"]["enum"] == ["causal-lm", "sequence-classification"]
    assert NODES["spec.training.maxSteps"]["nullable"] is True and "default" not in NODES["spec.training.maxSteps"]
    assert NODES["spec.cluster.workers.memory"]["pattern"].startswith("^[0-9]")
    assert NODES["spec"]["required"] == ["model", "data"]


def test_unions_become_their_structural_forms():
    assert NODES["spec.freezing.unfreezeEvery"] == {
        "x-kubernetes-int-or-string": True, "nullable": True, "description": NODES["spec.freezing.unfreezeEvery"]["description"],
    }
    assert (NODES["spec.freezing.layers"]["type"], NODES["spec.freezing.layers"]["minimum"]) == ("number", 0)


def test_a_presence_sensitive_field_gets_no_default():
    assert "default" not in NODES["spec.evaluation.everySteps"]


FREE_FORM = {
    "spec.deepspeed.config",  # the raw DeepSpeed config, for experts
    "spec.lrSchedule.options",  # keyword arguments of reduce_lr_on_plateau / greedy
    "spec.data.train", "spec.data.validation", "spec.data.test",  # `path` or {path, format, ...}: checked by the operator
    "spec.evaluation.reference.data",  # the same DataSource shorthand as spec.data.train
    "status.bestTrial.params",  # a trial's sampled settings
    "spec.search.space.*.choice[]", "spec.search.space.*.grid[]",  # the values a categorical search dimension takes
}


def test_unknown_fields_are_preserved_only_where_free_form_is_meant():
    preserved = {path for path, node in NODES.items() if node.get("x-kubernetes-preserve-unknown-fields")}
    assert preserved <= FREE_FORM, f"new free-form field(s) {sorted(preserved - FREE_FORM)}: intended? add them to FREE_FORM"
    assert {"spec.deepspeed.config", "spec.lrSchedule.options", "spec.data.train", "status.bestTrial.params"} <= preserved


def test_a_union_without_a_structural_form_raises_naming_the_field():
    class Odd(BaseModel):
        value: int | list[str]

    with pytest.raises(SchemaError, match=r"odd\.value"):
        openapi_schema(Odd, "odd")


MANIFESTS = [pytest.param(load_document(p), id=p.name) for p in EXAMPLES] + [
    pytest.param(minimal_manifest(), id="minimal"),
    # evaluation.everySteps (default 50) is judged against maxSteps only when written
    pytest.param(minimal_manifest(training={"maxSteps": 10}, evaluation={"metric": "loss"}), id="short-run"),
    pytest.param(minimal_manifest(cluster={"workers": {"memory": "8Gi"}}, runPolicy={"suspend": True}), id="cluster"),
]


@pytest.mark.parametrize("document", MANIFESTS)
def test_what_the_spec_accepts_the_crd_accepts(document):
    assert errors(document) == []


@pytest.mark.parametrize("document", MANIFESTS)
def test_api_server_defaulting_does_not_change_the_job(document):
    """The API server fills defaults before the operator reads the object: the job must mean the same."""
    defaulted, unknown, causes = admit(document, SCHEMA)
    assert (unknown, causes) == ([], [])
    assert defaulted != document  # the server filled defaults in: there is something to compare
    assert parse_job(defaulted).model_dump() == parse_job(document).model_dump()


@pytest.mark.parametrize(
    ("path", "value"),
    [("foo", 1), ("training.foo", 1), ("cluster.workers.bogus", 1), ("training.learningRate", "fast"),
     ("model.task", "translation"), ("cluster.workers.memory", "8GB"), ("deepspeed.zeroStage", 4), ("training.learningRate", 0)],
)
def test_the_crd_rejects_what_the_api_server_would(path, value):
    document = minimal_manifest()
    node = document["spec"]
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    assert errors(document), f"spec.{path}: {value!r} passed the CRD schema"


def test_status_validates_against_the_crd():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    status = FineTuneJobStatus(
        phase=Phase.RUNNING, observed_generation=2, ray_job_name="quickstart-ray", dashboard_url="http://x:8265",
        conditions=[Condition(type="Ready", status="False", reason="Training", message="2 of 6 trials done", last_transition_time=now)],
        trials=TrialCounts(total=6, completed=1, stopped=1, running=2), trials_done="2/6", start_time=now,
        best_trial=BestTrial(name="t1", metric="accuracy", value=0.91, params={"lr": 1e-4, "freezing": {"strategy": "gradual"}}),
    )
    patch = status.to_patch()
    assert patch["dashboardURL"] == "http://x:8265" and patch["trialsDone"] == "2/6"
    assert errors({**minimal_manifest(), "status": patch}) == []
    assert FineTuneJobStatus.model_validate(patch) == status
    assert errors({**minimal_manifest(), "status": {**patch, "phase": "Exploding"}})


# --- status model --------------------------------------------------------------------------


def test_trials_done_text():
    assert TrialCounts(total=6, completed=2, stopped=1, failed=0, running=3).done_text() == "3/6"


def test_phase_transitions():
    assert set(ALLOWED_TRANSITIONS) == set(Phase)
    assert {p for p in Phase if p.is_terminal()} == {Phase.SUCCEEDED, Phase.FAILED}
    assert can_transition(None, Phase.FAILED) and can_transition(Phase.RUNNING, Phase.RUNNING)
    assert can_transition(Phase.PENDING, Phase.RUNNING)
    assert not can_transition(Phase.SUCCEEDED, Phase.RUNNING)
    assert not can_transition(Phase.SUSPENDED, Phase.SUCCEEDED)


# --- the chart's copy ------------------------------------------------------------------------


def test_the_chart_crd_is_the_generated_one():
    path = REPO / CHART_CRD_PATH
    assert path.exists(), f"{CHART_CRD_PATH} is missing; run: {REGENERATE}"
    assert yaml.safe_load(path.read_text()) == CRD, f"{CHART_CRD_PATH} is stale; run: {REGENERATE}"
