"""SIGTERM means "save if you can" (issue 16, item 2), on a real local `finetune run` (its own Ray,
Ray Train + DeepSpeed ZeRO-2 on 2 gloo workers, a tiny BERT): SIGTERM to the driver mid-training
leaves a complete checkpoint of the step it was at (not only the last regular one), the process
exits 143 promptly saying so, and `finetune run --resume` continues from that step to the same
final evaluation as an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_trainer.storage import LocalStore, list_complete_checkpoints

from . import fault_kit, tiny
from .fault_kit import ROOT, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

STEPS, EVERY = 800, 400  # 20-40 steps/s here: the notice (Ray Train polls every 5 s) lands between regular checkpoints


def _finetune(manifest: Path, log: Path) -> subprocess.Popen:
    """`finetune run MANIFEST` with a Ray of its own, in its own session: the process SIGTERM goes to."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "finetune_trainer", "run", str(manifest), "--no-progress"],
                                env={**os.environ, "RAY_ADDRESS": ""}, cwd=ROOT, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)


def _history(run_dir: Path) -> list[dict]:
    import json

    return json.loads((run_dir / "results.json").read_text())["history"]


def test_sigterm_saves_the_step_it_was_at_and_resume_continues_from_it(local_ray, assets, tmp_path, capsys):
    from finetune_trainer.cli import main
    from finetune_trainer.run import run
    from finetune_trainer.spec import parse_job

    doc = fault_kit.job_doc(tmp_path / "job", assets, steps=STEPS, every=EVERY)
    doc["spec"]["runPolicy"] = {"terminationGracePeriodSeconds": 90}
    manifest = tiny.save_manifest(tmp_path / "job.yaml", doc)
    store, job_dir = LocalStore(tmp_path / "job" / "runs" / "t"), tmp_path / "job" / "runs" / "t"
    log = tmp_path / "driver.log"
    driver = _finetune(manifest, log)
    try:
        def first_checkpoint():
            assert driver.poll() is None, f"the run ended before the signal:\n{log.read_text(errors='replace')[-3000:]}"
            return list_complete_checkpoints(store, "")
        first = wait_for("the first regular checkpoint", first_checkpoint, 400)[0]
        assert first.step == EVERY
        time.sleep(1)  # some steps past it
        signalled = time.monotonic()
        os.kill(driver.pid, signal.SIGTERM)  # the driver only, as `kill PID` does
        code = driver.wait(120)
        took = time.monotonic() - signalled
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(30)
    out = log.read_text(errors="replace")
    print(out[-2500:])
    assert code == 128 + signal.SIGTERM
    saved = re.search(r"SIGTERM: saved a complete checkpoint at step (\d+) \((\S+)\)", out)
    assert saved, "no line saying which step was saved"
    step = int(saved.group(1))
    assert EVERY < step < STEPS and step % EVERY, f"step {step}: not a step between the regular checkpoints"
    assert took < 60, f"exited {took:.0f} s after SIGTERM"
    complete = {c.step: c for c in list_complete_checkpoints(store, "")}
    assert step in complete  # complete in storage: its _COMPLETE.json lists every file
    assert f"preemption notice at step {step}" in out

    # --resume continues from that step, to the same final evaluation as an uninterrupted run; in
    # this process, on the session's Ray (a Ray of its own would cost its start-up, and nothing
    # signals this run)
    assert main(["run", str(manifest), "--no-progress", "--resume"]) == 0, "".join(capsys.readouterr())[-3000:]
    resumed = max((p for p in job_dir.iterdir() if (p / "results.json").exists()), key=lambda p: p.name)
    history = _history(resumed)
    rows = [r for r in history if not r.get("baseline") and r["step"] > step]  # the resumed attempt's
    kept = [r["step"] for r in history if r["step"] <= step]
    # the curve before the resume point is kept (from the checkpoint), ending with the preemption's own evaluation
    assert history[0].get("baseline") and kept[-1] == step and history[len(kept) - 1].get("preempted"), kept
    assert rows[0]["resumed_from_step"] == step and rows[0]["step"] == (step // EVERY + 1) * EVERY and rows[-1]["step"] == STEPS

    reference = run(parse_job(fault_kit.job_doc(tmp_path / "ref", assets, steps=STEPS, every=EVERY, name="ref")))
    want = [r for r in reference.results["history"] if not r.get("baseline")][-1]["eval_loss"]
    assert rows[-1]["eval_loss"] == pytest.approx(want, rel=1e-4)
