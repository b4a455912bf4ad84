"""LoRA-family adapters (LoRA, DoRA, rsLoRA) on a loaded transformers model, through PEFT.

PEFT does the adapters: `LoraConfig` + `get_peft_model` inject them and freeze the base,
`save_pretrained` writes the adapter in its format, `PeftModel.from_pretrained` + `merge_and_unload`
fold it into the base for export. What is ours, because PEFT cannot know it:
  - the default targets: every linear projection inside the transformer blocks, found with the
    block map of layers.py (PEFT's `all-linear` would also adapt what sits outside the blocks, such
    as BERT's pooler);
  - `layers: N` as PEFT's layers_to_transform (the top N blocks) with the stack's name as
    layers_pattern;
  - for sequence-classification the new task head trains whole (PEFT's modules_to_save), since
    nothing pre-trained stands behind it;
  - what PEFT would refuse minutes into a run (a target that matches nothing or is not a
    projection, more blocks than the model has, a rank above a projection's width) as SpecErrors
    naming the field, found on the meta-device skeleton at `finetune validate` time (preflight).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from .freezing import FreezePlan, GroupPlan
from .layers import LayerMap, UnmappableModel, discover
from .modeling import load_model
from .spec import FineTuneJobSpec, SpecError
from .spec.adapters import LoraSpec

log = logging.getLogger(__name__)

PROJECTIONS = (nn.Linear, Conv1D)  # GPT-2's projections are transformers' Conv1D; PEFT adapts both
ADAPTABLE = (*PROJECTIONS, nn.Embedding)  # what a user may name in targetModules (PEFT supports more; these we train)
FIELD = "spec.freezing.lora"
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5
    deprecated (FutureWarning): nothing of ours, and tests turn every warning into an error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def default_targets(model: nn.Module, layer_map: LayerMap) -> list[str]:
    """Every projection inside the blocks, by its path within a block (self_attn.q_proj,
    attention.output.dense): PEFT matches these as name suffixes, so nothing outside the stack
    with a bare name like `dense` is caught."""
    names: list[str] = []
    stack = model.get_submodule(layer_map.layer_stack)
    assert isinstance(stack, nn.ModuleList)  # layers.discover finds the stack as one
    for block in stack:
        for name, module in block.named_modules():
            if name and isinstance(module, PROJECTIONS) and name not in names:
                names.append(name)
    return names


def _matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a list of target_modules (peft.tuners.tuners_utils.check_target_module_exists)."""
    return module_name == target or module_name.endswith("." + target)


def _width(module: nn.Module) -> int:
    """The largest rank an adapter on this module can use: its smaller dimension."""
    if isinstance(module, nn.Embedding):
        return min(module.num_embeddings, module.embedding_dim)
    weight = getattr(module, "weight", None)
    return min(weight.shape) if weight is not None else 0


def _check_targets(model: nn.Module, spec: LoraSpec, targets: list[str], default: bool, model_name: str) -> list[tuple[str, str]]:
    modules = dict(model.named_modules())
    problems: list[tuple[str, str]] = []
    adapted: list[tuple[str, nn.Module]] = []
    for i, target in enumerate(targets):
        path = f"{FIELD}.targetModules" + ("" if default else f"[{i}]")
        hits = [(name, m) for name, m in modules.items() if _matches(name, target)]
        if not hits:
            known = sorted({n.rpartition(".")[2] for n, m in modules.items() if isinstance(m, PROJECTIONS)})
            problems.append((path, f"{target!r} matches no module of {model_name}; its projections are named {', '.join(known)}"))
            continue
        odd = [(name, m) for name, m in hits if not isinstance(m, ADAPTABLE)]
        if odd:
            name, module = odd[0]
            problems.append((path, f"{target!r} matches {name} ({type(module).__name__}), not a linear projection or an "
                                   "embedding; name the projections inside it (e.g. q_proj, v_proj)"))
            continue
        adapted += hits
    if adapted:
        name, narrow = min(adapted, key=lambda nm: _width(nm[1]))
        if spec.r > _width(narrow):
            problems.append((f"{FIELD}.r", f"{spec.r} is above the width of {name} ({_width(narrow)}): an adapter's rank "
                                           f"cannot exceed its smaller dimension; use r <= {_width(narrow)}"))
    return problems


