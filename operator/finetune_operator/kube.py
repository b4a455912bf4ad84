"""Every Kubernetes API call the handlers make, in one place (the `kubernetes` client).

Within the chart's RBAC: finetunejobs get / status patch; rayjobs get, create, patch; secrets get.
A 404 is a value (None), a 409 on create means "someone (an earlier us) made it": get it instead;
`Conflict` is the 409 of a write whose resourceVersion precondition failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kubernetes

from .crd import GROUP, PLURAL, VERSION

RAY_GROUP, RAY_VERSION, RAYJOBS = "ray.io", "v1", "rayjobs"


def is_conflict(err: Exception) -> bool:
    return isinstance(err, kubernetes.client.ApiException) and err.status == 409


class KubeApi:
    def __init__(self, client: kubernetes.client.ApiClient | None = None):
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)

    def get_rayjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _or_none(lambda: self.custom.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAYJOBS, name))

    def get_or_create_rayjob(self, rayjob: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the RayJob, whether this call created it): get first, create, and on 409 get again, so
        an operator restart mid-reconcile never makes a second one."""
        namespace, name = rayjob["metadata"]["namespace"], rayjob["metadata"]["name"]
        existing = self.get_rayjob(namespace, name)
        if existing is not None:
            return existing, False
        try:
            return self.custom.create_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAYJOBS, rayjob), True
        except kubernetes.client.ApiException as err:
            if err.status != 409:
                raise
        found = self.get_rayjob(namespace, name)
        if found is None:  # created and deleted in between: let the caller's retry sort it out
            raise RuntimeError(f"RayJob {namespace}/{name} vanished while being created")
        return found, False

    def patch_rayjob_spec(self, namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAYJOBS, name, {"spec": dict(spec)})

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _or_none(lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))

    def patch_job_status(self, namespace: str, name: str, status: Mapping[str, Any], *,
                         resource_version: str | None = None) -> dict[str, Any]:
        """Merge-patch the status subresource; with `resource_version`, only if nobody wrote in
        between (else 409 Conflict: re-read and recompute)."""
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body)

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's base64 `data`, or None when there is no such Secret."""
        secret = _or_none(lambda: self.core.read_namespaced_secret(name, namespace))
        return None if secret is None else dict(secret.data or {})


def _or_none(call: Any) -> Any:
    try:
        return call()
    except kubernetes.client.ApiException as err:
        if err.status == 404:
            return None
        raise
