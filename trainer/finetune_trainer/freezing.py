"""Freezing strategies as a plan: which parameters never train, which blocks train from the
start, which unfreeze later and at what step, and each block's learning-rate factor.

Pure: parameter names and the block map in, a plan out. Applying it to a live DeepSpeed engine
is `optim.py`'s job. Problems that only the model reveals (freezing more layers than it has, a
head with no weights of its own) are reported as SpecErrors on the field the user must change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .layers import LayerMap
from .spec import FreezingSpec, SpecError


@dataclass(frozen=True)
class GroupPlan:
    block: str
    params: tuple[str, ...]
    lr_factor: float
    unfreeze_at: int | None  # None: trains from the first step; N: held at lr 0 until step N


@dataclass(frozen=True)
class FreezePlan:
    groups: tuple[GroupPlan, ...]  # bottom to top
    frozen: tuple[str, ...]  # fixed for the whole run: requires_grad=False, not in the optimizer

    @property
    def trainable(self) -> tuple[str, ...]:
        return tuple(p for g in self.groups for p in g.params)

    def unfreeze_steps(self) -> dict[str, int]:
        return {g.block: g.unfreeze_at for g in self.groups if g.unfreeze_at is not None}

    def summary(self) -> str:
        start = [g.block for g in self.groups if g.unfreeze_at is None]
        later = self.unfreeze_steps()
        text = f"{len(self.trainable)} trainable / {len(self.frozen)} frozen tensors; training from step 0: {', '.join(start)}"
        if later:
            text += "; then " + ", ".join(f"{b}@{s}" for b, s in sorted(later.items(), key=lambda kv: kv[1]))
        return text


def needs_layers(spec: FreezingSpec) -> bool:
    """Strategies that speak in blocks (featureExtraction needs the map's head/body split)."""
    return spec.strategy in {"freezeBottom", "gradual", "featureExtraction"} or spec.layer_lr_decay is not None


def plan_freezing(
    spec: FreezingSpec,
    names: list[str],
    layer_map: LayerMap | None,
    *,
    steps_per_epoch: int,
    model_name: str = "the model",
) -> FreezePlan:
    if layer_map is None and needs_layers(spec):
        raise SpecError([("spec.freezing.strategy", f"{spec.strategy} needs the layer stack of {model_name}, which could not be found")])
    blocks = layer_map.bottom_up() if layer_map else []
    frozen = _frozen_names(spec, names, layer_map, model_name)
    decay = spec.layer_lr_decay or 1.0
    depth_of = {b.name: len(blocks) - 1 - i for i, b in enumerate(blocks)}  # top = 0
    unfreeze_at = _gradual_schedule(spec, layer_map, steps_per_epoch) if spec.strategy == "gradual" else {}
    groups: list[GroupPlan] = []
    if not blocks:
        groups.append(GroupPlan("model", tuple(n for n in names if n not in frozen), 1.0, None))
    for block in blocks:
        params = tuple(p for p in block.params if p not in frozen)
        if params:
            groups.append(GroupPlan(block.name, params, decay ** depth_of[block.name], unfreeze_at.get(block.name)))
    groups = [g for g in groups if g.params]
    if not groups:
        raise SpecError([("spec.freezing.strategy", f"{spec.strategy} leaves no parameter of {model_name} trainable")])
    return FreezePlan(tuple(groups), tuple(n for n in names if n in frozen))


def _frozen_names(spec: FreezingSpec, names: list[str], layer_map: LayerMap | None, model_name: str) -> set[str]:
    if spec.strategy == "freezeBottom":
        assert layer_map is not None
        count = spec.frozen_bottom_blocks(len(layer_map.layers))
        if count > len(layer_map.layers):
            raise SpecError([("spec.freezing.layers", f"{count} exceeds the {len(layer_map.layers)} layers of {model_name}; use at most {len(layer_map.layers)} or a fraction like 0.5")])
        return {p for b in (layer_map.embeddings, *layer_map.layers[:count]) for p in b.params}
    if spec.strategy == "featureExtraction":
        head = set(layer_map.head_params) if layer_map else set()
        if not head:
            raise SpecError([("spec.freezing.strategy", f"featureExtraction trains only the task head, and {model_name} has no head weights of its own (e.g. its output layer is tied to the input embeddings); use freezeBottom or patterns")])
        return set(names) - head
    if spec.strategy == "patterns":
        return _pattern_frozen(spec, names)
    return set()


def _pattern_frozen(spec: FreezingSpec, names: list[str]) -> set[str]:
    problems = []
    for field, patterns in (("trainablePatterns", spec.trainable_patterns), ("frozenPatterns", spec.frozen_patterns)):
        for i, pattern in enumerate(patterns):
            if not any(re.search(pattern, n) for n in names):
                problems.append((f"spec.freezing.{field}[{i}]", f"{pattern!r} matches no parameter; names look like: {', '.join(names[:4])}, ..."))
    if problems:
        raise SpecError(problems)
    trainable = {n for n in names if any(re.search(p, n) for p in spec.trainable_patterns)} if spec.trainable_patterns else set(names)
    trainable -= {n for n in names if any(re.search(p, n) for p in spec.frozen_patterns)}
    return set(names) - trainable


def _gradual_schedule(spec: FreezingSpec, layer_map: LayerMap | None, steps_per_epoch: int) -> dict[str, int]:
    """ULMFiT order: the top block trains first, then one block more per interval, top-down."""
    assert layer_map is not None
    interval = steps_per_epoch if spec.unfreeze_every == "epoch" else int(spec.unfreeze_every or 1)
    top_down = [*reversed(layer_map.layers), layer_map.embeddings]
    return {block.name: (i + 1) * interval for i, block in enumerate(top_down)}
