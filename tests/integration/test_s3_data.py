"""s3:// sources against a real S3 server (SeaweedFS on loopback): a job whose model folder and train
file are objects in its storage bucket. The preflight reads the file's head and copies the model
once per node (remote_model.py) through spec.storage's endpoint with the job's own keys (this
process's AWS variables); the ingest's Ray tasks stream the whole object with the AWS variables of
their own environment (as the pods get them from the job's Secret; no key travels in the plan);
and the run trains exactly the model the same files on a local disk give: the fault tests'
uninterrupted reference. A missing object is the preflight's verdict, naming the field.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer.spec import SpecError, parse_job

from .counting_proxy import CountingProxy
from .fault_kit import assert_same_model, job_doc, storage_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_a_run_reads_its_model_and_train_file_from_s3_as_from_a_local_disk(local_ray, s3_spec, assets, reference, tmp_path,
                                                                             monkeypatch):
    """Model folder and train file as objects in the job's bucket, read through a counting proxy:
    the run trains the reference model; the model's objects are read once on this one-node cluster
    (the driver's preflight copies them; both workers and the scoring task take that copy), and a
    Python file and pickled weights planted beside them are never read."""
    from finetune_trainer.run import run

    storage, store, s3 = storage_of(s3_spec, monkeypatch)
    model, data = assets
    data_key, model_key = f"{s3.prefix}/data/train.jsonl", f"{s3.prefix}/models/tiny"
    store.put_file(data_key, Path(data))
    for file in sorted(Path(model).iterdir()):
        store.put_file(f"{model_key}/{file.name}", file)
    store.write(f"{model_key}/modeling_evil.py", b"raise SystemExit('code from the bucket ran')\n")
    store.write(f"{model_key}/pytorch_model.bin", b"not a pickle anyone may load")
    with CountingProxy(s3.endpoint) as proxy:
        doc = job_doc(tmp_path, assets, {**storage, "endpoint": proxy.endpoint}, name="s3data")
        doc["spec"]["data"]["train"] = store.uri(data_key)
        doc["spec"]["model"]["source"] = store.uri(model_key)
        assert doc["spec"]["model"]["source"].startswith("s3://")
        result = run(parse_job(doc))
    figures = result.results["data"]
    assert figures["file_rows"] == {"train": len(Path(data).read_text().splitlines())}
    assert figures["dropped_empty"] == {"train": 0}
    assert_same_model(result.results, reference)  # the same weights and rows, in the same order, as the local files gave
    gets = [path.partition("?")[0] for method, path in proxy.requests if method == "GET"]
    assert sum(p.endswith(f"{model_key}/config.json") for p in gets) == 1, gets
    assert not [p for p in gets if p.endswith(("modeling_evil.py", "pytorch_model.bin"))]


def test_a_missing_object_is_the_preflight_s_verdict_naming_the_field(local_ray, s3_spec, assets, tmp_path, monkeypatch):
    from finetune_trainer.run import run

    storage, _, s3 = storage_of(s3_spec, monkeypatch)
    doc = job_doc(tmp_path, assets, storage, name="s3missing")
    missing = f"s3://{s3.bucket}/{s3.prefix}/data/nothing-here.jsonl"
    doc["spec"]["data"]["train"] = missing
    with pytest.raises(SpecError) as err:
        run(parse_job(doc))
    [(path, message)] = err.value.problems
    assert path == "spec.data.train" and missing in message and "cannot read" in message
