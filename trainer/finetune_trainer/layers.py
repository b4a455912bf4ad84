"""Find a transformer's blocks: embeddings, the stack of layers (bottom to top), the rest.

Freezing strategies speak in blocks ("freeze the bottom 4", "unfreeze one more from the top"),
models speak in parameter names. transformers has no public API that maps one to the other, so
this module does it by structure: the layer stack is the largest homogeneous `nn.ModuleList`
inside the model's base model (BERT's `encoder.layer`, Llama's `layers`, GPT-2's `h`, ...), the
embeddings are the parameters of embedding modules outside it, and everything else (final norm,
pooler, task head) is the top block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnmappableModel(ValueError):
    """The model's layers cannot be found; strategies that need them cannot run on it."""


@dataclass(frozen=True)
class Block:
    name: str
    params: tuple[str, ...]


@dataclass(frozen=True)
class LayerMap:
    embeddings: Block
    layers: tuple[Block, ...]  # bottom to top
    top: Block  # everything above the stack: final norm, pooler, task head
    head_params: tuple[str, ...]  # parameters outside the pre-trained base model (the task head)
    layer_stack: str  # module path of the stack, for messages

    def bottom_up(self) -> list[Block]:
        return [self.embeddings, *self.layers, self.top]


def _trainable_names(module: nn.Module) -> list[str]:
    # named_parameters() lists a tied weight once, under its first name (e.g. Llama's
    # lm_head.weight is reported as model.embed_tokens.weight when embeddings are tied).
    return [name for name, _ in module.named_parameters()]


def _homogeneous_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    found = []
    for path, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and any(True for _ in module.parameters()):
                found.append((path, module))
    return found


def _is_embedding_param(model: nn.Module, name: str) -> bool:
    module_path, _, _ = name.rpartition(".")
    parts = module_path.split(".")
    if any("embed" in part.lower() or part in {"wte", "wpe"} for part in parts):
        return True
    module = model.get_submodule(module_path) if module_path else model
    return isinstance(module, nn.Embedding)


def discover(model: nn.Module) -> LayerMap:
    """Map a transformers model onto blocks; raises UnmappableModel naming what is missing."""
    base_prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, base_prefix, None) if base_prefix else None
    root, root_path = (base, base_prefix) if isinstance(base, nn.Module) else (model, "")
    names = _trainable_names(model)
    candidates = _homogeneous_lists(root)
    if not candidates:
        sample = ", ".join(names[:6])
        raise UnmappableModel(
            f"cannot find the layer stack of {type(model).__name__}: no repeated block list "
            f"(nn.ModuleList of identical layers) under {root_path or 'the model'}. Layer-based "
            f"freezing (freezeBottom, gradual, layerLrDecay) needs one; use freezing.strategy: "
            f"patterns with regexes over parameter names instead (names look like: {sample}, ...)"
        )
    # The stack holds the most parameters of all candidates (attention heads' lists are smaller).
    path, stack = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))
    stack_path = f"{root_path}.{path}" if root_path and path else (root_path or path)
    layer_names: list[list[str]] = [[] for _ in range(len(stack))]
    rest: list[str] = []
    for name in names:
        if name.startswith(stack_path + "."):
            index = int(name[len(stack_path) + 1 :].split(".", 1)[0])
            layer_names[index].append(name)
        else:
            rest.append(name)
    embed = [n for n in rest if _is_embedding_param(model, n)]
    top = [n for n in rest if n not in set(embed)]
    head = [n for n in names if not (root_path and n.startswith(root_path + "."))] if root_path else []
    return LayerMap(
        embeddings=Block("embeddings", tuple(embed)),
        layers=tuple(Block(f"layer.{i}", tuple(p)) for i, p in enumerate(layer_names)),
        top=Block("top", tuple(top)),
        head_params=tuple(head),
        layer_stack=stack_path,
    )
