"""The pure parts of surviving what clusters do: the operator's lifecycle rules (results before
Succeeded, a lost RayJob, resumes as Events), the driver's attempt count, its lifecycle fields and
its final status write, and the run id every attempt shares."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from finetune_operator.children import run_id_for
from finetune_operator.lifecycle import (
    RESULTS_WAIT,
    hold_for_results,
    lost_rayjob,
    new_resumes,
    results_arrived,
    results_poll_delay,
    resume_message,
)
from finetune_operator.status_model import FineTuneJobStatus, Phase, Reason
from finetune_trainer import job_status
from finetune_trainer.driver import check_run_id
from finetune_trainer.job_status import StatusPublisher, lifecycle, snapshot
from finetune_trainer.persist import open_storage
from finetune_trainer.spec import SpecError, parse_job
from finetune_trainer.spec.progress import ProgressDocument
from tests.unit.test_spec import minimal_manifest

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
RUN = "run-20260101-100000-abc-g1"


def succeeded() -> FineTuneJobStatus:
    return FineTuneJobStatus(phase=Phase.SUCCEEDED, reason=Reason.SUCCEEDED, message="the run finished",
                             start_time=NOW - timedelta(hours=1), completion_time=NOW)


def doc(state: str, run: str = RUN, updated: datetime = NOW, **fields) -> ProgressDocument:
    return ProgressDocument.model_validate({"job": "j", "run": run, "updated": updated.isoformat(), "state": state,
                                            "kind": "single", **fields})


def test_succeeded_waits_until_the_final_document_is_read():
    held = hold_for_results(succeeded(), doc("running"), run_id=RUN, since=NOW - timedelta(hours=1), generation=1, now=NOW)
    assert (held.phase, held.reason, held.completion_time) == (Phase.RUNNING, Reason.WAITING_FOR_RESULTS, None)
    assert {c.type: c.status for c in held.conditions} == {"ResultsPending": "True", "Ready": "False",
                                                                "Reconciling": "True", "Stalled": "False"}
    later = NOW + timedelta(seconds=30)
    assert results_arrived(held, doc("running"), run_id=RUN, since=None, generation=1, now=later) == held
    done = results_arrived(held, doc("finished"), run_id=RUN, since=None, generation=1, now=later)
    assert (done.phase, done.reason, done.completion_time) == (Phase.SUCCEEDED, Reason.SUCCEEDED, later)
    assert "ResultsPending" not in {c.type for c in done.conditions}


def test_a_final_document_from_another_run_is_not_this_runs_results():
    rayjob_created = NOW - timedelta(minutes=30)
    old = doc("finished", run="run-earlier", updated=NOW - timedelta(hours=2))
    assert hold_for_results(succeeded(), old, run_id=RUN, since=rayjob_created, generation=2, now=NOW).phase == Phase.RUNNING
    restored = doc("finished", run="run-restored-search", updated=NOW - timedelta(minutes=1))  # written after the RayJob
    assert hold_for_results(succeeded(), restored, run_id=RUN, since=rayjob_created, generation=2, now=NOW).phase == Phase.SUCCEEDED


def test_results_that_never_come_end_the_wait_as_results_unavailable():
    held = hold_for_results(succeeded(), None, run_id=RUN, since=None, generation=1, now=NOW)
    assert results_arrived(held, None, run_id=RUN, since=None, generation=1, now=NOW + RESULTS_WAIT / 2).phase == Phase.RUNNING
    gave_up = results_arrived(held, None, run_id=RUN, since=None, generation=1, now=NOW + RESULTS_WAIT)
    assert (gave_up.phase, gave_up.reason) == (Phase.SUCCEEDED, Reason.RESULTS_UNAVAILABLE)
    assert "results.json" in (gave_up.message or "")


def test_results_are_read_again_sooner_at_first():
    held = hold_for_results(succeeded(), None, run_id=RUN, since=None, generation=1, now=NOW)
    delays = [results_poll_delay(held, NOW + timedelta(seconds=s), 30) for s in (0, 3, 7, 20, 300)]
    assert delays == [2, 4, 8, 30, 30]


def test_a_lost_rayjob_is_recreated_only_where_the_run_can_continue():
    running = FineTuneJobStatus(phase=Phase.RUNNING, reason=Reason.TRAINING, ray_job_name="j-ray")
    auto = parse_job(minimal_manifest(storage={"uri": "s3://b-1/x"}))
    again = lost_rayjob(running, auto, "j-ray", generation=1, now=NOW)
    assert (again.phase, again.reason) == (Phase.PENDING, Reason.RAYJOB_LOST) and "re-created" in (again.message or "")
    for job, why in ((parse_job(minimal_manifest(storage={"uri": "s3://b-1/x", "resume": "never"})), "resume is never"),
                     (parse_job(minimal_manifest()), "no spec.storage"), (None, "no spec.storage")):
        failed = lost_rayjob(running, job, "j-ray", generation=1, now=NOW)
        assert (failed.phase, failed.reason) == (Phase.FAILED, Reason.RAYJOB_LOST) and why in (failed.message or "")


def test_each_resume_is_news_once():
    first = {"checkpoint": "s3://b/ck_4", "step": 4, "time": (NOW - timedelta(minutes=5)).isoformat(), "attempt": 2}
    second = {"checkpoint": "s3://b/ck_8", "step": 8, "time": NOW.isoformat(), "source": "restart", "attempt": 2,
              "skipped": [{"checkpoint": "s3://b/ck_12", "reason": "no _COMPLETE.json"}]}
    progress = doc("running", resumes=[second, first])
    fresh = new_resumes(FineTuneJobStatus(), progress)
    assert [r.step for r in fresh] == [4, 8]
    assert [r.step for r in new_resumes(FineTuneJobStatus(last_resume=NOW - timedelta(minutes=5)), progress)] == [8]
    assert new_resumes(FineTuneJobStatus(last_resume=NOW), progress) == []
    text = resume_message(fresh[1])
    assert "worker group restarted" in text and "step 8" in text and "attempt 2" in text and "ck_12: no _COMPLETE.json" in text


def test_every_attempt_of_a_generation_shares_its_run_id():
    meta = {"uid": "0b9f7c1e-aaaa-bbbb", "creationTimestamp": "2026-12-02T13:05:12Z"}
    assert run_id_for(meta, 1) == "run-20261202-130512-0b9f7c1e-g1" == run_id_for(dict(meta), 1)
    assert run_id_for(meta, 2) != run_id_for(meta, 1) != run_id_for({**meta, "uid": "ffff"}, 1)
    assert check_run_id(run_id_for(meta, 1)) and check_run_id(run_id_for({}, 1))


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "a..b", "x" * 101])
def test_a_run_id_is_one_safe_folder_name(bad):
    with pytest.raises(SpecError, match="--run-id"):
        check_run_id(bad)


def test_attempts_are_counted_per_run(tmp_path):
    persistence = open_storage(parse_job(minimal_manifest(output={"dir": str(tmp_path)})))
    assert [persistence.record_attempt("run-a") for _ in range(3)] == [1, 2, 3]
    assert persistence.record_attempt("run-b") == 1
    (persistence.local_dir / "run-c").mkdir(parents=True)
    (persistence.local_dir / "run-c" / "attempts.json").write_text("not json")
    assert persistence.record_attempt("run-c") == 1  # unreadable: counted afresh, never a crash


def test_lifecycle_fields_count_restarts_and_keep_the_resumes_worth_an_event():
    tracked = {"restarts": 2, "last_checkpoint": {"uri": "s3://b/ck", "step": 12, "time": NOW.isoformat()},
               "resumes": [{"trial": "t1", "checkpoint": "c1", "step": 4, "source": "resume"},
                           {"trial": "t1", "checkpoint": "c2", "step": 8, "source": "resume"},  # a halving continuation
                           {"trial": "t2", "checkpoint": "c3", "step": 4, "source": "restart"}]}
    fields = lifecycle(3, tracked)
    assert (fields["attempt"], fields["restarts"]) == (3, 4)
    assert [r["checkpoint"] for r in fields["resumes"]] == ["c1", "c3"] and all(r["attempt"] == 3 for r in fields["resumes"])
    assert [r["checkpoint"] for r in lifecycle(1, tracked)["resumes"]] == ["c3"]  # first attempt: restarts only
    assert lifecycle(1, {})["restarts"] == 0


def test_the_final_status_is_retried_and_progress_is_not():
    calls: list[str] = []
    slept: list[float] = []

    def flaky(document):
        calls.append(document["state"])
        if len(calls) < 3:
            raise OSError("503 SlowDown")

    publisher = StatusPublisher(flaky, sleep=slept.append)
    publisher.decorate = lambda: {"attempt": 2, "restarts": 1, "last_checkpoint": None, "resumes": []}
    publisher.publish(snapshot("j", RUN, kind="single", state="running"))
    assert calls == ["running"] and slept == []  # progress: best effort, one try
    calls.clear()
    publisher.publish(snapshot("j", RUN, kind="single", state="finished"), final=True)
    assert calls == ["finished"] * 3 and slept == [1.0, 2.0]
    written: list[dict] = []
    StatusPublisher(written.append).publish(job_status.invalid("j", kind="single", problems=[("spec.x", "bad")]))
    assert "attempt" not in written[0]  # a verdict carries no progress
    decorated: list[dict] = []
    publisher = StatusPublisher(decorated.append)
    publisher.decorate = lambda: {"attempt": 2, "restarts": 1, "last_checkpoint": None, "resumes": []}
    publisher.publish(snapshot("j", RUN, kind="single", state="running"))
    assert (decorated[0]["attempt"], decorated[0]["restarts"]) == (2, 1)


def test_a_run_stopped_by_a_non_finite_loss_fails_with_that_reason_and_step():
    from finetune_operator.lifecycle import apply_lifecycle

    failed = FineTuneJobStatus(phase=Phase.FAILED, reason=Reason.FAILED, message="the run ended with Ray job status FAILED")
    status = apply_lifecycle(failed, doc("failed", nonFiniteLoss=17, attempt=1, restarts=0))
    assert status.reason == Reason.NON_FINITE_LOSS and "step 17" in (status.message or "")
    running = FineTuneJobStatus(phase=Phase.RUNNING, reason=Reason.TRAINING)
    assert apply_lifecycle(running, doc("running", attempt=2, restarts=3)).model_dump() == \
        running.model_copy(update={"attempt": 2, "restarts": 3}).model_dump()


@pytest.mark.parametrize("name", ["FINETUNE_RUN_ID", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
def test_a_job_cannot_set_the_run_id_or_the_drain_window_itself(name):
    """A hostile (or copied) env entry must not point a run at another run's checkpoints, nor
    stretch the drain past the pods' grace period: both are the operator's to render."""
    with pytest.raises(SpecError) as err:
        parse_job(minimal_manifest(cluster={"env": [{"name": name, "value": "run-of-another-job"}]}), for_cluster=True)
    assert any(path.startswith("spec.cluster.env") and name in message for path, message in err.value.problems)


def test_results_and_status_files_are_strict_json_even_for_a_diverged_run(tmp_path):
    import json

    from finetune_trainer.storage import LocalStore, write_json

    write_json(LocalStore(tmp_path), "results.json", {"history": [{"step": 3, "train_loss": float("nan")}],
                                                       "best": {"value": float("inf")}})
    strict = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the file"))
    assert strict == {"history": [{"step": 3, "train_loss": None}], "best": {"value": None}}
