"""`finetune operator`: kopf, standalone (one replica, no peering), with liveness and metrics.

    finetune operator --all-namespaces            every namespace (a ClusterRole)
    finetune operator --namespace a --namespace b  only these (a Role in each)

Liveness: kopf's own endpoint at http://0.0.0.0:<health-port>/healthz (it fails when kopf's
watches are stuck). Metrics: prometheus-client at :<metrics-port>/metrics (metrics.py).
The Kubernetes credentials: in-cluster service account, else $KUBECONFIG / ~/.kube/config.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import kopf
import kubernetes

from .handlers import Operator, OperatorConfig
from .kube import KubeApi
from .metrics import Metrics
from .progress import ConfigMapProgressSource
from .registration import QUIET_HANDLERS, register

LOG_FORMATS = {"plain": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}


def run(*, namespaces: Sequence[str] = (), health_port: int = 8080, metrics_port: int | None = 9090,
        log_format: str = "plain", verbose: bool = False, config: OperatorConfig | None = None) -> None:
    """Run until SIGINT/SIGTERM. No namespaces: the whole cluster."""
    json_logs = log_format == "json"
    # plain: "[time] logger [LEVEL] [namespace/name] message"; json: the object as a field
    kopf.configure(verbose=verbose, log_format=LOG_FORMATS[log_format], log_prefix=not json_logs,
                   log_refkey="object" if json_logs else None)
    logging.getLogger("kopf.objects").addFilter(_quiet_watchers)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # a line per liveness probe is noise
    _load_kube_config()
    kube = KubeApi()
    metrics = Metrics()
    operator = Operator(kube=kube, progress=ConfigMapProgressSource(kube.configmap_data), metrics=metrics, config=config or OperatorConfig())
    registry = kopf.OperatorRegistry()
    register(operator, registry)
    if metrics_port:
        metrics.serve(metrics_port)
    logging.getLogger(__name__).info(
        "finetune operator: %s; health :%d/healthz; metrics %s", ", ".join(namespaces) or "all namespaces", health_port,
        f":{metrics_port}/metrics" if metrics_port else "off")
    kopf.run(registry=registry, standalone=True, clusterwide=not namespaces, namespaces=list(namespaces),
             liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz", settings=_settings(namespaces))


def _settings(namespaces: Sequence[str]) -> kopf.OperatorSettings:
    """With exact namespace names, kopf would still list and watch every Namespace of the cluster
    (to match its patterns against them; kopf/_core/reactor/observation.py: the scan runs unless
    `settings.scanning.disabled`), which the chart grants no right to: a warning at start-up, a
    failed call, and a cluster-wide watch. Our namespaces are names, never patterns, so scanning
    is off then; kopf serves exactly those (and the CRDs found at start-up: the chart installs
    them before the operator). All namespaces: kopf's defaults."""
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = bool(namespaces)
    return settings


def _quiet_watchers(record: logging.LogRecord) -> bool:
    """Drop kopf's "Handler 'x' succeeded." for the watch-event handlers: they run on every change
    of every object, and what they do is logged where it matters (status transitions)."""
    return not any(f"Handler '{handler}' succeeded" in str(record.msg) for handler in QUIET_HANDLERS)


def _load_kube_config() -> None:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
