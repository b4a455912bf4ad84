"""spec.search: distributions, paths, values and combinations are checked before any trial runs;
the space maps onto Ray Tune's domains as declared; trials fit the cluster."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from finetune_trainer.spec import SpecError, parse_job
from finetune_trainer.spec.search import dropped_params, grid_order, trial_spec
from tests.tiny_models import minimal_manifest

SPACE = {
    "freezing.strategy": {"choice": ["none", "freezeBottom", "featureExtraction", "gradual"]},
    "freezing.layers": {"randint": [2, 6]},
    "freezing.unfreezeEvery": {"choice": [20]},
    "lrSchedule.type": {"choice": ["linear", "cosine", "constant_with_warmup", "constant"]},
    "lrSchedule.warmupRatio": {"uniform": [0.0, 0.2]},
    "training.learningRate": {"loguniform": [1e-5, 1e-3]},
}


def _job(search: dict, **sections):
    return parse_job(minimal_manifest(search=search, **sections))


def _problems(search: dict, **sections) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as err:
        _job(search, **sections)
    return err.value.problems


def test_the_issue_space_is_valid_and_mixes_strategies():
    job = _job({"space": SPACE, "numTrials": 6})
    assert job.spec.search.resolved_num_trials() == 6
    assert job.spec.search.scheduler.type == "asha"


@pytest.mark.parametrize(("space", "path", "words"), [
    ({"freezing.layerz": {"choice": [1]}}, "spec.search.space.freezing.layerz", "not a field of the spec; freezing has"),
    ({"training": {"choice": [1]}}, "spec.search.space.training", "is a section"),
    ({"training.learningRate.x": {"choice": [1]}}, "spec.search.space.training.learningRate.x", "is a value, not a section"),
    ({"model.task": {"choice": ["causal-lm"]}}, "spec.search.space.model.task", "cannot be searched"),
    ({"data.maxSeqLength": {"randint": [8, 16]}}, "spec.search.space.data.maxSeqLength", "cannot be searched"),
    ({"training.seed": {"randint": [1, 3]}}, "spec.search.space.training.seed", "data split"),
    ({"freezing.strategy": {"choice": ["none", "bogus"]}}, "spec.search.space.freezing.strategy", "'bogus' is not valid"),
    ({"training.learningRate": {"uniform": [1e-5, 2.0]}}, "spec.search.space.training.learningRate", "2.0 is not valid"),
    ({"training.learningRate": {"loguniform": [0.0, 1e-3]}}, "spec.search.space.training.learningRate.loguniform", "positive low bound"),
    ({"training.learningRate": {"uniform": [1e-3, 1e-5]}}, "spec.search.space.training.learningRate.uniform", "must be below"),
    ({"training.learningRate": {"uniform": [1e-5, 1e-3], "choice": [1e-4]}}, "spec.search.space.training.learningRate", "exactly one"),
    ({"training.learningRate": {}}, "spec.search.space.training.learningRate", "exactly one"),
    ({"freezing.strategy": {"choice": ["gradual"]}}, "spec.search.space", "gradual needs unfreezeEvery"),
    ({"lrSchedule.type": {"choice": ["polynomial"]}, "lrSchedule.lrEnd": {"choice": [0.5]}}, "spec.search.space", "must be below training.learningRate"),
])
def test_bad_spaces_fail_with_the_path_before_anything_runs(space, path, words):
    problems = _problems({"space": space})
    assert any(p == path and words in m for p, m in problems), problems


def test_grid_needs_discrete_values_and_owns_the_trial_count():
    problems = _problems({"algorithm": "grid", "space": {"training.learningRate": {"uniform": [1e-5, 1e-3]}}})
    assert problems[0][0] == "spec.search.space.training.learningRate" and "discrete" in problems[0][1]
    problems = _problems({"algorithm": "grid", "numTrials": 5, "space": {"freezing.strategy": {"choice": ["none", "featureExtraction"]}}})
    assert problems == [("spec.search.numTrials", "grid runs every combination once (2); leave numTrials out")]
    job = _job({"algorithm": "grid", "space": {"freezing.strategy": {"choice": ["none", "featureExtraction"]}, "freezing.layerLrDecay": {"choice": [0.5, 0.9, 1.0]}}})
    assert job.spec.search.resolved_num_trials() == 6


def test_grid_values_inside_a_random_search_give_every_value_its_trials():
    from ray.tune.search.variant_generator import generate_variants

    from finetune_trainer.tuning import param_space

    space = {**SPACE, "freezing.strategy": {"grid": ["none", "freezeBottom", "featureExtraction", "gradual"]}}
    job = _job({"space": space, "numTrials": 8})
    search = job.spec.search
    assert search.grid_points() == 4 and search.resolved_num_trials() == 8
    variants = [config for _, config in generate_variants(param_space(search))]  # one sample of every grid value
    assert sorted(v["freezing.strategy"] for v in variants) == sorted(space["freezing.strategy"]["grid"])
    assert _job({"space": space}).spec.search.resolved_num_trials() == 8  # default: a multiple of the grid
    assert _job({"space": {"freezing.strategy": {"grid": ["none", "gradual", "featureExtraction"]}, "freezing.unfreezeEvery": {"choice": [5]}}}).spec.search.resolved_num_trials() == 9
    problems = _problems({"space": space, "numTrials": 6})
    assert problems[0][0] == "spec.search.numTrials" and "multiple of 4" in problems[0][1]
    problems = _problems({"algorithm": "tpe", "space": space})
    assert problems[0][0] == "spec.search.space.freezing.strategy" and "use choice" in problems[0][1]


def test_search_metric_must_be_evaluated_and_mode_must_fit_it():
    problems = _problems({"metric": "perplexity", "space": SPACE})
    assert problems[0][0] == "spec.search.metric"
    problems = _problems({"metric": "accuracy", "mode": "min", "space": SPACE})
    assert problems == [("spec.search.mode", "accuracy improves when it goes up: mode must be max (or left out)")]


def test_scheduler_and_budget_rules():
    problems = _problems({"scheduler": {"type": "none", "gracePeriod": 5}, "space": SPACE})
    assert problems == [("spec.search.scheduler.gracePeriod", "only used by scheduler type asha, successiveHalving or median")]
    problems = _problems({"scheduler": {"gracePeriod": 50, "maxSteps": 10}, "space": SPACE})
    assert problems[0][0] == "spec.search.scheduler.gracePeriod"
    problems = _problems({"budget": {"trialSteps": 10}, "space": {"training.maxSteps": {"choice": [5, 10]}}})
    assert problems[0][0] == "spec.search.budget.trialSteps"
    # synchronous halving needs every trial drawn before the first rung; tpe draws from finished ones
    problems = _problems({"algorithm": "tpe", "scheduler": {"type": "successiveHalving"}, "space": SPACE})
    assert [p for p, _ in problems] == ["spec.search.scheduler.type"] and "use asha with tpe" in problems[0][1]
    assert _job({"algorithm": "random", "scheduler": {"type": "successiveHalving", "maxSteps": 20}, "space": SPACE}).spec.search.scheduler.max_steps == 20
    problems = _problems({"scheduler": {"type": "median", "maxSteps": 20}, "space": SPACE})
    assert problems == [("spec.search.scheduler.maxSteps", "only used by scheduler type asha or successiveHalving")]
    # the budget is a trial's maxSteps: a base everySteps above it is caught per trial
    problems = _problems({"budget": {"trialSteps": 10}, "space": {"freezing.strategy": {"choice": ["none"]}}}, evaluation={"everySteps": 50})
    assert "larger than training.maxSteps (10)" in problems[0][1]


def test_trial_spec_writes_values_and_drops_fields_the_choice_does_not_read():
    job = _job({"space": SPACE}, freezing={"strategy": "freezeBottom", "layers": 2}, lrSchedule={"type": "linear", "warmupRatio": 0.1})
    params = {"freezing.strategy": "gradual", "freezing.layers": 3, "freezing.unfreezeEvery": 20,
              "lrSchedule.type": "constant", "lrSchedule.warmupRatio": 0.05, "training.learningRate": 3e-4}
    spec = trial_spec(job.spec, params)
    assert spec.freezing.strategy == "gradual" and spec.freezing.layers is None and spec.freezing.unfreeze_every == 20
    assert spec.lr_schedule.type == "constant" and spec.lr_schedule.warmup_ratio is None
    assert spec.training.learning_rate == 3e-4 and spec.search is None and spec.problems() == []
    assert dropped_params(spec, params) == ["freezing.layers", "lrSchedule.warmupRatio"]
    # the base's own freezeBottom layers survive where the trial uses them
    kept = trial_spec(job.spec, {"freezing.strategy": "freezeBottom"})
    assert kept.freezing.layers == 2


def test_ranked_metric_is_the_searchs_for_a_search_and_the_evaluations_otherwise():
    assert _job({"metric": "f1", "space": SPACE}, evaluation={"metric": "loss"}).spec.ranked_metric() == ("eval_f1", "max")
    assert _job({"space": SPACE}, evaluation={"metric": "loss"}).spec.ranked_metric() == ("eval_loss", "min")
    plain = _job({"space": SPACE}, evaluation={"metric": "accuracy"}).spec.model_copy(update={"search": None})
    assert plain.ranked_metric() == ("eval_accuracy", "max")


def test_search_metric_becomes_each_trials_evaluation_metric():
    job = _job({"metric": "f1", "space": SPACE, "budget": {"trialSteps": 30}})
    spec = trial_spec(job.spec, job.spec.search.fixed_params())
    assert spec.evaluation.metric == "f1" and spec.training.max_steps == 30


def _tune_trials(search, seed: int) -> list[dict]:
    """The configs Tune's own generator makes of our param_space and searcher, in its order."""
    from ray.tune.experiment import Experiment

    from finetune_trainer.tuning import param_space, searcher

    gen = searcher(search, "eval_loss", "min", seed, 2)
    gen.add_configurations([Experiment("grid", run=lambda config: None, config=param_space(search), num_samples=search.grid_size())])
    configs = []
    while (trial := gen.next_trial()) is not None:
        configs.append(trial.config)
        gen.on_trial_complete(trial.trial_id)  # frees its slot under max_concurrent
    assert gen.is_finished()
    return configs


