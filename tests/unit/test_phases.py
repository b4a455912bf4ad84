"""phases.StartupClock: the start-up marks bench/trial_startup.py reads from a run's debug log."""

from __future__ import annotations

import json
import logging
import time

from finetune_trainer.phases import MARKER, StartupClock


def test_marks_are_wall_clock_in_order_first_time_only_and_logged_once_by_rank_0(caplog):
    clock = StartupClock()
    assert clock.marks["process_started"] <= clock.marks["loop_entered"] <= time.time()
    clock.mark("model_loaded")
    first = clock.marks["model_loaded"]
    clock.mark("model_loaded")  # a phase that repeats keeps its first time
    assert clock.marks["model_loaded"] == first
    with caplog.at_level(logging.DEBUG, logger="finetune_trainer.phases"):
        StartupClock().log_once(rank=1)  # other ranks say nothing
        clock.log_once(rank=0)
        clock.log_once(rank=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(MARKER)]
    assert len(lines) == 1
    assert json.loads(lines[0].removeprefix(MARKER)) == clock.marks


def test_a_search_trials_workers_name_their_trial_and_its_actor_logs_slot_and_fit(caplog):
    """bench/trial_startup.py pairs a trial's slot (its actor's line) with its workers' marks by name."""
    from finetune_trainer.phases import TRIAL_MARKER, trial_started

    clock = StartupClock(trial="trial_01")
    clock.mark("first_step")
    slot = time.time()
    with caplog.at_level(logging.DEBUG, logger="finetune_trainer.phases"):
        clock.log_once(rank=0)
        trial_started("trial_01", slot)
    messages = [r.getMessage() for r in caplog.records]
    [marks] = [json.loads(m.removeprefix(MARKER)) for m in messages if m.startswith(MARKER)]
    [start] = [json.loads(m.removeprefix(TRIAL_MARKER)) for m in messages if m.startswith(TRIAL_MARKER)]
    assert marks == clock.marks | {"trial": "trial_01"}
    assert start["trial"] == "trial_01" and start["slot_acquired"] == slot <= start["fit"] <= time.time()


def test_a_trials_slot_is_its_actors_start_and_in_a_reused_actor_when_its_function_began(monkeypatch):
    """Tune reserves a trial's resources, then starts its actor or hands a reused one the trial
    (tuning's reuse_actors): the first trial of a process got its slot when the process started,
    every later one when its function was entered."""
    from finetune_trainer import phases

    monkeypatch.setattr(phases, "_trials_in_process", 0)
    started = phases.process_started()
    assert phases.trial_slot(time.time()) == started
    entered = time.time()
    assert phases.trial_slot(entered) == entered > started
    assert phases.trial_slot(entered + 5) == entered + 5
