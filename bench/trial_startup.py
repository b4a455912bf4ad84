"""Where a trial's start-up time goes: one start and one resume of the quickstart, broken into phases.

    .venv/bin/python bench/trial_startup.py            # ~2-3 min on 2 cores; writes bench/results/trial_startup-<time>.json

Every start of a run, and every start or resume of a search trial (successiveHalving resumes each
promoted trial), pays a worker group, a process group, the model load, DeepSpeed's initialize, a
baseline evaluation (a fresh start) or a checkpoint restore (a resume) before its first step
(issue 19). This script runs the real path, `finetune run -v`, twice in one invocation:
  start:  the quickstart (MiniLM, 2 workers, ZeRO-2) for --steps steps, a checkpoint every 2 steps;
  resume: `finetune run --resume` of the same manifest with --steps more steps, which continues from
          the first run's latest complete checkpoint (no baseline evaluation, a restore instead).
The figures are the product's own marks, not guesses: the driver logs when fit() starts and rank 0
of the workers logs wall-clock marks of its set-up once its first step is done
(trainer/finetune_trainer/phases.py; both at debug level, which -v shows). The worker process's
own start is psutil's create_time. Between fit() and that, Ray Train starts its controller, the
placement group and the worker actors; between the worker process's start and the loop, Ray Train
sets up torch.distributed's process group and the worker imports the recipe.

It also times the imports each kind of fresh process pays (a cold `python -c "import X"` each,
after the runs, so the page cache is warm as it is for a run's own actors).
Wall-clock figures on a shared 2-core machine vary run to run (1.3-1.7x seen): compare phases
within one result, and results of one machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
FINETUNE = Path(sys.executable).parent / "finetune"
sys.path.insert(0, str(ROOT / "trainer"))
from finetune_trainer.phases import FIT_MARKER, MARKER  # noqa: E402  (after the path, for a checkout without install)

log = logging.getLogger("bench.trial_startup")

# the worker's marks in the order they happen, each phase named by the mark that ends it
PHASES = [
    ("worker_group_up", "process_started", "fit() called -> worker process created (controller, placement group, actors)"),
    ("worker_process_to_loop", "loop_entered", "worker process -> train loop (Ray Train worker set-up, process group, recipe import)"),
    ("data_from_object_store", "data_ready", "the prepared data fetched from the object store"),
    ("model_load", "model_loaded", "pre-trained model loaded, freezing or adapters applied"),
    ("deepspeed_initialize", "deepspeed_initialized", "deepspeed.initialize (ZeRO optimizer)"),
    ("probes", "probes_ready", "samples / reference perplexity probes"),
    ("checkpoint_restore", "restored", "checkpoint chosen, verified and loaded (a resume)"),
    ("guards", "guards_ready", "non-finite and preemption guards (a gloo group)"),
    ("baseline_eval", "baseline_evaluated", "baseline evaluation (a fresh start)"),
    ("first_step", "first_step", "the first optimizer step"),
]
IMPORTS = {
    "worker: finetune_trainer.recipe": "import finetune_trainer.recipe",
    "worker: ray.train.torch": "import ray.train.torch",
    "worker: deepspeed": "import deepspeed",
    "controller: ray.train.v2 controller": "import ray.train.v2._internal.execution.controller.controller",
    "tracker: finetune_trainer.driver": "import finetune_trainer.driver",
    "bare python + ray": "import ray",
}


def manifest(out: Path, steps: int) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec = doc["spec"]
    spec["training"]["maxSteps"] = steps
    spec["evaluation"]["everySteps"] = 2
    spec["output"]["dir"] = str(out / "runs")
    path = out / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run(path: Path, *extra: str) -> dict[str, Any]:
    """`finetune run -v` once; its fit start and rank 0's marks, read from its output."""
    launched = time.time()
    done = subprocess.run([str(FINETUNE), "run", "-v", "--no-progress", str(path), *extra], capture_output=True, text=True,
                          env=os.environ | {"RAY_memory_monitor_refresh_ms": "0"}, check=False)
    ended = time.time()
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"finetune run failed ({done.returncode}):\n{text[-4000:]}")
    fit = re.search(re.escape(FIT_MARKER) + r" ([0-9.]+)", text)
    marks = re.search(re.escape(MARKER) + r" (\{.*?\})", text)
    if not fit or not marks:
        raise SystemExit(f"no start-up marks in the run's output (is phases.py's debug line shown by -v?):\n{text[-4000:]}")
    return phases(float(fit.group(1)), json.loads(marks.group(1)), launched, ended)


def phases(fit: float, marks: dict[str, float], launched: float, ended: float) -> dict[str, Any]:
    rows, before = {}, fit
    for name, mark, _ in PHASES:
        if mark in marks:
            rows[name] = round(marks[mark] - before, 3)
            before = marks[mark]
    return {
        "cli_to_fit_s": round(fit - launched, 3),  # CLI import, preflight, Ray start, data preparation
        "phases_s": rows,
        "fit_to_first_step_s": round(marks["first_step"] - fit, 3),
        "worker_process_to_first_step_s": round(marks["first_step"] - marks["process_started"], 3),
        "whole_command_s": round(ended - launched, 3),
        "marks": marks,
    }


def import_seconds() -> dict[str, float]:
    out = {}
    for name, statement in IMPORTS.items():
        code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[name] = round(float(done.stdout.strip().splitlines()[-1]), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps of the first run; the resume runs as many more")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = run(manifest(out, args.steps))
        log.info("start:  %s", json.dumps(start["phases_s"]))
        resume = run(manifest(out, 2 * args.steps), "--resume")
        log.info("resume: %s", json.dumps(resume["phases_s"]))
    result = {
        "bench": "trial_startup",
        "when": datetime.now(UTC).isoformat(),
        "setup": {"manifest": "examples/quickstart.yaml", "steps": args.steps, "every_steps": 2, "workers": 2,
                  "machine": f"{os.cpu_count()} cores"},
        "phase_meaning": {name: meaning for name, _, meaning in PHASES},
        "start": start,
        "resume": resume,
        "imports_s": import_seconds(),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"trial_startup-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log.info("%s", json.dumps({k: result[k] for k in ("start", "resume", "imports_s")}, indent=2))
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
