"""A hostile job author against the real operator (kopf), kubectl and the API emulator: the
operator is no confused deputy. It reads no Secret, sends nothing to an address the author
chose, and refuses loopback/metadata endpoints and literal credentials as Stalled/InvalidSpec
with no RayJob. docs/security.md's threat model points here.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.operator_harness import (
    Kubectl,
    OperatorProcess,
    apply,
    condition,
    events,
    get,
    job,
    kuberay_says,
    manifest,
    rayjobs,
    wait_status,
)


class Listener:
    """An endpoint the author owns, on loopback: records every byte anyone sends it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(1)
                try:
                    while chunk := conn.recv(65536):
                        self.received += chunk
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    found = Listener()
    yield found
    found.close()


def _other_teams_secret(kubectl: Kubectl, namespace: str) -> str:
    """A Secret the job's author has no business with; returns its password."""
    password = f"hunter2-{uuid.uuid4().hex}"
    kubectl("create", "secret", "generic", "team-b-db", "-n", namespace, f"--from-literal=password={password}")
    return password


def _never_seen(password: str, kubectl: Kubectl, namespace: str, operator: OperatorProcess) -> None:
    """Credentials appear in no status, Event, RayJob or operator log."""
    assert password not in json.dumps(get(kubectl, namespace, "finetunejobs")), "a password in a status"
    assert password not in json.dumps(events(kubectl, namespace)), "a password in an Event"
    assert password not in json.dumps(rayjobs(kubectl, namespace)), "a password in a RayJob"
    assert password not in operator.output(), "a password in the operator's log"


def _secret_reads(kube_api: Any, since: int) -> list[tuple[str, str, str]]:
    """Reads of any Secret since request number `since` (the emulator serves the whole session)."""
    return [r for r in kube_api.requests_seen()[since:] if "/secrets" in r[1] and r[0] != "POST"]


def test_a_job_cannot_make_the_operator_send_another_teams_secret_to_its_endpoint(
        kubectl: Kubectl, namespace: str, operator: OperatorProcess, kube_api: Any, listener: Listener) -> None:
    since = len(kube_api.requests_seen())
    password = _other_teams_secret(kubectl, namespace)
    stolen = {"name": "team-b-db", "accessKeyIdKey": "password", "secretAccessKeyKey": "password"}
    apply(kubectl, namespace, manifest(name="exfil", storage={"uri": "s3://loot/x", "endpoint": f"http://127.0.0.1:{listener.port}"},
                                       cluster={"s3CredentialsSecret": stolen}))
    stalled = wait_status(kubectl, namespace, "exfil", "InvalidSpec", phase="Failed", reason="InvalidSpec")
    cond = condition(stalled, "Stalled")
    assert (cond["status"], cond["reason"]) == ("True", "InvalidSpec") and "spec.storage.endpoint" in cond["message"]
    assert rayjobs(kubectl, namespace) == []

    # the same Secret with an endpoint the rules accept: the run is rendered (its pods get the
    # reference, as any pod in this namespace could), and the operator still reads nothing
    apply(kubectl, namespace, manifest(name="exfil2", storage={"uri": "s3://loot/x", "endpoint": "http://s3.team-a.svc:9000"},
                                       cluster={"s3CredentialsSecret": stolen}))
    wait_status(kubectl, namespace, "exfil2", "Pending", phase="Pending", rayJobName="exfil2-ray")
    kuberay_says(kubectl, namespace, "exfil2-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_status(kubectl, namespace, "exfil2", "Running", phase="Running")
    time.sleep(2)  # four progress ticks (--progress-interval 0.5): each would have been a storage read before
    [rayjob] = rayjobs(kubectl, namespace)
    env = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "team-b-db", "key": "password"}}} in env

    assert listener.received == b"" and listener.connections == 0
    assert _secret_reads(kube_api, since) == [], "the operator read a Secret"
    _never_seen(password, kubectl, namespace, operator)


@pytest.mark.parametrize(("case", "spec", "field"), [
    ("metadata-v4", {"storage": {"uri": "s3://b-1/x", "endpoint": "http://169.254.169.254"}}, "spec.storage.endpoint"),
    ("metadata-v6", {"storage": {"uri": "s3://b-1/x", "endpoint": "http://[fd00:ec2::254]"}}, "spec.storage.endpoint"),
    ("loopback-decimal", {"storage": {"uri": "s3://b-1/x", "endpoint": "http://2130706433:9000"}}, "spec.storage.endpoint"),
    ("literal-aws-key", {"cluster": {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI"}]}}, "spec.cluster.env[0].value"),
    ("literal-token", {"cluster": {"env": [{"name": "HF_TOKEN", "value": "hf_abc"}],
                                   "s3CredentialsSecret": {"name": "s3"}}}, "spec.cluster.env[0].value"),
])
def test_hostile_endpoints_and_literal_credentials_are_stalled_without_a_rayjob(
        kubectl: Kubectl, namespace: str, operator: OperatorProcess, case: str, spec: dict[str, Any], field: str) -> None:
    apply(kubectl, namespace, manifest(name=case, **spec))
    stalled = wait_status(kubectl, namespace, case, "InvalidSpec", phase="Failed", reason="InvalidSpec")
    assert field in condition(stalled, "Stalled")["message"]
    assert rayjobs(kubectl, namespace) == []
    assert "wJalrXUtnFEMI" not in json.dumps(job(kubectl, namespace, case)["status"])


def test_an_operator_given_namespaces_asks_for_no_namespace_list_or_watch(
        kubectl: Kubectl, namespace: str, start_operator: Any, kube_api: Any) -> None:
    """The chart grants no right on Namespaces: with --namespace, the operator must not list or
    watch them (kopf does, to match patterns, unless its scanning is off; serve._settings)."""
    since = len(kube_api.requests_seen())
    operator = start_operator()
    apply(kubectl, namespace, manifest(name="scoped"))
    wait_status(kubectl, namespace, "scoped", "Pending", phase="Pending", rayJobName="scoped-ray")
    asked = [r for r in kube_api.requests_seen()[since:] if r[1] == "/api/v1/namespaces" and r[0] == "GET"]
    assert asked == [], f"the operator listed or watched Namespaces: {asked[:3]}"
    assert "Not enough permissions" not in operator.output()
