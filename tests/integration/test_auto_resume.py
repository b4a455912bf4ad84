"""`spec.storage.resume: auto` (the default) against real processes and a real S3 server: an
attempt of a run killed with its whole Ray (a pod lost to preemption, a node drained), then a new
attempt of the same run (what KubeRay's retry or a re-created RayJob starts: the same
FINETUNE_RUN_ID), without --resume or any spec change, continues from the run's latest complete
checkpoint to the model the uninterrupted run trains; the status says which attempt it is, the
restarts so far, the resume and the newest checkpoint."""

from __future__ import annotations

import json
import os

import pytest

from finetune_trainer.spec import parse_job
from finetune_trainer.storage import job_location, latest_complete

from . import tiny
from .fault_kit import assert_same_model, job_doc, storage_of, wait_for
from .test_faults import _driver, _kill_session, _while_running

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

RUN = "run-20260101-100000-abcdef12-g1"  # what the operator puts in FINETUNE_RUN_ID (children.run_id_for)


def test_a_new_attempt_of_the_run_continues_from_its_latest_checkpoint(local_ray, s3_spec, assets, reference, tmp_path,
                                                                        capsys, monkeypatch):
    from finetune_trainer.cli import main

    storage, store, _ = storage_of(s3_spec, monkeypatch)
    doc = job_doc(tmp_path, assets, storage)  # 24 steps, a checkpoint every 4: reference's run
    assert parse_job(doc).spec.storage.resume == "auto"
    manifest = tiny.save_manifest(tmp_path / "job.yaml", doc)
    prefix = job_location(parse_job(doc).spec.storage, "default", "t").key
    log = tmp_path / "attempt-1.log"
    driver = _driver(manifest, log, {**os.environ, "FINETUNE_RUN_ID": RUN})
    try:
        wait_for("the first complete checkpoint", _while_running(driver, log, lambda: latest_complete(store, prefix)), 400)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{log.read_text(errors='replace')[-3000:]}") from None
    finally:
        _kill_session(driver)  # the pod is gone: the driver, its Ray, every worker
    killed_at = latest_complete(store, prefix)
    assert killed_at.step < 24 and killed_at.parent == f"{prefix}/{RUN}", "the run ended before the kill, or wrote elsewhere"

    monkeypatch.setenv("FINETUNE_RUN_ID", RUN)  # attempt 2: the same run, no --resume, no spec change
    assert main(["run", str(manifest), "--no-progress"]) == 0
    out = "".join(capsys.readouterr())
    assert f"resume: from {killed_at.uri} (step {killed_at.step})" in out
    results = json.loads(store.read(f"{prefix}/{RUN}/results.json"))
    assert results["resumed_from"] == {"checkpoint": killed_at.uri, "step": killed_at.step}
    assert results["history"][0]["step"] == killed_at.step + 4 and results["history"][-1]["step"] == 24
    assert_same_model(results, reference)  # nothing trained twice, nothing skipped

    attempts = json.loads(store.read(f"{prefix}/{RUN}/attempts.json"))["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2]
    status = json.loads(store.read(f"{prefix}/status.json"))
    assert (status["state"], status["run"], status["attempt"], status["restarts"]) == ("finished", RUN, 2, 1)
    [resume] = status["resumes"]
    assert (resume["step"], resume["checkpoint"], resume["attempt"]) == (killed_at.step, killed_at.uri, 2)
    assert status["lastCheckpoint"]["step"] == 24 and status["lastCheckpoint"]["uri"].startswith(f"{store.uri(prefix)}/{RUN}/")


def test_a_new_run_id_or_resume_never_starts_fresh(local_ray, s3_spec, assets, tmp_path, capsys, monkeypatch):
    """auto continues only its own run: another run of the job (a FineTuneJob applied again, a new
    generation) starts at step 0 even with checkpoints of the job in storage; so does never."""
    from finetune_trainer.cli import main

    storage, store, _ = storage_of(s3_spec, monkeypatch)
    doc = job_doc(tmp_path, assets, storage, steps=8, name="fresh")
    manifest = tiny.save_manifest(tmp_path / "job.yaml", doc)
    prefix = job_location(parse_job(doc).spec.storage, "default", "fresh").key
    assert main(["run", str(manifest), "--no-progress", "--run-id", "run-a"]) == 0
    assert latest_complete(store, prefix).step == 8
    for run_id, extra in (("run-b", []), ("run-a", ["--set", "storage.resume=never"])):
        capsys.readouterr()
        assert main(["run", str(manifest), "--no-progress", "--run-id", run_id, *extra]) == 0
        out = "".join(capsys.readouterr())
        assert "resume: from" not in out and "resumed from" not in out
        # never with an existing run: Ray Train would restore that run by name, so the attempt gets a folder of its own
        written = run_id if not extra else next(k[len(prefix) + 1 :].split("/")[0] for k in store.list(prefix)
                                                if k.startswith(f"{prefix}/run-a.run-"))
        results = json.loads(store.read(f"{prefix}/{written}/results.json"))
        assert results["resumed_from"] is None and next(r["step"] for r in results["history"] if not r.get("baseline")) == 4
