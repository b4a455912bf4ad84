"""Checkpoints, the exported model and results.json on S3-compatible storage (or a local folder).

All S3 I/O of the trainer goes through this package:
  - `errors`: StorageError and its kinds (EndpointUnreachable, BucketMissing, AccessDenied,
    StorageUnavailable), each with a message that says what to do;
  - `s3`: S3Location, the boto3 client, the pyarrow filesystem for Ray Train, the Store interface
    (S3Store, LocalStore) and `preflight`;
  - `checkpoints`: the `_COMPLETE.json` manifest, latest/best complete checkpoint, retention,
    atomic JSON writes;
  - `integrity`: the SHA-256 of every file in the manifest, the workers' hash sidecars, and the
    check of a local copy before anything reads it;
  - `ray_callback` (imports Ray, so not re-exported here): the controller callback that marks
    each reported checkpoint complete.
"""

from .checkpoints import (
    MARKER,
    CompleteCheckpoint,
    best_complete,
    latest_complete,
    list_complete_checkpoints,
    mark_complete,
    prune,
    read_complete,
    read_json,
    resume_point,
    upload_dir,
    write_json,
)
from .errors import (
    AccessDenied,
    BucketMissing,
    CheckpointRefused,
    EndpointUnreachable,
    StorageError,
    StorageUnavailable,
    classify,
)
from .integrity import verify_local, write_file_hashes
from .s3 import (
    ATTEMPTS,
    Credentials,
    LocalStore,
    ObjectInfo,
    RayStorage,
    S3Location,
    S3Store,
    Store,
    job_location,
    join_key,
    preflight,
    pyarrow_filesystem,
    ray_storage,
    s3_client,
)

__all__ = [
    "ATTEMPTS",
    "MARKER",
    "AccessDenied",
    "BucketMissing",
    "CheckpointRefused",
    "CompleteCheckpoint",
    "Credentials",
    "EndpointUnreachable",
    "LocalStore",
    "ObjectInfo",
    "RayStorage",
    "S3Location",
    "S3Store",
    "StorageError",
    "StorageUnavailable",
    "Store",
    "best_complete",
    "classify",
    "job_location",
    "join_key",
    "latest_complete",
    "list_complete_checkpoints",
    "mark_complete",
    "preflight",
    "prune",
    "pyarrow_filesystem",
    "ray_storage",
    "read_complete",
    "read_json",
    "resume_point",
    "s3_client",
    "upload_dir",
    "verify_local",
    "write_file_hashes",
    "write_json",
]
