"""docs/: the field reference is the generated one, every FineTuneJob shown validates, and the
pages that explain the status and the search name everything the code has."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.docs_gen import COMMAND, reference
from finetune_operator.status_model import ConditionType, Reason
from finetune_trainer.spec import KIND, FineTuneJobSpec, parse_job

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def yaml_blocks(page: Path) -> list[tuple[int, str]]:
    text = page.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) in ("yaml", "yml")]


def documents() -> list[Any]:
    found = []
    for page in PAGES:
        for line, block in yaml_blocks(page):
            for i, doc in enumerate(yaml.safe_load_all(block)):
                if isinstance(doc, dict) and doc.get("kind") == KIND:
                    found.append(pytest.param(doc, id=f"{page.name}:{line}:{i}"))
    return found


def test_reference_is_current():
    committed = (DOCS / "reference.md").read_text() if (DOCS / "reference.md").exists() else ""
    assert committed == reference(), f"docs/reference.md is stale; regenerate it: {COMMAND}"


def test_reference_lists_every_spec_field():
    text = (DOCS / "reference.md").read_text()
    for section, field in FineTuneJobSpec.model_fields.items():
        assert f"### spec.{field.alias or section}" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_yaml_blocks_parse(page):
    for line, block in yaml_blocks(page):
        try:
            list(yaml.safe_load_all(block))
        except yaml.YAMLError as err:
            pytest.fail(f"{page.name}:{line}: not valid YAML: {err}")


@pytest.mark.parametrize("document", documents() or [pytest.param(None, id="none-found")])
def test_finetunejob_examples_validate(document):
    assert document is not None, "docs/ shows no FineTuneJob: the install and search pages should"
    parse_job(document)


def test_troubleshooting_covers_every_reason_and_condition():
    text = (DOCS / "troubleshooting.md").read_text()
    missing = [r.value for r in Reason if f"| `{r.value}` |" not in text]
    assert not missing, f"docs/troubleshooting.md has no row for reason(s) {missing}"
    assert all(f"| `{c.value}` |" in text for c in ConditionType)


def test_pages_link_to_pages_that_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([\w-]+\.md)(?:#[\w-]+)?\)", page.read_text()):
            assert (DOCS / target).exists(), f"{page.name} links to missing {target}"
