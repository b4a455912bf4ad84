"""Where a run reports besides results.json: an MLflow tracking server, TensorBoard event files.

Who contacts the tracking server: the trainer, in the job's own Ray pods (the driver process), as
the job's own identity and through the job's own NetworkPolicy; never the operator, which only
renders the manifest (it imports nothing of the trainer's tracking). So a hostile `trackingUri` can
reach only what the author's own pods could reach anyway.

What the spec refuses, and why:
- credentials: MLflow reads MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN from the environment
  (on a cluster: `spec.cluster.env` with `valueFrom.secretKeyRef`). A URI with `user:pass@` (or a
  query, where a token would ride) would put a secret into the spec, the status and every log.
- anything but http(s): `file:`, `sqlite:` or a bare path would write the tracking store into the
  driver pod's disk (lost with the pod, or onto whatever volume that path is on), `databricks`
  and plugin schemes would run other clients' code paths. A run on a laptop points at
  `mlflow server` on loopback like anyone else.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from .base import SpecModel

# MLflow stores run names and model names in 250-character columns; experiment names are longer
# there, but a name nobody can read in the UI helps nobody
MAX_NAME = 250
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# MLflow refuses '/', ':' and '%' in a registered model's name (URIs `models:/<name>/<version>`);
# we keep to the characters every registry backend accepts
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$")
CREDENTIALS_HINT = ("credentials never go in the manifest: MLflow reads MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) from the environment; on a cluster "
                    "give them with spec.cluster.env valueFrom.secretKeyRef")


def tracking_uri_problem(uri: str) -> str | None:
    """Why `uri` cannot be a tracking server's address, or None. One place: the field validator
    and the hostile-input tests ask the same question."""
    if _CONTROL.search(uri) or any(c.isspace() for c in uri):
        return "must not contain spaces or control characters"
    parts = urlsplit(uri)
    if parts.scheme not in {"http", "https"}:
        return (f"must be an http:// or https:// address of an MLflow tracking server (got scheme {parts.scheme or 'none'!r}); "
                "a file or database store would be written inside the driver's pod and lost with it: run `mlflow server`")
    if "@" in parts.netloc:
        return f"must not carry a user name or password (user:pass@host): {CREDENTIALS_HINT}"
    if parts.query or parts.fragment:
        return f"must not have a query or fragment (?...#...): a token there would be in the spec; {CREDENTIALS_HINT}"
    try:
        port = parts.port
    except ValueError:
        return "has an invalid port"
    host = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    if not host or not _HOST.match(host):
        return f"has no valid host name (got {host!r})"
    return None


class MlflowSpec(SpecModel):
    """One MLflow run per job run; a search is a parent run with one nested run per trial."""

    tracking_uri: str = Field(
        min_length=1, max_length=2048,
        description="http(s):// address of the MLflow tracking server, e.g. http://mlflow.mlflow.svc:5000. No user "
                    "name, password or token in it: MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD or "
                    "MLFLOW_TRACKING_TOKEN from the environment (spec.cluster.env valueFrom a Secret). Only the "
                    "trainer, in the job's pods, connects to it; the operator never does.",
    )
    experiment: str | None = Field(
        default=None, min_length=1, max_length=MAX_NAME,
        description="Experiment name (created if missing); default: <namespace>/<job name>.",
    )
    run_name: str | None = Field(
        default=None, min_length=1, max_length=MAX_NAME,
        description="The (parent) run's name; default: the run id (run-YYYYMMDD-HHMMSS). Trials' nested runs are named trial_NN.",
    )
    registered_model_name: str | None = Field(
        default=None, min_length=1, max_length=MAX_NAME,
        description="Register the exported model (output.export) as a new version of this registered model, "
                    "from the run's `model` artifact. Letters, digits, '_', '-' and '.'.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, uri: str) -> str:
        problem = tracking_uri_problem(uri)
        if problem:
            raise ValueError(problem)
        return uri.rstrip("/")

    @field_validator("experiment", "run_name")
    @classmethod
    def _printable(cls, name: str | None) -> str | None:
        if name is not None and (_CONTROL.search(name) or not name.strip()):
            raise ValueError("must be printable text (no control characters, not blank)")
        return name

    @field_validator("registered_model_name")
    @classmethod
    def _model_name(cls, name: str | None) -> str | None:
        if name is not None and not _MODEL_NAME.match(name):
            raise ValueError("letters, digits, '_', '-' and '.', starting with a letter or digit "
                             "(MLflow refuses '/', ':' and '%' in a model name)")
        return name


class TrackingSpec(SpecModel):
    mlflow: MlflowSpec | None = Field(default=None, description="Log parameters, metrics by step, artifacts and the model to MLflow.")
    tensorboard: bool = Field(
        default=False,
        description="Write TensorBoard event files (every evaluation's metrics by step) under the run folder's "
                    "tensorboard/ (one folder per trial in a search), copied to the run's S3 prefix with spec.storage.",
    )
