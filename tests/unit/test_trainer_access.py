"""Progress without a confused deputy: the job's own ServiceAccount may patch one ConfigMap, the
operator reads it through the API server and reads no Secret (trainer_access, progress,
kube_progress). tests/e2e/test_security.py runs the same through kopf, kubectl and the emulator."""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import kopf
import pytest

from finetune_operator.handlers import Operator, OperatorConfig
from finetune_operator.metrics import Metrics
from finetune_operator.progress import MAX_BYTES, ConfigMapProgressSource
from finetune_operator.rayjob import render_rayjob
from finetune_operator.trainer_access import pods_service_account, progress_name, render_trainer_access
from finetune_trainer.job_status import StatusPublisher, snapshot
from finetune_trainer.kube_progress import ConfigMapWriter
from finetune_trainer.spec import parse_job
from tests.tiny_models import minimal_manifest
from tests.unit.test_handlers import FakeKube, body

OWNER = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "quickstart", "uid": "u-1",
         "controller": True, "blockOwnerDeletion": True}


def job(**spec: Any):
    doc = minimal_manifest(**spec)
    doc["metadata"] = {"name": "quickstart", "namespace": "team-a"}
    return parse_job(doc)


def test_the_job_may_patch_its_one_configmap_and_nothing_else():
    objects = render_trainer_access(job(), owner_uid="u-1")
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("ServiceAccount", "quickstart-ray"), ("ConfigMap", "quickstart-ray-progress"),
        ("Role", "quickstart-ray-progress"), ("RoleBinding", "quickstart-ray-progress")]
    assert all(o["metadata"]["namespace"] == "team-a" and o["metadata"]["ownerReferences"] == [OWNER] for o in objects)
    account, configmap, role, binding = objects
    assert account["automountServiceAccountToken"] is False
    assert configmap["data"] == {}
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": ["quickstart-ray-progress"], "verbs": ["patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "quickstart-ray-progress"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "quickstart-ray", "namespace": "team-a"}]


def test_a_service_account_named_in_the_spec_is_bound_and_none_is_created():
    spec_job = job(cluster={"serviceAccountName": "irsa-trainer"})
    objects = render_trainer_access(spec_job)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Role", "RoleBinding"]
    assert objects[-1]["subjects"][0]["name"] == "irsa-trainer" == pods_service_account(spec_job)


def test_only_the_head_gets_a_token_and_no_pod_mounts_one_by_default():
    rayjob = render_rayjob(job())
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (worker_group,) = cluster["workerGroupSpecs"]
    worker = worker_group["template"]["spec"]
    assert head["serviceAccountName"] == worker["serviceAccountName"] == "quickstart-ray"
    (volume,) = head["volumes"]
    assert {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}} in volume["projected"]["sources"]
    assert "volumes" not in worker and "volumeMounts" not in worker["containers"][0]
    assert {"name": "FINETUNE_PROGRESS_CONFIGMAP", "value": "quickstart-ray-progress"} in head["containers"][0]["env"]


def test_progress_is_read_from_the_configmap_and_bad_content_is_ignored():
    spec_job = job()
    seen: list[tuple[str, str]] = []

    def source(data: dict[str, str] | None) -> ConfigMapProgressSource:
        return ConfigMapProgressSource(lambda namespace, name: seen.append((namespace, name)) or data)

    written = snapshot("quickstart", "run-1", kind="single", state="running", step=3, total_steps=10)
    read = source({"status.json": json.dumps(written.as_dict())}).read(spec_job)
    assert read == written and read is not None and (read.state, read.step) == ("running", 3)
    assert seen[-1] == ("team-a", progress_name("quickstart"))
    assert source(None).read(spec_job) is None  # not created yet
    assert source({}).read(spec_job) is None  # created, nothing written yet
    assert source({"status.json": "{not json"}).read(spec_job) is None
    assert source({"status.json": "[1, 2]"}).read(spec_job) is None
    assert source({"status.json": json.dumps({"state": "running", "step": 3})}).read(spec_job) is None  # no job, no time
    assert source({"status.json": json.dumps({**written.as_dict(), "state": "exploded"})}).read(spec_job) is None
    assert source({"status.json": " " * (MAX_BYTES + 1)}).read(spec_job) is None

    def failing(namespace: str, name: str) -> dict[str, str]:
        raise RuntimeError("API server down")

    assert ConfigMapProgressSource(failing).read(spec_job) is None  # the next tick tries again


