"""Everything that can be checked before Ray starts: sources exist, the data fits the spec, and
the freezing plan fits the model. Runs in seconds; builds the model on the meta device (no weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .adapters import plan_on_skeleton
from .data import DataError, PreparedData, prepare
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
from .reference import prepare_reference
from .sources import SourceError
from .spec import FineTuneJob, SpecError
from .spec.search import dropped_params, search_combinations, trial_spec

if TYPE_CHECKING:
    from .ingest import Ingested


@dataclass
class Prepared:
    job: FineTuneJob
    model_dir: str
    tokenizer: Any
    data: PreparedData
    plan: FreezePlan
    model_class: str
    ingested: Ingested | None = None  # the Ray Data splits (ingest.py): the session reads them once Ray is up

    def data_stats(self) -> dict[str, Any]:
        """results.json's `data` section: the ingest's figures (the data checks' counts on the splits
        the workers trained and scored on, rows and tokens, seconds spent tokenizing each split in
        Ray Data's tasks); the preflight's before the ingest has run."""
        return dict(self.ingested.stats if self.ingested is not None else self.data.stats)


def prepare_job(job: FineTuneJob, *, world_size: int | None = None, data_warnings: bool = True) -> Prepared:
    """Resolve, read and tokenize; raise SpecError naming the field when something does not fit.
    `data_warnings`: log the data checks' warnings here (`finetune validate`); a run logs them once
    its ingest has counted the splits it trains on (session.py)."""
    spec = job.spec
    offline_if_local(spec.model.source)
    try:
        model_dir = resolve_model_dir(spec.model)
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
        data = prepare(spec.data, spec.model.task, tokenizer, spec.training.seed, spec.model.num_labels, warn=data_warnings)
        data.reference = prepare_reference(job, tokenizer)  # the forgetting probe's text, once for every worker
    except DataError as err:
        path, _, message = str(err).partition(": ")
        raise SpecError([(path, message or str(err))]) from None
    missing = bitsandbytes_missing(spec.model)
    if missing:
        raise SpecError([("spec.model.quantization", missing)])
    skeleton = model_skeleton(model_dir, spec.model, num_labels=len(data.label_names) if data.label_names else None)
    names = [n for n, _ in skeleton.named_parameters()]
    t = spec.training
    workers = world_size or spec.resources.workers
    per_epoch = t.steps_per_epoch(len(data.train), workers)
    unmappable: str | None
    try:
        layer_map = discover(skeleton)
    except UnmappableModel as err:
        layer_map, unmappable = None, str(err)
    else:
        unmappable = None

    def plan_for(freezing) -> FreezePlan:
        if freezing.strategy == "lora":  # PEFT on a copy of the skeleton: targets, layers and rank fit the model
            return plan_on_skeleton(skeleton, freezing.lora_settings(), spec.model.task, model_name=type(skeleton).__name__)
        if unmappable and needs_layers(freezing):
            raise SpecError([("spec.freezing.strategy", unmappable)])
        return plan_freezing(freezing, names, layer_map, steps_per_epoch=per_epoch, model_name=type(skeleton).__name__)

    plan = plan_for(spec.freezing)
    if spec.search is not None:
        _check_trial_plans(job, plan_for)
    return Prepared(job, model_dir, tokenizer, data, plan, type(skeleton).__name__)


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
