"""How the model is trained: optimisation, which layers learn (freezing), LR schedule, evaluation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from .adapters import LoraSpec
from .base import SpecModel
from .limits import INT32_MAX
from .model import DataSource

Problems = Iterator[tuple[str, str]]


def _camel(field: str) -> str:
    return re.sub(r"_(\w)", lambda m: m.group(1).upper(), field)


class TrainingSpec(SpecModel):
    epochs: float | None = Field(default=None, gt=0, le=1e6, description="Passes over train (default 1 when maxSteps is unset).")
    max_steps: int | None = Field(default=None, ge=1, le=INT32_MAX, description="Optimizer steps; wins over epochs when both are set.")
    per_device_batch_size: int = Field(default=8, ge=1, le=65536, description="Examples per worker per micro-step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=65536, description="Micro-steps per optimizer step.")
    learning_rate: float = Field(default=5e-5, gt=0, le=1, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="Decoupled (AdamW) weight decay; not applied to biases and norms.")
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    adam_epsilon: float = Field(default=1e-8, gt=0)
    fused_optimizer: bool = Field(
        default=False,
        description="AdamW's fused implementation (torch.optim.AdamW(fused=True), through DeepSpeed's torch_adam): one "
        "kernel for the whole update instead of one per tensor group; same algorithm, results differ only in rounding. "
        "On GPUs and CPUs; not with deepspeed.offloadOptimizer, whose CPU Adam is DeepSpeed's own.",
    )  # fmt: skip
    dropout: float | None = Field(default=None, ge=0, lt=1, description="Override every dropout probability in the model config.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping; null disables it.")
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seeds data order, splits and new weights.")
    non_finite_loss: Literal["stop", "skipStep"] = Field(
        default="stop",
        description="What a NaN or infinite training loss does, noticed at the next evaluation (checked on the device, "
                    "no per-step sync). stop: the run ends there, failed with reason NonFiniteLoss naming the first such "
                    "step; no checkpoint is written from then on. skipStep: training goes on without the optimizer step "
                    "of each such batch (DeepSpeed's ZeRO optimizer drops a step whose gradients are not finite; needs "
                    "zeroStage 1-3), and each evaluation reports how many steps were skipped.",
    )

    def non_finite_problems(self, zero_stage: int, ds_config: dict[str, Any]) -> Problems:
        """skipStep leans on DeepSpeed's ZeRO optimizer, which checks the gradient norm at every
        step and drops a step whose norm is not finite (DeepSpeed 0.19: stages 1-3 in fp32, bf16
        and fp16); stage 0, or a raw config that turns that check off, would apply the NaN step."""
        if self.non_finite_loss != "skipStep":
            return
        if zero_stage == 0:
            yield "nonFiniteLoss", "skipStep needs deepspeed.zeroStage 1, 2 or 3 (ZeRO's optimizer skips a step whose gradients are not finite; stage 0 has no such check)"
        zero, bf16 = ds_config.get("zero_optimization"), ds_config.get("bf16")
        if isinstance(zero, dict) and zero.get("compute_grad_norm") is False:
            yield "nonFiniteLoss", "skipStep needs the gradient norm DeepSpeed checks before each step: remove deepspeed.config.zero_optimization.compute_grad_norm: false"
        if isinstance(bf16, dict) and bf16.get("check_grad_overflow") is False:
            yield "nonFiniteLoss", "skipStep needs DeepSpeed's bf16 overflow check: remove deepspeed.config.bf16.check_grad_overflow: false"

    def steps_per_epoch(self, num_train: int, world_size: int) -> int:
        """Optimizer steps per pass: every rank gets the same number of full micro-batches."""
        return max(1, (num_train // world_size) // (self.per_device_batch_size * self.gradient_accumulation_steps))

    def total_steps(self, num_train: int, world_size: int) -> int:
        """The run's optimizer steps: maxSteps, else `epochs` passes (at least one step). Here, not in
        the recipe, because the driver and the search's schedulers need it without torch."""
        return self.max_steps or max(1, round((self.epochs or 1.0) * self.steps_per_epoch(num_train, world_size)))


# which strategy reads each strategy-specific field (the other fields apply to every strategy)
FREEZING_FIELD_USERS = {"layers": "freezeBottom", "unfreeze_every": "gradual", "trainable_patterns": "patterns",
                        "frozen_patterns": "patterns", "lora": "lora"}
FreezingStrategy = Literal["none", "freezeBottom", "featureExtraction", "gradual", "patterns", "lora"]


