"""Stored state is data, not code: the SHA-256 of every checkpoint file in its marker, what counts
as latest, the random-generator state as safetensors + JSON, DeepSpeed read with weights_only,
and spec.storage.resume kept inside the job's own prefix. Local folders (the same Store code
path S3 takes; tests/integration/test_storage.py runs the S3 side)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune_trainer import rng
from finetune_trainer.spec import SpecError, parse_job
from finetune_trainer.storage import (
    MARKER,
    CheckpointRefused,
    LocalStore,
    latest_complete,
    list_complete_checkpoints,
    mark_complete,
    prune,
    read_complete,
    resume_point,
    verify_local,
    write_file_hashes,
)
from tests.tiny_models import minimal_manifest


class Planted:
    """What a hostile writer would put in a checkpoint: unpickling it creates `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.mknod, (str(self.path),))


def _checkpoint(store: LocalStore, key: str, step: int, **meta) -> None:
    store.write(f"{key}/trainer_state.json", json.dumps({"step": step}).encode())
    store.write(f"{key}/deepspeed/state/mp_rank_00_model_states.pt", bytes([step]) * 64)
    mark_complete(store, key, {"step": step, **meta})
    time.sleep(0.02)  # distinct modification times of the markers


def test_the_marker_records_a_sha256_per_file_and_same_size_corruption_is_not_complete(tmp_path):
    store = LocalStore(tmp_path)
    _checkpoint(store, "job/run-1/checkpoint_001", 4)
    _checkpoint(store, "job/run-1/checkpoint_002", 8)
    marker = json.loads(store.read(f"job/run-1/checkpoint_002/{MARKER}"))
    assert marker["version"] == 2
    model = (tmp_path / "job/run-1/checkpoint_002/deepspeed/state/mp_rank_00_model_states.pt")
    import hashlib

    assert marker["files"]["deepspeed/state/mp_rank_00_model_states.pt"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert latest_complete(store, "job").step == 8

    model.write_bytes(bytes([99]) * 64)  # same size, other bytes
    with pytest.raises(CheckpointRefused, match="does not match the SHA-256"):
        read_complete(store, "job/run-1/checkpoint_002")
    with pytest.raises(CheckpointRefused):
        verify_local(tmp_path / "job/run-1/checkpoint_002")
    # the previous complete checkpoint is used, not step 0 and not the corrupted one
    assert latest_complete(store, "job").step == 4
    assert resume_point(store, "latest", "job").step == 4


def test_when_every_checkpoint_is_refused_resume_fails_instead_of_starting_over(tmp_path, caplog):
    store = LocalStore(tmp_path)
    _checkpoint(store, "job/run-1/checkpoint_001", 4)
    (tmp_path / "job/run-1/checkpoint_001/trainer_state.json").write_text('{"step": 5}')  # same size
    with caplog.at_level(logging.WARNING):
        assert latest_complete(store, "job") is None
    assert "is not loaded" in caplog.text
    with pytest.raises(CheckpointRefused, match=r"none can be loaded.*resume: never"):
        resume_point(store, "latest", "job")
    assert resume_point(store, "latest", "elsewhere") is None  # nothing there at all: a first run starts fresh


def test_a_file_the_marker_does_not_list_makes_the_checkpoint_incomplete(tmp_path):
    store = LocalStore(tmp_path)
    _checkpoint(store, "job/run-1/checkpoint_001", 4)
    _checkpoint(store, "job/run-1/checkpoint_002", 8)
    # DeepSpeed globs zero_pp_rank_*_optim_states.pt: a planted one would be unpickled
    planted = tmp_path / "job/run-1/checkpoint_002/deepspeed/state/zero_pp_rank_9_mp_rank_00_optim_states.pt"
    planted.write_bytes(pickle.dumps(Planted(tmp_path / "sentinel")))
    assert [c.step for c in list_complete_checkpoints(store, "job")] == [4]
    assert latest_complete(store, "job").step == 4
    with pytest.raises(CheckpointRefused, match="does not list"):
        verify_local(tmp_path / "job/run-1/checkpoint_002")
    with pytest.raises(CheckpointRefused, match="zero_pp_rank_9"):
        read_complete(store, "job/run-1/checkpoint_002")
    assert not (tmp_path / "sentinel").exists()


def test_a_marker_without_hashes_is_refused_for_loading(tmp_path):
    store = LocalStore(tmp_path)
    store.write("job/run-1/checkpoint_001/trainer_state.json", b"{}")
    store.write(f"job/run-1/checkpoint_001/{MARKER}", json.dumps({"version": 1, "step": 3, "files": {"trainer_state.json": {"size": 2}}}).encode())
    assert list_complete_checkpoints(store, "job") == []
    with pytest.raises(CheckpointRefused, match="version 1"):
        read_complete(store, "job/run-1/checkpoint_001")
    with pytest.raises(CheckpointRefused, match="version 1"):
        resume_point(store, "latest", "job")


def test_latest_is_the_stores_order_not_a_time_the_marker_claims(tmp_path):
    store = LocalStore(tmp_path)
    # a marker that claims to be from far in the future, written first
    _checkpoint(store, "job/run-1/checkpoint_001", 4, completed_at=9e12, completed="9999-01-01T00:00:00+00:00")
    _checkpoint(store, "job/run-2/checkpoint_001", 2)  # a later run started over: a lower step, still the latest
    assert latest_complete(store, "job").key == "job/run-2/checkpoint_001"
    assert [c.step for c in list_complete_checkpoints(store, "job")] == [4, 2]
    # what orders them is the store's own time of the marker: touch the first marker later and it leads
    later = time.time() + 5
    os.utime(tmp_path / "job/run-1/checkpoint_001" / MARKER, (later, later))
    assert latest_complete(store, "job").key == "job/run-1/checkpoint_001"


def test_retention_orders_by_the_store_too(tmp_path):
    store = LocalStore(tmp_path)
    for i in (1, 2, 3):
        _checkpoint(store, f"job/run-1/checkpoint_00{i}", i, completed_at=1e13 - i)  # claimed times run backwards
    assert prune(store, "job/run-1", keep_latest=1) == ["job/run-1/checkpoint_001", "job/run-1/checkpoint_002"]


def test_the_workers_hashes_go_into_the_marker_and_readers_check_them(tmp_path):
    """The controller takes a file's hash from the worker's sidecar when the stored size matches
    (it never reads the file); a stored file that differs from what the worker wrote is caught
    when it is read back."""
    local = tmp_path / "worker"
    (local / "deepspeed").mkdir(parents=True)
    (local / "deepspeed" / "weights.pt").write_bytes(b"a" * 100)
    (local / "trainer_state.json").write_text("{}")
    sidecar = write_file_hashes(local, 0)
    assert set(json.loads(sidecar.read_text())["files"]) == {"deepspeed/weights.pt", "trainer_state.json"}
    store = LocalStore(tmp_path / "store")
    for path in local.rglob("*"):
        if path.is_file():
            store.put_file(f"ck/checkpoint_1/{path.relative_to(local).as_posix()}", path)
    (tmp_path / "store/ck/checkpoint_1/deepspeed/weights.pt").write_bytes(b"b" * 100)  # not what the worker wrote
    mark_complete(store, "ck/checkpoint_1", {"step": 1})
    assert [c.key for c in list_complete_checkpoints(store, "ck")] == ["ck/checkpoint_1"]  # sizes agree
    with pytest.raises(CheckpointRefused, match=r"weights\.pt does not match"):
        read_complete(store, "ck/checkpoint_1")


def test_verify_local_refuses_symlinks_and_passes_an_intact_copy(tmp_path):
    store = LocalStore(tmp_path)
    _checkpoint(store, "job/run-1/checkpoint_001", 4)
    folder = tmp_path / "job/run-1/checkpoint_001"
    assert verify_local(folder)["step"] == 4
    (folder / "extra.pt").symlink_to(folder / "trainer_state.json")
    with pytest.raises(CheckpointRefused, match="symbolic links"):
        verify_local(folder)


# --- random-generator state: data, never a pickle ------------------------------------------------


def test_rng_state_round_trips_exactly_and_is_no_pickle(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # python caches the second gaussian: state with gauss_next set
    np.random.randn()
    rng.save(tmp_path, 0)
    before = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(4))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert rng.load(tmp_path, 0) is True
    after = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(4))
    assert before[:4] == after[:4] and torch.equal(before[4], after[4])
    assert [p.name for p in tmp_path.iterdir()] == ["rng_state_0.safetensors"]
    assert rng.load(tmp_path, 1) is False  # no state for this rank: the generators go on as they are


def test_the_old_pickled_rng_file_is_never_unpickled(tmp_path, caplog):
    sentinel = tmp_path / "sentinel"
    torch.save({"python": Planted(sentinel)}, tmp_path / "rng_state_0.pth")
    random.seed(5)
    expected = random.Random(5).random()
    with caplog.at_level(logging.WARNING):
        assert rng.load(tmp_path, 0) is False
    assert not sentinel.exists()
    assert "old pickled format" in caplog.text
    assert random.random() == expected  # generators untouched


def test_a_malformed_rng_file_fails_with_its_name(tmp_path):
    from safetensors.torch import save_file

    save_file({"torch": torch.get_rng_state()}, str(tmp_path / "rng_state_0.safetensors"),
              metadata={"format": "1", "python": json.dumps({"version": 3, "state": [1, 2], "gauss": None}), "numpy": "{}"})
    with pytest.raises(ValueError, match=r"rng_state_0\.safetensors does not hold valid"):
        rng.load(tmp_path, 0)


# --- DeepSpeed's loader, restricted ----------------------------------------------------------------


def test_deepspeeds_checkpoint_engine_load_refuses_code_and_reads_tensors(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from finetune_trainer.deepspeed_load import weights_only_load

    sentinel = tmp_path / "sentinel"
    torch.save({"module": {"w": torch.ones(2)}, "x": Planted(sentinel)}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(pickle.UnpicklingError):
        weights_only_load(str(tmp_path / "mp_rank_00_model_states.pt"), map_location="cpu")
    assert not sentinel.exists()
    torch.save({"module": {"w": torch.ones(2)}, "zero_stage": ZeroStageEnum.gradients}, tmp_path / "ok.pt")
    loaded = weights_only_load(str(tmp_path / "ok.pt"), map_location="cpu")
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and torch.equal(loaded["module"]["w"], torch.ones(2))


# --- spec.storage.resume stays inside the job's own prefix --------------------------------------------


def _resume(resume: str, **storage) -> list[tuple[str, str]]:
    doc = minimal_manifest(storage={"uri": "s3://ckpts/team-a", "resume": resume, **storage})
    doc["metadata"]["namespace"] = "ml"
    try:
        parse_job(doc)
    except SpecError as err:
        return err.problems
    return []


@pytest.mark.parametrize("resume", [
    "s3://ckpts/team-a/ml/unit-2/run-1/checkpoint_001",  # a sibling job whose name starts with ours
    "s3://ckpts/team-a/ml/other/run-1/checkpoint_001",  # another job of the namespace
    "s3://ckpts/team-a/default/unit/run-1/checkpoint_001",  # the same name in another namespace
    "s3://ckpts/team-b/ml/unit/run-1/checkpoint_001",  # another prefix of the bucket
    "s3://other-bucket/team-a/ml/unit/run-1/checkpoint_001",  # another bucket
    "s3://ckpts/team-a/ml/unit",  # the job's folder itself is no checkpoint under it
])
def test_resume_outside_the_jobs_own_prefix_is_refused_naming_the_field_and_the_fix(resume):
    found = _resume(resume)
    assert [path for path, _ in found] == ["spec.storage.resume"]
    assert "s3://ckpts/team-a/ml/unit/" in found[0][1] and "allowResumeOutsideJob: true" in found[0][1]
    assert _resume(resume, allowResumeOutsideJob=True) == []  # said explicitly: you trust whoever writes there


def test_resume_inside_the_jobs_own_prefix_is_accepted():
    assert _resume("s3://ckpts/team-a/ml/unit/run-1/checkpoint_001") == []
    assert _resume("latest") == [] and _resume("none") == []


def _torch_checkpoint(store: LocalStore, key: str, step: int) -> None:
    Path(store.uri(key)).mkdir(parents=True)
    torch.save({"step": torch.tensor(step)}, store.uri(f"{key}/state.pt"))
    mark_complete(store, key, {"step": step})
    time.sleep(0.02)


def _garble(store: LocalStore, key: str) -> None:
    """Half of the file, and the marker rewritten to match: verification passes, torch.load does not."""
    path = Path(store.uri(f"{key}/state.pt"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    mark_complete(store, key, {"step": 0})
    time.sleep(0.02)


def test_resume_skips_an_unmarked_and_an_unloadable_checkpoint_names_them_and_never_starts_from_zero(tmp_path, caplog):
    """resume.py with one worker on a local folder: Ray's latest has no marker (its write failed), the
    newest complete one verifies but does not load; the one before them is used, and both are named."""
    from ray.train import Checkpoint

    from finetune_trainer.persist import Persistence
    from finetune_trainer.resume import resume

    store = LocalStore(tmp_path / "job")
    persistence = Persistence(store, "", str(store.root), None, tmp_path, remote=False)
    for step in (4, 8, 12):
        _torch_checkpoint(store, f"run-1/checkpoint_{step:03d}", step)
    _garble(store, "run-1/checkpoint_012")
    store.write("run-1/checkpoint_016/state.pt", b"uploaded, never marked")
    load = lambda folder: int(torch.load(Path(folder) / "state.pt", weights_only=True)["step"])  # noqa: E731

    def resumed(own: str | None, resume_from: str | None = None, scope: str | None = None):
        return resume(rank=0, world=1, own=Checkpoint(store.uri(own)) if own else None, persistence=persistence,
                      resume_from=Checkpoint(store.uri(resume_from)) if resume_from else None, resume_scope=scope, load=load)

    caplog.set_level(logging.WARNING, logger="finetune_trainer.resume")
    found = resumed("run-1/checkpoint_016")  # a worker-group restart: Ray's latest first
    assert found.state == 8 and found.path == store.uri("run-1/checkpoint_008")
    assert [(Path(p).name, why.split(":")[0]) for p, why in found.skipped] == [
        ("checkpoint_016", f"no {MARKER}"), ("checkpoint_012", "it does not load")]
    assert "UnpicklingError" in found.skipped[1][1] or "zip" in found.skipped[1][1].lower(), found.skipped
    assert sum("not resuming from" in r.getMessage() for r in caplog.records) == 2

    # the driver's choice that does not load: the ones before it in its folder, or in the scope it was chosen from
    _torch_checkpoint(store, "run-2/checkpoint_004", 4)
    _garble(store, "run-2/checkpoint_004")
    with pytest.raises(RuntimeError, match=r"does not start over from step 0.*checkpoint_004: it does not load"):
        resumed(None, "run-2/checkpoint_004")
    assert resumed(None, "run-2/checkpoint_004", scope="").state == 8  # the whole job: run-1's step 8
    assert resumed(None, None) is None  # nothing to resume from: a fresh start
