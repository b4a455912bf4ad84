"""HTTP routing of the Kubernetes REST API onto the store, as a kmock handler.

kmock gives us the aiohttp server, request recording and its DSL (a test can still inject a
fault with `handler['get /api/v1/namespaces'] << 500`, which takes priority over this routing);
this module adds what kopf and kubectl need from a real API server: full URL grammar (including
`/api/v1/namespaces`, which kmock's own parser rejects), the verbs, patch content types, status
subresource, watch streams, Table printing and discovery.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from typing import Any

import aiohttp.test_utils
import aiohttp.web
import attrs
import kmock
from aiohttp.web_request import BaseRequest

from . import discovery, errors, patching, selectors, tables, watch
from .registry import ResourceDef
from .store import Store

logger = logging.getLogger(__name__)
MAX_BODY = 64 * 1024 * 1024  # the big KubeRay CRDs are over aiohttp's 1 MiB default
_GROUP_VERSION = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))(?P<rest>(?:/[^/]+)*)/?$")


class BigBodyServer(aiohttp.test_utils.RawTestServer):
    """kmock's default test server, but accepting request bodies as big as a real API server does."""

    async def _make_runner(self, debug: bool = True, **kwargs: Any) -> aiohttp.web.ServerRunner:
        def factory(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> BaseRequest:
            return BaseRequest(message, payload, protocol, writer, task, self._loop, client_max_size=MAX_BODY)

        server = aiohttp.web.Server(self._handler, loop=self._loop, debug=debug, request_factory=factory, **kwargs)
        return aiohttp.web.ServerRunner(server, debug=debug, **kwargs)


@attrs.frozen
class Target:
    """What a resource URL addresses: a collection, an object, or an object's subresource."""

    rdef: ResourceDef
    version: str
    namespace: str | None
    name: str | None
    subresource: str | None


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> aiohttp.web.Response:
    if isinstance(payload, bytes):
        return aiohttp.web.Response(body=payload, status=status, content_type="text/plain")
    return aiohttp.web.json_response(payload, status=status, headers=headers)


def _action(method: str, target: Target, watch_param: str | None) -> kmock.action | None:
    """kmock's name for what a request does, as its own parser would have guessed it."""
    if method == "GET":
        return kmock.action.WATCH if watch_param in ("true", "1") else kmock.action.FETCH if target.name else kmock.action.LIST
    if target.name is None:
        return kmock.action.CREATE if method == "POST" else None
    return {"PATCH": kmock.action.UPDATE, "PUT": kmock.action.UPDATE, "DELETE": kmock.action.DELETE}.get(method)


@attrs.define(kw_only=True)
class KubeApiHandler(kmock.KubernetesScaffold):
    """A kmock handler serving a stateful Kubernetes API from `store`."""

    store: Store = attrs.field(factory=Store)

    def __attrs_post_init__(self) -> None:
        """Deliberately not calling super(): kmock's discovery fallbacks only know resources declared to kmock."""

    async def __call__(self, raw_request: BaseRequest) -> aiohttp.web.StreamResponse:
        """kmock's entry point, minus its URL parser (it fails on `/api/v1/namespaces`)."""
        body = await raw_request.read()
        target = self._target(raw_request.path)
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        request = kmock.Request(
            id=len(self._requests), raw_request=raw_request, url=raw_request.url, method=raw_request.method,
            params=dict(raw_request.query), headers=dict(raw_request.headers), body=body, data=data,
            # The parsed Kubernetes intent, so kmock's criteria (`handler[kmock.resource(...)]`) match.
            resource=None if target is None else kmock.resource(target.rdef.group, target.version, target.rdef.plural),
            namespace=None if target is None else target.namespace,
            name=None if target is None else target.name,
            subresource=None if target is None else target.subresource,
            action=None if target is None else _action(raw_request.method, target, raw_request.query.get("watch")),
        )
        self._requests.append(request)
        try:
            return await self._handle(request)
        except Exception as exc:  # rendered as a `Status`, as the real server would
            return await self._render_error(exc)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """Reactions a test added through kmock's DSL win (fault injection); everything else is routed.

        The routing does not go through a kmock fallback reaction on purpose: kmock's response
        objects keep the status and headers of the last reply, which would leak a 201 into the next GET.
        """
        if self._payloads:
            try:
                return await super()._handle(request)
            except NotImplementedError:  # no reaction matched
                pass
        return await self._route(request)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if not isinstance(exc, errors.ApiError):
            logger.error("Emulator failure on a request", exc_info=exc)
            exc = errors.ApiError(500, "InternalError", f"emulator failure: {exc!r}", {})
        return aiohttp.web.json_response(exc.to_status(), status=exc.status)

    # --- routing -----------------------------------------------------------------------------

    async def _route(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path, method = request.url.path, str(request.method.value).upper()
        fixed = self._fixed_paths(path)
        if fixed is not None:
            if method != "GET":
                raise errors.method_not_allowed()
            return _json(fixed)
        target = self._target(path)
        if target is None:
            raise errors.resource_not_found(path)
        if method != "GET" and request.params.get("dryRun"):
            raise errors.bad_request("the emulator does not support dryRun; it would have written the change")
        if target.name is None:
            return await self._collection(request, target, method)
        return await self._object(request, target, method)

    def _fixed_paths(self, path: str) -> Any:
        registry = self.store.registry
        path = path.rstrip("/") or "/"
        simple: dict[str, Callable[[], Any]] = {
            "/version": lambda: discovery.SERVER_VERSION,
            "/api": discovery.api_versions,
            "/apis": lambda: discovery.api_group_list(registry),
            "/api/v1": lambda: discovery.api_resource_list(registry, "", "v1"),
            "/openapi/v3": lambda: discovery.openapi_v3_root(registry),
            "/openapi/v3/api/v1": lambda: discovery.openapi_v3_group_version(registry, "", "v1"),
            "/healthz": lambda: b"ok", "/livez": lambda: b"ok", "/readyz": lambda: b"ok",
            "/": lambda: {"paths": ["/api", "/api/v1", "/apis", "/openapi/v3", "/version"]},
        }
        if path in simple:
            return simple[path]()
        parts = path.strip("/").split("/")
        found: Any = None
        if len(parts) == 2 and parts[0] == "apis":
            found = discovery.api_group(registry, parts[1])
        elif len(parts) == 3 and parts[0] == "apis":
            found = discovery.api_resource_list(registry, parts[1], parts[2])
        elif len(parts) == 5 and parts[:3] == ["openapi", "v3", "apis"]:
            found = discovery.openapi_v3_group_version(registry, parts[3], parts[4])
        elif parts[0] != "openapi":
            return None
        if found is None:
            raise errors.resource_not_found(path)
        return found

    def _target(self, path: str) -> Target | None:
        m = _GROUP_VERSION.match(path)
        if not m:
            return None
        group, version = (m["group"] or "", m["version"] or m["core"])
        parts = [p for p in m["rest"].split("/") if p]
        namespace = None
        if len(parts) >= 3 and parts[0] == "namespaces" and not (group == "" and len(parts) == 3 and parts[2] in ("status", "finalize")):
            namespace, parts = parts[1], parts[2:]
        if not parts or len(parts) > 3:
            return None
        rdef = self.store.registry.find(group, version, parts[0])
        if rdef is None:
            return None
        name = parts[1] if len(parts) > 1 else None
        subresource = parts[2] if len(parts) > 2 else None
        if subresource is not None and not (subresource == "status" and rdef.status_subresource):
            return None
        return Target(rdef, version, namespace, name, subresource)

    # --- rendering ---------------------------------------------------------------------------

    @staticmethod
    def _render(target: Target, obj: dict[str, Any]) -> dict[str, Any]:
        """Serve the stored object as the requested version (no conversion: versions share a schema)."""
        obj["apiVersion"] = target.rdef.api_version(target.version)
        return obj

    def _respond(self, request: kmock.Request, target: Target, obj: dict[str, Any], status: int, pruned: list[str]) -> aiohttp.web.Response:
        headers = None
        if pruned and request.params.get("fieldValidation") == "Warn":
            headers = {"Warning": ", ".join(f'299 - "unknown field \\"{p}\\""' for p in pruned)}
        return _json(self._render(target, obj), status, headers)

    # --- collections -------------------------------------------------------------------------

    async def _collection(self, request: kmock.Request, target: Target, method: str) -> aiohttp.web.StreamResponse:
        rdef, params = target.rdef, request.params
        if method == "GET":
            match = self._matcher(params)
            if params.get("watch") in ("true", "1"):
                return await self._watch(request, target, match)
            items = [self._render(target, o) for o in self.store.list(rdef, target.namespace, match)]
            rv = str(self.store.resource_version)
            if tables.wants_table(request.headers.get("Accept", "")):
                return _json(tables.table(rdef, target.version, items, resource_version=rv, include=params.get("includeObject", "Metadata")))
            return _json({"apiVersion": rdef.api_version(target.version), "kind": f"{rdef.kind}List", "metadata": {"resourceVersion": rv}, "items": items})
        if method == "POST":
            body = patching.decode_body(request.body, request.headers.get("Content-Type", ""))
            obj, pruned = self.store.create(rdef, target.version, target.namespace, body, strict=self._strict(request))
            return self._respond(request, target, obj, 201, pruned)
        if method == "DELETE":
            match = self._matcher(params)
            items = self.store.list(rdef, target.namespace, match)
            for obj in items:
                self.store.delete(rdef, obj["metadata"].get("namespace"), obj["metadata"]["name"])
            return _json({"apiVersion": rdef.api_version(target.version), "kind": f"{rdef.kind}List", "metadata": {}, "items": items})
        raise errors.method_not_allowed()

    @staticmethod
    def _matcher(params: Any) -> Callable[[dict[str, Any]], bool]:
        labels = selectors.label_selector(params.get("labelSelector"))
        fields = selectors.field_selector(params.get("fieldSelector"))
        return lambda obj: labels(obj) and fields(obj)

    @staticmethod
    def _strict(request: kmock.Request) -> bool:
        return request.params.get("fieldValidation") == "Strict"

    async def _watch(self, request: kmock.Request, target: Target, match: Callable[[dict[str, Any]], bool]) -> aiohttp.web.StreamResponse:
        """Stream newline-delimited JSON events; errors before the first byte still get a proper status."""
        params = request.params
        render: Callable[[dict[str, Any]], dict[str, Any]] = functools.partial(self._render, target)
        if tables.wants_table(request.headers.get("Accept", "")):
            first = [True]

            def render(obj: dict[str, Any]) -> dict[str, Any]:
                doc = tables.table(target.rdef, target.version, [self._render(target, obj)],
                                   resource_version=obj["metadata"].get("resourceVersion", ""),
                                   include=params.get("includeObject", "Metadata"))
                if not first[0]:  # like the real server: column definitions in the first event only
                    doc["columnDefinitions"] = []
                first[0] = False
                return doc

        timeout = params.get("timeoutSeconds")
        events = watch.stream(
            self.store, target.rdef, target.version, target.namespace, match, render,
            resource_version=params.get("resourceVersion"), timeout=float(timeout) if timeout else None,
            bookmarks=params.get("allowWatchBookmarks") in ("true", "1"),
        )
        await anext(events)  # validates the request; raises before anything is sent
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request._raw_request)
        try:
            async for event in events:
                await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except ConnectionError:  # the client went away: nothing left to do
            pass
        finally:
            await events.aclose()
        return response

    # --- objects -----------------------------------------------------------------------------

    async def _object(self, request: kmock.Request, target: Target, method: str) -> aiohttp.web.StreamResponse:
        rdef, ns, name = target.rdef, target.namespace, target.name
        assert name is not None
        status = target.subresource == "status"
        strict = self._strict(request)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if method == "GET":
            if request.params.get("watch") in ("true", "1"):
                match = self._matcher(request.params)
                return await self._watch(request, target, lambda obj: obj["metadata"]["name"] == name and match(obj))
            obj = self._render(target, self.store.get(rdef, ns, name))
            if tables.wants_table(request.headers.get("Accept", "")):
                rv = str(self.store.resource_version)
                return _json(tables.table(rdef, target.version, [obj], resource_version=rv, include=request.params.get("includeObject", "Metadata")))
            return _json(obj)
        if method == "PUT":
            body = patching.decode_body(request.body, content_type)
            obj, pruned = self.store.update(rdef, target.version, ns, name, lambda _: body, status=status, strict=strict)
            return self._respond(request, target, obj, 200, pruned)
        if method == "PATCH":
            if content_type not in patching.SUPPORTED:
                raise errors.unsupported_media_type(content_type)
            patch = patching.decode_body(request.body, content_type)
            if content_type == patching.APPLY and not status and not self.store.exists(rdef, ns, name):
                body = {**patch, "metadata": {**(patch or {}).get("metadata", {}), "name": name}}
                obj, pruned = self.store.create(rdef, target.version, ns, body, strict=strict)
                return self._respond(request, target, obj, 201, pruned)
            obj, pruned = self.store.update(rdef, target.version, ns, name,
                                            lambda old: patching.apply_patch(old, patch, content_type, rdef.custom),
                                            status=status, strict=strict)
            return self._respond(request, target, obj, 200, pruned)
        if method == "DELETE" and not status:
            try:  # DeleteOptions; typed clients send them as protobuf, which only matters for propagation and preconditions
                options = patching.decode_body(request.body, "application/json") or {}
            except errors.ApiError:
                options = {}
            propagation = request.params.get("propagationPolicy") or options.get("propagationPolicy")
            uid = (options.get("preconditions") or {}).get("uid")
            return _json(self._render(target, self.store.delete(rdef, ns, name, propagation, uid=uid)))
        raise errors.method_not_allowed()
