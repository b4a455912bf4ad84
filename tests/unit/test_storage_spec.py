"""spec.storage as a user writes it: an s3:// URI, an optional endpoint, no credentials ever."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_trainer.spec import SpecError, StorageSpec, parse_job
from finetune_trainer.storage import S3Location, job_location
from tests.tiny_models import minimal_manifest


def problems(storage: Any) -> list[tuple[str, str]]:
    try:
        parse_job(minimal_manifest(storage=storage))
    except SpecError as err:
        return err.problems
    return []


def test_storage_is_optional_and_defaults_are_safe():
    assert parse_job(minimal_manifest()).spec.storage is None
    spec = parse_job(minimal_manifest(storage={"uri": "s3://ckpts/team-a/"})).spec.storage
    assert (spec.bucket, spec.prefix) == ("ckpts", "team-a")
    assert (spec.endpoint, spec.region, spec.addressing, spec.verify_tls, spec.resume) == (None, "us-east-1", "path", True, "auto")


def test_every_field_in_camel_case():
    spec = parse_job(minimal_manifest(storage={
        "uri": "s3://b-1/x/y", "endpoint": "http://127.0.0.1:8333/", "region": "eu-west-1",
        "addressing": "virtual", "verifyTls": False, "resume": "s3://b-1/x/y/default/unit/run-1/checkpoint_1",
    })).spec.storage
    assert spec.endpoint == "http://127.0.0.1:8333"  # trailing slash dropped
    assert spec.addressing == "virtual" and spec.verify_tls is False
    assert spec.to_manifest()["verifyTls"] is False


@pytest.mark.parametrize("uri", ["ckpts/prefix", "s3:/ckpts", "s3://", "s3://UPPER/x", "s3://a/x", "s3://b..c/x", "s3://ckpts/a//b", "s3://ckpts/../x", "gs://ckpts/x"])
def test_uri_must_be_an_s3_uri_with_a_valid_bucket(uri):
    found = problems({"uri": uri})
    assert [p for p, _ in found] == ["spec.storage.uri"], found


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8333", "ftp://host", "http://", "http://host:8333/some/path", "http://ho st"])
def test_endpoint_is_an_http_url_without_a_path(endpoint):
    found = problems({"uri": "s3://ckpts/x", "endpoint": endpoint})
    assert [p for p, _ in found] == ["spec.storage.endpoint"], found
    assert "http://host:port" in found[0][1]


@pytest.mark.parametrize("resume", ["auto", "never", "latest", "s3://ckpts/x/default/unit/run/checkpoint_000"])
def test_resume_accepts_auto_never_latest_or_a_checkpoint_uri(resume):
    assert parse_job(minimal_manifest(storage={"uri": "s3://ckpts/x", "resume": resume})).spec.storage.resume == resume


def test_resume_none_is_the_old_name_of_never():
    assert parse_job(minimal_manifest(storage={"uri": "s3://ckpts/x", "resume": "none"})).spec.storage.resume == "never"


def test_a_search_resumes_as_a_whole_not_from_one_checkpoint_uri():
    search = {"space": {"training.learningRate": {"choice": [1e-4, 3e-4]}}}
    storage = {"uri": "s3://ckpts/x", "resume": "s3://ckpts/x/default/j/run/trials/trial_00/checkpoint_000"}
    with pytest.raises(SpecError) as err:
        parse_job(minimal_manifest(storage=storage, search=search))
    assert err.value.problems[0][0] == "spec.storage.resume" and "use auto or latest" in err.value.problems[0][1]
    assert parse_job(minimal_manifest(storage={**storage, "resume": "latest"}, search=search)).spec.storage.resume == "latest"


def test_resume_rejects_anything_else():
    found = problems({"uri": "s3://ckpts/x", "resume": "yes"})
    assert found and found[0][0] == "spec.storage.resume" and "auto, never, latest" in found[0][1]


@pytest.mark.parametrize("key", ["accessKeyId", "secretAccessKey", "aws_secret_access_key", "sessionToken", "credentials"])
def test_credentials_in_the_manifest_are_rejected_pointing_to_env_and_secret(key):
    found = problems({"uri": "s3://ckpts/x", key: "AKIA..."})
    assert len(found) == 1, found
    path, message = found[0]
    assert path == "spec.storage"
    for word in (key, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "Secret"):
        assert word in message


def test_unknown_fields_and_snake_case_are_still_rejected():
    assert [p for p, _ in problems({"uri": "s3://ckpts/x", "verify_tls": False})] == ["spec.storage.verify_tls"]
    assert [p for p, _ in problems({"uri": "s3://ckpts/x", "keepCheckpoints": 3})] == ["spec.storage.keepCheckpoints"]


def test_layout_is_prefix_namespace_job():
    spec = StorageSpec(uri="s3://ckpts/team-a")
    loc = job_location(spec, "ml", "bert-sst2")
    assert (loc.uri, loc.fs_path) == ("s3://ckpts/team-a/ml/bert-sst2", "ckpts/team-a/ml/bert-sst2")
    assert job_location(StorageSpec(uri="s3://ckpts"), "ml", "j").fs_path == "ckpts/ml/j"
    assert S3Location.parse("s3://ckpts/a/b/").join("c", "d/").uri == "s3://ckpts/a/b/c/d"


def test_crd_schema_carries_storage():
    from finetune_trainer.spec import FineTuneJobSpec

    schema = FineTuneJobSpec.model_json_schema(by_alias=True)
    storage = schema["$defs"]["StorageSpec"]["properties"]
    assert set(storage) == {"uri", "endpoint", "region", "addressing", "verifyTls", "maxAttempts", "resume", "allowResumeOutsideJob"}


def test_max_attempts_is_every_storage_request_s_retry_budget():
    """spec.storage.maxAttempts reaches the driver's boto3 store (checkpoint markers, retention) and the
    pyarrow filesystem Ray Train's workers upload through, also once pickled to them; 8 by default."""
    import pickle

    from finetune_trainer.storage import ATTEMPTS, S3Store, pyarrow_filesystem

    default = parse_job(minimal_manifest(storage={"uri": "s3://ckpts/x", "endpoint": "http://127.0.0.1:1"})).spec.storage
    assert default.max_attempts == ATTEMPTS == 8
    spec = parse_job(minimal_manifest(storage={"uri": "s3://ckpts/x", "endpoint": "http://127.0.0.1:1", "maxAttempts": 3})).spec.storage
    assert spec.to_manifest()["maxAttempts"] == 3
    store = S3Store(spec)
    assert store.attempts == 3 and store.client.meta.config.retries["total_max_attempts"] == 3
    assert S3Store(default).client.meta.config.retries["total_max_attempts"] == 8
    assert pickle.loads(pickle.dumps(pyarrow_filesystem(spec))).attempts == 3  # what a worker unpickles
    assert pyarrow_filesystem(default).attempts == 8


@pytest.mark.parametrize("attempts", [0, -1, 21, 10**6, True, "3"])
def test_max_attempts_outside_1_to_20_is_refused_naming_the_field(attempts):
    """Below 1 no request is made; above 20 a run on storage that never answers would hold its
    cluster for many minutes per request (a hostile or careless author's hang)."""
    found = problems({"uri": "s3://ckpts/x", "maxAttempts": attempts})
    assert [p for p, _ in found] == ["spec.storage.maxAttempts"], found


@pytest.mark.parametrize("attempts", [1, 20])
def test_max_attempts_from_1_to_20_is_accepted(attempts):
    assert parse_job(minimal_manifest(storage={"uri": "s3://ckpts/x", "maxAttempts": attempts})).spec.storage.max_attempts == attempts
