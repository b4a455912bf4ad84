"""Which evaluation is better, the best row, early stopping, and a run that diverged: torch-free.

The driver ranks checkpoints and trials and the search's callbacks pick the best trial with these,
and the recipe stops early with the same rule, so the comparison is written once, here, in a module
that pulls in neither torch nor pandas (tests/unit/test_architecture.py checks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_better(value: float | None, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in direction `mode` (min/max).

    A NaN or infinite value is worse than anything and never better; a best that is not finite
    (one kept before this rule, or loaded from an old checkpoint) is beaten by any finite value.
    Without that, a NaN first evaluation would freeze the best: every comparison with NaN is False.
    """
    if not finite(value):
        return False
    assert value is not None
    if best is None or not finite(best):
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def best_row(rows: list[dict[str, Any]], key: str, mode: str, *, tiebreak: tuple[str, ...] = ("step",)) -> dict[str, Any]:
    """The row with the best `key` in direction `mode` among those where it is a finite number
    ({} if none): a row whose metric is NaN or infinite is never the best.

    Ties (the same value exactly: common for accuracy on a small held-out split) go to the row
    with the lower `tiebreak` values, compared in order (a row without one comes after those with
    it), then to the earlier row. The default, the earlier step, is what the recipe does while
    training (only a strictly better evaluation becomes the best, as in transformers' Trainer), so
    the best checkpoint named and the model exported agree; trials pass their own (search_results).
    """
    scored = [r for r in rows if finite(r.get(key))]
    if not scored:
        return {}
    top = (min if mode == "min" else max)(r[key] for r in scored)
    tied = [r for r in scored if r[key] == top]
    return min(tied, key=lambda r: tuple((0, r[k]) if finite(r.get(k)) else (1, 0.0) for k in tiebreak))


NON_FINITE_KEY = "non_finite_loss"  # in the row a run reports when nonFiniteLoss: stop ended it: {"step", "detected_at_step"}
NON_FINITE_REASON = "NonFiniteLoss"  # the failure reason the status names


class NonFiniteLoss(RuntimeError):
    """The run (or search trial) stopped because its loss became NaN or infinite at `step`
    (spec.training.nonFiniteLoss: stop). The workers end normally after reporting it, so Ray Train
    does not restart them into the same divergence; the driver raises this from their last row."""

    reason = NON_FINITE_REASON

    def __init__(self, step: int, detected_at_step: int | None = None, trial: str | None = None):
        self.step, self.detected_at_step, self.trial = step, detected_at_step, trial
        where = f"trial {trial}: " if trial else ""
        noticed = f", noticed at the evaluation of step {detected_at_step}" if detected_at_step not in (None, step) else ""
        super().__init__(f"{where}the training loss was NaN or infinite at step {step}{noticed}; the run stopped "
                         "(spec.training.nonFiniteLoss: stop). Lower training.learningRate, or set maxGradNorm; "
                         "nonFiniteLoss: skipStep drops such steps instead")


def raise_if_diverged(rows: list[dict[str, Any]] | dict[str, Any]) -> None:
    """NonFiniteLoss when the last reported row (or a row given alone: Ray's result.metrics) says
    the run stopped on a non-finite loss; nothing otherwise."""
    last = rows if isinstance(rows, dict) else next((r for r in reversed(rows) if "step" in r), {})
    found = last.get(NON_FINITE_KEY)
    if isinstance(found, dict) and found.get("step") is not None:
        raise NonFiniteLoss(found["step"], found.get("detected_at_step"), last.get("trial"))


@dataclass
class EarlyStopping:
    """Patience on a metric, with a minimum change that counts as improvement.

    transformers' EarlyStoppingCallback only plugs into its Trainer; this loop is our own, so the
    same rule (patience, threshold) is kept here, with its state saved in checkpoints.
    """

    mode: str
    patience: int | None
    min_delta: float = 0.0
    best: float | None = None
    bad_evals: int = 0
    history: list[float] = field(default_factory=list)

    def update(self, value: float) -> bool:
        """Record an evaluation; True when training should stop. A non-finite value counts as an
        evaluation without improvement and never becomes the best (`is_better`)."""
        self.history.append(value)
        if is_better(value, self.best, self.mode, self.min_delta):
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals, self.history = state["best"], state["bad_evals"], list(state["history"])
