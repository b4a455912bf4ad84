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
reads each due job fresh before acting on it.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf

from .crd import GROUP, PLURAL, VERSION
from .handlers import Operator
from .kube import RAY_GROUP, RAY_VERSION, RAYJOBS
from .lifecycle import results_poll_delay
from .status_model import FineTuneJobStatus, Phase, Reason

MANAGED_BY = {"app.kubernetes.io/managed-by": "finetune-operator"}  # rayjob.labels() puts it on every RayJob
FINALIZER = f"{GROUP}/operator"  # what kopf's timers added (before this module): named so kopf removes it
QUIET_HANDLERS = ("rayjob-status", "phase-gauge")  # watch-event handlers whose every success is no news
POLL_WORKERS = 4  # jobs read at once; the rest wait for the next free worker

log = logging.getLogger(__name__)


def newer_spec_waits(status: Mapping[str, Any], meta: Mapping[str, Any]) -> bool:
    """The trainer rejected an older generation's run while a newer spec waited (`Operator._rejected`)."""
    observed = status.get("observedGeneration") or 0
    return status.get("reason") == Reason.INVALID_SPEC and 0 < observed < (meta.get("generation") or 1)


def due_work(status: Mapping[str, Any], meta: Mapping[str, Any]) -> str | None:
    """What the poll does for a job in this state: "progress", "newer-spec" or nothing."""
    if status.get("phase") == Phase.RUNNING:
        return "progress"
    return "newer-spec" if newer_spec_waits(status, meta) else None


@dataclass
class _Watched:
    work: str
    due: float  # time.monotonic() of the next run


class ProgressPoll:
    """The jobs that need a periodic look (`due_work`), and a thread that looks at each when due."""

    def __init__(self, operator: Operator, *, interval: float, clock: Callable[[], float] = time.monotonic):
        self.operator, self.interval, self.clock = operator, interval, clock
        self.jobs: dict[tuple[str, str], _Watched] = {}
        self.running: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.context = contextvars.copy_context()

    # ------------------------------------------------------------------ the index (watch events)
    def seen(self, namespace: str, name: str, status: Mapping[str, Any], meta: Mapping[str, Any], *, deleted: bool) -> None:
        key, work = (namespace, name), None if deleted else due_work(status, meta)
        with self.lock:
            if work is None:
                self.jobs.pop(key, None)
            elif key not in self.jobs or self.jobs[key].work != work:
                self.jobs[key] = _Watched(work, self.clock())  # newly due: look now (a kopf timer's first run)

    # ------------------------------------------------------------------ the loop
    def start(self) -> None:
        """Start polling (once), in the caller's context: a resource handler's. `kopf.event` needs
        the context variables kopf sets for those (its settings, the Event queue and its loop; a
        startup activity has not all of them), and each look runs in a copy of them."""
        with self.lock:
            if self.thread is not None or self.stopped.is_set():
                return
            self.context = contextvars.copy_context()
            self.thread = threading.Thread(target=self._loop, name="progress-poll", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def _loop(self) -> None:
        with ThreadPoolExecutor(POLL_WORKERS, thread_name_prefix="progress-poll") as pool:
            while not self.stopped.wait(0.2):
                for key in self._take_due():
                    pool.submit(self.context.copy().run, self._look, key)

    def _take_due(self) -> list[tuple[str, str]]:
        now = self.clock()
        with self.lock:
            due = [k for k, w in self.jobs.items() if w.due <= now and k not in self.running]
            self.running.update(due)
        return due

    def _look(self, key: tuple[str, str]) -> None:
        delay = self.interval
        try:
            body = self.operator.kube.get_job(*key)
            if body is None:
                return
            work = due_work(body.get("status") or {}, body["metadata"])
            with self.operator.metrics.reconcile("progress" if work == "progress" else "reconcile"):
                if work == "progress":
                    delay = self._next_delay(self.operator.poll_progress(body))
                elif work == "newer-spec":
                    self.operator.retry_newer_spec(body, log)
        except kopf.TemporaryError as err:
            delay = err.delay or self.interval
        except Exception:  # one job's failure must not stop the others' polls; the next look tries again
            log.exception("progress poll of %s/%s failed", *key)
        finally:
            with self.lock:
                self.running.discard(key)
                if key in self.jobs:
                    self.jobs[key].due = self.clock() + delay

    def _next_delay(self, status: FineTuneJobStatus | None) -> float:
        """The normal interval, or the results wait's shorter backoff (lifecycle.results_poll_delay),
        from the status the look just wrote: no second read of the job."""
        if status is not None and status.reason == Reason.WAITING_FOR_RESULTS:
            return results_poll_delay(status, datetime.now(UTC), self.interval)
        return self.interval


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

    return poll
