"""The search flow: a Ray Tune search in which every trial is a full distributed training run.

Reads top to bottom, inside the session (session.py: storage, preflight of the base spec and of
every freezing plan the space can produce, Ray, tracker, status) -> how many trials fit the Ray
cluster at once -> a Tune function trainable per trial that builds the trial's spec and runs the same `TorchTrainer` a plain run
uses, relaying each evaluation to Tune (so ASHA can stop it) -> the best trial's best checkpoint
exported and scored on the test split -> results.json, the trials table and the plots.

Ray 2.43+ runs Train inside Tune this way (a function trainable that calls `trainer.fit()`,
`TuneReportCallback` relaying reports) rather than `Tuner(trainer)`, which Ray 2.60 rejects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import ray
from ray import tune

from . import class_report, eval_report, halving, job_status, scratch, search_results
from .driver import Listener, RunResult, export_model, fit_polling, score_test
from .job_status import StatusPublisher
from .persist import TRIALS_DIR, Persistence
from .ranking import best_row
from .session import DriverSession
from .spec import FineTuneJob, SpecError
from .spec.search import SearchSpec, dropped_params, grid_order, trial_spec
from .trial import run_trial

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# A trial's own actor only waits on its TorchTrainer, whose workers reserve the real CPUs and GPUs
# through Train's placement group. Tune refuses an empty request, and any CPU sliver would make
# trials that exactly fill a machine (2 workers x 1 CPU on 2 cores) never fit; so the actor asks
# for logical memory only, which Train's workers do not claim.
TRIAL_RESOURCES: dict[str, float] = {"CPU": 0, "memory": 256 * 2**20}


def run_search(session: DriverSession, on_progress: Listener | None = None) -> RunResult:
    job, persistence, prepared, run_id = session.job, session.persistence, session.prepared, session.run_id
    search = job.spec.search
    assert search is not None
    concurrency = trials_that_fit(job, ray.cluster_resources())
    totals = TrialTotals(job, prepared.data.train_rows)
    tuner = build_tuner(job, session.shared(), persistence, run_id, concurrency, totals, session.tracker, session.publisher,
                        restore=session.restored)
    gate = halving.start_gate(run_id, concurrency) if search.scheduler.type == "successiveHalving" else None
    try:
        grid = fit_polling(tuner.fit, lambda: _snapshot(session.tracker),
                           [*([on_progress] if on_progress else []), *session.tracking_listeners()])
    finally:  # the folders of the trials Tune stopped mid-report on this host (scratch's docstring)
        if gate is not None:
            ray.kill(gate)
        scratch.sweep_when_gone()
    trials = search_results.collect(job, grid, totals)
    best = search_results.best_trial(job, trials)
    model_dir = None
    if best:
        trial_job = totals.trial_job(best["params"])
        checkpoints = persistence.complete_only(best["checkpoints"], persistence.key(run_id, TRIALS_DIR))
        model_dir = export_model(trial_job, checkpoints, prepared, session.run_dir, filesystem=persistence.filesystem)
    for row in [*trials, *([best] if best else [])]:  # Ray's paths ("bucket/key" on S3) -> URIs people can use
        row["checkpoint"] = persistence.uri(row["checkpoint"]) if row.get("checkpoint") else row.get("checkpoint")
    test = score_test(prepared, model_dir) if prepared.data.test is not None else {}
    results = search_results.results(job, prepared, trials, best, test, model_dir, session.run_dir, concurrency,
                                     session.started, session.preflight_seconds)
    results["plots"] = search_results.plot(job, trials, session.run_dir)
    results["restored"] = session.restored
    rows = ray.get(session.tracker.snapshot.remote())[1]
    eval_report.add_to_search_results(results, rows)  # samples, forgetting
    class_report.add_to_results(results, rows, session.run_dir)  # per-class figures and confusion_matrix.png (classification)
    results = persistence.save_results(run_id, results, model_dir)
    session.finish_tracking(results, model_dir)
    session.publisher.publish(search_results.final_status(job, run_id, trials, best, persistence.model_uri(run_id, model_dir)),
                              final=True)
    return RunResult(session.run_dir, results)


class TrialTotals:
    """A trial's spec and step count from its sampled values (the driver needs both to tell a
    trial the scheduler stopped from one that ran its course)."""

    def __init__(self, job: FineTuneJob, num_train: int):
        self.job, self.num_train = job, num_train

    def trial_job(self, params: dict[str, Any]) -> FineTuneJob:
        search = self.job.spec.search
        assert search is not None
        return self.job.model_copy(update={"spec": trial_spec(self.job.spec, {**search.fixed_params(), **params})})

    def steps(self, params: dict[str, Any]) -> int:
        spec = self.trial_job(params).spec
        return spec.training.total_steps(self.num_train, spec.resources.workers)


def trials_that_fit(job: FineTuneJob, cluster: dict[str, float]) -> int:
    """maxConcurrentTrials, capped to the trials whose Train workers the cluster can hold at once.

    Tune counts only the trial actors' resources, not the workers their trainers start; past this
    cap, trials would sit waiting for each other's CPUs (and Train times out waiting)."""
    search, res = job.spec.search, job.spec.resources
    assert search is not None
    cpus = res.workers * res.cpus_per_worker
    fit = int(cluster.get("CPU", 0.0) // cpus)
    if res.gpus_per_worker:
        fit = min(fit, int(cluster.get("GPU", 0.0) // (res.workers * res.gpus_per_worker)))
    if fit < 1:
        gpus = f" and {res.workers * res.gpus_per_worker:g} GPUs" if res.gpus_per_worker else ""
        raise SpecError([("spec.resources", f"one trial needs {cpus:g} CPUs{gpus} (workers x cpusPerWorker); the Ray cluster has {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs")])
    wanted = min(search.max_concurrent_trials, search.resolved_num_trials())
    if wanted > fit:
        log.info("search: %d trial(s) at a time, not %d: each needs %g CPUs and the cluster has %g", fit, wanted, cpus, cluster.get("CPU", 0))
    return min(wanted, fit)


def build_tuner(job: FineTuneJob, shared: dict[str, Any], persistence: Persistence, run_id: str, concurrency: int,
                totals: TrialTotals, tracker, publisher: StatusPublisher, *, restore: bool = False) -> tune.Tuner:
    """The Tuner of a new search, or (`restore`) the one stored under `<job>/<run_id>`; Tune's own
    experiment state goes through the same storage as the checkpoints, so either can be restored."""
    search = job.spec.search
    assert search is not None
    metric, mode = job.spec.ranked_metric()
    seed = search.seed if search.seed is not None else job.spec.training.seed
    trainable = tune.with_resources(tune.with_parameters(
        run_trial, base=job.model_dump(by_alias=True, mode="json"), shared=shared, persistence=persistence,
        trials_path=persistence.path(run_id, TRIALS_DIR), run_id=run_id,
    ), TRIAL_RESOURCES)
    callbacks: list[tune.Callback] = [TrialEvents(tracker, totals, publisher, run_id, persistence.uri)]
    if restore:
        tuner = tune.Tuner.restore(persistence.path(run_id), trainable=trainable, param_space=param_space(search),
                                   resume_unfinished=True, resume_errored=False, restart_errored=True,
                                   storage_filesystem=persistence.filesystem)
        # the stored RunConfig holds the interrupted driver's callbacks (a dead tracker): use ours
        assert tuner._local_tuner is not None  # a Tuner restored in this process is local
        tuner._local_tuner.get_run_config().callbacks = callbacks
        return tuner
    stop = {"time_total_s": search.budget.trial_seconds} if search.budget.trial_seconds else None
    return tune.Tuner(
        trainable,
        param_space=param_space(search),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=searcher(search, metric, mode, seed, concurrency),
            scheduler=scheduler(job, totals, run_id),
            # a grid is one sample per combination (grid_order); otherwise Tune repeats num_samples
            # for every grid_search combination
            num_samples=search.resolved_num_trials() if search.algorithm == "grid" else search.resolved_num_trials() // search.grid_points(),
            # the random/grid searcher carries the limit itself; Tune wraps a Searcher (Optuna) with it
            max_concurrent_trials=concurrency if search.algorithm == "tpe" else None,
            time_budget_s=search.budget.total_seconds,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
            reuse_actors=reuses_actors(search),
        ),
        run_config=tune.RunConfig(
            name=run_id, storage_path=persistence.storage_path, storage_filesystem=persistence.filesystem, stop=stop,
            verbose=0, callbacks=callbacks,
        ),
    )


def reuses_actors(search: SearchSpec) -> bool:
    """Whether a finished trial's actor runs the next trial (every trial asks for the same
    TRIAL_RESOURCES): it then finds Tune, Ray Train and torch imported instead of paying a fresh
    process's imports before its fit() (slot to fit() 2.9 s -> 0.03 s, bench/trial_startup.py).
    Only where every trial ends by itself. A scheduler (ASHA, successiveHalving, median) or a
    per-trial time budget stops or pauses a trial mid-fit, and Tune then caches its actor while
    the trial's Ray Train run is still ending. The next trial's reset waits 2 s for that thread
    and, if it has not ended, errors the trial: "Trainable runner reuse requires reset_config() to
    be implemented and return True" (test_search's ASHA search, in CI). Meanwhile the old run
    would go on past a rung whose slot it gave back."""
    return search.scheduler.type == "none" and not search.budget.trial_seconds


def param_space(search: SearchSpec) -> dict[str, Any]:
    """Tune domains from our distributions (randint's high bound is inclusive here, exclusive in Tune).
    An `algorithm: grid` search gets each dimension's values as a choice: its trials are the
    combinations `searcher` hands Tune, each fixing every dimension."""
    space: dict[str, Any] = {}
    for path, dist in search.space.items():
        if search.algorithm == "grid":
            space[path] = tune.choice(_given(dist.grid_values()))
        elif dist.kind == "grid":
            space[path] = tune.grid_search(_given(dist.grid_values()))
        elif dist.kind == "choice":
            space[path] = tune.choice(_given(dist.choice))
        elif dist.kind == "uniform":
            space[path] = tune.uniform(*_given(dist.uniform))
        elif dist.kind == "loguniform":
            space[path] = tune.loguniform(*_given(dist.loguniform))
        else:
            low, high = _given(dist.randint)
            space[path] = tune.randint(low, high + 1)
    return space


def _given(value: list[_T] | None) -> list[_T]:
    """The distribution's field named by its `kind` (the spec's validation makes it the one set)."""
    assert value is not None
    return value


def searcher(search: SearchSpec, metric: str, mode: str, seed: int, concurrency: int):
    """Tune applies max_concurrent_trials to a Searcher (Optuna) itself, but ignores it for a
    BasicVariantGenerator passed in, so that one gets the limit directly, except under
    successiveHalving, whose gate bounds the trials training at once instead (halving's docstring).
    A grid runs its combinations in a seeded random order (grid_order says why)."""
    if search.algorithm == "tpe":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=metric, mode=mode, seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    points = grid_order(search, seed) if search.algorithm == "grid" else None
    limit = 0 if search.scheduler.type == "successiveHalving" else concurrency  # 0: no limit
    return BasicVariantGenerator(points_to_evaluate=points, random_state=seed, max_concurrent=limit)


def scheduler(job: FineTuneJob, totals: TrialTotals, run_id: str = ""):
    """Schedulers measure time in optimizer steps (`step` in every report), so gracePeriod means
    the same thing as evaluation.everySteps."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    search = job.spec.search
    assert search is not None
    sched = search.scheduler
    grace = sched.grace_period or job.spec.evaluation.every_steps
    if sched.type == "asha":
        longest = sched.max_steps or totals.steps({})
        return ASHAScheduler(time_attr="step", max_t=longest, grace_period=min(grace, longest), reduction_factor=sched.reduction_factor)
    if sched.type == "successiveHalving":
        return halving.SuccessiveHalving(time_attr="step", max_t=sched.max_steps or totals.steps({}), grace_period=grace,
                                         reduction_factor=sched.reduction_factor, num_trials=search.resolved_num_trials(), run_id=run_id)
    if sched.type == "median":
        return MedianStoppingRule(time_attr="step", grace_period=grace, min_samples_required=2)
    return FIFOScheduler()


def trial_name(trial) -> str:
    """trial_00, trial_01, ... in creation order. Tune's ids differ by searcher (Optuna's are random
    hex), and the creator is copied into every trial, so the order comes from the experiment tag,
    which every searcher starts with its trial counter."""
    counter = str(trial.experiment_tag).split("_", 1)[0]
    return f"trial_{int(counter):02d}" if counter.isdigit() else f"trial_{trial.trial_id}"


class TrialEvents(tune.Callback):
    """Runs in the driver: tells the progress display when a trial starts and ends (and how), and
    keeps status.json (trial counts, the best trial so far) current for the operator."""

    def __init__(self, tracker, totals: TrialTotals, publisher: StatusPublisher, run_id: str, uri: Callable[[str], str] = str):
        self.tracker, self.totals, self.publisher, self.run_id, self.uri = tracker, totals, publisher, run_id, uri
        self.states: dict[str, str] = {}
        self.best: dict[str, Any] | None = None
        self.best_ranked: dict[str, Any] | None = None  # the best's (trial, value, loss, step): what ties compare
        self.metric, self.mode = totals.job.spec.ranked_metric()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into tuner.pkl. An actor handle there cannot be unpickled by a
        # later driver (its Ray cluster is gone: "Expected str or bytes, got NoneType"), and a
        # restored search gets a fresh TrialEvents anyway (build_tuner), so leave the live parts out.
        return {**self.__dict__, "tracker": None, "publisher": None}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        spec = self.totals.trial_job(trial.config).spec
        shown = search_results.fmt_params(trial.config, dropped_params(spec, trial.config))
        self.tracker.record.remote({"trial": str(trial), "event": f"started: {search_results.strategy_label(spec.freezing)}: {shown}"})
        self._publish(trials, trial, "running")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if value is None or result.get("baseline"):
            return
        candidate = {"trial": str(trial), "value": value, "loss_at_best": result.get("eval_loss"), "best_step": result.get("step")}
        if self._beats(candidate):
            self.best_ranked = candidate
            self.best = job_status.best_trial(str(trial), self.metric, value, result.get("step"), params=dict(trial.config),
                                              checkpoint=self._uri(result.get(search_results.CHECKPOINT_KEY)))
            self.best["strategy"] = search_results.strategy_label(self.totals.trial_job(trial.config).spec.freezing)
        self._publish(trials, trial, "running")

    def _beats(self, candidate: dict[str, Any]) -> bool:
        """Better than the best so far, or equal and first by results.json's tie rule
        (search_results.best_trial: lower loss, fewer steps, earlier trial), so that the live
        status names the trial the final one will, whatever order the trials report in."""
        rows = sorted([r for r in (self.best_ranked, candidate) if r is not None], key=lambda row: row["trial"])
        return best_row(rows, "value", self.mode, tiebreak=search_results.TRIAL_TIEBREAK) is candidate

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        state = self._ended(trial)
        step, total = (trial.last_result or {}).get("step", 0), self.totals.steps(trial.config)
        how = "finished" if state == "completed" else "stopped by the scheduler"
        self.tracker.record.remote({"trial": str(trial), "event": f"{how} at step {step}/{total}"})
        self._publish(trials, trial, state)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.tracker.record.remote({"trial": str(trial), "event": "failed (see results.json for the error)"})
        self._publish(trials, trial, "failed")

    def _uri(self, path: str | None) -> str | None:
        try:
            return self.uri(path) if path else None
        except Exception:  # status is best effort; a path outside the store stays as Ray gave it
            return path

    def _ended(self, trial) -> str:
        last = trial.last_result or {}
        finished = last.get("step", 0) >= self.totals.steps(trial.config) or last.get("early_stopped")
        return "completed" if finished else "stopped"

    def _publish(self, trials, trial, state: str) -> None:
        """`trials` is every trial Tune knows, including those a restored search ended before this
        driver started: they count from their stored state, so the trial counts are the whole
        search's, not only what this driver saw. (The best so far is from the results this driver
        saw until the final write, which reads every trial's history.)"""
        self.states[str(trial)] = state
        earlier = {str(t): self._ended(t) if t.status == "TERMINATED" else "failed"
                   for t in trials if t.status in ("TERMINATED", "ERROR") and str(t) not in self.states}
        search = self.totals.job.spec.search
        assert search is not None
        # successiveHalving: paused at a rung, or started but without a training slot yet
        training = halving.holders(self.run_id) if search.scheduler.type == "successiveHalving" else None
        for t in trials:
            if self.states.get(str(t)) in ("running", "waiting"):
                idle = t.status == "PAUSED" or (training is not None and str(t) not in training)
                self.states[str(t)] = "waiting" if idle else "running"
        self.publisher.publish(job_status.snapshot(
            self.totals.job.name, self.run_id, kind="search", state="running", trials={**earlier, **self.states},
            total_trials=search.resolved_num_trials(), best=self.best,
        ))


def _snapshot(tracker) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every trial's step progress (a bar each) and every row reported so far."""
    trials = ray.get(tracker.trials.remote(), timeout=5)
    _, rows = ray.get(tracker.snapshot.remote(), timeout=5)
    return {"trials": trials}, rows
