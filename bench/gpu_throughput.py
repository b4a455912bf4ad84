"""Training throughput on one GPU: a plain-torch loop, raw DeepSpeed ZeRO-2 and our trainer inside
Ray Train, on the same Llama-shaped model and data, full fine-tuning and LoRA, in ONE invocation.

    python bench/gpu_throughput.py                 # one GPU: 1.1B Llama shape, seq 2048, bf16
    .venv/bin/python bench/gpu_throughput.py --smoke   # CPU: 2-layer model, seq 64, seconds

Arms (every one reads the same tokenized rows in the same order: the run's own ingest, ingest.py on
this process' Ray, run once; the train split gathered into memory for the torch and DeepSpeed arms,
step_overhead.ingest_train; our trainer ingests the same files with the same seed, which gives the
same rows, and its workers stream them from the object store in epochs.py's order, which the other
arms' micro-batches follow, step_overhead.micro_batches):
  torch-full / torch-lora   the reference loop in this process: the model on the device, fp32
                            weights under bf16 autocast, torch.optim.AdamW (fused=True on CUDA),
                            forward/backward/step; LoRA through our adapters.wrap (PEFT, our
                            default targets and rank), so both sides train the same adapters.
  deepspeed-full            raw DeepSpeed ZeRO-2 in a Ray Train worker (bench/step_overhead.py's
                            reference_loop: a bare deepspeed.initialize + step loop).
  ours-full                 our trainer (finetune_trainer.run), ZeRO-2, the spec's defaults: compared
                            with deepspeed-full (target ours/raw >= 0.97).
  ours-full-options,        our trainer with the options a user turns on in the spec: attnImplementation
  ours-lora-options         (flash_attention_2 where flash-attn is installed, else sdpa), ligerKernels
                            (where liger-kernel is installed, GPU only), training.fusedOptimizer, and
                            model.gradientCheckpointing with --gradient-checkpointing (target MFU >= 0.45).

tokens/s: non-pad tokens over the loop's wall time, device synchronised at the clock's ends; the
torch arms skip --warmup steps, the Ray arms count every step as recipe.py does (the ratio compares
like with like: bench/step_overhead.py). MFU = k * N * tokens/s / peak, N the model's parameters,
k = 6 for full fine-tuning and 4 for LoRA (no weight gradients of the frozen base), attention's
own FLOPs not counted (as the issue's reference figures); the peak is a bf16 (CPU: fp32) square
matmul this script times on the same device. Peak memory: torch.cuda.max_memory_allocated per
process (the torch arms reset it between arms; on CPU they report none, the Ray arms the process peak).
"""

from __future__ import annotations

import os

os.environ["GLOO_SOCKET_IFNAME"] = "lo"

import argparse
import gc
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_overhead
from finetune_trainer import environment

log = logging.getLogger("gpu_throughput")
RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("torch-full", "torch-lora", "deepspeed-full", "ours-full", "ours-full-options", "ours-lora-options")
TARGET_RATIO, TARGET_MFU = 0.97, 0.45


