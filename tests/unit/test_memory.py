"""memory.py: the worker's process peak and training's own peak above what it held before.

Measured in a fresh Python process, as a Train worker is one. The figures are the process's
resident set. In the test runner's own process they also moved with everything the tests before
had done there: the suite's integration tests run first, with Ray's driver connected and torch,
Ray and DeepSpeed mapped. The CI run at 99ad4a1 read a training peak of 0 after 100 MiB were
written, a result the same two tests never gave alone or in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MIB = 2**20

_PROBE = """
import json, torch
from finetune_trainer.memory import PeakMemory

MIB = 2**20

def touch(mib):  # a tensor whose pages are resident (torch.ones writes every one)
    return torch.ones(mib * MIB // 4, dtype=torch.float32)

before = touch(400)  # an earlier peak (imports, the data): in the process figure only
del before
memory = PeakMemory(torch.device("cpu"))
held = touch(100)
first = {"training": memory.training_peak(), "process": memory.process_peak(), "baseline": memory.baseline, "reset": memory.reset}
del held

memory = PeakMemory(torch.device("cpu"))
big = touch(200)
del big
small = touch(10)
second = {"training": memory.training_peak()}
del small
print(json.dumps({"first": first, "second": second}))
"""


@pytest.fixture(scope="module")
def peaks() -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_training_peak_counts_what_was_held_after_the_start_and_not_before(peaks) -> None:
    first = peaks["first"]
    assert first["reset"]  # Linux lets a process reset its own high-water mark
    assert 100 * MIB <= first["training"] < 300 * MIB, first["training"] / MIB
    assert first["process"] >= first["baseline"] + 350 * MIB, (first["process"] / MIB, first["baseline"] / MIB)


def test_the_figures_are_peaks_not_what_is_held_now(peaks) -> None:
    # 200 MiB, less what the baseline held and has given back
    assert peaks["second"]["training"] >= 190 * MIB, peaks["second"]["training"] / MIB
