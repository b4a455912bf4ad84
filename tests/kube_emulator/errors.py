"""API errors as the real kube-apiserver reports them: a `Status` object with code, reason and details.

Clients branch on these fields (kubectl prints `Error from server (NotFound): ...` from `reason`
and `message`; kopf and the `kubernetes` client raise by `code`), so they must match the real
server's wording, not kmock's friendlier defaults.
"""

from __future__ import annotations

from typing import Any

import attrs
import kmock


@attrs.frozen
class ApiError(kmock.KubernetesError):
    """An error that renders as a real `Status` (kmock renders `KubernetesError` subclasses for us)."""

    status: int = 500
    reason: str | None = "InternalError"
    message: str | None = None
    details: Any | None = None

    def to_status(self) -> dict[str, Any]:
        """The `Status` body, also used as the object of a watch `ERROR` event."""
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message or "",
            "reason": self.reason or "",
            "details": self.details or {},
            "code": self.status,
        }


def _details(kind: str, name: str | None, group: str = "") -> dict[str, Any]:
    details: dict[str, Any] = {"kind": kind}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    return details


def qualified(plural: str, group: str) -> str:
    """`configmaps`, or `finetunejobs.finetune.dev`: how the server names a resource in messages."""
    return f"{plural}.{group}" if group else plural


def not_found(plural: str, group: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{qualified(plural, group)} "{name}" not found', _details(plural, name, group))


def resource_not_found(path: str) -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {"path": path})


def already_exists(plural: str, group: str, name: str) -> ApiError:
    message = f'{qualified(plural, group)} "{name}" already exists'
    return ApiError(409, "AlreadyExists", message, _details(plural, name, group))


def conflict(plural: str, group: str, name: str, why: str) -> ApiError:
    message = f'Operation cannot be fulfilled on {qualified(plural, group)} "{name}": {why}'
    return ApiError(409, "Conflict", message, _details(plural, name, group))


def invalid(kind: str, group: str, name: str, causes: list[tuple[str, str]]) -> ApiError:
    """422 with one cause per field, worded like the server: `Kind.group "name" is invalid: [f: why, ...]`."""
    text = ", ".join(f"{field}: {why}" if field else why for field, why in causes)
    text = f"[{text}]" if len(causes) > 1 else text
    who = f"{kind}.{group}" if group else kind
    details = _details(kind, name, group)
    details["causes"] = [{"reason": "FieldValueInvalid", "message": why, "field": field} for field, why in causes]
    return ApiError(422, "Invalid", f'{who} "{name}" is invalid: {text}', details)


def unprocessable(message: str) -> ApiError:
    """422 for patches that cannot be applied (bad JSON patch, failed `test` op)."""
    return ApiError(422, "Invalid", message, {})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message, {})


def method_not_allowed(message: str = "the server does not allow this method on the requested resource") -> ApiError:
    return ApiError(405, "MethodNotAllowed", message, {})


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(415, "UnsupportedMediaType", f'the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got "{content_type}")', {})


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message, {})
