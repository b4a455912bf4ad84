"""Where a trial's start-up time goes: one start and one resume of the quickstart, broken into phases.

    .venv/bin/python bench/trial_startup.py                      # ~5 min on 2 cores; writes bench/results/trial_startup-<time>.json
    .venv/bin/python bench/trial_startup.py --reference REV      # and the same runs of commit REV, alternating: ~10 min
    .venv/bin/python bench/trial_startup.py --cpu                # and the later trial's start split into each process kind's CPU seconds

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

search: the quickstart as a 2-configuration grid search (two learning rates), one trial at a time,
        --steps steps each: the second trial starts when the first ends and reuses its baseline
        evaluation (baseline.py), as every later trial of a search does. This is the issue's target,
        "one trial start, slot acquired to first step <= 10 s": the trial's actor logs when it got
        its slot (the halving gate's turn, else its own process' start, which Tune makes once the
        trial's resources are reserved) and when its fit() began (phases.trial_started).

--reference REV runs the same three of commit REV too, from a git worktree put first on PYTHONPATH
(the venv, Ray and the data are the same), alternating with this checkout run by run, so both lie
in one invocation on the machine in one state (a shared machine moves absolute seconds by 1.3-2x).

It also times the imports each kind of fresh process pays (a cold `python -c "import X"` each,
after the runs, so the page cache is warm as it is for a run's own actors).
Wall-clock figures on a shared 2-core machine vary run to run (1.3-1.7x seen): compare phases
within one result, and results of one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # comes with Ray; no stubs installed
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
FINETUNE = Path(sys.executable).parent / "finetune"
sys.path.insert(0, str(ROOT / "trainer"))
from finetune_trainer.phases import FIT_MARKER, MARKER, TRIAL_MARKER  # noqa: E402  (after the path, for a checkout without install)

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


def manifest(out: Path, steps: int, *, search: bool = False) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec = doc["spec"]
    spec["training"]["maxSteps"] = steps
    spec["evaluation"]["everySteps"] = 2
    spec["output"]["dir"] = str(out / "runs")
    if search:  # two trials one after the other; the second's start is what a search's later trials pay
        spec["data"]["testSplit"] = None  # scoring the test split is after every trial: not measured
        spec["output"]["export"] = "none"
        spec["search"] = {"algorithm": "grid", "maxConcurrentTrials": 1, "scheduler": {"type": "none"},
                          "space": {"training.learningRate": {"grid": [1.0e-4, 3.0e-4]}}}
    path = out / ("search.yaml" if search else "job.yaml")
    path.write_text(yaml.safe_dump(doc))
    return path


def launch(path: Path, extra: tuple[str, ...], pythonpath: Path | None) -> tuple[str, float, float]:
    """`finetune run -v` once; its whole output and when it was launched and ended."""
    env = os.environ | {"RAY_memory_monitor_refresh_ms": "0"}
    if pythonpath is not None:  # the reference's finetune_trainer before this checkout's (editable) one
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])])
    launched = time.time()
    done = subprocess.run([str(FINETUNE), "run", "-v", "--no-progress", str(path), *extra], capture_output=True, text=True,
                          env=env, check=False)
    ended = time.time()
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"finetune run failed ({done.returncode}):\n{text[-4000:]}")
    return text, launched, ended


def _marks(text: str) -> list[dict[str, Any]]:
    return [json.loads(m) for m in re.findall(re.escape(MARKER) + r" (\{.*?\})", text)]


def run(path: Path, *extra: str, pythonpath: Path | None = None) -> dict[str, Any]:
    """A plain run (or --resume): its fit start and rank 0's marks."""
    text, launched, ended = launch(path, extra, pythonpath)
    fit = re.search(re.escape(FIT_MARKER) + r" ([0-9.]+)", text)
    marks = _marks(text)
    if not fit or not marks:
        raise SystemExit(f"no start-up marks in the run's output (is phases.py's debug line shown by -v?):\n{text[-4000:]}")
    return phases(float(fit.group(1)), marks[0], launched, ended)


