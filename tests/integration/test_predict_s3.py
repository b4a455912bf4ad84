"""`finetune predict s3://...` (issue 20, item 4) against the real S3 server of the tests (SeaweedFS on
loopback; no Ray): the run is reached through the job's spec.storage with credentials from the
environment, only data files are fetched, and the answer is the local run's."""

from __future__ import annotations

import json

import pytest

from finetune_trainer.cli import main
from finetune_trainer.predict_source import fetch
from finetune_trainer.storage import S3Store, upload_dir
from tests.unit.test_predict import LABELS, _results, _write_run

from . import tiny

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _json(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_predict_from_s3_through_the_jobs_storage_fetches_only_data(tmp_path, s3_spec, s3_server, monkeypatch, capsys):
    from transformers import AutoModelForSequenceClassification

    from finetune_trainer.driver import _label_names_into_config

    spec, credentials = s3_spec
    base = tiny.make_model(tmp_path / "base", "bert")
    run = _write_run(tmp_path / "run-1", _results(tmp_path, base, "sequence-classification"))
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).save_pretrained(run / "model")
    tiny.tokenizer().save_pretrained(run / "model")
    _label_names_into_config(run / "model" / "config.json", LABELS)
    (run / "model" / "evil.py").write_text("raise SystemExit('never imported')\n")
    (run / "model" / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle to open")
    store = S3Store(spec, credentials)
    upload_dir(store, run, f"{spec.prefix}/ns/job/run-1")
    uri = f"{spec.uri}/ns/job/run-1"

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials.access_key or "")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials.secret_key or "")
    fetched = fetch(uri, tmp_path / "work", spec)
    names = {p.name for p in fetched.rglob("*") if p.is_file()}
    assert {"results.json", "config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & {"evil.py", "pytorch_model.bin"}

    job = tiny.manifest(tmp_path, base, tmp_path / "train.jsonl", storage=spec.to_manifest())
    manifest = tiny.save_manifest(tmp_path / "job.yaml", job)
    assert (credentials.access_key or "") not in manifest.read_text()  # credentials: the environment's only
    assert main(["predict", uri, "-m", str(manifest), "--text", "a lovely day", "--json"]) == 0
    remote = _json(capsys)
    assert main(["predict", str(run), "--text", "a lovely day", "--json"]) == 0
    assert remote == _json(capsys) and list(remote[0]["probabilities"]) == LABELS
    assert main(["predict", f"{uri}/model", "-m", str(manifest), "--text", "a lovely day", "--json"]) == 0
    assert _json(capsys) == remote  # the run's model/ alone: its results.json is fetched beside it

    assert main(["predict", f"{spec.uri}/ns/job/nothing", "-m", str(manifest), "--text", "x"]) == 2
    assert "no model files there" in capsys.readouterr().err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert main(["predict", uri, "-m", str(manifest), "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune: storage:") and "Traceback" not in err and "wrong" not in err
