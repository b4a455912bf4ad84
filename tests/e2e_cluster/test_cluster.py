"""The operator's end-to-end scenarios on a real cluster, with the real KubeRay (see conftest.py).

Here KubeRay is real, so nothing writes a RayJob's status by hand: suspended jobs (no pods) cover
the fast scenarios, `activeDeadlineSeconds: 1` a real failure, and one short real training run
(the quickstart, cut down) the whole way to Succeeded.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.e2e_cluster.conftest import Kubectl, Operator

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
IMAGE = os.environ.get("FINETUNE_E2E_IMAGE")
LOCAL_OPERATOR = os.environ.get("FINETUNE_E2E_OPERATOR", "local") != "installed"
WAIT = 180.0  # a real API server and KubeRay: slower than the emulator
S3 = {key: os.environ.get(f"FINETUNE_E2E_S3_{key}") for key in ("ENDPOINT", "BUCKET", "ACCESS_KEY", "SECRET_KEY")}


def wait_for(probe: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last probe: {last!r}")


def manifest(example: str = "quickstart.yaml", name: str | None = None, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((EXAMPLES / example).read_text())
    if name:
        doc["metadata"]["name"] = name
    spec = copy.deepcopy(spec)
    cluster = spec.pop("cluster", {})
    if IMAGE:
        cluster.setdefault("image", IMAGE)
        cluster.setdefault("imagePullPolicy", "IfNotPresent")
    if cluster:
        doc["spec"]["cluster"] = cluster
    doc["spec"].update(spec)
    return doc


def apply(kubectl: Kubectl, namespace: str, doc: dict[str, Any]) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def job(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(kubectl("get", "finetunejob", name, "-n", namespace, "-o", "json").stdout)


def rayjobs(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    return json.loads(kubectl("get", "rayjobs", "-n", namespace, "-o", "json").stdout)["items"]


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), {})


def wait_status(kubectl: Kubectl, namespace: str, name: str, what: str, timeout: float = WAIT, **expected: Any) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        obj = job(kubectl, namespace, name)
        return obj if all(obj.get("status", {}).get(k) == v for k, v in expected.items()) else None

    return wait_for(probe, timeout=timeout, what=f"{what} ({expected})")


def test_a_suspended_job_gets_one_owned_suspended_rayjob_and_no_pods(kubectl: Kubectl, namespace: str,
                                                                     operator: Operator) -> None:
    apply(kubectl, namespace, manifest(runPolicy={"suspend": True}))
    uid = job(kubectl, namespace, "quickstart")["metadata"]["uid"]
    [rayjob] = wait_for(lambda: rayjobs(kubectl, namespace), what="the RayJob")
    assert rayjob["metadata"]["ownerReferences"][0]["uid"] == uid and rayjob["spec"]["suspend"] is True
    suspended = wait_status(kubectl, namespace, "quickstart", "KubeRay's Suspended", phase="Suspended", reason="Suspended")
    assert suspended["status"]["rayJobName"] == "quickstart-ray"
    assert kubectl("get", "pods", "-n", namespace, "-o", "name").stdout.strip() == ""
    print(kubectl("get", "ftj", "-n", namespace, "-o", "wide").stdout)


def test_invalid_spec_is_stalled_without_rayjob(kubectl: Kubectl, namespace: str, operator: Operator) -> None:
    apply(kubectl, namespace, manifest(name="bad", freezing={"strategy": "freezeBottom"},
                                       deepspeed={"zeroStage": 2, "offloadParams": True}))
    stalled = wait_status(kubectl, namespace, "bad", "InvalidSpec", phase="Failed", reason="InvalidSpec")
    message = condition(stalled, "Stalled")["message"]
    assert "spec.freezing.layers" in message and "spec.deepspeed.offloadParams" in message
    time.sleep(10)  # on a real cluster: sample for a while that nothing is created and nothing spins
    assert rayjobs(kubectl, namespace) == []
    if LOCAL_OPERATOR:
        assert operator.output().count(f"[{namespace}/bad] Handler 'create' failed permanently") == 1


def test_the_job_may_write_its_progress_and_nothing_else(kubectl: Kubectl, namespace: str, operator: Operator) -> None:
    """The real API server's RBAC: the job's ServiceAccount may patch its one ConfigMap, not read a Secret."""
    apply(kubectl, namespace, manifest(runPolicy={"suspend": True}, cluster={"s3CredentialsSecret": {"name": "s3"}}))
    wait_status(kubectl, namespace, "quickstart", "Suspended", phase="Suspended")
    account = f"system:serviceaccount:{namespace}:quickstart-ray"

    def can(*what: str) -> str:
        return kubectl("auth", "can-i", *what, "-n", namespace, f"--as={account}", check=False).stdout.strip()

    assert can("patch", "configmap/quickstart-ray-progress") == "yes"
    assert can("patch", "configmap/someone-elses") == "no"
    assert can("get", "secrets") == "no" and can("create", "pods") == "no"


@pytest.mark.skipif(not LOCAL_OPERATOR, reason="restarts the operator it runs itself (FINETUNE_E2E_OPERATOR=local)")
def test_restart_adopts_the_rayjob(kubectl: Kubectl, namespace: str, start_operator: Callable[[], Operator]) -> None:
    first = start_operator()
    apply(kubectl, namespace, manifest(runPolicy={"suspend": True}))
    wait_status(kubectl, namespace, "quickstart", "Suspended", phase="Suspended")
    first.stop()
    annotations = job(kubectl, namespace, "quickstart")["metadata"].get("annotations", {})
    kubectl("annotate", "ftj", "quickstart", "-n", namespace, *[f"{k}-" for k in annotations if k.startswith("finetune.dev/")])
    kubectl("patch", "ftj", "quickstart", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": dict.fromkeys(job(kubectl, namespace, "quickstart")["status"])}))
    start_operator()
    wait_status(kubectl, namespace, "quickstart", "Suspended after the restart", phase="Suspended", rayJobName="quickstart-ray")
    assert len(rayjobs(kubectl, namespace)) == 1


def test_immutable_change_is_flagged_and_delete_collects_the_rayjob(kubectl: Kubectl, namespace: str,
                                                                    operator: Operator) -> None:
    apply(kubectl, namespace, manifest(runPolicy={"suspend": True}))
    wait_status(kubectl, namespace, "quickstart", "Suspended", phase="Suspended")
    kubectl("patch", "ftj", "quickstart", "-n", namespace, "--type=merge", "-p", '{"spec":{"training":{"learningRate":0.0003}}}')
    flagged = wait_status(kubectl, namespace, "quickstart", "the change noticed", observedGeneration=2)
    assert condition(flagged, "SpecChangeIgnored")["reason"] == "ImmutableFieldChanged"
    kubectl("delete", "ftj", "quickstart", "-n", namespace, "--timeout=120s")
    wait_for(lambda: rayjobs(kubectl, namespace) == [], what="the garbage collector to delete the RayJob")


def test_a_deadline_fails_the_run_for_real(kubectl: Kubectl, namespace: str, operator: Operator) -> None:
    apply(kubectl, namespace, manifest(name="late", runPolicy={"activeDeadlineSeconds": 1}))
    failed = wait_status(kubectl, namespace, "late", "DeadlineExceeded", phase="Failed", reason="DeadlineExceeded")
    assert condition(failed, "Stalled")["status"] == "True"


def test_a_short_real_training_run_succeeds(kubectl: Kubectl, namespace: str, operator: Operator) -> None:
    spec: dict[str, Any] = {
        "training": {"maxSteps": 20, "perDeviceBatchSize": 8, "learningRate": 1.0e-4, "seed": 42},
        "evaluation": {"everySteps": 10, "metric": "accuracy"},
        "resources": {"workers": 1, "cpusPerWorker": 1},
        "cluster": {"head": {"cpus": 1, "memory": "3Gi"}, "workers": {"memory": "3Gi"}},
    }
    doc = manifest(name="train", **spec)
    doc["spec"]["data"]["maxEvalSamples"] = 64
    prefix = f"e2e-{uuid.uuid4().hex[:6]}"
    if S3["ENDPOINT"]:
        kubectl("create", "secret", "generic", "s3", "-n", namespace,
                f"--from-literal=AWS_ACCESS_KEY_ID={S3['ACCESS_KEY']}", f"--from-literal=AWS_SECRET_ACCESS_KEY={S3['SECRET_KEY']}")
        doc["spec"]["storage"] = {"uri": f"s3://{S3['BUCKET']}/{prefix}", "endpoint": S3["ENDPOINT"]}
        doc["spec"]["cluster"]["s3CredentialsSecret"] = {"name": "s3"}
    apply(kubectl, namespace, doc)
    wait_status(kubectl, namespace, "train", "the trainer running", phase="Running", timeout=900)
    timeout = float(os.environ.get("FINETUNE_E2E_TRAIN_TIMEOUT", "1800"))
    done = wait_for(lambda: (obj := job(kubectl, namespace, "train")).get("status", {}).get("phase") in {"Succeeded", "Failed"} and obj,
                    timeout=timeout, what="the run to finish")
    print(kubectl("get", "ftj", "-n", namespace, "-o", "wide").stdout)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
    assert condition(done, "Ready")["status"] == "True"
    assert done["status"]["rayClusterName"] and done["status"]["completionTime"]
    # the driver's progress reached the status through the job's ConfigMap, with or without S3
    assert done["status"]["trialsDone"].endswith("/1") and done["status"]["bestTrial"]["metric"] == "accuracy"
    if S3["ENDPOINT"]:  # its checkpoints outlive the job
        import boto3

        client = boto3.client("s3", endpoint_url=S3["ENDPOINT"], aws_access_key_id=S3["ACCESS_KEY"],
                              aws_secret_access_key=S3["SECRET_KEY"], region_name="us-east-1")
        job_prefix = f"{prefix}/{namespace}/train/"
        checkpoint = done["status"].get("bestCheckpoint")
        if checkpoint:
            assert checkpoint.startswith(f"s3://{S3['BUCKET']}/{job_prefix}")
        before = client.list_objects_v2(Bucket=S3["BUCKET"], Prefix=job_prefix).get("KeyCount", 0)
        assert before > 1  # status.json and the run's files
        kubectl("delete", "ftj", "train", "-n", namespace, "--timeout=120s")
        wait_for(lambda: rayjobs(kubectl, namespace) == [], what="the RayJob to be garbage-collected")
        assert client.list_objects_v2(Bucket=S3["BUCKET"], Prefix=job_prefix).get("KeyCount", 0) == before
