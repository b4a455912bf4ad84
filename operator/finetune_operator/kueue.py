"""Kueue's hold on a RayJob, as the operator sees it: pure functions over the RayJob object.

A RayJob labelled `kueue.x-k8s.io/queue-name` (spec/queueing.py: passed through from the
FineTuneJob) is created suspended, and from then on its `spec.suspend` is Kueue's: Kueue lifts it
when the Workload is admitted and sets it again when it preempts the job. The operator tells
Kueue's hold from the user's spec.runPolicy.suspend by the label alone (a queued job cannot carry
runPolicy.suspend: queueing.queue_problems refuses it), and it never writes `suspend` of such a
RayJob (changes.mutable_patch), whatever its spec says: that would run the job outside its quota.
Read from the RayJob, not from the FineTuneJob's labels today: what Kueue manages is what the
RayJob carries since it was created.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_trainer.spec.queueing import PRIORITY_CLASS_LABEL, QUEUE_NAME_LABEL

from .status_mapping import Observation
from .status_model import Phase, Reason


def queue_of(rayjob: Mapping[str, Any] | None) -> str | None:
    """The LocalQueue a RayJob was submitted to; None when Kueue does not manage it by label."""
    labels = ((rayjob or {}).get("metadata") or {}).get("labels") or {}
    return str(labels[QUEUE_NAME_LABEL]) if labels.get(QUEUE_NAME_LABEL) else None


def held_by_kueue(rayjob: Mapping[str, Any] | None) -> str | None:
    """The status message while Kueue holds the RayJob (queued and suspended); None otherwise."""
    queue = queue_of(rayjob)
    if queue is None or not ((rayjob or {}).get("spec") or {}).get("suspend"):
        return None
    meta = (rayjob or {}).get("metadata") or {}
    priority = (meta.get("labels") or {}).get(PRIORITY_CLASS_LABEL)
    at = f" at priority {priority}" if priority else ""
    return (f"waiting for quota: Kueue holds RayJob {meta.get('name')} in LocalQueue {queue}{at} until it is admitted "
            f"(kubectl get workloads -n {meta.get('namespace')} says why)")


def kueue_observation(rayjob: Mapping[str, Any] | None) -> Observation | None:
    """What Kueue's part says of a queued RayJob, over KubeRay's status (status_mapping.next_status):
    held, it waits for quota (KubeRay calls it Suspended, or Suspending after a preemption);
    admitted while KubeRay still calls it Suspended(ing), its cluster is about to start. None for a
    RayJob not in a queue, or one KubeRay already reports on as admitted."""
    if (held := held_by_kueue(rayjob)) is not None:
        return Observation(Phase.PENDING, Reason.WAITING_FOR_QUOTA, held, True, False)
    deployment = ((rayjob or {}).get("status") or {}).get("jobDeploymentStatus")
    if queue_of(rayjob) is not None and deployment in ("Suspended", "Suspending"):
        return Observation(Phase.PENDING, Reason.CLUSTER_STARTING, "admitted by Kueue: the Ray cluster is starting", True, False)
    return None
