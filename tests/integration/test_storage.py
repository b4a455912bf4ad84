"""The storage layer against a real S3 server (SeaweedFS on loopback) and a real local Ray:
preflight verdicts, multipart uploads through pyarrow, Ray Train checkpointing to S3 with the
completion marker, completeness, retention, and the server going away mid-run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import socket
import time
import uuid

import pytest

from finetune_trainer.embedded_s3 import embedded_s3, free_ports
from finetune_trainer.storage import (
    ATTEMPTS,
    MARKER,
    AccessDenied,
    BucketMissing,
    CheckpointRefused,
    Credentials,
    EndpointUnreachable,
    LocalStore,
    S3Store,
    StorageError,
    StorageUnavailable,
    best_complete,
    classify,
    job_location,
    latest_complete,
    list_complete_checkpoints,
    mark_complete,
    preflight,
    prune,
    pyarrow_filesystem,
    ray_storage,
    read_complete,
    read_json,
    resume_point,
    s3_client,
    upload_dir,
    write_json,
)
from finetune_trainer.storage.s3 import PROBE_ATTEMPTS

from .counting_proxy import CountingProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


# --- preflight ---------------------------------------------------------------------------------


def test_preflight_passes_and_leaves_nothing_behind(s3_spec):
    spec, creds = s3_spec
    with CountingProxy(spec.endpoint) as proxy:
        seconds = preflight(spec.model_copy(update={"endpoint": proxy.endpoint}), creds, namespace="default", job="j")
    assert seconds > 0  # the time it took, for the driver's log
    assert proxy.methods() == ["PUT", "GET", "DELETE"]  # write, list, delete the probe: one attempt each
    assert S3Store(spec, creds).list(spec.prefix) == {}


def test_wrong_secret_key_is_access_denied(s3_spec):
    spec, creds = s3_spec
    with pytest.raises(AccessDenied) as err:
        preflight(spec, Credentials(creds.access_key, "not-the-secret"))
    assert "SignatureDoesNotMatch" in str(err.value) and "AWS_SECRET_ACCESS_KEY" in str(err.value)
    with pytest.raises(AccessDenied, match="InvalidAccessKeyId"):
        preflight(spec, Credentials("AKIANOTAKEY", creds.secret_key))
    with pytest.raises(AccessDenied, match="set AWS_ACCESS_KEY_ID"):
        preflight(spec, Credentials(None, None))


def test_missing_bucket(s3_spec):
    spec, creds = s3_spec
    with pytest.raises(BucketMissing, match=r"bucket 'no-such-bucket' does not exist.*spec\.storage\.uri"):
        preflight(spec.model_copy(update={"uri": "s3://no-such-bucket/x"}), creds)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:{port}", "http://no-such-host.invalid:{port}"])
def test_nothing_listening_is_endpoint_unreachable_after_one_attempt(s3_spec, endpoint, caplog):
    """Fast because it does not retry: no request reaches anything here, so the attempts are
    counted from botocore's own log line for each one it sends."""
    spec, creds = s3_spec
    spec = spec.model_copy(update={"endpoint": endpoint.format(port=free_ports(1)[0])})
    caplog.set_level(logging.DEBUG, logger="botocore.endpoint")
    with pytest.raises(EndpointUnreachable, match=r"cannot reach the S3 endpoint .*spec\.storage\.endpoint"):
        preflight(spec, creds)
    sent = [r for r in caplog.records if r.name == "botocore.endpoint" and r.getMessage().startswith("Sending http request")]
    assert len(sent) == PROBE_ATTEMPTS == 1


# --- pyarrow (what Ray Train writes through) -----------------------------------------------------


def test_pyarrow_round_trip_with_multipart_upload(s3_spec):
    spec, creds = s3_spec
    fs = pyarrow_filesystem(spec, creds)
    base = f"{spec.bucket}/{spec.prefix}/pa"
    big = os.urandom(12 * 2**20)  # > 5 MiB: pyarrow uploads it in parts
    with fs.open_output_stream(f"{base}/big.bin") as out:
        out.write(big)
    with fs.open_output_stream(f"{base}/small.txt") as out:
        out.write(b"hello")
    with fs.open_input_stream(f"{base}/big.bin") as src:
        assert src.read() == big
    etag = s3_client(spec, creds).head_object(Bucket=spec.bucket, Key=f"{spec.prefix}/pa/big.bin")["ETag"]
    assert "-" in etag, f"expected a multipart ETag, got {etag}"
    from pyarrow.fs import FileSelector

    sizes = {i.base_name: i.size for i in fs.get_file_info(FileSelector(base, recursive=True))}
    assert sizes == {"big.bin": len(big), "small.txt": 5}


