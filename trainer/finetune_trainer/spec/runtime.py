"""Where and how the training runs: DeepSpeed ZeRO, Ray Train workers, output."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, field_validator

from .base import SpecModel

Problems = Iterator[tuple[str, str]]
MAX_RAY_WORKERS = 4096  # Ray Train workers at once, for one run or all concurrent trials together

# Raw DeepSpeed keys the spec builds (ds_config.build_ds_config), and the field that sets each:
# a raw value would silently win over the field (the merge is last), so the two could disagree.
_BATCH = "training.perDeviceBatchSize / gradientAccumulationSteps"
OWNED_KEYS = {
    "train_batch_size": _BATCH, "train_micro_batch_size_per_gpu": _BATCH, "gradient_accumulation_steps": _BATCH,
    "optimizer": "training.learningRate, adamBeta1, adamBeta2, adamEpsilon and weightDecay (AdamW)",
    "scheduler": "lrSchedule (the trainer steps transformers' schedule itself)",
    "amp": "deepspeed.precision", "bfloat16": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision", "bf16.enabled": "deepspeed.precision",
    "zero_optimization.cpu_offload": "deepspeed.offloadOptimizer", "zero_optimization.cpu_offload_params": "deepspeed.offloadParams",
}


class DeepSpeedSpec(SpecModel):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        default=2, description="0: plain data parallel; 1: shard optimizer state; 2: + gradients; 3: + parameters."
    )
    offload_optimizer: bool = Field(default=False, description="Keep optimizer state in CPU memory (ZeRO 1-3).")
    offload_params: bool = Field(default=False, description="Keep parameters in CPU memory (ZeRO-3 only).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 where the GPU supports it, fp32 on CPU."
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed config merged over the generated one, last (for experts). Keys the fields above or "
                    "training set (batch sizes, optimizer, scheduler, precision, ZeRO stage, offload, gradient clipping) "
                    "are refused, or must agree with those fields.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _stage_number(cls, value: Any) -> Any:
        if isinstance(value, bool):  # True == 1 to a Literal check; the CRD's integer type refuses it
            raise ValueError(f"a stage number 0-3, not {str(value).lower()}")
        return value

    def check(self) -> Problems:
        if self.offload_params and self.zero_stage != 3:
            yield "offloadParams", f"parameter offload needs zeroStage: 3 (got {self.zero_stage})"
        if self.offload_optimizer and self.zero_stage == 0:
            yield "offloadOptimizer", "optimizer offload needs zeroStage 1, 2 or 3"

    def config_problems(self, max_grad_norm: float | None) -> Problems:
        """Raw keys the spec owns: refused naming the field that sets them, or (the ZeRO stage, the
        offload sections, gradient clipping) accepted only where they agree with it."""
        config = self.config
        for dotted, field in OWNED_KEYS.items():
            section, _, key = dotted.rpartition(".")
            parent = config.get(section) if section else config
            if isinstance(parent, dict) and key in parent:
                yield f"config.{dotted}", f"set by {field}; remove it here"
        zero = config.get("zero_optimization")
        if zero is not None and not isinstance(zero, dict):
            yield "config.zero_optimization", "must be a mapping of ZeRO settings"
            return
        zero = zero or {}
        if "stage" in zero and (isinstance(zero["stage"], bool) or zero["stage"] != self.zero_stage):
            yield "config.zero_optimization.stage", f"{zero['stage']!r} contradicts deepspeed.zeroStage ({self.zero_stage}); set the stage there"
        for key, flag, name in (("offload_optimizer", self.offload_optimizer, "offloadOptimizer"),
                                ("offload_param", self.offload_params, "offloadParams")):
            if key in zero and not flag:
                yield f"config.zero_optimization.{key}", f"tunes an offload that is off: set deepspeed.{name}: true first"
        if "gradient_clipping" in config and config["gradient_clipping"] != max_grad_norm:
            yield "config.gradient_clipping", (f"{config['gradient_clipping']!r} contradicts training.maxGradNorm "
                                               f"({max_grad_norm}); set clipping there")


class ResourcesSpec(SpecModel):
    workers: int = Field(default=1, ge=1, le=MAX_RAY_WORKERS, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(default=1, ge=0.0001, le=1024,
                                   description="CPUs Ray reserves for each worker (Ray counts to 0.0001).")
    gpus_per_worker: float = Field(default=0, ge=0, le=16, description="GPUs for each worker; 0 trains on CPU (gloo).")

    def check(self) -> Problems:
        if 0 < self.gpus_per_worker < 1:
            yield "gpusPerWorker", "DeepSpeed needs a whole GPU per worker: use 0 (CPU) or a whole number"
        elif self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            yield "gpusPerWorker", "use a whole number of GPUs"
        elif self.gpus_per_worker > 1:
            yield "gpusPerWorker", "one GPU per worker: for more GPUs, raise resources.workers instead"


class OutputSpec(SpecModel):
    dir: str = Field(default="runs", description="Folder that receives <job name>/: checkpoints, the model, results.json.")
    export: Literal["best", "last", "none"] = Field(
        default="best",
        description="Which model to export in Hugging Face format (safetensors + tokenizer): the best evaluation's, the last step's, or none.",
    )
    merge_adapter: bool = Field(
        default=True,
        description="freezing.strategy: lora: besides the adapter in PEFT's format (model/adapter/, for "
                    "PeftModel.from_pretrained), export the base with the adapter merged in (model/), loadable with "
                    "AutoModelFor*.from_pretrained alone; false exports the adapter only. Other strategies ignore it.",
    )
    keep_checkpoints: int = Field(default=2, ge=1, le=1000, description="Checkpoints kept besides the latest (best by evaluation.metric).")
