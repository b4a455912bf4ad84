"""LoRA-family adapters (freezing.strategy: lora): the spec's rules at validate time, and what
adapters.py builds on real tiny transformers models (targets found by layer discovery, top-N
blocks, the task head for classification, what the freezing plan then trains)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune_trainer.adapters import adapter_plan, default_targets, lora_config, plan_on_skeleton, wrap
from finetune_trainer.layers import discover
from finetune_trainer.spec import SpecError, parse_job
from finetune_trainer.spec.adapters import LoraSpec
from finetune_trainer.spec.search import SearchSpec, trial_spec
from tests.tiny_models import minimal_manifest, tiny_bert, tiny_llama


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
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.layers) == (8, 16, 0.0, None, None)
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


# --- adapters.py on real tiny models ---------------------------------------------------------

LLAMA_PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_default_targets_are_every_projection_inside_the_blocks() -> None:
    llama = tiny_llama(2)
    assert default_targets(llama, discover(llama)) == LLAMA_PROJECTIONS  # not lm_head
    bert = tiny_bert(2)
    assert default_targets(bert, discover(bert)) == ["attention.self.query", "attention.self.key", "attention.self.value",
                                                     "attention.output.dense", "intermediate.dense", "output.dense"]
    model = wrap(tiny_bert(2), LoraSpec(), "sequence-classification")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 2 * 6 and not any("pooler" in n for n in adapted)  # BERT's pooler.dense is outside the blocks


def test_only_adapters_train_and_the_adapted_model_starts_as_the_base() -> None:
    base = tiny_llama(2)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = wrap(base, LoraSpec(), "causal-lm")
    plan = adapter_plan(model)
    assert plan.trainable and all(".lora_" in n for n in plan.trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in set(plan.frozen))
    assert len(plan.trainable) == 2 * 7 * 2  # A and B on 7 projections of 2 blocks
    with torch.no_grad():  # PEFT starts B at zero: the baseline evaluation is the pre-trained model
        assert torch.equal(model.eval()(input_ids=ids).logits, expected)


def test_layers_puts_adapters_on_the_top_blocks_only() -> None:
    model = wrap(tiny_llama(4), LoraSpec(layers=2, target_modules=["q_proj", "v_proj"]), "causal-lm")
    trainable = adapter_plan(model).trainable
    assert {n.split(".layers.")[1].split(".")[0] for n in trainable} == {"2", "3"}
    assert {n.split(".self_attn.")[1].split(".")[0] for n in trainable} == {"q_proj", "v_proj"}
    config = lora_config(tiny_bert(3), LoraSpec(layers=1), "sequence-classification")
    assert (list(config.layers_to_transform), config.layers_pattern) == ([2], "layer")


def test_the_classification_head_trains_whole() -> None:
    model = wrap(tiny_bert(2), LoraSpec(), "sequence-classification")
    head = [n for n in adapter_plan(model).trainable if "classifier" in n]
    assert head == ["base_model.model.classifier.modules_to_save.default.weight",
                    "base_model.model.classifier.modules_to_save.default.bias"]


def test_dora_and_rslora_reach_peft() -> None:
    config = lora_config(tiny_llama(2), LoraSpec(r=4, alpha=8, dropout=0.1, use_dora=True, use_rslora=True), "causal-lm")
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_dora, config.use_rslora) == (4, 8, 0.1, True, True)
    trainable = adapter_plan(wrap(tiny_llama(2), LoraSpec(use_dora=True), "causal-lm")).trainable
    assert any("lora_magnitude_vector" in n for n in trainable)


@pytest.mark.parametrize(("lora", "path", "words"), [
    (LoraSpec(target_modules=["q_proj", "nope"]), "spec.freezing.lora.targetModules[1]", ["'nope' matches no module", "q_proj"]),
    (LoraSpec(target_modules=["self_attn"]), "spec.freezing.lora.targetModules[0]", ["LlamaAttention", "not a linear projection"]),
    (LoraSpec(r=64), "spec.freezing.lora.r", ["above the width", "use r <= 16"]),
    (LoraSpec(layers=3), "spec.freezing.lora.layers", ["exceeds the 2 blocks", "at most 2"]),
])
def test_what_does_not_fit_the_model_is_a_spec_error_naming_the_field(lora: LoraSpec, path: str, words: list[str]) -> None:
    with pytest.raises(SpecError) as caught:
        wrap(tiny_llama(2), lora, "causal-lm", model_name="LlamaForCausalLM")
    [(where, message)] = caught.value.problems
    assert where == path and all(w in message for w in words), message


def test_preflight_plans_on_a_meta_skeleton_without_touching_it() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                num_key_value_heads=2, intermediate_size=32))
    names = [n for n, _ in skeleton.named_parameters()]
    plan = plan_on_skeleton(skeleton, LoraSpec(use_dora=True), "causal-lm", model_name="LlamaForCausalLM")
    assert len(plan.trainable) == 2 * 7 * 3 and [n for n, _ in skeleton.named_parameters()] == names
    with pytest.raises(SpecError):
        plan_on_skeleton(skeleton, LoraSpec(r=64), "causal-lm", model_name="LlamaForCausalLM")


def test_finetune_validate_checks_the_adapters_against_the_model_before_ray(tmp_path, capsys) -> None:
    """The preflight (what `finetune validate` runs) wraps the meta-device skeleton: a plan of
    adapters for a valid section, the field named for one that does not fit the model."""
    from finetune_trainer.cli import EXIT_INVALID, main
    from finetune_trainer.preflight import prepare_job
    from tests.integration import tiny

    model = tiny.make_model(tmp_path / "model", "llama", layers=2)
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.text_rows(40))
    doc = tiny.manifest(tmp_path, model, data, task="causal-lm", freezing={"strategy": "lora", "lora": {"layers": 1}})
    plan = prepare_job(parse_job(doc)).plan
    assert [g.block for g in plan.groups] == ["adapters"] and len(plan.trainable) == 7 * 2
    doc["spec"]["freezing"]["lora"] = {"layers": 3}
    tiny.save_manifest(tmp_path / "job.yaml", doc)
    assert main(["validate", str(tmp_path / "job.yaml")]) == EXIT_INVALID
    out = capsys.readouterr()
    assert "spec.freezing.lora.layers: 3 exceeds the 2 blocks of LlamaForCausalLM; use at most 2" in out.out + out.err


def _saved_for_backward(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps from one training forward for its backward:
    the activation memory of a step, which is what a training worker holds at its peak."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(input_ids=ids, labels=ids).loss.backward()
    return sum(storages.values())


def test_default_adapters_keep_no_more_activations_for_backward_than_full_fine_tuning() -> None:
    """With lora dropout > 0 PEFT keeps a dropped-out copy of every adapted projection's input for
    backward (7 per Llama block): on SmolLM2-135M, batch 4 x 128, 1629 MiB saved against 1205 MiB
    with dropout 0 and 1266 MiB for full fine-tuning (bench/adapter_cost.py). The default saves none."""
    def llama() -> torch.nn.Module:  # projections wider than r, as in any real model (tiny_llama's are 16)
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))

    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    full = _saved_for_backward(llama(), ids)
    lora = _saved_for_backward(wrap(llama(), LoraSpec(), "causal-lm"), ids)
    assert lora <= full, (lora, full)
    with_dropout = _saved_for_backward(wrap(llama(), LoraSpec(dropout=0.1), "causal-lm"), ids)
    assert with_dropout > full, (with_dropout, full)  # what an explicit dropout costs: the measure can tell
