"""The API emulator behaves like a real API server for the real kubectl, kubernetes client and kopf.

Every check here is one the operator's end-to-end tests lean on: CRDs become served kinds, writes
keep generation/resourceVersion/status semantics, errors carry the real codes, watches lose no
events, finalizers and owner references work, and a kopf operator runs against it without errors.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import subprocess
import textwrap
import threading
from typing import Any

import kopf.testing
import kubernetes
import pytest
import yaml

from tests import kube_emulator
from tests.e2e.operator_harness import KUBECTL, Kubectl, wait_for

KUBERAY = pathlib.Path("/work/shared/contracts/kuberay-v1.7.0")
if not KUBERAY.exists():  # the shared checkout sits next to the repository
    KUBERAY = pathlib.Path(__file__).resolve().parents[3] / "shared/contracts/kuberay-v1.7.0"

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.dev
spec:
  group: example.dev
  names: {kind: Widget, listKind: WidgetList, plural: widgets, singular: widget, shortNames: [wdg]}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Phase, type: string, jsonPath: .status.phase}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1}
              color: {type: string, enum: [red, blue], default: red}
          status:
            type: object
            x-kubernetes-preserve-unknown-fields: true
"""


def widget(name: str, namespace: str, size: int = 3, **metadata: Any) -> str:
    return yaml.safe_dump({
        "apiVersion": "example.dev/v1", "kind": "Widget",
        "metadata": {"name": name, "namespace": namespace, **metadata}, "spec": {"size": size},
    })


