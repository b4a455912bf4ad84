"""Everything that can be checked before Ray starts: sources exist, the first rows of the data fit
the spec (data_sample.py), and the freezing plan fits the model. Runs in seconds whatever the
data's size; builds the model on the meta device (no weights). What needs the whole data (its
counts, classes and the steps an epoch takes) comes from the ingest once Ray is up:
`Prepared.take_ingest`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .adapters import plan_on_skeleton
from .data import DataError
from .data_sample import Sample
from .data_sample import check as check_sample
from .freezing import FreezePlan, needs_layers, plan_freezing
from .layers import UnmappableModel, discover
from .modeling import (
    bitsandbytes_missing,
    load_tokenizer,
    model_type,
    offline_if_local,
    resolve_model_dir,
    speed_option_problems,
)
from .modeling import skeleton as model_skeleton
from .packing import family_problem
from .reference import check_reference
from .sources import SourceError
from .spec import FineTuneJob, FreezingSpec, SpecError
from .spec.search import dropped_params, search_combinations, trial_spec

if TYPE_CHECKING:
    import ray.data

    from .ingest import Ingested

PlanFor = Callable[[FreezingSpec, int], FreezePlan]  # (freezing section, steps per epoch) -> its plan on this model


@dataclass
class Prepared:
    job: FineTuneJob
    model_dir: str
    tokenizer: Any
    sample: Sample  # the first rows of each file, tokenized (data_sample.py)
    plan: FreezePlan  # the preflight's check of spec.freezing; take_ingest replans it with the real epoch length
    model_class: str
    plan_for: PlanFor
    ingested: Ingested | None = None  # the Ray Data splits (ingest.py): the session reads them once Ray is up
    reference: ray.data.Dataset | None = None  # spec.evaluation.reference's text, tokenized by the ingest

    def take_ingest(self, ingested: Ingested, world_size: int) -> None:
        """The ingest's splits and figures; the freezing plan again with the epoch length they give
        (gradual unfreezing counts epochs in steps), so results.json says what the workers do."""
        self.ingested = ingested
        t = self.job.spec.training
        self.plan = self.plan_for(self.job.spec.freezing, t.steps_per_epoch(ingested.train_rows, world_size))

    @property
    def data(self) -> Ingested:
        """The ingest's result; only a session that has ingested has one."""
        assert self.ingested is not None, "the session ingests the data once Ray is up"
        return self.ingested

    def data_stats(self) -> dict[str, Any]:
        """results.json's `data` section: the ingest's figures (the data checks' counts on the splits
        the workers trained and scored on, rows and tokens, seconds spent tokenizing each split in
        Ray Data's tasks)."""
        return dict(self.data.stats)


def prepare_job(job: FineTuneJob) -> Prepared:
    """Resolve the model, check the data's first rows and the freezing plan; raise SpecError naming
    the field when something does not fit. Nothing here grows with the data's size."""
    spec = job.spec
    offline_if_local(spec.model.source)
    try:
        model_dir = resolve_model_dir(spec.model, spec.storage)
    except SourceError as err:
        raise SpecError([("spec.model.source", str(err))]) from None
    try:
        tokenizer = load_tokenizer(model_dir, spec.model)
    except (OSError, ValueError) as err:
        raise SpecError([("spec.model.source", f"cannot load a tokenizer from {model_dir}: {err}")]) from None
    if spec.data.packing and spec.model.task == "causal-lm":
        _check_packing(model_dir, job)  # before the data is tokenized: the model's config alone decides
    speed = speed_option_problems(spec.model, model_dir)  # the attention kernel the model has; flash-attn, liger-kernel installed
    if speed:
        raise SpecError([(f"spec.model.{field}", why) for field, why in speed])
    try:
        sample = check_sample(spec.data, spec.model.task, tokenizer, storage=spec.storage)
        check_reference(job, tokenizer)  # the forgetting probe's text: readable, with its column
    except DataError as err:
        raise err.as_spec_error() from None
    missing = bitsandbytes_missing(spec.model)
    if missing:
        raise SpecError([("spec.model.quantization", missing)])
    # the head's class count comes from the whole train file (the ingest); the parameter names the
    # plans read do not depend on it
    classes = spec.model.num_labels or (len(spec.data.labels) if spec.data.labels else None)
    skeleton = model_skeleton(model_dir, spec.model, num_labels=classes)
    names = [n for n, _ in skeleton.named_parameters()]
    unmappable: str | None
    try:
        layer_map = discover(skeleton)
    except UnmappableModel as err:
        layer_map, unmappable = None, str(err)
    else:
        unmappable = None

    def plan_for(freezing: FreezingSpec, per_epoch: int) -> FreezePlan:
        if freezing.strategy == "lora":  # PEFT on a copy of the skeleton: targets, layers and rank fit the model
            return plan_on_skeleton(skeleton, freezing.lora_settings(), spec.model.task, model_name=type(skeleton).__name__)
        if unmappable and needs_layers(freezing):
            raise SpecError([("spec.freezing.strategy", unmappable)])
        return plan_freezing(freezing, names, layer_map, steps_per_epoch=per_epoch, model_name=type(skeleton).__name__)

    # an epoch's length in steps is the ingest's (rows per worker); what a plan can refuse does not depend on it
    plan = plan_for(spec.freezing, 1)
    if spec.search is not None:
        _check_trial_plans(job, lambda freezing: plan_for(freezing, 1))
    return Prepared(job, model_dir, tokenizer, sample, plan, type(skeleton).__name__, plan_for)


def _check_packing(model_dir: str, job: FineTuneJob) -> None:
    """spec.data.packing only for a model type whose attention keeps packed examples apart (packing.py)."""
    try:
        kind = model_type(model_dir, job.spec.model)
    except (OSError, ValueError) as err:
        raise SpecError([("spec.model.source", f"cannot load the model's config from {model_dir}: {err}")]) from None
    problem = family_problem(kind)
    if problem:
        raise SpecError([("spec.data.packing", problem)])


def _check_trial_plans(job: FineTuneJob, plan_for) -> None:
    """Every freezing section the search can produce fits this model (e.g. freezing.layers is not
    above its layer count), so no trial fails minutes into the search for a reason known now."""
    search = job.spec.search
    assert search is not None
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for sampled in search_combinations(search):
        trial = trial_spec(job.spec, {**search.fixed_params(), **sampled})
        key = trial.freezing.model_dump_json()
        if key in seen:
            continue
        seen.add(key)
        try:
            plan_for(trial.freezing)  # a lora trial: PEFT on the skeleton, so its targets and rank fit the model
        except SpecError as err:
            dropped = dropped_params(trial, sampled)  # name the trial by what it reads, not by what it dropped
            used = {k: v for k, v in sampled.items() if k.startswith("freezing.") and k not in dropped}
            problems += [("spec.search.space", f"{', '.join(f'{k}={v!r}' for k, v in used.items())}: {path}: {msg}") for path, msg in err.problems]
    if problems:
        raise SpecError(problems)
