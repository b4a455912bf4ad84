"""spec.tracking without a server: what the spec refuses in a tracking URI and names, the spec as
MLflow parameters within MLflow's limits, and the TensorBoard event files read back with
TensorBoard's own reader. The MLflow server side is tests/integration/test_tracking.py."""

from __future__ import annotations

import json

import pytest

from finetune_trainer.spec import SpecError, parse_job
from finetune_trainer.tensorboard_events import EventWriter, row_metrics
from finetune_trainer.tracking import TRUNCATED, params_of


def _job(tracking: dict, **spec) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"},
            "spec": {"model": {"source": "/m", "task": "sequence-classification"}, "data": {"train": "/d.jsonl", "validationSplit": 0.1},
                     "tracking": tracking, **spec}}


@pytest.mark.parametrize(("uri", "says"), [
    ("https://alice:s3cret@mlflow.example.com", "user name or password"),
    ("https://alice@mlflow.example.com", "user name or password"),
    ("https://mlflow.example.com/?token=abc", "query"),
    ("http://mlflow.example.com/#frag", "query or fragment"),
    ("file:///var/lib/kubelet", "http:// or https://"),
    ("/mnt/shared/mlruns", "http:// or https://"),
    ("sqlite:///mlflow.db", "http:// or https://"),
    ("databricks", "http:// or https://"),
    ("http://mlflow.example.com\r\nX-Injected: 1", "control characters"),
    ("http://:5000", "host"),
    ("http://mlflow.example.com:99999", "port"),
])
def test_tracking_uri_refused_with_the_field_named(uri, says):
    with pytest.raises(SpecError) as err:
        parse_job(_job({"mlflow": {"trackingUri": uri}}), for_cluster=True)
    assert [path for path, _ in err.value.problems] == ["spec.tracking.mlflow.trackingUri"]
    assert says in err.value.problems[0][1]
    assert "s3cret" not in err.value.render()  # the refusal does not repeat the password it found


def test_tracking_accepts_servers_and_names():
    job = parse_job(_job({"mlflow": {"trackingUri": "https://mlflow.mlflow.svc:5000/", "experiment": "team-a/sentiment",
                                     "runName": "nightly 3", "registeredModelName": "sentiment-minilm.v2"},
                          "tensorboard": True}), for_cluster=True)
    assert job.spec.tracking.mlflow is not None
    assert job.spec.tracking.mlflow.tracking_uri == "https://mlflow.mlflow.svc:5000"
    assert job.spec.tracking.tensorboard
    assert parse_job(_job({"mlflow": {"trackingUri": "http://[::1]:5000"}})).spec.tracking.mlflow is not None


@pytest.mark.parametrize(("mlflow", "field"), [
    ({"trackingUri": "http://h", "registeredModelName": "team/model"}, "registeredModelName"),
    ({"trackingUri": "http://h", "registeredModelName": "models:/x"}, "registeredModelName"),
    ({"trackingUri": "http://h", "experiment": "a\x00b"}, "experiment"),
    ({"trackingUri": "http://h", "runName": "x" * 251}, "runName"),
    ({"trackingUri": "http://h", "password": "p"}, "password"),
])
def test_tracking_names_refused(mlflow, field):
    with pytest.raises(SpecError) as err:
        parse_job(_job({"mlflow": mlflow}))
    assert [path for path, _ in err.value.problems] == [f"spec.tracking.mlflow.{field}"]


def test_params_flatten_the_spec_within_mlflow_limits():
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

    manifest = {"training": {"learningRate": 1e-4, "maxSteps": 10}, "evaluation": {"metrics": ["accuracy", "f1"]},
                "deepspeed": {"config": {"long": "x" * 10_000, "odd key[0]!": 1, "k" * 300: 2, "empty": {}}}}
    params = params_of(manifest)
    assert params["training.learningRate"] == "0.0001" and params["training.maxSteps"] == "10"
    assert json.loads(params["evaluation.metrics"]) == ["accuracy", "f1"]
    assert len(params["deepspeed.config.long"]) == MAX_PARAM_VAL_LENGTH and params["deepspeed.config.long"].endswith(TRUNCATED)
    assert params["deepspeed.config.odd key_0__"] == "1"  # brackets and '!' are not MLflow key characters
    assert all(len(k) <= MAX_ENTITY_KEY_LENGTH for k in params)
    assert params["deepspeed.config.empty"] == "{}"


def test_row_metrics_are_the_measurements_only():
    row = {"step": 4, "epoch": 0.5, "eval_loss": 0.7, "eval_accuracy": 1, "train_loss": float("nan"), "baseline": False,
           "has_model": True, "best_step": 4, "best_eval_loss": 0.7, "training.learningRate": 1e-3, "trial": "trial_00",
           "tokens_per_second": 1234.5, "precision": "fp32", "non_finite": {"step": 3}}
    assert row_metrics(row) == {"epoch": 0.5, "eval_loss": 0.7, "eval_accuracy": 1.0, "tokens_per_second": 1234.5}


def test_event_files_read_back_with_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = EventWriter(tmp_path)
    rows = [{"step": 0, "baseline": True, "eval_loss": 1.1}, {"step": 4, "eval_loss": 0.9, "train_loss": 1.0},
            {"trial": "trial_01", "step": 4, "eval_loss": 0.5}]
    writer.write(rows)
    writer.write([*rows, {"step": 8, "eval_loss": 0.8, "tokens_per_second": 900.0}])  # each row once
    writer.close()
    run = EventAccumulator(str(tmp_path / "tensorboard"))
    run.Reload()
    assert [(s.step, round(s.value, 4)) for s in run.Scalars("eval/loss")] == [(0, 1.1), (4, 0.9), (8, 0.8)]
    assert [s.step for s in run.Scalars("train/loss")] == [4]
    assert [s.value for s in run.Scalars("tokens_per_second")] == [900.0]
    trial = EventAccumulator(str(tmp_path / "tensorboard" / "trial_01"))
    trial.Reload()
    assert [(s.step, s.value) for s in trial.Scalars("eval/loss")] == [(4, 0.5)]
