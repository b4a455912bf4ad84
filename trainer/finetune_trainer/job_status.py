"""status.json: the small progress document the operator mirrors into `FineTuneJob.status`.

The driver writes it next to the job's runs (a local folder, or the job's S3 prefix) whenever a
trial starts or ends and at every evaluation, and on Kubernetes also into the job's progress
ConfigMap (kube_progress), which the operator reads on a timer: the operator needs neither the
job's storage credentials nor a connection to its storage. Its shape is
`finetune_trainer.spec.progress.ProgressDocument`, the model the operator parses it back into.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from .spec.progress import INVALID, STATUS_FILE, BestTrial, Problem, ProgressDocument, State, TrialCounts

__all__ = ["STATUS_FILE", "StatusPublisher", "best_trial", "invalid", "lifecycle", "snapshot", "store_writer"]

log = logging.getLogger(__name__)

Write = Callable[[dict[str, Any]], None]  # one destination: takes the document as its JSON object


def best_trial(name: str, metric: str, value: float, step: int | None, *, params: dict[str, Any] | None = None,
               checkpoint: str | None = None) -> dict[str, Any]:
    """`bestTrial` (spec.progress.BestTrial's fields, as a dict the drivers compare by `value`); a
    single run is its own trial."""
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
    non_finite_loss: int | None = None,
) -> ProgressDocument:
    """`trials` maps each started trial to running / waiting / completed / stopped / failed;
    `non_finite_loss`: the step a NaN/inf loss stopped the run at (the operator's NonFiniteLoss)."""
    best_model = BestTrial.model_validate(best) if best else None
    return ProgressDocument(
        job=job_name, run=run_id, updated=datetime.now(UTC), state=cast(State, state), kind=kind,  # pydantic checks it
        trials=TrialCounts.of(trials or {}, total_trials), step=step, total_steps=total_steps, best_trial=best_model,
        best_checkpoint=best_model.checkpoint if best_model else None, model=model, non_finite_loss=non_finite_loss,
    )


def invalid(job_name: str, *, kind: str, problems: list[tuple[str, str]]) -> ProgressDocument:
    """The spec cannot run on this model or data (found by the preflight inside the cluster, e.g.
    more frozen layers than the model has). The operator turns it into Stalled/InvalidSpec and
    removes the RayJob, as it does for what it can check itself."""
    return ProgressDocument(job=job_name, updated=datetime.now(UTC), state=INVALID, kind=kind,
                            problems=[Problem(path=path, message=message) for path, message in problems])


def lifecycle(attempt: int, tracked: dict[str, Any]) -> dict[str, Any]:
    """The run's life as ProgressDocument fields: the attempt, restarts so far (earlier attempts
    plus worker-group restarts in this one), the newest complete checkpoint, and the resumes worth
    an Event: every resume of a single run, and in a search a trial's restart (Ray Train restarted
    its workers) or its first resume in a new attempt; a successiveHalving trial continuing from a
    rung is the plan, not news. `tracked` is driver.ProgressTracker.lifecycle()'s."""
    seen: set[str | None] = set()
    resumes = []
    for resume in tracked.get("resumes") or []:
        trial = resume.get("trial")
        if trial is None or resume.get("source") == "restart" or (attempt > 1 and trial not in seen):
            resumes.append({**resume, "attempt": attempt})
        seen.add(trial)
    return {"attempt": attempt, "restarts": attempt - 1 + int(tracked.get("restarts") or 0),
            "last_checkpoint": tracked.get("last_checkpoint"), "resumes": resumes}


class StatusPublisher:
    """Best effort while the run goes on: a status write that fails is reported once per
    destination and never stops training. The run's final document is retried (`final`): the
    operator calls the job done only once it has read it. Destinations: the job's storage (for
    people and `finetune run`), and on Kubernetes the job's progress ConfigMap (what the operator
    reads: kube_progress). `decorate` adds what the session knows about the run's life (attempt,
    restarts, resumes, last checkpoint: `lifecycle`) to every progress document."""

    FINAL_TRIES = 6  # 1 + 2 + 4 + 8 + 16 s between them: an API server or S3 blip, not an outage
    decorate: Callable[[], dict[str, Any]] | None = None

    def __init__(self, *writes: Write, sleep: Callable[[float], None] = time.sleep):
        self.writes = writes
        self.warned: set[int] = set()
        self.sleep = sleep

    @classmethod
    def for_job(cls, store_write: Write) -> StatusPublisher:
        from .kube_progress import ConfigMapWriter

        in_cluster = ConfigMapWriter.from_environment()
        return cls(store_write, *([in_cluster] if in_cluster else []))

    def publish(self, status: ProgressDocument, *, final: bool = False) -> None:
        """Each destination gets the same JSON object (`ProgressDocument.as_dict`)."""
        if self.decorate is not None and status.state != INVALID:
            status = ProgressDocument.model_validate(status.model_dump() | self.decorate())  # field names: populate_by_name
        document = status.as_dict()
        for i, write in enumerate(self.writes):
            for attempt in range(self.FINAL_TRIES if final else 1):
                try:
                    write(document)
                    break
                except Exception as err:  # a full disk or a storage hiccup must not end a run
                    if final and attempt + 1 < self.FINAL_TRIES:
                        log.warning("could not write the final %s (%s); trying again", STATUS_FILE, err)
                        self.sleep(2.0**attempt)
                    elif final:
                        log.error("could not write the final %s after %d tries: %s", STATUS_FILE, self.FINAL_TRIES, err)
                    elif i not in self.warned:
                        log.warning("could not write %s (%s); training continues", STATUS_FILE, err)
                        self.warned.add(i)


def store_writer(store: Any, key: str) -> Write:
    """Through a `storage.Store` (S3, or a local folder): one PUT on S3, so the operator reading
    `<prefix>/<namespace>/<job>/status.json` sees the old object or the new one, whole."""
    from .storage import write_json

    def write(status: dict[str, Any]) -> None:
        write_json(store, key, status)

    return write
