"""The operator's Prometheus metrics (prometheus-client), served at :<metrics-port>/metrics.

    finetune_operator_jobs{phase}                         FineTuneJobs the operator sees, by status.phase
                                                          ("None" before the operator first wrote one)
    finetune_operator_reconcile_errors_total{handler}     handler runs that failed unexpectedly (kopf retries them)
    finetune_operator_reconcile_duration_seconds{handler} how long one handler run took (histogram)

One `Metrics` per operator, on its own registry (tests make fresh ones); no module globals.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import kopf
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .status_model import Phase

NO_PHASE = "None"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.jobs = Gauge("finetune_operator_jobs", "FineTuneJobs by status.phase.", ["phase"], registry=self.registry)
        self.errors = Counter("finetune_operator_reconcile_errors", "Handler runs that raised an error.", ["handler"],
                              registry=self.registry)
        self.duration = Histogram("finetune_operator_reconcile_duration_seconds", "Duration of one handler run.", ["handler"],
                                  registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self._phases: dict[tuple[str, str], str] = {}
        for phase in [*Phase, NO_PHASE]:
            self.jobs.labels(phase=str(phase)).set(0)

    def job_seen(self, namespace: str, name: str, phase: str | None, *, deleted: bool = False) -> None:
        """Track one job's phase from the FineTuneJob watch: move it from its old phase's count to
        its new one. O(1) per event: recounting every job on every event cost O(jobs) per event."""
        key = (namespace, name)
        old = self._phases.pop(key, None)
        new = None if deleted else (phase or NO_PHASE)
        if new is not None:
            self._phases[key] = new
        if old == new:
            return
        if old is not None:
            self.jobs.labels(phase=old).dec()
        if new is not None:
            self.jobs.labels(phase=new).inc()

    @contextlib.contextmanager
    def reconcile(self, handler: str) -> Iterator[None]:
        """Time one handler run; count it as an error if it raises something unplanned. kopf's
        PermanentError (an invalid spec) and TemporaryError (a missing Secret) are decisions the
        status already reports, not operator errors."""
        start = time.perf_counter()
        try:
            yield
        except (kopf.PermanentError, kopf.TemporaryError):
            raise
        except Exception:
            self.errors.labels(handler=handler).inc()
            raise
        finally:
            self.duration.labels(handler=handler).observe(time.perf_counter() - start)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
