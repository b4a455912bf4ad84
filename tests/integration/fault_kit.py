"""What the fault tests share (test_faults: processes killed; test_storage_faults: storage
refusing or gone): a tiny model and data set per module, a manifest around them, the S3 settings of
the session's server, polling with a deadline, a run in a thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from finetune_trainer.storage import S3Store

from . import tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    return tiny.make_model(tmp / "model", "bert", layers=2), tiny.write_jsonl(tmp / "train.jsonl", tiny.sentiment_rows(300))


def job_doc(tmp: Path, assets, storage: dict | None = None, *, steps: int = 24, every: int = 4, name: str = "t") -> dict:
    model, data = assets
    doc = tiny.manifest(tmp, model, data, training={"maxSteps": steps}, evaluation={"everySteps": every},
                        output={"export": "last", "keepCheckpoints": 1})
    doc["metadata"]["name"] = name
    if storage:
        doc["spec"]["storage"] = storage
    return doc


def storage_of(s3_spec, monkeypatch=None) -> tuple[dict, S3Store, str]:
    """spec.storage for a manifest, a store to look with, the StorageSpec; with `monkeypatch`, the
    keys go into this process's environment (where an in-process run reads them)."""
    spec, creds = s3_spec
    if monkeypatch is not None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds.secret_key)
    return {"uri": spec.uri, "endpoint": spec.endpoint}, S3Store(spec, creds), spec


def wait_for(what: str, check, timeout: float, every: float = 0.2, box: dict | None = None):
    """Poll `check` until it returns something truthy; `box` (from in_thread): stop early if the run ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if box and ("error" in box or "result" in box):
            raise AssertionError(f"the run ended while waiting for {what}: {box.get('error') or 'finished'}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def in_thread(fn):
    """Run fn in a thread; returns (thread, box) where box gets 'result' or 'error'."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as err:  # handed to the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box
