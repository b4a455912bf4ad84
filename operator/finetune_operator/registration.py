"""Wiring the Operator's handlers into kopf, and the progress poll that replaces kopf's timers.

    FineTuneJob create / resume / update(spec)  -> Operator.reconcile
    RayJob event (ours, by label)               -> Operator.rayjob_changed (DELETED included: a lost run)
    FineTuneJob event                           -> the jobs-by-phase gauge, and the poll's index
    the poll, every progress interval           -> Operator.poll_progress for Running jobs (sooner
                                                   while a finished run's results are awaited), and
                                                   Operator.retry_newer_spec for a rejected run's newer spec

Why not `kopf.timer`: kopf adds its finalizer to every object a timer or daemon watches, so that it
can stop them before the object goes, and only a running operator removes that finalizer. With the
operator down or uninstalled, `kubectl delete ftj` would hang until someone patched the finalizer
away by hand. Nothing here needs to run before a FineTuneJob goes (its children carry owner
references; the garbage collector deletes them), so no handler requires a finalizer, and kopf
removes the one older versions of this operator added the next time it handles the object. The
poll is a thread of ours over an index the watch keeps (no extra API calls to find the jobs); it
reads each due job fresh before acting on it (progress_poll.py).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from .crd import GROUP, PLURAL, VERSION
from .handlers import Operator
from .kube import RAY_GROUP, RAY_VERSION, RAYJOBS
from .progress_poll import ProgressPoll

MANAGED_BY = {"app.kubernetes.io/managed-by": "finetune-operator"}  # rayjob.labels() puts it on every RayJob
FINALIZER = f"{GROUP}/operator"  # what kopf's timers added (before this module): named so kopf removes it
QUIET_HANDLERS = ("rayjob-status", "phase-gauge")  # watch-event handlers whose every success is no news

log = logging.getLogger(__name__)


def register(operator: Operator, registry: kopf.OperatorRegistry) -> ProgressPoll:
    """Attach the handlers to `registry` (the CLI builds the Operator, then runs kopf with it)."""
    poll = ProgressPoll(operator, interval=operator.config.progress_interval)

    @kopf.on.startup(registry=registry, id="settings")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf keeps its bookkeeping in annotations: the status is ours alone (and schema-checked)
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
        settings.persistence.finalizer = FINALIZER
        settings.posting.loggers = False  # Events only from Operator.post_event: the major transitions
        settings.posting.level = logging.INFO

    @kopf.on.cleanup(registry=registry, id="stop-poll")
    def stop_poll(**_: Any) -> None:
        poll.stop()

    @kopf.on.login(registry=registry, id="login")
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # a registry of our own gets none of kopf's default login handlers: the kubernetes
        # client's (in-cluster service account, else the kubeconfig) is the one we load anyway
        return kopf.login_via_client(**kwargs)

    # one reconcile, three causes: created, seen again after an operator restart, spec changed
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="create")
    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry, id="resume")
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry, id="update")
    def on_job(body: kopf.Body, logger: Any, **_: Any) -> None:
        with operator.metrics.reconcile("reconcile"):
            operator.reconcile(body, logger)

    @kopf.on.event(RAY_GROUP, RAY_VERSION, RAYJOBS, labels=MANAGED_BY, registry=registry, id="rayjob-status")
    def on_rayjob(type: str, body: kopf.Body, logger: Any, **_: Any) -> None:
        with operator.metrics.reconcile("rayjob"):
            operator.rayjob_changed(type, body, logger)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="phase-gauge")
    def on_job_event(type: str, name: str, namespace: str | None, status: kopf.Status, meta: kopf.Meta, **_: Any) -> None:
        deleted = type == "DELETED"
        operator.metrics.job_seen(namespace or "", name, status.get("phase"), deleted=deleted)
        poll.start()  # on the first job seen: in a handler's context (ProgressPoll.start says why)
        poll.seen(namespace or "", name, status, meta, deleted=deleted)
        if deleted:
            operator.specs.forget(meta.get("uid"))

    return poll
