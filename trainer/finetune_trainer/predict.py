"""`finetune predict`: try an exported model on a few texts, as the run trained it.

A classifier prints each text's class and every class's probability; a causal LM prints what it
writes, prompted exactly as training rendered prompts: through the run's chat template (chat.py:
the tokenizer's own for chatTemplate auto, the spec's Jinja template rendered in transformers'
sandbox, or plain prompt text for none) and decoded with the run's generation settings
(spec.evaluation.samples, generation.py's SampleGenerator, which the flags may override).

Loading is transformers' and PEFT's, with safetensors only (`use_safetensors=True`: a pickled
checkpoint is never unpickled) and the model's own code only with `--trust-remote-code`, whatever
the run's spec said. An adapter-only export loads onto its base model (the run's model.source,
else `--base`) through PEFT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .predict_source import PredictError, Source
from .spec import FineTuneJobSpec
from .spec.training import SamplesSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512  # tokens of an input without a run's data.maxSeqLength
TASKS = {"SEQ_CLS": "sequence-classification", "CAUSAL_LM": "causal-lm"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    task: str
    labels: list[str]  # class names in id order (classification)
    spec: FineTuneJobSpec | None
    device: torch.device


def load(source: Source, *, base: str | None = None, trust_remote_code: bool = False) -> Loaded:
    """The model and tokenizer `source` points at, ready for `classify` or `generate`."""
    from transformers import AutoConfig, AutoTokenizer

    spec = source.spec()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES.get(spec.model.dtype, torch.float32) if spec is not None and device.type == "cuda" else torch.float32
    common = {"trust_remote_code": trust_remote_code}
    tokenizer_dir = source.model_dir if (source.model_dir / "tokenizer_config.json").is_file() else source.adapter
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), **common)
        if source.full:
            config = AutoConfig.from_pretrained(str(source.model_dir), **common)
            if getattr(config, "auto_map", None) and not trust_remote_code:
                log.warning("%s ships its own code (auto_map), which is not run: loaded as transformers' own %s "
                            "(--trust-remote-code runs it, only for code you trust)", source.model_dir, config.model_type)
            task = _task(spec, config, source)
            model = _auto(task).from_pretrained(str(source.model_dir), config=config, dtype=dtype, use_safetensors=True, **common)
            labels = _labels(config, source, task)
        else:
            model, task, labels = _adapted(source, spec, base, dtype, trust_remote_code)
    except PredictError:
        raise
    except (OSError, ValueError, KeyError) as err:  # transformers' "no file named ...", a refused auto_map, a bad config
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        if "custom code" in reason or "trust_remote_code" in reason:
            raise PredictError(f"{source.model_dir} loads only with its own Python code (auto_map), which predict runs only "
                               "with --trust-remote-code: pass it only if you trust that code") from None
        raise PredictError(f"cannot load the model in {source.model_dir}: {reason}; check that the folder is a complete export "
                           "(config.json, *.safetensors, tokenizer files)") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as training did (modeling.load_tokenizer)
    return Loaded(model.to(device).eval(), tokenizer, task, labels, spec, device)


def _auto(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM


def _task(spec: FineTuneJobSpec | None, config: Any, source: Source) -> str:
    """The run's task; without results.json, the head the export has (architectures) or the adapter's task type."""
    if spec is not None:
        return spec.model.task
    if source.adapter is not None:
        import json

        task_type = json.loads((source.adapter / "adapter_config.json").read_text()).get("task_type")
        if task_type in TASKS:
            return TASKS[task_type]
    architectures = getattr(config, "architectures", None) or []
    return "sequence-classification" if any(a.endswith("ForSequenceClassification") for a in architectures) else "causal-lm"


def _labels(config: Any, source: Source, task: str) -> list[str]:
    if task != "sequence-classification":
        return []
    counts = (source.results.get("data") or {}).get("train_label_counts")
    if isinstance(counts, dict) and counts:  # the run's label names, in id order (the ingest's)
        return [str(name) for name in counts]
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]


def _adapted(source: Source, spec: FineTuneJobSpec | None, base: str | None, dtype: torch.dtype,
             trust_remote_code: bool) -> tuple[nn.Module, str, list[str]]:
    """An adapter-only export on its base (full precision, as scoring loads it)."""
    from peft import PeftModel
    from transformers import AutoConfig

    from .adapters import _quiet_peft

    assert source.adapter is not None
    base_dir = base or (_base_dir(spec) if spec is not None else None)
    if base_dir is None:
        raise PredictError(f"{source.adapter} is an adapter without its run's results.json (which names the base model); "
                           "give the run's folder, or the base model's folder with --base")
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    task = _task(spec, config, source)
    labels: list[str] = []
    if task == "sequence-classification":
        labels = _labels(config, source, task)
        if not source.results:
            raise PredictError(f"{source.adapter}: an adapter-only classifier needs its run's results.json (the class names); "
                               "give the run's folder")
        config.num_labels = len(labels)
        config.id2label, config.label2id = dict(enumerate(labels)), {n: i for i, n in enumerate(labels)}
        if config.pad_token_id is None:
            config.pad_token_id = 0
    model = _auto(task).from_pretrained(base_dir, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    with _quiet_peft():
        return PeftModel.from_pretrained(model, str(source.adapter)), task, labels


def _base_dir(spec: FineTuneJobSpec) -> str:
    from .modeling import resolve_model_dir
    from .sources import SourceError

    try:
        return resolve_model_dir(spec.model, spec.storage)
    except (SourceError, FileNotFoundError) as err:
        raise PredictError(f"the run's base model {spec.model.source} is not here ({str(err).splitlines()[0][:200]}); "
                           "give its folder with --base") from None


def max_length(loaded: Loaded) -> int:
    return loaded.spec.data.max_seq_length if loaded.spec is not None else DEFAULT_MAX_LENGTH


@torch.no_grad()
def classify(loaded: Loaded, texts: list[str]) -> list[dict[str, Any]]:
    """[{label, probabilities: {class: p}}] per text, each cut to the run's maxSeqLength as in training."""
    out = []
    for text in texts:  # one at a time: no padding to get wrong, and a handful of texts
        batch = loaded.tokenizer(text, truncation=True, max_length=max_length(loaded), return_tensors="pt").to(loaded.device)
        probs = torch.softmax(loaded.model(**batch).logits.float()[0], -1).tolist()
        names = loaded.labels or [f"LABEL_{i}" for i in range(len(probs))]
        out.append({"text": text, "label": names[int(np.argmax(probs))], "probabilities": dict(zip(names, probs, strict=False))})
    return out


