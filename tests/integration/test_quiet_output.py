"""What `finetune run` writes when its output is not a terminal (CI, `kubectl logs`, a file):
every evaluation line, the final table, and little else; no escape codes. `-v` brings the
libraries' own output back, in the Ray workers too.

The CLI runs as a subprocess with stdout and stderr into one pipe, as a newcomer's
`finetune run examples/quickstart.yaml > log 2>&1` has it, on a tiny model (tests/integration/tiny.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from finetune_trainer.logs import RAY_DATA_LOGGING_CONFIG, VERBOSE_ENV
from finetune_trainer.report import format_row

from . import tiny

ROOT = Path(__file__).resolve().parents[2]
MOST_LINES = 25  # besides the final table (issue 15: the quickstart wrote 74)
ESC = "\x1b"
# set by the test session or by an in-process `finetune` call of an earlier test: the CLI must set them itself
INHERITED = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_COLOR_PREFIX",
             "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", RAY_DATA_LOGGING_CONFIG, VERBOSE_ENV}


def _finetune_run(tmp_path: Path, *flags: str, max_steps: int) -> tuple[str, dict]:
    """(everything the CLI wrote, in order; its results.json) for a 2-worker ZeRO-2 run."""
    model = tiny.make_model(tmp_path / "model", "bert", layers=2)
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.sentiment_rows(160))
    doc = tiny.manifest(tmp_path, model, data, data={"testSplit": 0.1}, training={"maxSteps": max_steps})
    manifest = tiny.save_manifest(tmp_path / "job.yaml", doc)
    home = tmp_path / "home"  # Ray writes its token to ~/.ray/auth_token: this test's own
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in INHERITED} | {"HOME": str(home), "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-m", "finetune_trainer", "run", str(manifest), *flags], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-4000:]
    (found,) = (tmp_path / "runs").glob("*/run-*/results.json")
    return done.stdout, json.loads(found.read_text())


def test_a_run_into_a_pipe_writes_its_evaluations_and_table_and_little_else(tmp_path):
    out, results = _finetune_run(tmp_path, max_steps=12)
    lines = out.splitlines()
    title = next(i for i, line in enumerate(lines) if f"{results['job']} — {results['run']}" in line)
    before_table = lines[:title]
    shown = "\n".join(before_table)
    evaluations = [format_row(row) for row in results["history"]]
    assert len(evaluations) == 4  # baseline, steps 4, 8, 12
    assert all(line in before_table for line in evaluations), shown
    assert len(before_table) <= MOST_LINES, shown
    assert ESC not in out, shown
    for noise in ("LOAD REPORT", "Loading weights", "Writing model shards", "Setting accelerator to CPU", "FutureWarning",
                  "Token authentication is enabled", "PreemptionWatcher", "Started a local Ray instance",
                  "Setting up process group", "RayDeprecationWarning", "Starting execution of Dataset", "Execution plan",
                  "Progress bars disabled", "exclude_resources", "not writable"):
        assert noise not in out, noise
    # our own lines come from the worker, through the `finetune_trainer` logger, once (rank 0 only)
    assert sum("[finetune] BertForSequenceClassification:" in line for line in before_table) == 1, shown
    # then where the results are, and how to try the model
    assert [line.split(":")[0] for line in lines[-3:]] == ["results", "per-class figures", "try it"], lines[-3:]


def test_verbose_brings_the_libraries_output_back_in_the_workers(tmp_path):
    out, results = _finetune_run(tmp_path, "-v", max_steps=4)
    assert format_row(results["history"][-1]) in out
    assert "LOAD REPORT" in out  # transformers at its default verbosity, in a Ray Train worker
    assert "Setting up process group" in out  # Ray Train at INFO
    assert "Starting execution of Dataset" in out  # Ray Data at INFO (the driver's ingest)
    assert "[finetune finetune_trainer.recipe] info: BertForSequenceClassification:" in out  # our logger in the worker, -v format
