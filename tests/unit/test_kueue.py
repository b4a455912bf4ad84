"""Kueue: a FineTuneJob's queue labels reach its RayJob, which is created suspended for Kueue to
start; the operator never lifts that suspension itself, and the status says the job waits for quota."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from finetune_operator.changes import mutable_patch
from finetune_operator.kueue import held_by_kueue, kueue_observation, queue_of
from finetune_operator.rayjob import render_rayjob
from finetune_operator.status_mapping import next_status
from finetune_operator.status_model import FineTuneJobStatus, Phase, Reason
from finetune_trainer.spec.queueing import PRIORITY_CLASS_LABEL, QUEUE_NAME_LABEL, queue_labels, queue_problems
from tests.unit.test_rayjob import job, kuberay_errors, kuberay_schema

QUEUED = {QUEUE_NAME_LABEL: "team-a", PRIORITY_CLASS_LABEL: "low", "kueue.x-k8s.io/max-exec-time-seconds": "1", "team": "a"}
T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def queued_rayjob(**spec_fields):
    rendered = render_rayjob(job(**spec_fields), owner_uid="uid-1", queue=queue_labels(QUEUED))
    rendered["metadata"]["namespace"] = "ml"
    return rendered


def test_only_the_queue_and_priority_labels_pass_through_and_the_rayjob_starts_suspended():
    rendered = queued_rayjob()
    labels = rendered["metadata"]["labels"]
    assert (labels[QUEUE_NAME_LABEL], labels[PRIORITY_CLASS_LABEL]) == ("team-a", "low")
    assert "kueue.x-k8s.io/max-exec-time-seconds" not in labels and "team" not in labels  # Kueue's other knobs are not the author's
    assert rendered["spec"]["suspend"] is True and rendered["spec"]["shutdownAfterJobFinishes"] is True  # what Kueue admits
    assert "enableInTreeAutoscaling" not in rendered["spec"]["rayClusterSpec"]  # Kueue refuses autoscaling RayJobs
    assert kuberay_errors(kuberay_schema(), rendered) == []
    plain = render_rayjob(job(), owner_uid="uid-1", queue=queue_labels({PRIORITY_CLASS_LABEL: "high"}))  # no queue: no Kueue
    assert plain["spec"]["suspend"] is False and PRIORITY_CLASS_LABEL not in plain["metadata"]["labels"]


def test_the_operator_never_unsuspends_a_queued_rayjob():
    held = queued_rayjob()
    desired = render_rayjob(job(runPolicy={"activeDeadlineSeconds": 600}), owner_uid="uid-1")  # the spec says suspend: false
    assert mutable_patch(desired, held) == {"activeDeadlineSeconds": 600}  # the deadline goes through, suspend stays Kueue's
    admitted = {**held, "spec": {**held["spec"], "suspend": False}}  # Kueue lifted it
    assert mutable_patch(render_rayjob(job(), owner_uid="uid-1"), admitted) == {}
    unqueued = render_rayjob(job(runPolicy={"suspend": True}), owner_uid="uid-1")
    assert mutable_patch(render_rayjob(job(), owner_uid="uid-1"), unqueued) == {"suspend": False}  # the user's own suspend still works


@pytest.mark.parametrize("kuberay_status", [{}, {"jobDeploymentStatus": "Suspended"}, {"jobDeploymentStatus": "Suspending"}])
def test_a_held_rayjob_is_pending_waiting_for_quota(kuberay_status):
    held = queued_rayjob()
    message = held_by_kueue(held)
    assert message and "waiting for quota" in message and "team-a" in message and "priority low" in message
    held["status"] = kuberay_status
    status = next_status(FineTuneJobStatus(), kuberay_status, generation=1, now=T0, ray_job_name="x-ray", kueue=kueue_observation(held))
    assert (status.phase, status.reason, status.message) == (Phase.PENDING, Reason.WAITING_FOR_QUOTA, message)
    assert "runPolicy.suspend" not in (status.message or "")


def test_once_admitted_the_status_follows_kuberay_and_a_preemption_waits_again():
    held = queued_rayjob()
    admitted = {**held, "spec": {**held["spec"], "suspend": False}}
    assert held_by_kueue(admitted) is None and queue_of(admitted) == "team-a"
    admitted["status"] = {"jobDeploymentStatus": "Suspended"}  # Kueue has lifted it, KubeRay has not acted yet
    starting = next_status(FineTuneJobStatus(), admitted["status"], generation=1, now=T0, ray_job_name="x-ray",
                           kueue=kueue_observation(admitted))
    assert (starting.phase, starting.reason) == (Phase.PENDING, Reason.CLUSTER_STARTING) and "admitted" in (starting.message or "")
    admitted["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    assert kueue_observation(admitted) is None
    running = next_status(starting, admitted["status"], generation=1, now=T0, ray_job_name="x-ray", kueue=None)
    assert running.phase == Phase.RUNNING
    held["status"] = {"jobDeploymentStatus": "Suspending", "jobStatus": "RUNNING"}
    preempted = next_status(running, held["status"], generation=1, now=T0, ray_job_name="x-ray", kueue=kueue_observation(held))
    assert (preempted.phase, preempted.reason) == (Phase.PENDING, Reason.WAITING_FOR_QUOTA)
    unqueued = render_rayjob(job(runPolicy={"suspend": True}), owner_uid="uid-1")
    unqueued["status"] = {"jobDeploymentStatus": "Suspended"}
    assert held_by_kueue(unqueued) is None and kueue_observation(unqueued) is None  # the user's suspend: Suspended, as before


def test_queue_labels_rule_out_a_suspend_kueue_would_ignore_and_a_priority_without_a_queue():
    [(path, message)] = queue_problems({QUEUE_NAME_LABEL: "team-a"}, suspend=True)
    assert path == "spec.runPolicy.suspend" and "active" in message and "remove spec.runPolicy.suspend" in message
    [(path, message)] = queue_problems({PRIORITY_CLASS_LABEL: "high"}, suspend=False)
    assert path == f"metadata.labels[{PRIORITY_CLASS_LABEL}]" and QUEUE_NAME_LABEL in message
    assert queue_problems(QUEUED, suspend=False) == [] and queue_problems({}, suspend=True) == []
