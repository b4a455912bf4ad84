"""KubeRay's RayJob status -> FineTuneJob status: every jobDeploymentStatus x jobStatus pair, the
transition table, condition timestamps, the trainer's progress and its preflight's verdict."""

from __future__ import annotations

import itertools
import pathlib
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from finetune_operator.status_mapping import (
    DEPLOYMENT_STATUSES,
    JOB_STATUSES,
    apply_progress,
    failed_status,
    next_status,
    observe,
    rejected_status,
    spec_change_ignored,
    trainer_problems,
)
from finetune_operator.status_model import ALLOWED_TRANSITIONS, FineTuneJobStatus, Phase, Reason
from finetune_trainer.spec.progress import ProgressDocument

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
T2 = T0 + timedelta(minutes=10)
RAYJOB = "job-ray"
DASHBOARD = "http://job-ray-head-svc.ns.svc:8265"
KUBERAY_CRD = pathlib.Path("/work/shared/contracts/kuberay-v1.7.0/ray.io_rayjobs.yaml")

# (jobDeploymentStatus, jobStatus) -> (phase, reason, Ready, Reconciling, Stalled); None = any jobStatus
EXPECTED: dict[tuple[str, str | None], tuple[Phase, Reason, bool, bool, bool]] = {
    ("", None): (Phase.PENDING, Reason.CLUSTER_STARTING, False, True, False),
    ("Initializing", None): (Phase.PENDING, Reason.CLUSTER_STARTING, False, True, False),
    ("Waiting", None): (Phase.PENDING, Reason.CLUSTER_STARTING, False, True, False),
    ("Scheduling", None): (Phase.PENDING, Reason.CLUSTER_STARTING, False, True, False),
    ("Scheduled", None): (Phase.PENDING, Reason.CLUSTER_STARTING, False, True, False),
    ("Running", ""): (Phase.PENDING, Reason.JOB_SUBMITTED, False, True, False),
    ("Running", "PENDING"): (Phase.PENDING, Reason.JOB_SUBMITTED, False, True, False),
    ("Running", "SCHEDULED"): (Phase.PENDING, Reason.JOB_SUBMITTED, False, True, False),
    ("Running", "RUNNING"): (Phase.RUNNING, Reason.TRAINING, False, True, False),
    # the driver ended; KubeRay moves the deployment to Complete/Failed on its next pass
    ("Running", "SUCCEEDED"): (Phase.RUNNING, Reason.TRAINING, False, True, False),
    ("Running", "FAILED"): (Phase.RUNNING, Reason.TRAINING, False, True, False),
    ("Running", "STOPPED"): (Phase.RUNNING, Reason.TRAINING, False, True, False),
    ("Complete", "SUCCEEDED"): (Phase.SUCCEEDED, Reason.SUCCEEDED, True, False, False),
    ("Complete", "STOPPED"): (Phase.FAILED, Reason.STOPPED, False, False, True),
    ("Complete", "FAILED"): (Phase.FAILED, Reason.FAILED, False, False, True),
    ("Complete", ""): (Phase.FAILED, Reason.FAILED, False, False, True),
    ("Complete", "PENDING"): (Phase.FAILED, Reason.FAILED, False, False, True),
    ("Complete", "RUNNING"): (Phase.FAILED, Reason.FAILED, False, False, True),
    ("Complete", "SCHEDULED"): (Phase.FAILED, Reason.FAILED, False, False, True),
    ("Failed", None): (Phase.FAILED, Reason.FAILED, False, False, True),
    ("ValidationFailed", None): (Phase.FAILED, Reason.RAYJOB_INVALID, False, False, True),
    ("Retrying", None): (Phase.PENDING, Reason.RETRYING, False, True, False),
    ("Suspending", None): (Phase.SUSPENDED, Reason.SUSPENDING, False, True, False),
    ("Suspended", None): (Phase.SUSPENDED, Reason.SUSPENDED, False, False, False),
}
PAIRS = list(itertools.product(DEPLOYMENT_STATUSES, JOB_STATUSES))


def expected(deployment: str, job: str) -> tuple[Phase, Reason, bool, bool, bool]:
    return EXPECTED.get((deployment, job)) or EXPECTED[(deployment, None)]


