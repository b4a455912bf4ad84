"""Reading the trainer's progress: the status.json the driver writes into the job's ConfigMap.

The driver (finetune_trainer.job_status, through finetune_trainer.kube_progress) patches
`<rayjob>-progress` (trainer_access) whenever a trial starts or ends and at every evaluation; the
operator reads it on a timer. Besides progress, the object may carry the trainer's preflight
verdict (`state: invalid` with `problems`); status_mapping.trainer_problems reads that. Its shape
is `finetune_trainer.spec.progress.ProgressDocument`, the model the trainer builds it from: this
module returns that model, or None, and nothing downstream reads a raw key.

Why a ConfigMap and not the job's S3 storage, as before: reading S3 needed the Secret the job
names and a connection to the endpoint the job's author wrote, both with the operator's own
rights (a confused deputy: docs/security.md). Now the operator talks to the API server only, and
needs no Secret. What it reads is still written by code the job's author controls: it is data,
bounded in size and parsed as JSON, never trusted for more than the job's own status.

`ProgressSource` is the seam: the handlers take any object with `read(job) -> ProgressDocument | None`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from finetune_trainer.spec import FineTuneJob
from finetune_trainer.spec.cluster import PROGRESS_KEY
from finetune_trainer.spec.progress import ProgressDocument

from .trainer_access import progress_name

MAX_BYTES = 1 << 20  # a status object is a few hundred bytes; refuse to load something else whole

log = logging.getLogger(__name__)

ConfigMapReader = Callable[[str, str], Mapping[str, str] | None]  # (namespace, name) -> `data`, None if missing


class ProgressSource(Protocol):
    def read(self, job: FineTuneJob) -> ProgressDocument | None:
        """The job's latest status.json, or None when there is none (yet) or it cannot be read."""


class ConfigMapProgressSource:
    """status.json from the job's progress ConfigMap, through the API server."""

    def __init__(self, read_configmap: ConfigMapReader):
        self.read_configmap = read_configmap

    def read(self, job: FineTuneJob) -> ProgressDocument | None:
        namespace, name = job.metadata.namespace, progress_name(job.name)
        try:
            data = self.read_configmap(namespace, name)
        except Exception as err:  # the API server hiccuped: the next tick tries again
            log.warning("cannot read ConfigMap %s/%s: %s", namespace, name, err)
            return None
        raw = (data or {}).get(PROGRESS_KEY)
        if not raw:
            return None
        if len(raw) > MAX_BYTES:
            log.warning("ConfigMap %s/%s: %s is larger than %d bytes; ignored", namespace, name, PROGRESS_KEY, MAX_BYTES)
            return None
        document = ProgressDocument.read(raw)
        if document is None:
            log.warning("ConfigMap %s/%s: %s is not a progress document (spec.progress.ProgressDocument); ignored",
                        namespace, name, PROGRESS_KEY)
        return document
