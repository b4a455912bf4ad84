"""What the API server demands of a CRD schema, checked here so a bad CRD fails a unit test
rather than `kubectl apply` (apiextensions.k8s.io/v1 "structural schema" rules), plus the two
things tests need to act as an API server: OpenAPI v3 -> JSON Schema with unknown fields
rejected, and defaulting.

The rules (Kubernetes docs, "Specifying a structural schema"; apiextensions-apiserver
`ValidateStructural`):
1. the root, every field (properties / additionalProperties) and every array item has a
   non-empty `type`, except under `x-kubernetes-int-or-string` or
   `x-kubernetes-preserve-unknown-fields: true`;
2. a field named inside allOf/anyOf/oneOf/not is also named outside them;
3. no description/type/default/additionalProperties/nullable inside allOf/anyOf/oneOf/not
   (the int-or-string forms excepted);
4. root `metadata` may only restrict `name` and `generateName`.
Plus what v1 CRD validation rejects outright: `$ref`, `additionalProperties` next to
`properties`, `additionalProperties: false`, `uniqueItems: true`, `x-kubernetes-preserve-unknown-fields: false`,
type `null`, and defaults that do not validate.
"""

from __future__ import annotations

import copy
import re
from typing import Any

TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean"})
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
_PY_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
}


def structural_problems(schema: dict[str, Any]) -> list[str]:
    """Every rule `schema` (an openAPIV3Schema) breaks, as `path: message`; empty when structural."""
    found: list[str] = []
    if schema.get("type") != "object":
        found.append("<root>: the root must be type: object")
    if "additionalProperties" in schema:
        found.append("<root>: additionalProperties is not allowed at the root")
    meta = schema.get("properties", {}).get("metadata")
    if meta is not None:
        extra = set(meta.get("properties", {})) - {"name", "generateName"}
        if extra or set(meta) - {"type", "properties", "description"}:
            found.append("metadata: only metadata.name and metadata.generateName may be restricted")
    _walk(schema, "<root>", found, field=True)
    return found


def _walk(node: Any, path: str, found: list[str], *, field: bool) -> None:
    if not isinstance(node, dict):
        found.append(f"{path}: a schema must be a mapping")
        return
    free = node.get("x-kubernetes-preserve-unknown-fields") is True
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    for key in ("$ref", "$defs", "definitions", "$schema", "$id"):
        if key in node:
            found.append(f"{path}: {key} is not allowed (inline every definition)")
    kind = node.get("type")
    if field and not kind and not (free or int_or_string):
        found.append(f"{path}: needs a non-empty type (or x-kubernetes-preserve-unknown-fields / int-or-string)")
    if kind is not None and kind not in TYPES:
        found.append(f"{path}: type {kind!r} is not one of {sorted(TYPES)}")
    if int_or_string and kind:
        found.append(f"{path}: x-kubernetes-int-or-string must not set a type")
    if "x-kubernetes-preserve-unknown-fields" in node and not free:
        found.append(f"{path}: x-kubernetes-preserve-unknown-fields must be true or left out")
    if "nullable" in node and not isinstance(node["nullable"], bool):
        found.append(f"{path}: nullable must be a boolean")
    if node.get("uniqueItems") is True:
        found.append(f"{path}: uniqueItems: true is not allowed")
    if "properties" in node and "additionalProperties" in node:
        found.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if isinstance(node.get("additionalProperties"), bool):
        found.append(f"{path}: additionalProperties must be a schema, not a boolean")
    if ("properties" in node or "additionalProperties" in node) and kind not in (None, "object"):
        found.append(f"{path}: properties need type: object")
    if "items" in node and not isinstance(node["items"], dict):
        found.append(f"{path}: items must be one schema")
    if "default" in node:
        found += [f"{path}: default {node['default']!r} {why}" for why in value_problems(node["default"], node)]
    for junctor in JUNCTORS:
        if junctor in node:
            _check_junctor(node, junctor, path, found, int_or_string)
    for name, sub in node.get("properties", {}).items():
        _walk(sub, f"{path}.{name}", found, field=True)
    if isinstance(node.get("additionalProperties"), dict):
        _walk(node["additionalProperties"], f"{path}.*", found, field=True)
    if isinstance(node.get("items"), dict):
        _walk(node["items"], f"{path}[]", found, field=True)