class FreezingSpec(SpecModel):
    strategy: FreezingStrategy = Field(
        default="none",
        description=(
            "none: every weight trains. freezeBottom: embeddings + the bottom `layers` blocks stay fixed. "
            "featureExtraction: the whole pre-trained body stays fixed, only the task head trains. "
            "gradual: ULMFiT-style, the head trains first and one more block from the top unfreezes every "
            "`unfreezeEvery` steps (or every epoch). patterns: regexes over parameter names. "
            "lora: the pre-trained weights stay frozen and small low-rank adapters (PEFT's LoRA, DoRA, rsLoRA; "
            "settings in `lora`) train on the transformer blocks' projections, plus the task head for "
            "sequence-classification."
        ),
    )
    layers: int | float | None = Field(
        default=None, ge=0, le=INT32_MAX, description="freezeBottom: blocks to freeze, as a count (e.g. 4) or a fraction of all blocks (e.g. 0.5)."
    )
    unfreeze_every: int | Literal["epoch"] | None = Field(
        default=None, description="gradual: steps between unfreezing one more block, or `epoch`."
    )
    trainable_patterns: list[str] = Field(
        default_factory=list, description="patterns: only parameters whose name matches one of these train."
    )
    frozen_patterns: list[str] = Field(
        default_factory=list, description="patterns: parameters whose name matches one of these stay fixed."
    )
    lora: LoraSpec | None = Field(
        default=None, description="lora: the adapters (rank, alpha, dropout, target modules, DoRA, rsLoRA, top-N layers); defaults when left out."
    )
    layer_lr_decay: float | None = Field(
        default=None, gt=0, le=1,
        description="Discriminative fine-tuning: each block below the head learns at this factor times the block above it.",
    )

    def unused_fields(self) -> list[str]:
        """Fields set here that the chosen strategy does not read. A plain manifest with one is
        an error (a typo-like mistake); a search trial drops them, so one space can mix
        strategies (see spec/search.py)."""
        return [f for f, user in FREEZING_FIELD_USERS.items() if user != self.strategy and getattr(self, f) not in (None, [])]

    def check(self) -> Problems:
        s = self.strategy
        for field in self.unused_fields():
            yield _camel(field), f"only used by strategy: {FREEZING_FIELD_USERS[field]} (strategy is {s})"
        if s == "freezeBottom":
            if self.layers is None:
                yield "layers", "freezeBottom needs layers: a count of blocks (e.g. 4) or a fraction (e.g. 0.5)"
            elif isinstance(self.layers, float) and not self.layers < 1:
                yield "layers", "a fraction must be below 1; write a whole number for a count of blocks"
        if s == "gradual":
            if self.unfreeze_every is None:
                yield "unfreezeEvery", "gradual needs unfreezeEvery: a number of steps (e.g. 50) or `epoch`"
            elif isinstance(self.unfreeze_every, int) and not 1 <= self.unfreeze_every <= INT32_MAX:
                yield "unfreezeEvery", f"must be at least 1 step (and at most {INT32_MAX})"
        if s == "lora" and self.layer_lr_decay is not None:
            yield "layerLrDecay", ("scales whole blocks' learning rates, and under lora only the adapters train; remove it "
                                   "(to adapt fewer blocks, set lora.layers)")
        if s == "patterns" and not (self.trainable_patterns or self.frozen_patterns):
            yield "trainablePatterns", "patterns needs trainablePatterns and/or frozenPatterns (regexes over parameter names)"
        for name, patterns in (("trainablePatterns", self.trainable_patterns), ("frozenPatterns", self.frozen_patterns)):
            for i, pattern in enumerate(patterns):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    yield f"{name}[{i}]", f"not a valid regular expression: {exc}"

    def lora_settings(self) -> LoraSpec:
        """The adapters' settings: the section as written, or its defaults when left out."""
        return self.lora or LoraSpec()

    def frozen_bottom_blocks(self, num_layers: int) -> int:
        """Layer blocks freezeBottom fixes, given the model's layer count (fractions round down)."""
        if self.layers is None:
            return 0
        if isinstance(self.layers, float):
            return int(self.layers * num_layers)
        return self.layers


SchedulerType = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "greedy",
]

# Which spec fields each transformers schedule accepts, and the keyword `get_scheduler` takes
# them as (`scheduler_specific_kwargs`). A unit test checks this table against transformers'
# own signatures, so a rename upstream fails a test instead of a user's run.
SCHEDULE_OPTIONS: dict[str, dict[str, str]] = {
    "linear": {},
    "cosine": {"num_cycles": "num_cycles"},
    "cosine_with_restarts": {"num_cycles": "num_cycles"},
    "polynomial": {"power": "power", "lr_end": "lr_end"},
    "constant": {},
    "constant_with_warmup": {},
    "inverse_sqrt": {"timescale": "timescale"},
    "reduce_lr_on_plateau": {},
    "cosine_with_min_lr": {"num_cycles": "num_cycles", "min_lr": "min_lr", "min_lr_rate": "min_lr_rate"},
    "cosine_warmup_with_min_lr": {
        "num_cycles": "num_cycles", "min_lr": "min_lr", "min_lr_rate": "min_lr_rate", "warmup_lr_rate": "warmup_lr_rate",
    },
    "warmup_stable_decay": {
        "num_decay_steps": "num_decay_steps", "num_stable_steps": "num_stable_steps", "min_lr_ratio": "min_lr_ratio",
        "warmup_type": "warmup_type", "decay_type": "decay_type", "num_cycles": "num_cycles",
    },
    "greedy": {},
}
# Schedules that react to the evaluation metric instead of the step count: stepped at each evaluation.
METRIC_DRIVEN_SCHEDULES = frozenset({"reduce_lr_on_plateau", "greedy"})
NO_WARMUP_SCHEDULES = frozenset({"constant", "reduce_lr_on_plateau", "greedy"})


