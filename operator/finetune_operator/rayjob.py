"""FineTuneJob -> one KubeRay `ray.io/v1` RayJob: a pure builder (no client, clock or env vars).

How the job reaches the trainer: the FineTuneJob (apiVersion, kind, metadata name/namespace and
the spec as the user wrote it) travels as JSON in the RayJob's `runtimeEnvYAML` env_vars
(FINETUNE_MANIFEST), and the entrypoint is `python -m finetune_trainer run env:FINETUNE_MANIFEST`.
No ConfigMap or volume to create, own and clean up; the RayJob alone is the whole run, and the
driver validates exactly what the operator validated.

Names are deterministic, so the operator can record them in status before the objects exist:
RayJob `<job>-ray` (KubeRay caps RayJob names at 47 characters, DNS-1035) and its head Service
`<rayjob>-head-svc`, pinned through `headGroupSpec.headService.metadata.name` because KubeRay
otherwise names it after the RayCluster, whose name carries a random suffix. The dashboard is
then `http://<rayjob>-head-svc.<namespace>.svc:8265`, and an optional Ingress (ingress.py) can
point at that Service before the cluster exists.

Credentials: S3 keys reach the head and worker containers only as `valueFrom.secretKeyRef` env;
no secret value is ever copied into the RayJob.

Ray's control plane: `spec.cluster.auth: token` (the default) renders `rayClusterSpec.authOptions:
{mode: token}`. KubeRay (>= 1.5.1) then creates a Secret named after the RayCluster
(`status.rayClusterName`, key `auth_token`) and sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (a
secretKeyRef to it) on every Ray container, the wait-gcs-ready init container and the K8sJobMode
submitter; the dashboard, job API and GCS then refuse calls without the token (Ray >= 2.52).
Every pod passes the Pod Security Standards `restricted` profile (pods.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from finetune_trainer.spec import FineTuneJob
from finetune_trainer.spec.cluster import MANIFEST_ENV, RUN_ID_ENV, ClusterSpec, HeadGroupSpec, WorkerGroupSpec

from .children import labels, owner_reference, rayjob_name
from .crd import GROUP, KIND, VERSION
from .pods import graceful_stop, harden, submitter_template
from .trainer_access import head_token, pods_service_account

STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"  # driver.STATE_TRACKING_ENV (the operator imports no Ray)
HEAD_SERVICE_SUFFIX = "-head-svc"
DASHBOARD_PORT = 8265
METRICS_PORT = 8080  # Ray's Prometheus endpoint on every Ray pod (KubeRay's default metrics-export-port)
WORKER_GROUP = "workers"
# The FineTuneJob generation a RayJob was rendered from: a verdict on that run (the trainer's
# preflight) belongs to that generation, not to a newer spec the user has written since.
GENERATION_ANNOTATION = f"{GROUP}/generation"
HEAD_PORTS = [  # KubeRay's default port names: its head Service exposes what the container declares
    {"name": "gcs-server", "containerPort": 6379},
    {"name": "dashboard", "containerPort": DASHBOARD_PORT},
    {"name": "client", "containerPort": 10001},
    {"name": "metrics", "containerPort": METRICS_PORT},
]
# K8sJobMode (KubeRay's default, stated here so it cannot change under us): a Kubernetes Job
# submits the entrypoint once the cluster is ready and follows its logs, so `kubectl logs
# job/<rayjob>` shows the trainer's output and submission retries are Kubernetes' business.
SUBMISSION_MODE = "K8sJobMode"
ENTRYPOINT = f"python -m finetune_trainer run env:{MANIFEST_ENV} --no-progress"


def head_service_name(job_name: str) -> str:
    return f"{rayjob_name(job_name)}{HEAD_SERVICE_SUFFIX}"


def dashboard_url(job: FineTuneJob) -> str:
    """The Ray dashboard of the job's cluster, as reachable inside the Kubernetes cluster."""
    return f"http://{head_service_name(job.name)}.{job.metadata.namespace}.svc:{DASHBOARD_PORT}"


