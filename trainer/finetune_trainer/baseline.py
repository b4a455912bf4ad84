"""One baseline evaluation per search, not one per trial: the untouched model scores the same in
every trial whose model, data, seed, evaluation and worker layout are the same, so the first trial
that evaluates it hands the numbers to the search's progress tracker and later trials report them.

Which trials share one is decided by `key`, exactly rather than by guess: it is a hash of the
trial's whole spec with only the fields taken out that cannot change what the baseline evaluation
computes, because they act after it or only on training:
  - the optimizer and its schedule (learning rate, weight decay, Adam's settings, gradient
    clipping, the fused optimizer, every lrSchedule field): nothing has stepped at step 0;
  - how long training runs and what happens in it (maxSteps, epochs, gradient accumulation,
    nonFiniteLoss, evaluation.everySteps, evaluation.earlyStopping);
  - the freezing plan of every strategy but lora: it sets `requires_grad` and optimizer groups,
    never a weight (lora adds modules, so a lora trial's freezing section stays in its key);
  - the search, output, storage, cluster and run-policy sections (where results go, not what
    they are).
Everything else stays in the key, a field added to the spec later included: the model and its
head, dtype and quantization, the data and its splits, the seed (it draws the new head), dropout,
the batch size (evaluation batches are twice it, and padding follows the batch), DeepSpeed's
stage and precision, the evaluation's metrics and probes, and resources (the shards each rank
scores, the threads each uses). tests/unit/test_baseline.py checks the neutral fields against
real evaluations of a tiny model.

Skipping the evaluation changes nothing a trial trains with: `evaluation.evaluate` draws no random
numbers (the model is in eval mode; generated samples draw from a forked generator,
generation.py), so the trial's dropout masks and curve are those of one that evaluated.
Written by hand: Ray Tune and Train have no notion of a result shared between trials.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from .spec import FineTuneJobSpec

# dotted paths (the spec's YAML names) that cannot change the untouched model's evaluation (above)
NEUTRAL = (
    "training.learningRate", "training.weightDecay", "training.adamBeta1", "training.adamBeta2", "training.adamEpsilon",
    "training.fusedOptimizer", "training.maxGradNorm", "training.maxSteps", "training.epochs",
    "training.gradientAccumulationSteps", "training.nonFiniteLoss", "lrSchedule", "evaluation.everySteps",
    "evaluation.earlyStopping", "search", "output", "storage", "cluster", "runPolicy",
)
FREEZING = "freezing"  # neutral unless the strategy is lora


def key(spec: FineTuneJobSpec) -> str:
    """Equal for two specs exactly when their baseline evaluations compute the same thing."""
    doc = spec.model_dump(by_alias=True, mode="json")
    neutral = [*NEUTRAL, *([FREEZING] if spec.freezing.strategy != "lora" else [])]
    for path in neutral:
        *parents, leaf = path.split(".")
        section = doc
        for part in parents:
            section = section.get(part) or {}
        section.pop(leaf, None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def shared_or_evaluated(tracker: Any, trial: str | None, spec: FineTuneJobSpec, *, rank: int, world: int,
                        evaluate: Callable[[], dict[str, float]],
                        samples: Callable[[], list[dict[str, str]] | None]) -> tuple[dict[str, float], dict[str, Any] | None]:
    """The baseline's metrics: a search's earlier trial's with the same `key` when there is one
    (then the second item is `{"metrics", "samples", "trial"}` of that evaluation), else this
    trial's own evaluation, stored for the trials after it (second item None). Rank 0 asks the
    tracker and every rank follows its answer, since an evaluation is a collective."""
    if tracker is None or trial is None:  # a single run: nothing to share with
        return evaluate(), None
    import ray

    wanted = key(spec)
    found = ray.get(tracker.baseline.remote(wanted)) if rank == 0 else None
    if world > 1:
        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    if found is not None:
        return found["metrics"], found
    metrics = evaluate()
    if rank == 0:
        tracker.remember_baseline.remote(wanted, {"metrics": metrics, "samples": samples(), "trial": trial})
    return metrics, None
