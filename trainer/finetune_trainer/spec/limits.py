"""Bounds on a manifest as raw data, checked before pydantic or any rule reads it.

Why a pass of its own: every later check (pydantic, the cross-field rules, the search space's
trial specs, the RayJob's JSON) costs time and memory in proportion to what it is given, and some
recurse. A manifest someone wrote by mistake (or on purpose) must be refused in milliseconds,
with the field named, whatever its shape: a deeply nested `deepspeed.config`, a YAML alias bomb
(each alias a reference, so a few lines hold billions of values), `.inf` or `.nan` anywhere,
an integer Kubernetes cannot store, a YAML date or `!!binary` value JSON has no form for. The walk
is iterative and stops at a fixed budget, so it is bounded itself.

The numbers follow what the manifest travels through: Kubernetes stores integers as int64 and
has no non-finite numbers (JSON); the operator hands the spec to the driver as JSON inside one
command-line argument of KubeRay's submitter (rayjob.py), which Linux caps at 128 KiB.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_MANIFEST_BYTES = 256 * 1024  # a manifest file or env value, checked before YAML parses it
MAX_SPEC_JSON_BYTES = 96 * 1024  # the spec as the driver gets it (under Linux's 128 KiB per argument)
MAX_DEPTH = 16  # levels below the document root; the spec's own deepest field is 6 down
MAX_VALUES = 50_000  # mappings, lists and scalars together
MAX_PROBLEMS = 20  # a broken manifest's report stays readable
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1  # Kubernetes' and KubeRay's int32 fields (replicas, ttlSecondsAfterFinished, ...)
_SCALARS = (str, bool, int, float, type(None))


def raw_problems(document: Any) -> list[tuple[str, str]]:
    """(yaml path, message) for what no FineTuneJob may contain, found by one bounded walk."""
    found: list[tuple[str, str]] = []
    stack: list[tuple[str, Any, int]] = [("", document, 0)]
    seen = 0
    while stack and len(found) < MAX_PROBLEMS:
        path, value, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:  # named where the count ran out: the long list, or the repeated alias
            return [*found, (path or "<manifest>", f"the manifest holds more than {MAX_VALUES} values by here "
                                                   "(a very long list, or a YAML alias repeated many times?); a FineTuneJob needs a few hundred")]
        if isinstance(value, dict | list) and depth >= MAX_DEPTH:
            found.append((path, f"nested deeper than {MAX_DEPTH} levels; free-form maps such as deepspeed.config "
                                "need a handful"))
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                if not isinstance(key, str):
                    found.append((path or "<manifest>", f"key {key!r} is not a string: quote it"))
                    continue
                stack.append((f"{path}.{_short(key)}" if path else _short(key), item, depth + 1))
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", item, depth + 1) for i, item in reversed(list(enumerate(value)))]
        elif isinstance(value, float) and not math.isfinite(value):
            found.append((path, f"{value} is not a number Kubernetes can store (JSON has no inf or nan); write a finite number"))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            found.append((path, "out of range: Kubernetes stores integers up to 2^63-1"))
        elif not isinstance(value, _SCALARS):
            found.append((path, f"a {type(value).__name__} is not a JSON value (a YAML date, !!binary or !!set?); "
                                "quote it as a string"))
    return found


def json_size_problems(spec: Any) -> list[tuple[str, str]]:
    """The spec must fit where the operator puts it: JSON in one argument of the submitter's command."""
    size = len(json.dumps(spec, separators=(",", ":"), ensure_ascii=True))
    if size <= MAX_SPEC_JSON_BYTES:
        return []
    return [("spec", f"{size // 1024} KiB as JSON, over the {MAX_SPEC_JSON_BYTES // 1024} KiB a job's spec can take "
                     "to its Ray driver (one command-line argument of KubeRay's submitter); shorten free-form fields "
                     "such as deepspeed.config or the search space")]


def _short(key: str) -> str:
    return key if len(key) <= 64 else f"{key[:60]}..."
