"""End-to-end fixtures: one Kubernetes API emulator per session, driven by real kubectl, kopf and client.

`kube_api` starts the emulator (tests/kube_emulator) and points every client at it: $KUBECONFIG and
kubectl's discovery cache for subprocesses, and the `kubernetes` client's default kubeconfig
location, which that client reads once at import time (so setting $KUBECONFIG here would come too
late for it, and for kopf's login, which goes through it).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from finetune_operator.crd import build_crd
from tests import kube_emulator
from tests.e2e.operator_harness import KUBECTL, KUBERAY, REPO, Kubectl, OperatorProcess


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


# -- the operator's fixtures (tests/e2e/operator_harness.py has what they run) ---------------------

@pytest.fixture(scope="module")
def crds(kubectl: Kubectl) -> None:
    """The FineTuneJob CRD as `finetune crd` prints it, and KubeRay's (server-side, as KubeRay's docs say)."""
    crd = subprocess.run([sys.executable, "-m", "finetune_operator.cli", "crd"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(crd.stdout) == build_crd()
    kubectl("apply", "-f", "-", input=crd.stdout)
    for name in ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml"):
        kubectl("apply", "--server-side", "-f", str(KUBERAY / name))
    kubectl("wait", "--for", "condition=Established", "crd/finetunejobs.finetune.dev", "crd/rayjobs.ray.io", "--timeout=10s")


@pytest.fixture
def start_operator(crds: None, namespace: str, kube_api: kube_emulator.KubeEmulator,
                   tmp_path: pathlib.Path) -> Iterator[Callable[[], OperatorProcess]]:
    """Start (and, at the end, stop) operators watching this test's namespace; all log to one file."""
    env = {**os.environ, **kube_api.env(), "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer"), str(REPO)])}
    started: list[OperatorProcess] = []

    def start() -> OperatorProcess:
        started.append(OperatorProcess(namespace, tmp_path / "operator.log", env).start())
        return started[-1]

    yield start
    for proc in started:
        proc.stop()
    log = started[0].output() if started else ""
    assert "Traceback" not in log, log[-8000:]


@pytest.fixture
def operator(start_operator: Callable[[], OperatorProcess]) -> OperatorProcess:
    return start_operator()


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    from finetune_trainer.embedded_s3 import embedded_s3

    with embedded_s3(bucket="ftj-e2e") as server:
        yield server
