"""What every child of a FineTuneJob shares: its deterministic name stem, its labels and its
owner reference. A module of its own so that each builder (rayjob, ingress, trainer_access, the
NetworkPolicy) imports it without importing the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from finetune_trainer.spec import FineTuneJob

from .crd import GROUP, KIND, VERSION

RAYJOB_NAME_MAX = 47  # KubeRay's MaxRayJobNameLength: 53 (RayCluster) - 6 (its random suffix)
RAYJOB_SUFFIX = "-ray"


def rayjob_name(job_name: str) -> str:
    """`<job>-ray`; a name too long for KubeRay keeps a readable prefix plus a hash of the whole."""
    base = job_name if job_name[:1].isalpha() else f"ft-{job_name}"  # DNS-1035: starts with a letter
    name = f"{base}{RAYJOB_SUFFIX}"
    if len(name) <= RAYJOB_NAME_MAX:
        return name
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
    keep = RAYJOB_NAME_MAX - len(RAYJOB_SUFFIX) - len(digest) - 1
    return f"{base[:keep].rstrip('-')}-{digest}{RAYJOB_SUFFIX}"


def labels(job: FineTuneJob) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/managed-by": "finetune-operator",
        f"{GROUP}/job": job.name,
    }


def owner_reference(job: FineTuneJob, uid: str) -> dict[str, Any]:
    """The FineTuneJob as controller of a child: Kubernetes' garbage collector deletes the child
    with the job, and the operator recognises its own children by it."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": job.name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def run_id_for(meta: Mapping[str, Any], generation: int) -> str:
    """The run every attempt of one FineTuneJob generation shares (the driver's FINETUNE_RUN_ID):
    `run-<created>-<uid>-g<generation>`. A KubeRay retry and a RayJob re-created after it was lost
    carry the same one, so spec.storage.resume `auto` continues that run; a FineTuneJob deleted and
    applied again is a new object (a new uid and creation time), so it starts a new run; so does a
    new generation of the spec. The creation time first keeps the job's runs in time order."""
    created = str(meta.get("creationTimestamp") or "")
    stamp = "".join(ch for ch in created if ch.isdigit())[:14]  # 2026-12-02T13:05:12Z -> 20261202130512
    stamp = f"{stamp[:8]}-{stamp[8:]}" if len(stamp) == 14 else "created-unknown"
    uid = "".join(ch for ch in str(meta.get("uid") or "") if ch.isalnum())[:8] or "nouid"
    return f"run-{stamp}-{uid}-g{int(generation)}"


def controller_of(child: Mapping[str, Any]) -> dict[str, Any] | None:
    """The FineTuneJob ownerReference marked controller, if the child has one."""
    for ref in child.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/") and ref.get("controller"):
            return dict(ref)
    return None


def owned_by(child: Mapping[str, Any], uid: str) -> bool:
    """Whether this very FineTuneJob (by uid, not name) controls the child: an object of the same
    name left by an earlier job, or made by hand, is never taken for ours."""
    owner = controller_of(child)
    return owner is not None and owner.get("uid") == uid
