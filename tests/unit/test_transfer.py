"""transfer: the step's host<->device traffic. On CPU the plain operations (the values the recipe
reported before); the GPU branch (pinned memory, non_blocking, an event) needs a GPU."""

from __future__ import annotations

import pytest
import torch

from finetune_trainer.transfer import ProgressTicker, to_device


def test_a_cpu_batch_arrives_unchanged() -> None:
    host = {"input_ids": torch.arange(6).reshape(2, 3), "labels": torch.ones(2, 3, dtype=torch.long)}
    moved = to_device(host, torch.device("cpu"))
    assert moved.keys() == host.keys() and all(torch.equal(moved[k], host[k]) for k in host)


def test_the_progress_loss_on_cpu_is_the_mean_of_the_steps_losses() -> None:
    ticker = ProgressTicker()
    assert ticker.loss([torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.5)]) == pytest.approx(2.5)


def test_the_ticker_is_due_at_most_every_interval(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr("finetune_trainer.transfer.time.monotonic", lambda: now[0])
    ticker = ProgressTicker(every=0.5)
    assert ticker.due() and not ticker.due()
    now[0] += 0.4
    assert not ticker.due()
    now[0] += 0.2
    assert ticker.due()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_loss_is_the_previous_ticks_and_never_blocks() -> None:
    device = torch.device("cuda", 0)
    batch = to_device({"x": torch.arange(4)}, device)
    assert batch["x"].device.type == "cuda" and batch["x"].tolist() == [0, 1, 2, 3]
    ticker = ProgressTicker()
    assert ticker.loss([torch.tensor(3.0, device=device)]) is None  # nothing landed yet
    torch.cuda.synchronize()
    assert ticker.loss([torch.tensor(5.0, device=device)]) == pytest.approx(3.0)
