"""s3:// model sources: the model folder copied once per node into a local cache, then loaded from
there like any local folder.

Every process that needs the model (the driver's preflight, each Ray Train worker, the scoring
task) asks `local_copy` for it; the first one on a node copies the objects, the others on that
node wait on its lock and take the folder (node_cache.py). So a node reads the model from storage
once, however many workers it runs, and a node the autoscaler adds later fetches its own copy.
The cache key covers the endpoint, the URI and each object's name, size and modification time:
a model replaced in the bucket is a new folder, never a stale one.

What is copied is data only: configs, tokenizer files and safetensors weights. Python files are
never copied (trustRemoteCode is refused for s3:// sources: the spec says why) and neither are
pickled weights (`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`): unpickling runs code, and nothing a job
can write to storage may be executed. A folder without safetensors weights is refused, naming
spec.model.source.

Reads go through spec.storage's endpoint with the job's own credentials: pyarrow's S3FileSystem
built without keys reads the AWS variables of this process (the pods get them from the job's
Secret), as the ingest's reads do.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .node_cache import default_cache_root, materialize
from .sources import SourceError

if TYPE_CHECKING:
    from .spec import StorageSpec

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken")  # configs, weights, tokenizer files
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def local_copy(source: str, storage: StorageSpec | None, cache_root: Path | None = None) -> Path:
    """This node's copy of the model folder at `source` (s3://bucket/prefix); SourceError names
    what is wrong in words the user acts on."""
    import pyarrow.fs

    if storage is None or not storage.uri.startswith("s3://"):
        raise SourceError(f"{source} is on S3, and spec.storage names no S3 endpoint; set spec.storage")
    from .storage.s3 import pyarrow_filesystem

    filesystem = pyarrow_filesystem(storage)
    root = source.removeprefix("s3://").strip("/")
    try:
        infos = filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as err:
        raise SourceError(f"{source}: cannot list the model's objects: {err}") from None
    files = {PurePosixPath(i.path).relative_to(root).as_posix(): i for i in infos if i.type == pyarrow.fs.FileType.File}
    kept = {name: info for name, info in files.items() if name.endswith(DATA_SUFFIXES)}
    if not any(name.endswith(".safetensors") for name in kept):
        pickled = sorted(n for n in files if n.endswith(PICKLED))
        why = (f"it has pickled weights only ({', '.join(pickled[:3])}), which are never loaded from storage: unpickling "
               "runs code; save the model with safe_serialization (safetensors)") if pickled else (
               f"no .safetensors weights under it ({len(files)} objects)")
        raise SourceError(f"{source}: not a model folder this trainer loads from S3: {why}")
    skipped = sorted(set(files) - set(kept))
    if skipped:
        log.info("%s: not copied (not model data): %s", source, ", ".join(skipped[:10]))
    listing = sorted((name, info.size, info.mtime_ns) for name, info in kept.items())
    key = hashlib.sha256(json.dumps([storage.endpoint, source, listing]).encode()).hexdigest()[:16]
    base = (cache_root if cache_root is not None else default_cache_root()) / "s3-models"
    name = PurePosixPath(root).name or "model"
    return materialize(base, f"{name}-{key}", lambda tmp: _copy(filesystem, root, kept, tmp), what=f"copying {source}")


def _copy(filesystem: Any, root: str, files: dict[str, Any], into: Path) -> None:
    """Each object into `into`, its size checked (a short read must not become a cached model)."""
    for name, info in files.items():
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with filesystem.open_input_stream(f"{root}/{name}") as source, target.open("wb") as out:
            while chunk := source.read(8 << 20):
                out.write(chunk)
        if target.stat().st_size != info.size:
            raise SourceError(f"s3://{root}/{name}: read {target.stat().st_size} of {info.size} bytes")


def on_this_node(model_dir: str, source: str, storage: StorageSpec | None) -> str:
    """`model_dir` (the driver's path to the model) as a path on this node: itself for a local or
    pkg:// source; for an s3:// one, this node's cache copy (the same path where the cache root is
    the same, fetched here if this node has none yet)."""
    if not source.startswith("s3://"):
        return model_dir
    return str(local_copy(source, storage))
