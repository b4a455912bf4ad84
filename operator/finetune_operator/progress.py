"""Reading the trainer's progress: `status.json` under the job's storage prefix.

The trainer (finetune_trainer.job_status) writes `<spec.storage.uri>/<namespace>/<job>/status.json`
whenever a trial starts or ends and at every evaluation; the operator reads it on a timer, so the
training pods need no Kubernetes API rights at all. The credentials are the job's own: the Secret
named by `spec.cluster.s3CredentialsSecret` (the same keys the pods get as secretKeyRef env), read
through the API. Jobs without `spec.storage` write locally in the pods, so there is nothing to read.
Besides progress, the object may carry the trainer's preflight verdict (`state: invalid` with
`problems`); status_mapping.trainer_problems reads that.

`ProgressSource` is the seam: the handlers take any object with `read(job) -> dict | None`; the
unit tests pass a fake, the end-to-end tests this one against a real S3 server.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from finetune_trainer.spec import FineTuneJob
from finetune_trainer.spec.storage import split_s3_uri

STATUS_FILE = "status.json"  # finetune_trainer.job_status.STATUS_FILE (the operator imports only the spec)
MAX_BYTES = 1 << 20  # a status object is a few hundred bytes; refuse to load something else whole

log = logging.getLogger(__name__)

SecretReader = Callable[[str, str], Mapping[str, str] | None]  # (namespace, name) -> base64 `data`, None if missing


class ProgressSource(Protocol):
    def read(self, job: FineTuneJob) -> dict[str, Any] | None:
        """The job's latest status.json, or None when there is none (yet) or it cannot be read."""


def status_key(job: FineTuneJob) -> tuple[str, str] | None:
    """(bucket, key) of the job's status.json; None without spec.storage."""
    if job.spec.storage is None:
        return None
    bucket, prefix = split_s3_uri(job.spec.storage.uri)
    parts = [prefix, job.metadata.namespace, job.name, STATUS_FILE]
    return bucket, "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class S3ProgressSource:
    """boto3 against spec.storage (endpoint, region, addressing, verifyTls), keys from the job's Secret."""

    def __init__(self, read_secret: SecretReader, *, connect_timeout: float = 3.0, read_timeout: float = 10.0):
        self.read_secret = read_secret
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout

    def read(self, job: FineTuneJob) -> dict[str, Any] | None:
        where = status_key(job)
        if where is None:
            return None
        bucket, key = where
        try:
            body = self._client(job).get_object(Bucket=bucket, Key=key)["Body"]
            raw = body.read(MAX_BYTES + 1)
        except Exception as err:  # missing object, storage down, bad keys: the next tick tries again
            if _is_missing(err):
                return None
            log.warning("cannot read s3://%s/%s: %s", bucket, key, err)
            return None
        if len(raw) > MAX_BYTES:
            log.warning("s3://%s/%s is larger than %d bytes; ignored", bucket, key, MAX_BYTES)
            return None
        try:
            data = json.loads(raw)
        except ValueError as err:
            log.warning("s3://%s/%s is not JSON: %s", bucket, key, err)
            return None
        return data if isinstance(data, dict) else None

    def _client(self, job: FineTuneJob) -> Any:
        import boto3
        from botocore.config import Config

        storage = job.spec.storage
        assert storage is not None
        creds = self._credentials(job)
        config = Config(region_name=storage.region, retries={"mode": "standard", "total_max_attempts": 2},
                        connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                        s3={"addressing_style": storage.addressing})
        return boto3.session.Session().client(
            "s3", endpoint_url=storage.endpoint, region_name=storage.region, verify=storage.verify_tls,
            aws_access_key_id=creds.get("AWS_ACCESS_KEY_ID"), aws_secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=creds.get("AWS_SESSION_TOKEN"), config=config,
        )

    def _credentials(self, job: FineTuneJob) -> dict[str, str]:
        """The keys from spec.cluster.s3CredentialsSecret; without one, boto3's own chain (the
        operator's environment or IRSA) applies."""
        ref = job.spec.cluster.s3_credentials_secret
        if ref is None:
            return {}
        data = self.read_secret(job.metadata.namespace, ref.name) or {}
        wanted = {"AWS_ACCESS_KEY_ID": ref.access_key_id_key, "AWS_SECRET_ACCESS_KEY": ref.secret_access_key_key,
                  "AWS_SESSION_TOKEN": ref.session_token_key}
        return {var: base64.b64decode(data[key]).decode() for var, key in wanted.items() if key and key in data}


def _is_missing(err: Exception) -> bool:
    response = getattr(err, "response", None)
    code = (response or {}).get("Error", {}).get("Code") if isinstance(response, dict) else None
    return code in {"NoSuchKey", "404", "NoSuchBucket"}
