"""LoRA-family adapters (freezing.strategy: lora): the spec's rules at validate time, and what
adapters.py builds on real tiny transformers models (targets found by layer discovery, top-N
blocks, the task head for classification, what the freezing plan then trains)."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_trainer.spec import SpecError, parse_job
from finetune_trainer.spec.search import SearchSpec, trial_spec
from tests.tiny_models import minimal_manifest


def _job(**sections: Any) -> dict[str, Any]:
    return minimal_manifest(**sections)


def _problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        parse_job(doc)
    except SpecError as err:
        return err.problems
    return []


# --- the spec ------------------------------------------------------------------------------


def test_lora_defaults_are_what_peft_and_llama_factory_users_expect() -> None:
    job = parse_job(_job(freezing={"strategy": "lora"}))
    lora = job.spec.freezing.lora_settings()
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.layers) == (8, 16, 0.05, None, None)
    assert not lora.use_dora and not lora.use_rslora
    assert job.spec.output.merge_adapter is True


def test_lora_settings_under_another_strategy_are_refused_naming_them() -> None:
    problems = _problems(_job(freezing={"strategy": "freezeBottom", "layers": 1, "lora": {"r": 16}}))
    assert problems == [("spec.freezing.lora", "only used by strategy: lora (strategy is freezeBottom)")]


def test_lora_with_layer_lr_decay_is_refused_with_the_fix() -> None:
    [(path, message)] = _problems(_job(freezing={"strategy": "lora", "layerLrDecay": 0.8}))
    assert path == "spec.freezing.layerLrDecay"
    assert "remove it" in message and "lora.layers" in message


@pytest.mark.parametrize("targets", [["(a+)+$"], ["q_proj", ".*"], ["a b"], [""]])
def test_target_modules_are_names_never_regexes(targets: list[str]) -> None:
    problems = _problems(_job(freezing={"strategy": "lora", "lora": {"targetModules": targets}}))
    bad = next(i for i, t in enumerate(targets) if t not in ("q_proj",))
    assert [p for p, _ in problems] == [f"spec.freezing.lora.targetModules[{bad}]"]


@pytest.mark.parametrize(("lora", "path"), [({"r": 0}, "r"), ({"r": 5000}, "r"), ({"dropout": 1.0}, "dropout"),
                                            ({"alpha": 0}, "alpha"), ({"alpha": 0.5}, "alpha"), ({"layers": 0}, "layers"),
                                            ({"targetModules": [f"m{i}" for i in range(65)]}, "targetModules")])
def test_lora_numbers_are_bounded(lora: dict[str, Any], path: str) -> None:
    assert [p for p, _ in _problems(_job(freezing={"strategy": "lora", "lora": lora}))] == [f"spec.freezing.lora.{path}"]


def test_a_quantized_base_on_cpu_is_refused_naming_the_field_and_the_fix() -> None:
    doc = _job(freezing={"strategy": "lora"})
    doc["spec"]["model"]["quantization"] = {"bits": 4}
    [(path, message)] = _problems(doc)
    assert path == "spec.model.quantization"
    assert "GPUs" in message and "resources.gpusPerWorker: 1" in message and "remove model.quantization" in message


def _gpu_job(strategy: str, zero: int, bits: int = 4) -> dict[str, Any]:
    freezing: dict[str, Any] = {"strategy": strategy} | ({"layers": 1} if strategy == "freezeBottom" else {})
    doc = _job(freezing=freezing, resources={"gpusPerWorker": 1}, deepspeed={"zeroStage": zero})
    doc["spec"]["model"]["quantization"] = {"bits": bits}
    return doc


def test_a_quantized_base_needs_adapters_and_zero_below_3() -> None:
    assert _problems(_gpu_job("lora", 2)) == []
    assert _problems(_gpu_job("lora", 0, bits=8)) == []
    [(path, message)] = _problems(_gpu_job("freezeBottom", 2))
    assert path == "spec.model.quantization" and "freezing.strategy: lora" in message
    [(path, message)] = _problems(_gpu_job("lora", 3))
    assert path == "spec.model.quantization" and "zeroStage 0, 1 or 2" in message
    assert [p for p, _ in _problems(_gpu_job("lora", 2, bits=3))] == ["spec.model.quantization.bits"]


def test_a_search_mixing_strategies_drops_lora_for_other_strategies_and_keeps_it_for_lora() -> None:
    base = parse_job(_job(freezing={"strategy": "lora", "lora": {"r": 16, "useDora": True}})).spec
    search = SearchSpec.model_validate({"space": {"freezing.strategy": {"choice": ["lora", "featureExtraction"]}}})
    assert search.space
    lora_trial = trial_spec(base, {"freezing.strategy": "lora", "freezing.lora.r": 64})
    assert lora_trial.freezing.lora is not None and lora_trial.freezing.lora.r == 64 and lora_trial.freezing.lora.use_dora
    other = trial_spec(base, {"freezing.strategy": "featureExtraction", "freezing.lora.r": 64})
    assert other.freezing.lora is None and list(other.freezing.check()) == []
