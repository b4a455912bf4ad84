"""What a spec change means for a RayJob that already exists: pure functions.

A RayJob cannot be re-planned while it runs: its Ray cluster, entrypoint and the manifest the
driver trains from are fixed when it is created. Three run-policy fields are the exception, because
KubeRay reads them from the RayJob spec on every reconcile: `suspend`, `activeDeadlineSeconds` and
`ttlSecondsAfterFinished`. Everything else in the FineTuneJob spec is immutable once the RayJob
exists; changing it yields the SpecChangeIgnored condition instead of a silent no-op.

The spec the run started from travels inside the RayJob (rayjob.driver_manifest, in the
runtimeEnvYAML), so the comparison needs no annotation or memory of ours.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_trainer.spec import FineTuneJob, FineTuneJobSpec
from finetune_trainer.spec.cluster import MANIFEST_ENV

from .kueue import queue_of

# FineTuneJob spec path -> the RayJob spec field KubeRay honours on a live RayJob
MUTABLE = {
    "spec.runPolicy.suspend": "suspend",
    "spec.runPolicy.activeDeadlineSeconds": "activeDeadlineSeconds",
    "spec.runPolicy.ttlSecondsAfterFinished": "ttlSecondsAfterFinished",
}


def started_spec(rayjob: Mapping[str, Any]) -> FineTuneJobSpec | None:
    """The FineTuneJob spec the RayJob was rendered from; None if it carries none we can read."""
    try:
        runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
        manifest = json.loads(runtime_env["env_vars"][MANIFEST_ENV])
        return FineTuneJobSpec.model_validate(manifest["spec"], by_alias=True, by_name=False)
    except (KeyError, TypeError, ValueError, yaml.YAMLError, ValidationError):
        return None


def immutable_changes(job: FineTuneJob, rayjob: Mapping[str, Any]) -> list[str]:
    """Spec paths (`spec.training.learningRate`) that differ from the spec the RayJob started with,
    defaults filled in on both sides (writing a default out is no change), mutable fields left out."""
    before = started_spec(rayjob)
    if before is None:
        return []
    old = before.model_dump(by_alias=True, mode="json")
    new = job.spec.model_dump(by_alias=True, mode="json")
    return [path for path in _diff(old, new, "spec") if path not in MUTABLE]


def mutable_patch(desired: Mapping[str, Any], existing: Mapping[str, Any]) -> dict[str, Any]:
    """The RayJob spec merge patch that brings the live run-policy fields to `desired` (a rendered
    RayJob); empty when they already agree. None removes a field (no deadline any more). Never
    `suspend` of a RayJob in a Kueue queue: that one is Kueue's to lift (kueue.py)."""
    want, have = desired.get("spec", {}), existing.get("spec", {})
    fields = [f for f in MUTABLE.values() if not (f == "suspend" and queue_of(existing) is not None)]
    return {field: want.get(field) for field in fields if want.get(field) != have.get(field)}


def _diff(old: Any, new: Any, path: str) -> Iterator[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _diff(old.get(key), new.get(key), f"{path}.{key}")
    elif old != new:
        yield path
