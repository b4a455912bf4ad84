"""Where a FineTuneJob runs on Kubernetes: the Ray cluster KubeRay starts for it (`spec.cluster`)
and how long and how often it may run (`spec.runPolicy`).

Local runs (`finetune run`) ignore both sections; the operator renders them into a RayJob. The
worker group's size defaults from `spec.resources` (one pod per Ray Train worker, sized to it),
so a manifest without a cluster section fits by construction and the examples run unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from itertools import pairwise
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.json_schema import JsonDict

from .base import SpecModel
from .limits import INT32_MAX
from .network import NetworkSpec
from .pod_security import ContainerSecurityContextSpec, PodSecurityContextSpec
from .progress import STATUS_FILE

Problems = Iterator[tuple[str, str]]

TRAINER_VERSION = "0.1.0"  # the distribution's version: the trainer image is tagged with it
DEFAULT_IMAGE = f"ghcr.io/finetune-dev/finetune-trainer:{TRAINER_VERSION}"
RAY_VERSION = "2.60.0"  # the ray[...] pin of the trainer extra in pyproject.toml

# A Kubernetes quantity as memory is written: plain bytes or a decimal/binary suffix (8Gi, 512M).
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
_QUANTITY = re.compile(QUANTITY_PATTERN)
_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
MAX_WORKER_PODS = 4096  # replicas, min/max: KubeRay's are int32; a RayCluster this size is already an outlier
MAX_POD_CPUS = 1024  # head.cpus, workers.cpus (the largest machines have a few hundred)
MAX_POD_GPUS = 16  # head.gpus, workers.gpus (a node holds 8, rarely 16)
MANIFEST_ENV = "FINETUNE_MANIFEST"  # the FineTuneJob, as JSON, for the driver (`run env:FINETUNE_MANIFEST`)
# the run every attempt of one FineTuneJob generation shares (`finetune run --run-id`'s default):
# what spec.storage.resume `auto` continues (rayjob.run_id_for)
RUN_ID_ENV = "FINETUNE_RUN_ID"
# the ConfigMap the driver writes status.json into, through the job's own ServiceAccount (kube_progress)
PROGRESS_CONFIGMAP_ENV = "FINETUNE_PROGRESS_CONFIGMAP"
PROGRESS_KEY = STATUS_FILE  # the ConfigMap key it writes and the operator reads: the progress document
RAY_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # KubeRay sets the first two (authOptions); the path would only blur which token Ray uses
DRAIN_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"  # from runPolicy.terminationGracePeriodSeconds (operator pods.graceful_stop)
RESERVED_ENV = (MANIFEST_ENV, RUN_ID_ENV, PROGRESS_CONFIGMAP_ENV, DRAIN_ENV, *RAY_AUTH_ENV)
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"  # what the API server accepts for container env names
# words of a variable name (split at _ - .) that say it holds a credential; TOKENIZERS_PARALLELISM does not
_CREDENTIAL_WORDS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "APIKEY"}
_CREDENTIAL_PAIRS = {("API", "KEY"), ("ACCESS", "KEY"), ("PRIVATE", "KEY"), ("SECRET", "KEY"), ("SECURITY", "TOKEN")}


RAY_AUTH_MIN_VERSION = (2, 52, 0)  # Ray's token authentication (RAY_AUTH_MODE=token) first shipped in 2.52.0


def _version(text: str) -> tuple[int, ...]:
    """`2.60.0` -> (2, 60, 0); the numeric prefix of each part (`2.53.0rc1` -> (2, 53, 0))."""
    parts = []
    for part in text.split(".")[:3]:
        digits = re.match(r"\d*", part)  # `\d*` matches every string, if only the empty prefix
        parts.append(int(digits.group() or 0) if digits else 0)
    return tuple(parts)


def memory_bytes(quantity: str) -> int:
    """`8Gi` -> 8589934592; the value has already passed QUANTITY_PATTERN."""
    match = _QUANTITY.match(quantity)
    assert match, quantity
    return int(float(quantity[: len(quantity) - len(match.group(2) or "")]) * _SUFFIX[match.group(2) or ""])


def _memory(value: str | None) -> str | None:
    if value is not None and not _QUANTITY.match(value):
        raise ValueError("not a Kubernetes memory quantity: write e.g. 8Gi, 512Mi or 2G")
    return value


_MEMORY_SCHEMA: JsonDict = {"pattern": QUANTITY_PATTERN}


class Toleration(SpecModel):
    """A pod toleration, as in core/v1 (to run on tainted, e.g. GPU, nodes)."""

    key: str | None = Field(default=None, description="Taint key; empty with operator Exists matches every taint.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Default: Equal.")
    value: str | None = Field(default=None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(default=None, ge=0, le=INT32_MAX, description="NoExecute: how long the pod stays after the taint appears.")


class SecretKeySelector(SpecModel):
    """A key of a Secret in the job's namespace (core/v1 SecretKeySelector)."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    key: str = Field(min_length=1, max_length=253, description="Key in the Secret.")


