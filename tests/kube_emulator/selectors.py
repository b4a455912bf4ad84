"""Label and field selectors as the API server parses them for LIST and WATCH.

kubectl (`-l app=x`, `--field-selector metadata.name=y`, and `get NAME -w`, which watches with a
name field selector) and kopf (`--label` filters) narrow their lists and watches server-side.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from . import errors

Predicate = Callable[[dict[str, Any]], bool]
_SET_RE = re.compile(r"^\s*(!?)([\w./-]+)\s+(in|notin)\s+\((.*)\)\s*$")
_EQ_RE = re.compile(r"^\s*([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)([\w./-]+)\s*$")


def _split(selector: str) -> list[str]:
    """Split on commas that are not inside `in (a, b)` parentheses."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def label_selector(selector: str | None) -> Predicate:
    """`a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x)`, all ANDed."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    for term in _split(selector or ""):
        if m := _SET_RE.match(term):
            key, values = m.group(2), {v.strip() for v in m.group(4).split(",")}
            if m.group(3) == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif m := _EQ_RE.match(term):
            key, op, value = m.groups()
            if op == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif m := _EXISTS_RE.match(term):
            negate, key = m.group(1) == "!", m.group(2)
            checks.append(lambda labels, k=key, n=negate: (k in labels) != n)
        else:
            raise errors.bad_request(f"unable to parse requirement: {term!r}")
    return lambda obj: all(check(obj.get("metadata", {}).get("labels") or {}) for check in checks)


def _lookup(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def field_selector(selector: str | None) -> Predicate:
    """`metadata.name=x`, `metadata.namespace!=y` and the like, on any dotted path."""
    checks: list[Predicate] = []
    for term in _split(selector or ""):
        m = _EQ_RE.match(term)
        if not m:
            raise errors.bad_request(f"invalid field selector: {term!r}")
        path, op, value = m.groups()
        if op == "!=":
            checks.append(lambda obj, p=path, v=value: _lookup(obj, p) != v)
        else:
            checks.append(lambda obj, p=path, v=value: _lookup(obj, p) == v)
    return lambda obj: all(check(obj) for check in checks)
