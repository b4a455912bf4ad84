"""What the end-to-end tests share besides fixtures: polling with a deadline, the operator as a
subprocess, and small kubectl helpers that read and write objects the way a user (or KubeRay)
would. The fixtures that use them are in conftest.py (which imports from here, not the reverse)."""

from __future__ import annotations

import copy
import json
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

from finetune_trainer.spec.progress import ProgressDocument

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
Kubectl = Callable[..., subprocess.CompletedProcess[str]]
T = TypeVar("T")


REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
KUBERAY = pathlib.Path("/work/shared/contracts/kuberay-v1.7.0")
if not KUBERAY.exists():  # the shared checkout sits next to the repository
    KUBERAY = REPO.parent / "shared/contracts/kuberay-v1.7.0"
PROGRESS_INTERVAL = 0.5  # seconds: --progress-interval, so the S3 test does not wait 30 s
WAIT = 20.0  # the deadline of each wait


def wait_for(probe: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05,
             what: str | Callable[[], str] = "condition") -> T:
    """Poll `probe` until it returns something truthy, or fail after `timeout` seconds (no fixed sleeps).
    `what` may be a callable, read when the wait fails (a log as it is then, not as it was before)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}; last probe: {last!r}")


class OperatorProcess:
    """`finetune operator --namespace NS` as a subprocess with its log in a file."""

    def __init__(self, namespace: str, log: pathlib.Path, env: dict[str, str]):
        self.namespace, self.log, self.env = namespace, log, env
        self.health_port, self.metrics_port = _free_port(), _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        args = [sys.executable, "-m", "finetune_operator.cli", "operator", "--namespace", self.namespace,
                "--health-port", str(self.health_port), "--metrics-port", str(self.metrics_port),
                "--progress-interval", str(PROGRESS_INTERVAL),]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        # 60 s: a Python start plus kopf's login takes seconds, and CI machines are shared and loaded
        wait_for(lambda: self.alive() and http_ok(f"http://127.0.0.1:{self.health_port}/healthz"), timeout=60,
                 what=lambda: f"the operator's liveness endpoint; log:\n{self.output()[-3000:]}")
        return self

    def alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.output()[-5000:]}")
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: what the kubelet sends; kopf stops gracefully
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()


def manifest(example: str = "quickstart.yaml", name: str | None = None, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((EXAMPLES / example).read_text())
    if name:
        doc["metadata"]["name"] = name
    doc["spec"].update(copy.deepcopy(spec))
    return doc


def apply(kubectl: Kubectl, namespace: str, doc: dict[str, Any]) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def get(kubectl: Kubectl, namespace: str, *what: str) -> dict[str, Any]:
    return json.loads(kubectl("get", *what, "-n", namespace, "-o", "json").stdout)


def job(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    return get(kubectl, namespace, "finetunejob", name)


def rayjobs(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    return get(kubectl, namespace, "rayjobs")["items"]


def kuberay_says(kubectl: Kubectl, namespace: str, rayjob: str, **status: Any) -> None:
    """Play KubeRay: write the RayJob's status subresource."""
    kubectl("patch", "rayjob", rayjob, "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))


def s3_secret(kubectl: Kubectl, namespace: str, s3: Any, name: str = "s3") -> None:
    """The credentials Secret a user creates for spec.cluster.s3CredentialsSecret."""
    kubectl("create", "secret", "generic", name, "-n", namespace,
            f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}", f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}")


def trainer_reports(kube_api: Any, namespace: str, job_name: str, status: ProgressDocument) -> None:
    """Play the trainer: the driver's own ConfigMapWriter patches the job's progress ConfigMap, as
    the job's ServiceAccount would in the head pod (here with the emulator's token, over http)."""
    from finetune_operator.trainer_access import progress_name
    from finetune_trainer.kube_progress import ConfigMapWriter

    token = kube_api.kubeconfig_path.parent / "trainer-token"
    token.write_text("emulator-token")
    ConfigMapWriter(server=kube_api.url, namespace=namespace, name=progress_name(job_name), token_file=token)(status.as_dict())


def run_id(rayjob: dict[str, Any]) -> str:
    """The run the RayJob's driver writes (FINETUNE_RUN_ID in its runtime env)."""
    return str(yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]["FINETUNE_RUN_ID"])


def final_report(job_name: str, run: str, **fields: Any) -> ProgressDocument:
    """The trainer's last status.json of a single run that finished (job_status.snapshot's shape)."""
    from finetune_trainer.job_status import snapshot

    return snapshot(job_name, run, kind="single", state="finished", trials={run: "completed"}, **fields)


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    found = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype]
    return found[0] if found else {}


def wait_status(kubectl: Kubectl, namespace: str, name: str, what: str, **expected: Any) -> dict[str, Any]:
    """Wait until status has every `expected` field (`reason="Training"`, `phase="Running"`)."""

    def probe() -> dict[str, Any] | None:
        obj = job(kubectl, namespace, name)
        status = obj.get("status", {})
        return obj if all(status.get(key) == value for key, value in expected.items()) else None

    try:
        return wait_for(probe, timeout=WAIT, interval=0.1, what=what)
    except AssertionError as err:
        raise AssertionError(f"{err}\nstatus: {json.dumps(job(kubectl, namespace, name).get('status'), indent=1)}") from None


def events(kubectl: Kubectl, namespace: str) -> list[tuple[str, str, str]]:
    items = get(kubectl, namespace, "events")["items"]
    return [(e.get("type", ""), e.get("reason", ""), e.get("message", "")) for e in items]


def printer_table(kubectl: Kubectl, namespace: str, *flags: str) -> str:
    table = kubectl("get", "ftj", "-n", namespace, *flags).stdout
    print(f"\n$ kubectl get ftj -n {namespace} {' '.join(flags)}\n{table}")  # shown with pytest -s / -rP
    return table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False




def attempts(operator: OperatorProcess, namespace: str, name: str) -> int:
    """How many times kopf ran the reconcile handler for one job, from its log."""
    pattern = re.compile(rf"\[{re.escape(namespace)}/{re.escape(name)}\] Handler '(create|resume|update)' (succeeded|failed|is)")
    return len(pattern.findall(operator.output()))
