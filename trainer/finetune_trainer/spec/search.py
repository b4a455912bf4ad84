"""`spec.search`: a Ray Tune search over the spec itself — freezing, LR schedule, optimiser.

The space maps spec paths (as `--set` writes them: `freezing.strategy`, `training.learningRate`)
to distributions. A trial's spec is the base spec with the sampled values written in, so one
pydantic model validates a plain run and every trial alike. Strategy- or schedule-specific fields
a trial's choice does not read (`freezing.layers` when the trial draws `gradual`) are dropped for
that trial rather than making the combination invalid: that is what lets one space mix strategies.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from .base import SpecModel
from .limits import INT32_MAX
from .training import MAXIMIZED, Metric

Problems = Iterator[tuple[str, str]]

# Sections a trial may vary. model/data/resources/output/evaluation fix what is compared and
# where it runs; they stay the same for every trial.
SEARCHABLE = ("training", "freezing", "lrSchedule", "deepspeed")
NOT_SEARCHABLE = {
    "training.seed": "the seed also fixes the data split, so trials would not be compared on the same data",
}
# Above this many combinations, a seeded sample of them is checked before the search starts.
MAX_CHECKED_COMBINATIONS = 512
# Integer ranges up to this size are checked (and gridded) value by value.
MAX_ENUMERATED_INTS = 64
# Values one choice or grid may list: a longer list is a range written out (use randint/uniform).
MAX_DISCRETE_VALUES = 1000
# Trials one search may run; also the most combinations an `algorithm: grid` search may have.
MAX_TRIALS = 10000
MAX_CONCURRENT_TRIALS = 1024
MAX_SECONDS = 366 * 24 * 3600  # budget times: a year (Tune's clock arithmetic overflows far above)


KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class Distribution(SpecModel):
    """Exactly one of the keys. Bounds are inclusive."""

    choice: list[Any] | None = Field(
        default=None, min_length=1, max_length=MAX_DISCRETE_VALUES, description="Pick one of these values (strings, numbers or booleans).",
        json_schema_extra={"items": {"x-kubernetes-preserve-unknown-fields": True}},
    )
    grid: list[Any] | None = Field(
        default=None, min_length=1, max_length=MAX_DISCRETE_VALUES,
        description="Every one of these values, each with numTrials / (grid size) sampled trials (Ray Tune's grid_search): "
        "so every freezing strategy gets its trials, whatever the sampler draws for the rest.",
        json_schema_extra={"items": {"x-kubernetes-preserve-unknown-fields": True}},
    )
    uniform: list[float] | None = Field(default=None, min_length=2, max_length=2, description="[low, high]: uniform.")
    loguniform: list[float] | None = Field(
        default=None, min_length=2, max_length=2, description="[low, high]: uniform in log space (learning rates).",
    )
    randint: list[int] | None = Field(default=None, min_length=2, max_length=2, description="[low, high]: an integer, both ends included.")

    @property
    def kind(self) -> str:
        return next((k for k in KINDS if getattr(self, k) is not None), "")  # "": none given, which check() reports

    def check(self) -> Problems:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            yield "", f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})"
            return
        kind = given[0]
        if kind in ("choice", "grid"):
            for i, value in enumerate(getattr(self, kind) or []):
                if isinstance(value, dict | list):
                    yield f"{kind}[{i}]", "values are single values (string, number or boolean)"
            return
        low, high = getattr(self, kind)
        if not low < high and not (kind == "randint" and low == high):
            yield kind, f"low ({low}) must be below high ({high})"
        if kind == "loguniform" and low <= 0:
            yield kind, f"loguniform needs a positive low bound (got {low})"

    def candidates(self) -> list[Any]:
        """Values the distribution can produce that the field rules are checked against: every
        choice and every small integer range; the two bounds of a continuous range (field limits
        are intervals, so an interval inside them is valid when both ends are)."""
        kind = self.kind
        if kind in ("choice", "grid"):
            return list(getattr(self, kind) or [])
        low, high = getattr(self, kind)
        if kind == "randint" and high - low < MAX_ENUMERATED_INTS:
            return list(range(low, high + 1))
        return [low, high]

    def size(self) -> int | None:
        """How many values a discrete distribution has (counted, never listed: a randint may span
        billions); None for continuous ones."""
        if self.kind in ("choice", "grid"):
            return len(getattr(self, self.kind) or [])
        if self.kind == "randint":
            low, high = self.randint or (0, 0)
            return max(0, high - low + 1)
        return None

    def grid_values(self) -> list[Any] | None:
        """All values, when the distribution is discrete; None for continuous ones. Only for a
        space whose size check() has bounded (SearchSpec.check: at most MAX_TRIALS combinations)."""
        if self.kind in ("choice", "grid"):
            return list(getattr(self, self.kind) or [])
        if self.kind == "randint":
            low, high = self.randint or (0, 0)
            return list(range(low, high + 1))
        return None


class SchedulerSpec(SpecModel):
    type: Literal["asha", "successiveHalving", "median", "none"] = Field(
        default="asha",
        description="asha: asynchronous successive halving, a trial reaching a rung goes on only if it is in the top 1/reductionFactor of those that reached it before; "
                    "successiveHalving: every trial waits, paused, at each rung until all have reached it, then only the top 1/reductionFactor resume from their checkpoint "
                    "(the same decisions whatever order trials run in; trials wait for the slowest at each rung; random or grid only); "
                    "median: stops a trial below the median of the others at the same step; none: every trial runs its budget.",
    )
    grace_period: int | None = Field(default=None, ge=1, le=INT32_MAX, description="Optimizer steps every trial gets before it can be stopped (default: evaluation.everySteps).")
    reduction_factor: float = Field(default=3, gt=1, le=1000, description="asha, successiveHalving: only the top 1/reductionFactor of trials go on at each rung.")
    max_steps: int | None = Field(default=None, ge=1, le=INT32_MAX, description="asha, successiveHalving: the longest a trial can run (default: the trial's own step count).")


class BudgetSpec(SpecModel):
    trial_steps: int | None = Field(default=None, ge=1, le=INT32_MAX, description="Optimizer steps per trial (sets training.maxSteps for every trial).")
    trial_seconds: float | None = Field(default=None, gt=0, le=MAX_SECONDS, description="Stop any trial that has trained this long.")
    total_seconds: float | None = Field(default=None, gt=0, le=MAX_SECONDS, description="Start no new trial after this long; running ones finish their current step.")


class SearchSpec(SpecModel):
    algorithm: Literal["random", "grid", "tpe"] = Field(
        default="random", description="random: independent samples; grid: every combination of discrete values; tpe: Optuna's Tree-structured Parzen Estimator, learns from finished trials.",
    )
    num_trials: int | None = Field(
        default=None, ge=1, le=MAX_TRIALS,
        description="Trials to run (random/tpe; default 8, or the smallest multiple of the grid values' count above it). grid runs every combination once.",
    )
    max_concurrent_trials: int = Field(default=1, ge=1, le=MAX_CONCURRENT_TRIALS, description="Trials running at once; capped to what the Ray cluster can hold.")
    metric: Metric | None = Field(default=None, description="What picks the best trial (default: evaluation.metric).")
    mode: Literal["min", "max"] | None = Field(default=None, description="Default: max for accuracy/f1, min otherwise.")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="Seeds the sampler, and the order a grid runs in (default: training.seed).")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    space: dict[str, Distribution] = Field(min_length=1, description="Spec path (e.g. freezing.strategy) to distribution.")

    def resolved_metric(self, evaluation_metric: str) -> str:
        return self.metric or evaluation_metric

    def resolved_mode(self, evaluation_metric: str) -> str:
        return self.mode or ("max" if self.resolved_metric(evaluation_metric) in MAXIMIZED else "min")

    def grid_size(self) -> int:
        return math.prod(d.size() or 0 for d in self.space.values())

    def grid_points(self) -> int:
        """Combinations of the `grid:` dimensions (1 when there are none)."""
        return math.prod(d.size() or 0 for d in self.space.values() if d.kind == "grid")

    def resolved_num_trials(self) -> int:
        if self.algorithm == "grid":
            return self.grid_size()
        points = self.grid_points()
        return self.num_trials or points * math.ceil(8 / points)

    def fixed_params(self) -> dict[str, Any]:
        """What every trial gets besides its sampled values: the step budget, and the search metric
        as the trial's evaluation metric, so its checkpoints, early stopping and exported model
        follow what the search ranks by."""
        fixed: dict[str, Any] = {"training.maxSteps": self.budget.trial_steps} if self.budget.trial_steps else {}
        if self.metric:
            fixed |= {"evaluation.metric": self.metric, "evaluation.mode": self.mode}
        return fixed

    def check(self) -> Problems:
        for path, dist in self.space.items():
            for where, message in dist.check():
                yield f"space.{path}{'.' + where if where else ''}", message
        if self.algorithm == "grid":
            continuous = [p for p, d in self.space.items() if d.size() is None]
            for path in continuous:
                yield f"space.{path}", "grid needs discrete values: use choice (or randint), or algorithm: random/tpe"
            size = self.grid_size()
            if not continuous and size > MAX_TRIALS:
                yield "space", (f"grid runs every combination once: {size} combinations, over the {MAX_TRIALS} trials "
                                "a search may run; narrow the values, or use algorithm: random or tpe with numTrials")
            elif not continuous and self.num_trials is not None and self.num_trials != size:
                yield "numTrials", f"grid runs every combination once ({size}); leave numTrials out"
        elif self.grid_points() > MAX_TRIALS:
            yield "space", (f"the grid: dimensions make {self.grid_points()} combinations, each run at least once: over the "
                            f"{MAX_TRIALS} trials a search may run; use choice for some of them")
        gridded = [p for p, d in self.space.items() if d.kind == "grid"]
        if gridded and self.algorithm == "tpe":
            yield f"space.{gridded[0]}", "tpe samples every dimension itself: use choice here (or algorithm: random)"
        elif gridded and self.algorithm == "random" and self.num_trials and self.grid_points() <= MAX_TRIALS and self.num_trials % self.grid_points():
            yield "numTrials", f"must be a multiple of {self.grid_points()} (the combinations of the grid: values), so each gets the same number of trials"
        sched = self.scheduler
        if sched.type == "none" and sched.grace_period is not None:
            yield "scheduler.gracePeriod", "only used by scheduler type asha, successiveHalving or median"
        if sched.type not in ("asha", "successiveHalving") and sched.max_steps is not None:
            yield "scheduler.maxSteps", "only used by scheduler type asha or successiveHalving"
        if sched.type == "successiveHalving" and self.algorithm == "tpe":
            yield "scheduler.type", ("successiveHalving compares every trial at each rung, so all of them are drawn before the first rung, "
                                     "and tpe learns from finished trials: use asha with tpe, or algorithm: random")
        if sched.max_steps and sched.grace_period and sched.grace_period > sched.max_steps:
            yield "scheduler.gracePeriod", f"larger than scheduler.maxSteps ({sched.max_steps}): no trial could be stopped"
        if "training.maxSteps" in self.space and self.budget.trial_steps:
            yield "budget.trialSteps", "training.maxSteps is searched; drop one of them"


def space_problems(search: SearchSpec, base: BaseModel) -> list[tuple[str, str]]:
    """Every path exists and is searchable; every candidate value is valid for its field; every
    combination (or a seeded sample, for large spaces) makes a valid trial spec."""
    found: list[tuple[str, str]] = []
    for path in search.space:
        where = f"spec.search.space.{path}"
        bad_path = _path_problem(type(base), path)
        if bad_path:
            found.append((where, bad_path))
            continue
        found += [(where, message) for message in _candidate_problems(base, path, search.space[path].candidates())]
    if found:
        return found
    seen: set[str] = set()  # the field a combination breaks: one example each, not one per combination
    for sampled in search_combinations(search):
        params = {**search.fixed_params(), **sampled}
        problem: tuple[str, str] | None
        try:
            spec = trial_spec(base, params)
        except ValidationError as err:
            message = _first_message(err)
            field, problem = message.partition(":")[0], ("spec.search.space", f"{_fmt(params)}: {message}")
        else:
            issues = spec.problems()
            field = issues[0][0] if issues else ""
            problem = ("spec.search.space", f"{_fmt(params)}: {issues[0][0]}: {issues[0][1]}") if issues else None
        if problem and field not in seen:
            seen.add(field)
            found.append(problem)
    return found


def _candidate_problems(base: BaseModel, path: str, values: list[Any]) -> Iterator[str]:
    """Each value against its field's own rules: the one section it lives in, validated with the
    value written in (a section is a few fields, so this is linear in the values, where the whole
    spec per value took minutes for 100,000 of them). Combinations are checked after, sampled."""
    section, field = path.split(".", 1)
    part = getattr(base, {"lrSchedule": "lr_schedule"}.get(section, section))
    document = part.model_dump(by_alias=True, mode="json", exclude_unset=True)
    tried: set[tuple[type, Any]] = set()
    for value in values:
        key = (type(value), value if isinstance(value, str | int | float | None) else repr(value))
        if key in tried:  # the type too: 1 and True are equal, and not the same value here
            continue
        tried.add(key)
        try:
            type(part).model_validate({**document, field: _plain(value)}, by_alias=True, by_name=False)
        except ValidationError as err:
            yield f"{value!r} is not valid here: {err.errors()[0]['msg']}"


def _plain(value: Any) -> Any:
    """A sampled value as the manifest would hold it: Tune's randint and uniform hand out numpy
    scalars, which the spec's strict types (no coercion, as the CRD) would refuse."""
    return value.item() if type(value).__module__ == "numpy" and hasattr(value, "item") else value


