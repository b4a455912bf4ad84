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

from . import eval_report, job_status
from .driver import ProgressTracker, check_run_id, init_ray, new_run_id, resume_mode, shared_config
from .job_status import StatusPublisher
from .persist import Persistence, open_storage
from .ranking import NonFiniteLoss
from .ray_metrics import run_tags
from .spec import FineTuneJob, FineTuneJobSpec, SpecError
from .tracking import Tracking

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

    attempt: int
    tracking: Tracking | None = None  # spec.tracking's MLflow run and event files (tracking.py); opened with the run id

    def __init__(self, job: FineTuneJob, *, run_id: str | None = None, resume: str | None = None):
        self.job = job
        self.kind = "search" if job.spec.search is not None else "single"
        self.resume = resume_mode(job, resume)
        self._given_run_id = check_run_id(run_id) if run_id is not None else None
        self.started = time.time()

    def __enter__(self) -> DriverSession:
        self.persistence = open_storage(self.job)  # S3 preflight: a bad endpoint or key fails here, first
        self.publisher = StatusPublisher.for_job(self.persistence.status_writer())  # the preflight's verdict goes through it too
        self.prepared = self._prepare()
        self.preflight_seconds = time.time() - self.started
        init_ray(self.job.ray_job_metadata())  # the dashboard's Jobs view names the FineTuneJob
        self._ingest()
        self.run_id, self.restored = self._choose_run_id()
        self.attempt = self.persistence.record_attempt(self.run_id)
        if self.attempt > 1:
            log.info("%s: attempt %d of run %s (spec.storage.resume %s)", self.job.name, self.attempt, self.run_id, self.resume)
        # on the driver's own node, as Train pins its controller: an actor of num_cpus=0 may land on
        # any node, and a lost worker node would take the run's progress and history with it
        # (tests/integration/test_multinode.py)
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # ray_metrics: it also sets the training gauges on Ray's metrics endpoint (the Grafana dashboard's)
        tags = run_tags(self.job.metadata.namespace, self.job.name, self.run_id)
        self.tracker = ProgressTracker.options(scheduling_strategy=here).remote(tags)  # type: ignore[attr-defined]  # ray.remote's class wrapper is untyped
        self.publisher.decorate = self._lifecycle
        # a wrong address or refused credentials end the job here, before any training
        self.tracking = Tracking.open(self.job, self.run_id, self.run_dir)
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if err is None:
            return
        if self.tracking is not None:
            self.tracking.fail()
        if isinstance(err, SpecError):  # found once Ray was up (e.g. no trial fits the cluster): a verdict
            self._publish_invalid(err)
            return
        search = self.job.spec.search
        total = search.resolved_num_trials() if search is not None else 1
        diverged = {"non_finite_loss": err.step} if isinstance(err, NonFiniteLoss) else {}
        self.publish("failed", total_trials=total, final=True, **diverged)
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

    def publish(self, state: str, *, final: bool = False, **fields: Any) -> None:
        """status.json for this run (job_status.snapshot's fields; the publisher adds the run's
        attempt, restarts, resumes and newest complete checkpoint). `final`: the run's last word,
        retried until written, since the operator waits for it before calling the job done."""
        self.publisher.publish(job_status.snapshot(self.job.name, self.run_id, kind=self.kind, state=state, **fields), final=final)

    def tracking_listeners(self) -> list[Any]:
        """The progress listener that sends each new evaluation to MLflow and TensorBoard, if any."""
        return [self.tracking.listener] if self.tracking is not None else []

    def finish_tracking(self, results: dict[str, Any], model_dir: Path | None) -> None:
        """After results.json: the tracker's last word (tracking.Tracking.finish), the event files
        copied to the run's S3 prefix. The run itself is done and stored by now, so a tracking
        server failing here is an error in the log, not a failed run."""
        if self.tracking is None:
            return
        persistence, run_id = self.persistence, self.run_id

        def upload(local: Path, name: str) -> None:
            if persistence.remote:
                from .storage import upload_dir

                upload_dir(persistence.store, local, persistence.key(run_id, name))

        try:
            self.tracking.finish(results, model_dir, upload)
        except Exception as err:
            log.error("tracking: the run finished and results.json is stored, but its tracking could not be completed: %s", err)

    def _lifecycle(self) -> dict[str, Any]:
        """What every status document carries about the run's life (job_status.lifecycle), and each
        trial's latest generated samples and forgetting figure (eval_report.status_fields)."""
        import ray

        try:
            tracked = ray.get(self.tracker.lifecycle.remote(), timeout=5)
            _, rows = ray.get(self.tracker.snapshot.remote(), timeout=5)
        except Exception as err:  # the tracker is gone (Ray shutting down): the attempt is still known
            log.debug("no lifecycle from the progress tracker: %s", err)
            tracked, rows = {}, []
        return job_status.lifecycle(self.attempt, tracked) | eval_report.status_fields(rows)

    # ------------------------------------------------------------------ set-up
    def _prepare(self) -> Prepared:
        from .preflight import prepare_job  # torch (the model on the meta device): when it runs, not at import

        try:
            return prepare_job(self.job)
        except SpecError as err:
            self._publish_invalid(err)
            raise

    def _ingest(self) -> None:
        """The data as Ray Data datasets (ingest.py), read, split and tokenized in Ray's tasks; what
        the workers read from. A problem found here (in the whole data, where the preflight saw its
        first rows) is a verdict like the preflight's."""
        from . import data_checks
        from .data import DataError  # torch: the preflight has loaded it already
        from .ingest import ingest
        from .reference import ingest_reference

        spec, prepared = self.job.spec, self.prepared
        try:
            ingested = ingest(spec.data, spec.model.task, prepared.tokenizer, spec.training.seed,
                              storage=spec.storage, num_labels=spec.model.num_labels)
            short = _short_of_a_step(ingested.train_rows, spec)
            if short:
                raise DataError(short)
            if spec.search is not None and (trials := _trials_short_of_a_step(ingested.train_rows, spec)):
                raise SpecError(trials)
            prepared.take_ingest(ingested, spec.resources.workers)
            prepared.reference = ingest_reference(self.job, prepared.tokenizer)
            data_checks.warn(ingested.stats)  # held-out rows repeating train, classes missing
        except (DataError, SpecError) as err:  # SpecError: the freezing plan on the real epoch length
            invalid = err.as_spec_error() if isinstance(err, DataError) else err
            self._publish_invalid(invalid)
            raise invalid from None

    def _publish_invalid(self, err: SpecError) -> None:
        """status.json `invalid` naming the fields: the operator's Stalled/InvalidSpec."""
        self.publisher.publish(job_status.invalid(self.job.name, kind=self.kind, problems=err.problems))

    def _choose_run_id(self) -> tuple[str, bool]:
        """auto: the given run (a new attempt of it: KubeRay's retry, a re-created RayJob, `--run-id`),
        whose search is restored if it has one (a single run finds its checkpoints: single.py).
        latest or a URI: a search restores the job's latest search in storage (Tune's experiment
        state); a single run resumes from a checkpoint instead (single.py), in a new run. Other than
        auto, a given run that already exists is not reused (below)."""
        given = self._given_run_id
        if self.kind == "search" and self.resume == "auto":  # this run's own earlier attempt, if there was one
            return (given, True) if given is not None and self.persistence.has_search(given) else (given or new_run_id(), False)
        if self.kind == "search" and self.resume != "never":
            stored = self.persistence.latest_search()
            if stored is not None:
                return stored, True
            log.info("resume: no earlier search of this job in storage; starting a new one")
        if given is not None and self.resume != "auto" and self.persistence.store.list(self.persistence.key(given)):
            # Ray Train restores a run of the same name from its own state in that folder (its
            # latest checkpoint), which is what auto wants and what never (or a chosen checkpoint)
            # must not get: this attempt writes a folder of its own beside it
            fresh = f"{given}.{new_run_id()}"
            log.info("run %s exists and spec.storage.resume is %s: this attempt writes run %s", given, self.resume, fresh)
            return fresh, False
        return given or new_run_id(), False


