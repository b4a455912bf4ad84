"""The kopf handlers: parse the spec -> call the builders -> apply -> write the status once.

    FineTuneJob create / resume / update(spec)  -> `Operator.reconcile`: validate (with the
        shared-cluster rules), get-or-create the job's progress ConfigMap and the ServiceAccount/
        Role that may write it (trainer_access), then the RayJob (`<job>-ray`, owned by the job),
        push the live run-policy fields (suspend, deadline, TTL) to it, flag immutable changes
    RayJob event (the ones we manage)           -> `Operator.rayjob_changed`: KubeRay's status
        mapped into the owner's status (status_mapping), Events on phase changes
    the progress poll while Running             -> `Operator.poll_progress`: the trainer's
        status.json (progress.py) mirrored into trials / bestTrial / bestCheckpoint / lastCheckpoint,
        an Event per resume, and a finished run made Succeeded once its final results are read
    RayJob DELETED before the run ended         -> re-created (the run resumes) or Failed/RayJobLost
        (lifecycle.py); at operator start-up, reconcile finds the same and does the same
    status.json `state: invalid` (the poll, or the RayJob ending or retrying) -> Stalled/InvalidSpec
        naming the fields, as the operator's own validation, and the RayJob deleted: no retry runs
        it again, and reconcile creates none until the spec changes (a new generation). If the
        spec was already changed while the rejected run ran, the poll (`retry_newer_spec`) runs
        the newer spec once the rejected RayJob is gone
    FineTuneJob event                           -> the jobs-by-phase gauge

Every status write goes through `status_writer.write_status` (read the job, compute from that
read, patch with its resourceVersion, recompute on a conflict), never kopf's `patch.status`: the
three writers above run concurrently, and a write computed from an older body must not land over
a newer one (status_writer says why).

Outcomes are kopf's: an invalid spec is a `PermanentError` (Stalled/InvalidSpec, no RayJob, no
retry until the spec changes). Anything else is retried by kopf with backoff. The operator reads
no Secret: a credentials Secret the spec names reaches the pods as secretKeyRef, and a missing one
shows as pods that cannot start (docs/security.md says why the operator does not look).

With spec.cluster.dashboard.ingress, reconcile also gets or creates the dashboard's Ingress
(ingress.py), and status.dashboardURL is its URL. Before the RayJob, it gets or creates the job's
NetworkPolicy (networkpolicy.py), unless the operator runs with --no-network-policies.

Deletion: the RayJob, the Ingress and the NetworkPolicy carry an ownerReference (controller) to the
FineTuneJob, so Kubernetes' garbage collector deletes them, and KubeRay its Ray cluster, with the job. The only
thing the operator deletes itself is the RayJob of a spec the trainer rejected; never anything in
S3: checkpoints and models outlive the FineTuneJob by design. No finalizer: deleting a FineTuneJob
never waits for the operator (registration.py says why the progress poll is ours, not kopf's timer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, cast

import kopf

from finetune_trainer.spec import FineTuneJob, SpecError
from finetune_trainer.spec.progress import ProgressDocument
from finetune_trainer.spec.queueing import queue_labels, queue_problems

from .changes import immutable_changes, mutable_patch
from .children import controller_of, owned_by, run_id_for
from .config import OperatorConfig
from .crd import KIND
from .ingress import dashboard_url
from .job_children import ensure_ingress, ensure_network_policy, ensure_trainer_access
from .kube import KubeApi
from .kueue import kueue_observation
from .lifecycle import (
    apply_lifecycle,
    hold_for_results,
    lost_rayjob,
    new_resumes,
    results_arrived,
    resume_message,
    run_ended,
)
from .metrics import Metrics
from .progress import ProgressSource
from .rayjob import ray_auth_enabled, rayjob_name, render_rayjob, rendered_generation
from .spec_cache import SpecCache
from .status_mapping import (
    RAY_AUTH_DISABLED_MESSAGE,
    apply_progress,
    created_at,
    failed_status,
    next_status,
    ray_auth_disabled,
    rejected_status,
    spec_change_ignored,
    trainer_problems,
)
from .status_model import FineTuneJobStatus, Phase, Reason
from .status_writer import StatusWrite, read_status, write_status


@dataclass
class Operator:
    kube: KubeApi
    progress: ProgressSource
    metrics: Metrics
    config: OperatorConfig = field(default_factory=OperatorConfig)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    specs: SpecCache = field(default_factory=SpecCache)  # parsed once per (uid, generation)
    post_event: Callable[[Mapping[str, Any], str, str, str], None] = lambda body, kind, reason, message: kopf.event(
        cast(kopf.Body, body), type=kind, reason=reason, message=message)  # a Kubernetes Event on the FineTuneJob

    def reconcile(self, body: Mapping[str, Any], logger: logging.Logger | logging.LoggerAdapter) -> None:
        meta = body["metadata"]
        namespace, name, uid, generation = meta["namespace"], meta["name"], meta["uid"], meta.get("generation", 1)
        previous, now = read_status(body), self.clock()
        existing = self.kube.get_rayjob(namespace, rayjob_name(name))
        try:
            job = self.specs.job(body)
            if queueing := queue_problems(meta.get("labels"), job.spec.run_policy.suspend):  # labels: not in the cached parse
                raise SpecError(queueing)
        except SpecError as err:
            self._invalid(body, err, existing, generation, now)
        if existing is None and _finished(previous, generation):
            return  # its RayJob was removed after the run ended: never re-run a finished job on a restart
        lost = existing is None and _lost(previous, generation)  # deleted while the operator was down
        if lost and not self._rayjob_lost(body, job, previous.ray_job_name or rayjob_name(name)):
            return  # Failed/RayJobLost: a new RayJob could only train again from step 0
        if existing is not None and existing["metadata"].get("deletionTimestamp"):  # a rejected run's, going
            raise kopf.TemporaryError(f"RayJob {rayjob_name(name)} is being deleted; waiting for it to go",
                                      delay=self.config.conflict_retry_delay)
        if existing is None:  # the ServiceAccount, Role and ConfigMap the run reports through
            ensure_trainer_access(self.kube, self.config, job, uid)
        ensure_network_policy(self.kube, self.config, job, uid, body, self.post_event)  # before the RayJob: no Ray pod starts unguarded
        rayjob, created = (existing, False) if existing is not None else self.kube.get_or_create_rayjob(
            render_rayjob(job, owner_uid=uid, generation=generation, run_id=run_id_for(meta, generation), queue=queue_labels(meta.get("labels"))))
        if not owned_by(rayjob, uid):
            raise kopf.TemporaryError(f"RayJob {rayjob_name(name)} exists and is not owned by this FineTuneJob; "
                                      "waiting for it to go", delay=self.config.conflict_retry_delay)
        if created:
            self.post_event(body, "Normal", "RayJobCreated", f"created RayJob {rayjob['metadata']['name']}")
            if not ray_auth_enabled(rayjob):
                self.post_event(body, "Warning", Reason.RAY_AUTH_DISABLED, RAY_AUTH_DISABLED_MESSAGE)
        elif live := mutable_patch(render_rayjob(job, owner_uid=uid), rayjob):
            rayjob = self.kube.patch_rayjob_spec(namespace, rayjob["metadata"]["name"], live)
            self.post_event(body, "Normal", "RunPolicyApplied", f"RayJob spec updated: {live}")
        changed = [] if created else immutable_changes(job, rayjob)
        if not changed:  # a changed spec reaches neither the run nor its dashboard
            ensure_ingress(self.kube, job, uid, body, self.post_event)
        url, auth_disabled, name_of_run = previous.dashboard_url if changed else dashboard_url(job), not ray_auth_enabled(rayjob), rayjob["metadata"]["name"]

        def change(current: FineTuneJobStatus, _: Mapping[str, Any]) -> FineTuneJobStatus:
            status = next_status(current, rayjob.get("status"), generation=generation, now=now, ray_job_name=name_of_run,
                                 dashboard_url=current.dashboard_url if changed else url, kueue=kueue_observation(rayjob))
            status = spec_change_ignored(status, changed, generation=generation, now=now)
            return ray_auth_disabled(status, auth_disabled, generation=generation, now=now)  # the run's, not the spec's

        written = write_status(self.kube, namespace, name, uid, change)
        if changed and written is not None:
            self.post_event(body, "Warning", Reason.IMMUTABLE_FIELD_CHANGED, _condition_message(written.status))

    def rayjob_changed(self, event_type: str, rayjob: Mapping[str, Any], logger: logging.Logger | logging.LoggerAdapter) -> None:
        owner = controller_of(rayjob)
        if owner is None:
            return
        if event_type == "DELETED":
            self._rayjob_deleted(owner, rayjob, logger)
            return
        now = self.clock()
        problems: list[tuple[str, str]] = []
        progress: ProgressDocument | None = None

        def change(previous: FineTuneJobStatus, body: Mapping[str, Any]) -> FineTuneJobStatus:
            nonlocal problems, progress
            try:
                job: FineTuneJob | None = self.specs.job(body)
            except SpecError:
                job = None
            generation = previous.observed_generation or body["metadata"].get("generation", 1)
            status = next_status(previous, rayjob.get("status"), now=now, generation=generation, ray_job_name=rayjob["metadata"]["name"],
                                 dashboard_url=previous.dashboard_url or (dashboard_url(job) if job else None),  # reconcile sets it
                                 kueue=kueue_observation(rayjob))
            problems = []
            # the run ended or KubeRay retries it: the last trials finished since the last tick, or the
            # trainer's preflight rejected the spec (then no retry may run it again)
            if job is not None and _ended(previous, status):
                progress = self.progress.read(job)
                problems = trainer_problems(progress, rayjob=rayjob)
                if problems:
                    return self._rejected(body, status, problems, rayjob)
                status = apply_lifecycle(apply_progress(status, progress), progress)
                status = hold_for_results(status, progress, run_id=_run_id(body, generation), since=created_at(rayjob),
                                          generation=generation, now=now)
            return status

        written = write_status(self.kube, rayjob["metadata"]["namespace"], owner["name"], owner["uid"], change)
        if written is None or not written.wrote:
            return
        previous, status = written.previous, written.status
        if status.phase != previous.phase and status.phase is not None:
            logger.info(f"{KIND} {owner['name']}: {previous.phase} -> {status.phase} ({status.reason})")
            kind = "Warning" if status.phase == Phase.FAILED else "Normal"
            self.post_event(written.body, kind, str(status.reason or status.phase), f"{status.phase}: {status.message}")
        self._post_resumes(written, progress)
        if problems:
            self._drop_run(written.body, rayjob)

    def poll_progress(self, body: Mapping[str, Any]) -> FineTuneJobStatus | None:
        """The poll's look while the job runs: the trainer's status.json into the status. Its write
        is computed from the status as it is when written: a tick that began while the job was
        Running and ends after the mirror wrote the run's end changes nothing (the mirror has
        already read the last progress). Returns the status as it now is (the poll's next delay
        depends on it), None when the job is gone or its spec does not parse."""
        try:
            job = self.specs.job(body)
        except SpecError:
            return None
        progress, rayjob, problems = self.progress.read(job), None, []
        waiting = read_status(body).reason == Reason.WAITING_FOR_RESULTS
        if trainer_problems(progress) or waiting:  # a verdict, or the final results: are they this run's?
            rayjob = self.kube.get_rayjob(job.metadata.namespace, rayjob_name(job.name))
            problems = trainer_problems(progress, rayjob=rayjob)

        def change(previous: FineTuneJobStatus, fresh: Mapping[str, Any]) -> FineTuneJobStatus:
            if previous.phase != Phase.RUNNING:  # ended (or started over) since the tick began: not the poll's to say
                return previous
            if problems:
                return self._rejected(fresh, previous, problems, rayjob)
            generation = previous.observed_generation or fresh["metadata"].get("generation", 1)
            status = apply_lifecycle(apply_progress(previous, progress), progress)
            return results_arrived(status, progress, run_id=_run_id(fresh, generation), since=created_at(rayjob),
                                   generation=generation, now=self.clock())

        meta = body["metadata"]
        if problems:  # the RayJob first: once the status says rejected, `retry_newer_spec` must find it gone or going
            self._drop_run(body, rayjob)
        written = write_status(self.kube, meta["namespace"], meta["name"], meta["uid"], change, fresh=None if problems else body)
        if problems and written is not None and written.wrote:
            self.post_event(written.body, "Warning", Reason.INVALID_SPEC, written.status.message or "")
        self._post_resumes(written, progress)
        if written is not None and written.wrote and written.previous.reason == Reason.WAITING_FOR_RESULTS != written.status.reason:
            kind = "Normal" if written.status.reason == Reason.SUCCEEDED else "Warning"
            self.post_event(written.body, kind, str(written.status.reason), f"{written.status.phase}: {written.status.message}")
        return written.status if written is not None else None

    def _post_resumes(self, written: StatusWrite | None, progress: ProgressDocument | None) -> None:
        """An Event for every resume status.json lists that the status had not seen yet."""
        if written is None or not written.wrote:
            return
        for resume in new_resumes(written.previous, progress):
            if written.status.last_resume is not None and resume.time <= written.status.last_resume:
                self.post_event(written.body, "Normal", Reason.RESUMED, resume_message(resume))

    def _rayjob_deleted(self, owner: Mapping[str, Any], rayjob: Mapping[str, Any], logger: logging.Logger | logging.LoggerAdapter) -> None:
        """The job's RayJob is gone. After its run ended (its last status says so), that is only
        the end seen late; while the job is being deleted, or after a rejected spec's run was
        dropped (`_drop_run`), nothing to do; otherwise the run was lost (lifecycle.lost_rayjob)."""
        meta = rayjob["metadata"]
        body = self.kube.get_job(meta["namespace"], owner["name"])
        if body is None or body["metadata"].get("uid") != owner.get("uid") or body["metadata"].get("deletionTimestamp"):
            return
        previous = read_status(body)
        if previous.phase is None or previous.phase.is_terminal() or previous.ray_job_name not in (None, meta["name"]):
            return
        if run_ended(rayjob):
            self.rayjob_changed("MODIFIED", rayjob, logger)
            return
        try:
            job: FineTuneJob | None = self.specs.job(body)
        except SpecError:
            job = None
        if job is not None and trainer_problems(self.progress.read(job), rayjob=rayjob):
            return  # dropped for the spec the trainer rejected: the mirror or the tick writes that verdict
        if self._rayjob_lost(body, job, meta["name"]):
            self.reconcile(self.kube.get_job(meta["namespace"], owner["name"]) or body, logger)

    def _rayjob_lost(self, body: Mapping[str, Any], job: FineTuneJob | None, name: str) -> bool:
        """Record a lost RayJob (lifecycle.lost_rayjob) with a Warning Event; True when a new one
        is to be created (the run resumes), False when the job failed instead."""
        meta, now = body["metadata"], self.clock()
        generation = meta.get("generation", 1)

        def change(previous: FineTuneJobStatus, _: Mapping[str, Any]) -> FineTuneJobStatus:
            if previous.phase is not None and previous.phase.is_terminal():
                return previous  # it ended meanwhile: nothing was lost
            return lost_rayjob(previous, job, name, generation=generation, now=now)

        written = write_status(self.kube, meta["namespace"], meta["name"], meta["uid"], change)
        if written is None or written.status.reason != Reason.RAYJOB_LOST:
            return False
        if written.wrote:
            self.post_event(written.body, "Warning", Reason.RAYJOB_LOST, written.status.message or "")
        return written.status.phase == Phase.PENDING

    def _rejected(self, body: Mapping[str, Any], previous: FineTuneJobStatus, problems: list[tuple[str, str]],
                  rayjob: Mapping[str, Any] | None) -> FineTuneJobStatus:
        """The verdict is on the generation the RayJob was rendered from. If the user has changed
        the spec since (a change to a running job is not applied), the status says so and keeps
        that older generation as observed, so `retry_newer_spec` runs the newer one once the
        rejected RayJob is gone; otherwise nothing runs until the spec changes."""
        current = body["metadata"].get("generation", 1)
        run = rendered_generation(rayjob) or previous.observed_generation or current
        return rejected_status(previous, problems, generation=run, now=self.clock(), newer=current if current > run else None)

    def retry_newer_spec(self, body: Mapping[str, Any], logger: logging.Logger | logging.LoggerAdapter) -> None:
        """A rejected run's spec was changed while it ran: reconcile the newer spec, which creates
        its RayJob once the rejected one is gone (until then reconcile asks to be retried)."""
        self.reconcile(body, logger)

    def _drop_run(self, body: Mapping[str, Any], rayjob: Mapping[str, Any] | None) -> None:
        """Delete the RayJob of a rejected spec: its Ray cluster goes, and KubeRay's backoffLimit
        cannot run it again. Not re-created until the spec changes (a new generation); the
        Failed/InvalidSpec status of this generation is what reconcile's `_finished` sees."""
        if rayjob is None or not owned_by(rayjob, body["metadata"]["uid"]):
            return
        meta = rayjob["metadata"]
        if self.kube.delete_rayjob(meta["namespace"], meta["name"], uid=meta.get("uid")):
            self.post_event(body, "Normal", "RayJobDeleted",
                            f"deleted RayJob {meta['name']}: the trainer rejected the spec; fix the fields named and it runs again")

    def _invalid(self, body: Mapping[str, Any], err: SpecError, existing: Mapping[str, Any] | None, generation: int,
                 now: datetime) -> NoReturn:
        meta = body["metadata"]
        message = "; ".join(f"{path}: {msg}" for path, msg in err.problems)
        running = existing is not None and owned_by(existing, meta["uid"])

        def change(previous: FineTuneJobStatus, _: Mapping[str, Any]) -> FineTuneJobStatus:
            if running:  # the run goes on with the valid spec it started from; the new one is reported, not applied
                return spec_change_ignored(previous, [p for p, _ in err.problems], generation=generation, now=now,
                                           reason=Reason.INVALID_SPEC, detail=f"the changed spec is invalid, not applied: {message}")
            return failed_status(previous, Reason.INVALID_SPEC, f"invalid spec: {message}", generation=generation, now=now)

        write_status(self.kube, meta["namespace"], meta["name"], meta["uid"], change)
        self.post_event(body, "Warning", Reason.INVALID_SPEC, message)
        raise kopf.PermanentError(f"invalid spec: {message}")



def _lost(status: FineTuneJobStatus, generation: int) -> bool:
    """A RayJob was created for this generation, the run has not ended, and the RayJob is gone
    (reconcile found none). Not when it was already found lost and is being re-created."""
    return bool(status.ray_job_name and status.phase and not status.phase.is_terminal()
                and status.reason != Reason.RAYJOB_LOST and status.observed_generation == generation)


def _run_id(body: Mapping[str, Any], generation: int) -> str:
    return run_id_for(body["metadata"], generation)


def _finished(status: FineTuneJobStatus, generation: int) -> bool:
    return bool(status.phase and status.phase.is_terminal() and status.ray_job_name and status.observed_generation == generation)


def _ended(previous: FineTuneJobStatus, status: FineTuneJobStatus) -> bool:
    """The run has just finished, or just failed and is about to be retried by KubeRay."""
    return (status.phase is not None and (status.phase.is_terminal() or status.reason == Reason.RETRYING)
            and (status.phase, status.reason) != (previous.phase, previous.reason))


def _condition_message(status: FineTuneJobStatus) -> str:
    return next((c.message for c in status.conditions if c.type == "SpecChangeIgnored"), "")