def trial_spec(base: BaseModel, params: dict[str, Any]) -> Any:
    """The base spec with a trial's values written in and, per section, the fields that the
    trial's strategy / schedule type do not read removed. Raises pydantic's ValidationError."""
    document = base.model_dump(by_alias=True, mode="json", exclude_unset=True)
    document.pop("search", None)
    document = copy.deepcopy(document)
    for path, value in params.items():
        node = document
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = _plain(value)
    spec = type(base).model_validate(document, by_alias=True, by_name=False)
    for section in ("freezing", "lr_schedule"):
        part = getattr(spec, section)
        unused = part.unused_fields()
        if unused:
            cleaned = part.model_dump(exclude=set(unused), exclude_unset=True, by_alias=True)
            setattr(spec, section, type(part).model_validate(cleaned))
    return spec


def dropped_params(spec: Any, params: dict[str, Any]) -> list[str]:
    """Searched paths a trial's spec does not use (shown as n/a in the results table)."""
    dropped = []
    for path in params:
        section, _, field = path.partition(".")
        attr = {"lrSchedule": "lr_schedule"}.get(section, section)
        part = getattr(spec, attr, None)
        if part is not None and field and getattr(part, _snake(field), None) in (None, []):
            dropped.append(path)
    return dropped


def search_combinations(search: SearchSpec) -> Iterator[dict[str, Any]]:
    paths = list(search.space)
    values = [search.space[p].candidates() for p in paths]
    total = math.prod(len(v) for v in values)
    if total <= MAX_CHECKED_COMBINATIONS:
        for combo in itertools.product(*values):
            yield dict(zip(paths, combo, strict=True))
        return
    rng = random.Random(search.seed or 0)
    for _ in range(MAX_CHECKED_COMBINATIONS):
        yield {p: rng.choice(v) for p, v in zip(paths, values, strict=True)}


