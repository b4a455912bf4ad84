"""One writer for FineTuneJob.status (status_writer.write_status): the race between the progress
timer and the RayJob mirror, played step by step against the API emulator with the operator's own
handlers and the real `kubernetes` client (no kopf process: these interleavings are the ones its
scheduling makes rare, so they are forced here instead of waited for).

The race: the timer fires while the job is Running and is handed that body; before its write
lands, KubeRay reports the run's end and the mirror writes Succeeded (and the timer stops, since
the job no longer runs). A write computed from the old body and sent without a precondition
replaced the message with "the trainer is running ..." on a Succeeded job, for good.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest

from finetune_operator.handlers import Operator, OperatorConfig
from finetune_operator.kube import KubeApi
from finetune_operator.metrics import Metrics
from finetune_operator.progress import ConfigMapProgressSource
from finetune_trainer import job_status
from tests import kube_emulator
from tests.e2e.operator_harness import Kubectl, apply, get, job, kuberay_says, manifest, trainer_reports

NAME = "quickstart"
LOG = logging.getLogger(__name__)


class Interleaving(KubeApi):
    """The real client, plus a hook that runs once right after the next read of the job or of its
    progress: another
    handler's write lands between this handler's read and its write. Counts the 409s it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.between: Callable[[], None] | None = None
        self.conflicts = 0

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        body = super().get_job(namespace, name)
        self._between()
        return body

    def configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """The progress read: the tick writes from the job its poll read just before it (no second
        GET), so this read is the last thing between the tick's read of the job and its write."""
        data = super().configmap_data(namespace, name)
        self._between()
        return data

    def _between(self) -> None:
        hook, self.between = self.between, None
        if hook is not None:
            hook()

    def patch_job_status(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().patch_job_status(*args, **kwargs)
        except kubernetes.client.ApiException as err:
            self.conflicts += err.status == 409
            raise


@pytest.fixture
def kube(kube_api: kube_emulator.KubeEmulator, crds: None) -> Interleaving:
    return Interleaving()


@pytest.fixture
def in_process(kube: Interleaving) -> Operator:
    return Operator(kube=kube, progress=ConfigMapProgressSource(kube.configmap_data), metrics=Metrics(),
                    config=OperatorConfig(), post_event=lambda *_: None)


@pytest.fixture
def running(kubectl: Kubectl, namespace: str, in_process: Operator, kube_api: kube_emulator.KubeEmulator) -> Iterator[dict[str, Any]]:
    """The job created, reconciled, its RayJob running and the trainer one evaluation in: the body
    the progress timer is handed while the job is Running."""
    apply(kubectl, namespace, manifest())
    in_process.reconcile(job(kubectl, namespace, NAME), LOG)  # type: ignore[arg-type]
    kuberay_says(kubectl, namespace, f"{NAME}-ray", jobDeploymentStatus="Running", jobStatus="RUNNING")
    mirror(kubectl, namespace, in_process)
    trainer_reports(kube_api, namespace, NAME, job_status.snapshot(
        NAME, "run-1", kind="single", state="running", trials={"run-1": "running"}, step=20, total_steps=60,
        best=job_status.best_trial("run-1", "accuracy", 0.61, 20)))
    body = job(kubectl, namespace, NAME)
    assert body["status"]["phase"] == "Running"
    yield body


def mirror(kubectl: Kubectl, namespace: str, operator: Operator) -> None:
    """The RayJob watch's handler, for the RayJob as KubeRay left it."""
    operator.rayjob_changed("MODIFIED", get(kubectl, namespace, "rayjob", f"{NAME}-ray"), LOG)


def run_succeeds(kubectl: Kubectl, namespace: str, kube_api: kube_emulator.KubeEmulator, operator: Operator) -> None:
    """The trainer's last status.json, KubeRay's Complete/SUCCEEDED, and the mirror writing Succeeded."""
    trainer_reports(kube_api, namespace, NAME, job_status.snapshot(
        NAME, "run-1", kind="single", state="finished", trials={"run-1": "completed"}, step=60, total_steps=60,
        best=job_status.best_trial("run-1", "accuracy", 0.83, 60)))
    kuberay_says(kubectl, namespace, f"{NAME}-ray", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    mirror(kubectl, namespace, operator)


def assert_succeeded(status: dict[str, Any]) -> None:
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert (status["phase"], status["reason"], status["message"]) == ("Succeeded", "Succeeded", "the run finished"), status
    assert (conditions["Ready"], conditions["Reconciling"]) == ("True", "False")
    assert (status["trialsDone"], status["bestTrial"]["value"]) == ("1/1", 0.83)  # the mirror read the last progress


def test_a_tick_handed_a_running_body_after_the_run_succeeded_changes_nothing(
        kubectl: Kubectl, namespace: str, kube_api: kube_emulator.KubeEmulator, in_process: Operator,
        running: dict[str, Any]) -> None:
    run_succeeds(kubectl, namespace, kube_api, in_process)
    assert_succeeded(job(kubectl, namespace, NAME)["status"])
    written = job(kubectl, namespace, NAME)["metadata"]["resourceVersion"]

    in_process.poll_progress(running)  # the timer's tick, with the body it was handed while Running

    after = job(kubectl, namespace, NAME)
    assert_succeeded(after["status"])
    assert after["metadata"]["resourceVersion"] == written  # not even a no-op write


def test_a_mirror_write_between_the_ticks_read_and_write_makes_the_tick_recompute(
        kubectl: Kubectl, namespace: str, kube_api: kube_emulator.KubeEmulator, kube: Interleaving,
        in_process: Operator, running: dict[str, Any]) -> None:
    # the tick reads the job (Running, with the new progress to write); then the run succeeds
    kube.between = lambda: run_succeeds(kubectl, namespace, kube_api, in_process)
    in_process.poll_progress(running)

    assert_succeeded(job(kubectl, namespace, NAME)["status"])
    assert kube.conflicts == 1  # the tick's write, computed from the Running status, was refused; read again, not the timer's
