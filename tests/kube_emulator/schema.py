"""Structural schemas, the one engine for the emulator and the tests: what the API server demands
of a CRD's schema, and what it does with a custom object under that schema.

A real API server runs a custom object through its CRD's `openAPIV3Schema` on every write:
unknown fields are dropped (or rejected under `fieldValidation=Strict`, which kubectl sends by
default), `default`s are filled in, and violations come back as 422 with one cause per field
(`admit`). Tests that rely on the CRD rejecting a bad FineTuneJob need the same here, and so do
the unit tests that check the generated CRD and the rendered RayJobs against KubeRay's (they call
`admit` directly); the subset covered is what CRDs generated from pydantic and KubeRay's CRDs use.

Before any of that, the server refuses a CRD whose schema is not structural (`structural_problems`,
checked by the emulator when a CRD is written, and by tests/unit/test_crd.py on ours). The rules
(Kubernetes docs, "Specifying a structural schema"; apiextensions-apiserver `ValidateStructural`):
1. the root, every field (properties / additionalProperties) and every array item has a
   non-empty `type`, except under `x-kubernetes-int-or-string` or
   `x-kubernetes-preserve-unknown-fields: true`;
2. a field named inside allOf/anyOf/oneOf/not is also named outside them;
3. no description/type/default/additionalProperties/nullable inside allOf/anyOf/oneOf/not
   (the int-or-string forms excepted);
4. root `metadata` may only restrict `name` and `generateName`.
Plus what v1 CRD validation rejects outright: `$ref`, `additionalProperties` next to
`properties`, `additionalProperties: false`, `uniqueItems: true`, `x-kubernetes-preserve-unknown-fields: false`,
type `null`, and defaults that do not validate (by the same validation objects get).
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

ROOT_FIELDS = ("apiVersion", "kind", "metadata")
TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean"})
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
Causes = list[tuple[str, str]]


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else json.dumps(value, default=str)


def _type_name(value: Any) -> str:
    """How the server names a value's JSON type in messages ("string", "object", ...)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {str: "string", float: "number", dict: "object", list: "array"}.get(type(value), "null")


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, (int, str)) and not isinstance(value, bool)
    expected = schema.get("type")
    match expected:
        case "object":
            return isinstance(value, dict)
        case "array":
            return isinstance(value, list)
        case "string":
            return isinstance(value, str)
        case "boolean":
            return isinstance(value, bool)
        case "integer":
            return isinstance(value, int) and not isinstance(value, bool)
        case "number":
            return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def _prepare(value: Any, schema: dict[str, Any], path: str, unknown: list[str]) -> Any:
    """Drop non-nullable nulls, fill defaults and prune unknown fields (recording them), depth first."""
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        props: dict[str, Any] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        keep_unknown = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or additional is True
        embedded = bool(schema.get("x-kubernetes-embedded-resource"))
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key in list(value):
            sub_path = f"{path}.{key}" if path else key
            if value[key] is None and not (props.get(key) or {}).get("nullable"):
                del value[key]
            elif key in props:
                value[key] = _prepare(value[key], props[key], sub_path, unknown)
            elif isinstance(additional, dict):
                value[key] = _prepare(value[key], additional, sub_path, unknown)
            elif not keep_unknown and not (embedded and key in ROOT_FIELDS):
                unknown.append(sub_path)
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            value[index] = _prepare(item, schema["items"], f"{path}[{index}]", unknown)
    return value


def _check_bounds(value: float, schema: dict[str, Any], path: str, causes: Causes) -> None:
    """minimum/maximum, with OpenAPI v3.0's boolean `exclusiveMinimum`/`exclusiveMaximum` modifiers."""
    if "minimum" in schema:
        low, exclusive = schema["minimum"], schema.get("exclusiveMinimum") is True
        if value < low or (exclusive and value == low):
            words = "greater than" if exclusive else "greater than or equal to"
            causes.append((path, f"Invalid value: {value}: {path} in body should be {words} {low}"))
    if "maximum" in schema:
        high, exclusive = schema["maximum"], schema.get("exclusiveMaximum") is True
        if value > high or (exclusive and value == high):
            words = "less than" if exclusive else "less than or equal to"
            causes.append((path, f"Invalid value: {value}: {path} in body should be {words} {high}"))
    if schema.get("multipleOf") and value % schema["multipleOf"]:
        causes.append((path, f"Invalid value: {value}: {path} in body should be a multiple of {schema['multipleOf']}"))


