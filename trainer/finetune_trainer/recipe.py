"""The fine-tuning recipe each Ray Train worker runs: DeepSpeed ZeRO, freezing, schedule, eval.

Features, in the order they happen:
  - the pre-trained model loads with the spec's task head, dropout override and dtype; with
    freezing.strategy lora, PEFT's adapters are added and the base frozen (adapters.py);
  - the freezing plan is applied *before* `deepspeed.initialize` (static freezing), and blocks that
    unfreeze later sit in their own optimizer groups behind an `UnfreezeGate` (see optim.py);
  - layer-wise LR decay is a per-group factor; the LR schedule is transformers' `get_scheduler`;
  - a baseline evaluation of the untouched model, then evaluation every N steps: each one is
    reported through `ray.train.report` with a checkpoint (checkpoint_files.py: DeepSpeed state +
    trainer state, and the model in Hugging Face format, or the adapter, when it is the best so far);
  - early stopping on the chosen metric; resume from `ray.train.get_checkpoint()` after a failure.

We drive `deepspeed.initialize` directly rather than through the transformers Trainer: gradual
unfreezing needs our own optimizer groups and a hook at every step, the checkpoint/report cadence
is Ray's, and a plain loop keeps per-step overhead at that of raw DeepSpeed (bench/step_overhead.py).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from typing import Any

import torch
import torch.distributed as dist

from . import baseline, checkpoint_files, deepspeed_load, logs, packing, transfer, worker_model
from .batches import EpochStream, gather
from .class_report import CONFUSION_KEY
from .deepspeed_import import import_deepspeed
from .ds_config import build_ds_config, resolve_precision
from .epochs import VALIDATION_DATASET, EpochPlan
from .evaluation import evaluate
from .guards import NonFiniteGuard, Notice, PreemptionGuard, mean_finite
from .memory import PeakMemory
from .optim import UnfreezeGate, build_scheduler, is_metric_driven, param_groups
from .phases import StartupClock
from .probes import EvaluationProbes
from .ranking import NON_FINITE_KEY, EarlyStopping, is_better
from .remote_model import on_this_node
from .scratch import checkpoint_folder
from .spec import FineTuneJob
from .train_blocks import BlockReader

log0 = logs.rank_zero(logging.getLogger(__name__))  # what every rank would say alike, said once


class FineTuneRecipe:
    def __init__(self, config: dict[str, Any], clock: StartupClock | None = None):
        import ray
        import ray.train

        self.job = FineTuneJob.model_validate(config["job"])
        self.spec = self.job.spec
        # an s3:// model: this node's cache copy (remote_model.py), fetched once per node
        self.model_dir: str = on_this_node(config["model_dir"], self.spec.model.source, self.spec.storage)
        self.train_rows: int = config["train_rows"]
        self.train_blocks = config["train_blocks"]  # the train split's blocks in the object store: this rank fetches its rows
        self.label_names: list[str] | None = config["label_names"]
        reference = config.get("reference")  # spec.evaluation.reference's text (capped at its maxSamples): read whole
        self.reference = gather(reference.iter_batches(batch_format="numpy")) if reference is not None else None
        # validation is small (capped): every rank reads it whole from its dataset, evaluation shards it by index
        shard = ray.train.get_dataset_shard(VALIDATION_DATASET)
        self.validation = gather(shard.iter_batches(batch_format="numpy")) if shard is not None else None
        self.pad_id: int = config["pad_token_id"]
        self.num_labels = len(self.label_names) if self.label_names else None
        self.progress = config.get("progress")
        self.trial: str | None = config.get("trial")  # set when this run is one trial of a search
        self.resume_from = config.get("resume_from")  # a complete checkpoint of an earlier run (--resume)
        self.resume_scope: str | None = config.get("resume_scope")  # the store folder resume_from was chosen in (resume.py)
        self.persistence = config.get("persistence")  # where this run's earlier checkpoints are, should Ray's latest be refused
        self.resumed_step: int | None = None
        self.start_id: str | None = config.get("start_id")  # the TorchTrainer's (driver.make_trainer): restarts are counted by it
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.metric_key = f"eval_{self.spec.evaluation.metric}"
        self.ticker = transfer.ProgressTicker()  # the progress line: its rate, and a loss read with no host sync
        self.clock = clock or StartupClock()  # where start-up time goes (phases.py)
        self.clock.mark("data_ready")

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        import ray.train.torch

        deepspeed = import_deepspeed()

        t = self.spec.training
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(self.spec.resources.cpus_per_worker)))
            # DeepSpeed loads its shared-memory all-reduce (a torch JIT extension, used only by
            # inference_all_reduce) when it initialises on CPU. The JIT load holds a file lock for
            # a moment; a worker killed then (a preemption, our fault tests) leaves it behind and
            # every later run on the machine waits on it forever. Training never calls it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.memory = PeakMemory(self.device)  # before the model: training's own peak is counted from here (memory.py)
        torch.manual_seed(t.seed)  # identical new head on every rank
        self.per_epoch = t.steps_per_epoch(self.train_rows, self.world)
        self.total = t.total_steps(self.train_rows, self.world)
        self.stream_plan = EpochPlan(rows=self.train_rows, world=self.world, micro_batch=t.per_device_batch_size,
                                     accumulation=t.gradient_accumulation_steps)
        assert self.stream_plan.steps_per_epoch == self.per_epoch, "epochs.EpochPlan and TrainingSpec count steps alike"
        built = worker_model.build(self.spec, self.model_dir, num_labels=self.num_labels, pad_token_id=self.pad_id,
                                   steps_per_epoch=self.per_epoch)  # PEFT's adapters, or the freezing plan, applied
        model, self.plan, self.adapters, self.params = built.module, built.plan, built.adapters, built.params
        self.clock.mark("model_loaded")
        groups, metas = param_groups(model, self.plan, t)
        cuda = self.device.type == "cuda"
        self.precision = resolve_precision(
            self.spec.deepspeed.precision, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported()
        )
        ds_config = build_ds_config(self.spec, world_size=self.world, precision=self.precision)
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
        self.clock.mark("deepspeed_initialized")
        base_optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        self.scheduler = build_scheduler(self.spec.lr_schedule, base_optimizer, self.total)
        self.gate = UnfreezeGate(base_optimizer, metas, groups)
        self.stopper = EarlyStopping(
            mode=self.spec.evaluation.resolved_mode(),
            patience=self.spec.evaluation.early_stopping.patience if self.spec.evaluation.early_stopping else None,
            min_delta=self.spec.evaluation.early_stopping.min_delta if self.spec.evaluation.early_stopping else 0.0,
        )
        self.step = 0
        self.best: float | None = None
        self.best_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.tokens, self.train_seconds = 0, 0.0
        self.stream: EpochStream | None = None  # the train split's micro-batches (train())
        self.input_wait = 0.0  # seconds earlier starts of this run waited on the input pipeline (checkpointed)
        self.skipped_steps = 0  # optimizer steps dropped for a non-finite loss (nonFiniteLoss: skipStep)
        self.save_seconds: float | None = None  # the last evaluation + checkpoint, what a preemption's save is judged by
        # generated samples and the reference perplexity at each evaluation (spec.evaluation.samples / .reference)
        self.probes = EvaluationProbes(self.job, self.validation, self.reference, model_dir=self.model_dir, device=self.device, rank=self.rank,
                                       world_size=self.world, pad_token_id=self.pad_id)
        self.samples: list[dict[str, str]] | None = None  # this evaluation's, for the tracker's row (rank 0)
        self.confusion: list[list[int]] | None = None  # this evaluation's matrix (classification), likewise (class_report)
        self.clock.mark("probes_ready")
        self._resume()
        self.clock.mark("restored")
        self.guard = NonFiniteGuard(self.device, self.spec.evaluation.every_steps, start_step=self.step)
        self.preemption = PreemptionGuard(self.world)  # creates a gloo group: a collective, every rank
        self.clock.mark("guards_ready")
        log0.info("%s: %s; precision %s; MASTER_ADDR=%s", built.name, self.plan.summary(), self.precision,
                  os.environ.get("MASTER_ADDR"))

    def _resume(self) -> None:
        """Continue where a checkpoint left off: DeepSpeed's module and optimizer state, the random
        generators (rng), the LR schedule, early stopping, step, history (the unfreezing gate
        follows the step). Which checkpoint, and the checks before any of its files is read:
        resume.py (Ray Train's latest of this run, its earlier ones, the driver's resume point and
        those before it; each verified by hash and loaded on every rank, the next one tried when any
        rank cannot; DeepSpeed reads with weights_only)."""
        import ray.train

        from .resume import resume

        def load(folder: str) -> dict[str, Any]:
            """Everything a checkpoint restores; what fails here makes resume.py try the one before it."""
            state = checkpoint_files.load(self.engine, folder, rank=self.rank, frozen=checkpoint_files.frozen_names(self.engine.module) if self.adapters else frozenset())
            self.scheduler.load_state_dict(state["scheduler"])
            self.stopper.load_state_dict(state["early_stopping"])
            return state

        found = resume(rank=self.rank, world=self.world, own=ray.train.get_checkpoint(), persistence=self.persistence,
                       resume_from=self.resume_from, resume_scope=self.resume_scope, load=load)
        if found is None:
            return
        deepspeed_load.finish(self.engine)  # every rank loaded the same checkpoint
        state, path = found.state, found.path
        self.step, self.best, self.best_step = state["step"], state["best"], state["best_step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.history, self.tokens, self.train_seconds = state["history"], state["tokens"], state["train_seconds"]
        self.input_wait = state.get("input_wait_seconds", 0.0)
        self.resumed_step = self.step
        log0.info("resumed from step %d (%s)", self.step, path)
        if found.skipped:  # the one line that names both: what was skipped and what was used instead
            log0.warning("resumed from %s (step %d) instead of %s", path, self.step,
                         "; ".join(f"{skipped} ({why})" for skipped, why in found.skipped))
        if self.rank == 0 and self.progress is not None:  # the status' resumes and the operator's Event
            self.progress.resumed.remote({"trial": self.trial, "checkpoint": _uri(self.persistence, path), "step": self.step,
                                          "skipped": [{"checkpoint": _uri(self.persistence, skipped), "reason": why}
                                                      for skipped, why in found.skipped]})

    # ---------------------------------------------------------------- train
    def train(self) -> None:
        if self.rank == 0 and self.progress is not None and self.start_id:
            self.progress.started.remote(self.start_id)
        t, ev = self.spec.training, self.spec.evaluation
        if self.step == 0 and ev.baseline:  # once per search where trials' baselines are the same (baseline.py)
            metrics, shared = baseline.shared_or_evaluated(self.progress, self.trial, self.spec, rank=self.rank, world=self.world,
                                                           evaluate=self._evaluate, samples=lambda: self.samples)
            self.samples = shared["samples"] if shared else self.samples  # the evaluating trial's, as it reported them
            self._report(metrics, checkpoint=False, extra={"baseline": True, **({"baseline_from": shared["trial"]} if shared else {})})
            self.clock.mark("baseline_evaluated")
        self.engine.train()
        self.gate.apply(self.step)
        losses: list[torch.Tensor] = []  # detached, read only when reported: no host sync per step
        clock = time.perf_counter()  # training wall time: every step and its bookkeeping, not eval
        # this rank's micro-batches from this step on, across epochs (a resumed run picks the stream up
        # where the uninterrupted run was: epochs.py)
        self.stream = EpochStream(self.stream_plan, BlockReader(self.train_blocks).batch, seed=self.spec.training.seed,
                                  rank=self.rank, step=self.step, total_steps=self.total, pad_token_id=self.pad_id)
        for host, tokens in self.stream:
            self.tokens += tokens  # counted on the host: no device sync
            batch = transfer.to_device(host, self.device)  # on GPUs pinned, non_blocking: no wait on the last step
            loss = self.engine(**batch, **packing.forward_kwargs(batch)).loss
            self.guard.observe(loss, self.step + 1)  # on the device; read at the next evaluation
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed's ZeRO optimizer drops a step whose gradient norm is not finite
            losses.append(loss.detach())
            if not self.engine.is_gradient_accumulation_boundary():
                continue
            self.step += 1
            if not self.clock.logged:
                self.clock.mark("first_step")
                self.clock.log_once(self.rank)
            if not is_metric_driven(self.spec.lr_schedule) and self.engine.was_step_applied():
                self.scheduler.step()
            opened = self.gate.apply(self.step)
            if opened:
                log0.info("step %d: unfroze %s", self.step, ", ".join(opened))
            self._progress(losses[-t.gradient_accumulation_steps :])
            evaluated = self.step % ev.every_steps == 0 or self.step >= self.total
            if evaluated:
                self.train_seconds += self._seconds_since(clock)
                if self._evaluate_and_report(losses):
                    return
                losses, clock = [], time.perf_counter()
            notice = self.preemption.poll()
            if notice is not None and self._save_on_preemption(notice, evaluated):
                self.train_seconds += self._seconds_since(clock)
                self._evaluate_and_report(losses, preempted=True)
                losses, clock = [], time.perf_counter()
            if self.step >= self.total:
                return

    def _save_on_preemption(self, notice: Notice, evaluated: bool) -> bool:
        """A node of this run is going away (guards.py): save a checkpoint of this step if the last
        evaluation + checkpoint says one completes before the deadline (one cut short is never marked
        complete). Training goes on: Ray Train restarts from the latest complete one once the node goes."""
        left = f"{notice.deadline - time.time():.0f} s" if notice.deadline is not None else "no deadline"
        if evaluated:
            log0.warning("preemption notice at step %d (%s left): its checkpoint is already written", self.step, left)
            return False
        can, took, remaining = self.preemption.can_save(notice, self.save_seconds)
        took_text = f"{took:.1f} s" if took is not None else "not measured yet"
        if not can:
            log0.warning("preemption notice at step %d: %.0f s left and the last evaluation + checkpoint took %s; "
                         "not saving (the run resumes from its latest complete checkpoint)", self.step, remaining or 0, took_text)
            return False
        log0.warning("preemption notice at step %d (%s left; the last evaluation + checkpoint took %s): saving a "
                     "checkpoint of step %d", self.step, left, took_text, self.step)
        return True

    def _seconds_since(self, clock: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued steps belong to training time, not to eval's
        return time.perf_counter() - clock

    def _evaluate(self) -> dict[str, float]:
        if self.validation is None:  # the ingest carves one unless the spec gave none to carve
            raise ValueError("the trainer evaluates on the validation split, and the ingested data has none")
        metrics = evaluate(
            self.engine.module, self.validation, task=self.spec.model.task,
            batch_size=self.spec.training.per_device_batch_size * 2, pad_token_id=self.pad_id,
            device=self.device, num_labels=self.num_labels, rank=self.rank, world_size=self.world,
        )
        wanted, self.confusion = {"loss", *self.spec.evaluation.resolved_metrics(self.spec.model.task)}, metrics.get(CONFUSION_KEY)
        self.samples = self.probes.samples(self.engine.module)  # every rank: a collective under ZeRO-3
        return {f"eval_{k}": v for k, v in metrics.items() if k in wanted} | self.probes.measure(self.engine.module)

    def _evaluate_and_report(self, losses: list[torch.Tensor], *, preempted: bool = False) -> bool:
        """An evaluation, and a checkpoint when every number is finite. True: training stops here
        (early stopping, or a non-finite loss under nonFiniteLoss: stop). `preempted`: an extra
        evaluation for a preemption's checkpoint, which early stopping and plateau schedules do not
        count, so a resumed run goes on as an uninterrupted one would."""
        started = time.perf_counter()
        metrics = self._evaluate()
        found = self.guard.check(self.step, self.world)  # every rank, same step: the flags since the last check
        self.skipped_steps += found.steps
        finite = all(math.isfinite(v) for v in metrics.values())
        diverged = found.first_step if found.first_step is not None else (None if finite else self.step)
        value = metrics[self.metric_key]
        # the peak so far at every evaluation, not only in the final summary: a search trial that its
        # scheduler stops never reaches that, and its row still says what it used
        summary = self._summary()
        extra: dict[str, Any] = {"train_loss": mean_finite(losses), "peak_memory_mib": summary["peak_memory_mib"],
                                 "peak_training_memory_mib": summary["peak_training_memory_mib"]}
        if self.spec.training.non_finite_loss == "skipStep":
            extra["skipped_steps"] = self.skipped_steps  # steps whose loss was not finite, their optimizer step dropped
        elif diverged is not None:
            log0.error("non-finite %s at step %d (noticed at step %d): the run stops (nonFiniteLoss: stop)",
                       "training loss" if found.first_step is not None else "evaluation", diverged, self.step)
            extra |= {NON_FINITE_KEY: {"step": diverged, "detected_at_step": self.step}, "early_stopped": False, **self._summary()}
            self._report(metrics, checkpoint=False, extra=extra)  # no checkpoint of a diverged model
            return True
        if is_metric_driven(self.spec.lr_schedule) and not preempted:
            self.scheduler.step(metrics["eval_loss"])  # plateau-style schedules react to eval loss
            self.gate.apply(self.step)
        stop = False if preempted else self.stopper.update(value)
        better = is_better(value, self.best, self.stopper.mode)  # strictly: the export follows every gain; never a NaN
        if better:
            self.best, self.best_step = value, self.step
        final = stop or self.step >= self.total
        extra |= {"early_stopped": stop and self.step < self.total, **({"preempted": True} if preempted else {})}
        if final:
            extra.update(self._summary())
        export = {"best": better, "last": final, "none": False}[self.spec.output.export]
        if not finite:  # never best, never a resume point: no such checkpoint at all
            log0.warning("evaluation at step %d is not finite (%s): no checkpoint of this step", self.step,
                         ", ".join(f"{k}={v}" for k, v in metrics.items() if not math.isfinite(v)))
        self._report(metrics, checkpoint=finite, export=export and finite, extra=extra)
        self.save_seconds = time.perf_counter() - started
        return stop

    # ---------------------------------------------------------------- reporting
    def _report(self, metrics: dict[str, float], *, checkpoint: bool, export: bool = False, extra: dict | None = None) -> None:
        import ray.train

        row = {
            **({"trial": self.trial} if self.trial else {}),
            "step": self.step,
            "epoch": self.step / self.per_epoch,
            "learning_rate": self._head_lr(),
            "frozen_blocks": len(self.gate.frozen_blocks(self.step)),
            **metrics,
            **(extra or {}),
            **self.params,
            "best_step": self.best_step,
            f"best_{self.metric_key}": self.best,
            "has_model": export,
            "precision": self.precision,
            **({"resumed_from_step": self.resumed_step} if self.resumed_step is not None else {}),
        }
        self.history.append(row)
        tracked = {"samples": self.samples, CONFUSION_KEY: self.confusion}  # to the tracker only: not Tune's metrics, not the checkpoint's history
        self.samples = self.confusion = None
        if self.rank == 0 and self.progress is not None:
            self.progress.record.remote(row | {k: v for k, v in tracked.items() if v})
        if not checkpoint:
            ray.train.report(row)
            return
        folder = checkpoint_folder()  # swept if this worker is killed mid-report (scratch)
        try:
            checkpoint_files.write(folder, self.engine, rank=self.rank, state=self._state(), export=export,
                                   adapters=self.adapters, zero3=self.spec.deepspeed.zero_stage == 3)
            from ray.train import Checkpoint

            ray.train.report(row, checkpoint=Checkpoint.from_directory(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step, "best": self.best, "best_step": self.best_step, "history": self.history,
            "tokens": self.tokens, "train_seconds": self.train_seconds,
            "scheduler": self.scheduler.state_dict(), "early_stopping": self.stopper.state_dict(),
            "skipped_steps": self.skipped_steps, "input_wait_seconds": self._input_wait(),
        }

    def _input_wait(self) -> float:
        return self.input_wait + (self.stream.waited if self.stream is not None else 0.0)

    def _summary(self) -> dict[str, float]:
        """Throughput and memory over all ranks: sums for tokens, max for time, input wait and memory.
        `input_wait_share`: of the training time, the share the slowest-fed rank waited for its next
        batch from Ray Data (issue 18's figure of whether the pipeline keeps up)."""
        # the process' peak, and training's own above what the worker held before the model (memory.py)
        peak, training = self.memory.process_peak(), self.memory.training_peak()
        # on the worker's device: NCCL (GPU workers) reduces device tensors only
        stats = torch.tensor([float(self.tokens), self.train_seconds, float(peak), float(training), self._input_wait()], dtype=torch.float64,
                             device=self.device)
        if self.world > 1:
            tokens = stats[:1].clone()
            dist.all_reduce(tokens)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            stats[0] = tokens[0]
        return {
            "train_tokens": stats[0].item(),
            "train_seconds": stats[1].item(),
            "tokens_per_second": stats[0].item() / max(stats[1].item(), 1e-9),
            "peak_memory_mib": stats[2].item() / 2**20,
            "peak_training_memory_mib": stats[3].item() / 2**20,
            "input_wait_seconds": stats[4].item(),
            "input_wait_share": stats[4].item() / max(stats[1].item(), 1e-9),
        }

    def _head_lr(self) -> float:
        return float(self.gate.optimizer.param_groups[-1]["lr"])

    def _progress(self, last_losses: list[torch.Tensor]) -> None:
        if self.progress is None or self.rank != 0 or not self.ticker.due():
            return
        loss = self.ticker.loss(last_losses)  # on GPUs the previous tick's mean, copied behind the step (transfer.py)
        self.progress.update.remote({"trial": self.trial, "step": self.step, "total": self.total, "lr": self._head_lr()}
                                    | ({"loss": loss} if loss is not None else {}))

    def cleanup(self) -> None:
        if self.progress is not None and self.rank == 0:
            self.progress.update.remote({"trial": self.trial, "step": self.step, "total": self.total})


def _uri(persistence: Any, path: str) -> str:
    """What people read for a checkpoint Ray names by its filesystem path (s3://... or a folder)."""
    return persistence.uri(path) if persistence is not None else path


def train_loop_per_worker(config: dict[str, Any]) -> None:
    clock = StartupClock(config.get("trial"))  # first: the time before this is the worker group's start-up
    logs.configure_worker()  # our logger, the driver's verbosity, third-party noise held back (logs.py)
    recipe = FineTuneRecipe(config, clock)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()