class ProcessCpu:
    """Every process's CPU seconds (user + system), sampled every 0.2 s in a thread while a command
    runs, so that a window of it (a trial's slot to its first step) splits into the processes that
    spent it, named by their Ray title (`ray::TrainController`, ...): on 2 cores a start is
    CPU-bound, and which processes it starts decides its length. The sampling costs ~5% of a core."""

    def __init__(self) -> None:
        self.series: dict[int, list[tuple[float, float]]] = {}
        self.titles: dict[int, str] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ProcessCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        me = os.getpid()
        while not self._done.wait(0.2):
            now = time.time()
            for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
                times, cmdline = proc.info["cpu_times"], proc.info["cmdline"] or []
                if proc.pid == me or times is None:
                    continue
                self.series.setdefault(proc.pid, []).append((now, times.user + times.system))
                title = " ".join(cmdline)
                if title.startswith("ray::") or proc.pid not in self.titles:  # a Ray worker is titled by its actor once it has one
                    self.titles[proc.pid] = title

    def window(self, start: float, end: float) -> dict[str, dict[str, float]]:
        """CPU seconds spent in [start, end], summed by process kind, with how many processes."""

        def at(points: list[tuple[float, float]], when: float) -> float:
            before = [cpu for t, cpu in points if t <= when]
            return before[-1] if before else 0.0

        kinds: dict[str, dict[str, float]] = {}
        for pid, points in self.series.items():
            spent = at(points, end) - at(points, start)
            if spent < 0.05:
                continue
            title = self.titles[pid]
            kind = title.split(" ")[0] if title.startswith("ray::") else Path(title.split(" ")[0]).name
            row = kinds.setdefault(kind, {"cpu_s": 0.0, "processes": 0})
            row["cpu_s"] = round(row["cpu_s"] + spent, 2)
            row["processes"] += 1
        return dict(sorted(kinds.items(), key=lambda kv: -kv[1]["cpu_s"]))


def search(path: Path, pythonpath: Path | None = None, *, cpu: bool = False) -> dict[str, Any]:
    """A 2-trial search: each trial from its slot, through its actor's fit(), to its first step.
    A checkout whose trial actor logs no slot line (before phases.trial_started) gives the
    workers' part only, from the worker process' start. With `cpu`, the later trial's start is
    also split into the CPU seconds each kind of process spent in it (ProcessCpu)."""
    with ProcessCpu() if cpu else contextlib.nullcontext() as sampler:
        text, launched, ended = launch(path, (), pythonpath)
    starts = {m["trial"]: m for m in (json.loads(m) for m in re.findall(re.escape(TRIAL_MARKER) + r" (\{.*?\})", text))}
    trials = {}
    for marks in sorted((m for m in _marks(text) if m.get("trial")), key=lambda m: m["process_started"]):
        start = starts.get(marks["trial"])
        row = phases(start["fit"] if start else marks["process_started"], marks, launched, ended)
        trials[marks["trial"]] = {"slot_to_fit_s": round(start["fit"] - start["slot_acquired"], 3) if start else None,
                                  "slot_to_first_step_s": round(marks["first_step"] - start["slot_acquired"], 3) if start else None, **row}
    if len(trials) != 2:
        raise SystemExit(f"expected the start-up marks of 2 trials, found {sorted(trials)}:\n{text[-4000:]}")
    later = list(trials.values())[1]
    if sampler is not None and later["slot_to_first_step_s"] is not None:
        slot = starts[list(trials)[1]]["slot_acquired"]
        window = sampler.window(slot, slot + later["slot_to_first_step_s"])
        later["cpu_by_process_s"] = window
        later["cpu_s"] = round(sum(row["cpu_s"] for row in window.values()), 2)
        later["cores_busy"] = round(later["cpu_s"] / later["slot_to_first_step_s"], 2)
    return {"trials": trials, "later_trial_slot_to_first_step_s": later["slot_to_first_step_s"],
            "later_trial_worker_process_to_first_step_s": later["worker_process_to_first_step_s"],
            "whole_command_s": round(ended - launched, 3)}