_STEP_SHAPE = ("training.perDeviceBatchSize", "training.gradientAccumulationSteps", "resources.workers")


def _trials_short_of_a_step(rows: int, spec: FineTuneJobSpec) -> list[tuple[str, str]]:
    """`_short_of_a_step` for every batch size, accumulation and worker count the search's space
    can give a trial (spec.search.search_combinations: every combination, or a bounded seeded
    sample of a huge space), named by the sampled values: no trial may fail minutes into a search
    for a reason the ingest's row count already shows."""
    from .spec.search import search_combinations, trial_spec

    search = spec.search
    assert search is not None
    problems: list[tuple[str, str]] = []
    seen: set[tuple[int, int, int]] = set()
    for sampled in search_combinations(search):
        trial = trial_spec(spec, {**search.fixed_params(), **sampled})
        t = trial.training
        key = (t.per_device_batch_size, t.gradient_accumulation_steps, trial.resources.workers)
        if key in seen:
            continue
        seen.add(key)
        if (short := _short_of_a_step(rows, trial)) is not None:
            chosen = ", ".join(f"{k}={v!r}" for k, v in sampled.items() if k in _STEP_SHAPE)
            problems.append(("spec.search.space", f"{chosen or 'a trial'}: {short.partition(': ')[2]}"))
    return problems


def _short_of_a_step(rows: int, spec: FineTuneJobSpec) -> str | None:
    """The refusal when a worker's share of the train split leaves a micro-batch of a step empty
    (epochs.EpochPlan.empty_micro_batch), before any worker starts; None when every one has rows."""
    from .epochs import EpochPlan

    t, workers = spec.training, spec.resources.workers
    plan = EpochPlan(rows=rows, world=workers, micro_batch=t.per_device_batch_size, accumulation=t.gradient_accumulation_steps)
    empty = plan.empty_micro_batch()
    if empty is None:
        return None
    field = "spec.training.gradientAccumulationSteps" if plan.rows_per_rank else "spec.resources.workers"
    return (f"{field}: {rows} training rows give each of the {workers} workers {plan.rows_per_rank}, and one optimizer step "
            f"takes {t.gradient_accumulation_steps} micro-batches of {t.per_device_batch_size}: micro-batch {empty + 1} would "
            "have no rows; lower gradientAccumulationSteps, perDeviceBatchSize or workers, or add training rows")
