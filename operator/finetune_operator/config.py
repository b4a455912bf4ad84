"""The operator's settings (its command line and the chart's values): a module of its own so that
the handlers and the get-or-create helpers (job_children.py) read them without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from .networkpolicy import DEFAULT_KUBERAY_NAMESPACE


@dataclass(frozen=True)
class OperatorConfig:
    progress_interval: float = 30.0  # seconds between status.json reads while a job runs
    conflict_retry_delay: float = 30.0  # a RayJob of that name that is not ours (e.g. still being deleted)
    network_policies: bool = True  # a NetworkPolicy per job (off: the cluster's CNI enforces none)
    kuberay_namespace: str = DEFAULT_KUBERAY_NAMESPACE  # admitted to the dashboard port: KubeRay polls it
    ingress_controller_namespace: str | None = None  # for jobs with an Ingress that name none themselves
    prometheus_namespace: str | None = None  # admitted to Ray's metrics port (the training metrics)