def driver_manifest(job: FineTuneJob) -> dict[str, Any]:
    """The FineTuneJob the driver runs: the spec exactly as written (unset fields stay unset, so
    rules that depend on presence judge it as the operator did), without status."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": job.name, "namespace": job.metadata.namespace},
        "spec": job.spec.model_dump(by_alias=True, mode="json", exclude_unset=True),
    }


def render_rayjob(
    job: FineTuneJob, *, owner_uid: str | None = None, generation: int | None = None,
    storage_env: Sequence[dict[str, Any]] = (), run_id: str | None = None, queue: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The RayJob for `job`. `owner_uid` (the FineTuneJob's uid) makes the FineTuneJob its
    controller, so deleting the job deletes the run; `generation` (the FineTuneJob's) is recorded
    in an annotation; `storage_env` is extra container env for S3-compatible storage (endpoint,
    region, bucket), plain values or secretKeyRefs; `run_id` (children.run_id_for) is the run the
    driver writes, the same for every attempt, which spec.storage.resume `auto` continues; `queue`
    (spec.queueing.queue_labels of the FineTuneJob's labels) puts the RayJob in a Kueue LocalQueue:
    labelled, and created suspended for Kueue to start (kueue.py)."""
    spec, cluster, policy = job.spec, job.spec.cluster, job.spec.run_policy
    name = rayjob_name(job.name)
    meta: dict[str, Any] = {"name": name, "namespace": job.metadata.namespace, "labels": labels(job) | dict(queue or {})}
    if owner_uid:
        meta["ownerReferences"] = [owner_reference(job, owner_uid)]
    if generation is not None:
        meta["annotations"] = {GENERATION_ANNOTATION: str(generation)}
    env = _env(cluster, storage_env)
    head, group = cluster.head, cluster.workers
    res = spec.resources
    replicas = group.resolved_replicas(spec.ray_workers_at_once())
    worker_cpus = group.resolved_cpus(res.cpus_per_worker)
    worker_gpus = group.resolved_gpus(res.gpus_per_worker)
    head_params = {"dashboard-host": "0.0.0.0", "num-cpus": str(math.floor(head.cpus))}
    if head.gpus:
        head_params["num-gpus"] = str(head.gpus)
    worker_params = {"num-cpus": str(math.floor(worker_cpus))}
    if worker_gpus:
        worker_params["num-gpus"] = str(worker_gpus)
    rayjob_spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "runtimeEnvYAML": _runtime_env_yaml(job, run_id),
        "submissionMode": SUBMISSION_MODE,
        "metadata": submission_metadata(job, run_id),  # the Ray job's metadata: the dashboard's Jobs view names the FineTuneJob
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": policy.ttl_seconds_after_finished,
        "backoffLimit": policy.backoff_limit,
        "suspend": policy.suspend or bool(queue),  # Kueue's integration: created suspended, Kueue unsuspends
        "rayClusterSpec": {
            "rayVersion": cluster.ray_version,
            "headGroupSpec": {
                "rayStartParams": head_params,
                "headService": {"metadata": {"name": head_service_name(job.name)}},
                "template": graceful_stop(harden(_pod(job, "ray-head", head, env, _resources(cluster, head.cpus, head.memory, head.gpus),
                                                      HEAD_PORTS, api_token=True), cluster, head), policy),
            },
            "workerGroupSpecs": [{
                "groupName": WORKER_GROUP,
                "replicas": replicas,
                "minReplicas": replicas if group.min_replicas is None else group.min_replicas,
                "maxReplicas": replicas if group.max_replicas is None else group.max_replicas,
                "rayStartParams": worker_params,
                "template": graceful_stop(harden(_pod(job, "ray-worker", group, env, _resources(cluster, worker_cpus, group.memory, worker_gpus), []),
                                                 cluster, group), policy),
            }],
        },
    }
    if cluster.auth == "token":  # KubeRay >= 1.5.1 creates the token Secret and sets RAY_AUTH_* on every Ray container
        rayjob_spec["rayClusterSpec"]["authOptions"] = {"mode": "token"}
    rayjob_spec["submitterPodTemplate"] = submitter_template(job, labels(job))
    if policy.active_deadline_seconds is not None:
        rayjob_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": rayjob_spec}