def conds(status: FineTuneJobStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def test_the_table_covers_every_value_kuberay_defines():
    assert set(DEPLOYMENT_STATUSES) >= {"", "Initializing", "Running", "Complete", "Failed", "ValidationFailed",
                                        "Suspending", "Suspended", "Retrying", "Waiting"}
    assert set(JOB_STATUSES) >= {"", "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"}
    covered = {d for d, _ in EXPECTED}
    assert covered == set(DEPLOYMENT_STATUSES)
    if KUBERAY_CRD.exists():  # the v1.7.0 CRD keeps both as free strings: no enum we could miss
        for doc in yaml.safe_load_all(KUBERAY_CRD.read_text()):
            status = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
            assert status["jobDeploymentStatus"]["type"] == "string" and "enum" not in status["jobDeploymentStatus"]


@pytest.mark.parametrize(("deployment", "job"), PAIRS, ids=[f"{d or 'New'}-{j or 'none'}" for d, j in PAIRS])
def test_every_kuberay_status_pair_from_a_fresh_job(deployment: str, job: str):
    phase, reason, ready, reconciling, stalled = expected(deployment, job)
    kuberay = {"jobDeploymentStatus": deployment, "jobStatus": job, "rayClusterName": "job-ray-abcde",
               "dashboardURL": "job-ray-head-svc.ns.svc.cluster.local:8265", "startTime": "2026-01-01T09:00:00Z",
               "endTime": "2026-01-01T09:30:00Z"}
    status = next_status(FineTuneJobStatus(), kuberay, generation=3, now=T0, ray_job_name=RAYJOB, dashboard_url=DASHBOARD)
    assert (status.phase, status.reason) == (phase, reason)
    assert conds(status) == {"Ready": ("True" if ready else "False", reason),
                             "Reconciling": ("True" if reconciling else "False", reason),
                             "Stalled": ("True" if stalled else "False", reason)}
    assert all(c.observed_generation == 3 and c.last_transition_time == T0 for c in status.conditions)
    assert status.observed_generation == 3 and status.ray_job_name == RAYJOB
    assert status.ray_cluster_name == "job-ray-abcde"
    assert status.dashboard_url == DASHBOARD  # ours (the pinned head Service), not KubeRay's
    assert status.start_time == datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
    assert status.completion_time == (datetime(2026, 1, 1, 9, 30, tzinfo=UTC) if phase.is_terminal() else None)
    assert status.message


@pytest.mark.parametrize(("deployment", "job"), PAIRS, ids=[f"{d or 'New'}-{j or 'none'}" for d, j in PAIRS])
@pytest.mark.parametrize("before", list(Phase))
def test_every_pair_from_every_phase_respects_the_transition_table(before: Phase, deployment: str, job: str):
    previous = next_status(FineTuneJobStatus(), _kuberay_for(before), generation=1, now=T0, ray_job_name=RAYJOB)
    assert previous.phase == before
    status = next_status(previous, {"jobDeploymentStatus": deployment, "jobStatus": job}, generation=1, now=T1,
                         ray_job_name=RAYJOB)
    wanted = expected(deployment, job)[0]
    if before.is_terminal() and wanted != before:
        assert status.phase == before and status.conditions == previous.conditions  # a finished run stays finished
    else:
        assert status.phase == wanted
        assert wanted == before or wanted in ALLOWED_TRANSITIONS[before] or (
            Phase.PENDING in ALLOWED_TRANSITIONS[before] and wanted in ALLOWED_TRANSITIONS[Phase.PENDING])


def test_a_finished_job_restarts_only_for_a_new_generation():
    failed = failed_status(FineTuneJobStatus(), Reason.INVALID_SPEC, "invalid spec: ...", generation=1, now=T0)
    stray = next_status(failed, {"jobDeploymentStatus": "Initializing"}, generation=1, now=T1, ray_job_name=RAYJOB)
    assert stray.phase == Phase.FAILED
    rerun = next_status(failed, {"jobDeploymentStatus": "Initializing"}, generation=2, now=T1, ray_job_name=RAYJOB)
    assert rerun.phase == Phase.PENDING and rerun.completion_time is None
    done = next_status(FineTuneJobStatus(), {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, generation=1,
                       now=T0, ray_job_name=RAYJOB)
    # Succeeded -> Failed is never a transition, whatever the generation
    assert next_status(done, {"jobDeploymentStatus": "Failed"}, generation=2, now=T1, ray_job_name=RAYJOB).phase == Phase.SUCCEEDED


def _kuberay_for(phase: Phase) -> dict[str, str]:
    return {
        Phase.PENDING: {"jobDeploymentStatus": "Initializing"},
        Phase.RUNNING: {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
        Phase.SUCCEEDED: {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
        Phase.FAILED: {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"},
        Phase.SUSPENDED: {"jobDeploymentStatus": "Suspended"},
    }[phase]


def test_last_transition_time_moves_only_when_a_condition_flips():
    pending = next_status(FineTuneJobStatus(), {"jobDeploymentStatus": "Initializing"}, generation=1, now=T0, ray_job_name=RAYJOB)
    running = next_status(pending, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, generation=1, now=T1, ray_job_name=RAYJOB)
    times = {c.type: c.last_transition_time for c in running.conditions}
    assert times == {"Ready": T0, "Reconciling": T0, "Stalled": T0}  # none flipped; reasons moved on
    assert {c.reason for c in running.conditions} == {"Training"}
    done = next_status(running, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, generation=1, now=T2, ray_job_name=RAYJOB)
    times = {c.type: c.last_transition_time for c in done.conditions}
    assert times == {"Ready": T2, "Reconciling": T2, "Stalled": T0}
    assert done.completion_time == T2  # KubeRay gave no endTime: the moment we saw it


def test_kuberay_reasons_and_messages_reach_the_status():
    deadline = next_status(FineTuneJobStatus(), {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded",
                                                 "message": "The RayJob has passed the activeDeadlineSeconds."},
                           generation=1, now=T0, ray_job_name=RAYJOB)
    assert deadline.reason == Reason.DEADLINE_EXCEEDED
    assert "activeDeadlineSeconds" in deadline.message
    app = observe({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": "exit code 1"})
    assert (app.phase, app.reason, app.message) == (Phase.FAILED, Reason.FAILED, "AppFailed: exit code 1")
    assert observe(None).phase == Phase.PENDING
    assert observe({"jobDeploymentStatus": "SomethingNew"}).reason == Reason.CLUSTER_STARTING


def test_suspended_then_running_without_the_initializing_in_between_passes_through_pending():
    suspended = next_status(FineTuneJobStatus(), {"jobDeploymentStatus": "Suspended"}, generation=1, now=T0, ray_job_name=RAYJOB)
    running = next_status(suspended, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, generation=2, now=T1, ray_job_name=RAYJOB)
    assert running.phase == Phase.RUNNING and running.observed_generation == 2


def test_invalid_spec_and_missing_secret():
    failed = failed_status(FineTuneJobStatus(), Reason.INVALID_SPEC, "invalid spec: spec.freezing.layers: needed",
                           generation=1, now=T0)
    assert (failed.phase, failed.reason) == (Phase.FAILED, Reason.INVALID_SPEC)
    assert conds(failed) == {"Ready": ("False", "InvalidSpec"), "Reconciling": ("False", "InvalidSpec"),
                             "Stalled": ("True", "InvalidSpec")}
    assert "spec.freezing.layers" in failed.message
    fixed = next_status(failed, {}, generation=2, now=T1, ray_job_name=RAYJOB)  # the fixed spec's RayJob, just created
    assert (fixed.phase, conds(fixed)["Stalled"]) == (Phase.PENDING, ("False", "ClusterStarting"))



def test_spec_change_ignored_is_a_domain_condition_set_and_cleared():
    running = next_status(FineTuneJobStatus(), {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, generation=1, now=T0,
                          ray_job_name=RAYJOB)
    flagged = spec_change_ignored(running, ["spec.training.learningRate"], generation=2, now=T1)
    cond = next(c for c in flagged.conditions if c.type == "SpecChangeIgnored")
    assert (cond.status, cond.reason, cond.observed_generation) == ("True", "ImmutableFieldChanged", 2)
    assert cond.message.startswith("spec.training.learningRate cannot change") and "delete and re-create" in cond.message
    assert flagged.phase == Phase.RUNNING and flagged.observed_generation == 2
    again = spec_change_ignored(flagged, ["spec.training.learningRate", "spec.model.source"], generation=3, now=T2)
    assert next(c for c in again.conditions if c.type == "SpecChangeIgnored").last_transition_time == T1
    cleared = spec_change_ignored(again, [], generation=4, now=T2)
    assert [c.type for c in cleared.conditions] == ["Ready", "Reconciling", "Stalled"]


PROGRESS = {
    "job": "search", "run": "run-1", "updated": "2026-01-01T10:03:00+00:00", "state": "running", "kind": "search",
    "trials": {"total": 8, "completed": 2, "running": 2, "stopped": 1, "failed": 0}, "step": 90, "totalSteps": 120,
    "bestTrial": {"name": "trial_3", "metric": "accuracy", "value": 0.8412, "params": {"freezing.strategy": "none"},
                  "checkpoint": "s3://b/p/ns/search/run-1/trial_3/checkpoint_000002"},
    "bestCheckpoint": "s3://b/p/ns/search/run-1/trial_3/checkpoint_000002", "model": None,
}


def test_progress_fills_trials_best_trial_and_checkpoint():
    running = next_status(FineTuneJobStatus(), {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, generation=1, now=T0,
                          ray_job_name=RAYJOB)
    status = apply_progress(running, doc(PROGRESS))
    assert status.trials_done == "3/8"
    assert status.trials is not None and status.trials.running == 2
    assert status.best_trial is not None and (status.best_trial.metric, status.best_trial.value) == ("accuracy", 0.8412)
    assert status.best_checkpoint == PROGRESS["bestCheckpoint"]
    assert status.message == "the trainer is running; 3/8 trials done; best accuracy 0.8412 (trial_3)"
    patch = status.to_patch()
    assert patch["trialsDone"] == "3/8" and patch["bestTrial"]["checkpoint"].startswith("s3://")
    # a later KubeRay report keeps the progress in the message
    again = next_status(status, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, generation=1, now=T1, ray_job_name=RAYJOB)
    assert "3/8 trials done" in again.message


def test_the_best_trials_strategy_reaches_the_status_and_its_message():
    """Issue 17: one search mixes strategies and adapters; the status names the best one's."""
    running = next_status(FineTuneJobStatus(), {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, generation=1, now=T0,
                          ray_job_name=RAYJOB)
    progress = {**PROGRESS, "bestTrial": {**PROGRESS["bestTrial"], "strategy": "lora r=16", "params": {"freezing.strategy": "lora"}}}
    status = apply_progress(running, doc(progress))
    assert status.best_trial is not None and status.best_trial.strategy == "lora r=16"
    assert status.to_patch()["bestTrial"]["strategy"] == "lora r=16"
    assert status.message == "the trainer is running; 3/8 trials done; best accuracy 0.8412 (trial_3, lora r=16)"


def doc(data: dict | None) -> ProgressDocument | None:
    """What progress.py hands on: the typed document, or None for none or one that is not one."""
    return None if data is None else ProgressDocument.read(data)


@pytest.mark.parametrize("bad", [None, {}, {**PROGRESS, "trials": "many"}, {**PROGRESS, "trials": {"total": -1}},
                                 {**PROGRESS, "bestTrial": {"name": "x"}}, {**PROGRESS, "state": "exploded"}])
def test_malformed_progress_changes_nothing(bad):
    before = FineTuneJobStatus(phase=Phase.RUNNING)
    assert doc(bad) is None and apply_progress(before, doc(bad)) == before


def test_a_single_run_has_no_best_trial_yet():
    status = apply_progress(FineTuneJobStatus(phase=Phase.RUNNING), doc({**PROGRESS, "trials": {"total": 1, "running": 1},
                                                                         "bestTrial": None, "bestCheckpoint": None}))
    assert (status.trials_done, status.best_trial, status.best_checkpoint) == ("0/1", None, None)


# what the trainer's preflight writes before any training when the spec cannot fit the model
INVALID = {"job": "search", "run": "run-2", "updated": "2026-01-01T10:03:00+00:00", "kind": "search", "state": "invalid",
           "problems": [{"path": "spec.freezing.layers",
                         "message": "12 exceeds the 6 layers of models/tiny; use at most 6 or a fraction like 0.5"}]}


def test_the_trainers_verdict_names_each_field():
    assert trainer_problems(doc(INVALID)) == [("spec.freezing.layers", INVALID["problems"][0]["message"])]
    two = {**INVALID, "problems": [*INVALID["problems"], {"path": "spec.data.textColumn", "message": "no such column"}, "junk",
                                   {"path": "spec.x"}]}  # entries naming no field or saying nothing are dropped
    assert [p for p, _ in trainer_problems(doc(two))] == ["spec.freezing.layers", "spec.data.textColumn"]
    assert trainer_problems(doc({**INVALID, "problems": []})) == [
        ("spec", "the trainer found the spec invalid before training (it named no field)")]
    for other in (None, {}, PROGRESS, {**INVALID, "state": "failed"}):
        assert trainer_problems(doc(other)) == []


def test_a_verdict_older_than_the_rayjob_is_a_previous_runs():
    def rayjob(created: str) -> dict:
        return {"metadata": {"name": RAYJOB, "creationTimestamp": created}}

    assert trainer_problems(doc(INVALID), rayjob=rayjob("2026-01-01T10:00:00Z"))  # this run's
    assert trainer_problems(doc(INVALID), rayjob=rayjob("2026-01-01T10:05:00Z")) == []  # the fixed spec's new run
    assert trainer_problems(doc({**INVALID, "updated": "2026-01-01T10:03:00"}), rayjob=rayjob("2026-01-01T10:05:00Z")) == []
    assert doc({**INVALID, "updated": "yesterday"}) is None  # no time, no document (the trainer always writes one)
    assert trainer_problems(doc(INVALID), rayjob={"metadata": {}}) and trainer_problems(doc(INVALID), rayjob=None)


def test_a_rejected_run_is_stalled_invalid_spec_and_stays_so_for_its_generation():
    running = next_status(FineTuneJobStatus(), {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING",
                                                "rayClusterName": "job-ray-abc"}, generation=1, now=T0, ray_job_name=RAYJOB)
    rejected = rejected_status(running, trainer_problems(doc(INVALID)), generation=1, now=T1)
    assert (rejected.phase, rejected.reason) == (Phase.FAILED, Reason.INVALID_SPEC)
    assert conds(rejected) == {"Ready": ("False", "InvalidSpec"), "Reconciling": ("False", "InvalidSpec"),
                               "Stalled": ("True", "InvalidSpec")}
    assert rejected.message.startswith("invalid spec (found by the trainer before training): spec.freezing.layers: 12 exceeds")
    assert (rejected.ray_job_name, rejected.ray_cluster_name, rejected.observed_generation) == (RAYJOB, "job-ray-abc", 1)
    # KubeRay's account of the rejected run's end (or a retry) does not replace the verdict...
    for report in ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed"},
                   {"jobDeploymentStatus": "Retrying"}, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}):
        after = next_status(rejected, report, generation=1, now=T2, ray_job_name=RAYJOB)
        assert (after.phase, after.reason, after.message) == (Phase.FAILED, Reason.INVALID_SPEC, rejected.message)
    # ...until the spec changes: the new generation's RayJob starts over
    fixed = next_status(rejected, {}, generation=2, now=T2, ray_job_name=RAYJOB)
    assert (fixed.phase, fixed.reason, conds(fixed)["Stalled"]) == (Phase.PENDING, Reason.CLUSTER_STARTING, ("False", "ClusterStarting"))


def test_a_verdict_carries_no_progress():
    running = apply_progress(FineTuneJobStatus(phase=Phase.RUNNING, reason=Reason.TRAINING), doc(PROGRESS))
    assert apply_progress(running, doc(INVALID)) == running


def test_ray_auth_disabled_is_a_condition_while_it_lasts_and_keeps_its_transition_time():
    from finetune_operator.status_mapping import ray_auth_disabled

    start = FineTuneJobStatus(phase=Phase.RUNNING, reason=Reason.TRAINING)
    on = ray_auth_disabled(start, True, generation=1, now=T0)
    (cond,) = [c for c in on.conditions if c.type == "RayAuthDisabled"]
    assert (cond.status, cond.reason, cond.last_transition_time) == ("True", "RayAuthDisabled", T0)
    assert "accept anyone" in cond.message
    later = ray_auth_disabled(on, True, generation=2, now=T0 + timedelta(hours=1))
    assert [c.last_transition_time for c in later.conditions if c.type == "RayAuthDisabled"] == [T0]
    assert "RayAuthDisabled" not in [c.type for c in ray_auth_disabled(later, False, generation=3, now=T0).conditions]
    assert (later.phase, later.reason) == (Phase.RUNNING, Reason.TRAINING)  # the condition alone changes
