"""How the trainer's progress reaches the operator without the operator touching tenant credentials.

The driver (on the Ray head) writes its status.json into one ConfigMap, `<rayjob>-progress`, through
the job's own ServiceAccount, whose Role may `patch` that one ConfigMap and nothing else
(`resourceNames`). The operator reads the ConfigMap through the API server on its timer. So the
operator never reads a Secret, never holds S3 credentials and never opens a connection to an
address a job's author chose (the confused deputy of docs/security.md); the trainer's rights are
the smallest that let it report.

Pure builders: the job in, manifests out, every one owned by the FineTuneJob (Kubernetes' garbage
collector removes them with it). The ServiceAccount is the job's own (`<rayjob>`), unless the spec
names one (`spec.cluster.serviceAccountName`, e.g. for IRSA or workload identity): then the Role
is bound to that one and no ServiceAccount is created.

Only the head container gets a token, through a projected volume at the standard path (the pods
run with `automountServiceAccountToken: false`): the driver runs on the head, the Ray workers
need no API access at all.
"""

from __future__ import annotations

from typing import Any

from finetune_trainer.spec import FineTuneJob
from finetune_trainer.spec.cluster import PROGRESS_CONFIGMAP_ENV

from .children import labels, owner_reference, rayjob_name

PROGRESS_SUFFIX = "-progress"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # where in-cluster clients look
TOKEN_SECONDS = 3600  # the kubelet refreshes a projected token well before it expires
TOKEN_VOLUME = "progress-token"
RBAC = "rbac.authorization.k8s.io"


def progress_name(job_name: str) -> str:
    """`<rayjob>-progress`: the ConfigMap, and the Role and RoleBinding that let the job write it."""
    return f"{rayjob_name(job_name)}{PROGRESS_SUFFIX}"


def pods_service_account(job: FineTuneJob) -> str:
    """The ServiceAccount of the head and worker pods: the spec's, else the job's own."""
    return job.spec.cluster.service_account_name or rayjob_name(job.name)


def render_trainer_access(job: FineTuneJob, *, owner_uid: str | None = None) -> list[dict[str, Any]]:
    """[ServiceAccount (unless the spec names one), ConfigMap, Role, RoleBinding], in creation order."""
    name, namespace = progress_name(job.name), job.metadata.namespace

    def meta(object_name: str) -> dict[str, Any]:
        out: dict[str, Any] = {"name": object_name, "namespace": namespace, "labels": labels(job)}
        if owner_uid:
            out["ownerReferences"] = [owner_reference(job, owner_uid)]
        return out

    account = pods_service_account(job)
    objects: list[dict[str, Any]] = []
    if job.spec.cluster.service_account_name is None:
        objects.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(account),
                        "automountServiceAccountToken": False})
    objects += [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(name), "data": {}},
        {"apiVersion": f"{RBAC}/v1", "kind": "Role", "metadata": meta(name),
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name], "verbs": ["patch"]}]},
        {"apiVersion": f"{RBAC}/v1", "kind": "RoleBinding", "metadata": meta(name),
         "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]},
    ]
    return objects


def head_token(job: FineTuneJob) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(volume, volumeMount, env var) that give the head container its ServiceAccount token and the
    ConfigMap's name: what `automountServiceAccountToken` would mount, for this one container only."""
    volume = {"name": TOKEN_VOLUME, "projected": {"defaultMode": 0o444, "sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": TOKEN_SECONDS}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
    ]}}
    mount = {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}
    return volume, mount, {"name": PROGRESS_CONFIGMAP_ENV, "value": progress_name(job.name)}
