"""A real cluster: the operator's scenarios against a real API server and a real KubeRay.

Skipped unless FINETUNE_E2E_KUBECONFIG names a kubeconfig. Set-up, once (kind + KubeRay by Helm):

    kind create cluster --name finetune
    helm repo add kuberay https://ray-project.github.io/kuberay-helm/
    helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0 --wait
    docker build --target trainer -t finetune-trainer:e2e . && kind load docker-image finetune-trainer:e2e --name finetune
    kind get kubeconfig --name finetune > /tmp/kind.kubeconfig
    FINETUNE_E2E_KUBECONFIG=/tmp/kind.kubeconfig FINETUNE_E2E_IMAGE=finetune-trainer:e2e \\
        pytest tests/e2e_cluster -v

Optional:
    FINETUNE_E2E_IMAGE       trainer image the pods run (default: the spec's default image)
    FINETUNE_E2E_OPERATOR    "local" (default): each test runs `finetune operator --namespace <ns>` here,
                             against the cluster; "installed": the chart's operator already runs there
                             (helm install finetune-operator helm/finetune-operator), tests only observe
    FINETUNE_E2E_S3_ENDPOINT, FINETUNE_E2E_S3_BUCKET, FINETUNE_E2E_S3_ACCESS_KEY, FINETUNE_E2E_S3_SECRET_KEY
                             an S3-compatible service reachable from the pods AND from here (e.g. a MinIO
                             in the cluster, port-forwarded): the training test then checks progress
                             (trials, best trial, checkpoint) in the status and the checkpoint in S3
    FINETUNE_E2E_TRAIN_TIMEOUT  seconds for the real training run (default 1800)
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest

KUBECONFIG = os.environ.get("FINETUNE_E2E_KUBECONFIG")
REPO = pathlib.Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"

SKIP_REASON = ("real-cluster e2e: set FINETUNE_E2E_KUBECONFIG to the kubeconfig of a cluster with KubeRay "
               "installed (see tests/e2e_cluster/conftest.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not KUBECONFIG:
        here = pathlib.Path(__file__).parent
        for item in items:
            if here in pathlib.Path(item.fspath).parents:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))

Kubectl = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def kubectl() -> Kubectl:
    def run(*args: str, check: bool = True, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        assert KUBECONFIG, SKIP_REASON
        result = subprocess.run([KUBECTL, "--kubeconfig", KUBECONFIG, *args], input=input, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    return run


@pytest.fixture(scope="session")
def cluster_ready(kubectl: Kubectl) -> None:
    """KubeRay's CRDs must be there (installed with KubeRay); ours is applied from `finetune crd`."""
    missing = kubectl("get", "crd", "rayjobs.ray.io", "rayclusters.ray.io", check=False)
    if missing.returncode != 0:
        pytest.fail(f"KubeRay is not installed in the cluster: {missing.stderr.strip()}")
    crd = subprocess.run([sys.executable, "-m", "finetune_operator.cli", "crd"], capture_output=True, text=True, check=True)
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=crd.stdout)
    kubectl("wait", "--for", "condition=Established", "crd/finetunejobs.finetune.dev", "--timeout=60s")


@pytest.fixture
def namespace(kubectl: Kubectl, cluster_ready: None) -> Iterator[str]:
    name = f"ftj-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    if os.environ.get("FINETUNE_E2E_KEEP") != "1":
        kubectl("delete", "namespace", name, "--wait=false", check=False)


class Operator:
    """`finetune operator --namespace NS` run here against the cluster (or nothing, when installed)."""

    def __init__(self, namespace: str, log: pathlib.Path):
        self.namespace, self.log = namespace, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Operator:
        if os.environ.get("FINETUNE_E2E_OPERATOR", "local") == "installed":
            return self
        env = {**os.environ, "KUBECONFIG": str(KUBECONFIG),
               "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer")])}
        args = [sys.executable, "-m", "finetune_operator.cli", "operator", "--namespace", self.namespace,
                "--health-port", "0", "--metrics-port", "0", "--progress-interval", "5"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def start_operator(namespace: str, tmp_path: pathlib.Path) -> Iterator[Callable[[], Operator]]:
    started: list[Operator] = []

    def start() -> Operator:
        started.append(Operator(namespace, tmp_path / "operator.log").start())
        return started[-1]

    yield start
    for op in started:
        op.stop()
    if started:
        print(started[0].output()[-5000:])


@pytest.fixture
def operator(start_operator: Callable[[], Operator]) -> Operator:
    return start_operator()
