"""What makes a checkpoint's files trustworthy enough to load: a SHA-256 per file in its marker.

The marker `_COMPLETE.json` (version 2) lists every file of the checkpoint with its size and
SHA-256. A checkpoint is loaded only when the folder holds exactly those files, each with that
hash: a file changed after the checkpoint was written (same size or not), a file missing, or a
file the marker does not list (a planted `zero_pp_rank_9_..._optim_states.pt`, which DeepSpeed
would find by its glob and unpickle) makes it refused, and the previous one is used.

Who computes the hashes: each Ray Train worker, over the files it just wrote into its local
checkpoint folder, in a small sidecar `_sha256_rank_<rank>.json` (written last, uploaded with the
rest). The controller's callback (`checkpoints.mark_complete`) takes the hash of each stored file
from the sidecars when the stored size matches, and reads and hashes anything else itself. Why
not always read back from the store: a real model's ZeRO state is tens of GB per checkpoint, and
the controller would download all of it at every evaluation; the workers hash files that are
still in their page cache.

What the hashes do not stop: whoever can rewrite the marker can list their own hashes. They stop
corruption, truncation, files planted or swapped by someone who does not also rewrite the
marker, and a marker of an older version (no hashes) being taken for a verified one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CheckpointRefused

MARKER = "_COMPLETE.json"
MARKER_VERSION = 2  # 1 (before hashes): size and ETag only, refused for loading
SIDECAR_PREFIX = "_sha256_rank_"
_SIDECAR = re.compile(rf"^{SIDECAR_PREFIX}\d+\.json$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


def sha256_stream(stream: BinaryIO | Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    if hasattr(stream, "read"):
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    else:
        for chunk in stream:
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as stream:
        return sha256_stream(stream)


def local_files(folder: str | Path) -> dict[str, Path]:
    """Every file under `folder` by its '/'-separated relative name."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def is_sidecar(name: str) -> bool:
    return "/" not in name and bool(_SIDECAR.match(name))


def write_file_hashes(folder: str | Path, rank: int) -> Path:
    """The worker's side: size and SHA-256 of every file it wrote into `folder`, as
    `_sha256_rank_<rank>.json` beside them. Call it after the last file is written, before
    `ray.train.report` uploads the folder."""
    files = {name: {"size": path.stat().st_size, "sha256": sha256_file(path)}
             for name, path in local_files(folder).items() if name != MARKER and not is_sidecar(name)}
    sidecar = Path(folder) / f"{SIDECAR_PREFIX}{rank}.json"
    sidecar.write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
    return sidecar


def hashes_from_sidecars(sidecars: Iterable[bytes]) -> dict[str, tuple[int, str]]:
    """{name: (size, sha256)} every sidecar agrees on; a name two sidecars list differently is
    left out (the controller then hashes the stored object itself). Malformed entries are skipped."""
    seen: dict[str, set[tuple[int, str]]] = {}
    for raw in sidecars:
        try:
            files = json.loads(raw)["files"]
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(files, dict):
            continue
        for name, entry in files.items():
            if isinstance(entry, dict) and isinstance(entry.get("size"), int) and _HEX.match(str(entry.get("sha256", ""))):
                seen.setdefault(name, set()).add((entry["size"], entry["sha256"]))
    return {name: next(iter(found)) for name, found in seen.items() if len(found) == 1}


def parse_marker(raw: bytes | None) -> dict[str, Any]:
    """The marker as a dict with a valid `files` table, or CheckpointRefused saying what is wrong."""
    if raw is None:
        raise CheckpointRefused(f"no {MARKER}: it was cut short or is still uploading")
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        assert isinstance(manifest, dict) and isinstance(files, dict) and files
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointRefused(f"{MARKER} is not a valid manifest") from None
    if manifest.get("version") != MARKER_VERSION:
        raise CheckpointRefused(
            f"{MARKER} is version {manifest.get('version')!r}, written before file hashes were recorded (version "
            f"{MARKER_VERSION}): its files cannot be verified, so it is never loaded"
        )
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and _HEX.match(str(entry.get("sha256", "")))):
            raise CheckpointRefused(f"{MARKER} lists {name} without a size and SHA-256")
        if name == MARKER or name.startswith("/") or any(part in {"", ".", ".."} for part in name.split("/")):
            raise CheckpointRefused(f"{MARKER} lists a file name that is not a plain relative path: {name!r}")
    return manifest


def check_listing(manifest: Mapping[str, Any], present: Mapping[str, int]) -> None:
    """The folder (`present`: {name: size}, the marker left out) holds exactly the listed files,
    at the listed sizes; CheckpointRefused otherwise. Cheap: no file is read."""
    files = manifest["files"]
    unlisted = sorted(set(present) - set(files))
    if unlisted:
        shown = ", ".join(unlisted[:3]) + (f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else "")
        raise CheckpointRefused(f"it holds {len(unlisted)} file(s) its {MARKER} does not list ({shown}): they could be planted")
    for name, want in files.items():
        if name not in present:
            raise CheckpointRefused(f"{name} is missing")
        if present[name] != want["size"]:
            raise CheckpointRefused(f"{name} has {present[name]} bytes, the marker says {want['size']}")


def verify_local(folder: str | Path) -> dict[str, Any]:
    """The worker's check of the copy it is about to load, before DeepSpeed or torch reads any of
    it: the marker is version 2, the folder holds exactly the files it lists, each with its
    SHA-256. Returns the marker; CheckpointRefused says why not."""
    root = Path(folder)
    marker = root / MARKER
    manifest = parse_marker(marker.read_bytes() if marker.is_file() else None)
    found = {name: path for name, path in local_files(root).items() if name != MARKER}
    links = sorted(name for name, path in found.items() if path.is_symlink())
    if links:
        raise CheckpointRefused(f"it holds symbolic links ({', '.join(links[:3])}): a checkpoint is plain files")
    check_listing(manifest, {name: path.stat().st_size for name, path in found.items()})
    for name, want in manifest["files"].items():
        if sha256_file(found[name]) != want["sha256"]:
            raise CheckpointRefused(f"{name} does not match the SHA-256 in its {MARKER} (changed after it was written)")
    return manifest
