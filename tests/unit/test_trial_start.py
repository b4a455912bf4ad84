"""What a search trial's actor (and a run's driver) pays to build its TorchTrainer, at every start
and every resume of a trial: the trainer carries the workers' loop by reference, so building it
imports nothing of the training side (transformers, PEFT, DeepSpeed, our recipe); the workers do."""

from __future__ import annotations

import subprocess
import sys

import pytest


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

class NoData:  # what the ingest hands over (ingest.Ingested) without starting Ray: the datasets are not this test's subject
    train_blocks = None
    def trainer_datasets(self):
        return {{}}, None

shared = {{"model_dir": "m", "ingested": NoData(), "train_rows": 16, "pad_token_id": 0, "progress": None}}
trainer = make_trainer(job, shared, persistence=persistence,
                       storage_path={str(tmp_path / "trials")!r}, name="start-1", trial="trial_00")
loop = cloudpickle.dumps(trainer.train_loop_per_worker)  # what Ray ships to the workers
heavy = sorted({{"transformers", "peft", "deepspeed", "finetune_trainer.recipe"}} & set(sys.modules))
print(heavy)
sys.exit(1 if heavy or len(loop) > 500 else 0)  # a reference (module + name), not the recipe's code
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-500:] + done.stderr[-2000:]


def test_a_trials_resume_point_is_chosen_without_reading_its_files(tmp_path) -> None:
    """trial.py asks for the newest complete checkpoint with hashes=False: its workers hash every
    file of it anyway (resume.py: verify_local) and fall back to the ones before it, so each resume
    reads the checkpoint once (from S3: one download, not two). What it still refuses without
    reading: a folder whose listing does not match its marker; and markers with nothing complete
    still fail rather than start over from step 0."""
    import json
    import time

    from finetune_trainer.storage import CheckpointRefused, LocalStore, mark_complete, resume_point

    store = LocalStore(tmp_path)
    hashed: list[str] = []
    sha256 = store.sha256
    store.sha256 = lambda key: hashed.append(key) or sha256(key)  # type: ignore[method-assign]
    for step in (4, 8):
        key = f"job/trials/trial_00/start-1/checkpoint_00{step}"
        store.write(f"{key}/trainer_state.json", json.dumps({"step": step}).encode())
        store.write(f"{key}/deepspeed/mp_rank_00_model_states.pt", bytes([step]) * 64)
        mark_complete(store, key, {"step": step})
        time.sleep(0.02)
    newest = tmp_path / "job/trials/trial_00/start-1/checkpoint_008/deepspeed/mp_rank_00_model_states.pt"
    newest.write_bytes(bytes([99]) * 64)  # same size, other bytes: only a hash tells
    hashed.clear()

    assert resume_point(store, "latest", "job/trials/trial_00", hashes=False).step == 8
    assert hashed == []
    assert resume_point(store, "latest", "job/trials/trial_00").step == 4  # hashing: the newest refused, the one before
    assert hashed

    newest.write_bytes(bytes([99]) * 65)  # a size the marker does not list: not complete, seen without reading
    assert resume_point(store, "latest", "job/trials/trial_00", hashes=False).step == 4
    (tmp_path / "job/trials/trial_00/start-1/checkpoint_004/trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointRefused, match="none can be loaded"):  # markers, nothing complete: no start from 0
        resume_point(store, "latest", "job/trials/trial_00", hashes=False)
