"""Storage faults against a real S3 server (SeaweedFS on loopback): a wrong secret key stops the CLI
before Ray starts, and the server stopped mid-run fails the run clearly while the last complete
checkpoint survives. The process faults (workers, drivers killed) are in test_faults.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from finetune_trainer.spec import parse_job
from finetune_trainer.storage import (
    Credentials,
    S3Store,
    StorageUnavailable,
    job_location,
    latest_complete,
    list_complete_checkpoints,
    read_complete,
)

from . import fault_kit, tiny
from .counting_proxy import CountingProxy
from .fault_kit import ROOT, in_thread, job_doc, storage_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

assets = fault_kit.assets  # the module's tiny model and data set (a module-scoped fixture)


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
        doc = job_doc(tmp_path, assets, {"uri": spec.uri, "endpoint": spec.endpoint}, steps=60)
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
