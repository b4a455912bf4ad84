"""The FineTuneJob contract: one pydantic model from which validation, the CRD schema and the
trainer's config all derive. Imports nothing heavier than pydantic and PyYAML."""

from .base import SpecError, SpecModel
from .cluster import ClusterSpec, RunPolicySpec
from .job import (
    API_VERSION,
    KIND,
    FineTuneJob,
    FineTuneJobSpec,
    ManifestFileError,
    apply_overrides,
    load_document,
    load_job,
    parse_job,
)
from .model import DataSource, DataSpec, ModelSpec
from .runtime import DeepSpeedSpec, OutputSpec, ResourcesSpec
from .storage import StorageSpec
from .training import (
    METRIC_DRIVEN_SCHEDULES,
    SCHEDULE_OPTIONS,
    EarlyStoppingSpec,
    EvaluationSpec,
    FreezingSpec,
    LRScheduleSpec,
    TrainingSpec,
)

__all__ = [
    "API_VERSION", "KIND", "METRIC_DRIVEN_SCHEDULES", "SCHEDULE_OPTIONS", "ClusterSpec", "DataSource", "DataSpec",
    "DeepSpeedSpec", "EarlyStoppingSpec", "EvaluationSpec", "FineTuneJob", "FineTuneJobSpec",
    "FreezingSpec", "LRScheduleSpec", "ManifestFileError", "ModelSpec", "OutputSpec", "ResourcesSpec", "RunPolicySpec", "SpecError",
    "SpecModel", "StorageSpec", "TrainingSpec", "apply_overrides", "load_document", "load_job", "parse_job",
]
