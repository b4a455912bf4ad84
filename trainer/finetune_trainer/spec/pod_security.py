"""How the Ray pods run: user, groups, seccomp, capabilities, and the local disk they reserve.

Every pod the operator renders (the Ray head, the workers and KubeRay's submitter) passes the Pod
Security Standards `restricted` profile as rendered: non-root uid/gid of the trainer image,
`allowPrivilegeEscalation: false`, all capabilities dropped, the runtime's default seccomp
profile, no ServiceAccount token mounted. A namespace that enforces `restricted` admits them.

What a job author may change (`spec.cluster.podSecurityContext`, `containerSecurityContext`):
the uid and groups (an image built for another user, group-owned volumes), a Localhost seccomp
profile, and adding NET_BIND_SERVICE. Everything the profile forbids (uid 0, `runAsNonRoot:
false`, `privileged`, `allowPrivilegeEscalation: true`, other capabilities, an Unconfined
profile) is refused with the field named; host namespaces, host paths, sysctls, SELinux and
AppArmor options are not fields at all, so a manifest naming them is refused as unknown.

Local disk (`head.ephemeralStorage`, `workers.ephemeralStorage`): what a pod writes under /tmp.
A worker builds each checkpoint in a local folder before `ray.train.report` copies it to storage
(recipe.py, scratch.py): its DeepSpeed state (weights and optimizer moments, its ZeRO partition)
and, on rank 0, the exported Hugging Face model. A worker killed mid-report leaves its folder
until the next checkpoint on that host sweeps it, so two folders can exist at once. The head's
driver stages the exported model locally to score the test split (persist.py). Ray itself keeps
its session directory in /tmp/ray: logs, and objects spilled from the object store.

The model's size is not known when the operator renders the RayJob (a hub name or a pkg:// path
is read only inside the cluster), so the default is derived from the pod's memory, which does
bound it on the paths the spec can see: the state a worker checkpoints is held in that memory
when it trains on CPUs or offloads to them, the head loads the exported model into its memory to
score it, and Ray's object store (what may spill) is a fraction of it. Default: twice the pod's
memory (one checkpoint in flight, one left by a killed worker) plus 2Gi for Ray's logs, at least
10Gi; the head's 4Gi default gives 10Gi. GPU workers hold the optimizer state in GPU memory, which
the spec does not know: set `workers.ephemeralStorage` to about 16 bytes per trained parameter
per pod (full fine-tuning of a 7B model on one pod: ~112Gi).

It is a request, never a limit: the scheduler places the pod on a node with that much local disk
free, and the kubelet, when a node runs short, evicts pods by how far they exceed their request.
A low estimate costs margin, never a run; a limit would kill a run that outgrew a guess (an
admin who wants one sets it with a LimitRange).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from .base import SpecModel
from .limits import INT32_MAX

# The trainer image's user (Dockerfile, trainer stage: `USER 1000:100`, the `ray` user of
# rayproject/ray). runAsNonRoot needs a numeric uid it can check without reading /etc/passwd.
TRAINER_UID = 1000
TRAINER_GID = 100
# The only capability `restricted` lets a container add back after dropping ALL.
ALLOWED_CAPABILITIES = ("NET_BIND_SERVICE",)

GI = 2**30
RAY_SESSION_BYTES = 2 * GI  # /tmp/ray: Ray's logs and session files on every pod
MIN_EPHEMERAL_BYTES = 10 * GI
SUBMITTER_EPHEMERAL = "512Mi"  # KubeRay's submitter writes nothing but its (kubelet-rotated) log

_RESTRICTED = "the Pod Security Standard `restricted` forbids it and namespaces enforcing it reject the pods"


def default_ephemeral_storage(memory_bytes: int | None) -> str:
    """The local-disk request of a pod with `memory_bytes` of memory (None: not set): twice the
    memory plus Ray's session directory, at least 10Gi, in whole Gi (see the module docstring)."""
    need = max(MIN_EPHEMERAL_BYTES, 2 * (memory_bytes or 0) + RAY_SESSION_BYTES)
    return f"{math.ceil(need / GI)}Gi"


