"""The RayJob the operator creates: whole rendered dicts, deterministic names, the manifest that
reaches the driver, secrets only by reference, and KubeRay v1.7.0's own CRD schema (unknown
fields rejected) as the judge of every rendered object."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.rayjob import (
    dashboard_url,
    driver_manifest,
    head_service_name,
    ray_auth_enabled,
    rayjob_name,
    render_rayjob,
)
from finetune_trainer.spec import load_job, parse_job
from tests.kube_emulator.schema import admit
from tests.tiny_models import minimal_manifest

REPO = Path(__file__).resolve().parents[2]
CONTRACT = REPO.parent / "shared" / "contracts" / "kuberay-v1.7.0" / "ray.io_rayjobs.yaml"
QUICKSTART = REPO / "examples" / "quickstart.yaml"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABELS = {
    "app.kubernetes.io/name": "finetune-trainer",
    "app.kubernetes.io/instance": "quickstart",
    "app.kubernetes.io/managed-by": "finetune-operator",
    "finetune.dev/job": "quickstart",
}
# the head's ServiceAccount token (trainer_access): projected, refreshed, for the driver's progress ConfigMap only
TOKEN_MOUNT = {"name": "progress-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}
TOKEN_VOLUME = {"name": "progress-token", "projected": {"defaultMode": 0o444, "sources": [
    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
]}}
# the restricted Pod Security Standard, as every pod renders it by default (pods.py)
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
SUBMITTER = {"metadata": {"labels": LABELS}, "spec": {
    "restartPolicy": "Never",
    "containers": [{
        "name": "ray-job-submitter", "image": "ghcr.io/finetune-dev/finetune-trainer:0.1.0",
        "resources": {"requests": {"cpu": "500m", "memory": "200Mi", "ephemeral-storage": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": CONTAINER_SECURITY,
    }],
    "automountServiceAccountToken": False, "securityContext": POD_SECURITY,
}}
HEAD_PORTS = [
    {"name": "gcs-server", "containerPort": 6379},
    {"name": "dashboard", "containerPort": 8265},
    {"name": "client", "containerPort": 10001},
    {"name": "metrics", "containerPort": 8080},
]


@pytest.fixture(scope="module")
def kuberay() -> dict[str, Any]:
    return kuberay_schema()


def kuberay_schema() -> dict[str, Any]:
    """KubeRay v1.7.0's RayJob schema (v1 openAPIV3Schema), for kuberay_errors; skips the test where
    the contract is absent."""
    if not CONTRACT.exists():
        pytest.skip(f"KubeRay's RayJob CRD is not at {CONTRACT} (the shared contracts folder next to the repository)")
    crd = yaml.safe_load(CONTRACT.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def kuberay_errors(schema: dict[str, Any], rayjob: dict[str, Any]) -> list[str]:
    """What the API server would say to `kubectl apply` of this RayJob (unknown fields refused, as
    kubectl's strict field validation does): the emulator's admission, tests/kube_emulator/schema.py."""
    _, unknown, causes = admit(rayjob, schema)
    found = [f"{path}: unknown field" for path in unknown] + [f"{path}: {message}" for path, message in causes]
    name = rayjob["metadata"]["name"]  # what KubeRay's ValidateRayJobMetadata adds to the schema
    if len(name) > 47 or not DNS1035.match(name):
        found.append(f"metadata.name: {name!r} is not a DNS-1035 label of at most 47 characters")
    return found


def job(**sections: Any):
    return parse_job(minimal_manifest(**sections))


FULL = {
    "resources": {"workers": 4, "cpusPerWorker": 2, "gpusPerWorker": 1},
    "deepspeed": {"zeroStage": 3, "offloadOptimizer": True},
    "cluster": {
        "image": "registry.example/trainer:dev", "imagePullPolicy": "Always", "imagePullSecrets": ["regcred"],
        "rayVersion": "2.60.0", "serviceAccountName": "trainer", "gpuResource": "nvidia.com/gpu",
        "head": {"cpus": 2, "memory": "8Gi", "nodeSelector": {"pool": "cpu"}, "priorityClassName": "high", "ephemeralStorage": "30Gi",
                 "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]},
        "workers": {"replicas": 2, "minReplicas": 1, "maxReplicas": 3, "cpus": 4.5, "memory": "32Gi", "gpus": 2,
                    "nodeSelector": {"pool": "gpu"}, "priorityClassName": "batch",
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}]},
        "env": [{"name": "HF_HOME", "value": "/cache"}],
        "s3CredentialsSecret": {"name": "s3", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret", "sessionTokenKey": "token"},
        "dashboard": {"ingress": {"host": "ray-unit.example.com", "className": "nginx", "tlsSecretName": "ray-tls"}},
        "podSecurityContext": {"runAsUser": 2000, "runAsGroup": 2001, "fsGroup": 2002, "supplementalGroups": [2003],
                               "runAsNonRoot": True, "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/ray.json"}},
        "containerSecurityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                                     "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}},
    },
    "runPolicy": {"suspend": True, "activeDeadlineSeconds": 7200, "backoffLimit": 2, "ttlSecondsAfterFinished": 60},
}


# --- whole objects -------------------------------------------------------------------------


DRAIN = {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": "20"}  # runPolicy.terminationGracePeriodSeconds 30 less 10 (pods.graceful_stop)


def test_quickstart_renders_to_this_rayjob():
    rendered = render_rayjob(load_job(QUICKSTART), owner_uid="0b9f7c1e-uid")
    runtime_env = rendered["spec"].pop("runtimeEnvYAML")
    assert set(yaml.safe_load(runtime_env)) == {"env_vars"}
    assert yaml.safe_load(runtime_env)["env_vars"]["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"  # the dashboard's Train view
    worker_pod = {"metadata": {"labels": LABELS}, "spec": {"serviceAccountName": "quickstart-ray", "containers": [{
        "name": "ray-worker", "image": "ghcr.io/finetune-dev/finetune-trainer:0.1.0",
        "resources": {"requests": {"cpu": "1", "ephemeral-storage": "10Gi"}, "limits": {"cpu": "1"}},
        "securityContext": CONTAINER_SECURITY, "env": [DRAIN],
    }], "automountServiceAccountToken": False, "securityContext": POD_SECURITY, "terminationGracePeriodSeconds": 30}}
    assert rendered == {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": "quickstart-ray", "namespace": "default", "labels": LABELS,
            "ownerReferences": [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "quickstart",
                                 "uid": "0b9f7c1e-uid", "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "entrypoint": "python -m finetune_trainer run env:FINETUNE_MANIFEST --no-progress",
            "submissionMode": "K8sJobMode",
            # the Ray job's, in the dashboard: job_name is the Name column of its Jobs view (Ray's own key)
            "metadata": {"job_name": "quickstart", "finetune.dev/job": "quickstart", "finetune.dev/namespace": "default"},
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,
            "backoffLimit": 0,
            "suspend": False,
            "submitterPodTemplate": SUBMITTER,
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "authOptions": {"mode": "token"},
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "1"},
                    "headService": {"metadata": {"name": "quickstart-ray-head-svc"}},
                    "template": {"metadata": {"labels": LABELS}, "spec": {
                        "serviceAccountName": "quickstart-ray",
                        "containers": [{
                            "name": "ray-head", "image": "ghcr.io/finetune-dev/finetune-trainer:0.1.0",
                            "resources": {"requests": {"cpu": "1", "memory": "4Gi", "ephemeral-storage": "10Gi"},
                                          "limits": {"cpu": "1", "memory": "4Gi"}},
                            "ports": HEAD_PORTS,
                            "env": [{"name": "FINETUNE_PROGRESS_CONFIGMAP", "value": "quickstart-ray-progress"}, DRAIN],
                            "volumeMounts": [TOKEN_MOUNT],
                            "securityContext": CONTAINER_SECURITY,
                        }],
                        "volumes": [TOKEN_VOLUME],
                        "automountServiceAccountToken": False, "securityContext": POD_SECURITY, "terminationGracePeriodSeconds": 30,
                    }},
                },
                "workerGroupSpecs": [{
                    "groupName": "workers", "replicas": 2, "minReplicas": 2, "maxReplicas": 2,
                    "rayStartParams": {"num-cpus": "1"}, "template": worker_pod,
                }],
            },
        },
    }


def test_every_cluster_option_reaches_the_rayjob():
    rendered = render_rayjob(job(**FULL), storage_env=[{"name": "AWS_ENDPOINT_URL", "value": "http://s3.local:9000"}])
    spec = rendered["spec"]
    assert "ownerReferences" not in rendered["metadata"]
    assert {k: spec[k] for k in ("suspend", "activeDeadlineSeconds", "backoffLimit", "ttlSecondsAfterFinished")} == {
        "suspend": True, "activeDeadlineSeconds": 7200, "backoffLimit": 2, "ttlSecondsAfterFinished": 60,
    }
    env = [
        {"name": "HF_HOME", "value": "/cache"},
        {"name": "AWS_ENDPOINT_URL", "value": "http://s3.local:9000"},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}}},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "secret"}}},
        {"name": "AWS_SESSION_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "token"}}},
    ]
    labels = {**LABELS, "app.kubernetes.io/instance": "unit", "finetune.dev/job": "unit"}
    full_pod = {"runAsNonRoot": True, "runAsUser": 2000, "runAsGroup": 2001, "fsGroup": 2002, "supplementalGroups": [2003],
                "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/ray.json"}}
    full_container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head == {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "2"},
        "headService": {"metadata": {"name": "unit-ray-head-svc"}},
        "template": {"metadata": {"labels": labels}, "spec": {
            "containers": [{
                "name": "ray-head", "image": "registry.example/trainer:dev", "imagePullPolicy": "Always",
                "resources": {"requests": {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "30Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}},
                "ports": HEAD_PORTS, "env": [*env, {"name": "FINETUNE_PROGRESS_CONFIGMAP", "value": "unit-ray-progress"}, DRAIN],
                "volumeMounts": [TOKEN_MOUNT],
                "securityContext": full_container,
            }],
            "volumes": [TOKEN_VOLUME],
            "serviceAccountName": "trainer",
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"pool": "cpu"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            "priorityClassName": "high",
            "automountServiceAccountToken": False, "securityContext": full_pod, "terminationGracePeriodSeconds": 30,
        }},
    }
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu = {"cpu": "4500m", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert workers == {
        "groupName": "workers", "replicas": 2, "minReplicas": 1, "maxReplicas": 3,
        "rayStartParams": {"num-cpus": "4", "num-gpus": "2"},
        "template": {"metadata": {"labels": labels}, "spec": {
            "containers": [{
                "name": "ray-worker", "image": "registry.example/trainer:dev", "imagePullPolicy": "Always",
                "resources": {"requests": {**gpu, "ephemeral-storage": "66Gi"}, "limits": gpu}, "env": [*env, DRAIN],  # 2 x 32Gi + 2Gi
                "securityContext": full_container,
            }],
            "serviceAccountName": "trainer",
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}],
            "priorityClassName": "batch",
            "automountServiceAccountToken": False, "securityContext": full_pod, "terminationGracePeriodSeconds": 30,
        }},
    }
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["imagePullSecrets"] == [{"name": "regcred"}]
    assert (submitter["securityContext"], submitter["containers"][0]["securityContext"]) == (full_pod, full_container)
    assert submitter["containers"][0]["image"] == "registry.example/trainer:dev"
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}


def test_secrets_are_only_referenced():
    rendered = render_rayjob(job(**FULL))
    for pod in _pods(rendered):
        for var in pod["spec"]["containers"][0]["env"]:
            if var["name"].startswith("AWS_"):
                assert set(var) == {"name", "valueFrom"}, var


# --- KubeRay's schema ----------------------------------------------------------------------


CASES = {
    "quickstart": lambda: render_rayjob(load_job(QUICKSTART), owner_uid="uid-1"),
    "every-option": lambda: render_rayjob(job(**FULL), owner_uid="uid-2",
                                          storage_env=[{"name": "AWS_ENDPOINT_URL", "value": "http://s3:9000"}]),
    "long-name": lambda: render_rayjob(parse_job({**minimal_manifest(), "metadata": {"name": "9" + "a" * 62, "namespace": "ml"}})),
    "gpu-defaults": lambda: render_rayjob(job(resources={"workers": 2, "gpusPerWorker": 1})),
    "auth-disabled": lambda: render_rayjob(job(cluster={"auth": "disabled"})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_rayjob_passes_kuberays_schema(kuberay, case):
    assert kuberay_errors(kuberay, CASES[case]()) == []


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("spec", "foo"), 1),
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "bogus"), True),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"), "two"),
        (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), 1),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits", "cpu"), "lots"),
        (("metadata", "name"), "x" * 48),
    ],
)
def test_the_kuberay_schema_rejects_a_broken_rayjob(kuberay, where, value):
    rendered = copy.deepcopy(CASES["quickstart"]())
    node = rendered
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    assert kuberay_errors(kuberay, rendered), f"{where} = {value!r} passed KubeRay's schema"


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quickstart", "a", "9lives", "x" * 43, "x" * 44, "a" * 63, "a-" * 31 + "b"])
def test_rayjob_names_fit_kuberay(name):
    result = rayjob_name(name)
    assert DNS1035.match(result) and len(result) <= 47, result
    assert result == rayjob_name(name)  # deterministic
    assert len(head_service_name(name)) <= 63


def test_short_names_read_plainly_and_long_ones_stay_distinct():
    assert rayjob_name("quickstart") == "quickstart-ray"
    assert rayjob_name("9lives") == "ft-9lives-ray"
    assert rayjob_name("a" * 62 + "b") != rayjob_name("a" * 62 + "c")
    assert rayjob_name("a" * 63).startswith("a" * 20)


def test_dashboard_url_names_the_pinned_head_service():
    quickstart = load_job(QUICKSTART)
    assert dashboard_url(quickstart) == "http://quickstart-ray-head-svc.default.svc:8265"
    head = render_rayjob(quickstart)["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["headService"]["metadata"]["name"] == "quickstart-ray-head-svc"
    assert {"name": "dashboard", "containerPort": 8265} in head["template"]["spec"]["containers"][0]["ports"]


# --- what reaches the driver -----------------------------------------------------------------


def _manifest_env(rendered: dict[str, Any]) -> str:
    return yaml.safe_load(rendered["spec"]["runtimeEnvYAML"])["env_vars"]["FINETUNE_MANIFEST"]


@pytest.mark.parametrize("case", [pytest.param(QUICKSTART, id="quickstart"), pytest.param(None, id="every-option")])
def test_the_driver_loads_the_same_job(monkeypatch, case):
    original = load_job(case) if case else job(**FULL)
    monkeypatch.setenv("FINETUNE_MANIFEST", _manifest_env(render_rayjob(original)))
    assert load_job("env:FINETUNE_MANIFEST") == original


def test_the_driver_sees_only_what_the_user_wrote():
    """Unset fields stay unset (presence-sensitive rules judge alike), and no status travels."""
    sent = json.loads(_manifest_env(render_rayjob(job(training={"maxSteps": 10}))))
    assert sent == driver_manifest(job(training={"maxSteps": 10}))
    assert sent["spec"] == {"model": {"source": "models/tiny", "task": "sequence-classification"},
                            "data": {"train": {"path": "data/train.jsonl"}, "validationSplit": 0.1},
                            "training": {"maxSteps": 10}}
    assert sent["metadata"] == {"name": "unit", "namespace": "default"}


def test_rendering_is_pure(monkeypatch):
    first = render_rayjob(job(**FULL), owner_uid="u")
    monkeypatch.setenv("RAY_ADDRESS", "ray://elsewhere:10001")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMTHEENV")
    second = render_rayjob(job(**FULL), owner_uid="u")
    assert first == second
    assert "AKIAFROMTHEENV" not in json.dumps(second)


def _pods(rendered: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rendered["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def test_the_manifest_survives_kuberays_shell_command_line(monkeypatch):
    """K8sJobMode runs `bash -c '... ray job submit --runtime-env-json "<Go strconv.Quote of the JSON>" ...'`:
    `$(...)`, `$VAR` and backticks in the manifest must reach the driver unexpanded."""
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash on this machine")
    patterns = ["classifier\\..*$", "$(echo pwned)", "`echo pwned`", "${HOME}", 'say "hi"\\n']
    original = job(freezing={"strategy": "patterns", "trainablePatterns": patterns})
    runtime_env = json.dumps(yaml.safe_load(render_rayjob(original)["spec"]["runtimeEnvYAML"]))
    assert "$" not in runtime_env and "`" not in runtime_env
    assert all(32 <= ord(c) < 127 for c in runtime_env)  # so Go's strconv.Quote escapes only \ and "
    quoted = '"' + runtime_env.replace("\\", "\\\\").replace('"', '\\"') + '"'
    done = subprocess.run(["bash", "-c", f"printf %s {quoted}"], capture_output=True, text=True, timeout=30, check=True)
    monkeypatch.setenv("FINETUNE_MANIFEST", json.loads(done.stdout)["env_vars"]["FINETUNE_MANIFEST"])
    received = load_job("env:FINETUNE_MANIFEST")
    assert received == original
    assert received.spec.freezing.trainable_patterns == patterns


# --- Ray token authentication ------------------------------------------------------------------


def test_token_auth_is_the_default_and_disabled_only_when_written():
    default, disabled = render_rayjob(job()), render_rayjob(job(cluster={"auth": "disabled"}))
    assert default["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert "authOptions" not in disabled["spec"]["rayClusterSpec"]
    assert (ray_auth_enabled(default), ray_auth_enabled(disabled), ray_auth_enabled(None)) == (True, False, False)
    # everything else is the same job: auth changes nothing but authOptions
    del default["spec"]["rayClusterSpec"]["authOptions"]
    default["spec"].pop("runtimeEnvYAML"), disabled["spec"].pop("runtimeEnvYAML")
    assert default == disabled


def test_token_auth_leaves_the_token_to_kuberay():
    """KubeRay creates the Secret and the RAY_AUTH_* env from authOptions; a token of ours in the
    RayJob would be readable by anyone who may read RayJobs."""
    rendered = json.dumps(render_rayjob(job(**FULL)))
    assert "RAY_AUTH" not in rendered and "secretName" not in rendered
