"""What clusters do to a run, end to end: the real operator (kopf), kubectl and the API emulator,
with the tests playing KubeRay (the RayJob's status) and the trainer (its progress ConfigMap).

- a RayJob deleted by hand mid-run: re-created with the same run id (the trainer's `resume: auto`
  continues that run), a Warning Event, then the new attempt's resume as an Event and in the
  status; with `resume: never`, Failed/RayJobLost and no new RayJob. Both live and while the
  operator was down (seen at its start-up).
- KubeRay's Complete before the trainer's final status.json: Running/WaitingForResults until it is
  read, then Succeeded with the final figures; a NaN in status.json never breaks a status write.
- deleting a FineTuneJob while the operator is down does not hang (no finalizer), and the finalizer
  an older operator version put on a job is removed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from finetune_trainer.job_status import best_trial, snapshot
from finetune_trainer.spec.progress import ProgressDocument
from tests.e2e.operator_harness import (
    WAIT,
    Kubectl,
    OperatorProcess,
    apply,
    condition,
    events,
    final_report,
    job,
    kuberay_says,
    manifest,
    rayjobs,
    run_id,
    trainer_reports,
    wait_for,
    wait_status,
)

STORAGE = {"uri": "s3://ckpts/runs"}  # the operator never talks to it: the URIs only name checkpoints


def running_report(name: str, run: str, **lifecycle: Any) -> ProgressDocument:
    """A running single run's status.json with the run's life (job_status.lifecycle's fields)."""
    doc = snapshot(name, run, kind="single", state="running", trials={run: "running"}, step=20, total_steps=60)
    return ProgressDocument.model_validate(doc.as_dict() | lifecycle)


def checkpoint(run: str, step: int) -> dict[str, Any]:
    return {"uri": f"s3://ckpts/runs/ns/quickstart/{run}/checkpoint_{step:06d}", "step": step,
            "time": datetime.now(UTC).isoformat()}


def the_rayjob(kubectl: Kubectl, namespace: str, *, other_than: str | None = None) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = [r for r in rayjobs(kubectl, namespace) if r["metadata"]["uid"] != other_than]
        return found[0] if found else None

    return wait_for(probe, timeout=WAIT, what="the RayJob" + (" re-created" if other_than else ""))


def reasons(kubectl: Kubectl, namespace: str) -> list[str]:
    return [reason for _, reason, _ in events(kubectl, namespace)]


def test_a_rayjob_deleted_mid_run_is_recreated_and_the_run_continues(kubectl: Kubectl, namespace: str, kube_api: Any,
                                                                     operator: OperatorProcess) -> None:
    apply(kubectl, namespace, manifest(storage=STORAGE))
    first = the_rayjob(kubectl, namespace)
    run = run_id(first)
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_status(kubectl, namespace, "quickstart", "Running", phase="Running")
    trainer_reports(kube_api, namespace, "quickstart", running_report("quickstart", run, attempt=1, restarts=0,
                                                                      lastCheckpoint=checkpoint(run, 20)))
    running = wait_status(kubectl, namespace, "quickstart", "the attempt in the status", attempt=1)
    assert running["status"]["lastCheckpoint"]["step"] == 20

    kubectl("delete", "rayjob", "quickstart-ray", "-n", namespace)
    second = the_rayjob(kubectl, namespace, other_than=first["metadata"]["uid"])
    assert run_id(second) == run  # the same run: the trainer's resume auto continues it
    lost = wait_status(kubectl, namespace, "quickstart", "Pending after the RayJob was lost", phase="Pending")
    assert lost["status"]["reason"] in ("RayJobLost", "RayJobCreated", "ClusterStarting")
    wait_for(lambda: "RayJobLost" in reasons(kubectl, namespace), timeout=WAIT, what="a RayJobLost Event")
    assert "re-created" in next(m for _, r, m in events(kubectl, namespace) if r == "RayJobLost")

    # the new attempt resumes from the checkpoint of step 20: an Event says so, the status counts it
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_status(kubectl, namespace, "quickstart", "Running again", phase="Running")
    resume = {"checkpoint": checkpoint(run, 20)["uri"], "step": 20, "time": datetime.now(UTC).isoformat(), "attempt": 2,
              "source": "resume"}
    trainer_reports(kube_api, namespace, "quickstart", running_report("quickstart", run, attempt=2, restarts=1, resumes=[resume],
                                                                      lastCheckpoint=checkpoint(run, 40)))
    again = wait_status(kubectl, namespace, "quickstart", "attempt 2", attempt=2, restarts=1)
    assert again["status"]["lastCheckpoint"]["step"] == 40
    wait_for(lambda: [m for _, r, m in events(kubectl, namespace) if r == "Resumed"], timeout=WAIT, what="a Resumed Event")
    [message] = [m for _, r, m in events(kubectl, namespace) if r == "Resumed"]
    assert "resumed from step 20" in message and "attempt 2" in message
    # the same resume in the next documents posts no second Event
    trainer_reports(kube_api, namespace, "quickstart", running_report("quickstart", run, attempt=2, restarts=1, resumes=[resume],
                                                                      lastCheckpoint=checkpoint(run, 60)))
    wait_for(lambda: job(kubectl, namespace, "quickstart")["status"]["lastCheckpoint"]["step"] == 60, timeout=WAIT,
             what="the next document applied")
    assert reasons(kubectl, namespace).count("Resumed") == 1


def test_a_lost_rayjob_that_could_only_start_over_fails_the_job(kubectl: Kubectl, namespace: str,
                                                                operator: OperatorProcess) -> None:
    apply(kubectl, namespace, manifest(storage={**STORAGE, "resume": "never"}))
    first = the_rayjob(kubectl, namespace)
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_status(kubectl, namespace, "quickstart", "Running", phase="Running")
    kubectl("delete", "rayjob", "quickstart-ray", "-n", namespace)
    failed = wait_status(kubectl, namespace, "quickstart", "Failed/RayJobLost", phase="Failed", reason="RayJobLost")
    assert "resume is never" in failed["status"]["message"] and condition(failed, "Stalled")["status"] == "True"
    assert not [r for r in rayjobs(kubectl, namespace) if r["metadata"]["uid"] != first["metadata"]["uid"]]


def test_rayjobs_lost_while_the_operator_was_down(kubectl: Kubectl, namespace: str,
                                                  start_operator: Callable[[], OperatorProcess]) -> None:
    first = start_operator()
    apply(kubectl, namespace, manifest(storage=STORAGE, name="resumes"))
    apply(kubectl, namespace, manifest(name="no-storage"))
    for name in ("resumes", "no-storage"):
        wait_status(kubectl, namespace, name, "Pending", phase="Pending", rayJobName=f"{name}-ray")
        kuberay_says(kubectl, namespace, f"{name}-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
        wait_status(kubectl, namespace, name, "Running", phase="Running")
    old = {r["metadata"]["name"]: r for r in rayjobs(kubectl, namespace)}
    first.stop()
    kubectl("delete", "rayjob", "resumes-ray", "no-storage-ray", "-n", namespace)

    start_operator()  # the restart finds both lost: one re-created with its run, one failed
    again = wait_for(lambda: [r for r in rayjobs(kubectl, namespace) if r["metadata"]["name"] == "resumes-ray"],
                     timeout=WAIT, what="resumes-ray re-created")[0]
    assert run_id(again) == run_id(old["resumes-ray"]) and again["metadata"]["uid"] != old["resumes-ray"]["metadata"]["uid"]
    failed = wait_status(kubectl, namespace, "no-storage", "Failed/RayJobLost", phase="Failed", reason="RayJobLost")
    assert "no spec.storage" in failed["status"]["message"]
    assert not [r for r in rayjobs(kubectl, namespace) if r["metadata"]["name"] == "no-storage-ray"]
    wait_for(lambda: reasons(kubectl, namespace).count("RayJobLost") == 2, timeout=WAIT, what="two RayJobLost Events")


def test_succeeded_only_once_the_final_results_are_read(kubectl: Kubectl, namespace: str, kube_api: Any,
                                                        operator: OperatorProcess) -> None:
    apply(kubectl, namespace, manifest(storage=STORAGE))
    run = run_id(the_rayjob(kubectl, namespace))
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING",
                 startTime="2026-01-01T10:00:00Z")
    wait_status(kubectl, namespace, "quickstart", "Running", phase="Running")
    trainer_reports(kube_api, namespace, "quickstart", running_report("quickstart", run, attempt=1))

    # a NaN in status.json (a diverged run's best value): the status write must stay valid JSON
    raw = running_report("quickstart", run, attempt=1).as_dict() | {
        "bestTrial": {"name": run, "metric": "accuracy", "value": "NaN-placeholder"}, "step": 30}
    text = json.dumps(raw).replace('"NaN-placeholder"', "NaN")
    kubectl("patch", "configmap", "quickstart-ray-progress", "-n", namespace, "--type=merge",
            "-p", json.dumps({"data": {"status.json": text}}))
    wait_status(kubectl, namespace, "quickstart", "the NaN document applied without its best trial", phase="Running",
                attempt=1)

    # the run ends while the trainer's last write has not landed: not Succeeded yet
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED",
                 endTime="2026-01-01T10:20:00Z")
    waiting = wait_status(kubectl, namespace, "quickstart", "WaitingForResults", phase="Running", reason="WaitingForResults")
    assert condition(waiting, "ResultsPending")["status"] == "True" and condition(waiting, "Ready")["status"] == "False"
    assert "bestTrial" not in waiting["status"]

    best = best_trial(run, "accuracy", 0.8123, 60, checkpoint=checkpoint(run, 60)["uri"])
    trainer_reports(kube_api, namespace, "quickstart", final_report("quickstart", run, best=best, step=60, total_steps=60))
    done = wait_status(kubectl, namespace, "quickstart", "Succeeded with the final results", phase="Succeeded")
    assert done["status"]["bestTrial"]["value"] == 0.8123 and done["status"]["bestCheckpoint"].endswith("checkpoint_000060")
    assert not condition(done, "ResultsPending") and condition(done, "Ready")["status"] == "True"
    wait_for(lambda: "Succeeded" in reasons(kubectl, namespace), timeout=WAIT, what="the Succeeded Event")
    assert "Traceback" not in operator.output()


def test_deleting_a_job_never_waits_for_the_operator(kubectl: Kubectl, namespace: str,
                                                     start_operator: Callable[[], OperatorProcess]) -> None:
    first = start_operator()
    apply(kubectl, namespace, manifest())
    wait_status(kubectl, namespace, "quickstart", "Pending", phase="Pending")
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_status(kubectl, namespace, "quickstart", "Running", phase="Running")  # the progress poll runs for it now
    assert not job(kubectl, namespace, "quickstart")["metadata"].get("finalizers")
    first.stop()
    kubectl("delete", "ftj", "quickstart", "-n", namespace, "--timeout=15s")  # returns once it is gone
    assert kubectl("get", "ftj", "quickstart", "-n", namespace, check=False).returncode != 0

    # a job an older version marked with kopf's finalizer (its timer's) gets it removed
    legacy = manifest(name="legacy")
    legacy["metadata"]["finalizers"] = ["finetune.dev/operator"]
    apply(kubectl, namespace, legacy)
    start_operator()
    wait_for(lambda: not job(kubectl, namespace, "legacy")["metadata"].get("finalizers"), timeout=WAIT,
             what="the legacy finalizer removed")
