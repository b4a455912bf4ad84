"""The GPU speed options of the spec (model.attnImplementation, model.ligerKernels,
training.fusedOptimizer): refused where they cannot work, with the field and the fix, and carried
to what loads the model and builds DeepSpeed's optimizer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from finetune_trainer.ds_config import build_ds_config
from finetune_trainer.modeling import load_model, speed_option_problems
from finetune_trainer.spec import ModelSpec, SpecError, parse_job
from tests.tiny_models import minimal_manifest, tiny_llama


def _problems(model: dict[str, Any] | None = None, **sections: Any) -> list[tuple[str, str]]:
    doc = minimal_manifest(**sections)
    doc["spec"]["model"] = {"source": "models/tiny", "task": "causal-lm", **(model or {})}
    try:
        parse_job(doc)
    except SpecError as err:
        return list(err.problems)
    return []


GPU = {"gpusPerWorker": 1}


def test_the_defaults_and_every_option_on_a_gpu_job_validate() -> None:
    assert _problems() == []
    assert _problems({"attnImplementation": "eager"}) == []
    assert _problems({"attnImplementation": "flash_attention_2", "ligerKernels": True}, resources=GPU,
                     training={"fusedOptimizer": True}) == []
    assert _problems(training={"fusedOptimizer": True}) == []  # torch's fused AdamW runs on CPU too


@pytest.mark.parametrize(("model", "sections", "words"), [
    ({"attnImplementation": "flash_attention_2"}, {}, ["GPUs only", "resources.gpusPerWorker: 1", "sdpa"]),
    ({"attnImplementation": "flash_attention_2"}, {"resources": GPU, "deepspeed": {"precision": "fp32"}},
     ["bf16", "deepspeed.precision"]),
    ({"attnImplementation": "flash_attention_2"},
     {"resources": GPU, "data": {"train": "data/train.jsonl", "validationSplit": 0.1, "packing": True}}, ["packing", "sdpa"]),
    ({"ligerKernels": True}, {}, ["GPU", "resources.gpusPerWorker: 1", "remove model.ligerKernels"]),
])
def test_gpu_kernels_are_refused_where_they_cannot_run(model, sections, words) -> None:
    [(path, message)] = _problems(model, **sections)
    assert path == f"spec.model.{next(iter(model))}"
    assert all(w in message for w in words), message


def test_fused_adamw_is_refused_with_deepspeeds_cpu_adam() -> None:
    [(path, message)] = _problems(training={"fusedOptimizer": True}, deepspeed={"zeroStage": 2, "offloadOptimizer": True})
    assert path == "spec.training.fusedOptimizer" and "offloadOptimizer" in message


def test_an_unknown_attention_kernel_is_refused_by_the_schema() -> None:
    assert [p for p, _ in _problems({"attnImplementation": "flash_attention_3"})] == ["spec.model.attnImplementation"]


def _ds(**sections: Any) -> dict[str, Any]:
    doc = minimal_manifest(**sections)
    return build_ds_config(parse_job(doc).spec, world_size=1, precision="fp32")


def test_fused_reaches_torch_adamw_through_deepspeeds_params() -> None:
    assert "fused" not in _ds()["optimizer"]["params"]
    assert _ds(training={"fusedOptimizer": True})["optimizer"]["params"]["fused"] is True


_DEEPSPEED_OPTIMIZER = textwrap.dedent("""
    import json, os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed, torch
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    model = torch.nn.Linear(8, 8)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=json.loads(sys.argv[1]))
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    print(json.dumps({"type": type(inner).__name__, "fused": inner.defaults.get("fused")}))
""")


def test_deepspeed_builds_torchs_fused_adamw_from_that_config(tmp_path) -> None:
    """The real DeepSpeed engine (ZeRO-2, gloo, one process in a child so no process group leaks into
    the test session): the optimizer it steps is torch's AdamW with fused=True."""
    import socket

    config = _ds(training={"fusedOptimizer": True}, deepspeed={"zeroStage": 2})
    config |= {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-c", _DEEPSPEED_OPTIMIZER, json.dumps(config), str(port)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                                    "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"type": "AdamW", "fused": True}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_attention_kernel_reaches_the_training_model(llama_dir: str, attention: str) -> None:
    spec = ModelSpec(source=llama_dir, task="causal-lm", attn_implementation=attention)
    model = load_model(llama_dir, spec, num_labels=None, dropout=None, pad_token_id=0, training=True)
    assert model.config._attn_implementation == attention


def test_unset_leaves_the_choice_to_transformers(llama_dir: str, tmp_path) -> None:
    """sdpa where the class has it; a family without (Bloom) still loads, with eager, as before."""
    from transformers import BloomConfig, BloomForCausalLM

    spec = ModelSpec(source=llama_dir, task="causal-lm")
    assert load_model(llama_dir, spec, num_labels=None, dropout=None, pad_token_id=0, training=True).config._attn_implementation == "sdpa"
    assert speed_option_problems(spec, llama_dir) == []
    BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    bloom = ModelSpec(source=str(tmp_path), task="causal-lm")
    assert speed_option_problems(bloom, str(tmp_path)) == []
    model = load_model(str(tmp_path), bloom, num_labels=None, dropout=None, pad_token_id=0, training=True)
    assert model.config._attn_implementation == "eager"
    [(field, _)] = speed_option_problems(ModelSpec(source=str(tmp_path), task="causal-lm", attn_implementation="sdpa"), str(tmp_path))
    assert field == "attnImplementation"


def test_flash_attention_is_for_the_workers_training_model_only(llama_dir: str) -> None:
    """The merge and the scoring may run where no GPU is: they load with transformers' choice."""
    spec = ModelSpec(source=llama_dir, task="causal-lm", attn_implementation="flash_attention_2")
    model = load_model(llama_dir, spec, num_labels=None, dropout=None, pad_token_id=0)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_preflight_names_a_missing_flash_attn(llama_dir: str) -> None:
    spec = ModelSpec(source=llama_dir, task="causal-lm", attn_implementation="flash_attention_2")
    [(field, why)] = speed_option_problems(spec, llama_dir)
    assert field == "attnImplementation" and "flash-attn" in why and "sdpa" in why


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_preflight_names_a_missing_liger_kernel(llama_dir: str) -> None:
    spec = ModelSpec(source=llama_dir, task="causal-lm", liger_kernels=True)
    [(field, why)] = speed_option_problems(spec, llama_dir)
    assert field == "ligerKernels" and "liger-kernel" in why and "finetune-operator[trainer,speed]" in why
    assert speed_option_problems(ModelSpec(source=llama_dir, task="causal-lm"), llama_dir) == []


def test_preflight_refuses_an_attention_kernel_the_models_class_lacks(llama_dir: str, monkeypatch) -> None:
    """transformers raises in from_pretrained for an explicit sdpa a class does not implement: said at
    preflight instead, with the fix (as for a family that has none, e.g. an old architecture)."""
    from transformers import LlamaForCausalLM

    spec = ModelSpec(source=llama_dir, task="causal-lm", attn_implementation="sdpa")
    assert speed_option_problems(spec, llama_dir) == []
    monkeypatch.setattr(LlamaForCausalLM, "_supports_sdpa", False)
    [(field, why)] = speed_option_problems(spec, llama_dir)
    assert field == "attnImplementation" and "LlamaForCausalLM has no sdpa attention" in why and "eager" in why
    assert speed_option_problems(ModelSpec(source=llama_dir, task="causal-lm", attn_implementation="eager"), llama_dir) == []
