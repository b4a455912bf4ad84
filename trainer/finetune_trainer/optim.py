"""Optimizer groups, the LR schedule and the unfreeze gate, applied to a live DeepSpeed engine.

DeepSpeed builds its (ZeRO-partitioned) optimizer groups once, at `initialize`, and only from
parameters that require grad at that moment. Blocks that gradual unfreezing opens later are
therefore in the optimizer from the start, one group per block, and the gate holds them shut:
learning rate 0 (AdamW's decoupled weight decay is scaled by lr too, so the weights stay
bit-identical), a gradient hook that zeroes their gradients (so they neither count in the
clipping norm nor fill Adam's moments), and, when a block opens, its optimizer state is cleared
so its first updates get Adam's bias correction like any fresh parameter. Nothing in DeepSpeed,
torch or transformers does this; it is written here for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler

from .freezing import FreezePlan
from .spec import METRIC_DRIVEN_SCHEDULES, LRScheduleSpec, TrainingSpec

_NO_DECAY = ("bias", "norm", "ln_", "layernorm")


def _decays(name: str) -> bool:
    lower = name.lower()
    return not any(marker in lower for marker in _NO_DECAY)


@dataclass
class GroupMeta:
    name: str
    block: str
    base_lr: float
    unfreeze_at: int | None


def apply_plan(model: nn.Module, plan: FreezePlan) -> None:
    """Static freezing, before `deepspeed.initialize`: frozen tensors never reach the optimizer."""
    frozen = set(plan.frozen)
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)


def param_groups(model: nn.Module, plan: FreezePlan, training: TrainingSpec) -> tuple[list[dict[str, Any]], list[GroupMeta]]:
    params = dict(model.named_parameters())
    groups: list[dict[str, Any]] = []
    metas: list[GroupMeta] = []
    for g in plan.groups:
        for suffix, decay in (("decay", True), ("no_decay", False)):
            chosen = [params[n] for n in g.params if _decays(n) == decay]
            if not chosen:
                continue
            lr = training.learning_rate * g.lr_factor
            groups.append({"params": chosen, "lr": lr, "weight_decay": training.weight_decay if decay else 0.0})
            metas.append(GroupMeta(f"{g.block}/{suffix}", g.block, lr, g.unfreeze_at))
    return groups, metas


def build_scheduler(spec: LRScheduleSpec, optimizer: torch.optim.Optimizer, total_steps: int):
    kwargs = spec.scheduler_kwargs()
    if spec.type == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        kwargs["num_decay_steps"] = max(1, total_steps // 10)
    return get_scheduler(
        spec.type,
        optimizer=optimizer,
        num_warmup_steps=spec.warmup(total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=kwargs or None,
    )


def is_metric_driven(spec: LRScheduleSpec) -> bool:
    return spec.type in METRIC_DRIVEN_SCHEDULES


class UnfreezeGate:
    """Holds gated groups at lr 0 until their step; see the module docstring for why."""

    def __init__(self, optimizer: torch.optim.Optimizer, metas: list[GroupMeta], groups: list[dict[str, Any]]):
        if len(optimizer.param_groups) != len(metas):
            raise RuntimeError(f"optimizer has {len(optimizer.param_groups)} groups, expected {len(metas)}")
        self.optimizer = optimizer
        self.metas = metas
        self._model_params = [g["params"] for g in groups]  # the module's tensors, for the hooks
        self._hooks: dict[int, list[Any]] = {}
        self.opened: set[str] = {m.block for m in metas if m.unfreeze_at is None}

    @property
    def active(self) -> bool:
        return any(m.unfreeze_at is not None for m in self.metas)

    def frozen_blocks(self, step: int) -> list[str]:
        return sorted({m.block for m in self.metas if m.unfreeze_at is not None and step < m.unfreeze_at})

    def apply(self, step: int) -> list[str]:
        """Enforce the plan for the optimizer step about to run (`step` steps done). Returns blocks opened now."""
        scale = self._current_scale()
        newly: list[str] = []
        for i, (meta, group) in enumerate(zip(self.metas, self.optimizer.param_groups, strict=True)):
            if meta.unfreeze_at is None:
                continue
            if step < meta.unfreeze_at:
                group["lr"] = 0.0
                if i not in self._hooks:
                    self._hooks[i] = [p.register_hook(torch.zeros_like) for p in self._model_params[i]]
            elif i in self._hooks:
                for handle in self._hooks.pop(i):
                    handle.remove()
                for p in group["params"]:
                    self.optimizer.state.pop(p, None)
                group["lr"] = meta.base_lr * scale
                if meta.block not in self.opened:
                    self.opened.add(meta.block)
                    newly.append(meta.block)
        return newly

    def _current_scale(self) -> float:
        """Where the schedule is now, as a fraction of peak, read off a group that is open."""
        for meta, group in zip(self.metas, self.optimizer.param_groups, strict=True):
            if meta.unfreeze_at is None and meta.base_lr > 0:
                return group["lr"] / meta.base_lr
        return 1.0
