"""Synchronous successive halving: every trial runs to a rung and waits there, paused, until all
have; then only the best 1/reductionFactor resume, from their own checkpoint.

Why beside ASHA: asynchronous ASHA decides at a rung from the trials that reached it first, so
the first trials of a search run far past what their metric earns and the cost depends on the
order trials arrive in (bench/search_efficiency.py measured 0.28-0.59 of a grid's trial-steps for
three orders of the same 27 configurations). Here every decision sees every trial.

What Tune does and what is ours:
  - The halving itself is Tune's HyperBand bracket (`_Bracket`: rung bookkeeping, ranking, pausing
    and stopping). Tune's HyperBandScheduler sizes its brackets from max_t alone (the first
    bracket's first rung is max_t / eta^s, 1 step at 135 steps) and cannot be given a minimum
    resource or the number of trials, so `_create_bracket` makes one bracket holding every trial,
    first rung at gracePeriod.
  - The bracket must hold every trial before its first rung is decided, so the searcher is not
    given a concurrency limit (a limited searcher creates trials only as others finish, and
    paused ones never finish). Tune starts an actor for every pending trial whose resources fit,
    and a trial actor asks for no CPU (tuning.TRIAL_RESOURCES), so nothing in Tune bounds how
    many trials train at once: `TrialGate` does. A trial takes a slot before it starts its
    TorchTrainer; the scheduler gives the slot back when it pauses or stops the trial, or the
    trial ends. Hand-written: Ray has no semaphore, and a custom resource cannot be added to a
    running cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

import ray
from ray.actor import ActorHandle
from ray.tune.experiment import Trial
from ray.tune.schedulers import HyperBandScheduler, TrialScheduler
from ray.tune.schedulers.hyperband import _Bracket

log = logging.getLogger(__name__)


def rungs(grace: int, max_t: int, reduction_factor: float) -> list[int]:
    """The steps at which trials are compared: grace, grace x rf, ... up to max_t (Tune's
    `_Bracket.successive_halving` multiplies and caps the same way)."""
    out = [min(grace, max_t)]
    while out[-1] < max_t:
        out.append(int(min(out[-1] * reduction_factor, max_t)))
    return out


def gate_name(run_id: str) -> str:
    return f"finetune-trial-gate-{run_id}"


class TrialGate:
    """`slots` trials train at once; the others wait their turn in the order they asked.

    An asyncio actor (every method async, so all run on its one event loop): a waiting trial
    blocks in `wait_turn` until a release lets it in, rather than asking every second. With 26
    of 27 trials waiting, those polls cost the 2-core benchmark machine a few percent of a core
    all search long, and each start up to a second."""

    def __init__(self, slots: int):
        self.slots = slots
        self.holders: set[str] = set()
        self.waiting: list[str] = []
        self._released = asyncio.Event()  # set by every release; waiters look again

    def _take(self, trial: str) -> bool:
        if trial in self.holders:
            return True
        if trial not in self.waiting:
            self.waiting.append(trial)
        if self.waiting.index(trial) < self.slots - len(self.holders):
            self.waiting.remove(trial)
            self.holders.add(trial)
            return True
        return False

    async def acquire(self, trial: str) -> bool:
        """A slot now if this trial's turn has come (it queues otherwise)."""
        return self._take(trial)

    async def wait_turn(self, trial: str) -> None:
        """Returns once this trial holds a slot. A waiter that looks and is not first in line
        stays not-first until the next release (a grant ahead of it frees no slot), so waking
        every waiter on each release and letting each look again keeps the order."""
        while not self._take(trial):
            released = self._released
            await released.wait()

    async def release(self, trial: str) -> None:
        self.holders.discard(trial)
        if trial in self.waiting:
            self.waiting.remove(trial)
        woken, self._released = self._released, asyncio.Event()  # a fresh one for the next round of waits
        woken.set()

    async def state(self) -> dict[str, Any]:
        return {"slots": self.slots, "holders": sorted(self.holders), "waiting": list(self.waiting)}


# Wrapped rather than decorated: a class decorator does not change the class's type for a type
# checker, so `TrialGate.options(...)` would not type-check; this is Ray's ActorClass[TrialGate].
_TrialGateActor = ray.remote(num_cpus=0)(TrialGate)


def start_gate(run_id: str, slots: int) -> ActorHandle[TrialGate]:
    """The gate of this search, named so that trials and the scheduler find it without holding a
    handle (both are pickled into Tune's experiment state)."""
    gate = _TrialGateActor.options(name=gate_name(run_id), get_if_exists=True, lifetime=None).remote(slots)
    # Ray types it as ActorProxy (handle | class), so that method calls type-check; it is the handle
    return cast("ActorHandle[TrialGate]", gate)


def wait_for_slot(run_id: str, trial: str) -> None:
    """Blocks the trial until it may train. Called in the trial's own actor."""
    gate: Any = ray.get_actor(gate_name(run_id))  # as in holders: Ray types a handle's methods as Never
    if not ray.get(gate.acquire.remote(trial)):
        log.info("%s: waiting for one of the search's training slots", trial)
        ray.get(gate.wait_turn.remote(trial))


def holders(run_id: str) -> set[str] | None:
    """The trials holding a slot of this search's gate now (None: the search has no gate)."""
    if not ray.is_initialized():
        return None
    try:
        gate: Any = ray.get_actor(gate_name(run_id))  # Ray types a handle's methods as Never: called untyped
    except ValueError:
        return None
    state: dict[str, Any] = ray.get(gate.state.remote(), timeout=10)
    return set(state["holders"])


class SuccessiveHalving(HyperBandScheduler):
    """One HyperBand bracket of `num_trials`, rungs from `rungs`; trials hold a `TrialGate` slot
    only while they train."""

    def __init__(self, *, time_attr: str, max_t: int, grace_period: int, reduction_factor: float, num_trials: int,
                 run_id: str):
        super().__init__(time_attr=time_attr, max_t=max_t, reduction_factor=reduction_factor)
        self._grace, self._num_trials, self._run_id = min(grace_period, max_t), num_trials, run_id

    def _create_bracket(self, s: int) -> _Bracket:
        return _Bracket(time_attr=self._time_attr, max_trials=self._num_trials, init_t_attr=self._grace,
                        max_t_attr=self._max_t_attr, eta=self._eta,
                        s=len(rungs(self._grace, self._max_t_attr, self._eta)) - 1)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        """A restored search adds every trial again: ended ones take no part, and unfinished ones
        enter the bracket where they had got to (the bracket counts its survivors from
        num_trials, not from the trials it holds, so its rungs replay to the same place)."""
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            return
        super().on_trial_add(tune_controller, trial)
        last = trial.last_result or {}
        if self._time_attr in last and self._metric in last:
            self._trial_info[trial][0].update_trial_stats(trial, last)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        if self._time_attr not in result or self._metric not in result or result.get("baseline"):
            return TrialScheduler.CONTINUE  # the untouched model's score decides nothing (and Tune logs a 0-step report as a restore)
        action = super().on_trial_result(tune_controller, trial, result)
        if action != TrialScheduler.CONTINUE:
            self._release(trial)
        return action

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._release(trial)
        if trial in self._trial_info:
            super().on_trial_remove(tune_controller, trial)

    def _release(self, trial: Trial) -> None:
        if not ray.is_initialized():  # driven without Ray (tests/unit/test_halving.py); get_actor would start one
            return
        with contextlib.suppress(ValueError):  # no gate of this name
            ray.get_actor(gate_name(self._run_id)).release.remote(str(trial))
