"""The object store: metadata bookkeeping, write semantics and the event history watches read.

Everything a controller relies on lives here: one global resourceVersion counter, uid and
creationTimestamp on create, `generation` bumped only by spec changes, the status subresource
split, no-op writes that change nothing (no new resourceVersion, no event), finalizers holding
deletion, and background garbage collection through ownerReferences. All methods run on the
server's event loop thread, so no locking is needed.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from . import errors, schema
from .registry import Registry, ResourceDef, from_crd

ObjKey = tuple[str, str, str, str]  # group, plural, namespace ("" if cluster-scoped), name
MAX_ANNOTATIONS_BYTES = 262144
HISTORY_LIMIT = 10000
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.frozen
class Event:
    """One change, kept so a watch from an older resourceVersion can replay what it missed."""

    rv: int
    key: tuple[str, str]
    type: str
    obj: dict[str, Any]


def _spec_part(obj: dict[str, Any], rdef: ResourceDef) -> dict[str, Any]:
    """What `generation` tracks: everything but metadata (and status, if it is a subresource)."""
    skip = {"metadata", "status"} if rdef.status_subresource else {"metadata"}
    return {k: v for k, v in obj.items() if k not in skip}


@attrs.define
class Store:
    """In-memory objects of all served resources plus the bounded history of their changes."""

    registry: Registry = attrs.field(factory=Registry)
    _objects: dict[ObjKey, dict[str, Any]] = attrs.field(factory=dict)
    _rv: int = 0
    history: list[Event] = attrs.field(factory=list)
    history_limit: int = HISTORY_LIMIT
    _changed: asyncio.Event | None = None
    _closed: bool = False

    def __attrs_post_init__(self) -> None:
        for name in SYSTEM_NAMESPACES:
            self.create(self.registry.find("", "v1", "namespaces"), "v1", None, {"metadata": {"name": name}})  # type: ignore[arg-type]

    # --- bookkeeping -------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    @property
    def oldest_replayable(self) -> int:
        """Watches from a resourceVersion older than this get 410 Gone: their events were dropped."""
        return self.history[0].rv - 1 if self.history else self._rv

    def changed(self) -> asyncio.Event:
        """An event set at the next change; watchers wait on it (created lazily inside the loop)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End every open watch (the server cannot stop while a watch stream still runs)."""
        self._closed = True
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _record(self, rdef: ResourceDef, kind: str, obj: dict[str, Any]) -> None:
        self.history.append(Event(self._rv, rdef.key, kind, copy.deepcopy(obj)))
        del self.history[:-self.history_limit]
        self._notify()

    def _bump(self, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    @staticmethod
    def _key(rdef: ResourceDef, namespace: str | None, name: str) -> ObjKey:
        return rdef.group, rdef.plural, namespace if rdef.namespaced else "", name

    # --- reads -------------------------------------------------------------------------------

    def get(self, rdef: ResourceDef, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._objects.get(self._key(rdef, namespace, name))
        if obj is None:
            raise errors.not_found(rdef.plural, rdef.group, name)
        return copy.deepcopy(obj)

    def exists(self, rdef: ResourceDef, namespace: str | None, name: str) -> bool:
        return self._key(rdef, namespace, name) in self._objects

    def list(self, rdef: ResourceDef, namespace: str | None, match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        found = [
            obj for (group, plural, ns, _), obj in sorted(self._objects.items())
            if (group, plural) == rdef.key and (namespace is None or ns == namespace) and match(obj)
        ]
        return copy.deepcopy(found)

    def dependents(self, uid: str) -> Iterator[tuple[ResourceDef, dict[str, Any]]]:
        for (group, plural, _, _), obj in list(self._objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            rdef = self.registry.find_any(group, plural)
            if rdef is not None and any(ref.get("uid") == uid for ref in refs):
                yield rdef, obj

    # --- writes ------------------------------------------------------------------------------

    def _admit(self, rdef: ResourceDef, version: str, obj: dict[str, Any], strict: bool) -> tuple[dict[str, Any], list[str]]:
        """Schema defaulting/pruning/validation and the metadata limits every write must pass."""
        name = obj["metadata"].get("name", "")
        size = len(json.dumps(obj["metadata"].get("annotations") or {}, separators=(",", ":")))
        if size > MAX_ANNOTATIONS_BYTES:
            raise errors.invalid(rdef.kind, rdef.group, name, [("metadata.annotations", f"Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes")])
        if rdef.plural == "customresourcedefinitions" and (problems := schema.crd_problems(obj)):
            raise errors.invalid(rdef.kind, rdef.group, name, problems)  # a schema the server cannot prune or default by
        if not rdef.custom:
            return obj, []
        obj, pruned, causes = schema.admit(obj, rdef.schemas.get(version) or {})
        if strict and pruned:
            kind = rdef.kind
            fields = ", ".join(f'unknown field "{p}"' for p in pruned)
            raise errors.bad_request(f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding error: {fields}')
        if causes:
            raise errors.invalid(rdef.kind, rdef.group, name, causes)
        return obj, pruned

    def create(self, rdef: ResourceDef, version: str, namespace: str | None, body: dict[str, Any], strict: bool = False) -> tuple[dict[str, Any], list[str]]:
        if not isinstance(body, dict):
            raise errors.bad_request("the object must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            raise errors.invalid(rdef.kind, rdef.group, "", [("metadata.name", "Required value: name or generateName is required")])
        if problem := _name_problem(name, label=rdef.plural == "namespaces"):
            raise errors.invalid(rdef.kind, rdef.group, name, [("metadata.name", f'Invalid value: "{name}": {problem}')])
        if rdef.namespaced:
            if namespace and meta.get("namespace", namespace) != namespace:
                raise errors.bad_request("the namespace of the provided object does not match the namespace sent on the request")
            namespace = namespace or meta.get("namespace") or "default"
            ns_obj = self._objects.get(("", "namespaces", "", namespace))
            if ns_obj is None:
                raise errors.not_found("namespaces", "", namespace)
            if ns_obj["metadata"].get("deletionTimestamp"):
                raise errors.ApiError(403, "Forbidden", f'unable to create new content in namespace {namespace} because it is being terminated')
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        key = self._key(rdef, namespace, name)
        if key in self._objects:
            raise errors.already_exists(rdef.plural, rdef.group, name)
        obj["apiVersion"], obj["kind"] = rdef.api_version(version), rdef.kind
        if rdef.status_subresource:
            obj.pop("status", None)
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "managedFields"):
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now())
        if rdef.tracks_generation:
            meta["generation"] = 1
        obj, pruned = self._admit(rdef, version, obj, strict)
        self._on_create(rdef, obj)
        self._bump(obj)
        self._objects[key] = obj
        self._record(rdef, "ADDED", obj)
        return copy.deepcopy(obj), pruned

    def _on_create(self, rdef: ResourceDef, obj: dict[str, Any]) -> None:
        """Side effects of special kinds: a CRD starts serving its resource; namespaces become Active."""
        if rdef.plural == "customresourcedefinitions":
            served = from_crd(obj)
            names = obj["spec"]["names"]
            obj["status"] = {
                "acceptedNames": names,
                "storedVersions": [v["name"] for v in obj["spec"]["versions"] if v.get("storage")],
                "conditions": [
                    {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now()}
                    for t, r, m in (("NamesAccepted", "NoConflicts", "no conflicts found"),
                                    ("Established", "InitialNamesAccepted", "the initial names have been accepted"))
                ],
            }
            self.registry.add(served)
        elif rdef.plural == "namespaces":
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj["status"] = {"phase": "Active"}
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]

    def update(
        self, rdef: ResourceDef, version: str, namespace: str | None, name: str,
        change: Callable[[dict[str, Any]], dict[str, Any]], *, status: bool = False, strict: bool = False,
    ) -> tuple[dict[str, Any], list[str]]:
        """Apply `change` to the stored object: PUT and every PATCH flavour end up here.

        Writes to the main resource keep the stored `.status` when status is a subresource, writes
        to `/status` keep everything but `.status`; identity fields never change; a write that
        changes nothing is a no-op, exactly like the real server.
        """
        key = self._key(rdef, namespace, name)
        old = self._objects.get(key)
        if old is None:
            raise errors.not_found(rdef.plural, rdef.group, name)
        new = change(copy.deepcopy(old))
        if not isinstance(new, dict):
            raise errors.bad_request("the object must be a JSON object")
        new_meta = new.setdefault("metadata", {})
        if not isinstance(new_meta, dict):
            raise errors.bad_request("metadata must be an object")
        expected_rv = new_meta.get("resourceVersion")
        if expected_rv and expected_rv != old["metadata"]["resourceVersion"]:
            raise errors.conflict(rdef.plural, rdef.group, name, "the object has been modified; please apply your changes to the latest version and try again")
        if new_meta.get("name", name) != name:
            raise errors.bad_request(f'the name of the object ({new_meta.get("name")}) does not match the name on the URL ({name})')
        if status:
            new = {**old, "status": new.get("status")} if "status" in new else {k: v for k, v in old.items() if k != "status"}
            new["metadata"] = copy.deepcopy(old["metadata"])
        elif rdef.status_subresource:
            new = {k: v for k, v in new.items() if k != "status"}
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
        meta = new["metadata"]
        for field in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
            else:
                meta.pop(field, None)
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        meta.pop("managedFields", None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        new, pruned = self._admit(rdef, version, new, strict)
        meta = new["metadata"]
        if new == old:
            return copy.deepcopy(old), pruned
        if rdef.tracks_generation and _spec_part(new, rdef) != _spec_part(old, rdef):
            meta["generation"] = old["metadata"].get("generation", 1) + 1
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(rdef, key, new)
            return copy.deepcopy(new), pruned
        if rdef.plural == "customresourcedefinitions":
            self.registry.add(from_crd(new))
        self._bump(new)
        self._objects[key] = new
        self._record(rdef, "MODIFIED", new)
        return copy.deepcopy(new), pruned

    def delete(self, rdef: ResourceDef, namespace: str | None, name: str, propagation: str | None = None,
               uid: str | None = None) -> dict[str, Any]:
        """Finalizers turn deletion into marking; otherwise the object goes and its dependents follow.
        `uid` is DeleteOptions' precondition: another object of that name is a 409 Conflict."""
        key = self._key(rdef, namespace, name)
        obj = self._objects.get(key)
        if obj is None:
            raise errors.not_found(rdef.plural, rdef.group, name)
        if uid and obj["metadata"]["uid"] != uid:
            raise errors.conflict(rdef.plural, rdef.group, name,
                                  f"Precondition failed: UID in precondition: {uid}, UID in object meta: {obj['metadata']['uid']}")
        if rdef.plural == "namespaces":
            return self._delete_namespace(key, obj)
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"].update(deletionTimestamp=now(), deletionGracePeriodSeconds=0)
                self._bump(obj)
                self._record(rdef, "MODIFIED", obj)
            return copy.deepcopy(obj)
        self._remove(rdef, key, obj, orphan=propagation == "Orphan")
        return copy.deepcopy(obj)

    def _remove(self, rdef: ResourceDef, key: ObjKey, obj: dict[str, Any], orphan: bool = False) -> None:
        self._objects.pop(key, None)
        self._bump(obj)
        self._record(rdef, "DELETED", obj)
        uid = obj["metadata"]["uid"]
        for dep_def, dep in list(self.dependents(uid)):
            dep_meta = dep["metadata"]
            if orphan:
                self.update(dep_def, dep_def.versions[0], dep_meta.get("namespace"), dep_meta["name"],
                            lambda o, u=uid: _drop_owner(o, u))
            elif self._key(dep_def, dep_meta.get("namespace"), dep_meta["name"]) in self._objects:
                self.delete(dep_def, dep_meta.get("namespace"), dep_meta["name"])
        if rdef.plural == "customresourcedefinitions":
            served = from_crd(obj)
            for other in [o for k, o in self._objects.items() if k[:2] == served.key]:
                self._remove(served, self._key(served, other["metadata"].get("namespace"), other["metadata"]["name"]), other)
            self.registry.remove(served.key)
        if key[2]:
            self._finish_namespace(key[2])

    def _delete_namespace(self, key: ObjKey, obj: dict[str, Any]) -> dict[str, Any]:
        """Namespaces go Terminating, their content is deleted, and they vanish once empty."""
        ns_def = self.registry.find("", "v1", "namespaces")
        assert ns_def is not None
        if not obj["metadata"].get("deletionTimestamp"):
            obj["metadata"]["deletionTimestamp"] = now()
            obj["status"] = {"phase": "Terminating"}
            self._bump(obj)
            self._record(ns_def, "MODIFIED", obj)
        snapshot = copy.deepcopy(obj)
        for (group, plural, ns, name) in [k for k in self._objects if k[2] == key[3]]:
            rdef = self.registry.find_any(group, plural)
            if rdef is not None and (group, plural, ns, name) in self._objects:
                self.delete(rdef, ns, name)
        self._finish_namespace(key[3])
        return snapshot

    def _finish_namespace(self, namespace: str) -> None:
        key = ("", "namespaces", "", namespace)
        ns_obj = self._objects.get(key)
        if ns_obj is None or not ns_obj["metadata"].get("deletionTimestamp"):
            return
        if any(k[2] == namespace for k in self._objects):
            return
        ns_def = self.registry.find("", "v1", "namespaces")
        assert ns_def is not None
        self._remove(ns_def, key, ns_obj)


_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _name_problem(name: str, label: bool) -> str | None:
    """The server's name rules: RFC 1123 subdomains, or labels for namespaces; worded as it words them."""
    if label and (len(name) > 63 or not _LABEL.match(name)):
        return ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
                "and must start and end with an alphanumeric character")
    if not label and (len(name) > 253 or not _SUBDOMAIN.match(name)):
        return ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                "and must start and end with an alphanumeric character")
    return None


def _drop_owner(obj: dict[str, Any], uid: str) -> dict[str, Any]:
    refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
    obj["metadata"]["ownerReferences"] = refs or None
    if not refs:
        obj["metadata"].pop("ownerReferences")
    return obj