class EnvVarSource(SpecModel):
    secret_key_ref: SecretKeySelector = Field(description="The value from a key of a Secret in the job's namespace.")


class EnvVar(SpecModel):
    name: str = Field(min_length=1, pattern=_ENV_NAME, description="Variable name.")
    value: str = Field(default="", description="Literal value. Credentials (tokens, keys, passwords) are refused here: use valueFrom.")
    value_from: EnvVarSource | None = Field(
        default=None, description="The value from a Secret (secretKeyRef): it reaches the pods as a reference, never copied into the RayJob.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if self.value and self.value_from is not None:
            raise ValueError("give value or valueFrom, not both")
        return self

    def as_container_env(self) -> dict[str, Any]:
        if self.value_from is not None:
            ref = self.value_from.secret_key_ref
            return {"name": self.name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        return {"name": self.name, "value": self.value}


def credential_name(name: str) -> bool:
    """An environment variable whose value is a credential, by the names tools read them from
    (AWS_SECRET_ACCESS_KEY, HF_TOKEN, WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD, ...)."""
    words = re.split(r"[-_.]", name.upper())
    return bool(_CREDENTIAL_WORDS.intersection(words)) or bool(_CREDENTIAL_PAIRS.intersection(pairwise(words)))


class S3CredentialsSecret(SpecModel):
    """A Secret in the job's namespace; its values reach the pods as secretKeyRef env, never copied."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    access_key_id_key: str = Field(default="AWS_ACCESS_KEY_ID", min_length=1, description="Key holding the access key id.")
    secret_access_key_key: str = Field(
        default="AWS_SECRET_ACCESS_KEY", min_length=1, description="Key holding the secret access key."
    )
    session_token_key: str | None = Field(default=None, description="Key holding a session token (temporary credentials).")


class _GroupSpec(SpecModel):
    """What the head and the worker pods share: where they may be scheduled."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Pod tolerations.")
    priority_class_name: str | None = Field(default=None, description="Pod priorityClassName.")
    ephemeral_storage: str | None = Field(
        default=None, description="Local disk the pod requests (ephemeral-storage; a request, no limit) for Ray's logs and the "
        "checkpoint each worker builds in /tmp before uploading it. Default: twice the pod's memory plus 2Gi, at least 10Gi; "
        "GPU workers: set about 16 bytes per trained parameter per pod.", json_schema_extra=_MEMORY_SCHEMA)

    @field_validator("ephemeral_storage")
    @classmethod
    def _disk(cls, value: str | None) -> str | None:
        if value is not None and memory_bytes(_memory(value) or "0") < 2**30:
            raise ValueError("under 1Gi: Ray's own logs and session files need more; write e.g. 20Gi")
        return value


class HeadGroupSpec(_GroupSpec):
    cpus: float = Field(default=1, ge=1, le=MAX_POD_CPUS,
                        description="CPUs of the head pod (requests = limits); Ray sees the whole part, so at least 1.")
    memory: str = Field(default="4Gi", description="Memory of the head pod (requests = limits): Ray's GCS, dashboard and the driver.", json_schema_extra=_MEMORY_SCHEMA)
    gpus: int = Field(default=0, ge=0, le=MAX_POD_GPUS, description="GPUs of the head pod; the head runs the driver, not the training.")

    @field_validator("memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        return _memory(value)


class WorkerGroupSpec(_GroupSpec):
    replicas: int | None = Field(
        default=None, ge=0, le=MAX_WORKER_PODS, description="Worker pods KubeRay starts. Default: one per Ray Train worker running at once (resources.workers, times search.maxConcurrentTrials)."
    )
    min_replicas: int | None = Field(default=None, ge=0, le=MAX_WORKER_PODS, description="Lower bound for replicas. Default: replicas.")
    max_replicas: int | None = Field(default=None, ge=0, le=MAX_WORKER_PODS, description="Upper bound for replicas. Default: replicas.")
    cpus: float | None = Field(
        default=None, ge=1, le=MAX_POD_CPUS,
        description="CPUs of each worker pod (requests = limits); Ray sees the whole part, so at least 1. Default: resources.cpusPerWorker, rounded up."
    )
    memory: str | None = Field(
        default=None, description="Memory of each worker pod (requests = limits), e.g. 16Gi. Default: none requested.",
        json_schema_extra=_MEMORY_SCHEMA,
    )
    gpus: int | None = Field(default=None, ge=0, le=MAX_POD_GPUS, description="GPUs of each worker pod. Default: resources.gpusPerWorker.")

    @field_validator("memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        return _memory(value)

    def resolved_replicas(self, workers: int) -> int:
        return workers if self.replicas is None else self.replicas

    def resolved_cpus(self, cpus_per_worker: float) -> float:
        # Ray counts whole CPUs: a 0.5-CPU worker still needs a pod Ray sees 1 CPU in
        return max(1, math.ceil(cpus_per_worker)) if self.cpus is None else self.cpus

    def resolved_gpus(self, gpus_per_worker: float) -> int:
        return math.ceil(gpus_per_worker) if self.gpus is None else self.gpus


# RFC 1123 subdomain, as the API server checks an Ingress rule's host (no wildcard: it must be one
# address status.dashboardURL can name)
DNS_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS_NAME = re.compile(DNS_NAME_PATTERN)
_IPV4 = re.compile(r"^[0-9]+(\.[0-9]+){3}$")
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # a namespace name (RFC 1123 label)
_DNS_LABEL = re.compile(DNS_LABEL_PATTERN)


class DashboardIngress(SpecModel):
    """An Ingress per job for its Ray dashboard, so status.dashboardURL opens in a browser without
    a port-forward. The operator creates it next to the RayJob, owned by the FineTuneJob (deleted
    with it); an Ingress controller must already run in the cluster. The dashboard can run code on
    the cluster: it is served over TLS only (tlsSecretName is required), and an authenticating proxy
    belongs in front of it (annotations, e.g. nginx's auth-url to an oauth2-proxy)."""

    host: str = Field(
        min_length=1, max_length=253, description="DNS name the dashboard is served at, e.g. ray-myjob.example.com (no wildcard, no IP address).",
        json_schema_extra={"pattern": DNS_NAME_PATTERN},
    )
    class_name: str | None = Field(
        default=None, min_length=1, max_length=253, description="IngressClass (spec.ingressClassName). Default: the cluster's default IngressClass."
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations of the Ingress: the controller's settings, e.g. authentication or TLS issuance (cert-manager)."
    )
    path: str = Field(
        default="/", min_length=1, max_length=1024, pattern=r"^/\S*$",
        description="Path prefix (pathType Prefix). A path other than / needs the controller to strip it before the dashboard (e.g. a rewrite-target annotation).",
    )
    tls_secret_name: str = Field(
        min_length=1, max_length=253,
        description="Secret (kubernetes.io/tls) with the certificate for host, e.g. issued by cert-manager; the dashboard URL is https. "
                    "Required: over plain HTTP the Ray token and the job's control would cross the network readable.",
    )
    controller_namespace: str | None = Field(
        default=None, min_length=1, max_length=63, json_schema_extra={"pattern": DNS_LABEL_PATTERN},
        description="Namespace of the Ingress controller's pods: the job's NetworkPolicy admits them to the dashboard "
                    "port (8265) only. Default: the operator's (chart value networkPolicy.ingressControllerNamespace).",
    )

    @field_validator("controller_namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and not _DNS_LABEL.match(value):
            raise ValueError("not a namespace name: lowercase letters, digits and '-', e.g. ingress-nginx")
        return value

    @model_validator(mode="before")
    @classmethod
    def _tls_given(cls, data: Any) -> Any:
        # a missing tlsSecretName reaches its own check (the fix in the message), not pydantic's bare "missing"
        if isinstance(data, dict) and "tlsSecretName" not in data and "tls_secret_name" not in data:
            return {**data, "tlsSecretName": None}
        return data

    @field_validator("tls_secret_name", mode="before")
    @classmethod
    def _tls_required(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("required: the dashboard is served over TLS only; create a kubernetes.io/tls Secret for "
                             "host in the job's namespace (kubectl create secret tls, or a cert-manager Certificate) "
                             "and name it here")
        return value

    @field_validator("host")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        # the message the API server would give only after the operator tried to create the Ingress
        if not _DNS_NAME.match(value) or _IPV4.match(value):
            raise ValueError("not a DNS name: lowercase letters, digits, '-' and '.', e.g. ray-myjob.example.com")
        return value


class DashboardSpec(SpecModel):
    """How people reach the Ray dashboard. Without an Ingress it is the head Service's in-cluster
    address (kubectl port-forward)."""

    ingress: DashboardIngress | None = Field(default=None, description="Expose the dashboard through an Ingress for this job.")


class ClusterSpec(SpecModel):
    image: str = Field(default=DEFAULT_IMAGE, min_length=1, description="Trainer image for the head and the workers (Ray, torch, DeepSpeed, this trainer).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Default: the Kubernetes default for the image's tag."
    )
    image_pull_secrets: list[str] = Field(default_factory=list, description="Names of Secrets to pull the image with.")
    ray_version: str = Field(default=RAY_VERSION, min_length=1, description="Ray version in the image (KubeRay's rayVersion).")
    head: HeadGroupSpec = Field(default_factory=HeadGroupSpec, description="The Ray head pod: GCS, dashboard and the job's driver.")
    workers: WorkerGroupSpec = Field(default_factory=WorkerGroupSpec, description="The worker pods where Ray Train workers run.")
    gpu_resource: str = Field(default="nvidia.com/gpu", min_length=1, description="Extended resource name of a GPU.")
    service_account_name: str | None = Field(default=None, description="Service account of the head and worker pods.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment of the head and worker containers.")
    s3_credentials_secret: S3CredentialsSecret | None = Field(
        default=None, description="Secret with S3 credentials, passed to the pods as env from the Secret."
    )
    dashboard: DashboardSpec = Field(default_factory=DashboardSpec, description="How the Ray dashboard is reached: optionally an Ingress per job.")
    network: NetworkSpec = Field(
        default_factory=NetworkSpec, description="The job's NetworkPolicy: where the Ray pods may connect to (who may connect to them is fixed).")
    auth: Literal["token", "disabled"] = Field(
        default="token", description="Ray's token authentication (KubeRay authOptions): token makes the dashboard, job API and GCS "
        "require the token KubeRay keeps in a Secret named after the RayCluster; disabled lets anyone who reaches the head's ports "
        "submit jobs and run code, and the FineTuneJob carries a RayAuthDisabled condition.")
    pod_security_context: PodSecurityContextSpec = Field(
        default_factory=PodSecurityContextSpec, description="Pod securityContext of the Ray and submitter pods, within the restricted Pod Security Standard.")
    container_security_context: ContainerSecurityContextSpec = Field(
        default_factory=ContainerSecurityContextSpec, description="Container securityContext of the Ray and submitter containers, within the restricted Pod Security Standard.")

    def check(self, workers: int, cpus_per_worker: float, gpus_per_worker: float, memory_hungry: str | None) -> Problems:
        """Can the worker group hold one trial's Ray Train workers? Paths are under spec.cluster.

        `memory_hungry` names the DeepSpeed setting that keeps model state in CPU memory, if any.
        """
        group = self.workers
        replicas = group.resolved_replicas(workers)
        lower = replicas if group.min_replicas is None else group.min_replicas
        upper = replicas if group.max_replicas is None else group.max_replicas
        if lower > upper:
            yield "workers.minReplicas", f"larger than maxReplicas ({upper})"
        elif not lower <= replicas <= upper:
            yield "workers.replicas", f"must lie between minReplicas ({lower}) and maxReplicas ({upper})"
        gpus = group.resolved_gpus(gpus_per_worker)
        if gpus_per_worker > 0 and gpus == 0:
            yield "workers.gpus", f"resources.gpusPerWorker is {gpus_per_worker:g} but the worker pods have no GPUs; set workers.gpus (or leave it out)"
        elif gpus_per_worker > 0 and replicas == 0:
            yield "workers.replicas", "resources.gpusPerWorker asks for GPUs but the worker group has no pods; set workers.replicas"
        else:
            # Ray counts whole CPUs (num-cpus); each pod holds as many workers as its CPUs and GPUs allow
            per_pod = math.floor(math.floor(group.resolved_cpus(cpus_per_worker)) / cpus_per_worker)
            if gpus_per_worker > 0:
                per_pod = min(per_pod, math.floor(gpus / gpus_per_worker))
            if per_pod * replicas < workers:
                need = f"{cpus_per_worker:g} CPU" + (f" + {gpus_per_worker:g} GPU" if gpus_per_worker else "")
                yield "workers", (
                    f"{replicas} pod(s) of {group.resolved_cpus(cpus_per_worker):g} CPU(s)"
                    + (f" and {gpus} GPU(s)" if gpus_per_worker else "")
                    + f" hold {per_pod * replicas} Ray Train worker(s) of {need}, but resources.workers is {workers}: "
                    "raise workers.replicas, workers.cpus or workers.gpus"
                )
        names = [e.name for e in self.env]
        reserved = set(RESERVED_ENV) | (set(S3_ENV) if self.s3_credentials_secret else set())
        for i, var in enumerate(self.env):
            name = var.name
            if name in reserved:
                yield f"env[{i}].name", f"{name} is set by the operator" + (" from s3CredentialsSecret" if name in S3_ENV else "")
            elif name in names[:i]:
                yield f"env[{i}].name", f"{name} is already set by env[{names.index(name)}]"
            elif var.value and credential_name(name):
                # whether or not a Secret is set: a literal lands in the RayJob, `kubectl get -o yaml` and Git
                yield f"env[{i}].value", (f"{name} holds a credential: a literal value would be stored in the "
                                          "RayJob and in Git; use valueFrom.secretKeyRef {name, key} of a Secret")
        if self.auth == "token" and _version(self.ray_version) < RAY_AUTH_MIN_VERSION:
            yield "auth", (f"token authentication needs Ray {'.'.join(map(str, RAY_AUTH_MIN_VERSION))} or newer in the image, "
                           f"rayVersion is {self.ray_version}: use a newer image (and rayVersion), or auth: disabled")
        if memory_hungry and group.memory is None:
            yield "workers.memory", (
                f"with {memory_hungry} DeepSpeed holds model state in CPU memory: request it with workers.memory "
                "(e.g. 16Gi), so the pods land where it fits and are not OOM-killed"
            )


class RunPolicySpec(SpecModel):
    suspend: bool = Field(default=False, description="Create the RayJob suspended: no pods until this turns false.")
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, le=INT32_MAX, description="Fail the run when it has taken longer than this (cluster start included)."
    )
    backoff_limit: int = Field(default=0, ge=0, le=100, description="Retries of a failed run, each on a new Ray cluster.")
    worker_restarts: int = Field(
        default=3, ge=0, le=100,
        description="Restarts of the Ray Train worker group inside one run (a worker process or node lost), each "
                    "from the run's latest complete checkpoint; then the run fails. Also bounds failures of Train's "
                    "controller, e.g. storage that stopped answering.",
    )
    ttl_seconds_after_finished: int = Field(
        default=300, ge=0, le=INT32_MAX, description="Seconds the Ray cluster (and dashboard) stays after the run ends, for logs."
    )
    termination_grace_period_seconds: int = Field(
        default=30, ge=0, le=86400,
        description="The Ray pods' terminationGracePeriodSeconds: on SIGTERM (preemption, a drained node, a deleted pod) "
                    "the workers write a checkpoint of the step they are at if the last evaluation + checkpoint took "
                    "less than the time left, and resume from it; else they write none. A local `finetune run` "
                    "gives itself the same time on SIGTERM. The save must end some seconds before the pod is "
                    "killed: docs/storage.md, SIGTERM.",
    )

    def save_window(self) -> int:
        """Seconds of the grace period a save on SIGTERM may use: what is left after Ray's own
        teardown (up to 10 s, a third of short periods). Also the Ray node's drain timeout
        (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S: `ray start --block` drains its node that long
        on SIGTERM, then stops its processes); 0 turns draining off."""
        grace = self.termination_grace_period_seconds
        return grace - min(10, grace // 3)
