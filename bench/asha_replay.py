"""ASHA's cost over many trial orders, from one grid arm: Tune's own scheduler replayed on recorded curves.

    .venv/bin/python bench/asha_replay.py bench/results/search_efficiency-RESULT.json           # 200 orders
    .venv/bin/python bench/asha_replay.py bench/results/search_efficiency-RESULT.json --orders 1000

Why: asynchronous ASHA's trial-steps depend on the order trials arrive in (search_efficiency's
docstring), and a real ASHA run is one order and ~20 minutes here, so three runs say little about
the spread. Every trial is seeded, so a configuration's learning curve does not depend on when it
runs (the 2026-11-23 runs agree at every evaluation they share); the grid arm of a
search_efficiency result records each configuration's full curve and the seconds its trial took
to reach each evaluation. This feeds those curves, two trials at a time (--concurrent) on a clock
driven by those seconds, to the scheduler the product builds (`tuning.scheduler`, Tune's
ASHAScheduler), in the orders the product runs a grid in (`grid_order` of each seed).

It is an estimate beside the measured benchmark, not a replacement for it: it first replays the
result's real ASHA runs and prints, trial by trial, where the replay disagrees with them (a
disagreement comes from timing: which of two concurrent trials reported first at a rung).
Nothing here is written by hand that Tune does: the stopping decisions are Tune's.
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import search_efficiency  # the manifest the benchmark runs


class _Trial:
    """What Tune's ASHAScheduler reads of a trial: its id."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _job(report: dict[str, Any], seed: int):
    from finetune_trainer.spec import parse_job

    a = report["args"]
    doc = search_efficiency.manifest(Path("/nonexistent"), steps=a["steps"], grace=a["grace"], every=a["every"],
                                     scheduler="asha", concurrent=a["concurrent"], eval_samples=a["eval_samples"],
                                     space=report["space"], order_seed=seed, reduction=a.get("reduction_factor", 3))
    return parse_job(doc)


def _scheduler(job):
    from finetune_trainer.tuning import TrialTotals, scheduler

    # a budget in steps: the data's size does not shorten it (asserted below)
    sched = scheduler(job, TrialTotals(job, num_train=10**9))
    key, mode = job.spec.ranked_metric()
    sched.set_search_properties(key, mode)
    return sched, key


def replay(report: dict[str, Any], seed: int, curves: dict[str, list[list[float]]]) -> dict[str, Any]:
    """One ASHA search over the grid's configurations in grid_order(seed): trial-steps, best, and
    the step each configuration stopped at."""
    from ray.tune.schedulers import TrialScheduler

    from finetune_trainer.spec.search import grid_order

    job = _job(report, seed)
    sched, key = _scheduler(job)
    max_t = report["args"]["steps"]
    assert sched._max_t == max_t, (sched._max_t, max_t)
    pending = [_key(p) for p in grid_order(job.spec.search, seed)]
    events: list[tuple[float, int, int, str]] = []  # (clock, trial number, index in its curve, configuration)
    started = 0
    stopped_at: dict[str, int] = {}
    best = None

    def launch(clock: float) -> None:
        nonlocal started
        config = pending.pop(0)
        sched.on_trial_add(None, _Trial(str(started)))
        heapq.heappush(events, (clock + curves[config][0][2], started, 0, config))
        started += 1

    for _ in range(min(report["args"]["concurrent"], len(pending))):
        launch(0.0)
    while events:
        clock, number, i, config = heapq.heappop(events)
        step, value, _ = curves[config][i]
        best = value if best is None else max(best, value)
        trial, result = _Trial(str(number)), {"step": step, key: value}
        if sched.on_trial_result(None, trial, result) == TrialScheduler.STOP or i + 1 == len(curves[config]):
            sched.on_trial_complete(None, trial, result)
            stopped_at[config] = int(step)
            if pending:
                launch(clock)
        else:
            heapq.heappush(events, (clock + curves[config][i + 1][2] - curves[config][i][2], number, i + 1, config))
    return {"trial_steps": sum(stopped_at.values()), "best": best, "stopped_at": stopped_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a search_efficiency result whose grid arm recorded curves with seconds")
    parser.add_argument("--orders", type=int, default=200, help="order seeds 0..N-1 (grid_order's seed, spec.search.seed)")
    parser.add_argument("--grace", type=int, help="what if: ASHA's grace period instead of the result's (steps)")
    parser.add_argument("--reduction-factor", type=int, help="what if: ASHA's reduction factor instead of the result's")
    args = parser.parse_args()
    report = json.loads(args.result.read_text())
    what_if = {k: v for k, v in (("grace", args.grace), ("reduction_factor", args.reduction_factor)) if v is not None}
    if what_if:  # the real ASHA runs were made with other settings: nothing to compare them with
        report["args"] |= what_if
        report["runs"] = []
        print(f"what if: {what_if}")
    grid = report["reference_grid"]
    curves = {_key(t["params"]): t["curve"] for t in grid["trials"]}
    if any(not c or len(c[0]) < 3 or c[-1][0] != report["args"]["steps"] for c in curves.values()):
        raise SystemExit(f"{args.result}: its grid arm has no full curves with seconds (recorded since bench/search_efficiency.py wrote them)")

    # "asha_runs" in results written before the bench also ran successiveHalving
    for run in [r for r in report.get("runs", report.get("asha_runs", [])) if r["scheduler"] == "asha"]:
        got = replay(report, run["order_seed"], curves)
        real = {_key(t["params"]): t["steps"] for t in run["trials"]}
        differ = [f"{c}: ran {real[c]}, replay {got['stopped_at'][c]}" for c in real if real[c] != got["stopped_at"][c]]
        print(f"order seed {run['order_seed']}: real {run['trial_steps']} trial-steps, replay {got['trial_steps']}; "
              f"{len(differ)} of {len(real)} trials differ" + "".join(f"\n    {d}" for d in differ))

    ratios, gaps = [], []
    for seed in range(args.orders):
        got = replay(report, seed, curves)
        ratios.append(got["trial_steps"] / grid["trial_steps"])
        gaps.append(grid["best"] - got["best"])
    ratios.sort()
    tolerance = report["args"]["tolerance"]
    print(f"{args.orders} orders: trial-steps ratio mean {statistics.mean(ratios):.3f}, median {statistics.median(ratios):.3f}, "
          f"10th-90th percentile {ratios[len(ratios) // 10]:.3f}-{ratios[(9 * len(ratios)) // 10]:.3f}, worst {ratios[-1]:.3f}; "
          f"best within {tolerance} of the grid's in {sum(g <= tolerance for g in gaps)} of {args.orders}")


if __name__ == "__main__":
    main()
