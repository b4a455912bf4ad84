"""Which checkpoint a Ray Train worker resumes from, and the checks before any of its files is read.

The candidates, newest first: Ray Train's latest checkpoint of this run (a worker-group restart)
and the run's earlier complete checkpoints (listed only once the latest is refused), then the
checkpoint the driver chose (`resume_from`: spec.storage.resume, `--resume`, verified there; a
search trial's newest, chosen unread by trial.py and verified only here) and the complete
checkpoints before it in `resume_scope` (the folder the driver chose it from; its own folder when
not given).

A candidate is used only when every rank verified its local copy and loaded it. Verification
(`storage.verify_local`: the marker's SHA-256 of every file, no file it does not list) happens
before DeepSpeed or torch opens any of it; loading is the caller's `load` (DeepSpeed state, RNG,
trainer state). Ray Train lists a checkpoint as its latest before our marker is written, so an
unmarked one (its marker write failed) is refused here; one that verifies and still does not load
(a garbled file whose marker was rewritten) is refused by its load. Either way the next candidate
is tried, and the log names both: never a restart from step 0 while a checkpoint that loads exists.

Loading is a collective across ranks: rank 0 picks the next candidate that verifies and tells the
others; every rank checks and loads its own copy; all of them say whether it worked, so every rank
goes on to the same next candidate or resumes from the same one. Ranks resuming from different
steps would train a model no run ever had. When there were candidates and none loads, the run fails
with the reasons rather than start over from step 0 in silence.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    path: str  # Ray's path of the checkpoint every rank loaded
    state: Any  # what `load` returned on this rank
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of each newer candidate not used


def resume(*, rank: int, world: int, own: Any, persistence: Any, resume_from: Any, resume_scope: str | None,
           load: Callable[[str], Any]) -> Resumed | None:
    """Load the newest candidate that verifies and loads on every rank (`load(folder)` reads it;
    its local copy is released afterwards); None for a fresh start. A collective: every rank of
    the run calls it. RuntimeError when candidates exist and none loads."""
    candidates = _candidates(own, persistence, resume_from, resume_scope) if rank == 0 else iter(())
    skipped: list[tuple[str, str]] = []
    while True:
        with contextlib.ExitStack() as stack:
            chosen, folder, refused = _choose(stack, candidates) if rank == 0 else (None, None, [])
            box = [(chosen, refused)]
            if world > 1:
                dist.broadcast_object_list(box, src=0)  # among this run's own workers
            chosen, refused = box[0]
            skipped += refused
            if chosen is None:
                if skipped:
                    raise RuntimeError("no checkpoint to resume from verifies and loads, so none is loaded and the run "
                                       "does not start over from step 0: " + "; ".join(f"{p}: {why}" for p, why in skipped))
                return None
            if folder is None:  # a copy of its own: Ray downloads a Checkpoint into a folder named by its
                # uuid, which the broadcast copy shares with rank 0's; a second as_directory() of the same
                # uuid on one node downloads into that folder again while rank 0 reads it
                folder = stack.enter_context(type(chosen)(chosen.path, filesystem=chosen.filesystem).as_directory())
            # every rank's copy in place and verified before any rank reads it: ranks on one node share
            # Ray's local copy, and a rank still downloading it rewrites the files another would read
            why, state = _all_agree(verify(folder), chosen.path, rank=rank, world=world), None
            if why is None:
                problem = None
                try:
                    state = load(folder)
                except Exception as err:  # whatever DeepSpeed, torch or json raise for a file that does not load
                    problem = f"it does not load: {type(err).__name__}: {_first_line(err)}"
                why = _all_agree(problem, chosen.path, rank=rank, world=world)
            if why is None:
                return Resumed(chosen.path, state, skipped)
        if rank == 0:
            log.warning("not resuming from %s: %s; trying the one before it", chosen.path, why)
        skipped.append((chosen.path, why))


def verify(folder: str) -> str | None:
    """Why the local copy in `folder` must not be loaded, or None."""
    from .storage import CheckpointRefused, verify_local

    try:
        verify_local(folder)
    except CheckpointRefused as why:
        return str(why)
    return None


def _candidates(own: Any, persistence: Any, resume_from: Any, resume_scope: str | None) -> Iterator[Any]:
    """Each candidate once, newest first; the older ones are listed only when reached."""
    seen: set[str] = set()

    def fresh(checkpoints: Iterator[Any]) -> Iterator[Any]:
        for checkpoint in checkpoints:
            if checkpoint.path not in seen:
                seen.add(checkpoint.path)
                yield checkpoint

    if own is not None:
        yield from fresh(iter([own]))
        yield from fresh(_before(persistence, own.path, None))
    if resume_from is not None:
        yield from fresh(iter([resume_from]))
        yield from fresh(_before(persistence, resume_from.path, resume_scope))


def _before(persistence: Any, path: str, scope: str | None) -> Iterator[Any]:
    """The complete checkpoints under `scope` (default: the folder of `path`) that were completed
    before the one at `path`, newest first; all of them when that one is not complete itself
    (Ray's latest, whose marker was never written)."""
    if persistence is None:
        return
    from .storage import list_complete_checkpoints

    key = persistence.store.key_of(path)
    done = list_complete_checkpoints(persistence.store, scope if scope is not None else key.rpartition("/")[0])
    keys = [c.key for c in done]
    older = done[: keys.index(key)] if key in keys else done
    for earlier in reversed(older):
        yield persistence.checkpoint(earlier.key)


def _choose(stack: contextlib.ExitStack, candidates: Iterator[Any]) -> tuple[Any, str | None, list[tuple[str, str]]]:
    """(the next candidate whose local copy verifies, that folder kept open on `stack`; or None)
    and why each one before it was refused. A refused copy is released at once."""
    refused: list[tuple[str, str]] = []
    for checkpoint in candidates:
        inner = contextlib.ExitStack()
        folder = inner.enter_context(checkpoint.as_directory())
        problem = verify(folder)
        if problem is None:
            stack.push(inner.pop_all())
            return checkpoint, folder, refused
        inner.close()
        log.warning("not resuming from %s: %s; trying the one before it", checkpoint.path, problem)
        refused.append((checkpoint.path, problem))
    return None, None, refused


def _all_agree(problem: str | None, path: str, *, rank: int, world: int) -> str | None:
    """None when every rank verified and loaded the checkpoint at `path`; else why not, the same
    on every rank (so all of them move on to the same next candidate)."""
    votes: list[Any] = [(path, problem)]
    if world > 1:
        votes = [None] * world
        dist.all_gather_object(votes, (path, problem))
    if any(other != path for other, _ in votes):
        raise RuntimeError("the workers were handed different checkpoints to resume from; none is loaded")
    failed = [(r, why) for r, (_, why) in enumerate(votes) if why is not None]
    if not failed:
        return None
    if len({why for _, why in failed}) == 1 and len(failed) == world:
        return failed[0][1]  # every rank alike: once
    return "; ".join(f"rank {r}: {why}" for r, why in failed)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "no detail"