def matmul_peak(device, *, smoke: bool) -> float:
    """FLOP/s of a square matmul on this device (bf16 on GPUs, fp32 on CPU): the MFU denominator."""
    import torch

    n, iters = (512, 10) if smoke else (8192, 50)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - started)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torch_loop(prepared, train, job, *, lora: bool, steps: int, warmup: int, device) -> dict[str, Any]:
    """The plain-torch reference on `train` (step_overhead.ingest_train's split): nothing between
    the loop and the kernels but autocast."""
    import torch

    from finetune_trainer.adapters import wrap
    from finetune_trainer.modeling import load_model
    from finetune_trainer.packing import forward_kwargs
    from finetune_trainer.spec.adapters import LoraSpec

    spec, cuda = job.spec, device.type == "cuda"
    torch.manual_seed(spec.training.seed)
    model = load_model(prepared.model_dir, spec.model, num_labels=None, dropout=None, pad_token_id=prepared.tokenizer.pad_token_id,
                       training=True)
    if lora:
        model = wrap(model, LoraSpec(), "causal-lm", model_name=type(model).__name__)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.training.learning_rate, weight_decay=0.0, **({"fused": True} if cuda else {}))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    data, pad_id, size = train, prepared.tokenizer.pad_token_id, spec.training.per_device_batch_size
    batches = step_overhead.micro_batches(len(data), 1, 0, size, spec.training.seed, steps)
    sync(device)
    tokens, started = 0, time.perf_counter()
    for i, micro in enumerate(batches):
        if i == warmup:
            sync(device)
            tokens, started = 0, time.perf_counter()
        batch = {k: v.to(device) for k, v in data.batch(micro, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**batch, **forward_kwargs(batch)).loss
        loss.backward()
        if spec.training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, spec.training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += data.tokens_in(micro)
    sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    trainable = sum(p.numel() for p in params)
    del model, optimizer, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"tokens_per_second": tokens / seconds, "train_tokens": tokens, "train_seconds": seconds, "steps": steps - warmup,
            "peak_memory_mib": peak, "trainable_params": trainable, "last_loss": float(loss.detach())}