def _check_junctor(node: dict[str, Any], junctor: str, path: str, found: list[str], int_or_string: bool) -> None:
    members = node[junctor] if isinstance(node[junctor], list) else [node[junctor]]
    if int_or_string and junctor == "anyOf" and sorted(m.get("type", "") for m in members) == ["integer", "string"]:
        return
    outside = set(node.get("properties", {}))
    for i, member in enumerate(members):
        where = f"{path}.{junctor}[{i}]"
        for key in ("description", "type", "default", "additionalProperties", "nullable"):
            if key in member:
                found.append(f"{where}: {key} is not allowed inside {junctor}")
        for name in set(member.get("properties", {})) - outside:
            found.append(f"{where}: field {name} must also be specified outside {junctor}")


def value_problems(value: Any, node: dict[str, Any]) -> list[str]:
    """A small validator for defaults: type, nullability, enum, bounds, length and pattern."""
    if value is None:
        return [] if node.get("nullable") else ["is null but the field is not nullable"]
    if node.get("x-kubernetes-int-or-string"):
        return [] if isinstance(value, int | str) and not isinstance(value, bool) else ["is neither an integer nor a string"]
    kind = node.get("type")
    if kind and (not isinstance(value, _PY_TYPES[kind]) or (isinstance(value, bool) and kind != "boolean")):
        return [f"is not of type {kind}"]
    found = []
    if "enum" in node and value not in node["enum"]:
        found.append(f"is not one of {node['enum']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = node.get("minimum"), node.get("maximum")
        if low is not None and (value < low or (node.get("exclusiveMinimum") and value == low)):
            found.append(f"is below the minimum {low}")
        if high is not None and (value > high or (node.get("exclusiveMaximum") and value == high)):
            found.append(f"is above the maximum {high}")
    if isinstance(value, str):
        if len(value) < node.get("minLength", 0) or len(value) > node.get("maxLength", len(value)):
            found.append("has a length outside minLength/maxLength")
        if "pattern" in node and not re.search(node["pattern"], value):
            found.append(f"does not match {node['pattern']}")
    return found


def to_json_schema(node: dict[str, Any], *, root: bool = True) -> dict[str, Any]:
    """OpenAPI v3 (as in a CRD) -> JSON Schema (draft 2020-12) that rejects unknown fields, the
    way the API server prunes them and strict field validation (kubectl's default) refuses them.

    `additionalProperties: false` goes on every object node that names no additionalProperties
    and does not preserve unknown fields; `nullable` adds null; int-or-string becomes a union;
    boolean exclusive bounds become numeric ones. The root's metadata is left to the API server.
    """
    out = copy.deepcopy(node)
    free = out.pop("x-kubernetes-preserve-unknown-fields", False) is True
    if out.pop("x-kubernetes-int-or-string", False):
        out["type"] = ["integer", "string"]
    for bound in ("Minimum", "Maximum"):
        if out.pop(f"exclusive{bound}", False) is True and bound.lower() in out:
            out[f"exclusive{bound}"] = out.pop(bound.lower())
    if out.pop("nullable", False):
        out["type"] = [*(out["type"] if isinstance(out.get("type"), list) else [out["type"]] if "type" in out else []), "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in out:
        out["properties"] = {
            name: ({"type": "object"} if root and name == "metadata" else to_json_schema(sub, root=False))
            for name, sub in out["properties"].items()
        }
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(out["additionalProperties"], root=False)
    if isinstance(out.get("items"), dict):
        out["items"] = to_json_schema(out["items"], root=False)
    for junctor in ("allOf", "anyOf", "oneOf"):
        if junctor in out:
            out[junctor] = [to_json_schema(m, root=False) for m in out[junctor]]
    kinds = out.get("type") if isinstance(out.get("type"), list) else [out.get("type")]
    if "object" in kinds and not free and "additionalProperties" not in out:
        out["additionalProperties"] = False
    out.pop("x-kubernetes-validations", None)  # CEL rules: not evaluated here
    return out


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Fill absent fields with their schema defaults, as the API server does on create/read
    (only inside objects that exist; a nested object without a default stays absent)."""
    if isinstance(value, dict) and "properties" in node:
        value = dict(value)
        for name, sub in node["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        value = {k: apply_defaults(node["additionalProperties"], v) for k, v in value.items()}
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        value = [apply_defaults(node["items"], v) for v in value]
    return value
