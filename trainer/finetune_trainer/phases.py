"""Where a run's start-up time goes: wall-clock marks of one worker's set-up phases.

Rank 0 logs them once, at debug level, when its first optimizer step is done; `finetune run -v`
shows the line and bench/trial_startup.py reads it. Nothing else depends on it, and a mark costs a
clock read, so every run carries them (the phases a user waits through before the first step are
the fixed cost every start and every resume of a search trial pays again).

Wall-clock time (`time.time`), not `perf_counter`: the marks of different processes (the driver's
fit start, `driver.fit_polling`, and a worker's) lie on one axis on one machine. The worker
process's own start is psutil's `create_time` (psutil comes with Ray).
"""

from __future__ import annotations

import json
import logging
import time

MARKER = "start-up phases:"  # what bench/trial_startup.py looks for in the log
FIT_MARKER = "fit started at"
TRIAL_MARKER = "trial start-up:"

log = logging.getLogger(__name__)


class StartupClock:
    """Named wall-clock marks, in the order they happen; logged once by rank 0."""

    def __init__(self, trial: str | None = None) -> None:
        self.marks: dict[str, float] = {"process_started": process_started(), "loop_entered": time.time()}
        self.trial = trial  # the search trial these workers train, named in the logged line
        self.logged = False

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.time())  # the first time only: a phase that repeats counts once

    def log_once(self, rank: int) -> None:
        """The marks as one JSON line (rank 0, debug), the first time this is called."""
        if self.logged:
            return
        self.logged = True
        if rank == 0:
            log.debug("%s %s", MARKER, json.dumps(self.marks | ({"trial": self.trial} if self.trial else {})))


def process_started() -> float:
    """This process' start, wall clock."""
    import psutil  # type: ignore[import-untyped]  # no stubs installed; one call

    return float(psutil.Process().create_time())


_trials_in_process = 0


def trial_slot(entered: float) -> float:
    """When a search trial got its resources, for a trial without a gate: Tune starts a trial's
    actor once they are reserved, so the first trial of an actor got them at the process' start;
    a reused actor (tuning's reuse_actors) is handed the next trial's config right after they are
    reserved, so a later trial got them when its function was entered (`entered`)."""
    global _trials_in_process
    _trials_in_process += 1
    return process_started() if _trials_in_process == 1 else entered


def trial_started(trial: str, slot: float) -> None:
    """A search trial's actor, just before its fit(): when it got its slot, and now (debug)."""
    log.debug("%s %s", TRIAL_MARKER, json.dumps({"trial": trial, "slot_acquired": slot, "fit": time.time()}))
