"""One job's driver session: what both flows (a single run, a search) need around their fit, and
the one failure path.

    with DriverSession(job, run_id=..., resume=...) as session:   # storage preflight, the job's
        ...                                                         # preflight, Ray, run id,
                                                                    # tracker, status publisher
    a flow's exception on the way out -> status.json `failed` (`invalid` for a SpecError), and a
    storage fault behind it raised as the StorageError that says what happened (not Ray's
    wrapper of pyarrow's OSError)

The order is the cost order: the S3 preflight (seconds) and the model/data preflight (seconds,
no weights) run before Ray starts, so a bad endpoint or field fails fast. A spec the model or
data rule out is also published as status.json `invalid`, so the operator, which never sees the
model, can say which field to fix. Like every driver-side module, this one imports no torch: the
preflight loads it when it runs (ARCHITECTURE.md, "Inside the trainer").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import job_status
from .driver import ProgressTracker, init_ray, new_run_id, resume_mode, shared_config
from .job_status import StatusPublisher
from .persist import Persistence, open_storage
from .spec import FineTuneJob, SpecError

if TYPE_CHECKING:
    from .preflight import Prepared

log = logging.getLogger(__name__)


class DriverSession:
    """Owns storage, preflight, Ray, the progress tracker and the status publisher of one job run.

    `kind` is "search" or "single"; `run_id` is the run's folder name: for a search resumed from
    storage (`restored`), the stored search's; else the one given, else a new timestamped one."""

    persistence: Persistence
    prepared: Prepared
    publisher: StatusPublisher
    tracker: Any  # the ProgressTracker actor's handle
    run_id: str
    restored: bool
    preflight_seconds: float

    def __init__(self, job: FineTuneJob, *, run_id: str | None = None, resume: str | None = None):
        self.job = job
        self.kind = "search" if job.spec.search is not None else "single"
        self.resume = resume_mode(job, resume)
        self._given_run_id = run_id
        self.started = time.time()

    def __enter__(self) -> DriverSession:
        self.persistence = open_storage(self.job)  # S3 preflight: a bad endpoint or key fails here, first
        self.publisher = StatusPublisher.for_job(self.persistence.status_writer())  # the preflight's verdict goes through it too
        self.prepared = self._prepare()
        self.preflight_seconds = time.time() - self.started
        init_ray()
        self.run_id, self.restored = self._choose_run_id()
        self.tracker = ProgressTracker.remote()  # type: ignore[attr-defined]  # ray.remote's class wrapper is untyped
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if err is None:
            return
        if isinstance(err, SpecError):  # found once Ray was up (e.g. no trial fits the cluster): a verdict
            self._publish_invalid(err)
            return
        search = self.job.spec.search
        total = search.resolved_num_trials() if search is not None else 1
        self.publish("failed", total_trials=total)
        failure = self.persistence.storage_failure(err)
        if failure is not None:
            raise failure from err

    # ------------------------------------------------------------------ what flows use
    @property
    def run_dir(self) -> Path:
        """The run's local folder (the exported model and results.json on this machine)."""
        return self.persistence.local_dir / self.run_id

    def shared(self) -> dict[str, Any]:
        """What every worker of every run or trial reads besides its job (driver.shared_config)."""
        return shared_config(self.prepared, self.tracker)

    def publish(self, state: str, **fields: Any) -> None:
        """status.json for this run (job_status.snapshot's fields)."""
        self.publisher.publish(job_status.snapshot(self.job.name, self.run_id, kind=self.kind, state=state, **fields))

    # ------------------------------------------------------------------ set-up
    def _prepare(self) -> Prepared:
        from .preflight import prepare_job  # torch (the model on the meta device): when it runs, not at import

        try:
            return prepare_job(self.job)
        except SpecError as err:
            self._publish_invalid(err)
            raise

    def _publish_invalid(self, err: SpecError) -> None:
        """status.json `invalid` naming the fields: the operator's Stalled/InvalidSpec."""
        self.publisher.publish(job_status.invalid(self.job.name, kind=self.kind, problems=err.problems))

    def _choose_run_id(self) -> tuple[str, bool]:
        """A search with resume other than none restores the job's latest search in storage (Tune's
        experiment state); a single run resumes from a checkpoint instead (single.py), in a new run."""
        if self.kind == "search" and self.resume != "none":
            stored = self.persistence.latest_search()
            if stored is not None:
                return stored, True
            log.info("resume: no earlier search of this job in storage; starting a new one")
        return self._given_run_id or new_run_id(), False