def test_reconcile_creates_the_access_objects_before_the_rayjob_and_reads_no_secret():
    kube = FakeKube()
    order: list[str] = []
    create_access, create_rayjob = kube.get_or_create_namespaced, kube.get_or_create_rayjob
    kube.get_or_create_namespaced = lambda obj: order.append(obj["kind"]) or create_access(obj)  # type: ignore[method-assign]
    kube.get_or_create_rayjob = lambda rj: order.append("RayJob") or create_rayjob(rj)  # type: ignore[method-assign]
    kube.get_or_create_network_policy = lambda np: (np, True)  # type: ignore[attr-defined]
    events: list[tuple[str, str, str]] = []
    operator = Operator(kube=kube, progress=ConfigMapProgressSource(lambda *_: None), metrics=Metrics(),  # type: ignore[arg-type]
                        config=OperatorConfig(), post_event=lambda obj, kind, reason, message: events.append((kind, reason, message)))
    obj = body(cluster={"s3CredentialsSecret": {"name": "team-b-db", "accessKeyIdKey": "password"}})
    operator.reconcile(obj, logger=None)  # type: ignore[arg-type]
    assert order == ["ServiceAccount", "ConfigMap", "Role", "RoleBinding", "RayJob"]
    assert not hasattr(kube, "secret_data")  # the seam has no way to read a Secret
    before = copy.deepcopy(kube.namespaced)
    operator.reconcile(obj, logger=None)  # type: ignore[arg-type]
    assert kube.namespaced == before and order.count("RayJob") == 1


class _ApiServer(BaseHTTPRequestHandler):
    """Just enough of the API server for one merge-patch: records what arrives."""

    received: ClassVar[list[tuple[str, str, dict[str, str], bytes]]] = []

    def do_PATCH(self) -> None:
        length = int(self.headers["Content-Length"])
        self.received.append((self.command, self.path, dict(self.headers), self.rfile.read(length)))
        code = 200 if self.headers["Authorization"] == "Bearer tok-1" else 403
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api_server():
    _ApiServer.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_driver_merge_patches_its_configmap_with_the_mounted_token(api_server: str, tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("tok-1\n")
    write = ConfigMapWriter(server=api_server, namespace="team-a", name="quickstart-ray-progress", token_file=token)
    write({"state": "running", "step": 7})
    ((method, path, headers, raw),) = _ApiServer.received
    assert (method, path) == ("PATCH", "/api/v1/namespaces/team-a/configmaps/quickstart-ray-progress")
    assert headers["Content-Type"] == "application/merge-patch+json" and headers["Authorization"] == "Bearer tok-1"
    assert json.loads(json.loads(raw)["data"]["status.json"]) == {"state": "running", "step": 7}

    token.write_text("rotated-and-refused")  # read at every write: a refused write is reported, training goes on
    publisher = StatusPublisher(lambda status: None, write)
    publisher.publish(snapshot("quickstart", "run-1", kind="single", state="running"))
    assert publisher.warned == {1}


def test_outside_a_pod_set_up_by_the_operator_there_is_no_configmap_writer(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("FINETUNE_PROGRESS_CONFIGMAP", raising=False)
    assert ConfigMapWriter.from_environment() is None
    monkeypatch.setenv("FINETUNE_PROGRESS_CONFIGMAP", "x-ray-progress")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert ConfigMapWriter.from_environment() is None  # no token mounted here


def test_an_access_object_of_that_name_not_owned_by_the_job_holds_the_run_back():
    kube = FakeKube()
    kube.get_or_create_network_policy = lambda np: (np, True)  # type: ignore[attr-defined]
    operator = Operator(kube=kube, progress=ConfigMapProgressSource(lambda *_: None), metrics=Metrics(),  # type: ignore[arg-type]
                        config=OperatorConfig(), post_event=lambda *_: None)
    planted = render_trainer_access(job(), owner_uid="someone-else")[3]  # a RoleBinding to another account
    planted["subjects"] = [{"kind": "ServiceAccount", "name": "intruder", "namespace": "ns"}]
    kube.namespaced[("RoleBinding", "quickstart-ray-progress")] = planted
    with pytest.raises(kopf.TemporaryError, match="RoleBinding quickstart-ray-progress exists and is not owned"):
        operator.reconcile(body(), logger=None)  # type: ignore[arg-type]
    assert kube.rayjobs == {}
