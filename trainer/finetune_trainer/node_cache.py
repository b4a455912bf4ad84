"""A folder built once per node and shared by every process on it: the GGUF conversion (gguf.py)
and the copy of an s3:// model (remote_model.py).

The folder is `<base>/<key>`; it exists only once complete, because it is built in a temporary
sibling and renamed into place (a rename is atomic, so a folder that exists is whole). An
exclusive `flock` on `<key>.lock` makes concurrent callers (several Ray workers on one node) build
it once; the others wait and then take the cache hit. A crash leaves only a temporary folder,
which the next lock holder removes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


def default_cache_root() -> Path:
    """`$FINETUNE_CACHE_DIR`, else `~/.cache/finetune-operator` (shared by all local workers)."""
    env = os.environ.get("FINETUNE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "finetune-operator"


def materialize(base: Path, key: str, build: Callable[[Path], None], *, what: str) -> Path:
    """`<base>/<key>`, built by `build(tmp_folder)` if no process on this node has built it yet."""
    base.mkdir(parents=True, exist_ok=True)
    final = base / key
    if final.is_dir():  # fast path: the rename is atomic, so an existing folder is complete
        return final
    with (base / f"{key}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if final.is_dir():  # another process finished while we waited
                return final
            # Only the lock holder writes temporaries, so any found now are crash leftovers.
            for stale in base.glob(f"{key}{TMP_MARK}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{key}{TMP_MARK}", dir=base))
            try:
                started = time.perf_counter()
                log.info("%s -> %s", what, final)
                build(tmp)
                _publish(tmp, final)
                log.debug("%s took %.1f s", what, time.perf_counter() - started)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; losing a race (e.g. where flock is a no-op) is fine."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
