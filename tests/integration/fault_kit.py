"""What the fault tests share (test_faults: processes killed; test_storage_faults: storage
refusing or gone): a manifest around the session's tiny model and data set (the `assets` fixture,
conftest.py), comparison with the uninterrupted reference run (`reference`, conftest.py), the S3
settings of the session's server, a fault-injecting S3 proxy, polling with a deadline, a run in a
thread."""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_trainer.storage import MARKER, S3Store

from . import tiny
from .counting_proxy import CountingProxy

ROOT = Path(__file__).resolve().parents[2]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_model(results: dict, reference) -> None:
    """The same weights (to float noise) and final evaluation as the uninterrupted run."""
    ours, theirs = weights(Path(results["local_model"])), weights(reference.run_dir / "model")
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    print(f"largest weight difference from the uninterrupted run: {worst:.2e}")
    assert worst < 1e-4
    assert results["history"][-1]["eval_loss"] == pytest.approx(reference.results["history"][-1]["eval_loss"], rel=1e-4)


class FaultProxy(CountingProxy):
    """A CountingProxy (loopback, in front of the session's SeaweedFS) that refuses what a test
    arms it to, the way S3 does: an S3 error document with a status and code.

    - `refuse_marker = n`: every PUT of the n-th checkpoint marker (`_COMPLETE.json`, in the order
      they first arrive) is answered 503 SlowDown, every retry included;
    - `burst_after_marker = n`, `burst_seconds = s`: from the moment the n-th marker's PUT arrives,
      every request is answered 503 SlowDown for s seconds (throttling of the whole bucket);
    - `refuse_deletes = k`: the next k DeleteObjects requests (retention's prune) get 403 AccessDenied;
    - `on_marker(n, key)`: called when the n-th marker's PUT was stored, before the writer hears so.
    `refused` lists (method, path, status) of every answer the proxy made up."""

    def __init__(self, upstream: str):
        super().__init__(upstream)
        self.markers: list[str] = []  # each marker's path, in the order its first PUT arrived
        self.refused: list[tuple[str, str, int]] = []
        self.refuse_marker: int | None = None
        self.burst_after_marker: int | None = None
        self.burst_seconds = 0.0
        self.burst: tuple[float, float] | None = None  # (start, end) on time.monotonic once it began
        self.refuse_deletes = 0
        self.on_marker: Callable[[int, str], None] | None = None
        self._faults = threading.Lock()

    def marker_number(self, method: str, path: str) -> int | None:
        """n for a PUT of the n-th marker; None for any other request."""
        target = urllib.parse.unquote(path.partition("?")[0])
        if method != "PUT" or not target.endswith("/" + MARKER):
            return None
        with self._faults:
            if target not in self.markers:
                self.markers.append(target)
            return self.markers.index(target) + 1

    def refuse(self, method: str, path: str) -> tuple[int, str] | None:
        number = self.marker_number(method, path)
        now = time.monotonic()
        with self._faults:
            if number is not None and number == self.burst_after_marker and self.burst is None:
                self.burst = (now, now + self.burst_seconds)
            refused_marker = number is not None and number == self.refuse_marker
            in_burst = self.burst is not None and now < self.burst[1]
            prune = method == "POST" and "delete" in urllib.parse.parse_qs(path.partition("?")[2], keep_blank_values=True)
            answer: tuple[int, str] | None = None
            if refused_marker or in_burst:
                answer = (503, "SlowDown")
            elif prune and self.refuse_deletes > 0:
                self.refuse_deletes -= 1
                answer = (403, "AccessDenied")
            if answer is not None:
                self.refused.append((method, path, answer[0]))
            return answer

    def forwarded(self, method: str, path: str, status: int) -> None:
        number = self.marker_number(method, path)
        if number is not None and status == 200 and self.on_marker is not None:
            bucket_key = urllib.parse.unquote(path.partition("?")[0]).lstrip("/")
            self.on_marker(number, bucket_key.partition("/")[2].rpartition("/")[0])  # the checkpoint's key


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
