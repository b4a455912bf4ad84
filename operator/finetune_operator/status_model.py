"""`FineTuneJob.status`, typed: what the operator writes and `kubectl get ftj` shows.

One pydantic model is the source of the CRD's status schema (crd.py) and of the status patches
the handlers write, so the two cannot drift. The phase is a small enum with an explicit table of
allowed transitions (as KubeRay's RayJob controller keeps one); conditions follow the
Kubernetes `metav1.Condition` shape with kstatus' `Ready` / `Reconciling` / `Stalled` types.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# `status.trials` and `status.bestTrial` are the trainer's progress document's counts and best
# trial (without its step) as they are: one definition, in the spec package, for both documents.
# A field added there appears here, and in the CRD's status schema, on purpose.
from finetune_trainer.spec.progress import CheckpointRef, Forgetting, TrialCounts, TrialSamples
from finetune_trainer.spec.progress import TrialSummary as BestTrial


class _StatusModel(BaseModel):
    # extra="ignore": a status written by another operator version must still be readable
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Phase(StrEnum):
    """Where the job is in its life. `kubectl get ftj` prints it."""

    PENDING = "Pending"  # accepted; the RayJob is being created or its Ray cluster is starting
    RUNNING = "Running"  # the trainer runs: trials train and report
    SUCCEEDED = "Succeeded"  # the search finished; bestTrial and bestCheckpoint are final
    FAILED = "Failed"  # invalid spec, or the run failed past its retries or deadline
    SUSPENDED = "Suspended"  # runPolicy.suspend: no pods until it is lifted

    def is_terminal(self) -> bool:
        return self in TERMINAL_PHASES


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})

# Every move the operator may make. Terminal phases are left only for a new generation of the
# spec (a fixed manifest re-runs from Pending); anything else is a bug in the status mapping.
ALLOWED_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PENDING: frozenset({Phase.RUNNING, Phase.SUSPENDED, Phase.FAILED, Phase.SUCCEEDED}),
    Phase.RUNNING: frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED, Phase.PENDING}),
    Phase.SUSPENDED: frozenset({Phase.PENDING, Phase.FAILED}),
    Phase.SUCCEEDED: frozenset({Phase.PENDING}),
    Phase.FAILED: frozenset({Phase.PENDING}),
}


def can_transition(old: Phase | None, new: Phase) -> bool:
    """A fresh object (no phase yet) may start anywhere; staying put is always allowed."""
    return old is None or old == new or new in ALLOWED_TRANSITIONS[old]


class ConditionType(StrEnum):
    READY = "Ready"  # True once the job succeeded; False with the reason while it is not
    RECONCILING = "Reconciling"  # True while the operator or KubeRay is still working towards the goal
    STALLED = "Stalled"  # True when it cannot progress without a change (invalid spec, failed run)
    # domain condition: True while the spec holds a change the running RayJob cannot take (the
    # message names the fields and what to do); absent otherwise
    SPEC_CHANGE_IGNORED = "SpecChangeIgnored"
    # domain condition: True while the job's Ray cluster runs without token authentication
    # (spec.cluster.auth: disabled); absent otherwise
    RAY_AUTH_DISABLED = "RayAuthDisabled"
    # domain condition: True from the moment KubeRay says the run succeeded until the trainer's
    # final status.json has been read (the job is Succeeded only then); absent otherwise
    RESULTS_PENDING = "ResultsPending"


class Reason(StrEnum):
    INVALID_SPEC = "InvalidSpec"  # the operator's validation, or the trainer's preflight in the cluster (status.json)
    RAYJOB_CREATED = "RayJobCreated"
    CLUSTER_STARTING = "ClusterStarting"
    TRAINING = "Training"
    SUSPENDED = "Suspended"
    WAITING_FOR_QUOTA = "WaitingForQuota"  # in a Kueue queue, suspended until Kueue admits it (kueue.py)
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    IMMUTABLE_FIELD_CHANGED = "ImmutableFieldChanged"  # a spec change the existing RayJob cannot take
    JOB_SUBMITTED = "JobSubmitted"  # the Ray cluster is up; the trainer's Ray job is pending
    RETRYING = "Retrying"  # the run failed and KubeRay retries it on a new Ray cluster (runPolicy.backoffLimit)
    SUSPENDING = "Suspending"  # runPolicy.suspend: KubeRay is deleting the Ray cluster
    STOPPED = "Stopped"  # the Ray job was stopped (ray job stop) before it finished
    RAYJOB_INVALID = "RayJobInvalid"  # KubeRay rejected the RayJob (ValidationFailed)
    RAY_AUTH_DISABLED = "RayAuthDisabled"  # spec.cluster.auth: disabled (a Warning Event and condition)
    RAYJOB_LOST = "RayJobLost"  # the RayJob was deleted before the run finished (re-created, or Failed with resume: never)
    WAITING_FOR_RESULTS = "WaitingForResults"  # the run succeeded; its final status.json is not read yet
    RESULTS_UNAVAILABLE = "ResultsUnavailable"  # Succeeded, but the final status.json never arrived (results.json has them)
    NON_FINITE_LOSS = "NonFiniteLoss"  # the loss became NaN/inf (spec.training.nonFiniteLoss: stop)
    RESUMED = "Resumed"  # an Event: the run continued from a checkpoint (which, from which step)


class Condition(_StatusModel):
    """metav1.Condition: the shape kubectl wait, kstatus and Argo CD understand."""

    type: str = Field(min_length=1, max_length=316, description="Ready, Reconciling or Stalled.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase reason for the last transition, e.g. InvalidSpec.",
    )
    message: str = Field(default="", max_length=32768, description="What happened, for people.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(default=None, ge=0, description="The spec generation this condition is about.")


class FineTuneJobStatus(_StatusModel):
    phase: Phase | None = Field(default=None, description="Pending, Running, Succeeded, Failed or Suspended.")
    reason: Reason | None = Field(default=None, description="Why the job is in its phase (CamelCase).")
    message: str | None = Field(default=None, description="A one-line summary, e.g. the spec problems.")
    conditions: list[Condition] = Field(
        default_factory=list, description="kstatus conditions: Ready, Reconciling, Stalled.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, ge=0, description="The spec generation the status reflects.")
    ray_job_name: str | None = Field(default=None, description="The KubeRay RayJob that runs the job.")
    ray_cluster_name: str | None = Field(default=None, description="The RayCluster KubeRay started for it.")
    dashboard_url: str | None = Field(default=None, alias="dashboardURL", description="The Ray dashboard: the Ingress URL with spec.cluster.dashboard.ingress, else the head Service inside the cluster.")
    start_time: datetime | None = Field(default=None, description="When the run started.")
    completion_time: datetime | None = Field(default=None, description="When the run ended.")
    trials: TrialCounts | None = Field(default=None, description="Ray Tune trials by state.")
    trials_done: str | None = Field(default=None, description="Finished/total trials, e.g. 3/6 (printed by kubectl get).")
    best_trial: BestTrial | None = Field(default=None, description="The best trial so far.")
    best_checkpoint: str | None = Field(default=None, description="URI of the best checkpoint of the whole search.")
    last_checkpoint: CheckpointRef | None = Field(default=None, description="The newest complete checkpoint: where a new attempt resumes.")
    attempt: int | None = Field(default=None, ge=1, description="The run's attempt: 1, then +1 for each KubeRay retry or re-created RayJob.")
    restarts: int | None = Field(default=None, ge=0, description="Restarts so far: earlier attempts plus worker-group restarts.")
    last_resume: datetime | None = Field(default=None, description="When the newest resume the operator has reported (as an Event) happened.")
    samples: list[TrialSamples] | None = Field(
        default=None, description="spec.evaluation.samples: each trial's latest generated samples (truncated; all of them are in results.json)."
    )
    forgetting: list[Forgetting] | None = Field(
        default=None, description="spec.evaluation.reference: each trial's perplexity on general text, baseline -> latest."
    )

    def to_patch(self) -> dict[str, Any]:
        """The camelCase dict a handler returns as `{"status": ...}`; unset fields left out."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)
