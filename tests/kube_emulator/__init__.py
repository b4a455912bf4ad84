"""An in-process Kubernetes API server for tests: real kubectl, kopf and the `kubernetes` client work against it.

No real kube-apiserver can run on the test machines, yet the operator's end-to-end tests need the
real clients, not mocks of them. `running()` starts the emulator (a kmock handler, see `server`)
on 127.0.0.1 on a free port in a background thread and writes a kubeconfig pointing at it::

    with kube_emulator.running(tmp_path) as api:
        subprocess.run(["kubectl", "--kubeconfig", api.kubeconfig_path, "get", "ns"], check=True)

The handler is a kmock handler, so kmock's DSL still works on it for fault injection and request
assertions: `api.handler[kmock.resource("v1/configmaps"), kmock.action.CREATE] << 500` makes
creating ConfigMaps fail, and `list(api.handler)` is every request served so far.
Modules, one concern each: `server` (HTTP routing), `store` (objects, metadata, finalizers, GC),
`watch`, `patching`, `schema` (CRD validation), `registry` (served kinds), `discovery`
(discovery + OpenAPI), `tables` (kubectl's printer columns), `selectors`, `errors`, `protobuf`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import pathlib
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import attrs
import kmock
import yaml

from .server import BigBodyServer, KubeApiHandler
from .store import HISTORY_LIMIT, Store

__all__ = ["KubeEmulator", "running"]
T = TypeVar("T")


@attrs.define
class KubeEmulator:
    """A running emulator: where it listens, its kubeconfig, and thread-safe access to its store."""

    url: str
    kubeconfig_path: pathlib.Path
    handler: KubeApiHandler
    loop: asyncio.AbstractEventLoop

    @property
    def store(self) -> Store:
        """The live store; touch it only through `call`, from outside the server's thread."""
        return self.handler.store

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the server's loop (where the store lives) and return its result."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def requests_seen(self) -> list[tuple[str, str, str]]:
        """(method, path, User-Agent) of every request served so far, oldest first: what a test
        checks a client never asked for (e.g. the operator reading a Secret)."""
        return self.call(lambda: [(r.method, r.url.path, r.headers.get("User-Agent", "")) for r in self.handler._requests])

    def configure_kubernetes_client(self) -> None:
        """Point the `kubernetes` client (and kopf's login through it) at this emulator.

        The client reads $KUBECONFIG once, at import time, into a module constant that
        `load_kube_config()` falls back to; setting the environment later changes nothing.
        """
        import kubernetes.config.kube_config

        kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(self.kubeconfig_path)
        kubernetes.config.load_kube_config(config_file=str(self.kubeconfig_path))

    def env(self) -> dict[str, str]:
        """Environment variables that point kubectl (and its discovery cache) at this emulator."""
        return {"KUBECONFIG": str(self.kubeconfig_path), "KUBECACHEDIR": str(self.kubeconfig_path.parent / "cache")}


def write_kubeconfig(path: pathlib.Path, url: str) -> pathlib.Path:
    """A plain-http kubeconfig with a static token (kopf's kubeconfig login wants some credentials)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {"token": "emulator-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"}}],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def running(directory: pathlib.Path | str | None = None, *, history_limit: int = HISTORY_LIMIT) -> Iterator[KubeEmulator]:
    """Serve the emulator in a background thread for the duration of the `with` block.

    `history_limit` bounds the events kept for watch replay; a watch from an older
    resourceVersion gets 410 Gone (tests of relisting set it low).
    """
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="kube-emulator-"))
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        started: concurrent.futures.Future[KubeEmulator] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()

        async def serve() -> None:
            try:
                handler = KubeApiHandler(store=Store(history_limit=history_limit))
                async with handler, kmock.Server(handler, server_cls=BigBodyServer) as server:
                    url = str(server.url).rstrip("/")
                    kubeconfig = write_kubeconfig(directory / "kubeconfig", url)
                    started.set_result(KubeEmulator(url, kubeconfig, handler, loop))
                    await stop.wait()
                    handler.store.close()
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                raise

        thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), name="kube-emulator", daemon=True)
        thread.start()
        try:
            yield started.result(timeout=30)
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(timeout=30)
            if not thread.is_alive():
                loop.close()

