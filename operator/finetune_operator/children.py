"""What every child of a FineTuneJob shares: its deterministic name stem, its labels and its
owner reference. A module of its own so that each builder (rayjob, ingress, trainer_access, the
NetworkPolicy) imports it without importing the others.
"""

from __future__ import annotations

import hashlib
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
