"""memory.py: the worker's process peak and training's own peak above what it held before."""

from __future__ import annotations

import torch

from finetune_trainer.memory import PeakMemory

MIB = 2**20


def _touch(mib: int) -> torch.Tensor:
    """A tensor whose pages are resident (torch.ones writes every one)."""
    return torch.ones(mib * MIB // 4, dtype=torch.float32)


def test_training_peak_counts_what_was_held_after_the_start_and_not_before() -> None:
    before = _touch(400)  # an earlier peak (imports, the data): in the process figure only
    del before
    memory = PeakMemory(torch.device("cpu"))
    held = _touch(100)
    training, process = memory.training_peak(), memory.process_peak()
    del held
    assert memory.reset  # Linux lets a process reset its own high-water mark
    assert 100 * MIB <= training < 300 * MIB, training / MIB
    assert process >= memory.baseline + 350 * MIB, (process / MIB, memory.baseline / MIB)


def test_the_figures_are_peaks_not_what_is_held_now() -> None:
    memory = PeakMemory(torch.device("cpu"))
    big = _touch(200)
    del big
    small = _touch(10)
    assert memory.training_peak() >= 190 * MIB  # 200 MiB, less what the baseline held and has given back
    del small
