"""The FineTuneJob CustomResourceDefinition, generated from the pydantic spec and status models.

The spec is written once (finetune_trainer.spec); this module turns its JSON Schema into the
structural OpenAPI v3 schema the API server needs: every `$ref` inlined, `X | None` as
`nullable`, `Literal`s as `enum`, `int | str` as `x-kubernetes-int-or-string`, JSON Schema 2020
exclusive bounds as OpenAPI 3.0 ones, literal defaults carried over, free-form dicts as
`x-kubernetes-preserve-unknown-fields`. A construct it cannot express raises, so a new spec
field that has no structural form fails `tests/unit/test_crd.py`, not a cluster.

Regenerate the chart's copy with `finetune crd > helm/finetune-operator/crds/finetunejobs.finetune.dev.yaml`.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from finetune_trainer.spec import FineTuneJobSpec

from .status_model import FineTuneJobStatus

GROUP = "finetune.dev"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
CRD_NAME = f"{PLURAL}.{GROUP}"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # metadata.name, as the spec's Metadata model checks it
CHART_CRD_PATH = "helm/finetune-operator/crds/finetunejobs.finetune.dev.yaml"
REGENERATE = f"finetune crd > {CHART_CRD_PATH}"

# Defaults the API server must NOT fill in: the spec's rules read whether the user wrote them
# (FineTuneJobSpec.problems: evaluation.everySteps is checked against maxSteps only when set).
PRESENCE_MATTERS = frozenset({"spec.evaluation.everySteps"})

_COPIED = ("description", "enum", "pattern", "format", "minLength", "maxLength", "minItems", "maxItems",
           "minProperties", "maxProperties", "minimum", "maximum", "required",
           "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type", "x-kubernetes-list-map-keys")
_DROPPED = ("title", "default", "$defs", "discriminator")


class SchemaError(ValueError):
    """A JSON Schema construct with no structural OpenAPI form; names the field."""


class _Converter:
    """JSON Schema (pydantic, by alias) -> structural OpenAPI v3, one model at a time."""

    def __init__(self, model: type[BaseModel], root_path: str):
        self.defs: dict[str, Any] = {}
        self.shorthand: set[str] = set()
        self.schema = model.model_json_schema(by_alias=True)
        self.defs = self.schema.get("$defs", {})
        self.shorthand = {cls.__name__ for cls in _models_under(model) if _accepts_non_objects(cls)}
        self.root_path = root_path

    def convert(self) -> dict[str, Any]:
        return self._node(self.schema, self.root_path)

    def _node(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            outer = {k: v for k, v in node.items() if k != "$ref"}
            if name in self.shorthand:
                # a model_validator(mode="before") accepts a shorthand (e.g. `train: data.jsonl`):
                # the API server must let both forms through; the operator validates them
                fields = ", ".join(self.defs[name].get("properties", {}))
                text = outer.get("description") or self.defs[name].get("description", "")
                return {"description": f"{text} A string, or an object with: {fields}.".strip(),
                        "x-kubernetes-preserve-unknown-fields": True}
            node = {**self.defs[name], **outer}
        out: dict[str, Any] = {}
        if "anyOf" in node or "oneOf" in node:
            out = self._union(node.get("anyOf") or node["oneOf"], path)
        for key, value in node.items():
            if key in ("anyOf", "oneOf", *_DROPPED):
                continue
            if key == "type":
                out["type"] = value
            elif key == "properties":
                out["properties"] = {name: self._node(sub, f"{path}.{name}") for name, sub in value.items()}
            elif key == "items":
                out["items"] = self._node(value, f"{path}[]")
            elif key == "additionalProperties":
                if value is True or value == {}:
                    out["x-kubernetes-preserve-unknown-fields"] = True  # dict[str, Any]: free-form
                elif value is not False:  # False: pydantic's extra=forbid; Kubernetes prunes/rejects unknowns itself
                    out["additionalProperties"] = self._node(value, f"{path}.*")
            elif key == "const":
                out["enum"] = [value]
                out.setdefault("type", _json_type(value))
            elif key in ("exclusiveMinimum", "gt"):
                out.update(minimum=value, exclusiveMinimum=True)
            elif key in ("exclusiveMaximum", "lt"):
                out.update(maximum=value, exclusiveMaximum=True)
            elif key in ("ge", "le"):
                out["minimum" if key == "ge" else "maximum"] = value
            elif key in _COPIED:
                out[key] = value
            else:
                raise SchemaError(f"{path}: JSON Schema keyword {key!r} has no structural CRD form")
        if not node.keys() - {"title", "description", "default"}:
            out["x-kubernetes-preserve-unknown-fields"] = True  # `Any`: any JSON value
        default = node.get("default")
        if default is not None and isinstance(default, str | int | float | bool) and path not in PRESENCE_MATTERS:
            out["default"] = default
        return out

    def _union(self, members: list[dict[str, Any]], path: str) -> dict[str, Any]:
        nullable = any(m.get("type") == "null" for m in members)
        rest = [self._node(m, path) for m in members if m.get("type") != "null"]
        if len(rest) == 1:
            out = rest[0]
        else:
            types = {m.get("type") for m in rest}
            if types <= {"integer", "number"}:
                out = {"type": "number"}  # int | float: a number (the model keeps 2 and 0.5 apart)
            elif types == {"integer", "string"}:
                out = {"x-kubernetes-int-or-string": True}
            else:
                raise SchemaError(f"{path}: a union of {sorted(map(str, types))} has no structural CRD form")
        if nullable:
            out["nullable"] = True
        return out


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[type(value)]


def _models_under(model: type[BaseModel]) -> set[type[BaseModel]]:
    """Every pydantic model reachable through the fields' annotations."""
    seen: set[type[BaseModel]] = set()
    stack: list[Any] = [model]
    while stack:
        item = stack.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            if item in seen:
                continue
            seen.add(item)
            stack += [f.annotation for f in item.model_fields.values()]
        else:
            stack += list(typing.get_args(item))
    return seen