@pytest.mark.parametrize(("change", "expected"), [
    ({"secret": "not-the-secret"}, AccessDenied),
    ({"access": "AKIANOTAKEY"}, AccessDenied),
    ({"bucket": "no-such-bucket"}, BucketMissing),
])
def test_pyarrow_failures_are_classified_like_boto3s(s3_spec, change, expected):
    """Ray Train's uploads fail with pyarrow's OSError; classify() names them the same way."""
    spec, creds = s3_spec
    creds = Credentials(change.get("access", creds.access_key), change.get("secret", creds.secret_key))
    bucket = change.get("bucket", spec.bucket)
    fs = pyarrow_filesystem(spec, creds, attempts=1)
    with pytest.raises(OSError) as err, fs.open_output_stream(f"{bucket}/{spec.prefix}/x.bin") as out:
        out.write(b"x")
    assert type(classify(err.value, endpoint=spec.endpoint, bucket=bucket, doing="uploading")) is expected


# --- a real Ray Train run checkpointing to S3 ------------------------------------------------------


def test_ray_train_checkpoints_to_s3_and_each_is_marked_complete(local_ray, s3_spec):
    from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from finetune_trainer.storage.ray_callback import CheckpointCompletion

    spec, creds = s3_spec
    rs = ray_storage(spec, "default", "tiny", creds)
    store = S3Store(spec, creds)
    job_prefix = job_location(spec, "default", "tiny").key

    def loop(config):
        import tempfile
        from pathlib import Path

        import ray.train

        start = 0
        checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                start = json.loads(Path(folder, "state.json").read_text())["step"]
        for step in range(start + 1, start + 3):
            with tempfile.TemporaryDirectory() as folder:
                Path(folder, "state.json").write_text(json.dumps({"step": step}))
                Path(folder, "weights.bin").write_bytes(bytes(1000 * step))
                ray.train.report({"step": step, "eval_loss": 1.0 / step}, checkpoint=Checkpoint.from_directory(folder))

    def fit(run: str, **config):
        return TorchTrainer(
            loop, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=run, storage_path=rs.storage_path, storage_filesystem=rs.filesystem,
                                 checkpoint_config=CheckpointConfig(num_to_keep=None),
                                 callbacks=[CheckpointCompletion(store, retention=True, keep_latest=1, keep_best=1,
                                                                 metric="eval_loss", mode="min")]),
        ).fit()

    result = fit("run-1")
    assert result.checkpoint.path.startswith(f"{spec.bucket}/{job_prefix}/run-1/checkpoint_")
    done = list_complete_checkpoints(store, job_prefix)
    # retention after each report kept the newest, which is also the best (loss 1/step)
    assert [(c.step, c.metrics["eval_loss"], c.files) for c in done] == [(2, 0.5, 2)]
    assert done[0].uri == "s3://" + result.checkpoint.path

    # a new run resumes from the latest complete checkpoint of the job, as `--resume` will
    found = resume_point(store, "latest", job_prefix)
    assert found == done[0]
    fit("run-2", resume_from=Checkpoint(path=f"{spec.bucket}/{found.key}", filesystem=rs.filesystem))
    latest = latest_complete(store, job_prefix)
    assert latest.step == 4 and "/run-2/" in latest.key
    assert best_complete(store, job_prefix, "eval_loss", "min") == latest


# --- completeness and retention (S3 and a local folder behave the same) ------------------------------


@pytest.fixture(params=["s3", "local"])
def store_and_prefix(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path), "default/job"
    spec, creds = request.getfixturevalue("s3_spec")
    return S3Store(spec, creds), f"{spec.prefix}/default/job"


def _checkpoint(store, key, *, step, loss=None, complete=True, size=100):
    store.write(f"{key}/trainer_state.json", json.dumps({"step": step}).encode())
    store.write(f"{key}/deepspeed/state/mp_rank_00_model_states.pt", bytes(size))
    if complete:
        time.sleep(0.01)  # distinct completion times
        return mark_complete(store, key, {"step": step, "metrics": {"eval_loss": loss} if loss is not None else {}})
    return None


