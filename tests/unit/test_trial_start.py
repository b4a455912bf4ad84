"""What a search trial's actor (and a run's driver) pays to build its TorchTrainer, at every start
and every resume of a trial: the trainer carries the workers' loop by reference, so building it
imports nothing of the training side (transformers, PEFT, DeepSpeed, our recipe); the workers do."""

from __future__ import annotations

import subprocess
import sys


def test_building_a_trial_trainer_imports_nothing_of_the_training_side(tmp_path) -> None:
    code = f"""
import pickle, sys
import ray.cloudpickle as cloudpickle
from finetune_trainer.driver import make_trainer
from finetune_trainer.persist import open_storage
from finetune_trainer.spec import parse_job

job = parse_job({{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {{"name": "unit"}},
                 "spec": {{"model": {{"source": "models/tiny", "task": "sequence-classification"}},
                          "data": {{"train": "data/train.jsonl", "validationSplit": 0.1}}, "output": {{"dir": {str(tmp_path)!r}}}}}}})
persistence = open_storage(job)
trainer = make_trainer(job, {{"model_dir": "m", "data": None, "pad_token_id": 0, "progress": None}}, persistence=persistence,
                       storage_path={str(tmp_path / "trials")!r}, name="start-1", trial="trial_00")
loop = cloudpickle.dumps(trainer.train_loop_per_worker)  # what Ray ships to the workers
heavy = sorted({{"transformers", "peft", "deepspeed", "finetune_trainer.recipe"}} & set(sys.modules))
print(heavy)
sys.exit(1 if heavy or len(loop) > 500 else 0)  # a reference (module + name), not the recipe's code
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-500:] + done.stderr[-2000:]
