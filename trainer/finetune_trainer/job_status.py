"""status.json: the small progress object the operator mirrors into `FineTuneJob.status`.

The driver writes it next to the job's runs (a local folder, or the job's S3 prefix) whenever a
trial starts or ends and at every evaluation, and on Kubernetes also into the job's progress
ConfigMap (kube_progress), which the operator reads on a timer: the operator needs neither the
job's storage credentials nor a connection to its storage. Its shape is a contract with
finetune_operator (see the progress reader there); keys are camelCase like the status they feed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

STATUS_FILE = "status.json"


def best_trial(name: str, metric: str, value: float, step: int | None, *, params: dict[str, Any] | None = None,
               checkpoint: str | None = None) -> dict[str, Any]:
    """`bestTrial` as the operator reads it (its BestTrial model); a single run is its own trial."""
    return {"name": name, "metric": metric, "value": value, "step": step, "params": params or {}, "checkpoint": checkpoint}


def snapshot(
    job_name: str,
    run_id: str,
    *,
    kind: str,
    state: str,
    trials: dict[str, str] | None = None,
    total_trials: int = 1,
    step: int | None = None,
    total_steps: int | None = None,
    best: dict[str, Any] | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """`trials` maps each started trial to running / waiting / completed / stopped / failed."""
    states = list((trials or {}).values())
    return {
        "job": job_name,
        "run": run_id,
        "updated": datetime.now(UTC).isoformat(),
        "state": state,
        "kind": kind,
        "trials": {
            "total": total_trials,
            "completed": states.count("completed"),
            "running": states.count("running"),
            "waiting": states.count("waiting"),
            "stopped": states.count("stopped"),
            "failed": states.count("failed"),
        },
        "step": step,
        "totalSteps": total_steps,
        "bestTrial": best,
        "bestCheckpoint": (best or {}).get("checkpoint"),
        "model": model,
    }


def invalid(job_name: str, *, kind: str, problems: list[tuple[str, str]]) -> dict[str, Any]:
    """The spec cannot run on this model or data (found by the preflight inside the cluster, e.g.
    more frozen layers than the model has). The operator turns it into Stalled/InvalidSpec and
    removes the RayJob, as it does for what it can check itself."""
    return {
        "job": job_name,
        "run": None,
        "updated": datetime.now(UTC).isoformat(),
        "state": "invalid",
        "kind": kind,
        "problems": [{"path": path, "message": message} for path, message in problems],
    }


class StatusPublisher:
    """Best effort: a status write that fails is reported once per destination and never stops
    training. Destinations: the job's storage (for people and `finetune run`), and on Kubernetes
    the job's progress ConfigMap (what the operator reads: kube_progress)."""

    def __init__(self, *writes: Callable[[dict[str, Any]], None]):
        self.writes = writes
        self.warned: set[int] = set()

    @classmethod
    def for_job(cls, store_write: Callable[[dict[str, Any]], None]) -> StatusPublisher:
        from .kube_progress import ConfigMapWriter

        in_cluster = ConfigMapWriter.from_environment()
        return cls(store_write, *([in_cluster] if in_cluster else []))

    def publish(self, status: dict[str, Any]) -> None:
        for i, write in enumerate(self.writes):
            try:
                write(status)
            except Exception as err:  # a full disk or a storage hiccup must not end a run
                if i not in self.warned:
                    print(f"[finetune] could not write {STATUS_FILE} ({err}); training continues", file=sys.stderr, flush=True)
                    self.warned.add(i)


def store_writer(store, key: str) -> Callable[[dict[str, Any]], None]:
    """Through a `storage.Store` (S3, or a local folder): one PUT on S3, so the operator reading
    `<prefix>/<namespace>/<job>/status.json` sees the old object or the new one, whole."""
    from .storage import write_json

    def write(status: dict[str, Any]) -> None:
        write_json(store, key, status)

    return write
