"""`run`: one FineTuneJob from manifest to exported model on Ray (local, or the cluster in RAY_ADDRESS).

A dispatcher: the session (session.py) sets up storage, preflight, Ray and progress reporting and
owns the failure path; the flow is the single run (single.py) or the search (tuning.py). Callers
outside the CLI set the process environment first, as the entry points do (`environment.prepare`).
"""

from __future__ import annotations

from .driver import Listener, RunResult
from .session import DriverSession
from .sigterm import save_on_sigterm
from .single import run_single
from .spec import FineTuneJob
from .tuning import run_search

__all__ = ["RunResult", "run"]


def run(job: FineTuneJob, *, on_progress: Listener | None = None, run_id: str | None = None,
        resume: str | None = None) -> RunResult:
    """`resume` (none | latest | a checkpoint URI) overrides spec.storage.resume; `finetune run
    --resume` passes latest. A single run continues from that checkpoint in a new run folder; a
    search restores its latest Tune experiment (finished trials keep their results, unfinished and
    errored ones continue from their own latest complete checkpoints)."""
    flow = run_search if job.spec.search is not None else run_single
    with DriverSession(job, run_id=run_id, resume=resume) as session, \
            save_on_sigterm(job, session.persistence.store, session.persistence.key(session.run_id)):
        return flow(session, on_progress)
