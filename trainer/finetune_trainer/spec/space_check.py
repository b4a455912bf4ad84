"""`spec.search.space` against the spec it searches: every path is a searchable field (nested ones
too, such as `freezing.lora.r`), every value is valid for its field, and every combination (or a
seeded sample of a large space) makes a valid trial spec, checked at `finetune validate` time.

Apart from spec/search.py, which defines the search section itself, because these checks need the
whole job spec (the base every trial is written into), and the search section does not.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ValidationError

from .search import NOT_SEARCHABLE, SEARCHABLE, SearchSpec, attribute_of, plain_value, search_combinations, trial_spec


def space_problems(search: SearchSpec, base: BaseModel) -> list[tuple[str, str]]:
    """Every path exists and is searchable; every candidate value is valid for its field; every
    combination (or a seeded sample, for large spaces) makes a valid trial spec."""
    found: list[tuple[str, str]] = []
    for path in search.space:
        where = f"spec.search.space.{path}"
        bad_path = _path_problem(type(base), path)
        if bad_path:
            found.append((where, bad_path))
            continue
        found += [(where, message) for message in _candidate_problems(base, path, search.space[path].candidates())]
    if found:
        return found
    seen: set[str] = set()  # the field a combination breaks: one example each, not one per combination
    for sampled in search_combinations(search):
        params = {**search.fixed_params(), **sampled}
        problem: tuple[str, str] | None
        try:
            spec = trial_spec(base, params)
        except ValidationError as err:
            message = _first_message(err)
            field, problem = message.partition(":")[0], ("spec.search.space", f"{_fmt(params)}: {message}")
        else:
            issues = spec.problems()
            field = issues[0][0] if issues else ""
            problem = ("spec.search.space", f"{_fmt(params)}: {issues[0][0]}: {issues[0][1]}") if issues else None
        if problem and field not in seen:
            seen.add(field)
            found.append(problem)
    return found


def _candidate_problems(base: BaseModel, path: str, values: list[Any]) -> Iterator[str]:
    """Each value against its field's own rules: the one section it lives in, validated with the
    value written in (a section is a few fields, so this is linear in the values, where the whole
    spec per value took minutes for 100,000 of them). Combinations are checked after, sampled.
    A nested path (`freezing.lora.r`) is written into its subsection, which the base may not have
    yet: the subsection's defaults fill the rest, as they would in a trial."""
    section, *inner = path.split(".")
    part = getattr(base, attribute_of(type(base), section))
    document = part.model_dump(by_alias=True, mode="json", exclude_unset=True)
    tried: set[tuple[type, Any]] = set()
    for value in values:
        key = (type(value), value if isinstance(value, str | int | float | None) else repr(value))
        if key in tried:  # the type too: 1 and True are equal, and not the same value here
            continue
        tried.add(key)
        written = copy.deepcopy(document)
        node = written
        for name in inner[:-1]:
            node[name] = dict(node[name]) if isinstance(node.get(name), dict) else {}
            node = node[name]
        node[inner[-1]] = plain_value(value)
        try:
            type(part).model_validate(written, by_alias=True, by_name=False)
        except ValidationError as err:
            yield f"{value!r} is not valid here: {err.errors()[0]['msg']}"


def _path_problem(model: type[BaseModel], path: str) -> str | None:
    keys = path.split(".")
    if path in NOT_SEARCHABLE:
        return f"cannot be searched: {NOT_SEARCHABLE[path]}"
    if keys[0] not in SEARCHABLE:
        return f"cannot be searched; search varies {', '.join(SEARCHABLE)} (model, data, resources and evaluation stay the same in every trial)"
    current: Any = model
    for i, key in enumerate(keys):
        fields = {f.alias or name: f for name, f in current.model_fields.items()}
        if key not in fields:
            known = ", ".join(sorted(fields))
            return f"{'.'.join(keys[: i + 1])} is not a field of the spec; {'.'.join(keys[:i]) or 'spec'} has: {known}"
        annotation = fields[key].annotation
        nested = _model_in(annotation)
        if i < len(keys) - 1 and nested is None:
            return f"{'.'.join(keys[: i + 1])} is a value, not a section"
        if i == len(keys) - 1 and nested is not None:
            first = next(iter(nested.model_fields.items()))
            return f"{path} is a section; search one of its fields, e.g. {path}.{first[1].alias or first[0]}"
        current = nested
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _first_message(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in {"int", "float", "str", "bool"})))
    return f"{loc}: {e['msg']}" if loc else e["msg"]


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())
