"""A training loss that turns NaN (issue 16, item 6), on real Ray Train + DeepSpeed ZeRO-2 (gloo, 2
workers) and a tiny BERT. What diverges: learning rate 1.0 with adamBeta2 0 and adamEpsilon 1e-30,
so Adam's step is m/|g| and unbounded; the weights blow up at the second update and the loss is NaN
from the third step on (in the forward pass: DeepSpeed then drops every step, as its ZeRO optimizer
does for a non-finite gradient norm, so the weights stay finite and the loss stays NaN).

stop: the run ends at the next evaluation, its last row naming the first NaN step, with no
checkpoint from there on. skipStep: the run goes to maxSteps, counting the dropped steps; no
checkpoint with a NaN metric exists, so the best and the latest (the resume point) are finite.
"""

from __future__ import annotations

import math

import pytest

from finetune_trainer.ranking import NON_FINITE_KEY, NonFiniteLoss, raise_if_diverged
from finetune_trainer.spec import parse_job
from finetune_trainer.storage import LocalStore, latest_complete, list_complete_checkpoints

from . import fault_kit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def _diverging(tmp_path, assets, mode: str, steps: int, every: int = 2) -> dict:
    doc = fault_kit.job_doc(tmp_path, assets, steps=steps, every=every, name=f"nan-{mode.lower()}")
    doc["spec"]["training"] |= {"learningRate": 1.0, "adamBeta2": 0.0, "adamEpsilon": 1e-30, "nonFiniteLoss": mode}
    doc["spec"]["output"]["keepCheckpoints"] = 10
    return doc


def _checkpoints(result):
    store = LocalStore(result.run_dir.parent)
    return store, list_complete_checkpoints(store, result.run_dir.name)


@pytest.mark.parametrize(("every", "first", "detected"), [
    (4, 3, 4),  # the training loss at step 3, flagged on the device, read at the evaluation of step 4
    (1, 2, 2),  # the evaluation of step 2 (a finite checkpoint of step 1 before it)
])
def test_stop_ends_the_run_at_the_next_evaluation_naming_the_first_nan_step(local_ray, assets, tmp_path, every, first, detected):
    import json

    from finetune_trainer.run import run

    with pytest.raises(NonFiniteLoss, match=f"at step {first}") as caught:
        run(parse_job(_diverging(tmp_path, assets, "stop", steps=12, every=every)))
    assert (caught.value.reason, caught.value.step, caught.value.detected_at_step) == ("NonFiniteLoss", first, detected)
    job_dir = tmp_path / "runs" / "nan-stop"
    status = json.loads((job_dir / "status.json").read_text())  # what the operator reads: reason NonFiniteLoss
    print("status:", status)
    assert status["state"] == "failed" and status["nonFiniteLoss"] == first

    # every checkpoint is from before the NaN, with finite metrics; none of the stopping step
    (run_dir,) = [p for p in job_dir.iterdir() if p.is_dir() and p.name.startswith("run-")]
    store = LocalStore(job_dir)
    complete = list_complete_checkpoints(store, run_dir.name)
    assert [c.step for c in complete] == list(range(every, first, every)), [c.step for c in complete]
    assert all(math.isfinite(c.metrics["eval_loss"]) for c in complete)
    latest = latest_complete(store, run_dir.name)
    assert (latest.step if latest else None) == (complete[-1].step if complete else None)


def test_the_stop_row_names_the_step_and_the_driver_raises_from_it():
    rows = [{"step": 0, "baseline": True}, {"step": 4, NON_FINITE_KEY: {"step": 3, "detected_at_step": 4}, "trial": "trial_01"}]
    with pytest.raises(NonFiniteLoss, match="trial trial_01: the training loss was NaN or infinite at step 3, noticed at the evaluation of step 4"):
        raise_if_diverged(rows)
    raise_if_diverged(rows[:1])  # a run that did not diverge


def test_skip_step_trains_on_counting_the_dropped_steps_and_never_checkpoints_a_nan(local_ray, assets, tmp_path):
    from finetune_trainer.run import run

    result = run(parse_job(_diverging(tmp_path, assets, "skipStep", steps=8, every=1)))
    rows = [r for r in result.results["history"] if not r.get("baseline")]
    print("rows:", [(r["step"], r.get("train_loss"), r.get("eval_loss"), r.get("skipped_steps")) for r in rows])
    assert [r["step"] for r in rows] == list(range(1, 9))  # to maxSteps: nothing stopped it
    assert all(NON_FINITE_KEY not in r for r in rows)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 3, 4, 5, 6]  # the loss is NaN from step 3 on
    raise_if_diverged(result.results["history"])  # skipStep never fails the run

    store, complete = _checkpoints(result)
    nan_steps = {r["step"] for r in rows if not math.isfinite(r["eval_loss"])}
    assert nan_steps, "the model never evaluated to NaN: the test lost its divergence"
    assert complete and not nan_steps & {c.step for c in complete}  # no checkpoint of a NaN evaluation
    assert all(math.isfinite(c.metrics["eval_loss"]) for c in complete)
    assert latest_complete(store, result.run_dir.name).step not in nan_steps  # the resume point is finite
    assert result.results["best"]["step"] not in nan_steps and math.isfinite(result.results["best"]["value"])
