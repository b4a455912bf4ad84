"""One search over freezing strategies and adapters (issue 17, item 2): a space mixes
`freezing.strategy` values with adapter fields (`freezing.lora.r`), each trial keeps only the
fields its strategy reads, every trial's spec is checked before anything runs, and the table and
status name each trial's strategy with its size, trainable parameters and peak memory."""

from __future__ import annotations

import pytest

from finetune_trainer import search_results
from finetune_trainer.report import print_search_summary
from finetune_trainer.spec import FreezingSpec, SpecError, parse_job
from finetune_trainer.spec.search import dropped_params, grid_order, trial_spec
from tests.unit.test_search_spec import _job, _problems  # the search tests' manifest helpers, shared

MIXED = {
    "freezing.strategy": {"grid": ["freezeBottom", "gradual", "featureExtraction", "lora"]},
    "freezing.layers": {"choice": [1, 2]},
    "freezing.unfreezeEvery": {"choice": [5]},
    "freezing.lora.r": {"choice": [8, 16, 64]},
    "training.learningRate": {"loguniform": [1e-5, 1e-3]},
}


def test_a_space_mixes_strategies_and_adapter_sizes_and_each_trial_keeps_what_it_reads():
    job = _job({"space": MIXED, "numTrials": 8}, freezing={"strategy": "lora", "lora": {"alpha": 32, "useDora": True}})
    assert job.spec.search.resolved_num_trials() == 8
    sampled = {"freezing.layers": 2, "freezing.unfreezeEvery": 5, "freezing.lora.r": 16, "training.learningRate": 1e-4}

    lora = trial_spec(job.spec, {"freezing.strategy": "lora", **sampled})
    assert (lora.freezing.lora.r, lora.freezing.lora.alpha, lora.freezing.lora.use_dora) == (16, 32, True)  # the base's alpha and DoRA kept
    assert lora.freezing.layers is None and lora.freezing.unfreeze_every is None and lora.problems() == []
    assert dropped_params(lora, {"freezing.strategy": "lora", **sampled}) == ["freezing.layers", "freezing.unfreezeEvery"]

    bottom = trial_spec(job.spec, {"freezing.strategy": "freezeBottom", **sampled})
    assert bottom.freezing.lora is None and bottom.freezing.layers == 2 and bottom.problems() == []
    assert dropped_params(bottom, {"freezing.strategy": "freezeBottom", **sampled}) == ["freezing.unfreezeEvery", "freezing.lora.r"]

    features = trial_spec(job.spec, {"freezing.strategy": "featureExtraction", **sampled})
    assert dropped_params(features, {"freezing.strategy": "featureExtraction", **sampled}) == [
        "freezing.layers", "freezing.unfreezeEvery", "freezing.lora.r"]


def test_a_lora_trial_without_a_lora_section_gets_the_searched_rank_and_the_defaults():
    job = _job({"space": {"freezing.strategy": {"choice": ["none", "lora"]}, "freezing.lora.r": {"choice": [4, 32]},
                          "freezing.lora.useRslora": {"choice": [True, False]}}})
    spec = trial_spec(job.spec, {"freezing.strategy": "lora", "freezing.lora.r": 32, "freezing.lora.useRslora": True})
    assert (spec.freezing.lora.r, spec.freezing.lora.use_rslora, spec.freezing.lora.alpha) == (32, True, 16)
    assert search_results.strategy_label(spec.freezing) == "lora r=32, rslora"
    full = trial_spec(job.spec, {"freezing.strategy": "none", "freezing.lora.r": 32, "freezing.lora.useRslora": True})
    assert full.freezing.lora is None and search_results.strategy_label(full.freezing) == "none"


@pytest.mark.parametrize(("space", "path", "words"), [
    ({"freezing.lora.rank": {"choice": [8]}}, "spec.search.space.freezing.lora.rank", "not a field of the spec; freezing.lora has: alpha, dropout, layers, r,"),
    ({"freezing.lora": {"choice": [8]}}, "spec.search.space.freezing.lora", "is a section; search one of its fields, e.g. freezing.lora.r"),
    ({"freezing.lora.r.x": {"choice": [8]}}, "spec.search.space.freezing.lora.r.x", "freezing.lora.r is a value, not a section"),
    ({"freezing.lora.r": {"choice": [8, 0]}}, "spec.search.space.freezing.lora.r", "0 is not valid here: Input should be greater than or equal to 1"),
    ({"freezing.lora.dropout": {"uniform": [0.0, 1.5]}}, "spec.search.space.freezing.lora.dropout", "1.5 is not valid here"),
    ({"freezing.lora.useDora": {"choice": ["yes"]}}, "spec.search.space.freezing.lora.useDora", "'yes' is not valid here"),
    ({"freezing.lora.targetModules": {"choice": [["q_proj"]]}}, "spec.search.space.freezing.lora.targetModules.choice[0]", "single values"),
])
def test_bad_adapter_paths_and_values_name_the_path(space, path, words):
    problems = _problems({"space": {"freezing.strategy": {"choice": ["lora", "freezeBottom"]}, "freezing.layers": {"choice": [1]}, **space}})
    assert any(p == path and words in m for p, m in problems), problems


