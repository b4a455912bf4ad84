"""bench/trial_startup.py --cpu: a window of the sampled CPU seconds, summed by process kind."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
trial_startup = pytest.importorskip("trial_startup")


def test_a_window_sums_each_kinds_cpu_spent_inside_it() -> None:
    sampler = trial_startup.ProcessCpu()
    sampler.series = {1: [(10.0, 5.0), (11.0, 6.0), (12.0, 8.0)], 2: [(10.0, 1.0), (12.0, 2.5)],
                      3: [(10.0, 0.0), (12.0, 0.5)], 4: [(11.5, 0.0), (12.0, 0.01)]}
    sampler.titles = {1: "ray::RayTrainWorker.train_fn", 2: "ray::RayTrainWorker.train_fn", 3: "ray::TrainController.run",
                      4: "/usr/bin/python -c pass"}
    window = sampler.window(10.5, 12.0)  # pid 1 from 5.0 (its last sample before 10.5) to 8.0; pid 4 spends < 0.05
    assert window == {"ray::RayTrainWorker.train_fn": {"cpu_s": 4.5, "processes": 2},
                      "ray::TrainController.run": {"cpu_s": 0.5, "processes": 1}}


def test_the_sampler_sees_a_busy_child_process() -> None:
    import subprocess

    with trial_startup.ProcessCpu() as sampler:
        start = time.time()
        subprocess.run([sys.executable, "-c", "import time\nend = time.time() + 1.0\nwhile time.time() < end: pass"], check=True)
        end = time.time()
    spent = sum(row["cpu_s"] for row in sampler.window(start, end).values())
    assert spent >= 0.5