def test_partial_checkpoints_are_never_latest_or_best(store_and_prefix):
    store, job = store_and_prefix
    good = _checkpoint(store, f"{job}/run-1/checkpoint_001", step=10, loss=0.9)
    _checkpoint(store, f"{job}/run-1/checkpoint_002", step=20, complete=False)  # cut short: no marker
    truncated = _checkpoint(store, f"{job}/run-2/checkpoint_001", step=30, loss=0.1)
    store.write(f"{truncated.key}/deepspeed/state/mp_rank_00_model_states.pt", bytes(50))  # shorter than listed
    missing = _checkpoint(store, f"{job}/run-2/checkpoint_002", step=40, loss=0.05)
    store.delete([f"{missing.key}/trainer_state.json"])
    store.write(f"{job}/run-2/checkpoint_003/{MARKER}", b"{not json")

    assert [c.key for c in list_complete_checkpoints(store, job)] == [good.key]
    assert latest_complete(store, job) == good
    assert best_complete(store, job, "eval_loss", "min") == good
    assert resume_point(store, "latest", job) == good and resume_point(store, "none", job) is None
    for bad, why in [(f"{job}/run-1/checkpoint_002", "no _COMPLETE.json"), (truncated.key, "has 50 bytes"), (missing.key, "trainer_state.json is missing")]:
        with pytest.raises(StorageError, match=why):
            read_complete(store, bad)
    assert read_complete(store, good.key).step == 10
    assert latest_complete(store, f"{job}/nothing-here") is None


def test_a_changed_or_planted_file_makes_a_checkpoint_refused_and_the_previous_one_latest(store_and_prefix):
    """Same-size corruption (S3: the ETag differs as well; locally only the SHA-256 sees it) and a
    file the marker does not list: neither checkpoint is loaded; the previous verified one is."""
    store, job = store_and_prefix
    good = _checkpoint(store, f"{job}/run-1/checkpoint_001", step=10, loss=0.9)
    changed = _checkpoint(store, f"{job}/run-1/checkpoint_002", step=20, loss=0.5)
    store.write(f"{changed.key}/deepspeed/state/mp_rank_00_model_states.pt", b"\x01" * 100)  # same size, other bytes
    assert latest_complete(store, job) == good and resume_point(store, "latest", job) == good
    with pytest.raises(CheckpointRefused):
        read_complete(store, changed.key)
    planted = _checkpoint(store, f"{job}/run-2/checkpoint_001", step=30, loss=0.1)
    store.write(f"{planted.key}/deepspeed/state/zero_pp_rank_9_mp_rank_00_optim_states.pt", b"not listed")
    assert planted.key not in [c.key for c in list_complete_checkpoints(store, job)]
    assert latest_complete(store, job) == good and best_complete(store, job, "eval_loss", "min") == good
    with pytest.raises(CheckpointRefused, match="does not list"):
        read_complete(store, planted.key)


def test_a_resume_uri_outside_the_job_is_refused_at_run_time_unless_allowed(s3_spec, tmp_path):
    """The spec refuses it first (tests/unit/test_checkpoint_integrity.py); this is the trainer's own check."""
    from finetune_trainer.persist import Persistence

    spec, creds = s3_spec
    store = S3Store(spec, creds)
    other = _checkpoint(store, f"{job_location(spec, 'default', 'other').key}/run-1/checkpoint_001", step=3)
    own = Persistence(store, job_location(spec, "default", "j").key, "", pyarrow_filesystem(spec, creds), tmp_path, remote=True)
    with pytest.raises(StorageError, match=r"spec\.storage\.resume: .* is outside this job's folder"):
        own.resume_from(other.uri)
    own.allow_resume_outside_job = True
    assert own.resume_from(other.uri)[1] == 3


def test_retention_keeps_the_newest_and_the_best_and_never_the_only_one(store_and_prefix):
    store, job = store_and_prefix
    run = f"{job}/run-1"
    _checkpoint(store, f"{run}/checkpoint_000", step=0, complete=False)  # died before newer ones: garbage
    made = [_checkpoint(store, f"{run}/checkpoint_{i:03d}", step=i, loss=loss) for i, loss in [(1, 0.8), (2, 0.3), (3, 0.5), (4, 0.6)]]
    _checkpoint(store, f"{run}/checkpoint_005", step=5, complete=False)  # may still be uploading: kept
    deleted = prune(store, run, keep_latest=1, keep_best=1, metric="eval_loss", mode="min")
    assert deleted == [f"{run}/checkpoint_000", made[0].key, made[2].key]
    assert [c.step for c in list_complete_checkpoints(store, run)] == [2, 4]  # best (0.3) and newest
    assert any(k.startswith(f"{run}/checkpoint_005/") for k in store.list(run))
    assert not any(k.startswith((f"{run}/checkpoint_000/", f"{made[0].key}/")) for k in store.list(run))
    if isinstance(store, LocalStore):  # no empty folders left behind
        assert not (store.root / made[0].key).exists()

    # a single complete checkpoint survives any policy, even keep_latest=0
    other = f"{job}/run-2"
    only = _checkpoint(store, f"{other}/checkpoint_001", step=1, loss=9.0)
    assert prune(store, other, keep_latest=0, keep_best=0) == []
    assert list_complete_checkpoints(store, other) == [only]
    # output.keepCheckpoints: 2 (the latest plus the 2 best) over a whole job: per run, not pooled
    prune(store, job, keep_latest=1, keep_best=2, metric="eval_loss", mode="min")
    assert [c.step for c in list_complete_checkpoints(store, job)] == [2, 4, 1]


