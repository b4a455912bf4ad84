"""status.json, typed once: the progress document the trainer writes and the operator reads.

The driver (finetune_trainer.job_status) builds a `ProgressDocument` whenever a trial starts or
ends and at every evaluation, and writes it to the job's storage and, on Kubernetes, into the
job's progress ConfigMap (kube_progress); the operator (finetune_operator.progress) parses it back
into this model and mirrors it into `FineTuneJob.status` (status_mapping). Keys are camelCase like
the status they feed.

Unlike the FineTuneJob spec, this is data from another program, possibly of another version:
unknown fields are ignored (a newer trainer may add some), and `version` says which shape was
written. Version 1 is the shape written before the field existed, so a document without it is
read as version 1. A change an older reader would misread gets a new version number, not a new
meaning for an old field.

`TrialCounts` and `TrialSummary` are also the operator's `status.trials` and `status.bestTrial`
(finetune_operator.status_model): the status mirrors them as they are, so they are defined once,
here, and their descriptions reach the CRD's status schema.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

STATUS_FILE = "status.json"  # the document's name: next to the job's runs in storage, and its ConfigMap key
PROGRESS_VERSION = 1  # the shape this module writes; a document without `version` is a version 1 one

# `state`: what the driver is doing. `invalid` is not progress but a verdict: the trainer's
# preflight inside the Ray cluster rejected the spec (`problems` names the fields).
State = Literal["running", "finished", "failed", "invalid"]
RUNNING: Final = "running"
FINISHED: Final = "finished"
FAILED: Final = "failed"
INVALID: Final = "invalid"
# what each started trial is doing, as the driver counts them into `TrialCounts`
TRIAL_STATES = ("running", "waiting", "completed", "stopped", "failed")


class _Document(BaseModel):
    # extra="ignore": written by the trainer, maybe a newer one; what this reader does not know it skips
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class TrialCounts(_Document):
    total: int = Field(default=0, ge=0, description="Trials the search runs.")
    completed: int = Field(default=0, ge=0, description="Trials that trained to the end.")
    running: int = Field(default=0, ge=0, description="Trials training now.")
    waiting: int = Field(default=0, ge=0, description="Trials started but not training now: paused at a rung until the others reach it, or waiting for a training slot (successiveHalving).")
    stopped: int = Field(default=0, ge=0, description="Trials early stopping ended (asha, successiveHalving, median).")
    failed: int = Field(default=0, ge=0, description="Trials that raised an error.")

    @classmethod
    def of(cls, trials: dict[str, str], total: int) -> TrialCounts:
        """Counts from `trial -> running / waiting / completed / stopped / failed`."""
        states = list(trials.values())
        return cls(total=total, **{state: states.count(state) for state in TRIAL_STATES})

    def done_text(self) -> str:
        """`3/6`: finished trials (completed, stopped or failed) of all, for the printer column."""
        return f"{self.completed + self.stopped + self.failed}/{self.total}"


class TrialSummary(_Document):
    # a trial as `status.bestTrial` shows it (no docstring: the status field's description stands in the CRD)
    name: str = Field(description="Ray Tune trial id.")
    metric: str = Field(description="The metric that ranks trials, e.g. accuracy.")
    value: float = Field(description="Its best value in this trial.")
    strategy: str | None = Field(
        default=None, description="The trial's freezing strategy and its size, e.g. `lora r=16`, `freezeBottom 6`, `featureExtraction`.",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="The trial's sampled settings (free-form).")
    checkpoint: str | None = Field(default=None, description="URI of the trial's best checkpoint.")


class BestTrial(TrialSummary):
    """The best trial so far; a single run is its own trial. `step`: where its best value was seen."""

    step: int | None = None


class CheckpointRef(_Document):
    # a checkpoint as `status.lastCheckpoint` shows it (descriptions reach the CRD's status schema)
    uri: str = Field(description="URI of the checkpoint directory (s3://... or a folder).")
    step: int | None = Field(default=None, description="The optimizer step it holds.")
    time: datetime | None = Field(default=None, description="When it was made complete (its marker written).")
    trial: str | None = Field(default=None, description="The search trial it belongs to; empty for a single run.")


class Skipped(_Document):
    checkpoint: str  # URI of a checkpoint not resumed from
    reason: str  # why: no marker, a hash that does not match, state that does not load


class Resume(_Document):
    """One resume: a new attempt of the job, a worker-group restart, or an explicit resume point.
    The operator posts an Event for each one it has not seen (by `time`)."""

    checkpoint: str
    step: int | None = None
    time: datetime
    trial: str | None = None
    attempt: int | None = None
    source: str | None = None  # restart: Ray Train restarted the worker group; resume: the run started from it
    skipped: list[Skipped] = Field(default_factory=list)


# What the status keeps of generated samples (spec.evaluation.samples) and the forgetting probe
# (spec.evaluation.reference): bounded whatever the trainer writes, since the status lives in etcd
# and is read by every `kubectl get -o yaml`. results.json has them all, untruncated.
STATUS_TRIALS = 8  # trials with samples / forgetting shown: the ones that evaluated last
STATUS_SAMPLES = 3  # samples shown per trial: the first prompts
SAMPLE_CHARS = 240  # of a prompt (its end: where a chat prompt asks) and of a completion (its start)


class GeneratedSample(_Document):
    prompt: str = Field(description="The prompt as the model saw it (chat template included), its last characters.")
    completion: str = Field(description="What the model wrote, its first characters.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_end(cls, value: Any) -> Any:
        return "…" + value[-SAMPLE_CHARS:] if isinstance(value, str) and len(value) > SAMPLE_CHARS else value

    @field_validator("completion", mode="before")
    @classmethod
    def _completion_start(cls, value: Any) -> Any:
        return value[:SAMPLE_CHARS] + "…" if isinstance(value, str) and len(value) > SAMPLE_CHARS else value


class TrialSamples(_Document):
    # a trial's latest samples as `status.samples` shows them (descriptions reach the CRD's status schema)
    trial: str | None = Field(default=None, description="The search trial; empty for a single run.")
    step: int | None = Field(default=None, description="The optimizer step generated at (0: the baseline).")
    samples: list[GeneratedSample] = Field(default_factory=list, description="The first few held-out prompts and what the model wrote.")

    @field_validator("samples", mode="before")
    @classmethod
    def _first_few(cls, value: Any) -> Any:
        return value[:STATUS_SAMPLES] if isinstance(value, list) else value


class Forgetting(_Document):
    # a trial's forgetting probe as `status.forgetting` shows it
    trial: str | None = Field(default=None, description="The search trial; empty for a single run.")
    baseline: float | None = Field(default=None, description="Perplexity on the reference text before fine-tuning.")
    latest: float | None = Field(default=None, description="Perplexity on it at the latest evaluation (empty: not a finite number).")
    step: int | None = Field(default=None, description="The step of the latest evaluation.")
    change: float | None = Field(default=None, description="latest / baseline - 1: 0.29 is 29% worse on general text.")


def _latest_trials(value: Any) -> Any:
    return value[-STATUS_TRIALS:] if isinstance(value, list) else value


class Problem(_Document):
    path: str = Field(min_length=1)  # the spec field, e.g. spec.freezing.layers
    message: str = Field(min_length=1)  # what is wrong and how to fix it


class ProgressDocument(_Document):
    """One status.json. `trials`, `step` and the best are progress (states running, finished,
    failed); `problems` is the verdict of state `invalid`, which carries no progress."""

    version: int = Field(default=PROGRESS_VERSION, ge=1)
    job: str
    run: str | None = None
    updated: datetime
    state: State
    kind: str  # single or search
    trials: TrialCounts | None = None
    step: int | None = None
    total_steps: int | None = None
    best_trial: BestTrial | None = None
    best_checkpoint: str | None = None
    model: str | None = None
    attempt: int | None = Field(default=None, ge=1)  # 1 for the run's first attempt; +1 per KubeRay retry or new RayJob
    restarts: int | None = Field(default=None, ge=0)  # earlier attempts plus worker-group restarts in this one
    last_checkpoint: CheckpointRef | None = None
    resumes: list[Resume] = Field(default_factory=list)  # the newest few, oldest first
    non_finite_loss: int | None = None  # the step a non-finite loss ended the run at (spec.training.nonFiniteLoss: stop)
    samples: list[TrialSamples] = Field(default_factory=list)  # each trial's latest generated samples, truncated
    forgetting: list[Forgetting] = Field(default_factory=list)  # each trial's reference perplexity, baseline -> latest
    problems: list[Problem] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, data: Any) -> Any:
        """NaN and infinities become null, and a best trial whose value is not a number is no best
        trial: the trainer's JSON may carry them (a diverged run), and a status patch with them is
        not JSON the API server accepts, so every later write would fail."""
        if not isinstance(data, dict):
            return data
        best = data.get("bestTrial", data.get("best_trial"))
        if isinstance(best, dict) and isinstance(best.get("value"), float) and not math.isfinite(best["value"]):
            data = {k: v for k, v in data.items() if k not in {"bestTrial", "best_trial"}}
        return finite_only(data)

    _bounded = field_validator("samples", "forgetting", mode="before")(_latest_trials)

    @field_validator("problems", mode="before")
    @classmethod
    def _named_problems(cls, value: Any) -> Any:
        """Entries that name no field and say nothing are dropped, not a reason to lose the rest."""
        if not isinstance(value, list):
            return value
        return [p for p in value if isinstance(p, Problem) or (isinstance(p, dict) and p.get("path") and p.get("message"))]

    @classmethod
    def read(cls, data: str | bytes | dict[str, Any]) -> ProgressDocument | None:
        """The document in `data` (JSON text or its parsed object); None when it is not one."""
        try:
            if isinstance(data, dict):
                return cls.model_validate(data)
            return cls.model_validate_json(data)
        except ValidationError:
            return None

    def as_dict(self) -> dict[str, Any]:
        """The JSON object written to status.json (camelCase; fields without a value left out)."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)


def finite_only(value: Any) -> Any:
    """`value` with every NaN or infinite float (at any depth) replaced by None: what strict JSON
    readers (the API server, jq, browsers) accept, where Python's json writes NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_only(v) for v in value]
    return value
