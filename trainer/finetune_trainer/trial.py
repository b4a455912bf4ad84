"""One search trial, the function Tune runs in each trial's actor.

A module of its own so that a trial actor imports only the spec and Ray Tune (~180 MB) until it
trains: under successiveHalving every trial's actor exists from the start and most of them wait
(`halving.wait_for_slot`), and importing the training side (torch, transformers, DeepSpeed) first
doubled what each waiting one held (~390 MB; 27 of them took 10 GB on a 24 GB machine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray import tune

from . import halving
from .spec import FineTuneJob
from .spec.search import trial_spec

if TYPE_CHECKING:
    from .persist import Persistence


def run_trial(config: dict[str, Any], *, base: dict[str, Any], shared: dict[str, Any], persistence: Persistence, trials_path: str,
              run_id: str) -> None:
    """The base spec with this trial's values, trained exactly as a plain run is. A trial started
    again (resumed after a pause, or in a restored search) reuses its name and folder, where Ray
    Train finds its latest checkpoint and continues from it."""
    job = FineTuneJob.model_validate(base)
    search = job.spec.search
    assert search is not None
    trial = job.model_copy(update={"spec": trial_spec(job.spec, {**search.fixed_params(), **config})})
    name = tune.get_context().get_trial_name()
    if search.scheduler.type == "successiveHalving":
        halving.wait_for_slot(run_id, name)

    from ray.tune.integration.ray_train import TuneReportCallback

    from .run import make_trainer  # the training side, only now (the module's docstring)

    make_trainer(trial, shared, persistence=persistence, storage_path=trials_path, name=name,
                 callbacks=[TuneReportCallback()], trial=name).fit()
