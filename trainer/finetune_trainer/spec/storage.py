"""Where checkpoints, the exported model and results.json go when they leave this machine:
any S3-compatible service (AWS, MinIO, SeaweedFS, Ceph RGW).

Only *where* lives here. *When* to checkpoint is `evaluation.everySteps` (every evaluation writes
one) and *how many* to keep is `output.keepCheckpoints`: both apply the same whether checkpoints go
to a local folder or to S3, so they are not repeated here.

Credentials are never part of the manifest: the trainer reads AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) from its environment, which the operator fills from
a Kubernetes Secret.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import SpecModel

# https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html (the common subset)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ENDPOINT = re.compile(r"^https?://[^/\s:]+(:[0-9]{1,5})?/?$")
# keys someone might try to put credentials under (compared lowercased, without - and _)
_SECRET_KEYS = {
    "accesskey", "accesskeyid", "awsaccesskeyid", "secretkey", "secretaccesskey", "awssecretaccesskey",
    "sessiontoken", "awssessiontoken", "credentials", "password", "token", "secret",
}
RESUME_MODES = ("auto", "never", "latest")  # besides a checkpoint URI
CREDENTIALS_HINT = (
    "credentials never go in the manifest: the trainer reads AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) from its environment, which the operator fills "
    "from a Kubernetes Secret"
)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b/` -> ("bucket", "a/b"); raises ValueError saying what is wrong."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"must be an s3:// URI such as s3://my-bucket/finetune (got {uri!r})")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(
            f"{bucket!r} is not a valid bucket name: 3-63 lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    prefix = prefix.strip("/")
    if "//" in prefix or any(part in {".", ".."} for part in prefix.split("/")):
        raise ValueError(f"the key prefix {prefix!r} has an empty, '.' or '..' segment")
    return bucket, prefix


class StorageSpec(SpecModel):
    uri: str = Field(
        description="s3://bucket/prefix: checkpoints, the exported model and results.json go under "
        "<prefix>/<namespace>/<job name>/<run>/.",
    )
    endpoint: str | None = Field(
        default=None,
        description="http(s)://host:port of an S3-compatible service (MinIO, SeaweedFS, Ceph RGW); leave out for AWS S3.",
    )
    region: str = Field(default="us-east-1", min_length=1, description="Signing region (most S3-compatible services accept any).")
    addressing: Literal["path", "virtual"] = Field(
        default="path",
        description="path: https://endpoint/bucket/key (what most S3-compatible services need); virtual: https://bucket.endpoint/key.",
    )
    verify_tls: bool = Field(
        default=True,
        description="Verify the endpoint's TLS certificate. Ray Train's checkpoint uploads (pyarrow) always verify: "
        "for a private CA, set AWS_CA_BUNDLE rather than false.",
    )
    max_attempts: int = Field(
        default=8,
        ge=1,
        le=20,
        description="Attempts per storage request (the first one and its retries, as AWS's max_attempts) before it "
        "fails: exponential back-off with jitter, up to 20 s apart, so the default 8 keeps a request trying ~45 s on "
        "average and ~70 s at most (4 lost checkpoints to one 503 SlowDown burst). Lower fails sooner on storage that "
        "is gone; a checkpoint whose completion marker cannot be written within them does not count, and training "
        "goes on. At most 20 (~6 min), so a run never hangs for long on storage that does not answer.",
    )
    resume: str = Field(
        default="auto",
        description="auto: a new attempt of the same run (a KubeRay retry, a pod lost to preemption, a re-created "
        "RayJob; locally `finetune run --run-id`) continues from that run's latest complete checkpoint, and a new "
        "FineTuneJob starts fresh. never (or none): every attempt starts from step 0. latest: continue from the "
        "newest complete checkpoint of this job (any earlier run). Or the s3:// URI of one checkpoint directory "
        "under this job's own prefix (<uri>/<namespace>/<job name>/).",
    )
    allow_resume_outside_job: bool = Field(
        default=False,
        description="Let resume name a checkpoint outside this job's own prefix (another job's, another "
        "bucket's). A loaded checkpoint's weights and state become this job's: set true only if you trust "
        "whoever can write there.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            found = sorted(k for k in data if isinstance(k, str) and k.lower().replace("_", "").replace("-", "") in _SECRET_KEYS)
            if found:
                raise ValueError(f"remove {', '.join(found)}: {CREDENTIALS_HINT}")
        return data

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str) -> str:
        split_s3_uri(uri)
        return uri

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, endpoint: str | None) -> str | None:
        if endpoint is not None and not _ENDPOINT.match(endpoint):
            raise ValueError(f"must be http://host:port or https://host:port, without a path (got {endpoint!r})")
        return endpoint.rstrip("/") if endpoint else endpoint

    @field_validator("resume")
    @classmethod
    def _resume(cls, resume: str) -> str:
        if resume == "none":  # the name before `never` existed
            return "never"
        if resume not in RESUME_MODES:
            try:
                split_s3_uri(resume)
            except ValueError as err:
                raise ValueError(f"must be auto, never, latest or the s3:// URI of a checkpoint: {err}") from None
        return resume

    def resume_problems(self, namespace: str, job: str) -> list[tuple[str, str]]:
        """A resume URI must lie under the job's own prefix unless allowResumeOutsideJob says
        otherwise: whoever can write elsewhere in the bucket (another team, another job's
        author) must not get their files loaded into this job by a typo or a copied manifest."""
        if self.resume in RESUME_MODES or self.allow_resume_outside_job:
            return []
        own = "/".join(p for p in (self.prefix, namespace, job) if p)
        bucket, key = split_s3_uri(self.resume)
        if bucket == self.bucket and key.startswith(own + "/"):
            return []
        return [("spec.storage.resume", f"{self.resume} is outside this job's own prefix s3://{self.bucket}/{own}/: "
                 "name a checkpoint of this job, or set spec.storage.allowResumeOutsideJob: true if you trust "
                 "whoever can write there (a loaded checkpoint's weights and state become this job's)")]

    @property
    def bucket(self) -> str:
        return split_s3_uri(self.uri)[0]

    @property
    def prefix(self) -> str:
        return split_s3_uri(self.uri)[1]
