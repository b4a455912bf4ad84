"""End-to-end fixtures: one Kubernetes API emulator per session, driven by real kubectl, kopf and client.

`kube_api` starts the emulator (tests/kube_emulator) and points every client at it: $KUBECONFIG and
kubectl's discovery cache for subprocesses, and the `kubernetes` client's default kubeconfig
location, which that client reads once at import time (so setting $KUBECONFIG here would come too
late for it, and for kopf's login, which goes through it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from tests import kube_emulator

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
T = TypeVar("T")


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kube_emulator.KubeEmulator]:
    """The running emulator; $KUBECONFIG and the `kubernetes` client point at it for the whole session."""
    with kube_emulator.running(tmp_path_factory.mktemp("kube")) as api:
        saved = {key: os.environ.get(key) for key in api.env()}
        os.environ.update(api.env())
        api.configure_kubernetes_client()
        try:
            yield api
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


Kubectl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def kubectl(kube_api: kube_emulator.KubeEmulator) -> Kubectl:
    """Run the real kubectl against the emulator: `kubectl("get", "ns", check=False, input=yaml_text)`."""

    def run(*args: str, check: bool = True, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **kube_api.env()}
        result = subprocess.run([KUBECTL, *args], env=env, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    return run


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards, so tests never see each other's objects."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def wait_for(probe: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> T:
    """Poll `probe` until it returns something truthy, or fail after `timeout` seconds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last probe: {last!r}")
