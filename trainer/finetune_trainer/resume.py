"""Which checkpoint a Ray Train worker resumes from, and the checks before any of its files is read.

The candidates, in order: Ray Train's latest checkpoint of this run (a worker-group restart), the
run's earlier complete checkpoints, newest first (listed only when the latest is refused), then
the checkpoint the driver chose for `--resume` / spec.storage.resume (itself verified there).

Each is loaded only when its local copy (Ray downloads it; a local folder is used in place)
passes `storage.verify_local`: the marker's SHA-256 of every file, and no file it does not list,
checked before DeepSpeed or torch opens any of it. Rank 0 picks and tells the others; every rank
then checks its own copy, and all must pass and hold the same checkpoint, or all raise: ranks
resuming from different steps would train a model no run ever had. When there were candidates
and none verifies, the run fails with the reasons rather than start over from step 0 in silence.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def open_verified(stack: contextlib.ExitStack, *, rank: int, world: int, device: torch.device, own: Any,
                  persistence: Any, resume_from: Any) -> tuple[str, str] | None:
    """(checkpoint path, verified local folder kept open on `stack`), or None for a fresh start.
    A collective: every rank of the run calls it."""
    chosen, folder, refused = _choose(stack, _candidates(own, persistence, resume_from)) if rank == 0 else (None, None, [])
    box = [(chosen, refused)]
    if world > 1:
        dist.broadcast_object_list(box, src=0)  # among this run's own workers
    chosen, refused = box[0]
    if chosen is None:
        if refused:
            raise RuntimeError("no checkpoint to resume from passes verification, so none is loaded and the run does "
                               f"not start over from step 0: {'; '.join(refused)}")
        return None
    if folder is None:
        folder = stack.enter_context(chosen.as_directory())
    _all_agree(verify(folder), chosen.path, world=world, device=device)
    return chosen.path, folder


def verify(folder: str) -> str | None:
    """Why the local copy in `folder` must not be loaded, or None."""
    from .storage import CheckpointRefused, verify_local

    try:
        verify_local(folder)
    except CheckpointRefused as why:
        return str(why)
    return None


def _candidates(own: Any, persistence: Any, resume_from: Any) -> Iterator[Any]:
    if own is not None:
        yield own
        if persistence is not None:
            from .storage import list_complete_checkpoints

            key = persistence.store.key_of(own.path)
            for earlier in reversed(list_complete_checkpoints(persistence.store, key.rpartition("/")[0])):
                if earlier.key != key:
                    yield persistence.checkpoint(earlier.key)
    if resume_from is not None:
        yield resume_from


def _choose(stack: contextlib.ExitStack, candidates: Iterator[Any]) -> tuple[Any, str | None, list[str]]:
    """(the first candidate whose local copy verifies, that folder kept open; or None) and why
    each one before it was refused."""
    refused: list[str] = []
    for checkpoint in candidates:
        folder = stack.enter_context(checkpoint.as_directory())
        problem = verify(folder)
        if problem is None:
            return checkpoint, folder, refused
        log.warning("not resuming from %s: %s", checkpoint.path, problem)
        refused.append(f"{checkpoint.path}: {problem}")
    return None, None, refused


def _all_agree(problem: str | None, path: str, *, world: int, device: torch.device) -> None:
    """Every rank's copy verified and all hold the same checkpoint; else every rank raises."""
    code = int(hashlib.sha256(path.encode()).hexdigest()[:15], 16)
    votes = torch.tensor([code, -code, 0 if problem is None else 1], dtype=torch.int64, device=device)
    if world > 1:
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    if votes[2].item():
        raise RuntimeError(f"the checkpoint to resume from, {path}, failed verification on a worker"
                           + (f" (here: {problem})" if problem else "") + ": it is loaded on none")
    if (votes[0].item(), -votes[1].item()) != (code, code):
        raise RuntimeError("the workers were handed different checkpoints to resume from; none is loaded")