def grid_order(search: SearchSpec, seed: int) -> list[dict[str, Any]]:
    """Every combination of an `algorithm: grid` search once, in an order shuffled by `seed`.

    Why shuffled: ASHA and the median rule judge a trial only against the trials that reached the
    same step before it, and the first few meet empty rungs. Values are usually written weakest
    first (learning rates ascending), and in that order every trial beats what came before it, so
    early stopping saves little: bench/search_efficiency.py measured 0.61 of the grid's
    trial-steps in the written order against 0.19 in another. A seeded shuffle makes the written
    order irrelevant and the search repeatable. Tune's grid_search runs combinations in the order
    written and has no shuffle, so the combinations are expanded here and given to Tune's
    BasicVariantGenerator as points_to_evaluate."""
    paths = list(search.space)
    values = [search.space[p].grid_values() or [] for p in paths]
    combos = [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*values)]
    random.Random(seed).shuffle(combos)
    return combos


def _path_problem(model: type[BaseModel], path: str) -> str | None:
    keys = path.split(".")
    if path in NOT_SEARCHABLE:
        return f"cannot be searched: {NOT_SEARCHABLE[path]}"
    if keys[0] not in SEARCHABLE:
        return f"cannot be searched; search varies {', '.join(SEARCHABLE)} (model, data, resources and evaluation stay the same in every trial)"
    current: Any = model
    for i, key in enumerate(keys):
        fields = {f.alias or name: f for name, f in current.model_fields.items()}
        if key not in fields:
            known = ", ".join(sorted(fields))
            return f"{'.'.join(keys[: i + 1])} is not a field of the spec; {'.'.join(keys[:i]) or 'spec'} has: {known}"
        annotation = fields[key].annotation
        nested = _model_in(annotation)
        if i < len(keys) - 1 and nested is None:
            return f"{'.'.join(keys[: i + 1])} is a value, not a section"
        if i == len(keys) - 1 and nested is not None:
            return f"{path} is a section; search one of its fields, e.g. {path}.{next(iter(nested.model_fields.values())).alias}"
        current = nested
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _first_message(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in {"int", "float", "str", "bool"})))
    return f"{loc}: {e['msg']}" if loc else e["msg"]


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)