def test_every_trials_spec_is_checked_and_a_bad_combination_names_the_trial_and_the_field():
    # lora with layer-wise LR decay is refused for a plain run; in a space it is refused for the lora trials only
    problems = _problems({"space": {"freezing.strategy": {"choice": ["freezeBottom", "lora"]}, "freezing.layers": {"choice": [1]},
                                    "freezing.layerLrDecay": {"choice": [0.8]}}})
    assert len(problems) == 1 and problems[0][0] == "spec.search.space", problems
    assert problems[0][1].startswith("freezing.strategy='lora', freezing.layers=1, freezing.layerLrDecay=0.8: spec.freezing.layerLrDecay: ")
    assert "remove it" in problems[0][1]
    # the same space without lora is valid: the freezeBottom trials use layerLrDecay
    _job({"space": {"freezing.strategy": {"choice": ["freezeBottom"]}, "freezing.layers": {"choice": [1]}, "freezing.layerLrDecay": {"choice": [0.8]}}})


@pytest.mark.parametrize(("freezing", "label"), [
    ({"strategy": "none"}, "none"),
    ({"strategy": "freezeBottom", "layers": 6}, "freezeBottom 6"),
    ({"strategy": "freezeBottom", "layers": 0.5}, "freezeBottom 0.5"),
    ({"strategy": "gradual", "unfreezeEvery": 50}, "gradual every 50"),
    ({"strategy": "gradual", "unfreezeEvery": "epoch"}, "gradual every epoch"),
    ({"strategy": "featureExtraction"}, "featureExtraction"),
    ({"strategy": "lora"}, "lora r=8"),
    ({"strategy": "lora", "lora": {"r": 16}}, "lora r=16"),
    ({"strategy": "lora", "lora": {"r": 64, "useDora": True, "layers": 4}}, "dora r=64, top 4 layers"),
])
def test_strategy_label_names_the_strategy_and_its_size(freezing, label):
    assert search_results.strategy_label(FreezingSpec.model_validate(freezing)) == label


def _results() -> dict:
    trial = {"params": {}, "unused_params": [], "steps": 8, "total_steps": 8, "status": "finished", "error": None, "metric": "eval_loss",
             "checkpoint": None, "best_step": 8, "history": []}
    return {
        "job": "mixed", "run": "run-1",
        "search": {"metric": "eval_loss", "mode": "min", "trials": 3, "algorithm": "grid", "scheduler": "none", "trial_steps": 24},
        "trials": [
            {**trial, "trial": "trial_00", "params": {"freezing.strategy": "lora", "freezing.lora.r": 4}, "strategy": "lora r=4",
             "value": 2.5, "trainable_params": 1536, "total_params": 540_000, "peak_memory_mib": 612.4},
            {**trial, "trial": "trial_01", "params": {"freezing.strategy": "freezeBottom", "freezing.lora.r": 8}, "unused_params": ["freezing.lora.r"],
             "strategy": "freezeBottom 1", "value": 2.1, "trainable_params": 281_000, "total_params": 540_000, "peak_memory_mib": 655.0},
            {**trial, "trial": "trial_02", "params": {"freezing.strategy": "lora", "freezing.lora.r": 8}, "strategy": "lora r=8",
             "value": 2.4, "trainable_params": 3072, "total_params": 541_536, "peak_memory_mib": 613.9},
        ],
        "best": {"trial": "trial_01", "strategy": "freezeBottom 1", "params": {"freezing.strategy": "freezeBottom", "freezing.lora.r": 8},
                 "metric": "eval_loss", "value": 2.1, "step": 8, "checkpoint": None},
        "metrics": {"validation": {}, "test": {}}, "timings": {"total_seconds": 30.0}, "model": None, "plots": [],
    }


