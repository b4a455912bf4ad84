"""spec.tracking against a real MLflow tracking server (`mlflow server`, SQLite backend, proxied
local artifact root) started once for the session on loopback, read back through MlflowClient;
TensorBoard's event files read back with TensorBoard's own reader.

One tiny real run (Ray Train + DeepSpeed, 2 workers) checks everything a run logs; the logger's
search shape (parent and nested runs), MLflow's batch and length limits and a dead server are
checked on the same server without Ray."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from finetune_trainer.spec import parse_job

from . import tiny
from .fault_kit import storage_of

pytestmark = [pytest.mark.timeout(300)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback: SQLite for runs and the registry, artifacts served by the server
    itself (the client uploads over HTTP, as a trainer pod does)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
               "--artifacts-destination", str(root / "artifacts")]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    log.close()


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.integration
def test_single_run_in_mlflow_and_tensorboard(local_ray, mlflow_server, s3_spec, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune_trainer.run import run
    from finetune_trainer.storage import job_location

    model = tiny.make_model(tmp_path / "model", "bert", layers=2)
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.sentiment_rows(120))
    doc = tiny.manifest(tmp_path, model, data, training={"maxSteps": 6}, evaluation={"everySteps": 3},
                        data={"testSplit": 0.1}, resources={"workers": 2, "cpusPerWorker": 0.5})
    doc["spec"]["tracking"] = {"mlflow": {"trackingUri": mlflow_server, "experiment": "tracking-test",
                                          "registeredModelName": "tiny-sentiment"}, "tensorboard": True}
    doc["spec"]["storage"], store, _ = storage_of(s3_spec, monkeypatch)  # the event files also go to the run's S3 prefix
    job = parse_job(doc)
    result = run(job)
    r = result.results
    client = _client(mlflow_server)
    experiment = client.get_experiment_by_name("tracking-test")
    [found] = client.search_runs([experiment.experiment_id], f"tags.`finetune.run` = '{r['run']}'")
    assert found.info.status == "FINISHED" and found.info.run_name == r["run"]
    # the resolved spec, flattened
    params = found.data.params
    assert params["training.learningRate"] == "0.005" and params["model.task"] == "sequence-classification"
    assert params["tracking.mlflow.registeredModelName"] == "tiny-sentiment"
    # every evaluation by step, the baseline at 0, as results.json has them
    expected = [(row["step"], pytest.approx(row["eval_loss"])) for row in r["history"]]
    assert _history(client, found.info.run_id, "eval_loss") == expected
    assert [s for s, _ in expected] == [0, 3, 6]
    assert _history(client, found.info.run_id, "eval_accuracy")[-1][1] == pytest.approx(r["history"][-1]["eval_accuracy"])
    assert found.data.metrics["tokens_per_second"] == pytest.approx(r["throughput"]["tokens_per_second"])
    assert found.data.metrics["test_accuracy"] == pytest.approx(r["metrics"]["test"]["finetuned"]["accuracy"])
    assert found.data.tags["best_checkpoint"] == r["best"]["checkpoint"]
    # results.json and the event files as artifacts, the exported model registered from the run's artifact
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"results.json", "tensorboard", "model"} <= artifacts
    logged = json.loads(Path(client.download_artifacts(found.info.run_id, "results.json", str(tmp_path))).read_text())
    assert logged["best"] == r["best"]
    [version] = client.search_model_versions("name='tiny-sentiment'")
    assert version.run_id == found.info.run_id and version.source.endswith("/model")
    model_files = {Path(a.path).name for a in client.list_artifacts(found.info.run_id, "model")}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= model_files
    # TensorBoard: the same curve under the run folder
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert [(s.step, pytest.approx(s.value)) for s in events.Scalars("eval/loss")] == expected
    # ...and the same files under the run's S3 prefix, where a TensorBoard pointed at the bucket reads them
    prefix = f"{job_location(job.spec.storage, job.metadata.namespace, job.name).key}/{r['run']}/tensorboard/"
    uploaded = {key: store.read(key) for key in store.list(prefix)}
    assert uploaded and all(Path(key).name.startswith("events.out.tfevents.") for key in uploaded), sorted(uploaded)
    copy = tmp_path / "from-s3"
    for key, data in uploaded.items():
        (copy / key[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
        (copy / key[len(prefix):]).write_bytes(data or b"")
    events = EventAccumulator(str(copy))
    events.Reload()
    assert [(s.step, pytest.approx(s.value)) for s in events.Scalars("eval/loss")] == expected


def test_search_shape_limits_and_a_dead_server(mlflow_server, tmp_path):
    """The logger on its own (no Ray): a search is a parent run with a nested run per trial (also
    those only results.json knows, as after a restored search), a second attempt of the run goes
    on in the same MLflow run without logging a step twice, a spec of more than one batch of
    parameters with an over-long value, and a server that does not answer: one line, in seconds."""
    from finetune_trainer.tracking import TRUNCATED, MlflowRun, Tracking, TrackingError

    doc = tiny.manifest(tmp_path, tmp_path / "m", tmp_path / "d.jsonl", search={
        "numTrials": 2, "space": {"training.learningRate": {"choice": [1e-4, 1e-3]}}})
    doc["spec"]["deepspeed"]["config"] = {f"k{i}": i for i in range(150)} | {"long": "v" * 7000}
    doc["spec"]["tracking"] = {"mlflow": {"trackingUri": mlflow_server}, "tensorboard": True}
    job = parse_job(doc)
    live = [{"trial": "trial_00", "step": 0, "baseline": True, "eval_loss": 1.0},
            {"trial": "trial_00", "step": 3, "eval_loss": 0.8, "tokens_per_second": 500.0},
            {"trial": "trial_00", "event": "started"}]
    tracking = Tracking.open(job, "run-1", tmp_path / "run-1")
    tracking.listener({}, live)
    tracking.listener({}, live)  # polled again: nothing twice
    # a new attempt of the same run (the driver restarted): the same MLflow run, the rows sent once
    again = Tracking.open(job, "run-1", tmp_path / "run-1")
    assert again.mlflow is not None and tracking.mlflow is not None and again.mlflow.parent == tracking.mlflow.parent
    (tmp_path / "run-1").mkdir(exist_ok=True)
    (tmp_path / "run-1" / "results.json").write_text("{}")
    results = {"kind": "search", "best": {"trial": "trial_01", "metric": "eval_loss", "value": 0.5, "step": 6,
                                          "checkpoint": "s3://b/t/run-1/trials/trial_01/ckpt"},
               "trials": [{"trial": "trial_00", "params": {"training.learningRate": 1e-4}, "status": "stopped by scheduler",
                           "checkpoint": None, "history": [{"step": 0, "baseline": True, "eval_loss": 1.0}, {"step": 3, "eval_loss": 0.8}]},
                          {"trial": "trial_01", "params": {"training.learningRate": 1e-3}, "status": "finished",
                           "checkpoint": "s3://b/t/run-1/trials/trial_01/ckpt",
                           "history": [{"step": 0, "baseline": True, "eval_loss": 1.0}, {"step": 3, "eval_loss": 0.7},
                                       {"step": 6, "eval_loss": 0.5}]}]}
    again.finish(results, None)
    client = _client(mlflow_server)
    parent = client.get_run(tracking.mlflow.parent)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == "trial_01"
    assert parent.data.metrics["best_eval_loss"] == 0.5
    assert len(parent.data.params) > 150  # more than one batch of 100
    assert parent.data.params["deepspeed.config.k149"] == "149"
    assert parent.data.params["deepspeed.config.long"].endswith(TRUNCATED)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_trial = {c.data.tags["finetune.trial"]: c for c in children}
    assert sorted(by_trial) == ["trial_00", "trial_01"]
    assert _history(client, by_trial["trial_00"].info.run_id, "eval_loss") == [(0, 1.0), (3, 0.8)]  # once each
    assert _history(client, by_trial["trial_01"].info.run_id, "eval_loss") == [(0, 1.0), (3, 0.7), (6, 0.5)]
    assert by_trial["trial_00"].data.metrics["tokens_per_second"] == 500.0
    assert by_trial["trial_01"].data.params["training.learningRate"] == "0.001"
    assert by_trial["trial_01"].data.tags["best_checkpoint"] == results["best"]["checkpoint"]
    assert by_trial["trial_00"].data.tags["status"] == "stopped by scheduler"
    assert "tensorboard" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # nobody listening: a clear line naming the field, within seconds
    dead = job.spec.tracking.mlflow.model_copy(update={"tracking_uri": f"http://127.0.0.1:{_free_port()}"})
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"spec\.tracking\.mlflow\.trackingUri: http://127\.0\.0\.1:\d+: .*credentials"):
        MlflowRun(dead, job, "run-2").open()
    assert time.monotonic() - started < 20


@pytest.mark.integration
def test_search_in_mlflow_one_nested_run_per_trial(local_ray, mlflow_server, tmp_path):
    """A real 2-trial search (1 worker each, both at once): the trials' rows reach their own nested
    runs while the search runs, named as results.json names them; event files per trial."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune_trainer.run import run

    model = tiny.make_model(tmp_path / "model", "bert", layers=2)
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.sentiment_rows(120))
    doc = tiny.manifest(tmp_path, model, data, training={"maxSteps": 3}, evaluation={"everySteps": 3, "metric": "loss"},
                        resources={"workers": 1, "cpusPerWorker": 1},
                        search={"algorithm": "grid", "maxConcurrentTrials": 2, "space": {"training.learningRate": {"choice": [1e-6, 5e-3]}}})
    doc["spec"]["tracking"] = {"mlflow": {"trackingUri": mlflow_server, "experiment": "tracking-search"}, "tensorboard": True}
    result = run(parse_job(doc))
    r = result.results
    client = _client(mlflow_server)
    experiment = client.get_experiment_by_name("tracking-search")
    [parent] = client.search_runs([experiment.experiment_id], f"tags.`finetune.kind` = 'search' and tags.`finetune.run` = '{r['run']}'")
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == r["best"]["trial"]
    assert parent.data.tags["best_checkpoint"] == r["best"]["checkpoint"]
    assert {"results.json", "learning_curves.png", "tensorboard"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_trial = {c.data.tags["finetune.trial"]: c for c in children}
    assert sorted(by_trial) == [t["trial"] for t in r["trials"]] == ["trial_00", "trial_01"]
    for trial in r["trials"]:
        child = by_trial[trial["trial"]]
        assert _history(client, child.info.run_id, "eval_loss") == [(h["step"], pytest.approx(h["eval_loss"])) for h in trial["history"]]
        assert float(child.data.params["training.learningRate"]) == trial["params"]["training.learningRate"]
        assert "tokens_per_second" in child.data.metrics  # from the live rows: results.json's trial history has none
        events = EventAccumulator(str(result.run_dir / "tensorboard" / trial["trial"]))
        events.Reload()
        assert [s.step for s in events.Scalars("eval/loss")] == [h["step"] for h in trial["history"]]
