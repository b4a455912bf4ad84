"""FineTuneJob -> the optional `networking.k8s.io/v1` Ingress for its Ray dashboard: a pure builder.

`spec.cluster.dashboard.ingress` asks for it. It routes `host` + `path` to the head Service the
RayJob pins (`rayjob.head_service_name`, port 8265), so it can exist before the Ray cluster does
and keeps working across KubeRay's retries, which start new RayClusters behind the same Service
name. Its name is deterministic, `<rayjob>-dashboard` (`<job>-ray-dashboard`), so the operator
gets or creates it and a restart never makes a second one; the FineTuneJob owns it (controller
reference), so Kubernetes' garbage collector deletes it with the job: the operator never does.

TLS is not optional: whoever holds the dashboard's address can submit code to the job's cluster, and
the Ray token (KubeRay's authOptions) travels in each request, so the spec requires `tlsSecretName`
and the Ingress always carries a `tls` section. Authentication in front of it (e.g. nginx's
`auth-url` to an oauth2-proxy) is the user's, through `annotations`. The job's NetworkPolicy admits
the Ingress controller's namespace to the dashboard port (networkpolicy.py).

With an Ingress, `status.dashboardURL` is its URL, `https://host/path`; without one, the head
Service's in-cluster address (rayjob.dashboard_url).
"""

from __future__ import annotations

from typing import Any

from finetune_trainer.spec import FineTuneJob

from .rayjob import DASHBOARD_PORT, head_service_name, labels, owner_reference, rayjob_name
from .rayjob import dashboard_url as service_dashboard_url

INGRESS_SUFFIX = "-dashboard"
PATH_TYPE = "Prefix"  # the dashboard's pages and API live under the path


def ingress_name(job_name: str) -> str:
    """`<rayjob>-dashboard`: at most 47 + 10 characters, well inside an Ingress name's 253."""
    return f"{rayjob_name(job_name)}{INGRESS_SUFFIX}"


def render_dashboard_ingress(job: FineTuneJob, *, owner_uid: str | None = None) -> dict[str, Any] | None:
    """The Ingress for `job`'s dashboard, or None when the spec asks for none. `owner_uid` (the
    FineTuneJob's uid) makes the job its controller, as for the RayJob."""
    want = job.spec.cluster.dashboard.ingress
    if want is None:
        return None
    meta: dict[str, Any] = {"name": ingress_name(job.name), "namespace": job.metadata.namespace, "labels": labels(job)}
    if want.annotations:
        meta["annotations"] = dict(want.annotations)
    if owner_uid:
        meta["ownerReferences"] = [owner_reference(job, owner_uid)]
    backend = {"service": {"name": head_service_name(job.name), "port": {"number": DASHBOARD_PORT}}}
    spec: dict[str, Any] = {}
    if want.class_name:
        spec["ingressClassName"] = want.class_name
    spec["rules"] = [{"host": want.host, "http": {"paths": [{"path": want.path, "pathType": PATH_TYPE, "backend": backend}]}}]
    spec["tls"] = [{"hosts": [want.host], "secretName": want.tls_secret_name}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta, "spec": spec}


def dashboard_url(job: FineTuneJob) -> str:
    """What status.dashboardURL shows: the Ingress's URL when the job has one, else the head
    Service's in-cluster address."""
    want = job.spec.cluster.dashboard.ingress
    if want is None:
        return service_dashboard_url(job)
    return f"https://{want.host}{want.path}"
