"""Which checkpoints count: a checkpoint directory is complete only when its manifest
`_COMPLETE.json` exists (written last, after every file is uploaded) and lists exactly the files
there, with their sizes; it is loaded only when every file also matches the SHA-256 the manifest
records (`integrity`).

Layout (Ray Train's, under RunConfig(storage_path=<prefix>/<namespace>/<job>, name=<run>)):

    <prefix>/<namespace>/<job>/<run>/checkpoint_<timestamp>/   one checkpoint (Ray names it)
        deepspeed/..., trainer_state.json, model/...          the files, from every worker
        _sha256_rank_<N>.json                                  each worker's hashes of its files
        _COMPLETE.json                                         {"version": 2, "files": {name: {size, sha256}}, "step", "metrics"}
    <prefix>/<namespace>/<job>/<run>/results.json
    (a Tune search adds one level: <run>/<trial>/checkpoint_<timestamp>/)

Two levels of checking, because reading every file is what a load costs, not what a listing may:
  - complete (`list_complete_checkpoints`, retention): the manifest is valid and of this version,
    the folder holds exactly the listed files at the listed sizes (and ETags where the store has
    them). One listing, no file read.
  - verified (`latest_complete`, `best_complete`, `read_complete`, `resume_point`: whatever is
    about to be loaded): complete, and every file's SHA-256 matches, streamed from the store. A
    complete checkpoint that fails is skipped with a warning and the one before it is tried.

"Latest" is the order of the markers' LastModified as the store reports it, then the folder's
name; not a time written inside the marker. Why: the store sets LastModified when the marker is
written (the writer's last act), a reader sees it in the listing, and no writer can date a
marker ahead (a marker claiming year 9999 stayed "latest" forever, shadowing every later
checkpoint). The name breaks ties within a second (S3 lists whole seconds): Ray's
checkpoint_<timestamp>, our run-<time> and (within a trial's folder) <job>-<trial>-start-<time>
names sort in the order they were made.
Why not the step: a new run started from scratch (resume: none) writes steps below those of the
run before it and is still the latest. A copied prefix (backup, `aws s3 sync`) gets new
LastModified times in copy order: resume from such a copy with an explicit checkpoint URI.

Everything here works on a `Store` (S3 through boto3, or a local folder) and searches any depth
below the prefix it is given, so the same calls serve a single run, a search and a whole job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import CheckpointRefused, StorageError
from .integrity import MARKER, MARKER_VERSION, check_listing, hashes_from_sidecars, is_sidecar, parse_marker
from .s3 import ObjectInfo, Store, join_key

CHECKPOINT_DIR_PREFIX = "checkpoint_"  # Ray Train's default directory names (sortable timestamps)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompleteCheckpoint:
    key: str  # the checkpoint directory, relative to the store root, no trailing "/"
    uri: str
    step: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    completed_at: float = 0.0  # the store's LastModified of the marker (unix time): what "latest" orders by
    files: int = 0
    bytes: int = 0
    hashes: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # {name: sha256}

    @property
    def parent(self) -> str:
        return self.key.rpartition("/")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]


def mark_complete(store: Store, checkpoint_key: str, meta: Mapping[str, Any] | None = None) -> CompleteCheckpoint:
    """Write `<checkpoint_key>/_COMPLETE.json` listing every file now under the directory with its
    size and SHA-256 (from the workers' sidecars where the stored size matches, else read back).

    Call it only when every writer has finished (Ray Train: after the report that carries the
    checkpoint was received from all workers; see `ray_callback.CheckpointCompletion`).
    `meta` may hold "step" and "metrics" (numbers), used by best_complete and shown in status.
    """
    checkpoint_key = checkpoint_key.strip("/")
    prefix = checkpoint_key + "/"
    listed = {k[len(prefix) :]: info for k, info in store.list(checkpoint_key).items() if k != prefix + MARKER}
    if not listed:
        raise StorageError(f"{store.uri(checkpoint_key)} holds no files: nothing to mark complete")
    sidecars = {name: store.read(prefix + name) or b"" for name in listed if is_sidecar(name)}
    reported = hashes_from_sidecars(sidecars.values())
    files: dict[str, dict[str, Any]] = {}
    for name, info in sorted(listed.items()):
        if name in sidecars:
            digest: str | None = hashlib.sha256(sidecars[name]).hexdigest()
        elif name in reported and reported[name][0] == info.size:
            digest = reported[name][1]
        else:
            digest = store.sha256(prefix + name)
        if digest is None:
            raise StorageError(f"{store.uri(prefix + name)} vanished while its checkpoint was being marked complete")
        files[name] = {"size": info.size, "sha256": digest, **({"etag": info.etag} if info.etag else {})}
    meta = dict(meta or {})
    manifest = {
        **meta,
        "version": MARKER_VERSION,
        "step": meta.get("step"),
        "metrics": _numbers(meta.get("metrics") or {}),
        "files": files,
    }
    store.write(prefix + MARKER, json.dumps(manifest, indent=1).encode())
    written = store.list(checkpoint_key).get(prefix + MARKER)
    return _complete(store, checkpoint_key, manifest, written.modified if written else 0.0)


def list_complete_checkpoints(store: Store, prefix: str) -> list[CompleteCheckpoint]:
    """Every complete checkpoint at any depth under `prefix`, oldest first (no hash is checked).

    Skips directories without a marker, with an unreadable or older-version marker, or where a
    listed file is missing or has another size/ETag, or a file is there that the marker does not
    list (an upload cut short, a retention delete cut short, a planted file).
    """
    return sorted(_scan(store, prefix).complete, key=_order)


def latest_complete(store: Store, job_prefix: str) -> CompleteCheckpoint | None:
    """The most recently completed checkpoint of any run under `job_prefix` whose files all match
    their hashes, or None. A newer one that fails is skipped (a warning says why)."""
    return _latest(store, job_prefix)[0]


def best_complete(store: Store, prefix: str, metric: str, mode: Literal["min", "max"]) -> CompleteCheckpoint | None:
    """The verified checkpoint with the best `metric` (e.g. "eval_loss"); ties go to the newer one."""
    scored = [c for c in list_complete_checkpoints(store, prefix) if _finite(c.metrics.get(metric))]
    sign = 1 if mode == "max" else -1
    ranked = sorted(scored, key=lambda c: (sign * c.metrics[metric], *_order(c)), reverse=True)
    return _first_verified(store, ranked, [])


def read_complete(store: Store, checkpoint_key: str) -> CompleteCheckpoint:
    """The checkpoint at `checkpoint_key` if it is complete and every file matches its hash;
    CheckpointRefused (a StorageError) saying why not otherwise."""
    checkpoint_key = checkpoint_key.strip("/")
    objects = store.list(checkpoint_key)
    marker = objects.get(checkpoint_key + "/" + MARKER)
    try:
        found = _checked(store, checkpoint_key, store.read(checkpoint_key + "/" + MARKER), objects,
                         marker.modified if marker else 0.0)
        _verify_hashes(store, found)
    except CheckpointRefused as why:
        raise CheckpointRefused(f"{store.uri(checkpoint_key)} is not a complete checkpoint: {why}") from None
    return found


def resume_point(store: Store, resume: str, job_prefix: str, *, hashes: bool = True) -> CompleteCheckpoint | None:
    """What `spec.storage.resume` (or `--resume`, which means `latest`) points at.

    never: None. latest: the newest verified checkpoint of any earlier run of the job, or None when
    there is none yet (a first run with `resume: latest` starts fresh). When checkpoints with a
    marker exist but none verifies, CheckpointRefused: starting over from step 0 in silence would
    throw away what they hold. An s3:// URI: that checkpoint, which must verify.

    `hashes=False` (latest only): the newest complete one (its marker valid, the folder holding
    exactly the listed files at their sizes) without reading its files, for a caller whose loader
    hashes every file itself and falls back to the complete ones before it (a search trial's
    start and resume: resume.py on its workers). Each resume then reads the checkpoint once, not
    twice (from S3: one download of the weights and optimizer state, not two).
    """
    if resume in {"never", "none"}:
        return None
    if resume != "latest":
        return read_complete(store, store.key_of(resume))
    found, refused = _latest(store, job_prefix, hashes=hashes)
    if found is None and refused:
        listed = "; ".join(f"{store.uri(key)}: {why}" for key, why in refused[:3])
        raise CheckpointRefused(
            f"resume: latest found {len(refused)} checkpoint(s) under {store.uri(job_prefix)} and none can be loaded "
            f"({listed}). Set spec.storage.resume: never (or run without --resume) to start over from step 0, or "
            "name a checkpoint that verifies"
        )
    return found


def prune(store: Store, prefix: str, *, keep_latest: int = 1, keep_best: int = 0, metric: str | None = None,
          mode: Literal["min", "max"] = "min") -> list[str]:
    """Retention, per run (the checkpoints that share a parent directory); returns deleted dirs.

    Keeps the `keep_latest` newest complete checkpoints (at least 1) and the `keep_best` best by
    `metric`. `output.keepCheckpoints: N` (today's meaning: the latest plus N best) is
    `keep_latest=1, keep_best=N`. Incomplete directories are deleted only when they sort before
    the newest complete one of their run (a write that died); a newer one may still be uploading.
    Markers are deleted first, so a checkpoint being deleted never looks complete.
    """
    scan = _scan(store, prefix)
    complete, incomplete = scan.complete, scan.incomplete
    by_parent: dict[str, list[CompleteCheckpoint]] = defaultdict(list)
    for c in complete:
        by_parent[c.parent].append(c)
    doomed: list[str] = []
    for parent, group in by_parent.items():
        group.sort(key=_order)
        keep = {c.key for c in group[-max(1, keep_latest) :]}
        if metric and keep_best > 0:
            scored = [c for c in group if _finite(c.metrics.get(metric))]
            sign = 1 if mode == "max" else -1
            scored.sort(key=lambda c: (sign * c.metrics[metric], *_order(c)), reverse=True)
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
    """results.json / status.json: one PUT on S3, temp file + rename locally; readers never see half.
    Strict JSON: a diverged run's NaN or infinite numbers are written as null."""
    from ..spec.progress import finite_only

    store.write(key, json.dumps(finite_only(dict(payload)), indent=2, default=str, allow_nan=False).encode())
    return store.uri(key)


def read_json(store: Store, key: str) -> dict[str, Any] | None:
    raw = store.read(key)
    return json.loads(raw) if raw is not None else None


# ------------------------------------------------------------------------------------------ internals


@dataclass
class _Scan:
    complete: list[CompleteCheckpoint]
    incomplete: dict[str, list[str]]  # {parent: [checkpoint dirs without a valid marker]}
    refused: list[tuple[str, str]]  # (dir, why) of those that have a marker, which fails


def _order(c: CompleteCheckpoint) -> tuple[float, str]:
    return (c.completed_at, c.key)


def _scan(store: Store, prefix: str) -> _Scan:
    """Complete, incomplete and refused checkpoint directories, with one listing."""
    objects = store.list(prefix)
    dirs: set[str] = set()
    for key in objects:
        parts = key.split("/")
        # a checkpoint dir: it holds a marker, or Ray named it checkpoint_*; files belong to the nearest one
        for depth in range(len(parts) - 1, 0, -1):
            head = "/".join(parts[:depth])
            if parts[depth - 1].startswith(CHECKPOINT_DIR_PREFIX) or head + "/" + MARKER in objects:
                dirs.add(head)
                break
    scan = _Scan([], defaultdict(list), [])
    for folder in sorted(dirs):
        marker = objects.get(folder + "/" + MARKER)
        if marker is None:
            scan.incomplete[folder.rpartition("/")[0]].append(folder)
            continue
        # every object below the folder counts, also those in a nested checkpoint_* folder
        inside = {k: info for k, info in objects.items() if k.startswith(folder + "/")}
        try:
            scan.complete.append(_checked(store, folder, store.read(folder + "/" + MARKER), inside, marker.modified))
        except CheckpointRefused as why:
            scan.incomplete[folder.rpartition("/")[0]].append(folder)
            scan.refused.append((folder, str(why)))
    return scan


def _checked(store: Store, folder: str, raw: bytes | None, objects: Mapping[str, ObjectInfo], modified: float) -> CompleteCheckpoint:
    """The checkpoint when its marker is valid and the folder holds exactly the listed files at
    their sizes (and ETags); CheckpointRefused otherwise. Reads no file but the marker."""
    manifest = parse_marker(raw)
    prefix = folder + "/"
    present = {k[len(prefix) :]: info for k, info in objects.items() if k.startswith(prefix) and k != prefix + MARKER}
    check_listing(manifest, {name: info.size for name, info in present.items()})
    for name, want in manifest["files"].items():
        if want.get("etag") and present[name].etag and want["etag"] != present[name].etag:
            raise CheckpointRefused(f"{name} changed after the checkpoint was completed (ETag differs)")
    return _complete(store, folder, manifest, modified)


def _verify_hashes(store: Store, checkpoint: CompleteCheckpoint) -> None:
    for name, digest in checkpoint.hashes.items():
        have = store.sha256(f"{checkpoint.key}/{name}")
        if have is None:
            raise CheckpointRefused(f"{name} is missing")
        if have != digest:
            raise CheckpointRefused(f"{name} does not match the SHA-256 in its {MARKER} (changed after it was written)")


def _first_verified(store: Store, ranked: Iterable[CompleteCheckpoint], refused: list[tuple[str, str]]) -> CompleteCheckpoint | None:
    """The first of `ranked` whose files match their hashes; each one that does not is logged
    and added to `refused`."""
    for checkpoint in ranked:
        try:
            _verify_hashes(store, checkpoint)
        except CheckpointRefused as why:
            log.warning("checkpoint %s is not loaded: %s; trying the one before it", checkpoint.uri, why)
            refused.append((checkpoint.key, str(why)))
            continue
        return checkpoint
    return None


def _latest(store: Store, prefix: str, *, hashes: bool = True) -> tuple[CompleteCheckpoint | None, list[tuple[str, str]]]:
    scan = _scan(store, prefix)
    refused = list(scan.refused)
    ranked = sorted(scan.complete, key=_order, reverse=True)
    if not hashes:
        return (ranked[0] if ranked else None), refused
    return _first_verified(store, ranked, refused), refused


def _complete(store: Store, key: str, manifest: Mapping[str, Any], modified: float) -> CompleteCheckpoint:
    files = manifest.get("files", {})
    step = manifest.get("step")
    return CompleteCheckpoint(
        key=key, uri=store.uri(key), step=step if isinstance(step, int) and not isinstance(step, bool) else None,
        metrics=_numbers(manifest.get("metrics") or {}), completed_at=modified, files=len(files),
        bytes=sum(int(f.get("size", 0)) for f in files.values()), hashes={n: f["sha256"] for n, f in files.items()},
    )


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float | int | bool]:
    if not isinstance(metrics, Mapping):
        return {}
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool)) and _finite(v)}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
