"""A real synchronous successive-halving search: Tune pauses every trial at each rung until all
have reached it, keeps the best 1/reductionFactor, and those resume from their own checkpoint in a
new Ray Train run; at most maxConcurrentTrials train at once though every trial exists from the
start. Checked against what Tune itself wrote for each trial (result.json), not our results.json."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from pathlib import Path

import pytest

from finetune_trainer import scratch
from finetune_trainer.spec import parse_job

from . import tiny

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# evaluations (and checkpoints) every 2 steps: at each rung a trial holds at least three checkpoints, and
# retention (the latest and the best) has pruned one of them, whatever the losses were
RUNGS = (6, 12, 24)


def _evals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("baseline")]


@pytest.fixture(scope="module")
def halving_search(local_ray, tmp_path_factory):
    """4 trials (learning rate x freezing), rungs at steps 6, 12 and 24, half kept at each; 2 at a
    time on 2 CPUs (1 worker x 1 CPU each)."""
    from finetune_trainer.run import run

    tmp = tmp_path_factory.mktemp("halving")
    doc = tiny.four_trial_grid(tmp, max_steps=24, scheduler={"type": "successiveHalving", "gracePeriod": 6, "reductionFactor": 2}, every=2,
                               output={"keepCheckpoints": 1})  # the latest and the best: retention deletes before every resume
    seen: list[dict] = []  # every trial count status.json showed while the search ran
    done = threading.Event()

    def watch() -> None:
        status = tmp / "runs" / "t" / "status.json"
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                seen.append(json.loads(status.read_text())["trials"])
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run(parse_job(doc))
    finally:
        done.set()
        watcher.join()
    result.results["_status_seen"] = seen
    return result


def test_each_rung_keeps_the_better_half_and_stops_the_rest_there(halving_search):
    reports = tiny.tune_reports(halving_search.run_dir)
    assert len(reports) == 4
    alive = set(reports)
    for rung, keep in zip(RUNGS[:-1], (2, 1), strict=True):
        at_rung = {name: next(r["eval_loss"] for r in _evals(reports[name]) if r["step"] == rung) for name in alive}
        went_on = {name for name in alive if _evals(reports[name])[-1]["step"] > rung}
        ranked = sorted(at_rung, key=at_rung.get)
        assert went_on == set(ranked[:keep]), (rung, at_rung, went_on)
        alive = went_on
    assert [_evals(reports[n])[-1]["step"] for n in alive] == [24]
    by_name = {t["trial"]: t for t in halving_search.results["trials"]}
    assert sorted(t["steps"] for t in by_name.values()) == [6, 6, 12, 24]
    assert [t["status"] for t in by_name.values() if t["steps"] < 24] == ["stopped by scheduler"] * 3
    assert halving_search.results["search"]["trial_steps"] == 48
    assert not scratch.left_by_dead_workers()


def test_no_trial_went_past_a_rung_before_every_live_trial_had_reached_it(halving_search):
    reports = tiny.tune_reports(halving_search.run_dir)
    for rung in RUNGS[:-1]:
        reached = [r["timestamp"] for rows in reports.values() for r in _evals(rows) if r["step"] == rung]
        beyond = [r["timestamp"] for rows in reports.values() for r in _evals(rows) if r["step"] > rung]
        assert max(reached) <= min(beyond), rung


def test_kept_trials_resumed_from_their_checkpoint_in_a_new_process(halving_search):
    """A paused trial's actor is gone; it goes on in a new one, from the checkpoint of its rung
    (the last trial to reach a rung is decided on while it runs, and a kept one just goes on).
    Retention had deleted the checkpoint before the rung's by then, which Ray Train's restore of
    a run by name refuses (trial.py): each start is a new Train run resuming from the latest."""
    reports = tiny.tune_reports(halving_search.run_dir)
    resumed, pruned = 0, 0
    for name, rows in reports.items():
        steps = [r["step"] for r in rows]
        assert steps == sorted(set(steps)), (name, steps)  # nothing trained twice
        for before, after in itertools.pairwise(rows):
            if after["pid"] != before["pid"]:
                assert before["step"] in RUNGS[:-1], (name, [(r["step"], r["pid"]) for r in rows])
                resumed += 1
                earlier = [r for r in rows if r.get("checkpoint_path") and r["step"] < before["step"]]
                pruned += any(not Path(r["checkpoint_path"]).exists() for r in earlier)
    assert resumed >= 1 and pruned >= 1, (resumed, pruned)


def test_never_more_than_two_trials_trained_at_once(halving_search):
    """All four trial actors exist from the start (the bracket needs them): each stretch of one
    actor's reports is one trial training, and no three of them overlap. (That two did overlap is
    checked from status.json below: report stretches are a few seconds here, and on a loaded
    machine two can miss each other.)"""
    reports = tiny.tune_reports(halving_search.run_dir)
    spans = []
    for rows in reports.values():
        for pid in {r["pid"] for r in rows}:
            mine = [r["timestamp"] for r in rows if r["pid"] == pid]
            spans.append((min(mine), max(mine)))
    assert tiny.most_at_once(spans) <= 2, spans


def test_best_trial_and_status_after_halving(halving_search):
    reports = tiny.tune_reports(halving_search.run_dir)
    top = min(r["eval_loss"] for rows in reports.values() for r in _evals(rows))
    best = halving_search.results["best"]
    assert best["value"] == pytest.approx(top)
    status = json.loads((halving_search.run_dir.parent / "status.json").read_text())
    assert status["state"] == "finished"
    counts = {k: status["trials"][k] for k in ("total", "completed", "stopped", "running", "waiting", "failed")}
    assert counts == {"total": 4, "completed": 1, "stopped": 3, "running": 0, "waiting": 0, "failed": 0}
    assert halving_search.results["best"]["checkpoint"]


def test_status_said_which_trials_trained_and_which_waited(halving_search):
    """Four trial actors exist from the start; status.json counts as running only those training
    (two slots), the others as waiting (for a slot, or paused at a rung)."""
    seen = halving_search.results["_status_seen"]
    assert seen and max(c["running"] for c in seen) == 2, seen
    assert max(c["waiting"] for c in seen) >= 1, seen
    assert all(c["running"] + c["waiting"] + c["completed"] + c["stopped"] + c["failed"] <= 4 for c in seen)
