"""Get or create the objects a job's run needs besides its RayJob: the progress ConfigMap's
ServiceAccount/Role (trainer_access), the NetworkPolicy and the dashboard Ingress, each owned by the
job. One of these names that is not owned by this job (an earlier job's, not yet collected, or made
by hand) is waited out (kopf.TemporaryError) rather than trusted: it could bind the Role to someone
else, admit other traffic, or vanish under the run. Side effects live here and in handlers.py; what
each object is comes from its pure builder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import kopf

from finetune_trainer.spec import FineTuneJob

from .children import owned_by
from .config import OperatorConfig
from .ingress import dashboard_url, render_dashboard_ingress
from .kube import KubeApi
from .networkpolicy import ingress_controller_namespace_of, render_network_policy
from .trainer_access import render_trainer_access

PostEvent = Callable[[Mapping[str, Any], str, str, str], None]  # (job body, type, reason, message)


def ensure_trainer_access(kube: KubeApi, config: OperatorConfig, job: FineTuneJob, uid: str) -> None:
    """What the driver reports progress through. No Event: these come and go with the RayJob's, which has one."""
    for want in render_trainer_access(job, owner_uid=uid):
        found, _ = kube.get_or_create_namespaced(want)
        if not owned_by(found, uid):
            raise kopf.TemporaryError(f"{want['kind']} {want['metadata']['name']} exists and is not owned by this "
                                      "FineTuneJob; waiting for it to go", delay=config.conflict_retry_delay)


def ensure_network_policy(kube: KubeApi, config: OperatorConfig, job: FineTuneJob, uid: str,
                          body: Mapping[str, Any], post_event: PostEvent) -> None:
    """The job's NetworkPolicy (networkpolicy.py), unless the operator runs without them."""
    if not config.network_policies:
        return
    policy, created = kube.get_or_create_network_policy(render_network_policy(
        job, owner_uid=uid, kuberay_namespace=config.kuberay_namespace,
        ingress_controller_namespace=config.ingress_controller_namespace, prometheus_namespace=config.prometheus_namespace))
    if not owned_by(policy, uid):
        raise kopf.TemporaryError(f"NetworkPolicy {policy['metadata']['name']} exists and is not owned by this "
                                  "FineTuneJob; waiting for it to go", delay=config.conflict_retry_delay)
    if created and job.spec.cluster.dashboard.ingress and not ingress_controller_namespace_of(job, config.ingress_controller_namespace):
        post_event(body, "Warning", "DashboardUnreachable", (
            "the NetworkPolicy admits no Ingress controller to the dashboard: set spec.cluster.dashboard.ingress."
            "controllerNamespace, or the chart value networkPolicy.ingressControllerNamespace"))


def ensure_ingress(kube: KubeApi, job: FineTuneJob, uid: str, body: Mapping[str, Any], post_event: PostEvent) -> None:
    """spec.cluster.dashboard.ingress: the job's dashboard Ingress."""
    ingress = render_dashboard_ingress(job, owner_uid=uid)
    if ingress is None:
        return
    _, created = kube.get_or_create_ingress(ingress)
    if created:
        post_event(body, "Normal", "IngressCreated",
                   f"created Ingress {ingress['metadata']['name']}: the Ray dashboard is at {dashboard_url(job)}")
