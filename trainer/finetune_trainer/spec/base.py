"""The base every spec model shares, and the one error type that carries spec problems.

Users write camelCase YAML (the Kubernetes convention); Python sees snake_case. Unknown
fields are errors, not silently dropped: a typo in a manifest must never become a default.
Types are strict, as the API server's: a value the CRD would refuse is refused here too.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails


class SpecModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        frozen=False,
        # as the CRD's schema (and so the API server) reads a manifest: `true` and "3" are not
        # integers, "1e-4" is not a number; an int is a float. No inf or nan (JSON has none).
        strict=True,
        allow_inf_nan=False,
    )

    def to_manifest(self) -> dict[str, Any]:
        """The camelCase form a user would write, without unset defaults' noise."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)


class SpecError(ValueError):
    """Every problem found in a manifest, each as `(yaml.path, message)`.

    Collected rather than raised one at a time, so a user fixes a manifest in one pass.
    """

    MAX_SHOWN = 20  # a list of 5000 wrong values is one mistake: the status message and Event stay small

    def __init__(self, problems: list[tuple[str, str]]):
        if len(problems) > self.MAX_SHOWN:
            more = len(problems) - self.MAX_SHOWN
            problems = [*problems[: self.MAX_SHOWN], ("<manifest>", f"and {more} more problem(s), not shown")]
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{len(self.problems)} problem(s) in the FineTuneJob:"]
        lines += [f"  - {path}: {message}" for path, message in self.problems]
        return "\n".join(lines)

    @classmethod
    def from_validation_error(cls, err: ValidationError, prefix: str = "") -> SpecError:
        return cls([(_path(prefix, e["loc"]), _message(e)) for e in err.errors()])


def _path(prefix: str, loc: tuple[Any, ...]) -> str:
    parts: list[str] = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        # pydantic names union members (e.g. "int", "literal['epoch']"); they are not YAML keys
        elif isinstance(item, str) and ("[" in item or item in {"int", "float", "str", "bool"}):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts) or "<manifest>"


def _message(err: ErrorDetails) -> str:
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "extra_forbidden":
        return "unknown field (check its spelling and nesting; fields are camelCase)"
    if err["type"] == "missing":
        return "required field is missing"
    value = err.get("input")
    if err["type"] not in {"value_error", "assertion_error"} and not isinstance(value, dict):
        shown = repr(value)  # a 1000-value list or a 300-character name: enough of it to recognise
        msg = f"{msg} (got {shown if len(shown) <= 80 else shown[:60] + ' ...' + shown[-12:]})"
    return msg