def _accepts_non_objects(model: type[BaseModel]) -> bool:
    """Does a before/wrap model validator turn a string into the model (a shorthand form)?
    Probed rather than guessed: a validator may run before and still want a mapping."""
    validators = model.__pydantic_decorators__.model_validators.values()
    if not any(v.info.mode in ("before", "wrap") for v in validators):
        return False
    try:
        model.model_validate("x")
    except ValidationError as err:
        return not any(e["type"] in _NOT_A_MAPPING and not e["loc"] for e in err.errors())
    return True


_NOT_A_MAPPING = ("model_type", "model_attributes_type", "dict_type")


def openapi_schema(model: type[BaseModel], root_path: str) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one model; `root_path` prefixes field paths in errors."""
    return _Converter(model, root_path).convert()


def build_crd() -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition for FineTuneJob."""
    spec = openapi_schema(FineTuneJobSpec, "spec")
    spec["description"] = "What to fine-tune, how, and where (see the project's README and examples/)."
    status = openapi_schema(FineTuneJobStatus, "status")
    status["description"] = "Written by the operator."
    root = {
        "type": "object",
        "description": "A fine-tuning job: DeepSpeed ZeRO on a Ray cluster KubeRay starts, with a Ray Tune search.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "finetune.dev/v1alpha1"},
            "kind": {"type": "string", "description": "FineTuneJob"},
            "metadata": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 63, "pattern": DNS1123_LABEL}},
            },
            "spec": spec,
            "status": status,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/part-of": "finetune-operator"},
            "annotations": {"finetune.dev/generated-by": REGENERATE},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": "finetunejob",
                "shortNames": ["ftj"], "categories": ["finetune", "ml"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": root},
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Metric", "type": "string", "jsonPath": ".status.bestTrial.metric", "priority": 1},
                    {"name": "Best", "type": "number", "jsonPath": ".status.bestTrial.value",
                     "description": "Best value of the ranking metric so far"},
                    {"name": "Strategy", "type": "string", "jsonPath": ".status.bestTrial.strategy", "priority": 1,
                     "description": "The best trial's freezing strategy and size (lora r=16, freezeBottom 6)"},
                    {"name": "Trials", "type": "string", "jsonPath": ".status.trialsDone",
                     "description": "Finished / total trials"},
                    {"name": "Dashboard", "type": "string", "jsonPath": ".status.dashboardURL", "priority": 1},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
            }],
        },
    }
