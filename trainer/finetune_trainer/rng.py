"""Every random generator a training step draws from, saved with each checkpoint and restored on
resume, per rank, so that a resumed run (a worker-group restart, `--resume`, a search trial
resumed after a pause at a rung) draws the same dropout masks as the run that was not stopped.

Without it a resumed run restarted from the seeded state of step 0: the data order and weights
were exact, but dropout differed from the first step after the checkpoint. The successiveHalving
benchmark saw it: trials resumed at step 10 read 0.57 at step 30 where the same configuration,
never paused, read 0.635, and the grid's best configuration was stopped. Written by hand: HF
Trainer's `_save_rng_state` / `_load_rng_state` do the same but are private methods of its
Trainer, which we do not run.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


def _file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rng_state_{rank}.pth"


def save(folder: str | Path, rank: int) -> None:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, _file(folder, rank))


def load(folder: str | Path, rank: int) -> bool:
    """False when the checkpoint has no state for this rank (written before this module, or by a
    run with fewer workers): the run goes on from the generators as they are."""
    path = _file(folder, rank)
    if not path.exists():
        return False
    state = torch.load(path, weights_only=False)  # our own file: numpy's state is not a tensor
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True
