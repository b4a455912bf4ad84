"""Where the model and the data come from, and how the data is turned into examples."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import Field, model_validator

from .base import SpecModel

Task = Literal["causal-lm", "sequence-classification"]
DataFormat = Literal["text", "promptCompletion", "messages"]
AttentionImplementation = Literal["sdpa", "flash_attention_2", "eager"]
CHAT_TEMPLATE_MAX = 32 * 1024  # characters; real templates are 1-15 KB (Llama 3.1's ~6 KB)
Problems = Iterator[tuple[str, str]]

SOURCE_HELP = (
    "a local or PVC path, pkg://<python-package>/<path> for files a pip package ships, "
    "s3://bucket/folder (safetensors; read through spec.storage, copied once per node), "
    "or a Hugging Face hub name like org/model (clusters with internet only)"
)


class QuantizationSpec(SpecModel):
    """A quantized, frozen base under LoRA adapters (QLoRA), through bitsandbytes on GPUs."""

    bits: Literal[4, 8] = Field(
        description="4: NF4 with double quantization (QLoRA's recipe); 8: LLM.int8(). The base stays frozen; "
                    "only the adapters train (freezing.strategy: lora). Needs GPUs (resources.gpusPerWorker) "
                    "and the trainer's optional extra `qlora` (bitsandbytes).",
    )


class ModelSpec(SpecModel):
    source: str = Field(min_length=1, description=f"Where the pre-trained model is: {SOURCE_HELP}.")
    task: Task = Field(description="What the model is fine-tuned for; picks the head.")
    num_labels: int | None = Field(
        default=None, ge=2, le=100_000, description="Classes for sequence-classification; default: from data."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="dtype the weights are loaded in (training precision is deepspeed.precision)."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward: less memory, ~30% slower."
    )
    attn_implementation: AttentionImplementation | None = Field(
        default=None,
        description="The attention kernel transformers runs (its attn_implementation). Default: transformers' own choice, "
        "sdpa where the model's class has it, else eager. sdpa: torch's "
        "scaled_dot_product_attention, which picks a flash or memory-efficient kernel on GPUs and runs on CPU; "
        "flash_attention_2: the flash-attn package's kernels (GPUs, bf16/fp16, the trainer image needs flash-attn "
        "installed; not with data.packing); eager: the model's plain PyTorch attention (slowest, for debugging).",
    )  # fmt: skip
    liger_kernels: bool = Field(
        default=False,
        description="Swap in Liger's Triton kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU) for the "
        "model families the liger-kernel package supports (llama, mistral, qwen2, gemma, phi3, ...): less memory "
        "and higher throughput on GPUs. Needs resources.gpusPerWorker and liger-kernel in the trainer image "
        "(the optional extra `speed`).",
    )  # fmt: skip
    revision: str | None = Field(default=None, description="Hub revision (hub sources only).")
    trust_remote_code: bool = Field(default=False, description="Allow the model's own Python code.")
    quantization: QuantizationSpec | None = Field(
        default=None, description="Load the frozen base quantized (QLoRA): with freezing.strategy: lora, on GPUs only."
    )

    def quantization_problems(self, *, strategy: str, gpus_per_worker: float, zero_stage: int) -> Problems:
        """A quantized base is frozen by construction (bitsandbytes' int8/NF4 tensors take no
        optimizer step), runs only on CUDA, and has not been made to work with ZeRO-3's parameter
        partitioning here: each refused with the fix, before anything loads."""
        if self.quantization is None:
            return
        if gpus_per_worker == 0:
            yield "quantization", ("a quantized base (bitsandbytes) runs on GPUs only: set resources.gpusPerWorker: 1, "
                                   "or remove model.quantization to train the adapters over the full-precision base on CPU")
        if strategy != "lora":
            yield "quantization", f"a quantized base cannot train itself, only adapters on it: set freezing.strategy: lora (is {strategy}) or remove model.quantization"
        if zero_stage == 3:
            yield "quantization", "a quantized base is not supported with deepspeed.zeroStage: 3 (ZeRO-3 partitions the packed 4/8-bit weights); use zeroStage 0, 1 or 2"

    def speed_problems(self, *, gpus_per_worker: float, precision: str, packing: bool) -> Problems:
        """GPU-only kernels refused where they cannot run, with the fix; whether the packages are
        installed is asked at preflight (modeling.speed_option_problems), where the trainer runs."""
        cpu = gpus_per_worker == 0
        if self.attn_implementation == "flash_attention_2":
            if cpu:
                yield "attnImplementation", ("flash_attention_2 runs on GPUs only: set resources.gpusPerWorker: 1, "
                                             "or use attnImplementation: sdpa (the default) on CPU")
            if precision == "fp32":
                yield "attnImplementation", "flash_attention_2 computes in bf16/fp16 only: set deepspeed.precision: bf16 (or auto), or use sdpa"
            if packing:
                # transformers finds packed examples for flash attention only in a batch flattened
                # into one row; our packed blocks are [batch, maxSeqLength] (packing.py)
                yield "attnImplementation", ("flash_attention_2 would attend across packed examples in our [batch, length] "
                                             "blocks: use sdpa (the default) with data.packing, or turn packing off")
        if self.liger_kernels and cpu:
            yield "ligerKernels", "Liger's kernels are Triton GPU kernels: set resources.gpusPerWorker: 1, or remove model.ligerKernels"

    def check(self) -> Problems:
        if self.source.startswith("s3://"):
            from .storage import split_s3_uri

            try:
                _, key = split_s3_uri(self.source)
            except ValueError as err:
                yield "source", str(err)
            else:
                if not key:
                    yield "source", f"{self.source} names a bucket; name the model's folder in it, such as s3://my-bucket/models/my-model"
                elif key.endswith(".gguf"):
                    yield "source", "a GGUF file is converted from a local or pkg:// path only; from S3 give a folder of safetensors"
            if self.trust_remote_code:
                # the model's Python files would come from storage, which whoever can write the bucket controls;
                # nothing read from storage is executed (remote_model.py copies data files only)
                yield "trustRemoteCode", ("an s3:// model's own Python code is never run: nothing read from storage is "
                                          "executed; use a model transformers implements, or a local/PVC folder you trust")
        if self.num_labels is not None and self.task != "sequence-classification":
            yield "numLabels", "only meaningful for task: sequence-classification; remove it"


class DataSource(SpecModel):
    path: str = Field(min_length=1, description="File path, pkg://<python-package>/<path>, or s3://bucket/key (read "
                                                "through spec.storage's endpoint with the job's own credentials).")
    format: Literal["jsonl", "csv", "parquet"] | None = Field(
        default=None, description="Default: from the file extension (.jsonl/.json, .csv, .parquet)."
    )
    encoding_errors: Literal["strict", "replace", "ignore"] = Field(
        default="strict", description="How undecodable bytes in text files are handled."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: object) -> object:
        # `train: data/train.jsonl` is the common case; the object form is for options.
        return {"path": value} if isinstance(value, str) else value

    def resolved_format(self) -> str | None:
        if self.format:
            return self.format
        lower = self.path.lower()
        for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
            if lower.endswith(suffix):
                return fmt
        return None

    def check(self) -> Problems:
        if self.path.startswith("s3://"):
            from .storage import split_s3_uri

            try:
                _, key = split_s3_uri(self.path)
            except ValueError as err:
                yield "path", str(err)
            else:
                if not key or self.path.endswith("/"):
                    yield "path", f"{self.path} names a bucket or a folder; name one object, such as s3://my-bucket/data/train.jsonl"
        if self.resolved_format() is None:
            yield "format", f"cannot tell the format of {self.path!r} from its extension; set format: jsonl, csv or parquet"


class DataSpec(SpecModel):
    train: DataSource = Field(description="Training examples.")
    validation: DataSource | None = Field(default=None, description="Held-out examples for evaluation.")
    test: DataSource | None = Field(default=None, description="Held-out examples scored once, after training.")
    validation_split: float | None = Field(
        default=None, gt=0, lt=1, description="Fraction of train held out for validation when there is no validation file."
    )
    test_split: float | None = Field(
        default=None, gt=0, lt=1, description="Fraction of train held out for the final test when there is no test file."
    )
    text_field: str = Field(default="text", description="Column with the input text.")
    text_pair_field: str | None = Field(default=None, description="Second text column (pair tasks such as NLI).")
    label_field: str = Field(default="label", description="Column with the class (sequence-classification).")
    labels: list[str] | None = Field(
        default=None, min_length=2, description="Class names in id order; default: sorted distinct labels of train."
    )
    format: DataFormat | None = Field(
        default=None,
        description="How a row becomes a causal-lm example (not the file format: that is train.format). "
        "text: textField, loss on every token; promptCompletion: promptField + completionField, loss on the "
        "completion only; messages: messagesField holds a conversation, [{role, content}, ...] with roles "
        "system/user/assistant, loss on the assistant turns only. "
        "Default: promptCompletion when promptField and completionField are set, else text.",
    )  # fmt: skip
    prompt_field: str | None = Field(
        default=None, description="Prompt column (causal-lm); loss on the completion only. Default with format promptCompletion: prompt."
    )
    completion_field: str | None = Field(
        default=None, description="Completion column (causal-lm). Default with format promptCompletion: completion."
    )
    messages_field: str = Field(default="messages", description="Conversation column for format: messages.")
    chat_template: str | None = Field(
        default=None, min_length=1, max_length=CHAT_TEMPLATE_MAX,
        description="How promptCompletion and messages rows are rendered into text. auto: the tokenizer's own "
        "chat template (refused when it has none); none (promptCompletion only): the prompt's tokens (with the "
        "tokenizer's leading special tokens, no trailing EOS), then the completion's tokens directly after, "
        "then EOS: no separator, no role markers; or a Jinja chat template, rendered in transformers' "
        "sandbox (apply_chat_template). Default: auto for messages, none for promptCompletion.",
    )  # fmt: skip
    max_seq_length: int = Field(default=128, ge=8, le=131072, description="Tokens per example after truncation.")
    packing: bool = Field(
        default=False,
        description="causal-lm: place whole examples (any format, cut at maxSeqLength as without packing) side by side in "
        "maxSeqLength blocks, fewer padding tokens per step; attention and loss stay inside each example (position ids "
        "restart per example), so every example trains and scores as it would alone. Only for model types verified "
        "to keep packed examples apart (llama, mistral, qwen2, phi3, gpt2, gpt_neox); others are refused.",
    )  # fmt: skip
    max_train_samples: int | None = Field(default=None, ge=1, description="Use at most this many training rows.")
    max_eval_samples: int | None = Field(default=None, ge=1, description="Use at most this many validation rows.")
    max_test_samples: int | None = Field(default=None, ge=1, description="Use at most this many test rows.")
    max_dropped_fraction: float = Field(
        default=0.1, ge=0, le=1,
        description="Refuse a data file in which more than this share of rows has an empty text or label "
        "(such rows are dropped); 1 trains on whatever is left.",
    )  # fmt: skip

    def check(self, task: str) -> Problems:
        for name in ("train", "validation", "test"):
            source = getattr(self, name)
            if source is not None:
                for path, msg in source.check():
                    yield f"{name}.{path}", msg
        if self.validation is None and self.validation_split is None:
            yield "validationSplit", "evaluation needs held-out data: set data.validation (a file) or data.validationSplit (e.g. 0.1)"
        if self.validation is not None and self.validation_split is not None:
            yield "validationSplit", "set either data.validation or data.validationSplit, not both"
        if self.test is not None and self.test_split is not None:
            yield "testSplit", "set either data.test or data.testSplit, not both"
        if (self.validation_split or 0) + (self.test_split or 0) >= 0.9:
            yield "validationSplit", "validationSplit + testSplit leave under 10% of train for training"
        if self.format is None and (self.prompt_field is None) != (self.completion_field is None):
            yield "promptField", "promptField and completionField go together; set both or neither"
        if task == "sequence-classification":
            if self.prompt_field is not None:
                yield "promptField", "prompt/completion fields are for task: causal-lm"
            if self.format is not None:
                yield "format", "data.format is for task: causal-lm; remove it"
            if self.chat_template is not None:
                yield "chatTemplate", "chatTemplate is for task: causal-lm; remove it"
            if self.packing:
                yield "packing", "packing is for task: causal-lm"
        else:
            if self.labels is not None:
                yield "labels", "labels are for task: sequence-classification"
            if self.text_pair_field is not None:
                yield "textPairField", "textPairField is for task: sequence-classification"
            yield from self._check_format()

    def resolved_format(self) -> DataFormat:
        """format as written, else what today's fields mean: both prompt fields set -> promptCompletion."""
        if self.format is not None:
            return self.format
        return "promptCompletion" if self.prompt_field and self.completion_field else "text"

    def prompt_columns(self) -> tuple[str, str]:
        """(prompt column, completion column) for format promptCompletion."""
        return self.prompt_field or "prompt", self.completion_field or "completion"

    def resolved_chat_template(self) -> str:
        """auto, none or a template: the default is auto for conversations (they have no other
        rendering) and none for prompt/completion, which is what such manifests always meant."""
        if self.chat_template is not None:
            return self.chat_template
        return "auto" if self.resolved_format() == "messages" else "none"

    def _check_format(self) -> Problems:
        fmt = self.resolved_format()
        if fmt != "promptCompletion" and (self.prompt_field is not None or self.completion_field is not None):
            yield "promptField", f"promptField/completionField are for format: promptCompletion, not {fmt}; remove them or set format: promptCompletion"
        if fmt == "text" and self.chat_template is not None:
            yield "chatTemplate", "chatTemplate is for format: promptCompletion or messages; plain text is trained as it is; remove it"
        if fmt == "messages" and self.chat_template == "none":
            yield "chatTemplate", "format messages needs a chat template to turn turns into text: use auto (the tokenizer's own) or give a Jinja template"
        template = self.chat_template
        if template is not None and template not in ("auto", "none"):
            if "{{" not in template and "{%" not in template:
                yield "chatTemplate", "not auto, none or a Jinja template (no {{ or {% in it); check the spelling"
            elif "__" in template:
                # The sandbox refuses these at render time anyway; a chat template never needs a
                # Python dunder, so a template that names one is refused before any work starts.
                yield "chatTemplate", "a chat template may not name Python attributes with __ (it renders in a sandbox); remove them"
