"""Where and how the training runs: DeepSpeed ZeRO, Ray Train workers, output."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from .base import SpecModel

Problems = Iterator[tuple[str, str]]


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
        description="Raw DeepSpeed config merged over the generated one, last (for experts).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    def check(self) -> Problems:
        if self.offload_params and self.zero_stage != 3:
            yield "offloadParams", f"parameter offload needs zeroStage: 3 (got {self.zero_stage})"
        if self.offload_optimizer and self.zero_stage == 0:
            yield "offloadOptimizer", "optimizer offload needs zeroStage 1, 2 or 3"
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            if key in self.config:
                yield f"config.{key}", "set by training.perDeviceBatchSize / gradientAccumulationSteps; remove it here"


class ResourcesSpec(SpecModel):
    workers: int = Field(default=1, ge=1, le=4096, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(default=1, gt=0, description="CPUs Ray reserves for each worker.")
    gpus_per_worker: float = Field(default=0, ge=0, description="GPUs for each worker; 0 trains on CPU (gloo).")

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
    keep_checkpoints: int = Field(default=2, ge=1, description="Checkpoints kept besides the latest (best by evaluation.metric).")