def test_the_trial_table_names_strategy_and_size_trainable_parameters_and_peak_memory(capsys, tmp_path):
    print_search_summary(_results(), tmp_path)
    out = capsys.readouterr().out
    row = {name: next(line for line in out.splitlines() if f" {name} " in line) for name in ("trial_00", "trial_01", "trial_02")}
    assert "strategy" in out and "trainable" in out and "peak MiB" in out
    assert "lora r=4" in row["trial_00"] and "1.54K (0.28%)" in row["trial_00"] and "612" in row["trial_00"]
    assert "freezeBottom 1" in row["trial_01"] and "281K (52%)" in row["trial_01"] and "r=n/a" in row["trial_01"]
    assert "lora r=8" in row["trial_02"] and "3.07K (0.57%)" in row["trial_02"]
    assert "best: trial_01 (freezeBottom 1) at step 8" in out


def test_status_names_the_best_trials_strategy():
    results = _results()
    job = _job({"space": MIXED, "numTrials": 8})
    doc = search_results.final_status(job, "run-1", results["trials"], results["best"], None)
    assert doc.best_trial is not None and doc.best_trial.strategy == "freezeBottom 1"
    assert doc.as_dict()["bestTrial"]["strategy"] == "freezeBottom 1"


def test_a_grid_runs_each_distinct_trial_once():
    """{freezeBottom, lora} x lora.r {4, 8} is three trials: freezeBottom does not read r, so its two
    combinations are one trial (before: the same freezeBottom trial ran twice)."""
    job = _job({"algorithm": "grid", "space": {"freezing.strategy": {"choice": ["freezeBottom", "lora"]}, "freezing.lora.r": {"choice": [4, 8]},
                                               "freezing.layers": {"choice": [1]}}})
    search = job.spec.search
    assert search.grid_size() == 4 and search.resolved_num_trials() == 3
    trials = [trial_spec(job.spec, params) for params in grid_order(search, 7)]
    assert sorted(search_results.strategy_label(t.freezing) for t in trials) == ["freezeBottom 1", "lora r=4", "lora r=8"]
    # the schedule's fields too: constant has no warmup, so it is one trial whatever warmupRatio says
    job = _job({"algorithm": "grid", "space": {"lrSchedule.type": {"choice": ["constant", "linear"]}, "lrSchedule.warmupRatio": {"choice": [0.05, 0.1]}}})
    assert job.spec.search.resolved_num_trials() == 3 and len(grid_order(job.spec.search, 0)) == 3
    # nothing merges where every value is read: learning rate x strategy stays 4
    job = _job({"algorithm": "grid", "space": {"freezing.strategy": {"choice": ["none", "lora"]}, "training.learningRate": {"choice": [1e-4, 1e-3]}}})
    assert job.spec.search.resolved_num_trials() == 4
    # numTrials, when given, must be that count
    problems = _problems({"algorithm": "grid", "numTrials": 4, "space": {"freezing.strategy": {"choice": ["freezeBottom", "lora"]},
                                                                       "freezing.lora.r": {"choice": [4, 8]}, "freezing.layers": {"choice": [1]}}})
    assert problems == [("spec.search.numTrials", "grid runs every combination once (3); leave numTrials out")]


def test_the_preflight_plans_every_lora_trial_on_the_model(tmp_path):
    """Before Ray: a lora trial whose rank is above the model's projections fails the run, named by
    the values that trial reads (not the freezeBottom-only layers it dropped)."""
    from finetune_trainer.preflight import prepare_job
    from tests.integration import tiny

    model = tiny.make_model(tmp_path / "model", "llama", layers=2)  # hidden size 32
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.text_rows(60))
    space = {"freezing.strategy": {"choice": ["freezeBottom", "lora"]}, "freezing.layers": {"choice": [1]}, "freezing.lora.r": {"choice": [8, 48]}}
    job = parse_job(tiny.manifest(tmp_path, model, data, task="causal-lm", search={"space": space}))
    with pytest.raises(SpecError) as err:
        prepare_job(job)
    assert len(err.value.problems) == 1, err.value.problems
    path, message = err.value.problems[0]
    assert path == "spec.search.space"
    assert message.startswith("freezing.strategy='lora', freezing.lora.r=48: spec.freezing.lora.r: 48 is above the width of "), message
    assert "use r <= 32" in message
    # the same space with ranks that fit passes, every trial planned
    space["freezing.lora.r"] = {"choice": [8, 16]}
    assert prepare_job(parse_job(tiny.manifest(tmp_path, model, data, task="causal-lm", search={"space": space}))).plan