def phases(fit: float, marks: dict[str, Any], launched: float, ended: float) -> dict[str, Any]:
    rows, before = {}, fit
    for name, mark, _ in PHASES:
        if mark in marks:
            rows[name] = round(marks[mark] - before, 3)
            before = marks[mark]
    return {
        "cli_to_fit_s": round(fit - launched, 3),  # CLI import, preflight, Ray start, data preparation (a trial: its actor's start)
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


def checkout(rev: str, into: Path) -> Path:
    """A worktree of `rev` (detached); its trainer package goes first on the runs' PYTHONPATH."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev], check=True, capture_output=True)
    return into / "trainer"


def commit(where: Path = ROOT) -> str:
    done = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, check=False).stdout.strip()
    return done.stdout.strip() + ("+uncommitted" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps of the first run and of each trial; the resume runs as many more")
    parser.add_argument("--reference", metavar="REV", help="also run commit REV (a git worktree), alternating with this checkout")
    parser.add_argument("--cpu", action="store_true", help="split the later trial's start into each process kind's CPU seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result: dict[str, Any] = {
        "bench": "trial_startup",
        "setup": {"manifest": "examples/quickstart.yaml", "steps": args.steps, "every_steps": 2, "workers": 2,
                  "search": "grid over 2 learning rates, 1 trial at a time", "machine": f"{os.cpu_count()} cores"},
        "phase_meaning": {name: meaning for name, _, meaning in PHASES},
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sides: dict[str, Path | None] = {"current": None}
        if args.reference:
            sides = {"reference": checkout(args.reference, out / "reference"), "current": None}
        labels = {side: commit(path.parent if path else ROOT) for side, path in sides.items()}
        rows: dict[str, dict[str, Any]] = {side: {"commit": labels[side]} for side in sides}
        try:
            # alternating, run by run: each kind of start of both sides lies close in time
            for kind in ("start", "resume", "search"):
                for side, pythonpath in sides.items():
                    folder = out / side
                    folder.mkdir(exist_ok=True)
                    if kind == "start":
                        rows[side][kind] = run(manifest(folder, args.steps), pythonpath=pythonpath)
                    elif kind == "resume":
                        rows[side][kind] = run(manifest(folder, 2 * args.steps), "--resume", pythonpath=pythonpath)
                    else:
                        rows[side][kind] = search(manifest(folder, args.steps, search=True), pythonpath=pythonpath, cpu=args.cpu)
                    shown = rows[side][kind].get("phases_s") or {t: [r["slot_to_first_step_s"], r["phases_s"]]
                                                                 for t, r in rows[side][kind]["trials"].items()}
                    log.info("%s %s: %s", side, kind, json.dumps(shown))
        finally:
            if args.reference:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(out / "reference")], check=False)
    result |= {"when": datetime.now(UTC).isoformat(), **rows, "imports_s": import_seconds()}
    if args.reference:
        result["current_over_reference"] = {
            "start_fit_to_first_step": round(rows["current"]["start"]["fit_to_first_step_s"] / rows["reference"]["start"]["fit_to_first_step_s"], 3),
            "resume_fit_to_first_step": round(rows["current"]["resume"]["fit_to_first_step_s"] / rows["reference"]["resume"]["fit_to_first_step_s"], 3),
        }
        for key in ("later_trial_slot_to_first_step", "later_trial_worker_process_to_first_step"):
            now, then = rows["current"]["search"][f"{key}_s"], rows["reference"]["search"][f"{key}_s"]
            result["current_over_reference"][key] = round(now / then, 3) if now and then else None
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"trial_startup-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log.info("%s", json.dumps({k: v for k, v in result.items() if k not in ("phase_meaning", "setup")}, indent=2))
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