def test_grid_runs_every_combination_once_in_a_seeded_shuffled_order():
    space = {"freezing.strategy": {"choice": ["none", "featureExtraction", "gradual"]}, "freezing.unfreezeEvery": {"choice": [5]},
             "freezing.layerLrDecay": {"choice": [0.8, 1.0]}, "training.learningRate": {"choice": [1e-4, 1e-3]}}
    search = _job({"algorithm": "grid", "space": space}).spec.search
    configs = _tune_trials(search, seed=7)
    got = [tuple(c[p] for p in space) for c in configs]
    want = list(itertools.product(*(d["choice"] for d in space.values())))
    assert sorted(got) == sorted(want) and len(got) == search.resolved_num_trials() == 12
    # the order is grid_order's: repeatable for a seed, not the written one, another for another seed
    assert configs == grid_order(search, 7) == _tune_trials(search, seed=7)
    assert got != want and configs != grid_order(search, 8)


def test_random_domains_respect_bounds_and_randint_is_inclusive():
    from finetune_trainer.tuning import param_space

    job = _job({"space": SPACE})
    space = param_space(job.spec.search)
    rng = random.Random(0)
    samples = [{p: d.sample(random_state=rng.randint(0, 2**31)) for p, d in space.items()} for _ in range(400)]
    lrs = [s["training.learningRate"] for s in samples]
    assert all(1e-5 <= lr <= 1e-3 for lr in lrs)
    # loguniform: about half the draws below the geometric mean
    assert 0.35 < sum(lr < math.sqrt(1e-5 * 1e-3) for lr in lrs) / len(lrs) < 0.65
    assert {s["freezing.layers"] for s in samples} == {2, 3, 4, 5, 6}
    assert all(0.0 <= s["lrSchedule.warmupRatio"] <= 0.2 for s in samples)
    assert {s["freezing.strategy"] for s in samples} == set(SPACE["freezing.strategy"]["choice"])


