"""SuccessiveHalving's decisions, driven the way Tune's controller drives a scheduler (trials
added, results reported, paused ones stopped or chosen to run again), without Ray."""

from __future__ import annotations

import asyncio

from ray.tune.schedulers import TrialScheduler

from finetune_trainer.halving import SuccessiveHalving, TrialGate, rungs


class _Trial:
    """What the scheduler reads of a Tune Trial."""

    def __init__(self, name: str, status: str = "PENDING", last_result: dict | None = None):
        self.name, self.status, self.last_result, self.is_saving = name, status, last_result, False

    def __str__(self) -> str:
        return self.name


class _Controller:
    """TuneController.stop_trial's part the scheduler sees: a paused trial stopped is removed."""

    def __init__(self):
        self.stopped: list[str] = []
        self.scheduler: SuccessiveHalving | None = None

    def stop_trial(self, trial: _Trial) -> None:
        if trial.status in ("PENDING", "PAUSED") and self.scheduler is not None:
            self.scheduler.on_trial_remove(self, trial)
        trial.status = "TERMINATED"
        self.stopped.append(str(trial))


def _scheduler() -> tuple[SuccessiveHalving, _Controller]:
    sched = SuccessiveHalving(time_attr="step", max_t=12, grace_period=3, reduction_factor=2, num_trials=4, run_id="test")
    sched.set_search_properties("eval_loss", "min")
    controller = _Controller()
    controller.scheduler = sched
    return sched, controller


def _report(sched, controller, trial: _Trial, step: int, loss: float) -> str:
    trial.status = "RUNNING"
    action = sched.on_trial_result(controller, trial, {"step": step, "eval_loss": loss})
    if action == TrialScheduler.PAUSE:
        trial.status = "PAUSED"
    trial.last_result = {"step": step, "eval_loss": loss}
    return action


def test_rungs_multiply_from_the_grace_period_and_stop_at_max_t():
    assert rungs(10, 135, 3) == [10, 30, 90, 135]
    assert rungs(5, 135, 3) == [5, 15, 45, 135]
    assert rungs(3, 12, 2) == [3, 6, 12]
    assert rungs(20, 10, 3) == [10]


def test_every_trial_waits_at_the_rung_then_the_better_half_goes_on():
    sched, controller = _scheduler()
    trials = [_Trial(f"trial_{i:02d}") for i in range(4)]
    for t in trials:
        sched.on_trial_add(controller, t)
    # the baseline (step 0) decides nothing
    assert sched.on_trial_result(controller, trials[0], {"step": 0, "eval_loss": 0.1, "baseline": True}) == TrialScheduler.CONTINUE
    assert [_report(sched, controller, t, 3, loss) for t, loss in zip(trials[:3], (0.5, 0.9, 0.3), strict=True)] == [TrialScheduler.PAUSE] * 3
    assert sched.choose_trial_to_run(controller) is trials[3]  # the one not at the rung yet
    # the last to arrive is decided on while it runs: worst of four, stopped; so is the paused trial_01
    assert _report(sched, controller, trials[3], 3, 0.7) == TrialScheduler.STOP
    assert controller.stopped == ["trial_01"]
    assert sched.choose_trial_to_run(controller) in (trials[0], trials[2])
    # the two kept ones meet at 6: the better finishes, the other is stopped there
    assert _report(sched, controller, trials[2], 6, 0.2) == TrialScheduler.PAUSE
    assert _report(sched, controller, trials[0], 6, 0.4) == TrialScheduler.STOP
    assert sched.choose_trial_to_run(controller) is trials[2]
    assert _report(sched, controller, trials[2], 9, 0.15) == TrialScheduler.CONTINUE


def test_a_restored_search_replays_its_rungs_from_where_trials_had_got_to():
    """Tune adds every trial of a restored search again, ended ones included; the bracket leaves
    those out and picks up the others at their last report."""
    sched, controller = _scheduler()
    ended = [_Trial("trial_01", "TERMINATED", {"step": 3, "eval_loss": 0.9}), _Trial("trial_03", "TERMINATED", {"step": 3, "eval_loss": 0.7})]
    kept = [_Trial("trial_00", "PENDING", {"step": 3, "eval_loss": 0.5}), _Trial("trial_02", "PENDING", {"step": 3, "eval_loss": 0.3})]
    for t in [*ended, *kept]:
        sched.on_trial_add(controller, t)
    # trial_00 goes on from its rung-3 checkpoint and waits at 6 for trial_02
    assert _report(sched, controller, kept[0], 6, 0.4) == TrialScheduler.PAUSE
    assert _report(sched, controller, kept[1], 6, 0.2) == TrialScheduler.CONTINUE
    assert controller.stopped == ["trial_00"]


def test_the_gate_lets_waiting_trials_in_in_order_the_moment_a_slot_frees() -> None:
    """The trials' actors wait inside the gate (`wait_turn`), not by asking it every second: the
    first in line gets a released slot at once; the next still waits until another is released."""

    async def scenario() -> None:
        gate = TrialGate(2)
        assert await gate.acquire("a") and await gate.acquire("b")
        waits = {t: asyncio.create_task(gate.wait_turn(t)) for t in ("c", "d")}
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in waits.values())
        assert (await gate.state())["waiting"] == ["c", "d"]
        await gate.release("b")
        await asyncio.wait_for(waits["c"], 1)
        await asyncio.sleep(0.01)
        assert not waits["d"].done() and (await gate.state()) == {"slots": 2, "holders": ["a", "c"], "waiting": ["d"]}
        await gate.release("a")
        await asyncio.wait_for(waits["d"], 1)
        assert (await gate.state()) == {"slots": 2, "holders": ["c", "d"], "waiting": []}
        assert await gate.acquire("d")  # a holder asking again keeps its slot

    asyncio.run(scenario())
