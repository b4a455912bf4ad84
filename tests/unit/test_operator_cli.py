"""`finetune crd` and `finetune render` as a user runs them, and the trainer's commands behind
the same `finetune` entry point."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from finetune_operator.cli import main
from finetune_operator.crd import build_crd
from finetune_operator.rayjob import render_rayjob
from finetune_operator.trainer_access import render_trainer_access
from finetune_trainer.cli import EXIT_INVALID
from finetune_trainer.spec import load_job

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def test_the_console_script_is_the_operator_cli():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["finetune"] == "finetune_operator.cli:main"


def test_crd_prints_the_generated_crd(capsys):
    assert main(["crd"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == build_crd()


def test_render_prints_the_rayjob(capsys):
    assert main(["render", str(QUICKSTART), "--owner-uid", "abc", "--set", "cluster.workers.memory=2Gi"]) == 0
    out = capsys.readouterr().out
    expected = render_rayjob(load_job(QUICKSTART, ["cluster.workers.memory=2Gi"]), owner_uid="abc")
    rayjob, policy, *access = yaml.safe_load_all(out)  # and the NetworkPolicy (tests/unit/test_networkpolicy.py)
    assert rayjob == expected and policy["kind"] == "NetworkPolicy"
    assert access == render_trainer_access(load_job(QUICKSTART), owner_uid="abc")  # tests/unit/test_trainer_access.py
    assert "runtimeEnvYAML: |" in out  # the driver's manifest reads as a block, not an escaped string
    assert "&id" not in out and "*id" not in out  # no YAML aliases for values used twice


def test_render_shows_a_queued_job_as_kueue_gets_it(tmp_path, capsys):
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a", "team": "a"}
    path = tmp_path / "queued.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["render", str(path)]) == 0
    rayjob = next(yaml.safe_load_all(capsys.readouterr().out))
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and "team" not in rayjob["metadata"]["labels"]
    assert rayjob["spec"]["suspend"] is True


def test_render_of_an_invalid_manifest_names_each_problem(tmp_path, capsys):
    assert main(["render", str(QUICKSTART), "--set", "training.foo=1", "--set", "cluster.head.memory=lots"]) == EXIT_INVALID
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"finetune: {QUICKSTART} is invalid\n2 problem(s) in the FineTuneJob:")
    assert "spec.training.foo: unknown field" in captured.err
    assert "spec.cluster.head.memory: not a Kubernetes memory quantity" in captured.err


def test_render_of_a_job_its_cluster_cannot_hold(capsys):
    assert main(["render", str(QUICKSTART), "--set", "cluster.workers.replicas=1"]) == EXIT_INVALID
    assert "spec.cluster.workers: 1 pod(s) of 1 CPU(s) hold 1 Ray Train worker(s)" in capsys.readouterr().err


def test_render_of_a_missing_file(tmp_path, capsys):
    assert main(["render", str(tmp_path / "nope.yaml")]) == EXIT_INVALID
    assert "nope.yaml" in capsys.readouterr().err


def test_other_commands_are_the_trainers(capsys):
    assert main(["validate", str(QUICKSTART), "--static"]) == 0
    assert capsys.readouterr().out.strip().endswith("quickstart: valid")


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("crd", "render", "validate", "run"):
        assert command in out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == EXIT_INVALID


def test_python_dash_m_style_entry_runs_in_a_fresh_process():
    done = subprocess.run([sys.executable, "-m", "finetune_operator.cli", "render", str(QUICKSTART)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert next(yaml.safe_load_all(done.stdout))["metadata"]["name"] == "quickstart-ray"
