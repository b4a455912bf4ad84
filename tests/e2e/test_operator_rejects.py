"""The operator end to end, where a job cannot run as written: specs the operator rejects before
any RayJob, and the trainer's own verdict from inside the cluster. The same real parts as
test_operator.py: the `finetune operator` (kopf) process, kubectl, the API emulator and KubeRay's
CRDs; the tests play KubeRay and the trainer (through the trainer's own ConfigMap writer).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml

from finetune_trainer import job_status
from finetune_trainer.spec import SpecError, parse_job
from tests.e2e.operator_harness import (
    WAIT,
    Kubectl,
    OperatorProcess,
    apply,
    attempts,
    condition,
    events,
    job,
    kuberay_says,
    manifest,
    printer_table,
    rayjobs,
    trainer_reports,
    wait_for,
    wait_status,
)
from tests.unit.hostile_manifests import CASES


def test_hostile_manifests_are_refused_by_the_cluster_naming_the_field(kubectl: Kubectl, namespace: str,
                                                                        operator: OperatorProcess) -> None:
    """The corpus (tests/unit/hostile_manifests.py), each case where the case says a cluster refuses
    it: kubectl (YAML it cannot turn into JSON), the API server (the CRD's schema), or the operator
    (Stalled/InvalidSpec naming the field, handled once, no RayJob). All in one operator session."""
    started = time.monotonic()
    for case in (c for c in CASES if c.cluster == "kubectl"):
        result = kubectl("apply", "-n", namespace, "-f", "-", input=case.file_bytes().decode(), check=False)
        said = result.stdout + result.stderr
        assert result.returncode != 0 and "created" not in said, f"{case.name}: {said}"
        assert (case.cluster_says or case.field) in said, f"{case.name}: {said}"

    # the rest in one apply: the server answers each object, kubectl goes on past refused ones
    stored = [c for c in CASES if c.cluster in ("api", "operator")]
    documents = {c.name: c.document() for c in stored}
    result = kubectl("apply", "-n", namespace, "-f", "-", check=False,
                     input=yaml.safe_dump_all(documents.values(), width=1 << 20, default_flow_style=None))
    said = (result.stdout + result.stderr).splitlines()
    for case in stored:
        name = documents[case.name]["metadata"]["name"]
        lines = [line for line in said if f'"{name}"' in line or f"/{name} " in line]
        assert len(lines) == 1, f"{case.name}: {said}"
        if case.cluster == "api":
            assert "is invalid" in lines[0] and (case.cluster_says or case.field) in lines[0], f"{case.name}: {lines[0][:500]}"
        else:
            assert lines[0].endswith("created"), f"{case.name}: {lines[0][:500]}"

    for case in (c for c in stored if c.cluster == "operator"):
        stalled = wait_status(kubectl, namespace, case.name, f"{case.name} InvalidSpec", phase="Failed", reason="InvalidSpec")
        message = condition(stalled, "Stalled")["message"]
        assert (case.operator_says or case.field) in message, f"{case.name}: {message[:500]}"
        stored_job = {**documents[case.name], "spec": stalled["spec"]}  # as stored: the server filled in defaults
        with pytest.raises(SpecError) as err:  # the one problem the operator's rules find, and only it
            parse_job(stored_job, for_cluster=True)
        [(path, why)] = err.value.problems
        assert message.endswith(f"{path}: {why}"), f"{case.name}: {message[:500]}"
    assert rayjobs(kubectl, namespace) == []
    for case in (c for c in stored if c.cluster == "operator"):
        assert attempts(operator, namespace, case.name) == 1, f"{case.name} handled again: {operator.output()[-3000:]}"
    print(f"{len(CASES)} hostile manifests in {time.monotonic() - started:.1f}s")


def test_invalid_spec_is_stalled_naming_the_fields_without_rayjob_or_retry_loop(kubectl: Kubectl, namespace: str,
                                                                                operator: OperatorProcess) -> None:
    # Both pass the CRD's schema (the API server accepts them); only the operator's rules catch them.
    bad = manifest(name="bad", freezing={"strategy": "freezeBottom"}, deepspeed={"zeroStage": 2, "offloadParams": True})
    apply(kubectl, namespace, bad)
    stalled = wait_status(kubectl, namespace, "bad", "InvalidSpec", phase="Failed", reason="InvalidSpec")
    cond = condition(stalled, "Stalled")
    assert (cond["status"], cond["reason"]) == ("True", "InvalidSpec")
    assert "spec.freezing.layers" in cond["message"] and "spec.deepspeed.offloadParams" in cond["message"]
    assert condition(stalled, "Reconciling")["status"] == "False"
    printer_table(kubectl, namespace)

    # no hot loop: over a few seconds, the job is handled once and no RayJob appears
    tries = attempts(operator, namespace, "bad")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert rayjobs(kubectl, namespace) == []
        time.sleep(0.2)  # sampling the state, not waiting for it
    assert attempts(operator, namespace, "bad") == tries == 1, operator.output()[-3000:]
    assert job(kubectl, namespace, "bad")["status"]["observedGeneration"] == 1
    wait_for(lambda: any(t == "Warning" and r == "InvalidSpec" for t, r, _ in events(kubectl, namespace)), timeout=WAIT,
             what="a Warning Event naming the problem")

    # fixing the manifest is all it takes
    apply(kubectl, namespace, manifest(name="bad"))
    fixed = wait_status(kubectl, namespace, "bad", "Pending after the fix", phase="Pending", rayJobName="bad-ray",
                        observedGeneration=2)
    assert condition(fixed, "Stalled")["status"] == "False"
    assert [r["metadata"]["name"] for r in rayjobs(kubectl, namespace)] == ["bad-ray"]


def test_gpus_on_zero_workers_is_an_invalid_spec(kubectl: Kubectl, namespace: str, operator: OperatorProcess) -> None:
    apply(kubectl, namespace, manifest(name="gpu", resources={"workers": 2, "gpusPerWorker": 1},
                                       deepspeed={"zeroStage": 2, "precision": "bf16"},
                                       cluster={"workers": {"replicas": 0}}))
    stalled = wait_status(kubectl, namespace, "gpu", "InvalidSpec", phase="Failed", reason="InvalidSpec")
    assert "spec.cluster.workers.replicas" in condition(stalled, "Stalled")["message"]
    assert rayjobs(kubectl, namespace) == []


def test_the_trainers_verdict_stalls_the_job_deletes_the_rayjob_until_the_spec_changes(
        kubectl: Kubectl, namespace: str, operator: OperatorProcess, kube_api: Any) -> None:
    _running_with_12_frozen_layers(kubectl, namespace)
    _trainer_rejects_12_layers(kube_api, namespace)
    stalled = wait_status(kubectl, namespace, "quickstart", "InvalidSpec from the trainer", phase="Failed", reason="InvalidSpec")
    cond = condition(stalled, "Stalled")
    assert (cond["status"], cond["reason"]) == ("True", "InvalidSpec")
    assert "spec.freezing.layers: 12 exceeds the 6 layers" in cond["message"]
    assert condition(stalled, "Reconciling")["status"] == "False" and condition(stalled, "Ready")["status"] == "False"
    wait_for(lambda: rayjobs(kubectl, namespace) == [], timeout=WAIT, what="the rejected run's RayJob to be deleted")
    printer_table(kubectl, namespace)
    wait_for(lambda: {("Warning", "InvalidSpec"), ("Normal", "RayJobDeleted")} <= {(t, r) for t, r, _ in events(kubectl, namespace)},
             timeout=WAIT, what="Events for the verdict and the deletion")

    # no retry loop: over a few seconds no RayJob comes back and the job is not handled again
    tries = attempts(operator, namespace, "quickstart")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert rayjobs(kubectl, namespace) == []
        time.sleep(0.2)  # sampling the state, not waiting for it
    assert attempts(operator, namespace, "quickstart") == tries
    assert job(kubectl, namespace, "quickstart")["status"]["reason"] == "InvalidSpec"

    # the user edits the spec: a new generation runs on a new RayJob...
    kubectl("patch", "ftj", "quickstart", "-n", namespace, "--type=merge", "-p", '{"spec":{"freezing":{"layers":2}}}')
    fixed = wait_status(kubectl, namespace, "quickstart", "Pending after the edit", phase="Pending", observedGeneration=2,
                        rayJobName="quickstart-ray")
    assert condition(fixed, "Stalled")["status"] == "False"
    assert [r["metadata"]["name"] for r in rayjobs(kubectl, namespace)] == ["quickstart-ray"]
    # ...which the old verdict, still in the progress ConfigMap until the new driver writes, does not stop
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_status(kubectl, namespace, "quickstart", "Running again", phase="Running", observedGeneration=2)
    deadline = time.monotonic() + 2  # four progress ticks
    while time.monotonic() < deadline:
        assert job(kubectl, namespace, "quickstart")["status"]["phase"] == "Running"
        time.sleep(0.2)
    assert len(rayjobs(kubectl, namespace)) == 1


def test_a_fix_written_while_the_rejected_run_ran_runs_once_that_run_is_gone(
        kubectl: Kubectl, namespace: str, operator: OperatorProcess, kube_api: Any) -> None:
    _running_with_12_frozen_layers(kubectl, namespace)
    [first] = rayjobs(kubectl, namespace)
    assert first["metadata"]["annotations"]["finetune.dev/generation"] == "1"

    # the user fixes the spec while the run is up: not applied to that run (immutable field)...
    kubectl("patch", "ftj", "quickstart", "-n", namespace, "--type=merge", "-p", '{"spec":{"freezing":{"layers":2}}}')
    ignored = wait_status(kubectl, namespace, "quickstart", "the change reported as ignored", observedGeneration=2)
    assert condition(ignored, "SpecChangeIgnored")["status"] == "True"
    # ...then the trainer rejects the run's (generation 1) spec
    _trainer_rejects_12_layers(kube_api, namespace)

    # the rejected RayJob goes, and generation 2 gets its own, with no further edit
    def second_run() -> dict[str, Any] | None:
        found = rayjobs(kubectl, namespace)
        return found[0] if found and found[0]["metadata"]["uid"] != first["metadata"]["uid"] else None

    second = wait_for(second_run, timeout=WAIT, what="a RayJob for generation 2")
    assert second["metadata"]["annotations"]["finetune.dev/generation"] == "2"
    pending = wait_status(kubectl, namespace, "quickstart", "Pending for generation 2", phase="Pending", observedGeneration=2)
    assert condition(pending, "Stalled")["status"] == "False" and condition(pending, "SpecChangeIgnored") == {}
    reasons = [(t, r) for t, r, _ in events(kubectl, namespace)]
    assert ("Warning", "InvalidSpec") in reasons and ("Normal", "RayJobDeleted") in reasons
    assert reasons.count(("Normal", "RayJobCreated")) == 2
    printer_table(kubectl, namespace)


def _running_with_12_frozen_layers(kubectl: Kubectl, namespace: str) -> None:
    """A job that passes the CRD and the operator (neither can see the model) but not the
    trainer's preflight (the model has 6 layers), Running on its RayJob."""
    apply(kubectl, namespace, manifest(freezing={"strategy": "freezeBottom", "layers": 12}))
    wait_status(kubectl, namespace, "quickstart", "Pending", phase="Pending", rayJobName="quickstart-ray")
    kuberay_says(kubectl, namespace, "quickstart-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_status(kubectl, namespace, "quickstart", "Running", phase="Running")


def _trainer_rejects_12_layers(kube_api: Any, namespace: str) -> None:
    """The trainer's write, before any training: status.json with state invalid and the problems."""
    verdict = job_status.invalid("quickstart", kind="single", problems=[
        ("spec.freezing.layers", "12 exceeds the 6 layers of the model; use at most 6 or a fraction like 0.5")])
    trainer_reports(kube_api, namespace, "quickstart", verdict)
