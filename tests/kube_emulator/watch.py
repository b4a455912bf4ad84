"""Watch streams: replay from a resourceVersion, then follow live changes.

A controller lists, remembers the list's resourceVersion and watches from it; every change after
that version must arrive exactly once, or the controller silently misses work. So a watch replays
the store's event history past the requested version before following live events, and asks for a
relist with 410 Gone when that version has already been dropped from the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from . import errors
from .registry import ResourceDef
from .store import Store

BOOKMARK_INTERVAL = 5.0


def _in_scope(obj: dict[str, Any], namespace: str | None, match: Callable[[dict[str, Any]], bool]) -> bool:
    return (namespace is None or obj["metadata"].get("namespace") == namespace) and match(obj)


async def stream(
    store: Store,
    rdef: ResourceDef,
    version: str,
    namespace: str | None,
    match: Callable[[dict[str, Any]], bool],
    render: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    resource_version: str | None,
    timeout: float | None,
    bookmarks: bool,
) -> AsyncIterator[dict[str, Any] | bytes]:
    """Yield watch events (`{"type": ..., "object": ...}`) until the timeout or the client leaves.

    `render` turns a stored object into what this client asked for (apiVersion, Table rows).
    With no resourceVersion (or "0") the stream starts with ADDED for every existing object.
    """
    deadline = time.monotonic() + timeout if timeout else None
    since = None
    if resource_version not in (None, "", "0"):
        try:
            since = int(resource_version)
        except ValueError:
            raise errors.bad_request(f"invalid resource version: {resource_version!r}") from None
    yield b""  # the caller starts streaming here: the request was valid
    if since is None:
        for obj in store.list(rdef, namespace, match):
            yield {"type": "ADDED", "object": render(obj)}
        since = store.resource_version
    else:
        if since < store.oldest_replayable:
            gone = errors.gone(f"too old resource version: {since} ({store.oldest_replayable + 1})")
            yield {"type": "ERROR", "object": gone.to_status()}
            return
    last_bookmark = time.monotonic()
    while True:
        waiter = store.changed()  # taken before reading the history, so no change slips between
        for event in [e for e in store.history if e.rv > since]:
            since = event.rv
            if event.key == rdef.key and _in_scope(event.obj, namespace, match):
                yield {"type": event.type, "object": render(event.obj)}
        remaining = None if deadline is None else deadline - time.monotonic()
        if store.closed or (remaining is not None and remaining <= 0):
            return
        wait = BOOKMARK_INTERVAL if bookmarks else None
        if remaining is not None:
            wait = remaining if wait is None else min(wait, remaining)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.wait(), wait)
        if bookmarks and time.monotonic() - last_bookmark >= BOOKMARK_INTERVAL:
            last_bookmark = time.monotonic()
            marker = {"apiVersion": rdef.api_version(version), "kind": rdef.kind,
                      "metadata": {"resourceVersion": str(since)}}
            yield {"type": "BOOKMARK", "object": marker}
