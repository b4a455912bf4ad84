"""s3:// data sources against a real S3 server (SeaweedFS on loopback): a job whose train file is an
object in its storage bucket. The preflight reads the file's head through spec.storage's endpoint
with the job's own keys (this process's AWS variables), the ingest's Ray tasks stream the whole
object with the AWS variables of their own environment (as the pods get them from the job's
Secret; no key travels in the plan), and the run trains on exactly what the same file on a local
disk gives: the fault tests' uninterrupted reference model. A missing object is the preflight's
verdict, naming the field, before any training.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer.spec import SpecError, parse_job

from .fault_kit import assert_same_model, job_doc, storage_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_a_run_reads_its_train_file_from_s3_as_from_a_local_disk(local_ray, s3_spec, assets, reference, tmp_path,
                                                                   monkeypatch):
    from finetune_trainer.run import run

    storage, store, s3 = storage_of(s3_spec, monkeypatch)
    _, data = assets
    key = f"{s3.prefix}/data/train.jsonl"
    store.put_file(key, Path(data))
    doc = job_doc(tmp_path, assets, storage, name="s3data")
    doc["spec"]["data"]["train"] = store.uri(key)
    assert doc["spec"]["data"]["train"].startswith("s3://")
    result = run(parse_job(doc))
    figures = result.results["data"]
    assert figures["file_rows"] == {"train": len(Path(data).read_text().splitlines())}
    assert figures["dropped_empty"] == {"train": 0}
    assert_same_model(result.results, reference)  # the same rows, in the same order, as the local file gave


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