def get_json(kubectl: Kubectl, *args: str) -> dict[str, Any]:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def api_error(call: Any, *args: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """The HTTP status and `Status` body of a kubernetes-client call that must fail."""
    with pytest.raises(kubernetes.client.ApiException) as info:
        call(*args, **kwargs)
    return info.value.status, json.loads(info.value.body)


@pytest.fixture(scope="module")
def widget_crd(kubectl: Kubectl) -> str:
    kubectl("apply", "-f", "-", input=WIDGET_CRD)
    kubectl("wait", "--for", "condition=Established", "crd/widgets.example.dev", "--timeout=10s")
    return "widgets.example.dev"


@pytest.fixture
def custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi()


@pytest.fixture
def core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api()


def test_discovery_serves_builtins_and_version(kubectl: Kubectl) -> None:
    version = json.loads(kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["major"] == "1"
    resources = kubectl("api-resources", "-o", "name").stdout.split()
    for name in ("namespaces", "configmaps", "secrets", "events", "pods", "services", "serviceaccounts",
                 "leases.coordination.k8s.io", "events.events.k8s.io", "customresourcedefinitions.apiextensions.k8s.io"):
        assert name in resources


def test_a_crd_whose_schema_is_not_structural_is_refused(kubectl: Kubectl) -> None:
    """As the API server does: a field without a type, and a default its own field refuses, are
    422 Invalid naming the schema path, and nothing is served for the group."""
    broken = WIDGET_CRD.replace("widgets.example.dev", "gadgets.example.dev").replace("Widget", "Gadget").replace(
        "widget", "gadget").replace("wdg", "gdg").replace("size: {type: integer, minimum: 1}", "size: {minimum: 1}").replace(
        "default: red", "default: green")
    refused = kubectl("apply", "-f", "-", input=broken, check=False)
    assert refused.returncode != 0
    assert "spec.versions[0].schema.openAPIV3Schema" in refused.stderr, refused.stderr
    assert "<root>.spec.size: needs a non-empty type" in refused.stderr and "default 'green'" in refused.stderr
    assert "gadgets" not in kubectl("api-resources", "-o", "name").stdout


def test_crd_makes_kind_served_with_short_name_and_printer_columns(kubectl: Kubectl, widget_crd: str, namespace: str) -> None:
    created = kubectl("apply", "-f", "-", input=widget("w1", namespace))
    assert "widget.example.dev/w1 created" in created.stdout
    kubectl("patch", "wdg", "w1", "-n", namespace, "--subresource=status", "--type=merge", "-p", '{"status":{"phase":"Running"}}')

    table = kubectl("get", "wdg", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "PHASE", "AGE"]
    assert table[1].split()[:3] == ["w1", "3", "Running"]
    wide = kubectl("get", "wdg", "-A").stdout.splitlines()
    assert wide[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert f"{namespace} " in "\n".join(wide[1:])
    assert "wdg" in kubectl("api-resources", "--api-group=example.dev").stdout


def test_apply_is_idempotent_and_generation_tracks_spec_only(kubectl: Kubectl, widget_crd: str, namespace: str) -> None:
    kubectl("apply", "-f", "-", input=widget("w", namespace))
    first = get_json(kubectl, "wdg", "w", "-n", namespace)
    assert first["metadata"]["generation"] == 1
    assert first["spec"]["color"] == "red"  # the schema default was applied
    assert first["metadata"]["uid"] and first["metadata"]["creationTimestamp"]

    again = kubectl("apply", "-f", "-", input=widget("w", namespace))
    assert "unchanged" in again.stdout
    assert get_json(kubectl, "wdg", "w", "-n", namespace)["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]

    kubectl("apply", "-f", "-", input=widget("w", namespace, size=5))
    assert get_json(kubectl, "wdg", "w", "-n", namespace)["metadata"]["generation"] == 2

    kubectl("patch", "wdg", "w", "-n", namespace, "--subresource=status", "--type=merge", "-p", '{"status":{"phase":"Done"}}')
    kubectl("label", "wdg", "w", "-n", namespace, "tier=gold")
    after_status = get_json(kubectl, "wdg", "w", "-n", namespace)
    assert after_status["metadata"]["generation"] == 2  # neither status nor metadata bump it
    assert after_status["status"] == {"phase": "Done"}
    assert int(after_status["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])

    # The main resource cannot write status; the status subresource cannot write spec.
    kubectl("patch", "wdg", "w", "-n", namespace, "--type=merge", "-p", '{"status":{"phase":"Hacked"},"spec":{"size":7}}')
    kubectl("patch", "wdg", "w", "-n", namespace, "--subresource=status", "--type=merge", "-p", '{"spec":{"size":9}}')
    final = get_json(kubectl, "wdg", "w", "-n", namespace)
    assert (final["spec"]["size"], final["status"]["phase"], final["metadata"]["generation"]) == (7, "Done", 3)
    assert [o["metadata"]["name"] for o in get_json(kubectl, "wdg", "-n", namespace, "-l", "tier=gold")["items"]] == ["w"]


def test_replace_bumps_generation_and_refuses_a_stale_resource_version(kubectl: Kubectl, widget_crd: str, namespace: str) -> None:
    kubectl("apply", "-f", "-", input=widget("r", namespace))
    current = get_json(kubectl, "wdg", "r", "-n", namespace)
    current["spec"]["size"] = 4
    assert "replaced" in kubectl("replace", "-f", "-", input=json.dumps(current)).stdout
    assert get_json(kubectl, "wdg", "r", "-n", namespace)["metadata"]["generation"] == 2
    stale = kubectl("replace", "-f", "-", input=json.dumps(current), check=False)  # same resourceVersion again
    assert "Error from server (Conflict)" in stale.stderr


def test_kubectl_get_watch_prints_printer_columns_for_each_change(kubectl: Kubectl, widget_crd: str, namespace: str,
                                                                  kube_api: kube_emulator.KubeEmulator) -> None:
    kubectl("apply", "-f", "-", input=widget("seen", namespace))
    lines: queue.Queue[str] = queue.Queue()
    env = {**os.environ, **kube_api.env()}
    with subprocess.Popen([KUBECTL, "get", "wdg", "-n", namespace, "-w"], env=env, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)  # type: ignore[union-attr]
        reader.start()
        try:
            assert lines.get(timeout=10).split() == ["NAME", "SIZE", "PHASE", "AGE"]
            assert lines.get(timeout=10).split()[:2] == ["seen", "3"]
            # kubectl watches from its list's resourceVersion, so this change cannot slip past it.
            kubectl("patch", "wdg", "seen", "-n", namespace, "--subresource=status", "--type=merge", "-p", '{"status":{"phase":"Ready"}}')
            assert lines.get(timeout=10).split()[:3] == ["seen", "3", "Ready"]
        finally:
            proc.terminate()


def test_errors_carry_real_codes_and_status_objects(kubectl: Kubectl, widget_crd: str, namespace: str,
                                                     custom: kubernetes.client.CustomObjectsApi,
                                                     core: kubernetes.client.CoreV1Api) -> None:
    body = yaml.safe_load(widget("dup", namespace))
    custom.create_namespaced_custom_object("example.dev", "v1", namespace, "widgets", body)
    code, status = api_error(custom.create_namespaced_custom_object, "example.dev", "v1", namespace, "widgets", body)
    assert (code, status["kind"], status["reason"]) == (409, "Status", "AlreadyExists")
    duplicate = kubectl("create", "-f", "-", input=widget("dup", namespace), check=False)
    assert duplicate.returncode != 0 and "AlreadyExists" in duplicate.stderr

    code, status = api_error(core.read_namespaced_config_map, "missing", namespace)
    assert (code, status["reason"], status["message"]) == (404, "NotFound", 'configmaps "missing" not found')
    assert "NotFound" in kubectl("get", "wdg", "missing", "-n", namespace, check=False).stderr

    failing = [{"op": "test", "path": "/spec/size", "value": 99}, {"op": "replace", "path": "/spec/size", "value": 1}]
    code, status = api_error(custom.patch_namespaced_custom_object, "example.dev", "v1", namespace, "widgets", "dup", failing,
                             _content_type="application/json-patch+json")
    assert (code, status["reason"]) == (422, "Invalid"), status["message"]
    result = kubectl("patch", "wdg", "dup", "-n", namespace, "--type=json", "-p", json.dumps(failing), check=False)
    assert result.returncode != 0
    assert get_json(kubectl, "wdg", "dup", "-n", namespace)["spec"]["size"] == 3

    invalid = kubectl("patch", "wdg", "dup", "-n", namespace, "--type=merge", "-p", '{"spec":{"size":0,"color":"green"}}', check=False)
    assert "is invalid" in invalid.stderr and "spec.size" in invalid.stderr and "spec.color" in invalid.stderr
    unknown = kubectl("apply", "-f", "-", input=widget("w2", namespace).replace("size: 3", "size: 3\n  shape: round"), check=False)
    assert 'unknown field "spec.shape"' in unknown.stderr
    bad_name = kubectl("create", "namespace", "Bad_Name", check=False)
    assert 'metadata.name: Invalid value: "Bad_Name": a lowercase RFC 1123 label' in bad_name.stderr


def test_watch_from_resource_version_replays_every_event(kubectl: Kubectl, namespace: str, core: kubernetes.client.CoreV1Api) -> None:
    since = core.list_namespaced_config_map(namespace).metadata.resource_version
    kubectl("create", "configmap", "cm1", "-n", namespace, "--from-literal=a=1")
    kubectl("patch", "configmap", "cm1", "-n", namespace, "--type=merge", "-p", '{"data":{"a":"2"}}')
    kubectl("create", "configmap", "cm2", "-n", namespace)
    kubectl("delete", "configmap", "cm1", "-n", namespace)

    seen: list[tuple[str, str, str | None]] = []
    watcher = kubernetes.watch.Watch()
    for event in watcher.stream(core.list_namespaced_config_map, namespace, resource_version=since, timeout_seconds=5):
        obj = event["object"]
        seen.append((event["type"], obj.metadata.name, (obj.data or {}).get("a")))
        if len(seen) == 4:
            watcher.stop()
    assert seen == [("ADDED", "cm1", "1"), ("MODIFIED", "cm1", "2"), ("ADDED", "cm2", None), ("DELETED", "cm1", "2")]


def test_watch_from_a_compacted_resource_version_is_gone(tmp_path: pathlib.Path) -> None:
    with kube_emulator.running(tmp_path, history_limit=3) as api:
        client = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(api.kubeconfig_path)))
        for index in range(5):
            client.create_namespaced_config_map("default", {"metadata": {"name": f"c{index}"}})
        with pytest.raises(kubernetes.client.ApiException) as info:
            for _ in kubernetes.watch.Watch().stream(client.list_namespaced_config_map, "default", resource_version="1", timeout_seconds=2):
                pass
        assert info.value.status == 410


def test_finalizers_hold_deletion_until_removed(kubectl: Kubectl, widget_crd: str, namespace: str) -> None:
    kubectl("apply", "-f", "-", input=widget("held", namespace, finalizers=["example.dev/hold"]))
    kubectl("delete", "wdg", "held", "-n", namespace, "--wait=false")
    held = get_json(kubectl, "wdg", "held", "-n", namespace)
    assert held["metadata"]["deletionTimestamp"] and held["metadata"]["deletionGracePeriodSeconds"] == 0

    kubectl("patch", "wdg", "held", "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    gone = kubectl("get", "wdg", "held", "-n", namespace, "--ignore-not-found", "-o", "name")
    assert gone.stdout == ""


def test_deleting_an_owner_collects_its_dependents(kubectl: Kubectl, widget_crd: str, namespace: str) -> None:
    kubectl("apply", "-f", "-", input=widget("owner", namespace))
    uid = get_json(kubectl, "wdg", "owner", "-n", namespace)["metadata"]["uid"]
    child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "child", "namespace": namespace,
        "ownerReferences": [{"apiVersion": "example.dev/v1", "kind": "Widget", "name": "owner", "uid": uid}]}}
    kubectl("apply", "-f", "-", input=json.dumps(child))
    kubectl("delete", "wdg", "owner", "-n", namespace)
    wait_for(lambda: kubectl("get", "cm", "child", "-n", namespace, "--ignore-not-found", "-o", "name").stdout == "",
             what="the owned ConfigMap to be garbage-collected")


def test_a_delete_with_a_uid_precondition_spares_a_newer_object_of_that_name(
        kubectl: Kubectl, widget_crd: str, namespace: str, custom: kubernetes.client.CustomObjectsApi) -> None:
    kubectl("apply", "-f", "-", input=widget("w", namespace))
    old = get_json(kubectl, "wdg", "w", "-n", namespace)["metadata"]["uid"]
    kubectl("delete", "wdg", "w", "-n", namespace)
    kubectl("apply", "-f", "-", input=widget("w", namespace))
    options = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(uid=old))
    code, status = api_error(custom.delete_namespaced_custom_object, "example.dev", "v1", namespace, "widgets", "w", body=options)
    assert (code, status["reason"]) == (409, "Conflict") and "Precondition failed: UID in precondition" in status["message"]
    new = get_json(kubectl, "wdg", "w", "-n", namespace)["metadata"]["uid"]
    options = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(uid=new))
    custom.delete_namespaced_custom_object("example.dev", "v1", namespace, "widgets", "w", body=options)
    assert kubectl("get", "wdg", "w", "-n", namespace, "--ignore-not-found", "-o", "name").stdout == ""


def test_kuberay_crds_apply_and_validate_rayjobs(kubectl: Kubectl, namespace: str) -> None:
    # As on a real cluster, client-side apply of these CRDs overflows the annotation size limit...
    too_big = kubectl("apply", "-f", str(KUBERAY / "ray.io_rayjobs.yaml"), check=False)
    assert "metadata.annotations: Too long: must have at most 262144 bytes" in too_big.stderr
    # ...and server-side apply (what KubeRay's docs prescribe) works, repeatedly.
    for crd in ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        kubectl("apply", "--server-side", "-f", str(KUBERAY / crd))
    kubectl("wait", "--for", "condition=Established", "crd/rayjobs.ray.io", "crd/rayclusters.ray.io", "--timeout=10s")

    rayjob = {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "rj", "namespace": namespace},
        "spec": {"entrypoint": "python -c 'print(1)'", "rayClusterSpec": {"headGroupSpec": {
            "rayStartParams": {},
            "template": {"spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray:2.9.0"}]}}}}},
    }
    kubectl("apply", "-f", "-", input=json.dumps(rayjob))
    kubectl("patch", "rayjob", "rj", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", '{"status":{"jobStatus":"RUNNING","jobDeploymentStatus":"Running"}}')
    table = kubectl("get", "rayjobs", "-n", namespace).stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "JOB", "STATUS", "DEPLOYMENT", "STATUS"]
    assert table[1].split()[:3] == ["rj", "RUNNING", "Running"]

    del rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    rayjob["metadata"]["name"] = "broken"
    broken = kubectl("apply", "-f", "-", input=json.dumps(rayjob), check=False)
    assert "is invalid" in broken.stderr and "containers[0].name: Required value" in broken.stderr


