"""Every random generator a training step draws from, saved with each checkpoint and restored on
resume, per rank, so that a resumed run (a worker-group restart, `--resume`, a search trial
resumed after a pause at a rung) draws the same dropout masks as the run that was not stopped.

Without it a resumed run restarted from the seeded state of step 0: the data order and weights
were exact, but dropout differed from the first step after the checkpoint. The successiveHalving
benchmark saw it: trials resumed at step 10 read 0.57 at step 30 where the same configuration,
never paused, read 0.635, and the grid's best configuration was stopped. Written by hand: HF
Trainer's `_save_rng_state` / `_load_rng_state` do the same but are private methods of its
Trainer, which we do not run.

Stored as data, never as pickle: `rng_state_<rank>.safetensors`, whose tensors are torch's (and
each CUDA device's) generator state and whose metadata holds python's `random` and numpy's
legacy state as JSON; loading it runs no code whatever the file holds. The earlier format,
`rng_state_<rank>.pth` (torch.save of a dict, readable only with weights_only=False because of
numpy's state), is never loaded: such a checkpoint resumes with the generators as they are and a
warning. Why not refuse it: its model, optimizer and data order are still exact (only dropout
after the resume differs, as before this module), and refusing would throw all of that away. In
practice those files only come with markers of version 1, which `storage.integrity` refuses
anyway; the rule here guards the file wherever it turns up.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
FORMAT = "1"
_MT_WORDS = 624  # the Mersenne Twister's state, python's and numpy's


def _file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rng_state_{rank}.safetensors"


def _legacy_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rng_state_{rank}.pth"


def save(folder: str | Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    version, internal, gauss = random.getstate()
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    metadata = {
        "format": FORMAT,
        "python": json.dumps({"version": version, "state": list(internal), "gauss": gauss}),
        "numpy": json.dumps({"algorithm": algorithm, "keys": [int(k) for k in keys], "pos": int(pos),
                             "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}),
    }
    save_file(tensors, str(_file(folder, rank)), metadata=metadata)


def load(folder: str | Path, rank: int) -> bool:
    """False when the checkpoint has no state for this rank (written before this module, or by a
    run with fewer workers, or in the old pickled format): the run goes on from the generators as
    they are. A file in the current format that does not hold valid state raises ValueError."""
    from safetensors import safe_open

    path = _file(folder, rank)
    if not path.exists():
        if _legacy_file(folder, rank).exists():
            log.warning("%s holds random-generator state in the old pickled format; it is not loaded (a pickle can run "
                        "code): this resume draws different dropout masks than the uninterrupted run would",
                        _legacy_file(folder, rank))
        return False
    with safe_open(str(path), framework="pt") as stored:
        metadata = stored.metadata() or {}
        tensors = {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118 (safe_open is no dict)
    python, numpy_state = _parse(path, metadata)
    if tensors.get("torch") is None or tensors["torch"].dtype != torch.uint8:
        raise ValueError(f"{path}: no torch generator state")
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors)) if f"cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return True


def _parse(path: Path, metadata: dict[str, str]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """python's and numpy's state from the JSON metadata, checked field by field (types, lengths,
    ranges), so a damaged file fails here with its name rather than deep inside `setstate`."""
    try:
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT}")
        py, nps = json.loads(metadata["python"]), json.loads(metadata["numpy"])
        state = py["state"]
        words = nps["keys"]
        if not (isinstance(py["version"], int) and isinstance(state, list) and len(state) == _MT_WORDS + 1
                and all(isinstance(w, int) and 0 <= w < 2**32 for w in state)
                and (py["gauss"] is None or isinstance(py["gauss"], float))):
            raise ValueError("python's random state is malformed")
        if not (nps["algorithm"] == "MT19937" and isinstance(words, list) and len(words) == _MT_WORDS
                and all(isinstance(w, int) and 0 <= w < 2**32 for w in words)
                and isinstance(nps["pos"], int) and nps["has_gauss"] in (0, 1) and isinstance(nps["cached_gaussian"], float)):
            raise ValueError("numpy's random state is malformed")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} does not hold valid random-generator state: {err}") from None
    python = (py["version"], tuple(state), py["gauss"])
    numpy_state = ("MT19937", np.array(words, dtype=np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    return python, numpy_state