class LRScheduleSpec(SpecModel):
    type: SchedulerType = Field(default="linear", description="Any schedule transformers' get_scheduler offers.")
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1, description="Warmup as a fraction of all steps.")
    warmup_steps: int | None = Field(default=None, ge=0, le=INT32_MAX, description="Warmup as a number of steps.")
    num_cycles: float | None = Field(default=None, gt=0, description="cosine family, warmup_stable_decay.")
    power: float | None = Field(default=None, gt=0, description="polynomial.")
    lr_end: float | None = Field(default=None, ge=0, description="polynomial: final learning rate.")
    min_lr: float | None = Field(default=None, ge=0, description="cosine_with_min_lr family: floor as a value.")
    min_lr_rate: float | None = Field(default=None, ge=0, le=1, description="cosine_with_min_lr family: floor as a fraction of the peak.")
    warmup_lr_rate: float | None = Field(default=None, ge=0, le=1, description="cosine_warmup_with_min_lr: starting fraction.")
    timescale: int | None = Field(default=None, ge=1, le=INT32_MAX, description="inverse_sqrt.")
    num_decay_steps: int | None = Field(default=None, ge=1, le=INT32_MAX, description="warmup_stable_decay (default: 10% of steps).")
    num_stable_steps: int | None = Field(default=None, ge=0, le=INT32_MAX, description="warmup_stable_decay.")
    min_lr_ratio: float | None = Field(default=None, ge=0, le=1, description="warmup_stable_decay.")
    warmup_type: Literal["linear", "cosine", "1-sqrt"] | None = Field(default=None, description="warmup_stable_decay.")
    decay_type: Literal["linear", "cosine", "1-sqrt"] | None = Field(default=None, description="warmup_stable_decay.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for reduce_lr_on_plateau (factor, patience, ...) and greedy.",
    )

    def unused_fields(self) -> list[str]:
        """Fields set here that this schedule type does not read (see FreezingSpec.unused_fields)."""
        allowed = SCHEDULE_OPTIONS[self.type]
        unused = [f for f in sorted({f for opts in SCHEDULE_OPTIONS.values() for f in opts}) if getattr(self, f) is not None and f not in allowed]
        if self.type in NO_WARMUP_SCHEDULES:
            unused += [f for f in ("warmup_ratio", "warmup_steps") if getattr(self, f)]
        if self.options and self.type not in METRIC_DRIVEN_SCHEDULES:
            unused.append("options")
        return unused

    def check(self) -> Problems:
        for field in self.unused_fields():
            if field == "options":
                yield "options", f"options are for reduce_lr_on_plateau and greedy; {self.type} takes typed fields"
            elif field in ("warmup_ratio", "warmup_steps"):
                yield _camel(field), f"type: {self.type} has no warmup; use constant_with_warmup or another schedule with warmup"
            else:
                users = sorted(t for t, opts in SCHEDULE_OPTIONS.items() if field in opts)
                yield _camel(field), f"not used by type: {self.type}; it applies to {', '.join(users)}"
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            yield "warmupSteps", "set either warmupRatio or warmupSteps, not both"
        if self.min_lr is not None and self.min_lr_rate is not None:
            yield "minLr", "set either minLr or minLrRate, not both"
        if self.type in {"cosine_with_min_lr", "cosine_warmup_with_min_lr"} and self.min_lr is None and self.min_lr_rate is None:
            yield "minLrRate", f"{self.type} needs minLr or minLrRate"

    def warmup(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round((self.warmup_ratio or 0.0) * total_steps)

    def scheduler_kwargs(self) -> dict[str, Any]:
        kwargs = {kw: getattr(self, f) for f, kw in SCHEDULE_OPTIONS[self.type].items() if getattr(self, f) is not None}
        return {**kwargs, **self.options}


Metric = Literal["loss", "accuracy", "f1", "perplexity", "referencePerplexity"]
# referencePerplexity: perplexity on evaluation.reference (general text), the forgetting probe;
# evaluated only when a reference is given, so it is not among a task's default metrics.
REFERENCE_METRIC = "referencePerplexity"
METRICS_BY_TASK: dict[str, tuple[str, ...]] = {
    "sequence-classification": ("loss", "accuracy", "f1"),
    "causal-lm": ("loss", "perplexity", REFERENCE_METRIC),
}
MAXIMIZED = frozenset({"accuracy", "f1"})


class EarlyStoppingSpec(SpecModel):
    patience: int = Field(default=3, ge=1, le=INT32_MAX, description="Evaluations without improvement before training stops.")
    min_delta: float = Field(default=0.0, ge=0, description="Smallest change of the metric that counts as improvement.")


class SamplesSpec(SpecModel):
    """Generated text at the baseline and at every evaluation, for prompts that never change."""

    count: int = Field(default=4, ge=1, le=32, description="Held-out prompts (the first of the validation split) generated for.")
    max_new_tokens: int = Field(default=64, ge=1, le=1024, description="Tokens generated per prompt, at most (generation also stops at EOS).")
    temperature: float = Field(
        default=0.0, ge=0, le=5,
        description="0: greedy decoding. Above 0: sampling, seeded with training.seed, so the same run writes the same samples.",
    )


class ReferenceSpec(SpecModel):
    """General text the fine-tune should not forget how to model (the forgetting probe)."""

    data: DataSource = Field(description="Any text data source (a file, or pkg://<python-package>/<path>), read like spec.data.train.")
    text_field: str = Field(default="text", description="Column with the text.")
    max_samples: int = Field(default=200, ge=1, le=100_000, description="Rows used (a seeded sample of the file), each truncated to data.maxSeqLength tokens.")


class EvaluationSpec(SpecModel):
    every_steps: int = Field(default=50, ge=1, le=INT32_MAX, description="Evaluate (and checkpoint) every N optimizer steps, and at the end.")
    metrics: list[Metric] | None = Field(
        default=None, description="Default: loss, accuracy, f1 (classification); loss, perplexity (causal-lm)."
    )
    metric: Metric = Field(default="loss", description="The metric that picks the best checkpoint and drives early stopping.")
    mode: Literal["min", "max"] | None = Field(default=None, description="Default: max for accuracy/f1, min otherwise.")
    baseline: bool = Field(default=True, description="Evaluate the pre-trained model before training, to show the gain.")
    early_stopping: EarlyStoppingSpec | None = Field(default=None, description="Stop when the metric stops improving.")
    samples: SamplesSpec | None = Field(
        default=None,
        description="causal-lm: generate from fixed held-out prompts at the baseline and at every evaluation "
                    "(results.json, the run's output, the latest ones in the status).",
    )
    reference: ReferenceSpec | None = Field(
        default=None,
        description="causal-lm: perplexity on general text at the baseline and every evaluation, reported as its "
                    "change (forgetting); metric referencePerplexity.",
    )

    def resolved_metrics(self, task: str) -> list[str]:
        chosen: list[str] = list(self.metrics) if self.metrics else [m for m in METRICS_BY_TASK[task] if m != REFERENCE_METRIC]
        if self.reference is not None and REFERENCE_METRIC not in chosen:
            chosen.append(REFERENCE_METRIC)  # a reference is given to be measured
        return chosen if self.metric in chosen else [*chosen, self.metric]

    def resolved_mode(self) -> Literal["min", "max"]:
        return self.mode or ("max" if self.metric in MAXIMIZED else "min")

    def check(self, task: str) -> Problems:
        valid = METRICS_BY_TASK[task]
        for i, metric in enumerate(self.metrics or []):
            if metric not in valid:
                yield f"metrics[{i}]", f"{metric} is not defined for task: {task}; choose from {', '.join(valid)}"
        if self.metric not in valid:
            yield "metric", f"{self.metric} is not defined for task: {task}; choose from {', '.join(valid)}"
        natural = "max" if self.metric in MAXIMIZED else "min"
        if self.mode is not None and self.mode != natural:
            yield "mode", f"{self.metric} improves when it goes {'up' if natural == 'max' else 'down'}: mode must be {natural} (or left out)"
        if task != "causal-lm":
            for field in ("samples", "reference"):
                if getattr(self, field) is not None:
                    yield field, f"generated samples and the forgetting probe are for task: causal-lm; remove {field}"
        elif self.reference is None:
            named = [("metric", self.metric)] + [(f"metrics[{i}]", m) for i, m in enumerate(self.metrics or [])]
            for path, metric in named:
                if metric == REFERENCE_METRIC:
                    yield path, f"{REFERENCE_METRIC} needs evaluation.reference: the general text it is measured on (e.g. data: pkg://<package>/<file>.csv)"
        if self.reference is not None:
            for path, msg in self.reference.data.check():
                yield f"reference.data.{path}", msg
