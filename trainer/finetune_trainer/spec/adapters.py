"""`spec.freezing.lora`: LoRA-family adapters (LoRA, DoRA, rsLoRA), trained through PEFT.

The fields are PEFT's `LoraConfig` under the names LLaMA-Factory and Axolotl users know (rank r,
alpha, dropout, target modules, DoRA, rsLoRA, top-N layers); trainer/finetune_trainer/adapters.py
turns them into a `LoraConfig`. Module names are plain names, never regular expressions: PEFT
matches a list by exact name or `.`-suffix, so a hostile author gets no regex to make slow, and
their charset and count are bounded here (the CRD schema carries the same bounds).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from pydantic import Field, StringConstraints

from .base import SpecModel

Problems = Iterator[tuple[str, str]]

MAX_RANK = 4096  # above any projection width we train; the model's own width is checked at preflight
MAX_TARGETS = 64
# a module name, or a dotted path of names (self_attn.o_proj): what PEFT matches by suffix
TARGET_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$"
TargetName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=TARGET_PATTERN)]


class LoraSpec(SpecModel):
    r: int = Field(default=8, ge=1, le=MAX_RANK, description="Rank of each adapter's update (LoRA's r). Default 8, PEFT's and LLaMA-Factory's default.")
    alpha: int = Field(
        default=16, ge=1, le=1_000_000,
        description="Scale of the update: alpha / r (alpha / sqrt(r) with useRslora). Default 16, twice the default r, "
                    "as LLaMA-Factory derives it.",
    )
    dropout: float = Field(
        default=0.0, ge=0, lt=1,
        description="Dropout on each adapter's input. Default 0, PEFT's and LLaMA-Factory's default: above 0, PEFT keeps "
                    "a dropped-out copy of every adapted projection's input for backward (on SmolLM2-135M a third more "
                    "activation memory than with 0, more than full fine-tuning keeps).",
    )
    target_modules: list[TargetName] | None = Field(
        default=None, min_length=1, max_length=MAX_TARGETS,
        description="Modules that get adapters, matched as PEFT matches a list: a module whose name is one of these "
                    "or ends with `.` and one of these (q_proj, v_proj, self_attn.o_proj). Plain names, not regular "
                    "expressions. Default: every linear projection inside the transformer blocks (Llama: "
                    "q/k/v/o_proj, gate/up/down_proj; BERT: query, key, value and the dense layers), found by the "
                    "trainer's layer discovery; the embeddings and the output layer stay frozen.",
    )
    use_dora: bool = Field(
        default=False,
        description="DoRA: the update learns a magnitude and a direction separately (PEFT's use_dora); closer to full "
                    "fine-tuning at the same r, slower per step.",
    )
    use_rslora: bool = Field(
        default=False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r, which keeps large ranks learning (PEFT's use_rslora)."
    )
    layers: int | None = Field(
        default=None, ge=1, le=100_000,
        description="Adapters only on the top N transformer blocks (PEFT's layers_to_transform); the blocks below "
                    "stay wholly frozen. Default: every block.",
    )

    def summary(self) -> str:
        """How a run or a trial names its adapter (logs, the trial table): `lora r=8` and the variants."""
        kind = "dora" if self.use_dora else "lora"
        extra = (", rslora" if self.use_rslora else "") + (f", top {self.layers} layers" if self.layers else "")
        return f"{kind} r={self.r}{extra}"
