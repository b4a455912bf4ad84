"""What clusters do to a run, as status: pure functions (no client, clock or env var).

- **Results before Succeeded.** KubeRay says a run succeeded when the driver process exits 0; the
  job's figures (best trial, its checkpoint, the exported model) are in the trainer's final
  status.json, which the operator reads from the job's progress ConfigMap. Until that final
  document has been read, the job stays Running with reason WaitingForResults and the
  ResultsPending condition (`hold_for_results`); the progress poll reads again, sooner at first
  (`results_poll_delay`), and `results_arrived` then makes it Succeeded. A document that never
  comes (the driver's last write failed every retry) ends the wait after `RESULTS_WAIT`:
  Succeeded with reason ResultsUnavailable and a message saying where the figures are.
- **A lost RayJob.** A RayJob deleted (by a person, a GitOps prune, a namespace clean-up of the
  wrong thing) while its run had not finished is re-created, and the run continues from its latest
  complete checkpoint: every RayJob of one job generation carries the same run id, so the
  trainer's `spec.storage.resume: auto` finds the run's checkpoints. Where it could only train
  again from step 0 (`resume: never`, or no spec.storage: the checkpoints were on the lost Ray
  cluster's disks) the job fails with reason RayJobLost instead (`lost_rayjob`).
- **Resumes as Events.** The trainer lists each resume (from which checkpoint and step, what it
  skipped and why) in status.json; `new_resumes` picks those the operator has not reported yet.
- **Non-finite loss.** A run the trainer stopped because the loss became NaN/inf fails with
  reason NonFiniteLoss and the step (`non_finite_loss`), not KubeRay's generic Failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from finetune_trainer.spec import FineTuneJob
from finetune_trainer.spec.progress import FINISHED, ProgressDocument, Resume

from .status_mapping import conditioned, observe, set_condition, with_progress
from .status_model import ConditionType, FineTuneJobStatus, Phase, Reason

RESULTS_WAIT = timedelta(minutes=10)  # the driver retries its final write for ~30 s; this is far beyond
WAITING_MESSAGE = "the run finished; waiting for its final results (the trainer's status.json)"


# ------------------------------------------------------------------ results before Succeeded
def final_results(progress: ProgressDocument | None, *, run_id: str | None, since: datetime | None) -> bool:
    """`progress` is this run's final document: state finished, and this run's: its run id, or
    (a run the trainer named itself, e.g. a restored search) written after the RayJob was created
    (`since`), so not an earlier generation's document still in the ConfigMap."""
    if progress is None or progress.state != FINISHED:
        return False
    if run_id is not None and progress.run == run_id:
        return True
    return since is not None and progress.updated >= since


def hold_for_results(status: FineTuneJobStatus, progress: ProgressDocument | None, *, run_id: str | None,
                     since: datetime | None, generation: int, now: datetime) -> FineTuneJobStatus:
    """KubeRay's Succeeded before the final status.json is read: Running, WaitingForResults."""
    if status.phase != Phase.SUCCEEDED or final_results(progress, run_id=run_id, since=since):
        return _results_read(status)
    held = status.model_copy(deep=True)
    held.phase, held.reason, held.completion_time = Phase.RUNNING, Reason.WAITING_FOR_RESULTS, None
    held.message = with_progress(WAITING_MESSAGE, held)
    held.conditions = set_condition(held.conditions, ConditionType.RESULTS_PENDING, True, Reason.WAITING_FOR_RESULTS,
                                     WAITING_MESSAGE, generation, now)
    return conditioned(held, generation, now, ready=False, reconciling=True, stalled=False)


def results_arrived(status: FineTuneJobStatus, progress: ProgressDocument | None, *, run_id: str | None,
                    since: datetime | None, generation: int, now: datetime) -> FineTuneJobStatus:
    """The wait ends: Succeeded once the final document is here (the caller has applied it), or
    after RESULTS_WAIT without it (ResultsUnavailable). Any other status passes through."""
    if status.reason != Reason.WAITING_FOR_RESULTS:
        return status
    if final_results(progress, run_id=run_id, since=since):
        reason, message = Reason.SUCCEEDED, "the run finished"
    elif now - waiting_since(status, now) >= RESULTS_WAIT:
        reason, message = Reason.RESULTS_UNAVAILABLE, (
            "the run finished, but its final status.json never reached the progress ConfigMap; bestTrial and "
            "bestCheckpoint may be stale: results.json in the job's storage has the final figures")
    else:
        return status
    done = _results_read(status.model_copy(deep=True))
    done.phase, done.reason, done.completion_time = Phase.SUCCEEDED, reason, now
    done.message = with_progress(message, done)
    return conditioned(done, generation, now, ready=True, reconciling=False, stalled=False)


