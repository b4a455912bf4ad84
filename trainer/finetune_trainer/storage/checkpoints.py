"""Which checkpoints count: a checkpoint directory is complete only when its manifest
`_COMPLETE.json` exists (written last, after every file is uploaded) and every file it lists is
there with the listed size (and ETag, where the store has one).

Layout (Ray Train's, under RunConfig(storage_path=<prefix>/<namespace>/<job>, name=<run>)):

    <prefix>/<namespace>/<job>/<run>/checkpoint_<timestamp>/   one checkpoint (Ray names it)
        deepspeed/..., trainer_state.json, model/...          the files, from every worker
        _COMPLETE.json                                         {"files": {...}, "step", "metrics"}
    <prefix>/<namespace>/<job>/<run>/results.json
    (a Tune search adds one level: <run>/<trial>/checkpoint_<timestamp>/)

Everything here works on a `Store` (S3 through boto3, or a local folder) and searches any depth
below the prefix it is given, so the same calls serve a single run, a search and a whole job.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from .errors import StorageError
from .s3 import ObjectInfo, Store, join_key

MARKER = "_COMPLETE.json"
CHECKPOINT_DIR_PREFIX = "checkpoint_"  # Ray Train's default directory names (sortable timestamps)
MARKER_VERSION = 1


@dataclass(frozen=True)
class CompleteCheckpoint:
    key: str  # the checkpoint directory, relative to the store root, no trailing "/"
    uri: str
    step: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    completed_at: float = 0.0  # unix time the marker was written
    files: int = 0
    bytes: int = 0

    @property
    def parent(self) -> str:
        return self.key.rpartition("/")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]


def mark_complete(store: Store, checkpoint_key: str, meta: Mapping[str, Any] | None = None) -> CompleteCheckpoint:
    """Write `<checkpoint_key>/_COMPLETE.json` listing every file now under the directory.

    Call it only when every writer has finished (Ray Train: after the report that carries the
    checkpoint was received from all workers; see `ray_callback.CheckpointCompletion`).
    `meta` may hold "step" and "metrics" (numbers), used by best_complete and shown in status.
    """
    checkpoint_key = checkpoint_key.strip("/")
    prefix = checkpoint_key + "/"
    listed = {k[len(prefix) :]: info for k, info in store.list(checkpoint_key).items() if k != prefix + MARKER}
    if not listed:
        raise StorageError(f"{store.uri(checkpoint_key)} holds no files: nothing to mark complete")
    meta = dict(meta or {})
    now = time.time()
    manifest = {
        "version": MARKER_VERSION,
        "completed_at": now,
        "completed": datetime.fromtimestamp(now, UTC).isoformat(),
        "step": meta.pop("step", None),
        "metrics": _numbers(meta.pop("metrics", {})),
        **meta,
        "files": {name: {"size": info.size, **({"etag": info.etag} if info.etag else {})} for name, info in sorted(listed.items())},
    }
    store.write(prefix + MARKER, json.dumps(manifest, indent=1).encode())
    return _complete(store, checkpoint_key, manifest)


def list_complete_checkpoints(store: Store, prefix: str) -> list[CompleteCheckpoint]:
    """Every complete checkpoint at any depth under `prefix`, oldest first.

    Skips directories without a marker, with an unreadable marker, or where a listed file is
    missing or has another size/ETag (an upload cut short, a retention delete cut short).
    """
    return sorted(_scan(store, prefix)[0], key=lambda c: (c.completed_at, c.key))


def latest_complete(store: Store, job_prefix: str) -> CompleteCheckpoint | None:
    """The most recently completed checkpoint of any run under `job_prefix`, or None."""
    found = list_complete_checkpoints(store, job_prefix)
    return found[-1] if found else None


def best_complete(store: Store, prefix: str, metric: str, mode: Literal["min", "max"]) -> CompleteCheckpoint | None:
    """The complete checkpoint with the best `metric` (e.g. "eval_loss"); ties go to the newer one."""
    scored = [c for c in list_complete_checkpoints(store, prefix) if _finite(c.metrics.get(metric))]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda c: (sign * c.metrics[metric], c.completed_at))


def read_complete(store: Store, checkpoint_key: str) -> CompleteCheckpoint:
    """The checkpoint at `checkpoint_key` if it is complete; StorageError saying why not otherwise."""
    checkpoint_key = checkpoint_key.strip("/")
    objects = store.list(checkpoint_key)
    raw = store.read(checkpoint_key + "/" + MARKER)
    if raw is None:
        raise StorageError(f"{store.uri(checkpoint_key)} is not a complete checkpoint (no {MARKER}: it was cut short or is still uploading)")
    problem = _verify(checkpoint_key, raw, objects)
    if isinstance(problem, str):
        raise StorageError(f"{store.uri(checkpoint_key)} is not a complete checkpoint: {problem}")
    return _complete(store, checkpoint_key, problem)


def resume_point(store: Store, resume: str, job_prefix: str) -> CompleteCheckpoint | None:
    """What `spec.storage.resume` (or `--resume`, which means `latest`) points at.

    none: None. latest: the newest complete checkpoint of any earlier run of the job, or None when
    there is none yet (a first run with `resume: latest` starts fresh). An s3:// URI: that
    checkpoint, which must be complete (StorageError otherwise).
    """
    if resume == "none":
        return None
    if resume == "latest":
        return latest_complete(store, job_prefix)
    return read_complete(store, store.key_of(resume))


def prune(store: Store, prefix: str, *, keep_latest: int = 1, keep_best: int = 0, metric: str | None = None,
          mode: Literal["min", "max"] = "min") -> list[str]:
    """Retention, per run (the checkpoints that share a parent directory); returns deleted dirs.

    Keeps the `keep_latest` newest complete checkpoints (at least 1) and the `keep_best` best by
    `metric`. `output.keepCheckpoints: N` (today's meaning: the latest plus N best) is
    `keep_latest=1, keep_best=N`. Incomplete directories are deleted only when they sort before
    the newest complete one of their run (a write that died); a newer one may still be uploading.
    Markers are deleted first, so a checkpoint being deleted never looks complete.
    """
    complete, incomplete = _scan(store, prefix)
    by_parent: dict[str, list[CompleteCheckpoint]] = defaultdict(list)
    for c in complete:
        by_parent[c.parent].append(c)
    doomed: list[str] = []
    for parent, group in by_parent.items():
        group.sort(key=lambda c: (c.completed_at, c.key))
        keep = {c.key for c in group[-max(1, keep_latest) :]}
        if metric and keep_best > 0:
            scored = [c for c in group if _finite(c.metrics.get(metric))]
            sign = 1 if mode == "max" else -1
            scored.sort(key=lambda c: (sign * c.metrics[metric], c.completed_at), reverse=True)
            keep |= {c.key for c in scored[:keep_best]}
        doomed += [c.key for c in group if c.key not in keep]
        newest = group[-1].name
        doomed += [key for key in incomplete.get(parent, []) if key.rpartition("/")[2] < newest]
    if not doomed:
        return []
    objects = store.list(prefix)
    markers = [join_key(d, MARKER) for d in doomed if join_key(d, MARKER) in objects]
    store.delete(markers)
    store.delete(k for k in objects if any(k.startswith(d + "/") for d in doomed) and k not in markers)
    return sorted(doomed)


def upload_dir(store: Store, folder: str | Path, key_prefix: str) -> int:
    """Every file under a local `folder` to `key_prefix/...` (the exported model); files uploaded.

    Not a checkpoint, so no marker: write results.json (which names the model) after it returns,
    and a reader that finds results.json finds the whole model.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        store.put_file(join_key(key_prefix, path.relative_to(folder).as_posix()), path)
    return len(files)


def write_json(store: Store, key: str, payload: Mapping[str, Any]) -> str:
    """results.json / status.json: one PUT on S3, temp file + rename locally; readers never see half."""
    store.write(key, json.dumps(payload, indent=2, default=str).encode())
    return store.uri(key)


def read_json(store: Store, key: str) -> dict[str, Any] | None:
    raw = store.read(key)
    return json.loads(raw) if raw is not None else None


# ------------------------------------------------------------------------------------------ internals


def _scan(store: Store, prefix: str) -> tuple[list[CompleteCheckpoint], dict[str, list[str]]]:
    """(complete checkpoints, {parent: [incomplete checkpoint dirs]}) with one listing."""
    objects = store.list(prefix)
    dirs: dict[str, dict[str, ObjectInfo]] = defaultdict(dict)
    for key, info in objects.items():
        parts = key.split("/")
        # a checkpoint dir: it holds a marker, or Ray named it checkpoint_*; files belong to the nearest one
        for depth in range(len(parts) - 1, 0, -1):
            head = "/".join(parts[:depth])
            if parts[depth - 1].startswith(CHECKPOINT_DIR_PREFIX) or head + "/" + MARKER in objects:
                dirs[head][key] = info
                break
    complete: list[CompleteCheckpoint] = []
    incomplete: dict[str, list[str]] = defaultdict(list)
    for folder, files in dirs.items():
        manifest = None
        if folder + "/" + MARKER in files:
            raw = store.read(folder + "/" + MARKER)
            checked = _verify(folder, raw, files) if raw is not None else "marker vanished"
            manifest = checked if isinstance(checked, dict) else None
        if manifest is None:
            incomplete[folder.rpartition("/")[0]].append(folder)
        else:
            complete.append(_complete(store, folder, manifest))
    return complete, incomplete


def _verify(folder: str, raw: bytes, objects: Mapping[str, ObjectInfo]) -> dict[str, Any] | str:
    """The manifest when every listed file is there as listed, else what is wrong."""
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        assert isinstance(files, dict) and files
    except (ValueError, KeyError, TypeError, AssertionError):
        return f"{MARKER} is not a valid manifest"
    for name, want in files.items():
        have = objects.get(f"{folder}/{name}")
        if have is None:
            return f"{name} is missing"
        if have.size != want.get("size"):
            return f"{name} has {have.size} bytes, the manifest says {want.get('size')}"
        if want.get("etag") and have.etag and want["etag"] != have.etag:
            return f"{name} changed after the checkpoint was completed (ETag differs)"
    return manifest


def _complete(store: Store, key: str, manifest: Mapping[str, Any]) -> CompleteCheckpoint:
    files = manifest.get("files", {})
    return CompleteCheckpoint(
        key=key, uri=store.uri(key), step=manifest.get("step"), metrics=dict(manifest.get("metrics") or {}),
        completed_at=float(manifest.get("completed_at", 0.0)), files=len(files),
        bytes=sum(int(f.get("size", 0)) for f in files.values()),
    )


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float | int | bool]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool)) and _finite(v)}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