def speed_options(cuda: bool, gradient_checkpointing: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(spec.model additions, spec.training additions): every speed option this machine can run."""
    model: dict[str, Any] = {"attnImplementation": "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"}
    if cuda and importlib.util.find_spec("liger_kernel"):
        model["ligerKernels"] = True
    if gradient_checkpointing:
        model["gradientCheckpointing"] = True
    return model, {"fusedOptimizer": True}


def job_for(base: dict[str, Any], *, model: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
            lora: bool = False):
    from finetune_trainer.spec import parse_job

    doc = json.loads(json.dumps(base))
    doc["spec"]["model"] |= model or {}
    doc["spec"]["training"] |= training or {}
    if lora:
        doc["spec"]["freezing"] = {"strategy": "lora"}
    return parse_job(doc)


def mfu(row: dict[str, Any], params: int, peak: float, *, lora: bool) -> float:
    return (4 if lora else 6) * params * row["tokens_per_second"] / peak


def main(argv: list[str] | None = None) -> Path:
    """Run the arms, print the table, write the results JSON and return its path. In a process
    that already runs Ray (the integration test) its Ray is used."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, a 2-layer model, seq 64, 4 steps: tests the script itself")
    p.add_argument("--steps", type=int, help="optimizer steps per arm (default 30; smoke 4)")
    p.add_argument("--warmup", type=int, help="steps the torch arms do not time (default 5; smoke 1)")
    p.add_argument("--batch", type=int, help="micro-batch (default 4; smoke 2)")
    p.add_argument("--seq-len", type=int, help="tokens per example (default 2048; smoke 64)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="add model.gradientCheckpointing to the options arms")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results JSON")
    args = p.parse_args(argv)
    steps, warmup, batch, seq = (4, 1, 2, 64) if args.smoke else (30, 5, 4, 2048)
    args.steps, args.warmup = args.steps or steps, args.warmup if args.warmup is not None else warmup
    args.batch, args.seq_len = args.batch or batch, args.seq_len or seq

    import ray
    import torch

    from finetune_trainer.driver import init_ray
    from finetune_trainer.preflight import prepare_job

    cuda = torch.cuda.is_available() and not args.smoke
    if not args.smoke and not cuda:
        p.error("no GPU here: the 1.1B run needs one; --smoke runs the script on CPU at a tiny scale")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    # step_overhead's manifest: one worker, ZeRO-2, constant lr, one evaluation after the last step, no export
    so = SimpleNamespace(workers=1, batch=args.batch, steps=args.steps, seq_len=args.seq_len, stage=2,
                         precision="bf16" if cuda else "fp32", cpus_per_worker=1 if args.smoke else 8,
                         gpus_per_worker=1 if cuda else 0, warmup=args.warmup, ref_config="raw")
    folder = Path(tempfile.mkdtemp(prefix="gpu-throughput-"))
    rows: dict[str, dict[str, Any]] = {}
    try:
        source, _ = step_overhead.make_model("tiny-llama" if args.smoke else "llama-1b", folder / "model")
        base = step_overhead.manifest(so, source, "causal-lm", folder)
        plain = job_for(base)
        prepared = prepare_job(plain)
        params = step_overhead.count_params(prepared.model_dir, "causal-lm")
        peak = matmul_peak(device, smoke=args.smoke)
        log.info("model %.1fM params, matmul peak %.3g FLOP/s on %s", params / 1e6, peak, step_overhead._device())
        model_opts, training_opts = speed_options(cuda, args.gradient_checkpointing)
        # reference_loop travels to the Ray worker by value: a Ray started before bench/ was on
        # this process' path (the integration tests' session Ray) could not import it by name
        ray.cloudpickle.register_pickle_by_value(step_overhead)
        init_ray()  # the ingest below runs on it, before any arm
        train, label_names = step_overhead.ingest_train(plain, prepared.tokenizer)
        for arm in ("torch-full", "torch-lora"):
            if arm in args.arms:
                rows[arm] = torch_loop(prepared, train, plain, lora=arm.endswith("lora"), steps=args.steps, warmup=args.warmup,
                                       device=device)
                log.info("%s: %.1f tokens/s", arm, rows[arm]["tokens_per_second"])
        if "deepspeed-full" in args.arms:
            rows["deepspeed-full"] = step_overhead.run_reference(plain, prepared, ray.put(train), label_names, so, folder,
                                                                 "deepspeed-full")
        ours = {"ours-full": job_for(base),
                "ours-full-options": job_for(base, model=model_opts, training=training_opts),
                "ours-lora-options": job_for(base, model=model_opts, training=training_opts, lora=True)}
        for arm, job in ours.items():
            if arm in args.arms:
                rows[arm] = step_overhead.run_ours(job, folder, arm)
                log.info("%s: %.1f tokens/s", arm, rows[arm]["tokens_per_second"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for arm, row in rows.items():
        row["mfu"] = mfu(row, params, peak, lora="lora" in arm)
    ratio = (rows["ours-full"]["tokens_per_second"] / rows["deepspeed-full"]["tokens_per_second"]
             if {"ours-full", "deepspeed-full"} <= rows.keys() else None)
    best_mfu = max((rows[a]["mfu"] for a in ("ours-full-options", "ours-lora-options") if a in rows), default=None)
    print(f"\ngpu throughput: {params / 1e6:.1f}M params, batch {args.batch} x {args.seq_len}, {args.steps} steps, "
          f"{step_overhead._device()}, matmul peak {peak:.3g} FLOP/s" + (" (SMOKE: CPU, not a GPU figure)" if args.smoke else ""))
    print(f"{'arm':<20} {'tokens/s':>12} {'MFU':>7} {'peak MiB':>10}")
    for arm, row in rows.items():
        mem = row.get("peak_memory_mib")
        print(f"{arm:<20} {row['tokens_per_second']:>12.1f} {row['mfu']:>7.3f} {'-' if mem is None else str(round(mem)):>10}")
    if ratio is not None:
        print(f"ours-full / deepspeed-full: {ratio:.3f} (target >= {TARGET_RATIO})")
    if best_mfu is not None:
        print(f"best MFU with the spec's options: {best_mfu:.3f} (target >= {TARGET_MFU}; model options {model_opts}, "
              f"training options {training_opts})")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out / f"gpu_throughput-{'smoke-' if args.smoke else ''}{stamp}.json"
    out.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(), "smoke": args.smoke, "gpu_measured": cuda, "device": step_overhead._device(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "params": params,
        "matmul_peak_flops": peak, "options": {"model": model_opts, "training": training_opts}, "arms": rows,
        "ours_over_deepspeed": ratio, "target_ratio": TARGET_RATIO, "best_options_mfu": best_mfu, "target_mfu": TARGET_MFU,
    }, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    environment.prepare()  # as the CLI does, before Ray is imported: loopback, a GCS port of its own
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
