"""A training worker's peak memory, two figures: the process' and training's own.

On a GPU, torch's `max_memory_allocated` counts tensors only: weights, gradients, optimizer state,
activations. On CPU the only peak there is is the process' resident set (ru_maxrss), which also
holds what every worker holds whatever it trains: the interpreter, torch, Ray, DeepSpeed,
transformers and PEFT (~0.4-1 GiB), and the prepared data. That constant sits on both sides of any
comparison of two trainings (LoRA against full fine-tuning: bench/adapter_cost.py) and hides what
one saves, so the worker also reports the peak *above* what it held just before the model was built:
the CPU analogue of the GPU figure (it still counts memory the C allocator keeps after tensors are
freed, which a GPU's caching allocator hides from max_memory_allocated). Making glibc unmap freed
activations at once (mallopt M_MMAP_THRESHOLD 512 KiB) lowered that peak by ~0.7-1 GiB but made every
CPU step 12-40% slower (a fresh mapping and page faults per activation: 352 -> 490 ms a step for a
4-layer Llama, bench/step_overhead.py 1.03 -> ~0.70), so workers keep glibc's default.

Linux lets a process reset its own high-water mark (writing 5 to /proc/self/clear_refs, "reset the
peak resident set size"; proc(5)); nothing in torch or psutil does, so it is done here. Where that
file cannot be written the training figure is the process peak minus the baseline, which can only
overstate it.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    """A `VmRSS:  1234 kB`-style line of /proc/self/status, in KiB (None where there is no /proc)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class PeakMemory:
    """Start it where training's own memory begins (before the model is built); read it at any point."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.baseline = torch.cuda.memory_allocated(device)
            self._before = 0
            self.reset = True
            return
        self._before = _ru_maxrss_bytes()  # the process peak so far: the reset below forgets it
        rss = _status_kib("VmRSS")
        self.baseline = rss * 1024 if rss is not None else self._before
        try:
            _CLEAR_REFS.write_text("5")
            self.reset = True
        except OSError as err:  # no /proc, or a kernel that refuses: the training figure overstates
            log.debug("cannot reset the peak resident set (%s): training memory counted from the process peak", err)
            self.reset = False

    def _hwm(self) -> int:
        hwm = _status_kib("VmHWM")
        return hwm * 1024 if hwm is not None else _ru_maxrss_bytes()

    def process_peak(self) -> int:
        """Bytes: the most the worker held (CPU: resident set) or allocated (GPU), since it started."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        return max(self._before, self._hwm())

    def training_peak(self) -> int:
        """Bytes: the most held above the baseline since the start (the model, its gradients and
        optimizer state, activations), without what the worker held before."""
        if self.cuda:
            return max(0, int(torch.cuda.max_memory_allocated()) - self.baseline)
        return max(0, self._hwm() - self.baseline)
