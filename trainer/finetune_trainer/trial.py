"""One search trial, the function Tune runs in each trial's actor.

A module of its own so that a trial actor imports only the spec and Ray Tune (~180 MB) until it
trains: under successiveHalving every trial's actor exists from the start and most of them wait
(`halving.wait_for_slot`), and importing the training side (torch, transformers, DeepSpeed) first
doubled what each waiting one held (ru_maxrss ~390 MB against ~180 MB; in the 27-trial
benchmark, 26 waiting actors averaged 409 MB RSS on a 24 GB machine before this module).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ray import tune

from . import halving, logs, phases
from .spec import FineTuneJob
from .spec.search import trial_spec

if TYPE_CHECKING:
    from .persist import Persistence

_JOB, _TRIAL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"), re.compile(r"^[a-z0-9][a-z0-9_]{0,99}$")


def run_name(job: str, trial: str, started: datetime) -> str:
    """The Ray Train run of one start of a trial: `<job>-<trial>-start-<time>`, the name the
    dashboard's Train runs (api/train/v2/runs, Ray Train's `ray_train_run_name` metric label) show,
    so a run reads as this FineTuneJob's trial. Train V2 also makes RunConfig.name the run's
    storage folder (StorageContext's experiment_dir_name), here under `trials/<trial>/`: the
    readers of that folder search below `trials/<trial>/` at any depth (storage.resume_point,
    list_complete_checkpoints), and within it every start shares the prefix, so the names still
    sort in start order (storage/checkpoints.py's tie-break). The name is one path segment: the
    job's name is a DNS-1123 label (spec.job.Metadata) and Tune's trial names are ours
    (tuning.trial_name); anything else, e.g. a '/' or '..', is refused rather than written as a path."""
    if not (_JOB.match(job) and _TRIAL.match(trial)):
        raise ValueError(f"job {job!r}, trial {trial!r}: not one storage path segment (a DNS-1123 label; lowercase letters, digits and '_')")
    return f"{job}-{trial}-start-{started:%Y%m%d-%H%M%S-%f}"


def run_trial(config: dict[str, Any], *, base: dict[str, Any], shared: dict[str, Any], persistence: Persistence, trials_path: str,
              run_id: str) -> None:
    """The base spec with this trial's values, trained exactly as a plain run is.

    A trial can start more than once: resumed after a pause at a rung (successiveHalving), or in
    a restored search. Each start is a new Ray Train run in the trial's folder
    (`trials/<trial>/<job>-<trial>-start-<time>/checkpoint_*`, `run_name`) that resumes from the trial's latest complete
    checkpoint, as `--resume` does for a plain run. Not Train's own restore of a run by name: its
    run snapshot lists every checkpoint it was given, our retention (`persist`, marker-aware)
    deletes some, and Train then refuses to restore the run ("a checkpoint that does not exist
    anymore"; seen in the successiveHalving benchmark)."""
    entered = time.time()
    logs.configure_worker()  # this trial actor's own lines (waiting for a slot, resume) reach the driver
    job = FineTuneJob.model_validate(base)
    search = job.spec.search
    assert search is not None
    trial = job.model_copy(update={"spec": trial_spec(job.spec, {**search.fixed_params(), **config})})
    name = tune.get_context().get_trial_name()
    if search.scheduler.type == "successiveHalving":
        halving.wait_for_slot(run_id, name)
        slot = time.time()  # the gate's turn: from here the trial's resources are its own
    else:
        slot = phases.trial_slot(entered)  # the actor's start, or this call's in a reused actor

    from ray.tune.integration.ray_train import TuneReportCallback

    from .driver import make_trainer  # the training side, only now (the module's docstring)
    from .persist import TRIALS_DIR
    from .ranking import raise_if_diverged
    from .storage import resume_point

    # the newest complete checkpoint of any start of the trial, its files read once, on the workers:
    # they verify every file's hash and, should it not verify or load, fall back to the ones before
    # it; when none loads the trial fails rather than restart from step 0 (resume.py)
    folder = persistence.key(run_id, TRIALS_DIR, name)
    found = resume_point(persistence.store, "latest", folder, hashes=False)
    resume = {"resume_from": persistence.checkpoint(found.key), "resume_scope": folder} if found else {}
    trainer = make_trainer(trial, shared | resume, persistence=persistence, storage_path=f"{trials_path}/{name}",
                          name=run_name(job.name, name, datetime.now(UTC)), callbacks=[TuneReportCallback()], trial=name)
    phases.trial_started(name, slot)  # bench/trial_startup.py: slot acquired to first step
    result = trainer.fit()
    raise_if_diverged(result.metrics or {})  # this trial errors (NonFiniteLoss); the search goes on without it
