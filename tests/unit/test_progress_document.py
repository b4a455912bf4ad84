"""status.json typed once (finetune_trainer.spec.progress): what the trainer's job_status builds is
what the operator's progress reader parses, documents written before the model existed still read,
and a newer trainer's extra fields do not make an older operator drop the document."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from finetune_operator.status_mapping import apply_progress, trainer_problems
from finetune_operator.status_model import FineTuneJobStatus, Phase, Reason
from finetune_trainer import job_status
from finetune_trainer.spec.progress import PROGRESS_VERSION, STATUS_FILE, ProgressDocument

# written by job_status before the model (and its version field) existed: byte for byte what a
# running driver of that version put into the ConfigMap
TODAY_RUNNING = """{"job": "search-freezing", "run": "run-1", "updated": "2026-01-01T10:03:00.123456+00:00",
 "state": "running", "kind": "search",
 "trials": {"total": 8, "completed": 2, "running": 2, "waiting": 1, "stopped": 1, "failed": 0},
 "step": null, "totalSteps": null,
 "bestTrial": {"name": "trial_3", "metric": "accuracy", "value": 0.8412, "step": 40,
               "params": {"freezing.strategy": "freezeBottom"}, "checkpoint": "s3://b/p/ns/search-freezing/run-1/trial_3/c2"},
 "bestCheckpoint": "s3://b/p/ns/search-freezing/run-1/trial_3/c2", "model": null}"""
TODAY_INVALID = """{"job": "quickstart", "run": null, "updated": "2026-01-01T10:03:00+00:00", "state": "invalid",
 "kind": "single", "problems": [{"path": "spec.freezing.layers", "message": "12 exceeds the 6 layers of the model"}]}"""


def test_a_document_written_before_the_version_field_reads_as_version_1():
    doc = ProgressDocument.read(TODAY_RUNNING)
    assert doc is not None and doc.version == 1
    assert (doc.job, doc.run, doc.state, doc.kind) == ("search-freezing", "run-1", "running", "search")
    assert doc.updated == datetime(2026, 1, 1, 10, 3, 0, 123456, tzinfo=UTC)
    assert doc.trials is not None and (doc.trials.done_text(), doc.trials.waiting) == ("3/8", 1)
    assert doc.best_trial is not None and (doc.best_trial.value, doc.best_trial.step) == (0.8412, 40)
    assert doc.best_checkpoint == "s3://b/p/ns/search-freezing/run-1/trial_3/c2"
    verdict = ProgressDocument.read(TODAY_INVALID)
    assert verdict is not None and verdict.version == 1
    assert trainer_problems(verdict) == [("spec.freezing.layers", "12 exceeds the 6 layers of the model")]


def test_a_newer_trainers_document_is_read_for_what_this_operator_knows():
    newer = {**json.loads(TODAY_RUNNING), "version": 7, "etaSeconds": 120, "gpuHours": {"a100": 1.5},
             "trials": {**json.loads(TODAY_RUNNING)["trials"], "preempted": 3},
             "bestTrial": {**json.loads(TODAY_RUNNING)["bestTrial"], "tokensPerSecond": 900}}
    doc = ProgressDocument.read(json.dumps(newer))
    assert doc is not None and doc.version == 7
    assert doc == ProgressDocument.read({**json.loads(TODAY_RUNNING), "version": 7})  # the extras ignored, nothing else
    status = apply_progress(FineTuneJobStatus(phase=Phase.RUNNING, reason=Reason.TRAINING), doc)
    assert status.trials_done == "3/8" and status.best_trial is not None and status.best_trial.value == 0.8412
    assert "tokensPerSecond" not in json.dumps(status.to_patch()) and "step" not in status.to_patch()["bestTrial"]


@pytest.mark.parametrize("broken", [
    "", "{", "[]", "null", '{"state": "running"}',  # not a document: no job, kind or time
    TODAY_RUNNING.replace('"running", "kind"', '"exploded", "kind"'),  # a state this reader cannot act on
    TODAY_RUNNING.replace('"total": 8', '"total": -8'), TODAY_RUNNING.replace('"version"', '"v"').replace('"job"', '"version": 0, "job"'),
])
def test_what_is_not_a_document_is_none(broken):
    assert ProgressDocument.read(broken) is None


def test_what_job_status_builds_is_what_the_operator_reads():
    best = job_status.best_trial("trial_3", "accuracy", 0.8412, 40, params={"lr": 1e-4}, checkpoint="s3://b/c")
    assert best["value"] == 0.8412  # the drivers compare bests as dicts
    written = job_status.snapshot("search-freezing", "run-1", kind="search", state="running", total_trials=4,
                                  trials={"t1": "completed", "t2": "running", "t3": "waiting", "t4": "stopped"},
                                  step=9, total_steps=20, best=best)
    wire = written.as_dict()
    assert wire["version"] == PROGRESS_VERSION == 1
    assert wire["totalSteps"] == 20 and wire["bestTrial"]["checkpoint"] == wire["bestCheckpoint"] == "s3://b/c"
    assert wire["trials"] == {"total": 4, "completed": 1, "running": 1, "waiting": 1, "stopped": 1, "failed": 0}
    assert ProgressDocument.read(json.dumps(wire)) == written
    with pytest.raises(ValueError, match="state"):
        job_status.snapshot("j", "r", kind="single", state="exploded")

    verdict = job_status.invalid("quickstart", kind="single", problems=[("spec.freezing.layers", "too many")])
    assert verdict.as_dict()["state"] == "invalid" and "trials" not in verdict.as_dict()
    assert trainer_problems(ProgressDocument.read(json.dumps(verdict.as_dict()))) == [("spec.freezing.layers", "too many")]
    assert job_status.STATUS_FILE == STATUS_FILE == "status.json"


def test_a_failing_destination_is_logged_once_and_the_others_still_get_the_document(caplog: pytest.LogCaptureFixture):
    got: list[dict] = []

    def broken(document: dict) -> None:
        raise OSError("disk full")

    publisher = job_status.StatusPublisher(broken, got.append)
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.job_status"):
        for step in (1, 2):
            publisher.publish(job_status.snapshot("j", "r", kind="single", state="running", step=step))
    assert [d["step"] for d in got] == [1, 2]
    assert [r.getMessage() for r in caplog.records] == ["could not write status.json (disk full); training continues"]


def test_the_progress_model_imports_nothing_heavy():
    """The operator image parses it: pydantic only, like the rest of the spec package."""
    code = ("import sys, finetune_trainer.spec.progress; "
            "print(sorted(m for m in ('torch', 'ray', 'pandas', 'transformers', 'kubernetes', 'kopf') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
