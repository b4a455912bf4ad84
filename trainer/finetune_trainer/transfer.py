"""Moving a step's data between host and device without making the host wait for the device.

Two places in the training step would otherwise drain the GPU's queue: a pageable host->device
copy (`tensor.to("cuda")` synchronises the stream after the copy, so the next step's kernels
cannot be queued while this one runs) and the progress line's loss (`.item()` waits for every
kernel queued so far). Here the batch goes through pinned memory with `non_blocking=True` (what
torch's DataLoader does with pin_memory), and the loss is copied to pinned memory behind the step
and read at the next progress tick, once a CUDA event says the copy is done. On CPU both are the
plain operations: there is no queue to drain. Written here because the recipe drives DeepSpeed
directly (no DataLoader, no Trainer logging callback to do it for us).
"""

from __future__ import annotations

import time

import torch


def to_device(host: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on the device; on GPUs from pinned memory, queued without a host sync."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in host.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in host.items()}


class ProgressTicker:
    """When the progress line is due (at most every `every` seconds) and the mean training loss it
    shows: on GPUs the mean as of the previous tick, read without waiting on the device."""

    def __init__(self, every: float = 0.5):
        self.every = every
        self._last = 0.0
        self._pending: tuple[torch.Tensor, torch.cuda.Event] | None = None
        self._ready: float | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        return True

    def loss(self, losses: list[torch.Tensor]) -> float | None:
        """The mean of `losses` (device tensors); None on a GPU until a first copy has landed."""
        mean = torch.stack(losses).float().mean()
        if mean.device.type != "cuda":
            return mean.item()
        if self._pending is not None and self._pending[1].query():  # landed: reading pinned memory waits on nothing
            self._ready = self._pending[0].item()
            self._pending = None
        if self._pending is None:
            host = torch.empty((), dtype=mean.dtype, pin_memory=True)
            host.copy_(mean, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        return self._ready
