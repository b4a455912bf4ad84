"""The one writer of `FineTuneJob.status`: read the job, compute from what was read, write only over it.

Three handlers change the status (handlers.py): reconcile, the progress timer and the RayJob
mirror, and kopf runs them concurrently (a timer and two watch streams). kopf's own
`patch.status` is applied after a handler returns, as a merge patch without a precondition,
computed from the body the handler was given, which may be old by then. So a progress tick that
read the job while it was Running could write "the trainer is running" over the Succeeded the
mirror wrote in between, and, the timer having stopped, nothing would correct it.

`write_status` is the only path to the status subresource instead: GET the job, compute the new
status from the status just read (status_mapping's rules, e.g. no way back from a finished phase,
then see what they replace), merge-patch the difference with the body's `resourceVersion` as a
precondition, and on 409 Conflict read and compute again. The rules of the status machine hold
across the handlers, not only within one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from .kube import is_conflict
from .status_model import FineTuneJobStatus

CONFLICT_ATTEMPTS = 3  # then the 409 goes to kopf: it retries a reconcile; a timer's next tick tries again

StatusChange = Callable[[FineTuneJobStatus, Mapping[str, Any]], FineTuneJobStatus]  # (status as read, its body) -> new


class JobStatusApi(Protocol):
    """The two calls of kube.KubeApi this module makes."""

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def patch_job_status(self, namespace: str, name: str, status: Mapping[str, Any], *,
                         resource_version: str | None = None) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StatusWrite:
    """What write_status did: the body it computed from, the status it replaced and the new one."""

    body: Mapping[str, Any]
    previous: FineTuneJobStatus
    status: FineTuneJobStatus
    wrote: bool  # False: nothing had changed, nothing was sent


def write_status(kube: JobStatusApi, namespace: str, name: str, uid: str, change: StatusChange, *,
                 fresh: Mapping[str, Any] | None = None) -> StatusWrite | None:
    """Compute `change(status, body)` from a fresh read of the job and write the difference if nobody
    wrote in between (CONFLICT_ATTEMPTS reads in all). `change` may run more than once: it must
    decide from its arguments, not from what the handler read earlier.

    `fresh`: the job as the caller has just read it from the API server (the progress poll reads
    it to see what is due), used for the first attempt instead of a second GET; the patch's
    resourceVersion precondition still refuses it if anyone wrote since, and the retry reads anew.

    None when the job is gone, replaced by another of that name (`uid`), or being deleted."""
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        body = fresh if attempt == 1 and fresh is not None else kube.get_job(namespace, name)
        meta = (body or {}).get("metadata") or {}
        if body is None or meta.get("uid") != uid or meta.get("deletionTimestamp"):
            return None
        previous = read_status(body)
        status = change(previous, body)
        patch = status_patch(previous, status)
        if patch:
            try:
                kube.patch_job_status(namespace, name, patch, resource_version=meta.get("resourceVersion"))
            except Exception as err:
                if is_conflict(err) and attempt < CONFLICT_ATTEMPTS:
                    continue
                raise
        return StatusWrite(body, previous, status, wrote=bool(patch))
    raise AssertionError("unreachable: the last attempt returns or raises")


def status_patch(previous: FineTuneJobStatus, new: FineTuneJobStatus) -> dict[str, Any]:
    """The merge patch from one status to the next: changed top-level fields, None for removed ones."""
    old, want = previous.to_patch(), new.to_patch()
    patch: dict[str, Any] = {key: value for key, value in want.items() if old.get(key) != value}
    patch.update({key: None for key in old if key not in want})
    return patch


def read_status(body: Mapping[str, Any]) -> FineTuneJobStatus:
    """The status as written; one we cannot read (hand-edited, a future version's) is started afresh."""
    try:
        return FineTuneJobStatus.model_validate(plain(body.get("status") or {}))
    except ValidationError:
        return FineTuneJobStatus()


def plain(value: Any) -> Any:
    """kopf's bodies are read-only views; pydantic and parse_job want plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
