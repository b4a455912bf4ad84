"""Every FineTuneJob under examples/ works as written: it loads and validates, and starts with
the command that runs it. New examples are picked up by the glob, with no list to keep."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer.spec import API_VERSION, KIND, load_job

REPO = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.rglob("*.yaml"))

# An empty parameter list would make pytest skip; a placeholder makes "no examples" a failure.
CASES = [pytest.param(p, id=str(p.relative_to(EXAMPLES_DIR))) for p in EXAMPLES] or [
    pytest.param(None, id="no-examples-found")
]


def _found(path: Path | None) -> Path:
    assert path is not None, f"no *.yaml FineTuneJob examples under {EXAMPLES_DIR}"
    return path


@pytest.mark.parametrize("path", CASES)
def test_example_loads_and_validates(path):
    job = load_job(_found(path))
    assert (job.api_version, job.kind) == (API_VERSION, KIND)


@pytest.mark.parametrize("path", CASES)
def test_example_starts_with_the_command_that_runs_it(path):
    path = _found(path)
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    command = f"finetune run {path.relative_to(REPO).as_posix()}"
    assert any(command in line for line in header), (
        f"the leading comment of {path.name} should show `{command}`"
    )


def test_no_example_hides_under_another_extension():
    strays = sorted(p.relative_to(EXAMPLES_DIR).as_posix() for p in EXAMPLES_DIR.rglob("*.yml"))
    assert strays == [], "rename to .yaml so the example tests cover them"