def lora_config(model: nn.Module, spec: LoraSpec, task: str, *, model_name: str = "the model") -> Any:
    """PEFT's LoraConfig for this model; SpecError naming the field when the spec does not fit it."""
    from peft import LoraConfig

    layer_map: LayerMap | None
    try:
        layer_map = discover(model)
    except UnmappableModel as err:
        layer_map, unmappable = None, str(err)
    needs_map = spec.target_modules is None or spec.layers is not None
    if layer_map is None and needs_map:
        field = "layers" if spec.layers is not None else "targetModules"
        raise SpecError([(f"{FIELD}.{field}", f"{unmappable}; or name the modules in freezing.lora.targetModules (and leave out layers)")])
    targets = list(spec.target_modules) if spec.target_modules is not None else default_targets(model, layer_map)  # type: ignore[arg-type]
    problems = _check_targets(model, spec, targets, spec.target_modules is None, model_name)
    layers: dict[str, Any] = {}
    if spec.layers is not None and layer_map is not None:
        count = len(layer_map.layers)
        if spec.layers > count:
            problems.append((f"{FIELD}.layers", f"{spec.layers} exceeds the {count} blocks of {model_name}; use at most {count}"))
        layers = {"layers_to_transform": list(range(max(0, count - spec.layers), count)),
                  "layers_pattern": layer_map.layer_stack.rpartition(".")[2]}
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))
    head = None
    if task == "sequence-classification" and layer_map is not None and layer_map.head_params:
        head = sorted({name.rpartition(".")[0] for name in layer_map.head_params})
    return LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets, use_dora=spec.use_dora,
        use_rslora=spec.use_rslora, modules_to_save=head, task_type=TASK_TYPES[task], bias="none", **layers,
    )


def wrap(model: nn.Module, spec: LoraSpec, task: str, *, model_name: str = "the model", quantized: bool = False) -> nn.Module:
    """The model with adapters (a PeftModel): only the adapters (and a classification head) train."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    config = lora_config(model, spec, task, model_name=model_name)
    if quantized:  # bitsandbytes weights: PEFT's preparation (norms in fp32, input grads for checkpointing)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        with _quiet_peft():
            return get_peft_model(model, config)
    except ValueError as err:  # what our checks above do not foresee (e.g. layers leaving no target)
        raise SpecError([(f"{FIELD}.targetModules", str(err).splitlines()[0])]) from None


def adapter_plan(model: nn.Module) -> FreezePlan:
    """The freezing plan of a wrapped model: what PEFT left trainable is one group; the rest is frozen."""
    names = [(n, p.requires_grad) for n, p in model.named_parameters()]
    trainable = tuple(n for n, grad in names if grad)
    return FreezePlan((GroupPlan("adapters", trainable, 1.0, None),), tuple(n for n, grad in names if not grad))


def plan_on_skeleton(skeleton: nn.Module, spec: LoraSpec, task: str, *, model_name: str) -> FreezePlan:
    """The plan preflight checks, on a copy of the meta-device skeleton (PEFT changes the model it wraps)."""
    return adapter_plan(wrap(copy.deepcopy(skeleton), spec, task, model_name=model_name))


def load_adapted(base_dir: str, adapter_dir: str | Path, spec: FineTuneJobSpec, *, num_labels: int | None,
                 pad_token_id: int | None) -> nn.Module:
    """The pre-trained model in full precision with an exported adapter on it (PEFT's loader reads
    the adapter's safetensors and its JSON config; nothing in it is executed)."""
    from peft import PeftModel

    base = load_model(base_dir, spec.model, num_labels=num_labels, dropout=spec.training.dropout, pad_token_id=pad_token_id)
    with _quiet_peft():
        return PeftModel.from_pretrained(base, str(adapter_dir))


def merge(base_dir: str, adapter_dir: Path, out_dir: Path, spec: FineTuneJobSpec, *, num_labels: int | None,
          pad_token_id: int | None) -> None:
    """The adapter folded into the full-precision base (PEFT's merge_and_unload; a QLoRA adapter too:
    merged into the unquantized weights, not the 4-bit ones), saved for AutoModelFor*.from_pretrained."""
    model = load_adapted(base_dir, adapter_dir, spec, num_labels=num_labels, pad_token_id=pad_token_id)
    merged = model.merge_and_unload()  # type: ignore[operator]
    merged.save_pretrained(out_dir)
    log.info("merged the adapter %s into %s (%s)", adapter_dir, base_dir, out_dir)
