"""Loading the pre-trained model and its tokenizer from where the spec says they are."""

from __future__ import annotations

import os

import torch
from torch import nn

from .spec import ModelSpec, StorageSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(spec: ModelSpec, storage: StorageSpec | None = None) -> str:
    """A local folder for local/pkg:// sources (GGUF files are converted once) and for s3:// ones
    (copied once per node through `storage`: remote_model.py), else the hub name."""
    from .sources import is_hub_name, resolve_local

    if spec.source.startswith("s3://"):
        from .remote_model import local_copy

        return str(local_copy(spec.source, storage))
    if is_hub_name(spec.source):
        return spec.source
    path = resolve_local(spec.source)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import materialize_gguf

        return str(materialize_gguf(path))
    return str(path)


def load_tokenizer(model_dir: str, spec: ModelSpec):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if tok.pad_token_id is None:
        # Decoder tokenizers often ship without a pad token; padding positions are masked out of
        # attention and loss, so reusing EOS is the usual, harmless choice.
        tok.pad_token = tok.eos_token
    return tok


def _config_and_class(model_dir: str, spec: ModelSpec, *, num_labels: int | None, dropout: float | None, pad_token_id: int | None):
    """The model's config with the spec's overrides, and the Auto class for the task's head."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if dropout is not None:
        for key, value in list(config.to_dict().items()):
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, dropout)
    if spec.task != "sequence-classification":
        return config, AutoModelForCausalLM
    config.num_labels = num_labels or config.num_labels
    if config.pad_token_id is None:
        config.pad_token_id = pad_token_id
    return config, AutoModelForSequenceClassification


def load_model(model_dir: str, spec: ModelSpec, *, num_labels: int | None, dropout: float | None, pad_token_id: int | None,
               quantize: bool = False, training: bool = False) -> nn.Module:
    """`quantize`: load the base as spec.model.quantization says (training a QLoRA adapter on a
    GPU); everything else (the merge at export, scoring) loads it in full precision. `training`: the
    worker's model, which gets the spec's GPU kernels (flash attention, Liger); the merge and the
    scoring, which may run where no GPU is, load with transformers' own choice and modules."""
    config, cls = _config_and_class(model_dir, spec, num_labels=num_labels, dropout=dropout, pad_token_id=pad_token_id)
    dtype = _DTYPES.get(spec.dtype, torch.float32)
    quantized = _quantization(spec) if quantize and spec.quantization is not None else {}
    chosen = spec.attn_implementation if training or spec.attn_implementation != "flash_attention_2" else None
    attention = {"attn_implementation": chosen} if chosen else {}  # unset: transformers' choice (sdpa, else eager)
    model = cls.from_pretrained(model_dir, config=config, dtype=dtype, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                                **attention, **quantized)
    if training and spec.liger_kernels:
        _apply_liger(model)
    if spec.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def bitsandbytes_missing(spec: ModelSpec) -> str | None:
    """Why spec.model.quantization cannot load here, if it cannot (asked at preflight, before Ray)."""
    import importlib.util

    if spec.quantization is None or importlib.util.find_spec("bitsandbytes") is not None:
        return None
    return ("needs bitsandbytes, which this trainer installation lacks: install the optional extra qlora "
            "(pip install 'finetune-operator[trainer,qlora]') in the trainer image, or remove model.quantization")


def speed_option_problems(spec: ModelSpec, model_dir: str) -> list[tuple[str, str]]:
    """(field, why) for each speed option this trainer installation cannot honour for this model
    (asked at preflight, before Ray): an attention kernel the model's transformers class lacks
    (from_pretrained would raise in every worker), flash-attn or liger-kernel not installed, or a
    model family Liger has no kernels for."""
    import importlib.util

    found: list[tuple[str, str]] = []
    flag = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}.get(spec.attn_implementation or "")
    if flag is not None and not spec.trust_remote_code:  # a model's own code decides for itself, at load
        config, auto = _config_and_class(model_dir, spec, num_labels=None, dropout=None, pad_token_id=None)
        model_class = auto._model_mapping.get(type(config), None)
        if model_class is not None and not getattr(model_class, flag, False):
            found.append(("attnImplementation", f"{model_class.__name__} has no {spec.attn_implementation} attention in "
                                                "transformers: use attnImplementation: eager"))
    if spec.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        found.append(("attnImplementation", "flash_attention_2 needs the flash-attn package, which this trainer installation "
                                            "lacks: install flash-attn in the trainer image, or use attnImplementation: sdpa"))
    if spec.liger_kernels:
        if importlib.util.find_spec("liger_kernel") is None:
            found.append(("ligerKernels", "needs the liger-kernel package, which this trainer installation lacks: install the "
                                          "optional extra speed (pip install 'finetune-operator[trainer,speed]') in the trainer "
                                          "image, or remove model.ligerKernels"))
        else:
            supported = _liger_families()
            kind = model_type(model_dir, spec)
            if kind not in supported:
                found.append(("ligerKernels", f"liger-kernel has no kernels for model type {kind!r} (it has: "
                                              f"{', '.join(sorted(supported))}); remove model.ligerKernels"))
    return found


def _liger_families() -> set[str]:
    """The model types liger-kernel patches: its own table, so a new release's families count."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def _apply_liger(model: nn.Module) -> None:
    """Liger's kernels patched into this model instance (RoPE, RMSNorm, SwiGLU, and the causal-lm
    head's fused linear cross-entropy), by the library's own per-family table, before PEFT wraps it.
    Untested here: Triton needs a GPU and the dev machines have none."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)


def _quantization(spec: ModelSpec) -> dict:
    """transformers' BitsAndBytesConfig for spec.model.quantization: 4 bits as the QLoRA paper (NF4,
    double quantization, compute in bf16 where the GPU has it), 8 bits as LLM.int8(). On the
    worker's own GPU (Ray Train gives each worker one). Untested here: no GPU on the dev machines."""
    from transformers import BitsAndBytesConfig

    missing = bitsandbytes_missing(spec)
    if missing:
        raise RuntimeError(f"spec.model.quantization {missing}")
    assert spec.quantization is not None
    if spec.quantization.bits == 4:
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def model_type(model_dir: str, spec: ModelSpec) -> str | None:
    """The config's model_type (llama, gpt2, ...): what decides whether packing keeps examples apart.
    A model that runs its own code (trustRemoteCode and an auto_map) is named as such: its model_type
    says nothing about how that code attends."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    kind = getattr(config, "model_type", None)
    if spec.trust_remote_code and getattr(config, "auto_map", None):
        return f"{kind or 'a model'} with its own code (auto_map, trustRemoteCode)"
    return kind


def skeleton(model_dir: str, spec: ModelSpec, *, num_labels: int | None) -> nn.Module:
    """The model's structure without its weights (meta device): parameter names for planning."""
    config, cls = _config_and_class(model_dir, spec, num_labels=num_labels, dropout=None, pad_token_id=None)
    with torch.device("meta"):
        return cls.from_config(config, trust_remote_code=spec.trust_remote_code)


def offline_if_local(source: str) -> None:
    """Local sources must never reach for the hub (there may be no network at all)."""
    from .sources import is_hub_name

    if not is_hub_name(source):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
