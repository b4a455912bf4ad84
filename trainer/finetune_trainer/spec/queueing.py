"""Kueue's labels on a FineTuneJob: which ones pass to the RayJob, and the one spec field they rule out.

Kueue (https://kueue.sigs.k8s.io) admits a RayJob that carries `kueue.x-k8s.io/queue-name` (its
LocalQueue) and, optionally, `kueue.x-k8s.io/priority-class` (a WorkloadPriorityClass). It wants
the RayJob created suspended and unsuspends it once the queue's ClusterQueue has quota; it
suspends it again when it preempts it. So `spec.suspend` of such a RayJob is Kueue's, not ours:
the operator renders it `true` and never writes it afterwards (operator/finetune_operator/kueue.py).

Only these two labels pass through: Kueue reads more (e.g. `kueue.x-k8s.io/max-exec-time-seconds`,
pod-group labels), and a job's author gets no say over those through the operator. Choosing a
queue is ordinary Kueue use (the LocalQueue must exist in the job's namespace, and Kueue's
ClusterQueue decides which namespaces may use it); escaping the quota is not: the operator never
unsuspends a queued RayJob.

`spec.runPolicy.suspend: true` with a queue is refused: Kueue resumes a suspended RayJob as soon
as its Workload is admitted, so the spec would promise something that does not happen. Kueue's
own way to hold a queued or running job is its Workload's `spec.active: false`.
"""

from __future__ import annotations

from collections.abc import Mapping

QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
PASSED_THROUGH = (QUEUE_NAME_LABEL, PRIORITY_CLASS_LABEL)


def queue_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """The Kueue labels of a FineTuneJob's metadata that its RayJob carries; {} without a queue
    (a priority class alone means nothing to Kueue: no queue, no Workload)."""
    labels = labels or {}
    if not labels.get(QUEUE_NAME_LABEL):
        return {}
    return {key: str(labels[key]) for key in PASSED_THROUGH if labels.get(key)}


def queue_problems(labels: Mapping[str, str] | None, suspend: bool) -> list[tuple[str, str]]:
    """What a FineTuneJob's Kueue labels rule out; `suspend` is its spec.runPolicy.suspend."""
    labels = labels or {}
    problems: list[tuple[str, str]] = []
    if labels.get(PRIORITY_CLASS_LABEL) and not labels.get(QUEUE_NAME_LABEL):
        problems.append((f"metadata.labels[{PRIORITY_CLASS_LABEL}]",
                         f"a priority class without a queue does nothing: add the label {QUEUE_NAME_LABEL} "
                         "naming a LocalQueue in the job's namespace, or remove it"))
    if suspend and labels.get(QUEUE_NAME_LABEL):
        problems.append(("spec.runPolicy.suspend",
                         f"Kueue decides when a job with the label {QUEUE_NAME_LABEL} runs, and resumes a suspended "
                         "RayJob once it is admitted: remove spec.runPolicy.suspend (the job waits for quota by "
                         "itself), or hold it the Kueue way: kubectl patch workload <name> --type=merge "
                         "-p '{\"spec\":{\"active\":false}}'"))
    return problems
