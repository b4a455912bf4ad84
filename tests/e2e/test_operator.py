"""The operator end to end: the real `finetune operator` (kopf) process, the real kubectl, the API
emulator, KubeRay's real CRDs, and a real S3 server where a job's checkpoints live.

Nothing plays the operator's part; the tests play KubeRay's, by writing the RayJob's status
subresource as KubeRay's controller would (Initializing -> Running -> Complete, Failed, Suspended),
and the trainer's, by patching the job's progress ConfigMap with the trainer's own writer.
Every wait polls with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import yaml

from tests.e2e.operator_harness import (
    WAIT,
    Kubectl,
    OperatorProcess,
    apply,
    condition,
    events,
    final_report,
    get,
    http_ok,
    job,
    kuberay_says,
    manifest,
    printer_table,
    rayjobs,
    run_id,
    s3_secret,
    trainer_reports,
    wait_for,
    wait_status,
)


def test_quickstart_follows_kuberay_from_initializing_to_complete(kubectl: Kubectl, namespace: str, kube_api: Any,
                                                                  operator: OperatorProcess) -> None:
    apply(kubectl, namespace, manifest())
    ftj = job(kubectl, namespace, "quickstart")
    [rayjob] = wait_for(lambda: rayjobs(kubectl, namespace), timeout=WAIT, what="the RayJob")
    meta = rayjob["metadata"]
    assert meta["name"] == "quickstart-ray"
    assert meta["ownerReferences"] == [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "quickstart",
                                        "uid": ftj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "finetune-operator"
    assert meta["labels"]["finetune.dev/job"] == "quickstart"
    assert rayjob["spec"]["suspend"] is False and rayjob["spec"]["shutdownAfterJobFinishes"] is True

    pending = wait_status(kubectl, namespace, "quickstart", "Pending with the RayJob recorded", phase="Pending",
                          rayJobName="quickstart-ray", observedGeneration=1)
    assert pending["status"]["dashboardURL"] == f"http://quickstart-ray-head-svc.{namespace}.svc:8265"
    assert (condition(pending, "Ready")["status"], condition(pending, "Reconciling")["status"],
            condition(pending, "Stalled")["status"]) == ("False", "True", "False")
    reconciling_since = condition(pending, "Reconciling")["lastTransitionTime"]

    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Initializing", jobStatus="",
                 rayClusterName="quickstart-ray-x7k2p", startTime="2026-01-01T10:00:00Z")
    initializing = wait_status(kubectl, namespace, "quickstart", "ClusterStarting", reason="ClusterStarting",
                               rayClusterName="quickstart-ray-x7k2p")
    assert initializing["status"]["phase"] == "Pending"
    assert initializing["status"]["startTime"] == "2026-01-01T10:00:00Z"

    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="PENDING")
    wait_status(kubectl, namespace, "quickstart", "JobSubmitted", phase="Pending", reason="JobSubmitted")
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    running = wait_status(kubectl, namespace, "quickstart", "Running", phase="Running", reason="Training")
    # Reconciling stayed True all along, so its lastTransitionTime did not move
    assert condition(running, "Reconciling")["lastTransitionTime"] == reconciling_since
    assert printer_table(kubectl, namespace).splitlines()[1].split()[:2] == ["quickstart", "Running"]

    trainer_reports(kube_api, namespace, "quickstart", final_report("quickstart", run_id(rayjob)))
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED",
                 endTime="2026-01-01T10:20:00Z", succeeded=1)
    done = wait_status(kubectl, namespace, "quickstart", "Succeeded", phase="Succeeded")
    assert done["status"]["completionTime"] == "2026-01-01T10:20:00Z"
    assert (condition(done, "Ready")["status"], condition(done, "Reconciling")["status"],
            condition(done, "Stalled")["status"]) == ("True", "False", "False")
    assert condition(done, "Ready")["reason"] == "Succeeded"
    kubectl("wait", "--for=condition=Ready", "ftj/quickstart", "-n", namespace, "--timeout=5s")
    wait_for(lambda: {"RayJobCreated", "Succeeded"} <= {reason for _, reason, _ in events(kubectl, namespace)},
             timeout=WAIT, what="Events for the RayJob's creation and the success")
    assert len(rayjobs(kubectl, namespace)) == 1

    assert http_ok(f"http://127.0.0.1:{operator.health_port}/healthz")
    metrics = wait_for(lambda: next((m for m in [operator.metrics()] if 'finetune_operator_jobs{phase="Succeeded"} 1.0' in m), None),
                       timeout=WAIT, what="the jobs-by-phase gauge")
    assert 'finetune_operator_reconcile_duration_seconds_count{handler="reconcile"}' in metrics
    assert 'finetune_operator_reconcile_errors_total{handler="reconcile"}' not in metrics  # no unplanned errors


def test_a_failed_run_is_failed_and_stalled_with_kuberays_message(kubectl: Kubectl, namespace: str,
                                                                  operator: OperatorProcess) -> None:
    apply(kubectl, namespace, manifest("search-freezing.yaml"))
    wait_status(kubectl, namespace, "search-freezing", "Pending", phase="Pending", rayJobName="search-freezing-ray")
    [rayjob] = rayjobs(kubectl, namespace)
    assert "search-freezing" in yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]["FINETUNE_MANIFEST"]
    kuberay_says(kubectl, namespace, "search-freezing-ray", jobDeploymentStatus="Initializing")
    kuberay_says(kubectl, namespace, "search-freezing-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_status(kubectl, namespace, "search-freezing", "Running", phase="Running")
    kuberay_says(kubectl, namespace, "search-freezing-ray", jobDeploymentStatus="Failed", jobStatus="FAILED",
                 reason="AppFailed", message="Job entrypoint command failed with exit code 1", failed=1)
    failed = wait_status(kubectl, namespace, "search-freezing", "Failed", phase="Failed", reason="Failed")
    assert "exit code 1" in failed["status"]["message"]
    assert (condition(failed, "Ready")["status"], condition(failed, "Stalled")["status"]) == ("False", "True")
    wait_for(lambda: any(t == "Warning" and r == "Failed" for t, r, _ in events(kubectl, namespace)), timeout=WAIT,
             what="a Warning Event for the failure")
    # a finished run stays finished: a stray later report does not revive it
    kuberay_says(kubectl, namespace, "search-freezing-ray", jobDeploymentStatus="Running", jobStatus="RUNNING",
                 rayClusterName="search-freezing-ray-late")
    late = wait_status(kubectl, namespace, "search-freezing", "the late report seen", rayClusterName="search-freezing-ray-late")
    assert (late["status"]["phase"], late["status"]["reason"]) == ("Failed", "Failed")


def test_suspend_suspends_the_rayjob_and_resuming_starts_it_again(kubectl: Kubectl, namespace: str,
                                                                  operator: OperatorProcess) -> None:
    apply(kubectl, namespace, manifest(runPolicy={"suspend": True}))
    [rayjob] = wait_for(lambda: rayjobs(kubectl, namespace), timeout=WAIT, what="the RayJob")
    assert rayjob["spec"]["suspend"] is True
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Suspended", jobStatus="")
    suspended = wait_status(kubectl, namespace, "quickstart", "Suspended", phase="Suspended", reason="Suspended")
    assert condition(suspended, "Reconciling")["status"] == "False"
    assert "runPolicy.suspend" in suspended["status"]["message"]

    kubectl("patch", "ftj", "quickstart", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    wait_for(lambda: rayjobs(kubectl, namespace)[0]["spec"]["suspend"] is False, timeout=WAIT,
             what="the RayJob to be resumed")
    resumed = wait_status(kubectl, namespace, "quickstart", "observedGeneration 2", observedGeneration=2)
    assert not condition(resumed, "SpecChangeIgnored")  # suspend is a field a running job takes
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Initializing")
    wait_status(kubectl, namespace, "quickstart", "Pending again", phase="Pending", reason="ClusterStarting")

    # and suspending a running job: KubeRay goes Suspending -> Suspended
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_status(kubectl, namespace, "quickstart", "Running", phase="Running")
    kubectl("patch", "ftj", "quickstart", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_for(lambda: rayjobs(kubectl, namespace)[0]["spec"]["suspend"] is True, timeout=WAIT, what="the RayJob suspended")
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Suspending")
    wait_status(kubectl, namespace, "quickstart", "Suspending", phase="Suspended", reason="Suspending")
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Suspended", jobStatus="")
    wait_status(kubectl, namespace, "quickstart", "Suspended", phase="Suspended", reason="Suspended")
    assert len(rayjobs(kubectl, namespace)) == 1


def test_changing_an_immutable_field_while_running_is_reported_not_applied(kubectl: Kubectl, namespace: str,
                                                                           operator: OperatorProcess) -> None:
    apply(kubectl, namespace, manifest())
    wait_status(kubectl, namespace, "quickstart", "Pending", phase="Pending", rayJobName="quickstart-ray")
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_status(kubectl, namespace, "quickstart", "Running", phase="Running")
    before = rayjobs(kubectl, namespace)[0]["spec"]["runtimeEnvYAML"]

    kubectl("patch", "ftj", "quickstart", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"training":{"learningRate":0.0003},"runPolicy":{"activeDeadlineSeconds":7200}}}')
    changed = wait_status(kubectl, namespace, "quickstart", "the change noticed", observedGeneration=2)
    ignored = condition(changed, "SpecChangeIgnored")
    assert (ignored["status"], ignored["reason"]) == ("True", "ImmutableFieldChanged")
    assert "spec.training.learningRate" in ignored["message"] and "delete and re-create" in ignored["message"]
    assert ignored["message"].startswith("spec.training.learningRate cannot change")  # the deadline is not listed
    assert changed["status"]["phase"] == "Running"  # the run goes on
    [rayjob] = rayjobs(kubectl, namespace)
    assert rayjob["spec"]["runtimeEnvYAML"] == before  # the running spec is untouched...
    assert rayjob["spec"]["activeDeadlineSeconds"] == 7200  # ...but the deadline is a live field
    wait_for(lambda: any(r == "ImmutableFieldChanged" for _, r, _ in events(kubectl, namespace)), timeout=WAIT,
             what="a Warning Event for the ignored change")

    kubectl("patch", "ftj", "quickstart", "-n", namespace, "--type=merge", "-p", '{"spec":{"training":{"learningRate":0.0001}}}')
    back = wait_status(kubectl, namespace, "quickstart", "the change undone", observedGeneration=3)
    assert not condition(back, "SpecChangeIgnored")


def test_operator_restart_creates_no_duplicate_and_status_continues(kubectl: Kubectl, namespace: str, kube_api: Any,
                                                                    start_operator: Callable[[], OperatorProcess]) -> None:
    first = start_operator()
    apply(kubectl, namespace, manifest())
    wait_status(kubectl, namespace, "quickstart", "Pending", phase="Pending", rayJobName="quickstart-ray")
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING",
                 startTime="2026-01-01T10:00:00Z")
    wait_status(kubectl, namespace, "quickstart", "Running", phase="Running")
    first.stop()

    # While no operator runs: KubeRay moves on, and the FineTuneJob loses its status and kopf's
    # memory of having handled it, as if the operator had died after creating the RayJob but
    # before writing anything: the next one must adopt the RayJob, not create a second.
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED",
                 endTime="2026-01-01T10:30:00Z")
    trainer_reports(kube_api, namespace, "quickstart", final_report("quickstart", run_id(rayjobs(kubectl, namespace)[0])))
    annotations = job(kubectl, namespace, "quickstart")["metadata"].get("annotations", {})
    kopf_keys = [key for key in annotations if key.startswith("finetune.dev/")]
    assert kopf_keys, annotations  # kopf keeps its bookkeeping in our annotations
    kubectl("annotate", "ftj", "quickstart", "-n", namespace, *[f"{key}-" for key in kopf_keys])
    kubectl("patch", "ftj", "quickstart", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": dict.fromkeys(job(kubectl, namespace, "quickstart")["status"])}))
    assert "status" not in job(kubectl, namespace, "quickstart") or not job(kubectl, namespace, "quickstart")["status"]

    second = start_operator()
    done = wait_status(kubectl, namespace, "quickstart", "Succeeded after the restart", phase="Succeeded",
                       rayJobName="quickstart-ray")
    assert done["status"]["completionTime"] == "2026-01-01T10:30:00Z"
    assert [r["metadata"]["name"] for r in rayjobs(kubectl, namespace)] == ["quickstart-ray"]
    # once more, a plain restart: the job is resumed (reconciled again), still exactly one RayJob
    resumed = f"[{namespace}/quickstart] Handler 'resume' succeeded"
    before = second.output().count(resumed)
    second.stop()
    third = start_operator()
    wait_for(lambda: third.output().count(resumed) > before, timeout=WAIT, what="the third operator to resume the job")
    assert len(rayjobs(kubectl, namespace)) == 1
    assert job(kubectl, namespace, "quickstart")["status"]["phase"] == "Succeeded"


def test_progress_from_the_trainer_reaches_the_status_and_deletion_keeps_the_checkpoints(
        kubectl: Kubectl, namespace: str, operator: OperatorProcess, s3: Any, kube_api: Any) -> None:
    prefix = f"runs-{uuid.uuid4().hex[:6]}"
    s3_secret(kubectl, namespace, s3)
    apply(kubectl, namespace, manifest("search-freezing.yaml", storage={"uri": s3.uri(prefix)},
                                       cluster={"s3CredentialsSecret": {"name": "s3"}}))
    wait_status(kubectl, namespace, "search-freezing", "Pending", phase="Pending", rayJobName="search-freezing-ray")
    # what the driver reports through: its ConfigMap, and a Role that may patch only that one
    configmap = get(kubectl, namespace, "configmap", "search-freezing-ray-progress")
    role = get(kubectl, namespace, "role", "search-freezing-ray-progress")
    owner = job(kubectl, namespace, "search-freezing")["metadata"]["uid"]
    assert [r["uid"] for r in configmap["metadata"]["ownerReferences"]] == [owner]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": ["search-freezing-ray-progress"], "verbs": ["patch"]}]
    kuberay_says(kubectl, namespace, "search-freezing-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_status(kubectl, namespace, "search-freezing", "Running", phase="Running")

    # the trainer's write: finetune_trainer.job_status.snapshot, through its ConfigMap writer
    from finetune_trainer.job_status import snapshot

    checkpoint = s3.uri(f"{prefix}/{namespace}/search-freezing/run-1/trial_3/checkpoint_000002")
    best = {"name": "trial_3", "metric": "accuracy", "value": 0.8412,
            "params": {"freezing.strategy": "freezeBottom", "lrSchedule.type": "cosine"}, "checkpoint": checkpoint}
    trials = {"trial_1": "completed", "trial_2": "stopped", "trial_3": "completed", "trial_4": "running", "trial_5": "running",
              "trial_6": "waiting"}
    status_json = snapshot("search-freezing", "run-1", kind="search", state="running", trials=trials, total_trials=8,
                           step=90, total_steps=120, best=best)
    trainer_reports(kube_api, namespace, "search-freezing", status_json)

    running = wait_status(kubectl, namespace, "search-freezing", "progress in the status", trialsDone="3/8")
    status = running["status"]
    assert status["trials"] == {"total": 8, "completed": 2, "running": 2, "waiting": 1, "stopped": 1, "failed": 0}
    assert status["bestTrial"]["value"] == 0.8412 and status["bestTrial"]["metric"] == "accuracy"
    assert status["bestCheckpoint"] == checkpoint
    assert "3/8 trials done" in status["message"]
    row = printer_table(kubectl, namespace).splitlines()[1].split()
    assert row[:4] == ["search-freezing", "Running", "0.8412", "3/8"]
    printer_table(kubectl, namespace, "-o", "wide")

    final = snapshot("search-freezing", "run-1", kind="search", state="finished", total_trials=8,
                     trials={f"trial_{i}": "completed" if i % 2 else "stopped" for i in range(1, 9)},
                     best={**best, "value": 0.8533}, model=s3.uri(f"{prefix}/{namespace}/search-freezing/run-1/model"))
    trainer_reports(kube_api, namespace, "search-freezing", final)
    kuberay_says(kubectl, namespace, "search-freezing-ray", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    done = wait_status(kubectl, namespace, "search-freezing", "Succeeded with the final progress", phase="Succeeded",
                       trialsDone="8/8")
    assert done["status"]["bestTrial"]["value"] == 0.8533
    printer_table(kubectl, namespace)

    # deleting the job deletes the RayJob (garbage collection), never the user's data
    client, key = s3._client(), f"{prefix}/{namespace}/search-freezing/run-1/trial_3/checkpoint_000002/model.safetensors"
    client.put_object(Bucket=s3.bucket, Key=key, Body=b"weights")
    kubectl("delete", "ftj", "search-freezing", "-n", namespace, "--timeout=20s")
    wait_for(lambda: rayjobs(kubectl, namespace) == [], timeout=WAIT, what="the RayJob to be garbage-collected")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])}
    assert keys == {key}
    assert kubectl("get", "secret", "s3", "-n", namespace, "-o", "name").stdout.strip() == "secret/s3"


def test_a_dashboard_ingress_is_created_owned_and_named_in_the_status(kubectl: Kubectl, namespace: str,
                                                                     operator: OperatorProcess) -> None:
    wanted = {"host": "ray-quickstart.example.com", "className": "nginx", "tlsSecretName": "ray-tls",
              "annotations": {"nginx.ingress.kubernetes.io/auth-url": "https://auth.example.com/oauth2/auth"}}
    apply(kubectl, namespace, manifest(cluster={"dashboard": {"ingress": wanted}}))
    pending = wait_status(kubectl, namespace, "quickstart", "Pending with the Ingress URL", phase="Pending",
                          rayJobName="quickstart-ray", dashboardURL="https://ray-quickstart.example.com/")
    ingress = get(kubectl, namespace, "ingress", "quickstart-ray-dashboard")
    meta, spec = ingress["metadata"], ingress["spec"]
    assert meta["ownerReferences"] == [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "quickstart",
                                        "uid": pending["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    assert meta["labels"] == rayjobs(kubectl, namespace)[0]["metadata"]["labels"]
    assert meta["annotations"]["nginx.ingress.kubernetes.io/auth-url"] == "https://auth.example.com/oauth2/auth"
    assert spec["ingressClassName"] == "nginx"
    [rule] = spec["rules"]
    assert rule["host"] == "ray-quickstart.example.com"
    assert rule["http"]["paths"] == [{"path": "/", "pathType": "Prefix", "backend": {
        "service": {"name": "quickstart-ray-head-svc", "port": {"number": 8265}}}}]
    assert spec["tls"] == [{"hosts": ["ray-quickstart.example.com"], "secretName": "ray-tls"}]
    wait_for(lambda: any(r == "IngressCreated" for _, r, _ in events(kubectl, namespace)), timeout=WAIT,
             what="an Event for the Ingress")
    # KubeRay's reports keep the Ingress URL (not the Service address KubeRay writes into the RayJob)
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING",
                 dashboardURL="quickstart-ray-head-svc.ns.svc.cluster.local:8265")
    running = wait_status(kubectl, namespace, "quickstart", "Running", phase="Running")
    assert running["status"]["dashboardURL"] == "https://ray-quickstart.example.com/"
    assert "ray-quickstart.example.com" in printer_table(kubectl, namespace, "-o", "wide")

    # deleting the job deletes the Ingress with the RayJob (garbage collection, ownerReference)
    kubectl("delete", "ftj", "quickstart", "-n", namespace, "--timeout=20s")
    wait_for(lambda: get(kubectl, namespace, "ingresses")["items"] == [] and rayjobs(kubectl, namespace) == [],
             timeout=WAIT, what="the Ingress and the RayJob to be garbage-collected")


