"""The hostile corpus (hostile_manifests.py) against `finetune validate` as a user runs it, and
against the rules the operator applies (parse_job with the cluster's rules, on the JSON a watch
delivers): refused within 2 s, exit 2, one message naming the field, no traceback.
The operator end to end: tests/e2e/test_operator_rejects.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from finetune_trainer.cli import EXIT_INVALID, main
from finetune_trainer.spec import SpecError, load_document, parse_job
from finetune_trainer.spec.search import SearchSpec, trial_spec
from tests.unit.hostile_manifests import CASES, QUICKSTART, Hostile

REPO = Path(__file__).resolve().parents[2]
LIMIT_S = 2.0


def _problem_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("  - ")]


def _write(case: Hostile, folder: Path) -> Path:
    path = folder / f"{case.name}.yaml"
    path.write_bytes(case.file_bytes())
    return path


def test_the_corpus_is_large_and_each_case_is_distinct():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.cluster for c in CASES} == {"operator", "api", "kubectl", None}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_validate_refuses_it_fast_with_one_message_naming_the_field(case: Hostile, tmp_path: Path, capsys) -> None:
    path = _write(case, tmp_path)
    start = time.monotonic()
    code = main(["validate", str(path), "--static"])
    elapsed = time.monotonic() - start
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == EXIT_INVALID, text
    assert elapsed < LIMIT_S, f"{case.name}: {elapsed:.2f}s"
    assert case.field in text, text
    lines = _problem_lines(text)
    # one problem, or one line about the file itself (a directory, binary, not UTF-8, too large)
    assert len(lines) == 1 or (not lines and len(out.err.strip().splitlines()) == 1), text
    assert all(len(line) < 400 for line in text.splitlines()), "a message quotes a value whole"


def test_a_directory_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    assert main(["validate", str(tmp_path), "--static"]) == EXIT_INVALID
    err = capsys.readouterr().err.strip()
    assert err == f"finetune: {tmp_path}: is a directory, not a manifest file"


def test_the_command_as_users_run_it_exits_2_without_a_traceback(tmp_path: Path) -> None:
    """`finetune validate FILE` in its own process, every case (four at a time: each is a Python start)."""
    paths = [_write(case, tmp_path) for case in CASES] + [tmp_path]  # the folder itself: a directory

    def run(path: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
        return path, subprocess.run([sys.executable, "-m", "finetune_operator.cli", "validate", str(path)],
                                    capture_output=True, text=True, cwd=REPO, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, paths))
    for (path, result), case in zip(results, [*CASES, None], strict=True):
        text = result.stdout + result.stderr
        assert result.returncode == EXIT_INVALID, f"{path.name}: {text}"
        assert "Traceback" not in text, text
        assert (case.field if case else "is a directory") in text, text
        assert result.stderr.startswith("finetune: "), text


@pytest.mark.parametrize("case", [c for c in CASES if c.cluster in ("api", "operator")], ids=lambda c: c.name)
def test_the_operators_rules_refuse_every_case_json_can_hold(case: Hostile) -> None:
    """What reconcile runs on a stored object: parse_job(for_cluster=True) on the JSON the watch
    delivers. SpecError (Stalled/InvalidSpec, kopf's PermanentError), never another exception; for
    what the CRD already refuses too (a CRD from an older chart may not)."""
    document = json.loads(json.dumps(case.document()))
    start = time.monotonic()
    with pytest.raises(SpecError) as err:
        parse_job(document, for_cluster=True)
    assert time.monotonic() - start < LIMIT_S
    assert len(err.value.problems) == 1, err.value.problems
    assert err.value.problems[0][0].startswith(case.operator_says or case.field), err.value.problems


# -- what strict parsing must still accept ---------------------------------------------------------

@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_the_examples_stay_valid(example: Path) -> None:
    parse_job(load_document(example), for_cluster=True)


def test_sampled_numpy_values_make_a_trial_spec():
    """Tune's randint and uniform hand out numpy scalars; the strict spec takes them as the numbers they are."""
    job = parse_job(load_document(REPO / "examples" / "search-freezing.yaml"))
    spec = trial_spec(job.spec, {"freezing.strategy": "freezeBottom", "freezing.layers": np.int64(3),
                                 "training.learningRate": np.float64(1e-4)})
    assert (spec.freezing.layers, type(spec.freezing.layers)) == (3, int)
    assert type(spec.training.learning_rate) is float


def test_dates_stay_strings_and_ints_are_floats_where_numbers_go(tmp_path: Path):
    text = QUICKSTART.read_text().replace("    learningRate: 1.0e-4", "    learningRate: 1\n    epochs: 2")
    text = text.replace("    task: sequence-classification", "    task: sequence-classification\n    revision: 2024-01-31")
    path = tmp_path / "ok.yaml"
    path.write_text(text.replace("    maxSteps: 240\n", ""))
    job = parse_job(load_document(path))
    assert job.spec.model.revision == "2024-01-31"  # kubectl keeps it a string too
    assert (job.spec.training.learning_rate, job.spec.training.epochs) == (1.0, 2.0)


def test_a_wide_space_is_checked_in_time_linear_in_its_values():
    """1000 values per dimension (the most a choice takes) and a randint over 1e9 values: the
    candidates are checked per section, the grid size counted, nothing listed."""
    doc = yaml.safe_load((REPO / "examples" / "search-freezing.yaml").read_text())
    doc["spec"]["search"]["space"] = {
        "training.learningRate": {"choice": [(i + 1) / 1e7 for i in range(1000)]},
        "training.weightDecay": {"choice": [i / 1000 for i in range(1000)]},
        "training.maxSteps": {"randint": [1000, 10**9]},
    }
    doc["spec"]["search"].pop("budget", None)
    start = time.monotonic()
    job = parse_job(doc, for_cluster=True)
    assert time.monotonic() - start < LIMIT_S
    search = job.spec.search
    assert isinstance(search, SearchSpec) and search.grid_size() == 1000 * 1000 * (10**9 - 999)
    assert math.prod(d.size() or 0 for d in search.space.values()) == search.grid_size()


def test_thousands_of_bad_values_are_a_bounded_report(tmp_path: Path, capsys) -> None:
    """5000 labels that are not strings: pydantic finds each; the report (and so the job's status
    message and Event, which the API server stores) shows 20 and counts the rest."""
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"]["data"]["labels"] = list(range(5000))
    with pytest.raises(SpecError) as err:
        parse_job(doc, for_cluster=True)
    assert len(err.value.problems) == 21 and err.value.problems[0][0] == "spec.data.labels[0]"
    assert err.value.problems[-1] == ("<manifest>", "and 4980 more problem(s), not shown")
    path = tmp_path / "labels.yaml"
    path.write_text(yaml.safe_dump(doc, default_flow_style=None))
    assert main(["validate", str(path), "--static"]) == EXIT_INVALID
    assert len(_problem_lines(capsys.readouterr().err)) == 21
