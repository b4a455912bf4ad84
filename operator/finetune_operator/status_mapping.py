"""KubeRay's RayJob status (and the trainer's status.json) -> `FineTuneJob.status`: pure functions.

KubeRay reports two axes (as its RayJob controller keeps them): `jobDeploymentStatus`, the
lifecycle of the RayJob and its Ray cluster, and `jobStatus`, what Ray says of the driver. `observe`
turns the pair into one `Observation` (our phase, a reason, and whether the job is still working or
is stuck); `next_status` folds it into the previous status: the phase moves only along
`status_model.ALLOWED_TRANSITIONS`, and a condition's `lastTransitionTime` changes only when its
status does (metav1 semantics, what `kubectl wait` and kstatus rely on). No client, clock or env
var here: the handlers pass `now` and write the result once.

The trainer's status.json adds progress (`apply_progress`) and one verdict: `state: invalid` with
`problems` when its preflight inside the Ray cluster finds what the operator cannot see (more
layers to freeze than the model has). `trainer_problems` reads it and `rejected_status` turns it
into the operator's own InvalidSpec outcome; once a generation is rejected, KubeRay's later
reports on that run change nothing until the spec does.

The table (every value KubeRay v1.7 can set; an unknown one is treated as "still starting"):

    jobDeploymentStatus        jobStatus                       phase      reason
    "" / Initializing          any                             Pending    ClusterStarting
    Waiting / Scheduling /     any                             Pending    ClusterStarting
      Scheduled
    Running                    "" / PENDING / SCHEDULED        Pending    JobSubmitted
    Running                    RUNNING                         Running    Training
    Running                    SUCCEEDED / FAILED / STOPPED    Running    Training  (KubeRay finishes next)
    Complete                   SUCCEEDED                       Succeeded  Succeeded
    Complete                   STOPPED                         Failed     Stopped
    Complete                   FAILED / "" / PENDING / RUNNING Failed     Failed
    Failed                     any                             Failed     DeadlineExceeded if KubeRay's reason
                                                                          says so, else Failed
    ValidationFailed           any                             Failed     RayJobInvalid
    Retrying                   any                             Pending    Retrying
    Suspending                 any                             Suspended  Suspending (still reconciling)
    Suspended                  any                             Suspended  Suspended

A RayJob Kueue holds (kueue.py: in a queue and suspended) is Pending/WaitingForQuota whatever
KubeRay says of it (created suspended, or Suspending/Suspended after a preemption): the user did
not ask for that suspension (a queued job cannot carry spec.runPolicy.suspend).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from finetune_trainer.spec.progress import INVALID, ProgressDocument

from .status_model import (
    BestTrial,
    Condition,
    ConditionType,
    FineTuneJobStatus,
    Phase,
    Reason,
    can_transition,
)

# KubeRay's values (ray-operator/apis/ray/v1/rayjob_types.go)
DEPLOYMENT_STATUSES = ("", "Initializing", "Running", "Complete", "Failed", "ValidationFailed", "Suspending",
                       "Suspended", "Retrying", "Waiting", "Scheduling", "Scheduled")
JOB_STATUSES = ("", "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED", "SCHEDULED")
TERMINAL_JOB_STATUSES = frozenset({"STOPPED", "SUCCEEDED", "FAILED"})


@dataclass(frozen=True)
class Observation:
    """What one RayJob status means for the FineTuneJob."""

    phase: Phase
    reason: Reason
    message: str
    reconciling: bool  # the operator or KubeRay is still working towards the goal
    stalled: bool  # it cannot progress without a change from a person


def observe(rayjob_status: Mapping[str, Any] | None) -> Observation:
    """The table in the module docstring, for one RayJob `.status`."""
    st = rayjob_status or {}
    deployment, job = str(st.get("jobDeploymentStatus") or ""), str(st.get("jobStatus") or "")
    said = str(st.get("message") or "").strip()

    def why(default: str) -> str:
        return f"{default}: {said}" if said else default

    if deployment == "Running":
        if job == "RUNNING" or job in TERMINAL_JOB_STATUSES:
            return Observation(Phase.RUNNING, Reason.TRAINING, "the trainer is running", True, False)
        return Observation(Phase.PENDING, Reason.JOB_SUBMITTED, "the Ray cluster is up; the trainer's Ray job is starting", True, False)
    if deployment == "Complete":
        if job == "SUCCEEDED":
            return Observation(Phase.SUCCEEDED, Reason.SUCCEEDED, "the run finished", False, False)
        if job == "STOPPED":
            return Observation(Phase.FAILED, Reason.STOPPED, why("the Ray job was stopped before it finished"), False, True)
        return Observation(Phase.FAILED, Reason.FAILED, why(f"the run ended with Ray job status {job or 'unknown'}"), False, True)
    if deployment == "Failed":
        if st.get("reason") == "DeadlineExceeded":
            return Observation(Phase.FAILED, Reason.DEADLINE_EXCEEDED,
                               why("the run exceeded spec.runPolicy.activeDeadlineSeconds"), False, True)
        kuberay_reason = st.get("reason") or "the run failed"
        return Observation(Phase.FAILED, Reason.FAILED, why(str(kuberay_reason)), False, True)
    if deployment == "ValidationFailed":
        return Observation(Phase.FAILED, Reason.RAYJOB_INVALID, why("KubeRay rejected the RayJob"), False, True)
    if deployment == "Retrying":
        return Observation(Phase.PENDING, Reason.RETRYING,
                           why("the run failed; KubeRay retries it on a new Ray cluster (spec.runPolicy.backoffLimit)"), True, False)
    if deployment == "Suspending":
        return Observation(Phase.SUSPENDED, Reason.SUSPENDING, "spec.runPolicy.suspend: deleting the Ray cluster", True, False)
    if deployment == "Suspended":
        return Observation(Phase.SUSPENDED, Reason.SUSPENDED,
                           "spec.runPolicy.suspend is true: no pods until it is set to false", False, False)
    # "", Initializing, Waiting, Scheduling, Scheduled, and anything a newer KubeRay adds
    return Observation(Phase.PENDING, Reason.CLUSTER_STARTING, "the Ray cluster is starting", True, False)


def next_status(
    previous: FineTuneJobStatus,
    rayjob_status: Mapping[str, Any] | None,
    *,
    generation: int,
    now: datetime,
    ray_job_name: str,
    dashboard_url: str | None = None,
    kueue: Observation | None = None,
) -> FineTuneJobStatus:
    """The FineTuneJob status after seeing `rayjob_status` (the RayJob's `.status`, maybe empty);
    `kueue`: what Kueue's hold on a queued RayJob says instead (kueue.kueue_observation)."""
    st = rayjob_status or {}
    seen = observe(st)
    if kueue is not None and not seen.phase.is_terminal():
        seen = kueue
    phase = _reachable(previous.phase, seen.phase, new_generation=generation != previous.observed_generation)
    if _rejected(previous, generation):  # KubeRay's word on the end of a run the trainer rejected adds nothing
        phase = None
    status = previous.model_copy(deep=True)
    status.observed_generation = generation
    status.ray_job_name = ray_job_name
    status.ray_cluster_name = st.get("rayClusterName") or previous.ray_cluster_name
    status.dashboard_url = dashboard_url or st.get("dashboardURL") or previous.dashboard_url
    if phase is None:  # e.g. Succeeded, then a stray Failed: the finished run's status stands
        return status
    status.start_time = previous.start_time or _time(st.get("startTime"))
    if phase.is_terminal():
        status.completion_time = previous.completion_time or _time(st.get("endTime")) or now
    else:
        status.completion_time = None
    status.phase, status.reason = phase, seen.reason
    status.message = with_progress(seen.message, status) if phase == Phase.RUNNING else seen.message
    ready = phase == Phase.SUCCEEDED
    return conditioned(status, generation, now, ready=ready, reconciling=seen.reconciling, stalled=seen.stalled)


def failed_status(previous: FineTuneJobStatus, reason: Reason, message: str, *, generation: int,
                  now: datetime) -> FineTuneJobStatus:
    """Invalid spec: no RayJob, Stalled with the reason and a message naming the field."""
    status = previous.model_copy(deep=True)
    status.observed_generation = generation
    status.phase = _reachable(previous.phase, Phase.FAILED, new_generation=True) or previous.phase
    status.reason, status.message = reason, message
    status.completion_time = None
    return conditioned(status, generation, now, ready=False, reconciling=False, stalled=True)


def spec_change_ignored(previous: FineTuneJobStatus, fields: Sequence[str], *, generation: int,
                        now: datetime, reason: Reason = Reason.IMMUTABLE_FIELD_CHANGED,
                        detail: str | None = None) -> FineTuneJobStatus:
    """A spec change the existing RayJob cannot take: the run goes on with the spec it started
    with; the domain condition says which fields and what to do. `fields` empty clears it."""
    status = previous.model_copy(deep=True)
    status.observed_generation = generation
    if not fields:
        status.conditions = [c for c in status.conditions if c.type != ConditionType.SPEC_CHANGE_IGNORED]
        return status
    message = detail or (
        f"{', '.join(fields)} cannot change while the run exists; the run continues with the spec it started "
        "with. To run the new spec, delete and re-create the FineTuneJob, or apply it under a new name "
        "(only spec.runPolicy.suspend, activeDeadlineSeconds and ttlSecondsAfterFinished change a running job)"
    )
    status.conditions = set_condition(status.conditions, ConditionType.SPEC_CHANGE_IGNORED, True, reason, message, generation, now)
    return status


RAY_AUTH_DISABLED_MESSAGE = (
    "spec.cluster.auth is disabled: the Ray dashboard, job API and GCS of this job accept anyone who reaches "
    "the head's ports (any pod the network lets through) and let them submit jobs and run code with the "
    "job's credentials; remove spec.cluster.auth (token is the default) unless the network is closed to all others"
)


def ray_auth_disabled(previous: FineTuneJobStatus, disabled: bool, *, generation: int, now: datetime) -> FineTuneJobStatus:
    """The RayAuthDisabled condition: True (with the risk spelled out) while the job's Ray cluster
    runs without token authentication, absent otherwise."""
    status = previous.model_copy(deep=True)
    if not disabled:
        status.conditions = [c for c in status.conditions if c.type != ConditionType.RAY_AUTH_DISABLED]
        return status
    status.conditions = set_condition(status.conditions, ConditionType.RAY_AUTH_DISABLED, True, Reason.RAY_AUTH_DISABLED,
                                       RAY_AUTH_DISABLED_MESSAGE, generation, now)
    return status


def trainer_problems(progress: ProgressDocument | None, *, rayjob: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """The spec problems the trainer's preflight found inside the Ray cluster (what the operator
    cannot see: the model's layer count, the data's columns), from a status.json whose `state` is
    `invalid`; empty for any other state.

    `rayjob` is the job's current RayJob: a status.json last written before it was created is a
    previous run's (the one whose fix started this run), so its verdict is not this run's."""
    if progress is None or progress.state != INVALID:
        return []
    written, run_created = _utc(progress.updated), created_at(rayjob)
    if run_created is not None and written is not None and written < run_created:
        return []
    problems = [(p.path, p.message) for p in progress.problems]
    return problems or [("spec", "the trainer found the spec invalid before training (it named no field)")]


def rejected_status(previous: FineTuneJobStatus, problems: Sequence[tuple[str, str]], *, generation: int,
                    now: datetime, newer: int | None = None) -> FineTuneJobStatus:
    """The trainer's preflight rejected the spec of `generation`: the same outcome as the operator's
    own validation (Failed, Stalled/InvalidSpec, a message naming each field); the handler deletes
    the RayJob. `newer`: the generation the user has written since, which runs next."""
    message = "; ".join(f"{path}: {msg}" for path, msg in problems)
    if newer is not None:
        message += f". The spec has changed since (generation {newer}); it runs once this run's RayJob is gone"
    status = failed_status(previous, Reason.INVALID_SPEC, f"invalid spec (found by the trainer before training): {message}",
                           generation=generation, now=now)
    if newer is not None:  # the ignored change is about to be applied, not ignored
        status.conditions = [c for c in status.conditions if c.type != ConditionType.SPEC_CHANGE_IGNORED]
    return status


def apply_progress(previous: FineTuneJobStatus, progress: ProgressDocument | None) -> FineTuneJobStatus:
    """Mirror the trainer's status.json (trials, best trial, best checkpoint) into the status.

    No document (none yet, or one progress.py could not parse) changes nothing: progress is best
    effort, the phase comes from KubeRay. Nor does a verdict (`state: invalid`, see
    trainer_problems): it carries no progress."""
    if progress is None or progress.state == INVALID:
        return previous
    status = previous.model_copy(deep=True)
    trials = progress.trials or status.trials
    if trials is not None:
        status.trials, status.trials_done = trials.model_copy(), trials.done_text()
    best = progress.best_trial
    if best is not None:  # the status shows the trial without the trainer's extras (its step)
        status.best_trial = BestTrial.model_validate(best.model_dump())
    checkpoint = progress.best_checkpoint or (best.checkpoint if best else None)
    if checkpoint:
        status.best_checkpoint = checkpoint
    # the trainer bounds both lists (spec.progress: STATUS_TRIALS trials, STATUS_SAMPLES samples, SAMPLE_CHARS each)
    if progress.samples:
        status.samples = [s.model_copy() for s in progress.samples]
    if progress.forgetting:
        status.forgetting = [f.model_copy() for f in progress.forgetting]
    if status.phase == Phase.RUNNING and status.reason == Reason.TRAINING:
        status.message = with_progress("the trainer is running", status)
    return status


def _rejected(status: FineTuneJobStatus, generation: int) -> bool:
    """This generation failed validation: no run of it should exist, so no report changes that."""
    return status.phase == Phase.FAILED and status.reason == Reason.INVALID_SPEC and status.observed_generation == generation


def with_progress(message: str, status: FineTuneJobStatus) -> str:
    parts = [message]
    if status.trials_done:
        parts.append(f"{status.trials_done} trials done")
    if status.best_trial:
        best = status.best_trial
        parts.append(f"best {best.metric} {best.value:.4g} ({best.name}{', ' + best.strategy if best.strategy else ''})")
    return "; ".join(parts)


def _reachable(old: Phase | None, new: Phase, *, new_generation: bool = True) -> Phase | None:
    """`new` if the transition table allows it, directly or through Pending (a missed Initializing
    event between Suspended and Running); None when it does not. A finished run stays finished
    unless the spec moved to a new generation (the fixed manifest of an invalid job re-runs)."""
    if old is not None and old.is_terminal() and new != old and not new_generation:
        return None
    if can_transition(old, new):
        return new
    assert old is not None
    if not old.is_terminal() and can_transition(old, Phase.PENDING) and can_transition(Phase.PENDING, new):
        return new
    return None


def conditioned(status: FineTuneJobStatus, generation: int, now: datetime, *, ready: bool, reconciling: bool,
                 stalled: bool) -> FineTuneJobStatus:
    reason, message = status.reason or Reason.CLUSTER_STARTING, status.message or ""
    conditions = status.conditions
    for ctype, value in ((ConditionType.READY, ready), (ConditionType.RECONCILING, reconciling), (ConditionType.STALLED, stalled)):
        conditions = set_condition(conditions, ctype, value, reason, message, generation, now)
    status.conditions = conditions
    return status


def set_condition(conditions: list[Condition], ctype: str, value: bool, reason: str, message: str, generation: int,
                   now: datetime) -> list[Condition]:
    """Replace (or add) one condition; its lastTransitionTime moves only when its status changes."""
    text: Literal["True", "False"] = "True" if value else "False"
    old = next((c for c in conditions if c.type == ctype), None)
    since = old.last_transition_time if old is not None and old.status == text else now
    new = Condition(type=str(ctype), status=text, reason=str(reason), message=message[:32768],
                    last_transition_time=since, observed_generation=generation)
    out = [new if c.type == ctype else c for c in conditions]
    return out if old is not None else [*out, new]


def created_at(obj: Mapping[str, Any] | None) -> datetime | None:
    """An object's metadata.creationTimestamp (a RayJob's: when this run's attempt began), UTC."""
    return _utc(_time(((obj or {}).get("metadata") or {}).get("creationTimestamp")))


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
