"""Every Kubernetes API call the handlers make, in one place (the `kubernetes` client).

Within the chart's RBAC: finetunejobs get / status patch; rayjobs get, create, patch, delete;
ingresses get, create; networkpolicies get, create (unless turned off); serviceaccounts, roles,
rolebindings get, create; configmaps get, create, patch (patch only so that it may grant it to a
job's Role: RBAC lets nobody grant a right it lacks). No Secrets at all. A 404 is a value (None), a 409 on create means "someone (an earlier us) made it": get it instead; `Conflict` is the 409 of a write whose resourceVersion (or
uid) precondition failed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import kubernetes
import urllib3

from .crd import GROUP, PLURAL, VERSION

RAY_GROUP, RAY_VERSION, RAYJOBS = "ray.io", "v1", "rayjobs"
REQUEST_TIMEOUT = (5.0, 10.0)  # seconds to connect, and between bytes of the answer


class TimeoutApiClient(kubernetes.client.ApiClient):
    """The kubernetes client with a timeout on every request. Its own default is none: a request
    to an API server that accepted the connection and never answers (overloaded, a half-open
    connection after a network fault) would hold a progress-poll worker or a kopf handler thread
    for ever. A read that timed out is not retried (urllib3 retries it 3 times by default, which
    would make one hung request take four timeouts); a failed connect still is. The next poll or
    kopf's backoff tries again. kopf's own watches do not go through this client."""

    def __init__(self, timeout: tuple[float, float] = REQUEST_TIMEOUT):
        configuration = kubernetes.client.Configuration.get_default_copy()
        configuration.retries = urllib3.util.Retry(total=3, read=0, redirect=0)
        super().__init__(configuration)
        self.request_timeout = timeout

    def call_api(self, method: str, url: str, header_params: Any = None, body: Any = None, post_params: Any = None,
                 _request_timeout: Any = None) -> Any:
        return super().call_api(method, url, header_params, body, post_params, _request_timeout or self.request_timeout)


def is_conflict(err: Exception) -> bool:
    return isinstance(err, kubernetes.client.ApiException) and err.status == 409


class KubeApi:
    def __init__(self, client: kubernetes.client.ApiClient | None = None):
        client = client or TimeoutApiClient()
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)
        self.networking = kubernetes.client.NetworkingV1Api(client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(client)

    def get_rayjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _or_none(lambda: self.custom.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAYJOBS, name))

    def get_or_create_rayjob(self, rayjob: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the RayJob, whether this call created it): get first, create, and on 409 get again, so
        an operator restart mid-reconcile never makes a second one."""
        namespace = rayjob["metadata"]["namespace"]
        return _get_or_create(
            "RayJob", rayjob, lambda name: self.get_rayjob(namespace, name),
            lambda: cast(dict[str, Any], self.custom.create_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAYJOBS, rayjob)))

    def delete_rayjob(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete the RayJob (KubeRay then deletes its Ray cluster); with `uid`, only that very
        object, never a newer one of the same name. False when it was already gone or replaced."""
        options = kubernetes.client.V1DeleteOptions(
            propagation_policy="Background", preconditions=kubernetes.client.V1Preconditions(uid=uid) if uid else None)
        try:
            self.custom.delete_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAYJOBS, name, body=options)
        except kubernetes.client.ApiException as err:
            if err.status in (404, 409):
                return False
            raise
        return True

    def get_or_create_ingress(self, ingress: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the Ingress, whether this call created it), as get_or_create_rayjob."""
        return self.get_or_create_namespaced(ingress)

    def get_or_create_network_policy(self, policy: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the NetworkPolicy, whether this call created it), as get_or_create_rayjob."""
        return self.get_or_create_namespaced(policy)

    def patch_rayjob_spec(self, namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], self.custom.patch_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAYJOBS, name,
                                                                              {"spec": dict(spec)}))

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _or_none(lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))

    def patch_job_status(self, namespace: str, name: str, status: Mapping[str, Any], *,
                         resource_version: str | None = None) -> dict[str, Any]:
        """Merge-patch the status subresource; with `resource_version`, only if nobody wrote in
        between (else 409 Conflict: re-read and recompute)."""
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return cast(dict[str, Any], self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body))

    def get_or_create_namespaced(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the object, whether this call created it), as get_or_create_rayjob, for the built-in kinds
        a job owns: its Ingress, NetworkPolicy, and the trainer's access objects (trainer_access)."""
        read, create = self._typed(obj["kind"])
        namespace, plain = obj["metadata"]["namespace"], self.core.api_client.sanitize_for_serialization
        return _get_or_create(obj["kind"], obj, lambda name: plain(_or_none(lambda: read(name, namespace))),
                              lambda: plain(create(namespace, obj)))

    def configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """The ConfigMap's `data`, or None when there is no such ConfigMap."""
        found = _or_none(lambda: self.core.read_namespaced_config_map(name, namespace))
        return None if found is None else dict(found.data or {})

    def _typed(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """(read(name, namespace), create(namespace, body)) of the client for one built-in kind."""
        calls: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
            "ServiceAccount": (self.core.read_namespaced_service_account, self.core.create_namespaced_service_account),
            "ConfigMap": (self.core.read_namespaced_config_map, self.core.create_namespaced_config_map),
            "Role": (self.rbac.read_namespaced_role, self.rbac.create_namespaced_role),
            "RoleBinding": (self.rbac.read_namespaced_role_binding, self.rbac.create_namespaced_role_binding),
            "Ingress": (self.networking.read_namespaced_ingress, self.networking.create_namespaced_ingress),
            "NetworkPolicy": (self.networking.read_namespaced_network_policy, self.networking.create_namespaced_network_policy),
        }
        return calls[kind]


def _get_or_create(kind: str, obj: dict[str, Any], get: Callable[[str], dict[str, Any] | None],
                   create: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    name = obj["metadata"]["name"]
    existing = get(name)
    if existing is not None:
        return existing, False
    try:
        return create(), True
    except kubernetes.client.ApiException as err:
        if err.status != 409:
            raise
    found = get(name)
    if found is None:  # created and deleted in between: let the caller's retry sort it out
        raise RuntimeError(f"{kind} {obj['metadata']['namespace']}/{name} vanished while being created")
    return found, False


def _or_none(call: Any) -> Any:
    try:
        return call()
    except kubernetes.client.ApiException as err:
        if err.status == 404:
            return None
        raise
