"""What the training loop watches for besides its loss going down, without a host sync per step:

- `NonFiniteGuard`: a NaN or infinite training loss (spec.training.nonFiniteLoss). Each micro-step
  ORs `~isfinite(loss)` into a flag for its optimizer step, on the device; the flags are read only
  at evaluation points, where every rank already waits for the evaluation's all-reduce and reads
  numbers to the host. They are all-reduced there (MAX) so every rank sees the same steps, and the
  first non-finite step is exact even when it is noticed several steps later.
- `PreemptionGuard`: a preemption notice (issue 16, item 2). Ray Train 2.60 hands every worker a
  `PreemptionInfo` (the node's drain deadline) when a node hosting the worker group is drained: a
  Kubernetes pod's SIGTERM makes its `ray start --block` drain the node for
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (operator pods.py), and a local `finetune run` drains its
  own node on SIGTERM (sigterm.py). `ray.train.get_preemption_info()` agrees on it with a barrier
  through an actor (2.2 ms a call on this 2-core machine, too much per step), so each worker reads
  the value it was handed and the ranks agree through a one-number all-reduce on a small gloo
  group, started at one step and read at the next: the CPU tensor never touches the device.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class NonFinite:
    first_step: int | None  # the first optimizer step since the last check whose loss was not finite (any rank)
    steps: int  # how many steps since the last check had a non-finite loss on some rank


class NonFiniteGuard:
    """Flags per optimizer step since the last `check`, kept on the training device."""

    def __init__(self, device: torch.device, window: int, start_step: int = 0):
        self.device = device
        self.flags = torch.zeros(max(1, window), dtype=torch.int32, device=device)
        self.since = start_step  # the step of the last check: flag i is step since + 1 + i

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Record one micro-batch's loss for optimizer step `step` (device ops only, no sync)."""
        i = step - self.since - 1
        while i >= len(self.flags):  # more steps than the window (an evaluation cadence that moved): grow, on the device
            self.flags = torch.cat([self.flags, torch.zeros_like(self.flags)])
        self.flags[i] = torch.maximum(self.flags[i], (~torch.isfinite(loss.detach())).to(torch.int32))

    def check(self, step: int, world: int) -> NonFinite:
        """Every rank, at the same step: the union of all ranks' flags since the last check (one
        all-reduce and one read to the host, at an evaluation point), then a fresh window."""
        flags = self.flags
        if world > 1 and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad = torch.nonzero(flags.cpu()).flatten().tolist()
        found = NonFinite(first_step=self.since + 1 + bad[0] if bad else None, steps=len(bad))
        self.flags = torch.zeros_like(self.flags)
        self.since = step
        return found


def mean_finite(losses: list[torch.Tensor]) -> float | None:
    """The mean of the finite losses (None if there is none): read at an evaluation point."""
    if not losses:
        return None
    values = torch.stack([loss.float() for loss in losses])
    values = values[torch.isfinite(values)]
    return values.mean().item() if values.numel() else None


def _local_preemption_info(notice_file: str | None = None) -> Any:
    """The PreemptionInfo Ray Train's PreemptionWatcher handed this worker (`mark_preempt`), else
    a local driver's SIGTERM notice file (sigterm.notice_path: one stat per step), else None.

    The first is the value `ray.train.get_preemption_info()` would broadcast from rank 0, read
    without its barrier (module docstring); Ray is pinned (2.60), and a Ray without it reads as
    no notice."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        info = get_train_context().preemption_context.preemption_info
    except Exception:  # no Train V2 context (not a Ray Train worker), or a Ray that moved it
        info = None
    if info is None and notice_file is not None and os.path.exists(notice_file):
        try:
            with open(notice_file) as raw:
                return Notice(deadline=json.load(raw)["deadline_ms"] / 1000)
        except (OSError, ValueError, KeyError):
            return None
    return info


@dataclass
class Notice:
    deadline: float | None  # unix time the node goes away (None: no deadline was given)


class PreemptionGuard:
    """`poll()` at every optimizer step on every rank: the same answer on every rank, one step late."""

    _NONE = -(2**62)  # "no deadline" in the MAX all-reduce

    def __init__(self, world: int):
        self.world = world
        self.group = dist.new_group(backend="gloo") if world > 1 and dist.is_initialized() else None  # a collective: every rank
        self.pending: tuple[Any, torch.Tensor] | None = None
        self.noticed = False  # acted on once per attempt (a restarted worker group is a new recipe)
        from .sigterm import notice_path

        self.notice_file = notice_path()

    def poll(self) -> Notice | None:
        if self.noticed:
            return None
        info = _local_preemption_info(self.notice_file)
        deadline_ms = (info.deadline * 1000 if isinstance(info, Notice) and info.deadline else getattr(info, "deadline_ms", None))
        mine = torch.tensor([1 if info is not None else 0, -int(deadline_ms) if deadline_ms else self._NONE], dtype=torch.int64)
        if self.group is None:
            agreed: torch.Tensor | None = mine
        else:
            agreed = None
            if self.pending is not None:  # last step's all-reduce: long done, every rank reads the same
                work, agreed = self.pending
                work.wait()
            self.pending = (dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.group, async_op=True), mine)
        if agreed is None or int(agreed[0]) == 0:
            return None
        self.noticed = True
        if self.pending is not None:  # drain the one in flight so the group is idle from here on
            self.pending[0].wait()
            self.pending = None
        deadline_ms = -int(agreed[1])
        return Notice(deadline=deadline_ms / 1000 if int(agreed[1]) != self._NONE else None)

    def can_save(self, notice: Notice, last_save_seconds: float | None) -> tuple[bool, float | None, float | None]:
        """Whether a checkpoint started now completes before the deadline, agreed by every rank
        (the slowest rank's last evaluation + checkpoint, the earliest deadline); (yes, took, left)."""
        left = notice.deadline - time.time() if notice.deadline is not None else None
        numbers = torch.tensor([last_save_seconds if last_save_seconds is not None else -1.0,
                                -left if left is not None else -1e18], dtype=torch.float64)
        if self.group is not None:
            dist.all_reduce(numbers, op=dist.ReduceOp.MAX, group=self.group)
        took = float(numbers[0]) if float(numbers[0]) >= 0 else None
        left = -float(numbers[1]) if float(numbers[1]) > -1e18 else None
        if left is None:
            return True, took, None  # no deadline given: save
        if took is None:
            return left > 0, None, left  # nothing measured yet: try; an unfinished save is never marked complete
        return took * 1.25 + 1.0 < left, took, left
