"""What makes the RayJob's pods pass the Pod Security Standards `restricted` profile: pure builders.

`harden` finishes a rendered head or worker pod template: the pod and container securityContext,
`automountServiceAccountToken: false` (Ray needs no Kubernetes API; a token the pod does need,
such as the head's progress token, is mounted explicitly as a projected volume), and the
ephemeral-storage request for Ray's logs and the local checkpoint copy (spec/pod_security.py says
how the default is derived).

`submitter_template` is KubeRay's K8sJobMode submitter pod, written out because KubeRay's default
one has no securityContext and would be rejected in a `restricted` namespace. KubeRay keeps what
the template gives and fills in the rest (ray-operator `configureSubmitterContainer`): with no
`command`, it sets `/bin/bash -ce` and the `ray job submit ... ; ray job logs --follow` script,
and appends PYTHONUNBUFFERED, RAY_DASHBOARD_ADDRESS, RAY_JOB_SUBMISSION_ID and, under token auth,
RAY_AUTH_MODE / RAY_AUTH_TOKEN. It does not fill in the image, resources or restartPolicy of a
given template, so they are here: the head's image (as KubeRay's default does, against version
skew), KubeRay's default resources, and `restartPolicy: Never` (a Job's pods need Never or
OnFailure; the Job's backoffLimit does the retrying).

KubeRay's own additions to the Ray pods keep passing: the `wait-gcs-ready` init container it adds
to workers copies the Ray container's securityContext.

`graceful_stop` gives the Ray pods spec.runPolicy.terminationGracePeriodSeconds and tells Ray how
much of it a save may use (issue 16, item 2): on SIGTERM the pod's `ray start --block` (PID 1 of
the Ray container) marks its node as draining for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, with that
deadline, and only then stops its processes; Ray Train hands the deadline to every worker of a run
on that node (`ray.train.get_preemption_info`), and the trainer saves a checkpoint if one fits
(finetune_trainer.guards). The drain timeout is `RunPolicySpec.save_window`: the grace period less
the seconds Ray's teardown needs, so the pod is not SIGKILLed mid-teardown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_trainer.spec import FineTuneJob
from finetune_trainer.spec.cluster import (
    DRAIN_ENV,
    ClusterSpec,
    HeadGroupSpec,
    RunPolicySpec,
    WorkerGroupSpec,
    memory_bytes,
)
from finetune_trainer.spec.pod_security import (
    SUBMITTER_EPHEMERAL,
    TRAINER_GID,
    TRAINER_UID,
    default_ephemeral_storage,
)

# DRAIN_ENV (spec.cluster): ray._private.ray_constants' RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, `ray start`'s drain on SIGTERM
SUBMITTER_CONTAINER = "ray-job-submitter"  # KubeRay's utils.SubmitterContainerName
# KubeRay's GetDefaultSubmitterContainer resources: the submitter only runs the Ray job CLI
SUBMITTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}


def pod_security_context(cluster: ClusterSpec) -> dict[str, Any]:
    """The pod securityContext: the trainer image's user unless the spec names another."""
    spec = cluster.pod_security_context
    context: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID if spec.run_as_user is None else spec.run_as_user,
        "runAsGroup": TRAINER_GID if spec.run_as_group is None else spec.run_as_group,
        "fsGroup": TRAINER_GID if spec.fs_group is None else spec.fs_group,
    }
    if spec.supplemental_groups:
        context["supplementalGroups"] = list(spec.supplemental_groups)
    seccomp = spec.seccomp_profile
    context["seccompProfile"] = (seccomp.model_dump(by_alias=True, exclude_none=True) if seccomp is not None
                                 else {"type": "RuntimeDefault"})
    return context


def container_security_context(cluster: ClusterSpec) -> dict[str, Any]:
    capabilities: dict[str, Any] = {"drop": ["ALL"]}
    spec = cluster.container_security_context.capabilities
    if spec is not None and spec.add:
        capabilities["add"] = list(spec.add)
    return {"allowPrivilegeEscalation": False, "capabilities": capabilities}


def ephemeral_storage(group: HeadGroupSpec | WorkerGroupSpec) -> str:
    """`ephemeralStorage` as written, else derived from the pod's memory (pod_security.py)."""
    if group.ephemeral_storage is not None:
        return group.ephemeral_storage
    return default_ephemeral_storage(memory_bytes(group.memory) if group.memory else None)


def harden(template: dict[str, Any], cluster: ClusterSpec, group: HeadGroupSpec | WorkerGroupSpec) -> dict[str, Any]:
    """`template` (a rendered Ray pod template) with the restricted profile's settings and its
    ephemeral-storage request; changed in place and returned."""
    _secure(template["spec"], cluster, ephemeral_storage(group))
    return template


def graceful_stop(template: dict[str, Any], policy: RunPolicySpec) -> dict[str, Any]:
    """`template` (a Ray pod template) with the run policy's grace period and Ray's drain timeout
    in every container's environment (the module docstring says why); changed in place and returned."""
    template["spec"]["terminationGracePeriodSeconds"] = policy.termination_grace_period_seconds
    for container in template["spec"]["containers"]:
        env = [e for e in container.get("env", []) if e.get("name") != DRAIN_ENV]
        container["env"] = [*env, {"name": DRAIN_ENV, "value": str(policy.save_window())}]
    return template


def submitter_template(job: FineTuneJob, labels: Mapping[str, str]) -> dict[str, Any]:
    """KubeRay's K8sJobMode submitter pod, hardened (see the module docstring for what KubeRay adds)."""
    cluster = job.spec.cluster
    container: dict[str, Any] = {"name": SUBMITTER_CONTAINER, "image": cluster.image,
                                 "resources": {k: dict(v) for k, v in SUBMITTER_RESOURCES.items()}}
    if cluster.image_pull_policy:
        container["imagePullPolicy"] = cluster.image_pull_policy
    spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if cluster.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in cluster.image_pull_secrets]
    _secure(spec, cluster, SUBMITTER_EPHEMERAL)
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def _secure(spec: dict[str, Any], cluster: ClusterSpec, disk: str) -> None:
    spec["automountServiceAccountToken"] = False
    spec["securityContext"] = pod_security_context(cluster)
    for container in spec["containers"]:
        container["securityContext"] = container_security_context(cluster)
        container.setdefault("resources", {}).setdefault("requests", {})["ephemeral-storage"] = disk