OPERATOR = '''
import kopf
import kubernetes


@kopf.on.create("example.dev", "v1", "widgets")
def create_child(name, namespace, body, patch, **_):
    child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-child"},
             "data": {"size": str(body["spec"]["size"])}}
    kopf.adopt(child)
    kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, child)
    kopf.info(body, reason="ChildCreated", message=f"created {name}-child")
    patch.status["phase"] = "Ready"


@kopf.on.delete("example.dev", "v1", "widgets")
def release(name, logger, **_):
    logger.info(f"releasing {name}")
'''


def test_kopf_operator_reconciles_against_the_emulator(kubectl: Kubectl, widget_crd: str, namespace: str,
                                                       tmp_path: pathlib.Path) -> None:
    operator = tmp_path / "operator.py"
    operator.write_text(textwrap.dedent(OPERATOR))
    args = ["run", "--standalone", "--namespace", namespace, "--verbose", str(operator)]
    with kopf.testing.KopfRunner(args, timeout=60) as runner:
        kubectl("apply", "-f", "-", input=widget("op", namespace))
        ready = wait_for(lambda: (obj := get_json(kubectl, "wdg", "op", "-n", namespace)).get("status", {}).get("phase") == "Ready" and obj,
                         what="the operator to mark the widget Ready")
        assert "kopf.zalando.org/KopfFinalizerMarker" in ready["metadata"]["finalizers"]
        child = get_json(kubectl, "cm", "op-child", "-n", namespace)
        assert child["metadata"]["ownerReferences"][0]["uid"] == ready["metadata"]["uid"]
        wait_for(lambda: "ChildCreated" in kubectl("get", "events", "-n", namespace).stdout, what="the operator's event")

        kubectl("delete", "wdg", "op", "-n", namespace, "--timeout=20s")  # waits for the finalizer to go
        wait_for(lambda: kubectl("get", "cm", "op-child", "-n", namespace, "--ignore-not-found", "-o", "name").stdout == "",
                 what="the child ConfigMap to be garbage-collected")
    assert runner.exception is None and runner.exit_code == 0
    assert "Handler 'create_child' succeeded" in runner.output
    assert "Handler 'release' succeeded" in runner.output
    assert "[ERROR" not in runner.output and "Traceback" not in runner.output, runner.output
