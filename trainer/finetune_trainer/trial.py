"""One search trial, the function Tune runs in each trial's actor.

A module of its own so that a trial actor imports only the spec and Ray Tune (~180 MB) until it
trains: under successiveHalving every trial's actor exists from the start and most of them wait
(`halving.wait_for_slot`), and importing the training side (torch, transformers, DeepSpeed) first
doubled what each waiting one held (ru_maxrss ~390 MB against ~180 MB; in the 27-trial
benchmark, 26 waiting actors averaged 409 MB RSS on a 24 GB machine before this module).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ray import tune

from . import halving, logs
from .spec import FineTuneJob
from .spec.search import trial_spec

if TYPE_CHECKING:
    from .persist import Persistence


def run_trial(config: dict[str, Any], *, base: dict[str, Any], shared: dict[str, Any], persistence: Persistence, trials_path: str,
              run_id: str) -> None:
    """The base spec with this trial's values, trained exactly as a plain run is.

    A trial can start more than once: resumed after a pause at a rung (successiveHalving), or in
    a restored search. Each start is a new Ray Train run in the trial's folder
    (`trials/<trial>/start-<time>/checkpoint_*`) that resumes from the trial's latest complete
    checkpoint, as `--resume` does for a plain run. Not Train's own restore of a run by name: its
    run snapshot lists every checkpoint it was given, our retention (`persist`, marker-aware)
    deletes some, and Train then refuses to restore the run ("a checkpoint that does not exist
    anymore"; seen in the successiveHalving benchmark)."""
    logs.configure_worker()  # this trial actor's own lines (waiting for a slot, resume) reach the driver
    job = FineTuneJob.model_validate(base)
    search = job.spec.search
    assert search is not None
    trial = job.model_copy(update={"spec": trial_spec(job.spec, {**search.fixed_params(), **config})})
    name = tune.get_context().get_trial_name()
    if search.scheduler.type == "successiveHalving":
        halving.wait_for_slot(run_id, name)

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
    result = make_trainer(trial, shared | resume, persistence=persistence, storage_path=f"{trials_path}/{name}",
                          name=f"start-{datetime.now(UTC):%Y%m%d-%H%M%S-%f}", callbacks=[TuneReportCallback()], trial=name).fit()
    raise_if_diverged(result.metrics or {})  # this trial errors (NonFiniteLoss); the search goes on without it
