"""FineTuneJob -> the `networking.k8s.io/v1` NetworkPolicy around its Ray pods: a pure builder.

Ray's control plane (GCS 6379, dashboard and job API 8265, client 10001, metrics 8080, and the
ports Ray picks at random for raylets, object managers and workers) has no business being reachable
from the rest of the cluster: whoever reaches 8265 can submit code to the job's GPUs. The policy
selects the job's pods by the label every head and worker template carries (`finetune.dev/job`,
rayjob.labels) and admits:

- every port, from the job's own pods (same namespace): Ray's nodes talk to each other on ports
  chosen at run time, so listing ports would break it;
- the dashboard port (8265) from the submitter: KubeRay's K8sJobMode runs `ray job submit` in a
  Kubernetes Job named like the RayJob, and the Job controller labels its pods
  `batch.kubernetes.io/job-name: <rayjob>` (Kubernetes >= 1.27). KubeRay's default submitter
  template carries no labels of its own; ours (pods.submitter_template) carries the job's, so the
  submitter is also one of the job's own pods, and this rule keeps it admitted should it not;
- the dashboard port from KubeRay's namespace: the RayJob controller polls the job's state through
  the dashboard's HTTP API at the head Service;
- with spec.cluster.dashboard.ingress, the dashboard port from the Ingress controller's namespace;
- with the operator's --prometheus-namespace (chart: networkPolicy.prometheusNamespace), Ray's
  metrics port (8080) from that namespace: Prometheus scrapes the training metrics the trainer
  exports there (ray_metrics.py) and the chart's Grafana dashboard reads. That port serves metrics
  only; no job API or code execution behind it.

Other namespaces are matched by `kubernetes.io/metadata.name`, the label the API server sets and
nobody can forge, never by a pod label (anyone can label their own pods). Egress is open unless
spec.cluster.network.egress lists destinations; then DNS, the job's own pods and those only.

Its name is deterministic, `<rayjob>-netpol`, and the FineTuneJob owns it (controller reference):
the operator gets or creates it before the RayJob, and the garbage collector deletes it with the job.
"""

from __future__ import annotations

from typing import Any

from finetune_trainer.spec import FineTuneJob

from .children import labels, owner_reference, rayjob_name
from .crd import GROUP
from .rayjob import DASHBOARD_PORT, METRICS_PORT

POLICY_SUFFIX = "-netpol"
JOB_LABEL = f"{GROUP}/job"  # on the head and worker pod templates (rayjob.labels)
SUBMITTER_LABEL = "batch.kubernetes.io/job-name"  # what the Job controller puts on the submitter's pods
NAMESPACE_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace
DNS_PORT = 53
DEFAULT_KUBERAY_NAMESPACE = "kuberay-system"  # docs/install.md installs KubeRay there


def network_policy_name(job_name: str) -> str:
    """`<rayjob>-netpol`: at most 47 + 7 characters."""
    return f"{rayjob_name(job_name)}{POLICY_SUFFIX}"


def render_network_policy(job: FineTuneJob, *, owner_uid: str | None = None,
                          kuberay_namespace: str = DEFAULT_KUBERAY_NAMESPACE,
                          ingress_controller_namespace: str | None = None,
                          prometheus_namespace: str | None = None) -> dict[str, Any]:
    """The NetworkPolicy for `job`'s Ray pods. `kuberay_namespace` is where KubeRay's operator runs;
    `ingress_controller_namespace` the operator's default for the Ingress controller's namespace
    (spec.cluster.dashboard.ingress.controllerNamespace wins), used only when the job has an Ingress;
    `prometheus_namespace` is admitted to Ray's metrics port."""
    own = {"podSelector": {"matchLabels": {JOB_LABEL: job.name}}}
    dashboard = [{"protocol": "TCP", "port": DASHBOARD_PORT}]
    ingress: list[dict[str, Any]] = [
        {"from": [own]},
        {"from": [{"podSelector": {"matchLabels": {SUBMITTER_LABEL: rayjob_name(job.name)}}}], "ports": dashboard},
        {"from": [_namespace(kuberay_namespace)], "ports": dashboard},
    ]
    controller = ingress_controller_namespace_of(job, ingress_controller_namespace)
    if controller is not None:
        ingress.append({"from": [_namespace(controller)], "ports": dashboard})
    if prometheus_namespace:
        ingress.append({"from": [_namespace(prometheus_namespace)], "ports": [{"protocol": "TCP", "port": METRICS_PORT}]})
    spec: dict[str, Any] = {"podSelector": own["podSelector"], "policyTypes": ["Ingress"], "ingress": ingress}
    allowed = job.spec.cluster.network.egress
    if allowed is not None:
        spec["policyTypes"] = ["Ingress", "Egress"]
        spec["egress"] = [
            {"to": [own]},
            {"ports": [{"protocol": "UDP", "port": DNS_PORT}, {"protocol": "TCP", "port": DNS_PORT}]},
            *({"to": [{"ipBlock": {"cidr": rule.cidr}}],
               **({"ports": [{"protocol": rule.protocol, "port": p} for p in rule.ports]} if rule.ports else {})}
              for rule in allowed),
        ]
    meta: dict[str, Any] = {"name": network_policy_name(job.name), "namespace": job.metadata.namespace, "labels": labels(job)}
    if owner_uid:
        meta["ownerReferences"] = [owner_reference(job, owner_uid)]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}


def ingress_controller_namespace_of(job: FineTuneJob, default: str | None) -> str | None:
    """The namespace admitted to the dashboard for the job's Ingress: the spec's, else `default`;
    None when the job has no Ingress (or nobody said where the controller runs)."""
    want = job.spec.cluster.dashboard.ingress
    if want is None:
        return None
    return want.controller_namespace or default


def _namespace(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: name}}}