def waiting_since(status: FineTuneJobStatus, now: datetime) -> datetime:
    found = next((c for c in status.conditions if c.type == ConditionType.RESULTS_PENDING and c.status == "True"), None)
    return found.last_transition_time if found is not None else now


def results_poll_delay(status: FineTuneJobStatus, now: datetime, interval: float) -> float:
    """Seconds until the next read while waiting for results: 2, 4, 8 ... after the wait began,
    never more than the normal progress interval."""
    waited = (now - waiting_since(status, now)).total_seconds()
    delay = 2.0
    while delay < waited and delay < interval:
        delay *= 2
    return min(delay, interval)


def _results_read(status: FineTuneJobStatus) -> FineTuneJobStatus:
    status.conditions = [c for c in status.conditions if c.type != ConditionType.RESULTS_PENDING]
    return status


# ------------------------------------------------------------------ a lost RayJob
def resumable(job: FineTuneJob | None) -> bool:
    """Whether a new RayJob of this job continues its run rather than train again from step 0."""
    storage = job.spec.storage if job is not None else None
    return storage is not None and storage.resume != "never"


def run_ended(rayjob: Mapping[str, Any]) -> bool:
    """The RayJob's own last status says the run ended (it was deleted after, not during, it)."""
    return observe(rayjob.get("status")).phase.is_terminal()


def lost_rayjob(previous: FineTuneJobStatus, job: FineTuneJob | None, rayjob_name: str, *, generation: int,
                now: datetime) -> FineTuneJobStatus:
    """The status once the job's RayJob is gone before its run finished: Pending, re-created and
    resuming (`resumable`), else Failed with RayJobLost."""
    status = previous.model_copy(deep=True)
    status.observed_generation = generation
    if resumable(job):
        status.phase, status.reason = Phase.PENDING, Reason.RAYJOB_LOST
        status.message = (f"RayJob {rayjob_name} was deleted before the run finished; re-created: the run continues "
                          "from its latest complete checkpoint (spec.storage.resume: auto)")
        return conditioned(status, generation, now, ready=False, reconciling=True, stalled=False)
    why = ("spec.storage.resume is never" if job is not None and job.spec.storage is not None
           else "the job has no spec.storage, so its checkpoints were on the lost Ray cluster")
    status.phase, status.reason, status.completion_time = Phase.FAILED, Reason.RAYJOB_LOST, now
    status.message = (f"RayJob {rayjob_name} was deleted before the run finished, and {why}: a new RayJob would train "
                      "again from step 0, so none is created. Re-apply the FineTuneJob under a new name (or delete and "
                      "re-create it) to run it again")
    return conditioned(status, generation, now, ready=False, reconciling=False, stalled=True)


# ------------------------------------------------------------------ progress extras
def apply_lifecycle(previous: FineTuneJobStatus, progress: ProgressDocument | None) -> FineTuneJobStatus:
    """The run's attempt, restarts and newest complete checkpoint; the newest resume as seen (its
    Event is the handler's); a non-finite loss as the reason of a failed run."""
    if progress is None:
        return previous
    status = previous.model_copy(deep=True)
    status.attempt = progress.attempt or status.attempt
    status.restarts = progress.restarts if progress.restarts is not None else status.restarts
    if progress.last_checkpoint is not None:
        status.last_checkpoint = progress.last_checkpoint.model_copy()
    if progress.resumes:
        newest = max(r.time for r in progress.resumes)
        status.last_resume = max(newest, status.last_resume) if status.last_resume else newest
    if status.phase == Phase.FAILED and progress.non_finite_loss is not None:
        status.reason = Reason.NON_FINITE_LOSS
        status.message = (f"the training loss became NaN or infinite at step {progress.non_finite_loss} and the run "
                          "stopped (spec.training.nonFiniteLoss: stop): lower spec.training.learningRate, or set "
                          "nonFiniteLoss: skipStep to skip such steps")
    return status


def new_resumes(before: FineTuneJobStatus, progress: ProgressDocument | None) -> list[Resume]:
    """The resumes in `progress` newer than the last one reported, oldest first."""
    if progress is None:
        return []
    seen = before.last_resume
    return sorted((r for r in progress.resumes if seen is None or r.time > seen), key=lambda r: r.time)


def resume_message(resume: Resume) -> str:
    where = f"trial {resume.trial}: " if resume.trial else ""
    how = "worker group restarted; " if resume.source == "restart" else ""
    text = f"{where}{how}resumed from step {resume.step} ({resume.checkpoint})"
    if resume.attempt and resume.attempt > 1:
        text += f", attempt {resume.attempt}"
    if resume.skipped:
        text += "; skipped " + "; ".join(f"{s.checkpoint}: {s.reason}" for s in resume.skipped)
    return text