def _check_combinators(value: Any, schema: dict[str, Any], path: str, causes: Causes) -> None:
    """allOf/anyOf/oneOf/not: how structural schemas express "exactly one of these fields" and the like."""
    for sub in schema.get("allOf", ()):
        _validate(value, sub, path, causes)
    passing = [not _errors(value, sub, path) for sub in schema.get("anyOf", ())]
    if passing and not any(passing):
        causes.append((path, f"Invalid value: {json.dumps(_type_name(value))}: {path or '<root>'} in body must validate at least one schema (anyOf)"))
    passing = [not _errors(value, sub, path) for sub in schema.get("oneOf", ())]
    if passing and sum(passing) != 1:
        causes.append((path, f"Invalid value: {json.dumps(_type_name(value))}: {path or '<root>'} in body must validate one and only one schema (oneOf)"))
    if "not" in schema and not _errors(value, schema["not"], path):
        causes.append((path, f"Invalid value: {json.dumps(_type_name(value))}: {path or '<root>'} in body must not validate the schema (not)"))


def _errors(value: Any, schema: dict[str, Any], path: str) -> Causes:
    found: Causes = []
    _validate(value, schema, path, found)
    return found


def _validate(value: Any, schema: dict[str, Any], path: str, causes: Causes) -> None:
    if value is None:
        return
    _check_combinators(value, schema, path, causes)
    if not _type_ok(value, schema):
        expected = schema.get("type", "object")
        given = json.dumps(_type_name(value))
        causes.append((path, f"Invalid value: {given}: {path} in body must be of type {expected}: {given}"))
        return
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(_show(v) for v in schema["enum"])
        causes.append((path, f"Unsupported value: {_show(value)}: supported values: {supported}"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_bounds(value, schema, path, causes)
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            causes.append((path, f"Invalid value: {_show(value)}: {path} in body should be at least {schema['minLength']} chars long"))
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            causes.append((path, f"Too long: may not be more than {schema['maxLength']} bytes"))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            causes.append((path, f"Invalid value: {_show(value)}: {path} in body should match '{schema['pattern']}'"))
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            causes.append((path, f"Invalid value: {len(value)}: {path} in body should have at least {schema['minItems']} items"))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            causes.append((path, f"Too many: {len(value)}: must have at most {schema['maxItems']} items"))
        for index, item in enumerate(value):
            _validate(item, schema.get("items") or {}, f"{path}[{index}]", causes)
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                causes.append((f"{path}.{key}" if path else key, "Required value"))
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            sub_path = f"{path}.{key}" if path else key
            if key in props:
                _validate(item, props[key], sub_path, causes)
            elif isinstance(additional, dict):
                _validate(item, additional, sub_path, causes)


def admit(obj: dict[str, Any], schema: dict[str, Any]) -> tuple[dict[str, Any], list[str], Causes]:
    """Default, prune and validate a custom object: returns (object, pruned field paths, causes)."""
    if not schema:
        return obj, [], []
    obj = copy.deepcopy(obj)
    unknown: list[str] = []
    body = {k: v for k, v in obj.items() if k not in ROOT_FIELDS}
    body = _prepare(body, schema, "", unknown)
    causes: Causes = []
    root_required = [k for k in schema.get("required", ()) if k not in ROOT_FIELDS]
    _validate(body, {**schema, "required": root_required}, "", causes)
    obj = {**{k: obj[k] for k in ROOT_FIELDS if k in obj}, **body}
    return obj, unknown, causes


# --- the schema itself: is it structural? ---------------------------------------------------------


def crd_problems(crd: dict[str, Any]) -> Causes:
    """Every served version's schema that the API server would refuse, as (path, message) causes."""
    found: Causes = []
    for i, version in enumerate((crd.get("spec") or {}).get("versions") or []):
        openapi = (version.get("schema") or {}).get("openAPIV3Schema")
        if openapi is not None:
            path = f"spec.versions[{i}].schema.openAPIV3Schema"
            found += [(path, problem) for problem in structural_problems(openapi)]
    return found


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
        found += [f"{path}: default {node['default']!r}: {why}" for why in _default_problems(node["default"], node)]
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


def _default_problems(value: Any, node: dict[str, Any]) -> list[str]:
    """A default is validated as a value of its field would be (the server's own messages)."""
    if value is None:
        return [] if node.get("nullable") else ["is null but the field is not nullable"]
    return [message for _, message in _errors(value, node, "default")]
