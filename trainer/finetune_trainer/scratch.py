"""The local folder a Train worker builds each checkpoint in before `ray.train.report` copies it out.

The recipe removes that folder once the report returns. But when ASHA stops a trial, Tune stops its
Train workers while they are blocked in that very report (or still writing the folder): the
process is killed and its `finally` never runs. Each stopped trial then left a checkpoint-sized
folder in the worker's temp dir (seen here: 78 folders, 20 MB each with the tiny test model,
after a day of searches; with a real model it is GBs per stopped trial, in a pod's ephemeral
storage). Ray neither deletes a folder it was handed nor offers a hook that runs in a killed
worker, so this is hand-written: folder names carry the host and the pid that made them, and
making a new one first removes those of this host whose process is gone.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

PREFIX = "ftj-ckpt-"


def checkpoint_folder(root: str | None = None) -> str:
    """A new empty folder for one checkpoint, after sweeping folders left by killed workers."""
    root = root or tempfile.gettempdir()
    sweep(root)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{_host()}-{os.getpid()}-", dir=root)


def sweep(root: str | None = None) -> list[Path]:
    """Remove this host's checkpoint folders whose pid no longer runs."""
    removed = left_by_dead_workers(root)
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def left_by_dead_workers(root: str | None = None) -> list[Path]:
    """This host's checkpoint folders whose pid no longer runs. Another host's folders (a temp dir
    shared between pods) are never listed: its pids are not ours to test."""
    start = len(PREFIX) + len(_host()) + 1
    return [folder for folder in _folders(root)
            if (pid := folder.name[start:].split("-", 1)[0]).isdigit() and not _alive(int(pid))]


def sweep_when_gone(seconds: float = 30.0) -> list[Path]:
    """`sweep`, for the search driver once its trials have ended: Tune returns before the workers of
    the trials it stopped have exited (Ray kills actors asynchronously), so a folder whose process
    still runs is given up to `seconds` to be freed. A folder of another search running on this
    host just costs the wait."""
    deadline = time.monotonic() + seconds
    removed = sweep()
    while _folders() and time.monotonic() < deadline:
        time.sleep(0.5)
        removed += sweep()
    return removed


def _folders(root: str | None = None) -> list[Path]:
    return list(Path(root or tempfile.gettempdir()).glob(f"{PREFIX}{_host()}-*-*"))


def _host() -> str:
    # "-" separates the name's fields; a hostname may contain it
    return socket.gethostname().replace("-", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # a killed worker its parent has not reaped yet answers signal 0 too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): signal 0 is all there is
        return True
