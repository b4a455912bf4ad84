"""The progress poll: which FineTuneJobs need a periodic look, and the threads that look at each when due.

registration.py says why this is a thread of ours and not kopf's timers (their finalizer). Its own
small pool (POLL_WORKERS), apart from kopf's handler executor: however slow the looks are, a watch
event (a RayJob phase change) never waits behind one.

Cheap at a thousand jobs: the index is fed by the FineTuneJob watch (no list calls); the due jobs
come off a heap (the loop's 0.2 s wake-up costs O(due jobs), not O(watched jobs)); and each job's
looks are spread over the interval by a fixed offset taken from its name, so that jobs that start
together (a team submitting a sweep, an operator restart) are not all read in the same second,
every interval, with the rest of the interval idle.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import logging
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import kopf

from .lifecycle import results_poll_delay
from .status_model import FineTuneJobStatus, Phase, Reason

if TYPE_CHECKING:
    from .handlers import Operator

POLL_WORKERS = 4  # jobs read at once; the rest wait for the next free worker
WAKE = 0.2  # seconds between looks at the heap

log = logging.getLogger(__name__)
Key = tuple[str, str]

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


def spread(key: Key) -> float:
    """This job's fixed place in the interval, in [0, 1): from its namespace and name, so that it
    stays the same across events and restarts, and jobs' places are uniform."""
    return zlib.crc32(f"{key[0]}/{key[1]}".encode()) / 2**32


class ProgressPoll:
    """The jobs that need a periodic look (`due_work`), and a thread that looks at each when due."""

    def __init__(self, operator: Operator, *, interval: float, clock: Callable[[], float] = time.monotonic):
        self.operator, self.interval, self.clock = operator, interval, clock
        self.jobs: dict[Key, _Watched] = {}
        self.running: set[Key] = set()
        self._heap: list[tuple[float, int, Key]] = []  # (due, tie-breaker, job); stale entries are skipped
        self._order = itertools.count()
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
                # newly due: a rejected run's newer spec at once; progress at this job's place in the interval
                first = self.clock() + (spread(key) * self.interval if work == "progress" else 0.0)
                self._schedule(key, _Watched(work, first))

    def _schedule(self, key: Key, watched: _Watched) -> None:
        """(under the lock) record when `key` is next due and put it on the heap."""
        self.jobs[key] = watched
        heapq.heappush(self._heap, (watched.due, next(self._order), key))

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
            while not self.stopped.wait(WAKE):
                for key in self._take_due():
                    pool.submit(self.context.copy().run, self._look, key)

    def _take_due(self) -> list[Key]:
        """The jobs due now, off the heap. An entry whose job has gone, was rescheduled since, or
        is being looked at already is dropped (its job's current entry is elsewhere on the heap)."""
        now, due = self.clock(), []
        with self.lock:
            while self._heap and self._heap[0][0] <= now:
                when, _, key = heapq.heappop(self._heap)
                watched = self.jobs.get(key)
                if watched is None or watched.due != when or key in self.running:
                    continue
                due.append(key)
            self.running.update(due)
        return due

    def _look(self, key: Key) -> None:
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
                watched = self.jobs.get(key)
                if watched is not None:
                    # from when it was due, not when the look ended: the job keeps its place in the
                    # interval; a look that overran its interval is due at once
                    self._schedule(key, _Watched(watched.work, max(watched.due + delay, self.clock())))

    def _next_delay(self, status: FineTuneJobStatus | None) -> float:
        """The normal interval, or the results wait's shorter backoff (lifecycle.results_poll_delay),
        from the status the look just wrote: no second read of the job."""
        if status is not None and status.reason == Reason.WAITING_FOR_RESULTS:
            return results_poll_delay(status, datetime.now(UTC), self.interval)
        return self.interval