@pytest.mark.parametrize(("workers", "cpus", "gpus", "cluster", "wanted", "fit"), [
    (1, 0.9, 0, {"CPU": 2.0}, 2, 2),
    (1, 1, 0, {"CPU": 2.0}, 2, 2),       # trial actors hold no CPU: exact fits fit
    (2, 1, 0, {"CPU": 2.0}, 2, 1),       # the example: 2-worker trials on 2 cores, one at a time
    (2, 4, 1, {"CPU": 64.0, "GPU": 4.0}, 4, 2),
    (1, 1, 0, {"CPU": 16.0}, 3, 3),
])
def test_concurrency_is_capped_to_what_the_cluster_holds(workers, cpus, gpus, cluster, wanted, fit):
    from finetune_trainer.tuning import trials_that_fit

    job = _job({"space": SPACE, "maxConcurrentTrials": wanted}, resources={"workers": workers, "cpusPerWorker": cpus, "gpusPerWorker": gpus})
    assert trials_that_fit(job, cluster) == fit


def test_a_trial_that_cannot_fit_at_all_is_a_spec_error():
    from finetune_trainer.tuning import trials_that_fit

    job = _job({"space": SPACE}, resources={"workers": 4, "cpusPerWorker": 1})
    with pytest.raises(SpecError) as err:
        trials_that_fit(job, {"CPU": 2.0})
    assert err.value.problems[0][0] == "spec.resources" and "needs 4 CPUs" in err.value.problems[0][1]


@pytest.mark.parametrize(("scheduler", "budget", "reused"), [
    ({"type": "none"}, {}, True),
    ({"type": "none"}, {"trialSeconds": 600}, False),  # Tune stops a trial mid-fit at its time budget
    ({"type": "asha"}, {}, False),
    ({"type": "successiveHalving"}, {}, False),
    ({"type": "median"}, {}, False),
])
def test_trial_actors_are_reused_only_where_every_trial_ends_by_itself(scheduler, budget, reused):
    """A stopped or paused trial's actor would be cached while its Ray Train run is still ending
    (tuning.reuses_actors); CI saw the next trial error on it under ASHA."""
    from finetune_trainer.tuning import reuses_actors

    search = {"space": SPACE, "algorithm": "random", "scheduler": scheduler, **({"budget": budget} if budget else {})}
    assert reuses_actors(_job(search).spec.search) is reused
