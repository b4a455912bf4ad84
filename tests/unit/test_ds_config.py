"""ds_config: the DeepSpeed config built from a validated spec (ZeRO stage, offload, precision,
batch sizes, clipping), the user's raw `deepspeed.config` merged over it, and `auto` precision."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from finetune_trainer.ds_config import build_ds_config, deep_merge, resolve_precision
from finetune_trainer.spec import FineTuneJobSpec, SpecError, parse_job
from tests.tiny_models import minimal_manifest


def job_spec(**sections: dict[str, Any]) -> FineTuneJobSpec:
    """A valid minimal manifest on CPU, with whole spec sections ({"deepspeed": {...}}) given."""
    doc = minimal_manifest(**sections)
    return parse_job(doc).spec


def build(
    precision: str = "fp32", world_size: int = 1, **sections: dict[str, Any]
) -> dict[str, Any]:
    return build_ds_config(job_spec(**sections), world_size=world_size, precision=precision)


# --- ZeRO stages and offload ---------------------------------------------------------------

SHARDED = {"contiguous_gradients": True, "overlap_comm": False, "reduce_bucket_size": 50_000_000}
CPU = {"device": "cpu", "pin_memory": False}


@pytest.mark.parametrize(
    ("deepspeed", "zero", "torch_adam"),
    [
        ({"zeroStage": 0}, {"stage": 0}, True),
        ({"zeroStage": 1}, {"stage": 1, **SHARDED}, True),
        ({"zeroStage": 2}, {"stage": 2, **SHARDED}, True),
        (
            {"zeroStage": 3},
            {"stage": 3, **SHARDED, "stage3_gather_16bit_weights_on_model_save": True},
            True,
        ),
        (
            {"zeroStage": 1, "offloadOptimizer": True},
            {"stage": 1, **SHARDED, "offload_optimizer": CPU},
            False,
        ),
        (
            {"zeroStage": 2, "offloadOptimizer": True},
            {"stage": 2, **SHARDED, "offload_optimizer": CPU},
            False,
        ),
        (
            {"zeroStage": 3, "offloadOptimizer": True},
            {
                "stage": 3,
                **SHARDED,
                "stage3_gather_16bit_weights_on_model_save": True,
                "offload_optimizer": CPU,
            },
            False,
        ),
        (
            {"zeroStage": 3, "offloadParams": True},
            {
                "stage": 3,
                **SHARDED,
                "stage3_gather_16bit_weights_on_model_save": True,
                "offload_param": CPU,
            },
            False,
        ),
        (
            {"zeroStage": 3, "offloadOptimizer": True, "offloadParams": True},
            {
                "stage": 3,
                **SHARDED,
                "stage3_gather_16bit_weights_on_model_save": True,
                "offload_optimizer": CPU,
                "offload_param": CPU,
            },
            False,
        ),
    ],
    ids=[
        "0",
        "1",
        "2",
        "3",
        "1-offload-opt",
        "2-offload-opt",
        "3-offload-opt",
        "3-offload-param",
        "3-offload-both",
    ],
)
def test_zero_section_per_stage_and_offload(deepspeed, zero, torch_adam):
    config = build(deepspeed=deepspeed)
    assert config["zero_optimization"] == zero
    assert config["optimizer"]["params"]["torch_adam"] is torch_adam, (
        "offload needs DeepSpeed's CPU Adam"
    )


@pytest.mark.parametrize(
    ("deepspeed", "path"),
    [
        ({"zeroStage": 2, "offloadParams": True}, "spec.deepspeed.offloadParams"),
        ({"zeroStage": 0, "offloadOptimizer": True}, "spec.deepspeed.offloadOptimizer"),
    ],
)
def test_offload_the_stage_cannot_do_never_reaches_the_builder(deepspeed, path):
    with pytest.raises(SpecError) as err:
        job_spec(deepspeed=deepspeed)
    assert [p for p, _ in err.value.problems] == [path]


# --- precision ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"),
    [("bf16", True, False), ("fp16", False, True), ("fp32", False, False)],
)
def test_precision_flags(precision, bf16, fp16):
    config = build(precision=precision)
    assert config["bf16"] == {"enabled": bf16}
    assert config["fp16"] == {"enabled": fp16, "loss_scale": 0, "initial_scale_power": 16}


@pytest.mark.parametrize(
    ("requested", "cuda", "bf16_supported", "resolved"),
    [
        ("auto", False, False, "fp32"),
        ("auto", False, True, "fp32"),  # CPU: never a half type, whatever it reports
        ("auto", True, True, "bf16"),
        ("auto", True, False, "fp16"),
        ("fp32", True, True, "fp32"),
        ("bf16", False, False, "bf16"),  # an explicit choice is kept as written
        ("fp16", True, True, "fp16"),
        ("fp16", True, False, "fp16"),
    ],
)
def test_resolve_precision(requested, cuda, bf16_supported, resolved):
    assert resolve_precision(requested, cuda=cuda, bf16_supported=bf16_supported) == resolved


# --- batch sizes, optimizer, clipping --------------------------------------------------------


@pytest.mark.parametrize(
    ("micro", "accum", "world", "total"),
    [(8, 1, 1, 8), (16, 1, 2, 32), (4, 3, 1, 12), (4, 3, 5, 60), (1, 1, 64, 64)],
)
def test_train_batch_size_is_micro_times_accumulation_times_world(micro, accum, world, total):
    config = build(
        world_size=world, training={"perDeviceBatchSize": micro, "gradientAccumulationSteps": accum}
    )
    assert config["train_micro_batch_size_per_gpu"] == micro
    assert config["gradient_accumulation_steps"] == accum
    assert config["train_batch_size"] == total


def test_optimizer_takes_the_training_hyperparameters():
    config = build(
        training={
            "learningRate": 3e-4,
            "weightDecay": 0.05,
            "adamBeta1": 0.8,
            "adamBeta2": 0.95,
            "adamEpsilon": 1e-6,
        }
    )
    assert config["optimizer"] == {
        "type": "AdamW",
        "params": {
            "lr": 3e-4,
            "betas": [0.8, 0.95],
            "eps": 1e-6,
            "weight_decay": 0.05,
            "torch_adam": True,
            "adam_w_mode": True,
        },
    }


@pytest.mark.parametrize(
    ("training", "clipping"),
    [({}, 1.0), ({"maxGradNorm": 0.5}, 0.5), ({"maxGradNorm": None}, None)],
    ids=["default", "set", "null-disables"],
)
def test_gradient_clipping(training, clipping):
    config = build(training=training)
    if clipping is None:
        assert "gradient_clipping" not in config
    else:
        assert config["gradient_clipping"] == clipping


def test_generated_config_stays_quiet_and_allows_torch_optimizers():
    config = build()
    assert config["steps_per_print"] >= 10**9
    assert config["wall_clock_breakdown"] is False
    assert config["zero_allow_untested_optimizer"] is True


# --- the user's raw config -----------------------------------------------------------------


def test_raw_config_wins_at_every_depth_and_keeps_the_rest():
    raw = {
        "zero_optimization": {
            "reduce_bucket_size": 1000,
            "offload_optimizer": {"pin_memory": True},
        },
        "fp16": {"initial_scale_power": 8},
        "steps_per_print": 5,
        "activation_checkpointing": {"partition_activations": True},
    }
    spec = job_spec(deepspeed={"zeroStage": 2, "offloadOptimizer": True, "config": raw})
    before = copy.deepcopy(spec.deepspeed.config)
    config = build_ds_config(spec, world_size=1, precision="fp16")
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1000
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}, (
        "a nested key wins, siblings stay"
    )
    assert (zero["stage"], zero["contiguous_gradients"]) == (2, True)
    assert config["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
    # gradient_clipping is training.maxGradNorm's: a raw value must agree with it (test_hostile_manifests)
    assert (config["gradient_clipping"], config["steps_per_print"]) == (1.0, 5)
    assert config["activation_checkpointing"] == {"partition_activations": True}
    assert spec.deepspeed.config == before, "building must not change the spec"
    config["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
    assert spec.deepspeed.config == before, "the result must not share the spec's dicts"


def test_raw_config_from_yaml_keeps_its_numbers():
    config = build(deepspeed={"config": {"zero_optimization": {"reduce_bucket_size": 5e8}}})
    assert config["zero_optimization"]["reduce_bucket_size"] == 5e8


@pytest.mark.parametrize(
    ("base", "override", "merged"),
    [
        ({"a": 1, "b": 2}, {}, {"a": 1, "b": 2}),
        ({}, {"a": {"b": 1}}, {"a": {"b": 1}}),
        ({"a": 1, "b": 2}, {"b": 3}, {"a": 1, "b": 3}),
        (
            {"a": {"x": 1, "y": {"p": 1, "q": 2}}},
            {"a": {"y": {"q": 9, "r": 3}}},
            {"a": {"x": 1, "y": {"p": 1, "q": 9, "r": 3}}},
        ),
        ({"a": {"x": 1}}, {"a": 5}, {"a": 5}),  # a scalar replaces a mapping
        ({"a": 5}, {"a": {"x": 1}}, {"a": {"x": 1}}),  # and a mapping a scalar
        ({"a": {"x": 1}}, {"a": None}, {"a": None}),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),  # lists are replaced, not appended
    ],
    ids=[
        "empty-override",
        "empty-base",
        "top-level",
        "nested",
        "scalar-over-dict",
        "dict-over-scalar",
        "null",
        "list",
    ],
)
def test_deep_merge(base, override, merged):
    base_before, override_before = copy.deepcopy(base), copy.deepcopy(override)
    result = deep_merge(base, override)
    assert result == merged
    assert (base, override) == (base_before, override_before), "inputs are not mutated"


def test_deep_merge_result_shares_nothing_with_its_inputs():
    base = {"a": {"x": [1]}}
    override = {"b": {"y": [2]}, "a": {"z": {"k": 1}}}
    result = deep_merge(base, override)
    result["a"]["x"].append(99)
    result["a"]["z"]["k"] = 2
    result["b"]["y"].append(99)
    assert base == {"a": {"x": [1]}}
    assert override == {"b": {"y": [2]}, "a": {"z": {"k": 1}}}
