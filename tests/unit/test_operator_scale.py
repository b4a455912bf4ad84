"""What keeps the operator cheap with many jobs (issue 19, item 3): the spec parsed once per
generation, the progress looks spread over the interval and taken off a heap, the jobs-by-phase
gauge kept per event without recounting, and no API request that can hang a thread for ever.
bench/operator_scale.py measures the figures; these tests pin the mechanisms."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from finetune_operator.handlers import Operator, OperatorConfig
from finetune_operator.kube import KubeApi, TimeoutApiClient
from finetune_operator.metrics import Metrics
from finetune_operator.progress_poll import ProgressPoll
from finetune_operator.spec_cache import SpecCache, parse_for_cluster
from finetune_trainer.spec import FineTuneJob, SpecError
from tests.unit.test_handlers import NOW, WRITTEN, FakeKube, FakeProgress, body, tick

RUNNING = {"phase": "Running", "reason": "Training", "message": "the trainer is running"}


class CountingParse:
    """The real parse (parse_job for the cluster), counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, manifest: dict[str, Any]) -> FineTuneJob:
        self.calls += 1
        return parse_for_cluster(manifest)


def test_the_poll_parses_a_jobs_spec_once_per_generation() -> None:
    parse, progress = CountingParse(), FakeProgress({**WRITTEN, "trials": {"total": 8, "completed": 3, "running": 2}})
    operator = Operator(kube=FakeKube(), progress=progress, metrics=Metrics(), config=OperatorConfig(),  # type: ignore[arg-type]
                        clock=lambda: NOW, post_event=lambda *_: None, specs=SpecCache(parse))
    for _ in range(5):
        tick(operator, body(status=RUNNING))
    assert (parse.calls, progress.reads) == (1, 5)
    tick(operator, body(generation=2, status=RUNNING, maxTrials=3))  # a spec change: parsed again
    tick(operator, body(generation=2, status=RUNNING, maxTrials=3))
    assert parse.calls == 2


def test_the_cache_keeps_a_specs_problems_and_drops_a_deleted_job() -> None:
    parse, cache = CountingParse(), None
    cache = SpecCache(parse)
    bad = body(training={"learningRate": -1})
    for _ in range(3):  # every caller gets the same field-naming error, from one parse
        with pytest.raises(SpecError) as err:
            cache.job(bad)
        assert any("learningRate" in path for path, _ in err.value.problems)
    assert parse.calls == 1
    job = cache.job(body(generation=2))  # fixed: a new generation, parsed
    assert isinstance(job, FineTuneJob) and parse.calls == 2 and len(cache) == 1
    cache.forget(bad["metadata"]["uid"])
    assert len(cache) == 0


def test_a_long_list_of_problems_is_shortened_once() -> None:
    problems = [(f"spec.f{i}", "wrong") for i in range(30)]

    def parse(_: dict[str, Any]) -> FineTuneJob:
        raise SpecError(problems)

    cache = SpecCache(parse)
    for _ in range(2):
        with pytest.raises(SpecError) as err:
            cache.job(body())
        assert err.value.problems[-1] == ("<manifest>", "and 10 more problem(s), not shown")
        assert len(err.value.problems) == SpecError.MAX_SHOWN + 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_jobs_that_start_together_are_looked_at_spread_over_the_interval() -> None:
    clock, interval = Clock(), 30.0
    poll = ProgressPoll(None, interval=interval, clock=clock)  # type: ignore[arg-type]  # no look is run here
    for i in range(1000):
        poll.seen("team", f"sweep-{i}", {"phase": "Running"}, {"generation": 1}, deleted=False)
    per_second = []
    for _ in range(int(interval)):
        clock.now += 1
        due = poll._take_due()
        per_second.append(len(due))
        poll.running.difference_update(due)
    assert sum(per_second) == 1000  # each job once in its first interval
    assert max(per_second) <= 60, per_second  # about 33 a second, not 1,000 in the first


