"""Storage faults against a real S3 server (SeaweedFS on loopback): a wrong secret key stops the CLI
before Ray starts, and the server stopped mid-run fails the run clearly while the last complete
checkpoint survives. Throttling through the fault proxy (fault_kit.FaultProxy) costs no work: a
marker refused past its retries, a 503 SlowDown burst longer than the old ~7 s of retries, a prune
refused; each run ends as the uninterrupted one did. The process faults (workers, drivers killed)
are in test_faults.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from finetune_trainer.spec import parse_job
from finetune_trainer.storage import (
    MARKER,
    Credentials,
    S3Store,
    StorageUnavailable,
    job_location,
    latest_complete,
    list_complete_checkpoints,
    read_complete,
)

from . import tiny
from .counting_proxy import CountingProxy
from .fault_kit import ROOT, FaultProxy, assert_same_model, in_thread, job_doc, storage_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


# --- (d) wrong secret key: the preflight's verdict, exit 2, no Ray -----------------------------------


def test_wrong_secret_key_fails_the_cli_at_once_without_starting_ray(s3_spec, assets, tmp_path):
    storage, store, spec = storage_of(s3_spec)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": s3_spec[1].access_key, "AWS_SECRET_ACCESS_KEY": "not-the-secret",
           "RAY_ADDRESS": ""}
    with CountingProxy(spec.endpoint) as proxy:  # the CLI's S3 requests pass through it, counted
        manifest = tiny.save_manifest(tmp_path / "job.yaml", job_doc(tmp_path, assets, {**storage, "endpoint": proxy.endpoint}))
        done = subprocess.run([sys.executable, "-m", "finetune_trainer", "run", str(manifest), "--no-progress"], env=env,
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    # at once: the preflight's first request (writing its probe) was refused, and nothing was retried
    assert proxy.methods() == ["PUT"], proxy.requests
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("finetune: storage: ") and "SignatureDoesNotMatch" in line and "AWS_SECRET_ACCESS_KEY" in line
    assert "Traceback" not in done.stderr
    assert "Ray" not in done.stdout + done.stderr.replace(line, "")  # nothing started: no Ray banner, no Ray log
    assert not (tmp_path / "runs").exists()  # no data read into the output folder, no status written
    assert store.list(spec.prefix) == {}


# --- (e) the S3 server stops mid-run ---------------------------------------------------------------


def test_server_stopped_mid_run_fails_clearly_and_the_last_complete_checkpoint_survives(local_ray, assets, tmp_path, monkeypatch):
    from finetune_trainer.embedded_s3 import embedded_s3
    from finetune_trainer.run import run

    data_dir = tmp_path / "s3"
    keys = (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])  # those Ray's workers have
    with embedded_s3(bucket="ftj-stop", data_dir=data_dir, keys=keys) as server:
        spec = server.storage_spec("p")
        creds = Credentials(server.access_key, server.secret_key)
        store = S3Store(spec, creds)
        # 3 attempts per request (spec.storage.maxAttempts): a user who wants a dead store noticed
        # sooner; the default 8 spends ~45 s per request backing off before the same verdict
        doc = job_doc(tmp_path, assets, {"uri": spec.uri, "endpoint": spec.endpoint, "maxAttempts": 3}, steps=60)
        doc["spec"]["runPolicy"] = {"workerRestarts": 1}  # one restart: it retries, and the test stays short
        job = parse_job(doc)
        prefix = job_location(spec, "default", "t").key
        thread, box = in_thread(lambda: run(job))
        last = wait_for("a complete checkpoint", lambda: latest_complete(store, prefix), 300, box=box)
    stopped = time.monotonic()
    thread.join(300)
    assert not thread.is_alive(), "the run hangs with its storage gone"
    seconds = time.monotonic() - stopped
    assert "error" in box, "the run finished without storage"
    print(f"failed {seconds:.0f} s after the server stopped: {box['error']!r}")
    assert isinstance(box["error"], StorageUnavailable), repr(box["error"])  # what the CLI prints as one line
    assert "stopped answering" in str(box["error"]) and "last complete checkpoint is still there" in str(box["error"])

    with embedded_s3(bucket="ftj-stop", data_dir=data_dir) as again:  # the same data, new keys
        store = S3Store(again.storage_spec("p"), Credentials(again.access_key, again.secret_key))
        done = list_complete_checkpoints(store, prefix)
        assert done and done[-1].step >= last.step
        for c in done:
            assert read_complete(store, c.key).files == c.files  # every listed file there, at its size
        state = json.loads(store.read(f"{done[-1].key}/trainer_state.json"))
        assert state["step"] == done[-1].step


# --- throttling costs no work: each run below ends as the uninterrupted `reference` did ------------


def _throttled_run(s3_spec, assets, tmp_path, monkeypatch, name: str, arm, **spec):
    """`run` of job_doc's job on S3 through a FaultProxy armed by `arm(proxy)`; workerRestarts: 0,
    so a fault that took the worker group down fails the run. (proxy, results, store, prefix)."""
    from finetune_trainer.run import run

    storage, store, s3 = storage_of(s3_spec, monkeypatch)
    with FaultProxy(s3.endpoint) as proxy:
        arm(proxy)
        doc = job_doc(tmp_path, assets, {**storage, "endpoint": proxy.endpoint}, name=name)
        doc["spec"]["runPolicy"] = {"workerRestarts": 0}
        for section, values in spec.items():
            doc["spec"][section] = {**doc["spec"].get(section, {}), **values}
        job = parse_job(doc)
        result = run(job)
    rows = [row for row in result.results["history"] if not row.get("baseline")]
    assert [row["step"] for row in rows] == [4, 8, 12, 16, 20, 24]
    assert not any("resumed_from_step" in row for row in rows), "the worker group was restarted"
    return proxy, result.results, store, job_location(job.spec.storage, "default", name).key


def test_a_marker_refused_past_its_retries_costs_no_restart_and_no_work(local_ray, s3_spec, assets, reference, tmp_path,
                                                                         monkeypatch):
    """Every PUT of the second checkpoint's marker is answered 503 SlowDown: it is retried
    spec.storage.maxAttempts times (3 here: the default 8 spends ~45 s backing off, which the burst
    test below rides out), then that checkpoint simply does not count; training goes on (before:
    the callback's error restarted the worker group, or failed a run without restarts)."""
    proxy, results, store, prefix = _throttled_run(s3_spec, assets, tmp_path, monkeypatch, "marker",
                                                   lambda p: setattr(p, "refuse_marker", 2), storage={"maxAttempts": 3})
    refused = proxy.markers[1]
    assert [status for _, path, status in proxy.refused if path.startswith(refused)] == [503] * 3  # the spec's budget, bounded
    assert len(proxy.markers) == 6  # every other checkpoint got its marker
    checkpoint = refused.lstrip("/").partition("/")[2].rpartition("/")[0]
    assert store.read(f"{checkpoint}/{MARKER}") is None  # never complete: never loaded, never best
    assert all(c.key != checkpoint for c in list_complete_checkpoints(store, prefix))
    assert_same_model(results, reference)


def test_a_slowdown_burst_longer_than_the_old_retries_is_ridden_out(local_ray, s3_spec, assets, reference, tmp_path,
                                                                     monkeypatch):
    """10 s of 503 SlowDown on every request from the second marker's PUT on: longer than the 4
    attempts (~7 s at most) every request had before; within the adaptive retries it has now."""

    def arm(proxy):
        proxy.burst_after_marker, proxy.burst_seconds = 2, 10.0

    proxy, results, _, _ = _throttled_run(s3_spec, assets, tmp_path, monkeypatch, "burst", arm)
    marker = [path for _, path, _ in proxy.refused if path.startswith(proxy.markers[1])]
    assert len(marker) >= 4, proxy.refused  # the old budget's 4 attempts all fell inside the burst
    print(f"{len(proxy.refused)} requests refused during the burst, {len(marker)} of them the marker's")
    assert len(proxy.markers) == 6
    assert_same_model(results, reference)


def test_a_refused_prune_is_retried_at_the_next_checkpoint_and_never_fails_the_run(local_ray, s3_spec, assets, reference,
                                                                                    tmp_path, monkeypatch):
    """The first DeleteObjects of retention is refused (403): logged, the run goes on, and the next
    checkpoint's prune deletes what that one left (before: the run failed)."""
    proxy, results, store, prefix = _throttled_run(s3_spec, assets, tmp_path, monkeypatch, "prune",
                                                   lambda p: setattr(p, "refuse_deletes", 1))
    assert [(method, status) for method, _, status in proxy.refused] == [("POST", 403)]
    # retention as if nothing had failed: the latest and the best checkpoint, no other folder left
    kept = list_complete_checkpoints(store, prefix)
    assert sorted(c.step for c in kept) == sorted({24, results["best"]["step"]})
    folders = {"/".join(parts[: i + 1]) for parts in (k.split("/") for k in store.list(prefix))
               for i, part in enumerate(parts[:-1]) if part.startswith("checkpoint_")}
    assert folders == {c.key for c in kept}
    assert_same_model(results, reference)
