"""Kueue end to end: the real operator (kopf) and kubectl against the API emulator. The test plays
Kueue (it lifts the RayJob's suspend once "admitted", and sets it again to preempt) and KubeRay
(it writes the RayJob's status); nothing plays the operator."""

from __future__ import annotations

import json
from typing import Any

from tests.e2e.operator_harness import (
    WAIT,
    Kubectl,
    OperatorProcess,
    apply,
    condition,
    kuberay_says,
    manifest,
    rayjobs,
    wait_for,
    wait_status,
)

QUEUE, PRIORITY = "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class"


def queued(**spec: Any) -> dict[str, Any]:
    doc = manifest(**spec)
    doc["metadata"]["labels"] = {QUEUE: "team-a", PRIORITY: "low", "kueue.x-k8s.io/max-exec-time-seconds": "5"}
    return doc


def kueue_sets_suspend(kubectl: Kubectl, namespace: str, suspend: bool) -> None:
    kubectl("patch", "rayjob", "quickstart-ray", "-n", namespace, "--type=merge", "-p", json.dumps({"spec": {"suspend": suspend}}))


def test_a_queued_job_waits_for_kueue_and_runs_once_admitted(kubectl: Kubectl, namespace: str, operator: OperatorProcess) -> None:
    apply(kubectl, namespace, queued())
    [rayjob] = wait_for(lambda: rayjobs(kubectl, namespace), timeout=WAIT, what="the RayJob")
    labels = rayjob["metadata"]["labels"]
    assert (labels[QUEUE], labels[PRIORITY]) == ("team-a", "low") and "kueue.x-k8s.io/max-exec-time-seconds" not in labels
    assert rayjob["spec"]["suspend"] is True  # created suspended: Kueue's to start
    waiting = wait_status(kubectl, namespace, "quickstart", "waiting for quota", phase="Pending", reason="WaitingForQuota")
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Suspended", jobStatus="")
    waiting = wait_status(kubectl, namespace, "quickstart", "still waiting once KubeRay says Suspended", phase="Pending",
                          reason="WaitingForQuota", observedGeneration=1)
    assert "waiting for quota" in waiting["status"]["message"] and "team-a" in waiting["status"]["message"]
    assert condition(waiting, "Reconciling")["status"] == "True"

    # a live run-policy change goes through; the operator does not lift Kueue's suspend on the way
    kubectl("patch", "ftj", "quickstart", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"activeDeadlineSeconds":900}}}')
    wait_for(lambda: rayjobs(kubectl, namespace)[0]["spec"].get("activeDeadlineSeconds") == 900, timeout=WAIT, what="the deadline")
    wait_status(kubectl, namespace, "quickstart", "generation 2 seen", observedGeneration=2, reason="WaitingForQuota")
    assert rayjobs(kubectl, namespace)[0]["spec"]["suspend"] is True

    kueue_sets_suspend(kubectl, namespace, False)  # admitted
    wait_status(kubectl, namespace, "quickstart", "admitted", phase="Pending", reason="ClusterStarting")
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Initializing")
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_status(kubectl, namespace, "quickstart", "Running", phase="Running")

    kueue_sets_suspend(kubectl, namespace, True)  # preempted: Kueue requeues it
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Suspending")
    wait_status(kubectl, namespace, "quickstart", "preempted, waiting again", phase="Pending", reason="WaitingForQuota")
    assert rayjobs(kubectl, namespace)[0]["spec"]["suspend"] is True and len(rayjobs(kubectl, namespace)) == 1


def test_a_queued_job_cannot_also_ask_for_runpolicy_suspend(kubectl: Kubectl, namespace: str, operator: OperatorProcess) -> None:
    apply(kubectl, namespace, queued(runPolicy={"suspend": True}))
    stalled = wait_status(kubectl, namespace, "quickstart", "InvalidSpec", reason="InvalidSpec")
    assert "spec.runPolicy.suspend" in stalled["status"]["message"] and "active" in stalled["status"]["message"]
    assert condition(stalled, "Stalled")["status"] == "True"
    assert rayjobs(kubectl, namespace) == []
