"""The Argo CD health check for FineTuneJob, run in a real Lua (5.1, as Argo CD's gopher-lua).

Statuses are built with the operator's own status model, so a renamed field or condition fails
here rather than in someone's Argo CD. The docs' argocd-cm snippet must be the shipped file.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lupa.lua51 as lupa
import pytest
import yaml

from finetune_operator.status_model import Condition, ConditionType, FineTuneJobStatus, Phase, Reason

ROOT = Path(__file__).resolve().parents[2]
HEALTH_LUA = ROOT / "helm" / "finetune-operator" / "argocd" / "health.lua"
GITOPS_DOC = ROOT / "docs" / "gitops.md"
CM_KEY = "resource.customizations.health.finetune.dev_FineTuneJob"
NOW = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


def run_health(obj: dict[str, Any], script: str | None = None) -> dict[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(script or HEALTH_LUA.read_text())
    return dict(result.items())


def cond(ctype: ConditionType, status: str, reason: Reason, message: str = "", generation: int = 1) -> Condition:
    return Condition(type=ctype, status=status, reason=reason, message=message, last_transition_time=NOW,
                     observed_generation=generation)


def job(status: FineTuneJobStatus | dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ml", "generation": generation},
        "spec": {"model": {"name": "x"}},
    }
    if status is not None:
        obj["status"] = status.to_patch() if isinstance(status, FineTuneJobStatus) else status
    return obj


R, RC, S = ConditionType.READY, ConditionType.RECONCILING, ConditionType.STALLED

CASES = {
    "no status yet": (job(None), "Progressing", "Waiting for the operator"),
    "empty status": (job({}), "Progressing", "Waiting for the operator"),
    "pending": (
        job(FineTuneJobStatus(phase=Phase.PENDING, reason=Reason.CLUSTER_STARTING, observed_generation=1, conditions=[
            cond(R, "False", Reason.CLUSTER_STARTING, "Ray cluster starting"),
            cond(RC, "True", Reason.CLUSTER_STARTING, "Ray cluster starting"),
            cond(S, "False", Reason.CLUSTER_STARTING)])),
        "Progressing", "ClusterStarting: Ray cluster starting"),
    "running": (
        job(FineTuneJobStatus(phase=Phase.RUNNING, reason=Reason.TRAINING, observed_generation=1, conditions=[
            cond(R, "False", Reason.TRAINING, "3/8 trials done"),
            cond(RC, "True", Reason.TRAINING, "3/8 trials done")])),
        "Progressing", "Training: 3/8 trials done"),
    "running, no conditions yet": (
        job(FineTuneJobStatus(phase=Phase.RUNNING, reason=Reason.TRAINING, message="trials are training", observed_generation=1)),
        "Progressing", "Training: trials are training"),
    "succeeded": (
        job(FineTuneJobStatus(phase=Phase.SUCCEEDED, reason=Reason.SUCCEEDED, observed_generation=1, conditions=[
            cond(R, "True", Reason.SUCCEEDED, "best trial t3: accuracy 0.91"),
            cond(RC, "False", Reason.SUCCEEDED), cond(S, "False", Reason.SUCCEEDED)])),
        "Healthy", "best trial t3: accuracy 0.91"),
    "succeeded, phase only": (job({"phase": "Succeeded", "observedGeneration": 1}), "Healthy", "Succeeded"),
    "invalid spec": (
        job(FineTuneJobStatus(phase=Phase.FAILED, reason=Reason.INVALID_SPEC, observed_generation=1, conditions=[
            cond(R, "False", Reason.INVALID_SPEC, "1 problem(s): spec.search.metric: f1 is not evaluated"),
            cond(S, "True", Reason.INVALID_SPEC, "1 problem(s): spec.search.metric: f1 is not evaluated")])),
        "Degraded", "InvalidSpec: 1 problem(s): spec.search.metric: f1 is not evaluated"),
    "failed past retries, no Stalled condition": (
        job(FineTuneJobStatus(phase=Phase.FAILED, reason=Reason.FAILED, message="RayJob failed: 2 retries", observed_generation=1)),
        "Degraded", "Failed: RayJob failed: 2 retries"),
    "deadline exceeded": (
        job(FineTuneJobStatus(phase=Phase.FAILED, reason=Reason.DEADLINE_EXCEEDED, observed_generation=1, conditions=[
            cond(S, "True", Reason.DEADLINE_EXCEEDED, "ran longer than activeDeadlineSeconds (3600)")])),
        "Degraded", "DeadlineExceeded: ran longer than activeDeadlineSeconds (3600)"),
    "stalled wins over a running phase": (
        job(FineTuneJobStatus(phase=Phase.RUNNING, observed_generation=1, conditions=[
            cond(S, "True", Reason.FAILED, "S3 credentials Secret s3-creds not found"),
            cond(RC, "True", Reason.TRAINING)])),
        "Degraded", "Failed: S3 credentials Secret s3-creds not found"),
    "suspended": (
        job(FineTuneJobStatus(phase=Phase.SUSPENDED, reason=Reason.SUSPENDED, message="runPolicy.suspend is true", observed_generation=1)),
        "Suspended", "Suspended: runPolicy.suspend is true"),
    "retrying": (
        job(FineTuneJobStatus(phase=Phase.PENDING, reason=Reason.RETRYING, observed_generation=1, conditions=[
            cond(RC, "True", Reason.RETRYING, "the run failed; KubeRay retries it"), cond(S, "False", Reason.RETRYING)])),
        "Progressing", "Retrying: the run failed; KubeRay retries it"),
    "spec change ignored while running": (
        job(FineTuneJobStatus(phase=Phase.RUNNING, reason=Reason.TRAINING, observed_generation=2, conditions=[
            cond(RC, "True", Reason.TRAINING, "3/8 trials done", generation=2),
            cond(ConditionType.SPEC_CHANGE_IGNORED, "True", Reason.IMMUTABLE_FIELD_CHANGED,
                 "spec.model cannot change while the run exists", generation=2)]), generation=2),
        "Progressing", "ImmutableFieldChanged: spec.model cannot change while the run exists"),
    "stale status after a spec edit": (
        job(FineTuneJobStatus(phase=Phase.FAILED, reason=Reason.INVALID_SPEC, observed_generation=1, conditions=[
            cond(S, "True", Reason.INVALID_SPEC, "bad")]), generation=2),
        "Progressing", "Waiting for the operator to observe generation 2 (status is for generation 1)"),
    "stale succeeded is not healthy": (
        job(FineTuneJobStatus(phase=Phase.SUCCEEDED, observed_generation=3), generation=4),
        "Progressing", "Waiting for the operator to observe generation 4 (status is for generation 3)"),
}


@pytest.mark.parametrize("case", CASES)
def test_health(case):
    obj, status, message = CASES[case]
    assert run_health(obj) == {"status": status, "message": message}


def test_every_outcome_argo_cd_knows_is_covered():
    assert {status for _, status, _ in CASES.values()} == {"Healthy", "Progressing", "Degraded", "Suspended"}
    assert {p.value for p in Phase} <= {c[0].get("status", {}).get("phase") for c in CASES.values()}


def _snippet() -> str:
    """The Lua under CM_KEY in the docs' argocd-cm YAML block."""
    blocks = re.findall(r"```yaml\n(.*?)```", GITOPS_DOC.read_text(), re.DOTALL)
    for block in blocks:
        for doc in yaml.safe_load_all(block):
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap" and CM_KEY in doc.get("data", {}):
                assert doc["metadata"]["name"] == "argocd-cm"
                return doc["data"][CM_KEY]
    raise AssertionError(f"docs/gitops.md has no argocd-cm ConfigMap block with {CM_KEY}")


def test_docs_snippet_is_the_shipped_lua():
    assert _snippet() == HEALTH_LUA.read_text(), (
        "docs/gitops.md's argocd-cm snippet drifted from helm/finetune-operator/argocd/health.lua: paste the file in again"
    )


def test_docs_snippet_runs():
    obj, status, message = CASES["invalid spec"]
    assert run_health(obj, _snippet()) == {"status": status, "message": message}
