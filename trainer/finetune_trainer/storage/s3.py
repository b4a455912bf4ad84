"""All S3 I/O: locations, the boto3 client, the pyarrow filesystem Ray Train writes through, the
`Store` the checkpoint bookkeeping uses (S3 or a local folder), and the preflight probe.

Credentials come only from the standard AWS environment variables, read once in the driver and
carried explicitly (the pyarrow filesystem and the stores are pickled to Ray's controller and
workers, which may have been started before the variables were set).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..spec.storage import StorageSpec, split_s3_uri
from .errors import AccessDenied, StorageError, classify

# Attempts per request by default (spec.storage.maxAttempts), boto3 in "adaptive" mode (standard
# retries plus a client-side rate limiter that slows down after throttling) and pyarrow's AWS
# "standard" strategy: exponential back-off with full jitter, up to 1, 2, 4, 8, 16 then 20 s between
# attempts, so a request keeps trying for ~45 s on average and at most ~70 s before it fails. 4
# attempts (~7 s at most) lost checkpoints to one 503 SlowDown burst; far more would leave a run
# hanging for minutes on storage that is gone.
ATTEMPTS: int = StorageSpec.model_fields["max_attempts"].default  # the spec's default, one place
RETRY_MODE = "adaptive"
PROBE_ATTEMPTS = 1  # the preflight fails fast: one attempt, short timeouts
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 30.0
PROBE_CONNECT_TIMEOUT, PROBE_READ_TIMEOUT = 2.0, 5.0


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str = ""  # no leading or trailing "/"

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        bucket, key = split_s3_uri(uri)
        return cls(bucket, key)

    def join(self, *parts: str) -> S3Location:
        return S3Location(self.bucket, join_key(self.key, *parts))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    @property
    def fs_path(self) -> str:
        """The path form pyarrow's S3FileSystem (and RunConfig(storage_path) with it) takes."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def __str__(self) -> str:
        return self.uri


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


@dataclass(frozen=True)
class Credentials:
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Credentials:
        env = os.environ if env is None else env
        return cls(env.get("AWS_ACCESS_KEY_ID") or None, env.get("AWS_SECRET_ACCESS_KEY") or None, env.get("AWS_SESSION_TOKEN") or None)


def s3_client(spec: StorageSpec, credentials: Credentials | None = None, *, attempts: int | None = None,
              connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT):
    """A boto3 S3 client for `spec`: adaptive-mode retries (`attempts` in all, else spec.maxAttempts),
    timeouts, path/virtual addressing."""
    import boto3
    from botocore.config import Config

    creds = credentials or Credentials.from_env()
    config = Config(
        region_name=spec.region,
        retries={"mode": RETRY_MODE, "total_max_attempts": attempts or spec.max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": spec.addressing},
    )
    session = boto3.session.Session()  # not boto3's module-level default session: thread-safe, no shared state
    return session.client(
        "s3", endpoint_url=spec.endpoint, region_name=spec.region, verify=spec.verify_tls if spec.verify_tls else False,
        aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key, aws_session_token=creds.session_token,
        config=config,
    )


def pyarrow_filesystem(spec: StorageSpec, credentials: Credentials | None = None, *, attempts: int | None = None):
    """The `pyarrow.fs.S3FileSystem` for RunConfig(storage_filesystem=...).

    Without `credentials` the filesystem carries no keys: every process that unpickles it (Ray
    workers, Tune's trial actors) reads the standard AWS variables itself, the way the pods get
    them from the Secret. That matters because Ray Tune pickles its RunConfig, filesystem
    included, into `tuner.pkl` in the bucket: explicit keys would be written next to the
    checkpoints for anyone who can read them.

    The retry strategy (`attempts`, else spec.maxAttempts; AWS "standard") travels with it: pyarrow's own pickling drops
    it, so Ray's workers would otherwise upload with pyarrow's default of 3 attempts."""
    creds = credentials or Credentials()
    scheme, host = "https", None
    if spec.endpoint:
        scheme, _, host = spec.endpoint.partition("://")
    ca = os.environ.get("AWS_CA_BUNDLE")
    if scheme == "https" and not spec.verify_tls and not ca:
        raise StorageError(
            "spec.storage.verifyTls: false cannot apply to Ray Train's checkpoint filesystem (pyarrow always "
            "verifies TLS); give the endpoint's CA certificate in AWS_CA_BUNDLE instead"
        )
    options = {
        "access_key": creds.access_key, "secret_key": creds.secret_key, "session_token": creds.session_token,
        "region": spec.region, "scheme": scheme, "endpoint_override": host,
        "connect_timeout": CONNECT_TIMEOUT, "request_timeout": READ_TIMEOUT,
        "force_virtual_addressing": spec.addressing == "virtual",
        **({"tls_ca_file_path": ca} if ca else {}),  # pyarrow >= 19 knows it; pass it only when needed
    }
    return _retrying_filesystem(options, attempts or spec.max_attempts)


_FILESYSTEM_CLASS: Any = None


def _retrying_filesystem(options: dict[str, Any], attempts: int) -> Any:
    """A `pyarrow.fs.S3FileSystem` (a subclass: Ray Train takes any pyarrow FileSystem) that pickles
    as `_retrying_filesystem(options, attempts)`, so every process that unpickles it (Ray's
    controller and workers, a restored Tune experiment) retries as this one does. pyarrow 26's
    `S3FileSystem.__reduce__` leaves `retry_strategy` out. The class is made on first use: importing
    this module must not import pyarrow."""
    global _FILESYSTEM_CLASS
    if _FILESYSTEM_CLASS is None:
        from pyarrow import fs

        class RetryingS3FileSystem(fs.S3FileSystem):
            def __init__(self, options: dict[str, Any], attempts: int):
                super().__init__(retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=attempts), **options)
                self.options, self.attempts = options, attempts

            def __reduce__(self) -> tuple[Any, ...]:
                return (_retrying_filesystem, (self.options, self.attempts))

        _FILESYSTEM_CLASS = RetryingS3FileSystem
    return _FILESYSTEM_CLASS(options, attempts)