def prompt_ids(loaded: Loaded, text: str) -> np.ndarray:
    """The tokens the model is prompted with: the run's rendering of a one-turn conversation
    (or plain text for format: text and chatTemplate: none), as chat.py renders training prompts."""
    from .chat import ChatDataError, render_prompt, template_for

    tok, spec = loaded.tokenizer, loaded.spec
    if spec is not None and spec.data.resolved_format() != "text":
        try:
            template = template_for(spec.data, tok, warn=False)
        except ChatDataError as err:
            raise PredictError(str(err)) from None
    elif spec is None:
        template = tok.chat_template if isinstance(tok.chat_template, str) and tok.chat_template else None
    else:
        template = None
    if template is None:
        ids = tok(text)["input_ids"]
        if tok.eos_token_id is not None and ids and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]  # a prompt goes on; it does not end (chat._plain)
    else:
        try:
            rendered = render_prompt([{"role": "user", "content": text}], tok, template)
        except ChatDataError as err:
            raise PredictError(str(err)) from None
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
    limit = max_length(loaded)
    if len(ids) > limit:
        raise PredictError(f"the prompt is {len(ids)} tokens as the run renders it, above the run's data.maxSeqLength {limit}; shorten it")
    return np.asarray(ids, dtype=np.int64)


def generate(loaded: Loaded, texts: list[str], *, max_new_tokens: int | None = None, temperature: float | None = None,
             seed: int | None = None) -> list[dict[str, Any]]:
    """[{prompt, completion}] per text, with the run's samples settings unless given."""
    from .generation import SampleGenerator

    spec = loaded.spec
    settings = (spec.evaluation.samples if spec is not None else None) or SamplesSpec()
    overrides = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("temperature", temperature)) if v is not None}
    settings = SamplesSpec.model_validate(settings.model_dump() | overrides)
    generator = SampleGenerator(
        prompts=[prompt_ids(loaded, t) for t in texts], spec=settings, tokenizer=loaded.tokenizer,
        seed=seed if seed is not None else (spec.training.seed if spec is not None else 0), device=loaded.device, zero3=False,
    )
    rows = generator.generate(loaded.model) or []
    return [{"text": text, **row} for text, row in zip(texts, rows, strict=True)]
