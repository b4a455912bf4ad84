"""What one checkpoint of a run holds, written by every rank and read back on resume.

A checkpoint folder (one per evaluation, handed to Ray Train) holds:
  - deepspeed/: DeepSpeed's module and optimizer state (each rank its ZeRO partition). With
    adapters (freezing.strategy: lora) only the trainable tensors and their optimizer state:
    `save_checkpoint(exclude_frozen_parameters=True)`; the frozen base is the pre-trained model,
    loaded from its source again on resume, never copied into each checkpoint;
  - rng/: each rank's random generators (rng.py); trainer_state.json: rank 0's loop state;
  - model/ when this evaluation is exported: the model in Hugging Face format, or with adapters the
    adapter alone in PEFT's format (model/adapter/; the driver merges it into the base once, at
    export: driver.export_model). Under ZeRO-3 the shards are gathered first (a collective);
  - the hashes of every file each rank wrote (storage.integrity), last.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import deepspeed_load, rng
from .persist import ADAPTER_DIR, MODEL_DIR, TRAINER_STATE_FILE
from .storage.integrity import write_file_hashes

STATE_FILE = TRAINER_STATE_FILE
DS_DIR = "deepspeed"
DS_TAG = "state"


def frozen_names(module: Any) -> frozenset[str]:
    """Every name a frozen tensor has in the module's state dict, tied aliases included: what an
    adapter checkpoint leaves out and what its resume expects to be missing."""
    return frozenset(n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad)


@contextlib.contextmanager
def _without_frozen(engine: Any) -> Iterator[None]:
    """DeepSpeed's `exclude_frozen_parameters` drops frozen tensors by `named_parameters()`, which
    names a tied weight once: SmolLM2's `lm_head.weight` (the input embeddings again) stayed in
    every adapter checkpoint, 108 of its 146 MiB. DeepSpeed has no option for aliases, so the
    engine's module state is filtered here by every name (an instance attribute over the method,
    removed again after the save)."""
    frozen, original = frozen_names(engine.module), engine.module_state_dict

    def module_state_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
        state: dict[str, Any] = original(*args, **kwargs)
        return {k: v for k, v in state.items() if k not in frozen}

    engine.module_state_dict = module_state_dict
    try:
        yield
    finally:
        del engine.module_state_dict


def write(folder: str, engine: Any, *, rank: int, state: dict[str, Any], export: bool, adapters: bool, zero3: bool) -> None:
    """Every rank writes its part of one checkpoint into `folder` (collective under ZeRO-3 exports)."""
    with _without_frozen(engine) if adapters else contextlib.nullcontext():
        engine.save_checkpoint(os.path.join(folder, DS_DIR), tag=DS_TAG, exclude_frozen_parameters=adapters)
    rng.save(folder, rank)
    if export:
        export_model(engine, os.path.join(folder, MODEL_DIR), rank=rank, adapters=adapters, zero3=zero3)
    if rank == 0:
        Path(folder, STATE_FILE).write_text(json.dumps(state))
    write_file_hashes(folder, rank)  # last: the hashes of everything this worker wrote (storage.integrity)


def export_model(engine: Any, folder: str, *, rank: int, adapters: bool, zero3: bool) -> None:
    """Hugging Face format (PEFT's for an adapter); under ZeRO-3 the shards are gathered first, only
    the trainable ones for an adapter (a collective: every rank calls it)."""
    state_dict = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=adapters) if zero3 else None
    if rank != 0:
        return
    if adapters:
        # save_embedding_layers=False: PEFT's "auto" would look the base model up on the hub
        engine.module.save_pretrained(os.path.join(folder, ADAPTER_DIR), state_dict=state_dict, save_embedding_layers=False)
    else:
        engine.module.save_pretrained(folder, state_dict=state_dict)


def load(engine: Any, folder: str, *, rank: int, frozen: frozenset[str]) -> dict[str, Any]:
    """This rank's part of a checkpoint into the engine (DeepSpeed state read with weights_only, the
    random generators); returns the loop state. `frozen`: parameters the checkpoint was saved
    without (adapters), which keep the pre-trained values they were loaded with."""
    state: dict[str, Any] = json.loads((Path(folder) / STATE_FILE).read_text())
    deepspeed_load.load(engine, Path(folder) / DS_DIR, DS_TAG, frozen=frozen)  # the collective part: deepspeed_load.finish
    rng.load(folder, rank)  # the dropout masks the uninterrupted run would draw next
    return state