def job_location(spec: StorageSpec, namespace: str, job: str) -> S3Location:
    """`<prefix>/<namespace>/<job>`: every run of a job lives below (`<run>/...`)."""
    return S3Location.parse(spec.uri).join(namespace, job)


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str | None = None
    modified: float = 0.0


class Store(Protocol):
    """The small interface the checkpoint bookkeeping needs; keys are '/'-separated, relative to
    the store's root (a bucket, or a local folder)."""

    def list(self, prefix: str) -> dict[str, ObjectInfo]: ...
    def read(self, key: str) -> bytes | None: ...  # None when missing
    def sha256(self, key: str) -> str | None: ...  # hex digest, streamed; None when missing
    def write(self, key: str, data: bytes) -> None: ...  # atomic: readers see old or new, whole
    def delete(self, keys: Iterable[str]) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...  # large files in parts, atomic per object
    def uri(self, key: str) -> str: ...
    def key_of(self, fs_path: str) -> str: ...  # a Ray checkpoint's path on its filesystem -> key


class S3Store:
    """A bucket through boto3 (retries in adaptive mode, `attempts` per request, else
    spec.maxAttempts); every failure becomes a StorageError once they are spent."""

    def __init__(self, spec: StorageSpec, credentials: Credentials | None = None, *, attempts: int | None = None):
        self.spec, self.bucket, self.attempts = spec, spec.bucket, attempts or spec.max_attempts
        # None: read from the environment where the client is made (a store pickled into Tune's
        # experiment state must not carry the keys; see pyarrow_filesystem)
        self.credentials = credentials
        self._client = None
        self._reached = False

    def __getstate__(self) -> dict[str, Any]:  # boto3 clients do not pickle: rebuild where unpickled
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client(self.spec, self.credentials, attempts=self.attempts)
        return self._client

    @contextlib.contextmanager
    def _call(self, doing: str):
        try:
            yield
            self._reached = True
        except Exception as err:
            raise classify(err, endpoint=self.spec.endpoint or "", bucket=self.bucket, doing=doing,
                           reached_before=self._reached) from err

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        found: dict[str, ObjectInfo] = {}
        with self._call(f"listing {self.uri(prefix)}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):
                        continue  # a "directory" placeholder (pyarrow's create_dir writes them), not a file
                    found[obj["Key"]] = ObjectInfo(obj["Size"], obj.get("ETag", "").strip('"') or None, obj["LastModified"].timestamp())
        return found

    def read(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._call(f"reading {self.uri(key)}"):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                    return None
                raise

    def sha256(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        from .integrity import CHUNK, sha256_stream

        with self._call(f"reading {self.uri(key)}"):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                    return None
                raise
            return sha256_stream(body.iter_chunks(CHUNK))

    def write(self, key: str, data: bytes) -> None:
        with self._call(f"writing {self.uri(key)}"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)  # one PUT: atomic per object

    def put_file(self, key: str, path: Path) -> None:
        with self._call(f"uploading {path} to {self.uri(key)}"):
            self.client.upload_file(str(path), self.bucket, key)  # multipart above 8 MiB; visible only when done

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            with self._call(f"deleting {len(batch)} object(s) under {self.uri('')}"):
                done = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if done.get("Errors"):
                first = done["Errors"][0]
                raise StorageError(f"could not delete {self.uri(first['Key'])}: {first.get('Code')} {first.get('Message', '')}")

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def key_of(self, fs_path: str) -> str:
        """'bucket/a/b' (pyarrow's path) or 's3://bucket/a/b' -> 'a/b'."""
        path = fs_path.removeprefix("s3://")
        bucket, _, key = path.partition("/")
        if bucket != self.bucket:
            raise StorageError(f"{fs_path} is not in bucket {self.bucket!r}")
        return key.strip("/")


class LocalStore:
    """A local folder with the same interface (runs without spec.storage; tests)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        base = self.root / prefix
        if not base.is_dir():
            return {}
        found = {}
        for path in base.rglob("*"):
            if path.is_file() and not path.name.endswith(".partial"):
                stat = path.stat()
                found[path.relative_to(self.root).as_posix()] = ObjectInfo(stat.st_size, None, stat.st_mtime)
        return found

    def read(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def sha256(self, key: str) -> str | None:
        from .integrity import sha256_file

        path = self.root / key
        return sha256_file(path) if path.is_file() else None

    def write(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.partial")
        tmp.write_bytes(data)
        tmp.replace(path)  # rename: atomic on one filesystem

    def put_file(self, key: str, path: Path) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.partial")
        shutil.copyfile(path, tmp)
        tmp.replace(target)

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for key in keys:
            (self.root / key).unlink(missing_ok=True)
        # leave no empty checkpoint folders behind
        for folder in sorted({(self.root / k).parent for k in keys}, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                while folder != self.root and not any(folder.iterdir()):
                    folder.rmdir()
                    folder = folder.parent

    def uri(self, key: str) -> str:
        return str(self.root / key)

    def key_of(self, fs_path: str) -> str:
        return Path(fs_path).resolve().relative_to(self.root).as_posix()


@dataclass(frozen=True)
class RayStorage:
    """What RunConfig takes: `RunConfig(storage_path=rs.storage_path, storage_filesystem=rs.filesystem)`."""

    storage_path: str  # "bucket/prefix/namespace/job" (no s3://)
    filesystem: Any  # pyarrow.fs.S3FileSystem


def ray_storage(spec: StorageSpec, namespace: str, job: str, credentials: Credentials | None = None) -> RayStorage:
    return RayStorage(job_location(spec, namespace, job).fs_path, pyarrow_filesystem(spec, credentials))


def preflight(spec: StorageSpec, credentials: Credentials | None = None, *, namespace: str = "", job: str = "") -> float:
    """Write, list and delete a probe object under the job's prefix; seconds taken. Fails fast
    (one attempt, 2 s connect / 5 s read timeouts) with EndpointUnreachable, BucketMissing or
    AccessDenied, so a bad endpoint or key is reported before any training starts."""
    started = time.monotonic()
    creds = credentials or Credentials.from_env()
    if (not creds.access_key or not creds.secret_key) and spec.endpoint:
        # AWS itself may use instance roles; an S3-compatible service needs keys
        raise AccessDenied(
            f"no credentials for {spec.endpoint}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(the operator sets them from the Secret named in the FineTuneJob)"
        )
    pyarrow_filesystem(spec, creds)  # the settings Ray Train will need must hold too (e.g. TLS)
    client = s3_client(spec, creds, attempts=PROBE_ATTEMPTS, connect_timeout=PROBE_CONNECT_TIMEOUT, read_timeout=PROBE_READ_TIMEOUT)
    location = job_location(spec, namespace, job) if job else S3Location.parse(spec.uri)
    key = join_key(location.key, f".preflight-{uuid.uuid4().hex[:12]}")
    endpoint = spec.endpoint or ""

    def step(doing: str, call):
        try:
            return call()
        except Exception as err:
            raise classify(err, endpoint=endpoint, bucket=spec.bucket, doing=f"preflight: {doing}") from err

    step(f"writing s3://{spec.bucket}/{key}", lambda: client.put_object(Bucket=spec.bucket, Key=key, Body=b"finetune-operator preflight"))
    listed = step(f"listing s3://{location.fs_path}/", lambda: client.list_objects_v2(Bucket=spec.bucket, Prefix=key, MaxKeys=1))
    if not any(o["Key"] == key for o in listed.get("Contents", [])):
        raise StorageError(f"preflight: wrote s3://{spec.bucket}/{key} but listing does not show it; the endpoint is not a consistent S3 service")
    step(f"deleting s3://{spec.bucket}/{key}", lambda: client.delete_object(Bucket=spec.bucket, Key=key))
    return time.monotonic() - started