def test_json_writes_are_atomic_and_read_back(store_and_prefix, tmp_path):
    store, job = store_and_prefix
    model = tmp_path / "export"
    (model / "sub").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(os.urandom(9 * 2**20))  # above boto3's multipart threshold
    (model / "sub" / "config.json").write_text("{}")
    assert upload_dir(store, model, f"{job}/run-1/model") == 2
    listed = store.list(f"{job}/run-1/model")
    assert {k: v.size for k, v in listed.items()} == {f"{job}/run-1/model/model.safetensors": 9 * 2**20, f"{job}/run-1/model/sub/config.json": 2}
    store.delete(listed)
    uri = write_json(store, f"{job}/run-1/results.json", {"best": {"step": 3}})
    assert uri.endswith("run-1/results.json")
    assert read_json(store, f"{job}/run-1/results.json") == {"best": {"step": 3}}
    assert read_json(store, f"{job}/run-1/status.json") is None
    assert list(store.list(f"{job}/run-1")) == [f"{job}/run-1/results.json"]  # no temp file left


# --- the server goes away mid-run ------------------------------------------------------------------


def test_both_clients_retry_adaptively_within_the_budget_also_once_pickled(s3_spec):
    """What Ray's controller and workers get is an unpickled copy: it must retry as the driver's does
    (pyarrow's own pickling drops the retry strategy, leaving its default of 3 attempts)."""
    spec, creds = s3_spec
    assert S3Store(spec, creds).client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": ATTEMPTS}
    copy = pickle.loads(pickle.dumps(pyarrow_filesystem(spec, creds)))
    assert copy.attempts == ATTEMPTS and copy.type_name == "s3"
    assert pickle.loads(pickle.dumps(S3Store(spec, creds))).client.meta.config.retries["mode"] == "adaptive"


def test_server_stopped_mid_run_fails_with_bounded_retries():
    """Counted with smaller budgets than ATTEMPTS (each attempt's back-off doubles: the test stays short)."""
    with contextlib.ExitStack() as outliving:
        with embedded_s3(bucket="ftj-stop") as server:
            spec = server.storage_spec(f"t-{uuid.uuid4().hex[:6]}")
            creds = Credentials(server.access_key, server.secret_key)
            store = S3Store(spec, creds, attempts=3)
            good = _checkpoint(store, f"{spec.prefix}/default/j/run/checkpoint_001", step=1, loss=1.0)
            # Ray Train's filesystem through a proxy that outlives the server: pyarrow's attempts
            # happen in C++, out of Python's sight, so the proxy counts them. Pickled and back, as
            # Ray's workers get it: 5 attempts, not pyarrow's default 3
            proxy = outliving.enter_context(CountingProxy(server.endpoint))
            fs = pickle.loads(pickle.dumps(pyarrow_filesystem(spec.model_copy(update={"endpoint": proxy.endpoint}), creds,
                                                              attempts=5)))
            server_pid = server.pid
        # stopped and gone: the process reaped, its S3 port refusing connections
        with pytest.raises(ProcessLookupError):
            os.kill(server_pid, 0)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(spec.endpoint.rpartition(":")[2])), timeout=5).close()

        attempts = []
        store.client.meta.events.register("before-send.s3.PutObject", lambda **_: attempts.append(1))
        with pytest.raises(StorageUnavailable) as err:
            store.write(f"{spec.prefix}/default/j/run/checkpoint_002/trainer_state.json", b"{}")
        assert len(attempts) == 3  # it did retry, then gave up
        assert "stopped answering" in str(err.value) and "retries are exhausted" in str(err.value)

        with pytest.raises(OSError) as pa_err, fs.open_output_stream(f"{spec.bucket}/{spec.prefix}/x.bin") as out:
            out.write(b"x")  # Ray Train's uploads fail too, after pyarrow's own retries
        # each attempt reached the proxy and got no answer, as from a dead server; then it gave up
        assert proxy.requests == [("POST", f"/{spec.bucket}/{spec.prefix}/x.bin?uploads")] * 5
        verdict = classify(pa_err.value, endpoint=spec.endpoint, bucket=spec.bucket, doing="uploading", reached_before=True)
        assert isinstance(verdict, StorageUnavailable)

    # a fresh process meeting a dead endpoint is told it is unreachable, not "unavailable"
    with pytest.raises(EndpointUnreachable):
        preflight(spec, creds)
    assert good is not None