class SeccompProfile(SpecModel):
    type: Literal["RuntimeDefault", "Localhost", "Unconfined"] = Field(
        description="RuntimeDefault (the container runtime's profile) or Localhost (a profile file on the node). Unconfined is refused.",
        json_schema_extra={"enum": ["RuntimeDefault", "Localhost"]},
    )
    localhost_profile: str | None = Field(
        default=None, min_length=1, description="Localhost: the profile's path, relative to the kubelet's seccomp directory.")

    @field_validator("type")
    @classmethod
    def _confined(cls, value: str) -> str:
        if value == "Unconfined":
            raise ValueError(f"Unconfined runs the Ray containers without a seccomp filter: {_RESTRICTED}; use RuntimeDefault (the default) or Localhost")
        return value

    @model_validator(mode="after")
    def _localhost(self) -> SeccompProfile:
        if (self.type == "Localhost") != (self.localhost_profile is not None):
            raise ValueError("localhostProfile goes with type Localhost, and only with it")
        return self


class PodSecurityContextSpec(SpecModel):
    """The pod securityContext of the head, worker and submitter pods. Unset fields keep the
    defaults: the trainer image's user 1000, group 100, fsGroup 100, seccomp RuntimeDefault."""

    run_as_user: int | None = Field(
        default=None, description="uid the containers run as. Default: 1000, the trainer image's user. 0 (root) is refused.",
        json_schema_extra={"minimum": 1}, le=INT32_MAX,
    )
    run_as_group: int | None = Field(default=None, ge=0, le=INT32_MAX, description="Primary gid of the container processes. Default: 100.")
    fs_group: int | None = Field(default=None, ge=0, le=INT32_MAX, description="Group that owns mounted volumes. Default: 100.")
    supplemental_groups: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] = Field(
        default_factory=list, description="Further gids of the container processes (e.g. to read a group-owned volume).")
    run_as_non_root: bool | None = Field(
        default=None, description="Always true (the kubelet refuses to start a container as uid 0); false is refused.",
        json_schema_extra={"enum": [True]},
    )
    seccomp_profile: SeccompProfile | None = Field(default=None, description="Seccomp profile of the pod. Default: RuntimeDefault.")

    @field_validator("run_as_user")
    @classmethod
    def _not_root(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"uid {value} is root (or invalid): {_RESTRICTED}; use a non-zero uid the image runs as (default {TRAINER_UID})")
        return value

    @field_validator("run_as_non_root")
    @classmethod
    def _non_root(cls, value: bool | None) -> bool | None:
        if value is False:
            raise ValueError(f"false would let the containers run as root: {_RESTRICTED}; remove it (it is always true)")
        return value


class Capabilities(SpecModel):
    add: list[str] = Field(default_factory=list, description="Capabilities added back after dropping ALL: only NET_BIND_SERVICE.",
                           json_schema_extra={"items": {"type": "string", "enum": list(ALLOWED_CAPABILITIES)}})
    drop: list[str] = Field(default_factory=list, description="Always ALL; listing it is allowed, anything without ALL is refused.")

    @field_validator("add")
    @classmethod
    def _allowed(cls, value: list[str]) -> list[str]:
        other = [c for c in value if c not in ALLOWED_CAPABILITIES]
        if other:
            raise ValueError(f"{', '.join(other)}: {_RESTRICTED}; only NET_BIND_SERVICE may be added")
        return value

    @field_validator("drop")
    @classmethod
    def _all(cls, value: list[str]) -> list[str]:
        if value and "ALL" not in value:
            raise ValueError(f"every capability is dropped (ALL); dropping fewer would keep the rest and {_RESTRICTED}")
        return value


class ContainerSecurityContextSpec(SpecModel):
    """Container securityContext of the Ray and submitter containers. Always rendered:
    allowPrivilegeEscalation false, capabilities drop ALL; the fields below may only confirm that
    or add NET_BIND_SERVICE."""

    allow_privilege_escalation: bool | None = Field(
        default=None, description="Always false (no setuid gains); true is refused.", json_schema_extra={"enum": [False]})
    privileged: bool | None = Field(default=None, description="Always false; true is refused.", json_schema_extra={"enum": [False]})
    capabilities: Capabilities | None = Field(default=None, description="Capabilities: drop ALL, add at most NET_BIND_SERVICE.")

    @field_validator("allow_privilege_escalation", "privileged")
    @classmethod
    def _false(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError(f"true gives the Ray containers (and the code the job runs) root's powers on the node's kernel: {_RESTRICTED}; remove it")
        return value
