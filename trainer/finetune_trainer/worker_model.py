"""The model a worker trains, before DeepSpeed takes it: the pre-trained model with the spec's
head, dropout and dtype (modeling.py), then either PEFT's adapters over the frozen base
(freezing.strategy: lora, adapters.py) or the freezing plan of the other strategies (freezing.py),
applied to `requires_grad`. One place, so the recipe and its tests build the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapters import adapter_plan, wrap
from .freezing import FreezePlan, needs_layers, plan_freezing
from .layers import discover
from .modeling import load_model
from .optim import apply_plan
from .spec import FineTuneJobSpec


@dataclass
class WorkerModel:
    module: nn.Module
    plan: FreezePlan
    adapters: bool  # a PeftModel: checkpoints hold only what trains (checkpoint_files.py)
    name: str  # the transformers class, for messages
    params: dict[str, int]  # trainable_params / total_params, counted before ZeRO-3 partitions them


def build(spec: FineTuneJobSpec, model_dir: str, *, num_labels: int | None, pad_token_id: int, steps_per_epoch: int) -> WorkerModel:
    """Seed torch first (the new head and the adapters' initial weights must agree on every rank)."""
    quantized = spec.model.quantization is not None
    model = load_model(model_dir, spec.model, num_labels=num_labels, dropout=spec.training.dropout,
                       pad_token_id=pad_token_id, quantize=quantized, training=True)
    name = type(model).__name__
    adapters = spec.freezing.strategy == "lora"
    if adapters:  # PEFT freezes the base; the plan is what it left trainable
        model = wrap(model, spec.freezing.lora_settings(), spec.model.task, model_name=name, quantized=quantized)
        plan = adapter_plan(model)
    else:
        plan = plan_freezing(spec.freezing, [n for n, _ in model.named_parameters()],
                             discover(model) if needs_layers(spec.freezing) else None,
                             steps_per_epoch=steps_per_epoch, model_name=name)
    apply_plan(model, plan)
    params = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "total_params": sum(p.numel() for p in model.parameters())}
    return WorkerModel(model, plan, adapters, name, params)
