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

from pydantic import BaseModel, Field

from .base import SpecModel
from .limits import INT32_MAX
from .training import MAXIMIZED, FreezingSpec, LRScheduleSpec, Metric

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

    def grid_trials(self) -> list[dict[str, Any]]:
        """Every distinct trial of an `algorithm: grid` search, in the order written: the product
        of the values, less the combinations that differ only in values their own strategy or
        schedule type does not read (trial_spec drops those). So `freezing.strategy: [freezeBottom,
        lora]` x `freezing.lora.r: [4, 8]` is three trials (freezeBottom, lora r=4, lora r=8), not
        a freezeBottom trial twice. Only for a space check() has bounded (at most MAX_TRIALS)."""
        paths = list(self.space)
        values = [self.space[p].grid_values() or [] for p in paths]
        unread: dict[tuple[Any, ...], set[str]] = {}  # per section's values: a few sections, many combinations
        seen: set[tuple[Any, ...]] = set()
        trials = []
        for combo in itertools.product(*values):
            params = dict(zip(paths, combo, strict=True))
            dropped = _unread_paths(params, unread)
            key = tuple((p, type(v).__name__, repr(v)) for p, v in params.items() if p not in dropped)
            if key not in seen:
                seen.add(key)
                trials.append(params)
        return trials

    def resolved_num_trials(self) -> int:
        if self.algorithm == "grid":
            size = self.grid_size()
            return len(self.grid_trials()) if size <= MAX_TRIALS else size
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
            elif not continuous and self.num_trials is not None and self.num_trials != self.resolved_num_trials():
                yield "numTrials", f"grid runs every combination once ({self.resolved_num_trials()}); leave numTrials out"
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


def plain_value(value: Any) -> Any:
    """A sampled value as the manifest would hold it: Tune's randint and uniform hand out numpy
    scalars, which the spec's strict types (no coercion, as the CRD) would refuse."""
    return value.item() if type(value).__module__ == "numpy" and hasattr(value, "item") else value


def attribute_of(model: type[BaseModel], key: str) -> str:
    """The attribute a manifest key (camelCase alias, as paths are written) names in `model`."""
    return next((name for name, f in model.model_fields.items() if key in (f.alias, name)), key)


def trial_spec(base: BaseModel, params: dict[str, Any]) -> Any:
    """The base spec with a trial's values written in and, per section, the fields that the
    trial's strategy / schedule type do not read removed. Raises pydantic's ValidationError."""
    document = base.model_dump(by_alias=True, mode="json", exclude_unset=True)
    document.pop("search", None)
    document = copy.deepcopy(document)
    for path, value in params.items():
        node = document
        keys = path.split(".")
        for key in keys[:-1]:  # a nested path (freezing.lora.r) makes its subsection if the base has none
            node[key] = node[key] if isinstance(node.get(key), dict) else {}
            node = node[key]
        node[keys[-1]] = plain_value(value)
    spec = type(base).model_validate(document, by_alias=True, by_name=False)
    for section in ("freezing", "lr_schedule"):
        part = getattr(spec, section)
        unused = part.unused_fields()
        if unused:
            cleaned = part.model_dump(exclude=set(unused), exclude_unset=True, by_alias=True)
            setattr(spec, section, type(part).model_validate(cleaned))
    return spec


def dropped_params(spec: Any, params: dict[str, Any]) -> list[str]:
    """Searched paths a trial's spec does not use (shown as n/a in the results table): trial_spec
    removed them, so the trial's spec no longer holds the sampled value there (nested paths such as
    freezing.lora.r included: a freezeBottom trial has no lora section)."""
    dropped = []
    for path, value in params.items():
        node: Any = spec
        for key in path.split("."):
            node = getattr(node, attribute_of(type(node), key), None) if isinstance(node, BaseModel) else None
        if node in (None, []) or node != plain_value(value):
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
    combos = search.grid_trials()
    random.Random(seed).shuffle(combos)
    return combos


# the field of each section that decides which of the section's other fields a trial reads
_SELECTORS: dict[str, tuple[str, type[FreezingSpec] | type[LRScheduleSpec]]] = {
    "freezing": ("strategy", FreezingSpec), "lrSchedule": ("type", LRScheduleSpec),
}


def _unread_paths(params: dict[str, Any], cache: dict[tuple[Any, ...], set[str]]) -> set[str]:
    """The paths of `params` that their section's strategy / schedule type, as drawn in `params`,
    does not read (FreezingSpec / LRScheduleSpec.unused_fields, the rule trial_spec applies). A
    section whose selector is not searched drops nothing here: its fields are read by the base's
    strategy, or by no trial at all, the same in every combination."""
    dropped: set[str] = set()
    for section, (selector, model) in _SELECTORS.items():
        if f"{section}.{selector}" not in params:
            continue
        mine = {p: v for p, v in params.items() if p.startswith(f"{section}.")}
        key = tuple((p, repr(v)) for p, v in mine.items())
        if key not in cache:
            document: dict[str, Any] = {}
            for path, value in mine.items():
                node = document
                keys = path.split(".")[1:]
                for name in keys[:-1]:
                    node = node.setdefault(name, {})
                node[keys[-1]] = plain_value(value)
            try:
                unused = set(model.model_validate(document, by_alias=True, by_name=False).unused_fields())
            except ValueError:  # an invalid combination: space_problems names it; nothing to merge here
                unused = set()
            cache[key] = {p for p in mine if attribute_of(model, p.split(".")[1]) in unused}
        dropped |= cache[key]
    return dropped
