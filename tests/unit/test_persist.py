"""The storage wiring of a run on a local folder (the same code path S3 takes, no server, no Ray
cluster): where things go, what `--resume` picks, and the CLI's one-line storage errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from finetune_trainer.cli import EXIT_INVALID, main
from finetune_trainer.embedded_s3 import free_ports
from finetune_trainer.job_status import STATUS_FILE
from finetune_trainer.persist import MAX_PREEMPTIONS, open_storage
from finetune_trainer.spec import parse_job
from finetune_trainer.storage import MARKER, StorageError, mark_complete

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart-s3.yaml"


def _job(tmp_path: Path, **spec):
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"].pop("storage")
    doc["spec"]["output"]["dir"] = str(tmp_path / "runs")
    doc["spec"].update(spec)
    return parse_job(doc)


def _checkpoint(store, key: str, step: int, *, complete: bool = True) -> None:
    store.write(f"{key}/trainer_state.json", json.dumps({"step": step}).encode())
    if complete:
        time.sleep(0.01)
        mark_complete(store, key, {"step": step})


def test_a_local_run_keeps_todays_layout(tmp_path):
    p = open_storage(_job(tmp_path))
    job_dir = tmp_path / "runs" / "quickstart-s3"
    assert (p.remote, p.filesystem, p.local_dir, Path(p.storage_path)) == (False, None, job_dir, job_dir)
    p.status_writer()({"state": "running"})
    assert json.loads((job_dir / STATUS_FILE).read_text()) == {"state": "running"}
    results = p.save_results("run-1", {"model": "x"}, None)
    assert results == {"model": "x"} and json.loads((job_dir / "run-1" / "results.json").read_text()) == results


def test_resume_latest_takes_the_newest_complete_checkpoint_of_any_run(tmp_path):
    p = open_storage(_job(tmp_path))
    assert p.resume_from("latest") == (None, None)  # nothing yet: a fresh start
    _checkpoint(p.store, "run-1/checkpoint_001", 4)
    _checkpoint(p.store, "run-2/checkpoint_001", 8)
    _checkpoint(p.store, "run-2/checkpoint_002", 12, complete=False)  # cut short
    checkpoint, step = p.resume_from("latest")
    assert step == 8 and checkpoint.path == str(p.local_dir / "run-2" / "checkpoint_001")
    assert (Path(checkpoint.path) / MARKER).exists()
    assert p.resume_from("none") == (None, None)


def test_a_local_run_resumes_from_a_checkpoint_path_inside_its_folder_and_refuses_one_outside(tmp_path):
    p = open_storage(_job(tmp_path))
    _checkpoint(p.store, "run-1/checkpoint_001", 4)
    checkpoint, step = p.resume_from(str(p.local_dir / "run-1" / "checkpoint_001"))
    assert step == 4 and checkpoint.path == str(p.local_dir / "run-1" / "checkpoint_001")
    outside = tmp_path / "elsewhere" / "checkpoint_001"
    outside.mkdir(parents=True)
    with pytest.raises(StorageError, match="outside this job's folder"):
        p.resume_from(str(outside))


def test_latest_search_is_the_newest_run_with_a_tune_experiment(tmp_path):
    p = open_storage(_job(tmp_path))
    assert p.latest_search() is None
    for run in ("run-20260101-000000", "run-20260102-000000"):
        p.store.write(f"{run}/experiment_state-2026.json", b"{}")
    p.store.write("run-20260103-000000/results.json", b"{}")  # a single run: not a search
    assert p.latest_search() == "run-20260102-000000"


def test_cli_names_an_unreachable_endpoint_in_one_line_before_anything_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"]["output"]["dir"] = str(tmp_path / "runs")
    doc["spec"]["storage"]["endpoint"] = f"http://127.0.0.1:{free_ports(1)[0]}"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["run", str(path), "--no-progress", "--resume"]) == EXIT_INVALID
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("finetune: storage: cannot reach the S3 endpoint http://127.0.0.1:")
    assert not (tmp_path / "runs").exists()


def test_every_trainer_restarts_its_workers_as_often_as_the_spec_says_and_keeps_every_checkpoint(tmp_path):
    p = open_storage(_job(tmp_path, runPolicy={"workerRestarts": 5}))
    args = p.run_config_args(_job(tmp_path, runPolicy={"workerRestarts": 5}), storage_path=p.path("run-1"))
    failure = args["failure_config"]
    assert (failure.max_failures, failure.controller_failure_limit) == (5, 5)
    assert failure.max_preemption_failures == MAX_PREEMPTIONS  # bounded: Ray's -1 retries preemptions forever
    assert args["checkpoint_config"].num_to_keep is None  # retention is ours: it knows the markers
    assert open_storage(_job(tmp_path)).run_config_args(_job(tmp_path), storage_path="x")["failure_config"].max_failures == 3


def test_the_s3_filesystem_handed_to_ray_and_tune_carries_no_keys(monkeypatch):
    """Tune pickles its RunConfig, filesystem included, into tuner.pkl in the bucket."""
    import pickle

    from finetune_trainer.spec.storage import StorageSpec
    from finetune_trainer.storage import Credentials, S3Store, pyarrow_filesystem

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-the-environment")
    spec = StorageSpec(uri="s3://bucket/prefix", endpoint="http://127.0.0.1:9")
    for obj in (pyarrow_filesystem(spec), S3Store(spec)):
        blob = pickle.dumps(obj)
        assert b"secret-from-the-environment" not in blob and b"AKIDFROMENV" not in blob
    # explicit credentials (a library caller's choice) are kept: the check above can fail
    assert b"explicit-secret" in pickle.dumps(pyarrow_filesystem(spec, Credentials("AKID", "explicit-secret")))
