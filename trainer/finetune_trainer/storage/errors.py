"""One error hierarchy for every storage failure, each saying which failure and what to do.

    StorageError
    ├── EndpointUnreachable   nothing answers at the endpoint (refused, DNS, TLS, timeout)
    ├── BucketMissing         the endpoint answers, the bucket does not exist
    ├── AccessDenied          the credentials are unknown, wrong, or lack a permission
    ├── StorageUnavailable    the service answered before but keeps failing: retries exhausted
    └── CheckpointRefused     a checkpoint's files do not match its marker (hashes): never loaded

`classify(err, ...)` turns a botocore / pyarrow / OS error into one of these; callers catch
`StorageError` and print its message (one line), never a stack trace.
"""

from __future__ import annotations

import re


class StorageError(Exception):
    """Base of every storage failure; the message is for the user, complete on its own."""

    def __init__(self, message: str, *, location: str = ""):
        self.location = location
        super().__init__(message)


class EndpointUnreachable(StorageError):
    pass


class BucketMissing(StorageError):
    pass


class AccessDenied(StorageError):
    pass


class StorageUnavailable(StorageError):
    pass


class CheckpointRefused(StorageError):
    """A checkpoint whose marker is missing, unreadable or of an older version, or whose files
    differ from what the marker lists (a hash, a size, a file missing or one it does not list)."""


_ACCESS_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
    "TokenRefreshRequired", "AllAccessDisabled", "AuthorizationHeaderMalformed", "InvalidClientTokenId",
}
_UNAVAILABLE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500", "502", "504"}
_PYARROW_CODE = re.compile(r"AWS Error ([A-Z_]+)")
_UNREACHABLE_TEXT = re.compile(
    r"connection refused|could not connect|failed to connect|couldn't connect|name or service not known|"
    r"nodename nor servname|could not resolve|temporary failure in name resolution|no route to host|"
    r"connect timeout|connection timed out|network is unreachable|curlcode: 7|curlcode: 6|curlcode: 28|NETWORK_CONNECTION",
    re.IGNORECASE,
)


def classify(err: BaseException, *, endpoint: str, bucket: str, doing: str, reached_before: bool = False) -> StorageError:
    """The StorageError for `err`, raised while `doing` (e.g. "writing s3://b/p/x").

    `reached_before`: the service answered earlier in this process, so a connection failure now
    means it went away mid-run (StorageUnavailable) rather than a wrong endpoint.
    """
    if isinstance(err, StorageError):
        return err
    where = f"s3://{bucket}" + (f" at {endpoint}" if endpoint else "")
    code = _error_code(err)
    text = str(err)
    if code == "NoSuchBucket" or "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return BucketMissing(
            f"bucket {bucket!r} does not exist at {endpoint or 'AWS S3'} ({doing}); create it, or fix spec.storage.uri",
            location=where,
        )
    if code in _ACCESS_CODES or any(c in text for c in _ACCESS_CODES) or code == "403":
        return AccessDenied(
            f"access denied to {where} ({doing}: {code or _first_line(text)}); check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (the Secret the operator passes) and that they may read, write, list "
            "and delete under the prefix",
            location=where,
        )
    if _is_connection_error(err):
        if reached_before:
            return StorageUnavailable(
                f"storage at {where} stopped answering ({doing}) and retries are exhausted: "
                f"{_first_line(text)}; the last complete checkpoint is still there once it is back",
                location=where,
            )
        return EndpointUnreachable(
            f"cannot reach the S3 endpoint {endpoint or 'AWS S3'} ({doing}): {_first_line(text)}; check "
            "spec.storage.endpoint (scheme, host, port) and that the service is running and reachable from here",
            location=where,
        )
    if code in _UNAVAILABLE_CODES:
        return StorageUnavailable(
            f"storage at {where} keeps failing ({doing}: {code}) and retries are exhausted; try again later",
            location=where,
        )
    return StorageError(f"storage error at {where} ({doing}): {_first_line(text)}", location=where)


def _error_code(err: BaseException) -> str:
    """The S3 error code: botocore's response, or pyarrow's "AWS Error SIGNATURE_DOES_NOT_MATCH" as
    "SignatureDoesNotMatch" (Ray Train's uploads fail with pyarrow's OSError)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", "") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    found = _PYARROW_CODE.search(str(err))
    return "".join(w.capitalize() for w in found.group(1).split("_")) if found else ""


def _is_connection_error(err: BaseException) -> bool:
    boto_errors: tuple[type[BaseException], ...]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
        boto_errors = (BotoConnectionError, EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)
    except ImportError:  # pragma: no cover - boto3 is in the trainer extra
        boto_errors = ()
    if isinstance(err, (*boto_errors, ConnectionError, TimeoutError)):
        return True
    return bool(_UNREACHABLE_TEXT.search(str(err)))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "no detail"
