"""Which resources the emulator serves: a fixed set of built-in kinds plus whatever CRDs define.

The registry is the single source for discovery, URL routing and per-resource behaviour
(status subresource, printer columns, schema), so that creating a CRD is all it takes for
kubectl and kopf to see a new kind, exactly as on a real cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
DEFAULT_COLUMNS: tuple[dict[str, Any], ...] = (
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)


@attrs.frozen
class ResourceDef:
    """One served resource, identical across its served versions (no conversion is emulated)."""

    group: str
    versions: tuple[str, ...]
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    custom: bool = False
    generation: bool = False  # built-ins with a spec carry metadata.generation (custom resources always do)
    # Per version: the CRD's additionalPrinterColumns and openAPIV3Schema.
    columns: dict[str, tuple[dict[str, Any], ...]] = attrs.field(factory=dict)
    schemas: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.group, self.plural

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    def printer_columns(self, version: str) -> tuple[dict[str, Any], ...]:
        return self.columns.get(version) or DEFAULT_COLUMNS

    @property
    def tracks_generation(self) -> bool:
        """Custom resources, CRDs and the built-in workload kinds carry `metadata.generation`."""
        return self.custom or self.generation or self.plural == "customresourcedefinitions"


def _builtin(group: str, version: str, plural: str, kind: str, namespaced: bool, *short: str, **kw: Any) -> ResourceDef:
    return ResourceDef(group, (version,), plural, kind, namespaced, singular=kind.lower(), short_names=short, **kw)


# What `kubectl get` shows for the built-ins that tests look at (the real server prints these).
_EVENT_COLUMNS = (
    {"name": "Last Seen", "type": "date", "jsonPath": ".lastTimestamp"},
    {"name": "Type", "type": "string", "jsonPath": ".type"},
    {"name": "Reason", "type": "string", "jsonPath": ".reason"},
    {"name": "Object", "type": "string", "jsonPath": ".involvedObject.name"},
    {"name": "Message", "type": "string", "jsonPath": ".message"},
)
_NAMESPACE_COLUMNS = (
    {"name": "Status", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)
_POD_COLUMNS = (
    {"name": "Status", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)
_CRD_COLUMNS = ({"name": "Created At", "type": "string", "jsonPath": ".metadata.creationTimestamp"},)

BUILTINS: tuple[ResourceDef, ...] = (
    _builtin("", "v1", "namespaces", "Namespace", False, "ns", status_subresource=True, columns={"v1": _NAMESPACE_COLUMNS}),
    _builtin("", "v1", "events", "Event", True, "ev", columns={"v1": _EVENT_COLUMNS}),
    _builtin("", "v1", "secrets", "Secret", True),
    _builtin("", "v1", "configmaps", "ConfigMap", True, "cm"),
    _builtin("", "v1", "serviceaccounts", "ServiceAccount", True, "sa"),
    _builtin("", "v1", "services", "Service", True, "svc", status_subresource=True, categories=("all",)),
    _builtin("", "v1", "pods", "Pod", True, "po", status_subresource=True, categories=("all",), columns={"v1": _POD_COLUMNS}),
    _builtin("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, "pvc", status_subresource=True),
    _builtin("", "v1", "endpoints", "Endpoints", True, "ep"),
    _builtin("", "v1", "resourcequotas", "ResourceQuota", True, "quota", status_subresource=True),
    _builtin("", "v1", "limitranges", "LimitRange", True, "limits"),
    _builtin("", "v1", "nodes", "Node", False, "no", status_subresource=True),
    _builtin("events.k8s.io", "v1", "events", "Event", True, "ev"),
    # Stored only (no controllers run): enough for `helm install` and kubectl to create and read them.
    _builtin("apps", "v1", "deployments", "Deployment", True, "deploy", status_subresource=True, categories=("all",), generation=True),
    _builtin("apps", "v1", "statefulsets", "StatefulSet", True, "sts", status_subresource=True, categories=("all",), generation=True),
    _builtin("apps", "v1", "daemonsets", "DaemonSet", True, "ds", status_subresource=True, categories=("all",), generation=True),
    _builtin("apps", "v1", "replicasets", "ReplicaSet", True, "rs", status_subresource=True, categories=("all",), generation=True),
    _builtin("batch", "v1", "jobs", "Job", True, status_subresource=True, categories=("all",), generation=True),
    _builtin("batch", "v1", "cronjobs", "CronJob", True, "cj", status_subresource=True, categories=("all",), generation=True),
    _builtin("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, "pdb", status_subresource=True, generation=True),
    _builtin("networking.k8s.io", "v1", "ingresses", "Ingress", True, "ing", status_subresource=True, generation=True),
    _builtin("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, "netpol", generation=True),
    _builtin("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    _builtin("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    _builtin("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    _builtin("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    _builtin("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", False, "pc"),
    _builtin("coordination.k8s.io", "v1", "leases", "Lease", True),
    _builtin("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
             "crd", "crds", status_subresource=True, categories=("api-extensions",), columns={"v1": _CRD_COLUMNS}),
)


def from_crd(crd: dict[str, Any]) -> ResourceDef:
    """Translate a CustomResourceDefinition into what the server serves for it."""
    spec = crd["spec"]
    names = spec["names"]
    served = [v for v in spec.get("versions", []) if v.get("served", True)]
    # The storage version first: discovery lists versions in preference order.
    served.sort(key=lambda v: not v.get("storage", False))
    return ResourceDef(
        group=spec["group"],
        versions=tuple(v["name"] for v in served),
        plural=names["plural"],
        kind=names["kind"],
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        singular=names.get("singular") or names["kind"].lower(),
        short_names=tuple(names.get("shortNames", ())),
        categories=tuple(names.get("categories", ())),
        status_subresource=any("status" in (v.get("subresources") or {}) for v in served),
        custom=True,
        columns={v["name"]: tuple(v.get("additionalPrinterColumns", ())) for v in served},
        schemas={v["name"]: (v.get("schema") or {}).get("openAPIV3Schema") or {} for v in served},
    )


@attrs.define
class Registry:
    """The served resources, keyed by (group, plural); CRDs are added and removed at runtime."""

    _defs: dict[tuple[str, str], ResourceDef] = attrs.field(factory=lambda: {d.key: d for d in BUILTINS})

    def __iter__(self) -> Iterator[ResourceDef]:
        return iter(list(self._defs.values()))

    def find(self, group: str, version: str, plural: str) -> ResourceDef | None:
        rdef = self._defs.get((group, plural))
        return rdef if rdef is not None and version in rdef.versions else None

    def find_any(self, group: str, plural: str) -> ResourceDef | None:
        return self._defs.get((group, plural))

    def by_kind(self, api_version: str, kind: str) -> ResourceDef | None:
        group, _, version = api_version.rpartition("/")
        for rdef in self._defs.values():
            if rdef.group == group and rdef.kind == kind and version in rdef.versions:
                return rdef
        return None

    def add(self, rdef: ResourceDef) -> None:
        self._defs[rdef.key] = rdef

    def remove(self, key: tuple[str, str]) -> None:
        self._defs.pop(key, None)

    def groups(self) -> dict[str, list[str]]:
        """Non-core groups and their versions, preferred version first."""
        result: dict[str, list[str]] = {}
        for rdef in self._defs.values():
            if rdef.group:
                known = result.setdefault(rdef.group, [])
                known.extend(v for v in rdef.versions if v not in known)
        return result