def test_a_job_keeps_its_place_in_the_interval_and_stale_heap_entries_are_dropped() -> None:
    clock = Clock()
    poll = ProgressPoll(None, interval=30.0, clock=clock)  # type: ignore[arg-type]
    poll.seen("ns", "a", {"phase": "Running"}, {"generation": 1}, deleted=False)
    first = poll.jobs[("ns", "a")].due
    clock.now = first
    assert poll._take_due() == [("ns", "a")]
    poll.running.discard(("ns", "a"))
    with poll.lock:  # what _look's end does: from when it was due, not from when it ended
        clock.now = first + 7
        poll._schedule(("ns", "a"), type(poll.jobs[("ns", "a")])("progress", max(first + 30, clock.now)))
    assert poll.jobs[("ns", "a")].due == first + 30
    poll.seen("ns", "a", {"phase": "Succeeded"}, {"generation": 1}, deleted=False)  # no longer due
    clock.now = first + 100
    assert poll._take_due() == [] and poll._heap == []


def test_the_phase_gauge_moves_one_job_per_event() -> None:
    metrics = Metrics()
    for i in range(500):
        metrics.job_seen("ns", f"j{i}", "Running")
    metrics.job_seen("ns", "j1", "Succeeded")
    metrics.job_seen("ns", "j1", "Succeeded")  # the same again: no change
    metrics.job_seen("ns", "j2", None, deleted=True)
    metrics.job_seen("ns", "never-seen", None, deleted=True)
    value = {s.labels["phase"]: s.value for m in metrics.registry.collect() if m.name == "finetune_operator_jobs"
             for s in m.samples}
    assert (value["Running"], value["Succeeded"], value["None"]) == (498, 1, 0)

    class NoIteration(dict):  # type: ignore[type-arg]
        def values(self) -> Any:
            raise AssertionError("job_seen went through every job")

    metrics._phases = NoIteration(metrics._phases)
    metrics.job_seen("ns", "j3", "Failed")  # O(1): the other jobs are not counted again


def test_an_api_server_that_never_answers_does_not_hold_a_thread() -> None:
    """A real listening socket that accepts and never answers: the request gives up after the
    client's read timeout instead of blocking the poll worker (or a handler thread) for ever."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        client = TimeoutApiClient(timeout=(1.0, 1.0))
        client.configuration.host = f"http://127.0.0.1:{server.getsockname()[1]}"
        # an emulator test earlier in this process loaded its kubeconfig as the client's default:
        # that default's token-refresh hook sets `host` back to the emulator on every request (the
        # kubernetes client's kube_config._set_config), so this copy must not keep it
        client.configuration.refresh_api_key_hook = None
        kube, outcome = KubeApi(client), {}

        def read() -> None:
            start = time.monotonic()
            try:
                kube.get_job("ns", "a")
            except Exception as err:  # urllib3's read timeout
                outcome["error"] = type(err).__name__
            outcome["seconds"] = time.monotonic() - start

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the request still hangs after 10 s"
        server.settimeout(1)
        server.accept()[0].close()  # the request reached this socket, the one that never answers
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):  # and only once: a timed-out read is not retried
            server.accept()
        assert "error" in outcome and outcome["seconds"] < 8, outcome  # one 1 s read timeout (4 if it were retried 3 times)


def test_the_operators_client_has_a_timeout_by_default() -> None:
    kube = KubeApi()
    assert isinstance(kube.custom.api_client, TimeoutApiClient) and kube.core.api_client is kube.custom.api_client


class CountingKube(FakeKube):
    def __init__(self) -> None:
        super().__init__()
        self.job_reads = 0

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.job_reads += 1
        return super().get_job(namespace, name)


def test_a_look_writes_from_the_job_it_just_read_and_rereads_only_on_a_conflict() -> None:
    kube = CountingKube()
    progress = FakeProgress({**WRITTEN, "trials": {"total": 8, "completed": 3, "running": 2}})
    operator = Operator(kube=kube, progress=progress, metrics=Metrics(), config=OperatorConfig(),  # type: ignore[arg-type]
                        clock=lambda: NOW, post_event=lambda *_: None)
    assert tick(operator, body(status=RUNNING))["trialsDone"] == "3/8"
    assert kube.job_reads == 0  # the poll's own read (the body it was given) was enough
    stale = body(status=RUNNING)
    kube.jobs["quickstart"] = {**body(status={**RUNNING, "trialsDone": "1/8"}), "metadata": {
        **stale["metadata"], "resourceVersion": "7"}}  # someone wrote since the poll read it
    progress.data = {**WRITTEN, "trials": {"total": 8, "completed": 4, "running": 2}}
    operator.poll_progress(stale)
    assert kube.job_reads == 1 and kube.jobs["quickstart"]["status"]["trialsDone"] == "4/8"
