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
