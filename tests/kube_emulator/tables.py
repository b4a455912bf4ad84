"""Server-side printing: `Table` responses built from a CRD's additionalPrinterColumns.

`kubectl get` asks for `application/json;as=Table;v=v1;g=meta.k8s.io` and prints whatever columns
the server returns; for custom resources, the server fills them by evaluating each column's
JSONPath. Without this, `kubectl get ftj` would show only NAME and AGE.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

from .registry import ResourceDef

_TOKEN_RE = re.compile(r"\.([\w-]+)|\[(\d+|\*)\]|\[\?\(@\.([\w.-]+)\s*==\s*['\"]([^'\"]*)['\"]\)\]")


def jsonpath(obj: Any, path: str) -> list[Any]:
    """The JSONPath subset printer columns use: `.a.b`, `[0]`, `[*]`, `[?(@.type=="Ready")]`."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    values = [obj]
    pos = 0
    while pos < len(path):
        m = _TOKEN_RE.match(path, pos)
        if not m:
            return []
        pos = m.end()
        field, index, filter_key, filter_value = m.groups()
        found: list[Any] = []
        for value in values:
            if field is not None and isinstance(value, dict) and field in value:
                found.append(value[field])
            elif index == "*" and isinstance(value, list):
                found.extend(value)
            elif index is not None and index != "*" and isinstance(value, list) and int(index) < len(value):
                found.append(value[int(index)])
            elif filter_key is not None and isinstance(value, list):
                found.extend(v for v in value if [str(x) for x in jsonpath(v, "." + filter_key)][:1] == [filter_value])
        values = found
    return values


def human_age(timestamp: str, now: datetime.datetime | None = None) -> str:
    """Ages as kubectl shows them: `45s`, `3m12s`, `5h`, `2d`."""
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    seconds = max(0, int(((now or datetime.datetime.now(datetime.UTC)) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    return f"{hours // 24}d"


def _cell(obj: dict[str, Any], column: dict[str, Any]) -> Any:
    values = jsonpath(obj, column.get("jsonPath", ""))
    if not values:
        return None
    value = values[0] if len(values) == 1 else ",".join(json.dumps(v) if not isinstance(v, str) else v for v in values)
    if column.get("type") == "date" and isinstance(value, str):
        return human_age(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value


def _definition(column: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": column["name"], "type": column.get("type", "string"), "format": column.get("format", ""),
        "description": column.get("description", ""), "priority": column.get("priority", 0),
    }


def _row_object(obj: dict[str, Any], include: str) -> dict[str, Any] | None:
    if include == "None":
        return None
    if include == "Object":
        return obj
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}


def table(rdef: ResourceDef, version: str, objs: list[dict[str, Any]], *, resource_version: str, include: str = "Metadata") -> dict[str, Any]:
    """A `Table` with the Name column first, then the resource's printer columns (Age by default)."""
    columns = rdef.printer_columns(version)
    name_column = {"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}
    rows = []
    for obj in objs:
        row: dict[str, Any] = {"cells": [obj["metadata"]["name"], *(_cell(obj, c) for c in columns)]}
        row_object = _row_object(obj, include)
        if row_object is not None:
            row["object"] = row_object
        rows.append(row)
    return {
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": [name_column, *(_definition(c) for c in columns)],
        "rows": rows,
    }


def wants_table(accept: str) -> bool:
    """True when the client's first acceptable type is a meta.k8s.io Table (kubectl get does this)."""
    first = accept.split(",")[0]
    return "as=Table" in first and "g=meta.k8s.io" in first