def submission_metadata(job: FineTuneJob, run_id: str | None) -> dict[str, str]:
    """FineTuneJob.ray_job_metadata, plus the run: what `ray job submit --metadata-json` gives the
    Ray job (`job_name`, Ray's JOB_NAME_METADATA_KEY, is the Name the dashboard's Jobs view shows)."""
    return job.ray_job_metadata() | (
        {"finetune.dev/run": run_id} if run_id else {})


def _runtime_env_yaml(job: FineTuneJob, run_id: str | None) -> str:
    # KubeRay's submitter passes the runtime env to `ray job submit --runtime-env-json` inside a
    # bash command line, double-quoted (Go's strconv.Quote): `$` and backticks would expand there.
    # As JSON escapes they cannot, and the JSON parser at the other end restores them.
    manifest = json.dumps(driver_manifest(job), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    manifest = manifest.replace("$", "\\u0024").replace("`", "\\u0060")
    # Ray Train's state tracking: the run, its attempts and workers in the dashboard's Train runs API (driver.py)
    env = {MANIFEST_ENV: manifest, STATE_TRACKING_ENV: "1"} | ({RUN_ID_ENV: run_id} if run_id else {})
    return yaml.safe_dump({"env_vars": env}, width=1 << 20)


def _env(cluster: ClusterSpec, storage_env: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [e.as_container_env() for e in cluster.env]
    env += [dict(e) for e in storage_env]
    secret = cluster.s3_credentials_secret
    if secret is not None:
        keys = [("AWS_ACCESS_KEY_ID", secret.access_key_id_key), ("AWS_SECRET_ACCESS_KEY", secret.secret_access_key_key)]
        if secret.session_token_key:
            keys.append(("AWS_SESSION_TOKEN", secret.session_token_key))
        env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}} for var, key in keys]
    return env


def _cpu(cpus: float) -> str:
    """A CPU quantity: whole CPUs as `2`, fractions in millicores (`1500m`)."""
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def _resources(cluster: ClusterSpec, cpus: float, memory: str | None, gpus: int) -> dict[str, Any]:
    # requests = limits: Ray sizes itself from the container, and guaranteed QoS keeps the
    # training pods from being the first evicted
    quantities = {"cpu": _cpu(cpus)}
    if memory:
        quantities["memory"] = memory
    if gpus:
        quantities[cluster.gpu_resource] = str(gpus)
    return {"requests": quantities, "limits": dict(quantities)}


def _pod(job: FineTuneJob, container: str, group: HeadGroupSpec | WorkerGroupSpec, env: list[dict[str, Any]], resources: dict[str, Any],
         ports: list[dict[str, Any]], *, api_token: bool = False) -> dict[str, Any]:
    cluster = job.spec.cluster
    main: dict[str, Any] = {"name": container, "image": cluster.image, "resources": resources}
    if cluster.image_pull_policy:
        main["imagePullPolicy"] = cluster.image_pull_policy
    if ports:
        main["ports"] = [dict(p) for p in ports]
    pod: dict[str, Any] = {"serviceAccountName": pods_service_account(job), "containers": [main]}
    if api_token:  # the driver's way to report progress (trainer_access); no other container gets a token
        volume, mount, progress_env = head_token(job)
        env = [*env, progress_env]
        main["volumeMounts"], pod["volumes"] = [mount], [volume]
    if env:
        main["env"] = [dict(e) for e in env]
    if cluster.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in cluster.image_pull_secrets]
    if group.node_selector:
        pod["nodeSelector"] = dict(group.node_selector)
    if group.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in group.tolerations]
    if group.priority_class_name:
        pod["priorityClassName"] = group.priority_class_name
    return {"metadata": {"labels": labels(job)}, "spec": pod}


def ray_auth_enabled(rayjob: Mapping[str, Any] | None) -> bool:
    """Whether a RayJob's Ray cluster requires Ray's token (authOptions mode token)."""
    spec = ((rayjob or {}).get("spec") or {}).get("rayClusterSpec") or {}
    return (spec.get("authOptions") or {}).get("mode") == "token"


def rendered_generation(rayjob: Mapping[str, Any] | None) -> int | None:
    """The generation `render_rayjob` recorded on a RayJob (None: not recorded, or not a number)."""
    value = (((rayjob or {}).get("metadata") or {}).get("annotations") or {}).get(GENERATION_ANNOTATION)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
