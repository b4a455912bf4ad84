"""The DeepSpeed config, built from the spec. Pure: spec and resolved facts in, dict out."""

from __future__ import annotations

import copy
from typing import Any

from .spec import FineTuneJobSpec


def resolve_precision(requested: str, *, cuda: bool, bf16_supported: bool) -> str:
    """`auto` means bf16 on GPUs that do it natively, fp16 on older GPUs, fp32 on CPU."""
    if requested != "auto":
        return requested
    if not cuda:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def build_ds_config(spec: FineTuneJobSpec, *, world_size: int, precision: str) -> dict[str, Any]:
    t, ds = spec.training, spec.deepspeed
    offload = ds.offload_optimizer or ds.offload_params
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_bucket_size=50_000_000)
    if ds.zero_stage == 3:
        # Needed to export a Hugging Face model: the full weights are gathered on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.per_device_batch_size * t.gradient_accumulation_steps * world_size,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.learning_rate,
                "betas": [t.adam_beta1, t.adam_beta2],
                "eps": t.adam_epsilon,
                "weight_decay": t.weight_decay,
                # torch's AdamW needs no compiled op; offload requires DeepSpeed's CPU Adam.
                "torch_adam": not offload,
                "adam_w_mode": True,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if t.fused_optimizer:
        # DeepSpeed hands the params it does not read to torch.optim.AdamW when torch_adam is set
        # (engine._configure_basic_optimizer), so `fused` reaches torch; validation refuses it with offload,
        # where DeepSpeed's CPU Adam steps instead
        config["optimizer"]["params"]["fused"] = True
    if t.max_grad_norm is not None:
        config["gradient_clipping"] = t.max_grad_norm
    return deep_merge(config, ds.config)  # the raw config may not set `optimizer` (spec/runtime.py)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """The user's raw config wins, key by key, at every depth."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
