"""Discovery and OpenAPI documents, generated from the registry on every request.

kubectl and kopf find resources only through discovery (`/api`, `/apis`, `/apis/<g>/<v>`): kinds,
plural and short names, scope, verbs and the `status` subresource (kopf patches `/status` only
when discovery lists it). kubectl's default `--validate=strict` first asks the OpenAPI v3
documents whether a kind's PATCH takes `fieldValidation`; saying yes makes it leave validation to
the server, as against a real cluster.
"""

from __future__ import annotations

from typing import Any

from .registry import ALL_VERBS, Registry, ResourceDef

SERVER_VERSION = {
    "major": "1", "minor": "32", "gitVersion": "v1.32.4-kmock", "gitCommit": "0" * 40, "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23.0", "compiler": "gc", "platform": "linux/amd64",
}


def api_versions() -> dict[str, Any]:
    return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}


def _group_doc(name: str, versions: list[str]) -> dict[str, Any]:
    listed = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": listed, "preferredVersion": listed[0]}


def api_group_list(registry: Registry) -> dict[str, Any]:
    groups = [_group_doc(name, versions) for name, versions in sorted(registry.groups().items())]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(registry: Registry, group: str) -> dict[str, Any] | None:
    versions = registry.groups().get(group)
    return None if not versions else {"kind": "APIGroup", "apiVersion": "v1", **_group_doc(group, versions)}


def api_resource_list(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    """The APIResourceList of one group/version, or None if nothing is served there."""
    resources: list[dict[str, Any]] = []
    for rdef in registry:
        if rdef.group != group or version not in rdef.versions:
            continue
        entry: dict[str, Any] = {
            "name": rdef.plural, "singularName": rdef.singular, "namespaced": rdef.namespaced, "kind": rdef.kind,
            "verbs": list(ALL_VERBS), "storageVersionHash": "",
        }
        if rdef.short_names:
            entry["shortNames"] = list(rdef.short_names)
        if rdef.categories:
            entry["categories"] = list(rdef.categories)
        resources.append(entry)
        if rdef.status_subresource:
            resources.append({"name": f"{rdef.plural}/status", "singularName": "", "namespaced": rdef.namespaced,
                              "kind": rdef.kind, "verbs": ["get", "patch", "update"]})
    if not resources and not (group == "" and version == "v1"):
        return None
    group_version = f"{group}/{version}" if group else version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


def openapi_v3_root(registry: Registry) -> dict[str, Any]:
    paths = {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1"}}
    for group, versions in registry.groups().items():
        for version in versions:
            paths[f"apis/{group}/{version}"] = {"serverRelativeURL": f"/openapi/v3/apis/{group}/{version}"}
    return {"paths": paths}


def _schema_name(rdef: ResourceDef, version: str) -> str:
    reversed_group = ".".join(reversed(rdef.group.split("."))) if rdef.group else "io.k8s.api.core"
    return f"{reversed_group}.{version}.{rdef.kind}"


def openapi_v3_group_version(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    """Per-kind schemas plus a PATCH operation that advertises `fieldValidation`, per resource."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    prefix = f"/apis/{group}/{version}" if group else "/api/v1"
    for rdef in registry:
        if rdef.group != group or version not in rdef.versions:
            continue
        gvk = [{"group": rdef.group, "version": version, "kind": rdef.kind}]
        name = _schema_name(rdef, version)
        schema = dict(rdef.schemas.get(version) or {"type": "object", "x-kubernetes-preserve-unknown-fields": True})
        schemas[name] = {**schema, "x-kubernetes-group-version-kind": gvk}
        scope = "/namespaces/{namespace}" if rdef.namespaced else ""
        params = [{"name": n, "in": "query", "schema": {"type": "string"}, "uniqueItems": True}
                  for n in ("dryRun", "fieldManager", "fieldValidation", "force")]
        ref = {"$ref": f"#/components/schemas/{name}"}
        operation = {
            "operationId": f"patch{rdef.kind}", "parameters": params,
            "x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk[0],
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}},
        }
        post = {**operation, "operationId": f"create{rdef.kind}", "x-kubernetes-action": "post"}
        paths[f"{prefix}{scope}/{rdef.plural}/{{name}}"] = {"patch": operation, "put": {**operation, "x-kubernetes-action": "put"}}
        paths[f"{prefix}{scope}/{rdef.plural}"] = {"post": post}
    if not paths and not (group == "" and version == "v1"):
        return None
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
            "paths": paths, "components": {"schemas": schemas}}
