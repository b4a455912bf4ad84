"""docs/reference.md, generated from the spec and status models, so the field reference never drifts.

    python -m finetune_operator.docs_gen > docs/reference.md

Every field of `FineTuneJob.spec` and `.status`, nested, with its camelCase name (as written in
YAML), type and limits, default and description. tests/unit/test_docs.py fails when the
committed file is not what this prints.
"""

from __future__ import annotations

import sys
import types
import typing
from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from finetune_trainer.spec import FineTuneJobSpec

from .crd import GROUP, KIND, VERSION, _accepts_non_objects
from .status_model import FineTuneJobStatus

COMMAND = "python -m finetune_operator.docs_gen > docs/reference.md"
_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", datetime: "timestamp (RFC 3339)"}
_LIMITS = (("ge", "≥ {}"), ("gt", "> {}"), ("le", "≤ {}"), ("lt", "< {}"), ("pattern", "matches `{}`"))


def reference() -> str:
    """The whole of docs/reference.md."""
    lines = [
        "# FineTuneJob field reference",
        "",
        f"<!-- Generated from the spec and status models; do not edit. Regenerate: {COMMAND} -->",
        "",
        f"`apiVersion: {GROUP}/{VERSION}`, `kind: {KIND}`, short name `ftj`, namespaced. "
        "`metadata.name` is a DNS-1123 label (lowercase letters, digits, `-`; at most 63 characters).",
        "",
        "Fields are camelCase, as written in YAML. Unknown fields are errors. A default of — means the field is "
        "unset unless given; **required** fields have no default. Searchable sections (`spec.search.space` keys) "
        "are `training`, `freezing`, `lrSchedule` and `deepspeed`; see [search.md](search.md).",
        "",
    ]
    lines += _section("spec", FineTuneJobSpec, "What to fine-tune, how, and where. Written by you.")
    lines += _section("status", FineTuneJobStatus, "Written by the operator; read it with `kubectl get ftj NAME -o yaml`. "
                      "What each condition and reason means: [troubleshooting.md](troubleshooting.md).")
    return "\n".join(lines).rstrip() + "\n"


def _section(root: str, model: type[BaseModel], intro: str) -> list[str]:
    lines = [f"## {root}", "", intro, ""]
    top = [(name, field) for name, field in model.model_fields.items() if _model_of(field.annotation) is None]
    nested = [(name, field) for name, field in model.model_fields.items() if _model_of(field.annotation) is not None]
    if top:
        lines += _table(_rows(model, root, only=[n for n, _ in top]))
    for name, field in nested:
        path = f"{root}.{_alias(name, field)}"
        sub = _model_of(field.annotation)
        assert sub is not None
        summary = f"Type: {_type_text(field.annotation)}; default: {_default_text(field)}."
        lines += [f"### {path}", "", " ".join(filter(None, [_describe(field, sub), summary])), ""]
        lines += _table(_rows(sub, path, container=field.annotation))
    return lines


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    out = ["| Field | Type | Default | Description |", "| --- | --- | --- | --- |"]
    out += [f"| `{path}` | {kind} | {default} | {text} |" for path, kind, default, text in rows]
    return [*out, ""]


def _rows(model: type[BaseModel], prefix: str, only: list[str] | None = None, container: Any = None) -> list[tuple[str, str, str, str]]:
    """One row per field, depth first; nested models' fields follow their parent with a dotted path."""
    rows: list[tuple[str, str, str, str]] = []
    base = prefix + _container_suffix(container)
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        path = f"{base}.{_alias(name, field)}"
        sub = _model_of(field.annotation)
        rows.append((path, _type_text(field.annotation, field), _default_text(field), _cell(_describe(field, sub))))
        if sub is not None:
            rows += _rows(sub, path, container=field.annotation)
    return rows


def _container_suffix(annotation: Any) -> str:
    """How a nested model is reached: `x[]` through a list, `x.<key>` through a map."""
    for arg in _members(annotation):
        origin = typing.get_origin(arg)
        if origin is list:
            return "[]"
        if origin is dict:
            return ".<key>" if typing.get_args(arg)[1] is not Any else ""
    return ""


def _alias(name: str, field: FieldInfo) -> str:
    return field.alias or name


def _members(annotation: Any) -> list[Any]:
    """The non-None members of a union (or the annotation itself)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds: directly, optionally, or as list items / map values."""
    for arg in _members(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        if typing.get_origin(arg) in (list, dict):
            inner = typing.get_args(arg)[-1]
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _type_text(annotation: Any, field: FieldInfo | None = None) -> str:
    members = _members(annotation)
    if all(m in (int, float) for m in members) and len(members) > 1:
        text = "number"
    else:
        text = " or ".join(_one_type(m) for m in members)
    if field is not None:
        text += "".join(f", {template.format(value)}" for key, template in _LIMITS if (value := _limit(field, key)) is not None)
        low, high = _limit(field, "min_length"), _limit(field, "max_length")
        if low is not None or high is not None:
            size = f"{low}" if low == high else f"{low or 0}–{high}" if high is not None else f"≥ {low}"
            unit = "characters" if members == [str] else "items"
            text += f", {size} {unit}"
    return _cell(text)


def _one_type(arg: Any) -> str:
    origin = typing.get_origin(arg)
    if origin is Literal:
        values = typing.get_args(arg)
        return ("one of " if len(values) > 1 else "") + ", ".join(f"`{v}`" for v in values)
    if isinstance(arg, type) and issubclass(arg, Enum):
        return "one of " + ", ".join(f"`{m.value}`" for m in arg)
    if isinstance(arg, type) and issubclass(arg, BaseModel):
        return "object or string (shorthand)" if _accepts_non_objects(arg) else "object"
    if origin is typing.Annotated:  # a constrained item type (list[Annotated[str, ...]]): its base type
        return _one_type(typing.get_args(arg)[0])
    if origin is list:
        return f"list of {_one_type(typing.get_args(arg)[0])}"
    if origin is dict:
        key, value = typing.get_args(arg)
        return "object (free-form)" if value is Any else f"map of {_one_type(key)} to {_one_type(value)}"
    if arg is Any:
        return "any"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_one_type(m) for m in _members(arg))
    return _SCALARS.get(arg, getattr(arg, "__name__", str(arg)))


def _limit(field: FieldInfo, key: str) -> Any:
    for item in field.metadata:
        value = getattr(item, key, None)
        if value is not None:
            return value
    return None


def _default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(each field's default)"
        return f"`{_json(value)}`"
    if field.default is PydanticUndefined:
        return "**required**"
    if field.default is None:
        return "—"
    return f"`{_json(field.default)}`"


def _json(value: Any) -> str:
    if value == "":
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, list):
        return "[" + ", ".join(_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_json(v)}" for k, v in value.items()) + "}"
    return str(value)


def _describe(field: FieldInfo, sub: type[BaseModel] | None) -> str:
    text = field.description or ""
    if not text and sub is not None and sub.__doc__ and sub.__module__.startswith(("finetune_trainer", "finetune_operator")):
        text = " ".join(sub.__doc__.split())
    return text


def _cell(text: str) -> str:
    """One table cell: one line, `|` escaped, and `<`/`>` outside code spans as entities (else
    Markdown renderers take `<path>` for an HTML tag and hide it)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    parts[::2] = [part.replace("<", "&lt;").replace(">", "&gt;") for part in parts[::2]]
    return "`".join(parts)


def main() -> int:
    sys.stdout.write(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
