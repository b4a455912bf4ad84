"""bench/gpu_throughput.py at its CPU smoke scale: every arm (plain torch full and LoRA, raw
DeepSpeed ZeRO-2, our trainer with the spec's defaults and with the speed options this machine
can run) trains the same tiny Llama and lands in the results JSON. The GPU figures come only from
a GPU machine; this proves the script and the option-carrying manifests work."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import gpu_throughput


def test_the_smoke_run_measures_every_arm_and_writes_its_json(local_ray, tmp_path: Path) -> None:
    arms = ["torch-full", "torch-lora", "deepspeed-full", "ours-full", "ours-lora-options"]  # ours-full-options: the CLI's
    out = gpu_throughput.main(["--smoke", "--out", str(tmp_path), "--arms", *arms])
    doc = json.loads(out.read_text())
    assert doc["smoke"] is True and doc["gpu_measured"] is False and out.name.startswith("gpu_throughput-smoke-")
    assert set(doc["arms"]) == set(arms)
    for arm, row in doc["arms"].items():
        assert row["tokens_per_second"] > 0 and math.isfinite(row["mfu"]) and row["mfu"] > 0, arm
    assert doc["arms"]["torch-lora"]["trainable_params"] < doc["arms"]["torch-full"]["trainable_params"] / 10
    assert doc["matmul_peak_flops"] > 0 and doc["ours_over_deepspeed"] > 0
    # what CPU can run of the options: fused AdamW and sdpa; the GPU kernels stay off here
    assert doc["options"] == {"model": {"attnImplementation": "sdpa"}, "training": {"fusedOptimizer": True}}
    for arm in ("ours-full", "ours-lora-options"):  # raw DeepSpeed's loop reads CUDA's peak only
        assert doc["arms"][arm]["peak_memory_mib"] > 0, arm
