"""Faults against real processes and a real S3 server (SeaweedFS on loopback): a Ray Train worker
SIGKILLed mid-run, the same with a latest checkpoint that verifies but does not load, the driver
SIGKILLed and `--resume`d, checkpoints cut short, a search's driver killed, a planted pickle. Tiny
models, few steps; every wait polls with a deadline. The storage
faults (a wrong secret key, the server stopped mid-run) are in test_storage_faults.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune_trainer.spec import parse_job
from finetune_trainer.storage import (
    MARKER,
    S3Store,
    job_location,
    latest_complete,
    list_complete_checkpoints,
)

from . import tiny
from .fault_kit import ROOT, FaultProxy, assert_same_model, in_thread, job_doc, storage_of, wait_for

# deadlines are generous: on a shared 2-core machine under load a run can take 5x its quiet time
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _driver(manifest: Path, log: Path, env: dict) -> subprocess.Popen:
    """`finetune run MANIFEST` in its own session (so _kill_session takes it and its local Ray), output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "finetune_trainer", "run", str(manifest), "--no-progress"],
                                env={**env, "RAY_ADDRESS": ""}, cwd=ROOT, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)


def _session(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # session id; zombies are already dead
            pids.append(int(stat.parent.name))
    return pids


def _kill_session(driver: subprocess.Popen) -> None:
    """SIGKILL the driver and every process of its session (Ray's GCS, raylet, workers and the
    Train controller, some in process groups of their own), and wait until none is left: a
    process still running could complete one more checkpoint after the test has looked."""
    deadline = time.monotonic() + 30
    while True:
        for pid in _session(driver.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not _session(driver.pid):  # zombies are not counted: the driver may be one, not yet reaped
            # reaped here: an unreaped Popen is a ResourceWarning at its collection, an error in the tests
            driver.wait(timeout=max(1.0, deadline - time.monotonic()))
            return
        assert time.monotonic() < deadline, f"processes of the killed driver's session survive: {_session(driver.pid)}"
        time.sleep(0.1)


def _while_running(driver: subprocess.Popen, log: Path, check):
    """`check`, but fail at once (with the driver's last output) if the driver exited."""

    def checked():
        found = check()
        if not found and driver.poll() is not None:
            raise AssertionError(f"the driver exited ({driver.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        return found

    return checked


# --- (a) a Ray Train worker SIGKILLed mid-run ------------------------------------------------------


def _train_workers() -> list[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,  # this session's Ray, not another on the host
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], timeout=10)
    return sorted(a.pid for a in actors if a.pid)


def test_worker_killed_mid_run_continues_from_its_checkpoint_to_the_same_model(local_ray, s3_spec, assets, reference, tmp_path,
                                                                               monkeypatch):
    from finetune_trainer.run import run

    storage, store, spec = storage_of(s3_spec, monkeypatch)
    job = parse_job(job_doc(tmp_path, assets, storage))
    prefix = job_location(job.spec.storage, "default", "t").key
    thread, box = in_thread(lambda: run(job))
    first = wait_for("a complete checkpoint in S3", lambda: latest_complete(store, prefix), 300, box=box)
    pids = wait_for("the Ray Train workers", _train_workers, 30)
    assert thread.is_alive() and first.step < 24, "the run ended before the kill"
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(400)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    r = box["result"].results

    rows = [row for row in r["history"] if not row.get("baseline")]
    steps = [row["step"] for row in rows]
    resumed = sorted({row["resumed_from_step"] for row in rows if "resumed_from_step" in row})
    assert len(resumed) == 1 and resumed[0] >= first.step > 0, (steps, resumed)  # from a checkpoint, not from 0
    after = [row["step"] for row in rows if "resumed_from_step" in row]
    assert after[0] == resumed[0] + 4 and after[-1] == 24  # the next evaluation after the checkpoint, then on to the end
    assert [row["step"] for row in r["history"] if row.get("baseline")] == [0]  # no second baseline: not restarted from 0
    print(f"killed worker {pids[-1]} after checkpoint step {first.step}; resumed from {resumed[0]}; steps {steps}")

    # the same weights as the uninterrupted run: optimizer state, LR schedule, data order all continued
    assert_same_model(r, reference)
    # and everything reached S3: the model, results.json naming it, status.json for the operator
    assert r["model"] == f"{spec.uri}/default/t/{r['run']}/model"
    keys = store.list(prefix)
    assert f"{prefix}/{r['run']}/model/model.safetensors" in keys and f"{prefix}/{r['run']}/results.json" in keys
    status = json.loads(store.read(f"{prefix}/status.json"))
    assert (status["state"], status["step"], status["model"]) == ("finished", 24, r["model"])
    assert status["bestCheckpoint"].startswith(f"{spec.uri}/default/t/{r['run']}/checkpoint_")


# --- a latest checkpoint that verifies but does not load: the one before it is used, never step 0 --------


def test_a_latest_checkpoint_that_does_not_load_falls_back_to_the_one_before_it(local_ray, s3_spec, assets, reference,
                                                                              tmp_path, capsys, monkeypatch):
    """When the step-8 checkpoint's marker is stored, its DeepSpeed model states are cut in half and
    the marker rewritten to match (hashes pass, torch.load fails), and a worker is killed: Ray's
    latest is step 8. The restarted workers skip it and resume from step 4, the log line names both,
    status.json's resume lists the skipped one, and the model equals the uninterrupted run's.
    Before: every restart failed to load step 8 again until the restarts were spent."""
    import hashlib

    from finetune_trainer.run import run

    storage, store, spec = storage_of(s3_spec, monkeypatch)
    states = "deepspeed/state/mp_rank_00_model_states.pt"
    broken: list[str] = []

    pids: list[int] = []

    def garble_and_kill(number: int, key: str) -> None:
        if number == 1:  # looked up now, so the kill below is instant: the workers train on meanwhile
            pids.extend(_train_workers())
        if number != 2:
            return
        os.kill(pids[-1], signal.SIGKILL)  # first: Ray's controller waits on this marker's answer; step 12 must not report
        data = store.read(f"{key}/{states}")
        half = data[: len(data) // 2]
        store.write(f"{key}/{states}", half)
        marker = json.loads(store.read(f"{key}/{MARKER}"))
        marker["files"][states] = {"size": len(half), "sha256": hashlib.sha256(half).hexdigest(),
                                   "etag": store.list(key)[f"{key}/{states}"].etag}
        store.write(f"{key}/{MARKER}", json.dumps(marker).encode())
        broken.append(key)

    with FaultProxy(spec.endpoint) as proxy:
        proxy.on_marker = garble_and_kill
        doc = job_doc(tmp_path, assets, {**storage, "endpoint": proxy.endpoint}, name="garbled")
        doc["spec"]["output"]["keepCheckpoints"] = 3  # the checkpoints before step 8 stay
        doc["spec"]["runPolicy"] = {"workerRestarts": 1}
        result = run(parse_job(doc)).results
    out = "".join(capsys.readouterr())
    assert broken, "the step-8 marker was never written"
    rows = [row for row in result["history"] if not row.get("baseline")]
    assert [row["step"] for row in rows if "resumed_from_step" in row] == [8, 12, 16, 20, 24]
    assert {row["resumed_from_step"] for row in rows if "resumed_from_step" in row} == {4}  # not 8, not 0
    assert [row["step"] for row in result["history"] if row.get("baseline")] == [0]
    line = re.search(r"resumed from (\S+) \(step 4\) instead of (\S+) \(it does not load: ([^)]*)", out)
    assert line, out[-3000:]
    assert line.group(2).endswith(broken[0]) and line.group(1) != line.group(2)
    print(line.group(0))
    prefix = job_location(parse_job(doc).spec.storage, "default", "garbled").key
    resumes = json.loads(store.read(f"{prefix}/status.json")).get("resumes", [])
    assert any(s["checkpoint"] == store.uri(broken[0]) and "does not load" in s["reason"]
               for r in resumes for s in r.get("skipped", [])), resumes
    assert_same_model(result, reference)


# --- (b) the driver SIGKILLed, then `--resume`; (c) checkpoints cut short are never used ----------------


def test_driver_killed_then_resume_continues_from_the_latest_complete_checkpoint(local_ray, s3_spec, assets, tmp_path, capsys,
                                                                               monkeypatch):
    from finetune_trainer.cli import main

    storage, store, _ = storage_of(s3_spec, monkeypatch)
    manifest = tiny.save_manifest(tmp_path / "job.yaml", job_doc(tmp_path, assets, storage, steps=40))
    prefix = job_location(parse_job(job_doc(tmp_path, assets, storage)).spec.storage, "default", "t").key
    log = tmp_path / "driver.log"
    driver = _driver(manifest, log, dict(os.environ))
    try:
        first = wait_for("the first complete checkpoint", _while_running(driver, log, lambda: latest_complete(store, prefix)), 400)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{log.read_text(errors='replace')[-3000:]}") from None
    finally:
        _kill_session(driver)  # the driver and everything in its session: its Ray too
    killed_at = latest_complete(store, prefix)
    assert killed_at.step < 40, "the run ended before the kill"
    run_key = killed_at.parent

    # (c) newer checkpoint folders that never completed: no marker (an upload cut short), a marker
    # whose listed file is now shorter (a truncated object), a marker that is not JSON
    for name, marker in [("checkpoint_9999-01-01_00-00-01.000000", None),
                         ("checkpoint_9999-01-01_00-00-02.000000", "truncate"),
                         ("checkpoint_9999-01-01_00-00-03.000000", b"{cut")]:
        key = f"{run_key}/{name}"
        store.write(f"{key}/trainer_state.json", json.dumps({"step": 999}).encode())
        store.write(f"{key}/deepspeed/state/mp_rank_00_model_states.pt", bytes(64))
        if marker == "truncate":
            from finetune_trainer.storage import mark_complete

            mark_complete(store, key, {"step": 999})
            store.write(f"{key}/deepspeed/state/mp_rank_00_model_states.pt", bytes(10))
        elif marker:
            store.write(f"{key}/{MARKER}", marker)
    assert latest_complete(store, prefix) == killed_at

    assert main(["run", str(manifest), "--no-progress", "--resume"]) == 0
    out = "".join(capsys.readouterr())  # the evaluation rows on stdout, the logs (the driver's, the workers') on stderr
    assert f"resume: from {killed_at.uri} (step {killed_at.step})" in out
    results = json.loads(store.read(f"{prefix}/{_newest_run(store, prefix)}/results.json"))
    steps = [row["step"] for row in results["history"]]
    resumed = [row for row in results["history"] if row["step"] > killed_at.step]
    assert results["resumed_from"]["step"] == killed_at.step and resumed[0]["step"] == killed_at.step + 4 and steps[-1] == 40, (steps, [x for x in out.splitlines() if "[finetune]" in x])
    assert all(row["resumed_from_step"] == killed_at.step for row in resumed)
    # the curve before the resume point, baseline included, comes from the checkpoint: the whole curve, each step once
    assert steps == list(range(0, 41, 4)) and results["history"][0]["baseline"], steps
    assert results["metrics"]["validation"]["baseline"], "a resumed run's results lost the baseline"
    assert results["resumed_from"]["checkpoint"] == killed_at.uri
    print(f"driver killed after checkpoint step {first.step} (latest complete {killed_at.step}); resumed run's steps {steps}")
    # the new run's checkpoints are complete; the broken ones were never read as checkpoints
    assert latest_complete(store, prefix).step == 40


def _newest_run(store: S3Store, prefix: str) -> str:
    runs = {k[len(prefix) + 1 :].split("/")[0] for k in store.list(prefix) if k.endswith("/results.json")}
    return max(runs)


# --- a search's driver SIGKILLed, then `--resume`: Tune restores it; finished trials are not rerun ----


def test_killed_search_resumes_without_rerunning_finished_trials(local_ray, s3_spec, assets, tmp_path, capsys, monkeypatch):
    from finetune_trainer.cli import main

    storage, store, _ = storage_of(s3_spec, monkeypatch)
    doc = job_doc(tmp_path, assets, storage, steps=16, name="s")
    doc["spec"]["resources"] = {"workers": 1, "cpusPerWorker": 1}
    doc["spec"]["search"] = {"algorithm": "grid", "maxConcurrentTrials": 1, "scheduler": {"type": "none"},
                             "space": {"training.learningRate": {"choice": [5e-3, 1e-3]}}}
    manifest = tiny.save_manifest(tmp_path / "search.yaml", doc)
    prefix = job_location(parse_job(doc).spec.storage, "default", "s").key
    log = tmp_path / "driver.log"
    driver = _driver(manifest, log, dict(os.environ))

    def second_trial_started():
        return [c for c in list_complete_checkpoints(store, prefix) if "/trials/trial_01/" in c.key]

    try:
        wait_for("the second trial's first checkpoint", _while_running(driver, log, second_trial_started), 500, every=0.5)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{log.read_text(errors='replace')[-3000:]}") from None
    finally:
        _kill_session(driver)
    before = {c.key: c for c in list_complete_checkpoints(store, prefix)}
    first_trial = sorted(k for k in before if "/trials/trial_00/" in k)
    assert before[first_trial[-1]].step == 16, "the first trial had not finished"
    second = max(c.step for c in before.values() if "/trials/trial_01/" in c.key)
    assert second < 16, "the second trial had finished before the kill"

    from finetune_trainer import job_status
    from finetune_trainer.spec.progress import ProgressDocument

    published: list[ProgressDocument] = []  # every status.json the restored driver writes, as it writes it
    write = job_status.StatusPublisher.publish
    monkeypatch.setattr(job_status.StatusPublisher, "publish",
                        lambda self, status, **kw: (published.append(status), write(self, status, **kw))[1])
    code = main(["run", str(manifest), "--no-progress", "--resume"])
    out, err = capsys.readouterr()
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    # while it ran, the counts were the whole search's: trial_00, ended before the kill, counted too
    counts = [s.trials for s in published if s.kind == "search" and s.state == "running" and s.trials and s.trials.running]
    assert counts and all(c.completed == 1 and c.total == 2 for c in counts), counts
    after = list_complete_checkpoints(store, prefix)
    # trial_00 trained nothing more (no new checkpoint); trial_01 went on to the end, from its checkpoint
    assert sorted(c.key for c in after if "/trials/trial_00/" in c.key) == first_trial
    assert max(c.step for c in after if "/trials/trial_01/" in c.key) == 16
    run = before[first_trial[-1]].key.split("/trials/")[0].rpartition("/")[2]
    results = json.loads(store.read(f"{prefix}/{run}/results.json"))
    assert results["restored"] is True and {t["trial"]: t["steps"] for t in results["trials"]} == {"trial_00": 16, "trial_01": 16}
    resumed = {int(m) for m in re.findall(r"resumed from step (\d+) \([^)]*/trials/trial_01/", out + err)}  # a worker's log line
    print(f"search killed with trial_00 done and trial_01 at step {second}; restored run {run}; trial_01 resumed from {resumed}")
    assert resumed == {second}, out[-3000:]
    assert results["model"].startswith("s3://") and json.loads(store.read(f"{prefix}/status.json"))["state"] == "finished"
    # Tune pickled its RunConfig (storage filesystem, callbacks) and trials into the bucket: no key went with them
    secret = s3_spec[1].secret_key.encode()
    pickles = [k for k in store.list(prefix) if k.endswith(".pkl")]
    assert pickles, "expected Tune's tuner.pkl in the bucket"
    assert [k for k in store.list(prefix) if secret in (store.read(k) or b"")] == []


# --- a planted pickle in the latest checkpoint: resuming never runs it ----------------------------------


class _Planted:
    """Unpickling it creates `path` (os.mknod): what someone who can write to the bucket or the
    folder would hide in a checkpoint file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.mknod, (str(self.path),))


def test_a_planted_pickle_in_the_latest_checkpoint_is_never_unpickled(local_ray, assets, tmp_path, capsys):
    """The real trainer on a local folder: a planted DeepSpeed model-states file, then a planted RNG
    file, in the newest checkpoint: refused by hash, the previous verified checkpoint is used. Then
    a planted file whose marker was rewritten to match (someone who can also write the marker): the
    hashes pass, DeepSpeed's loader (weights_only) refuses it, and its run's folder holds no checkpoint before it
    (where resume.py falls back to), so the run fails clearly. No sentinel."""
    from finetune_trainer.cli import main
    from finetune_trainer.storage import LocalStore, mark_complete

    sentinel = tmp_path / "planted-pickle-ran"
    doc = job_doc(tmp_path, assets, steps=12, every=4)
    doc["spec"]["output"]["keepCheckpoints"] = 3  # the latest plus 3 best: every checkpoint stays
    doc["spec"]["runPolicy"] = {"workerRestarts": 0}  # the last case fails at once, not after retries
    manifest = tiny.save_manifest(tmp_path / "job.yaml", doc)
    store = LocalStore(tmp_path / "runs" / "t")
    assert main(["run", str(manifest), "--no-progress"]) == 0
    capsys.readouterr()

    def plant(checkpoint, name: str) -> None:
        torch.save({"module": _Planted(sentinel)}, Path(store.uri(f"{checkpoint.key}/{name}")))

    def resumed_step() -> int:
        assert main(["run", str(manifest), "--no-progress", "--resume"]) == 0
        newest_run = max(k.split("/")[0] for k in store.list("") if k.endswith("/results.json") and k.count("/") == 1)
        results = json.loads(store.read(f"{newest_run}/results.json"))
        return results["resumed_from"]["step"]

    # 1. DeepSpeed's model states in the newest checkpoint (step 12): refused, step 8 is used
    done = list_complete_checkpoints(store, "")
    assert [c.step for c in done] == [4, 8, 12]
    plant(done[-1], "deepspeed/state/mp_rank_00_model_states.pt")
    assert resumed_step() == 8
    assert not sentinel.exists()

    # 2. the RNG file of the new newest checkpoint (the resumed run's step 12): both step-12s are refused
    time.sleep(1)  # a new run id (run-<seconds>)
    newest = list_complete_checkpoints(store, "")[-1]
    assert newest.step == 12 and newest.key != done[-1].key
    plant(newest, "rng_state_0.safetensors")
    assert resumed_step() == 8
    assert not sentinel.exists()

    # 3. planted and the marker rewritten to match: verification passes, torch.load(weights_only) refuses
    time.sleep(1)
    newest = list_complete_checkpoints(store, "")[-1]
    plant(newest, "deepspeed/state/mp_rank_00_model_states.pt")
    for sidecar in Path(store.uri(newest.key)).glob("_sha256_rank_*.json"):
        sidecar.unlink()  # so every hash is taken from the files as they are now
    mark_complete(store, newest.key, {"step": newest.step})
    assert main(["run", str(manifest), "--no-progress", "--resume"]) != 0
    out, err = capsys.readouterr()
    assert "Weights only load failed" in out + err, (out + err)[-3000:]
    assert not sentinel.exists()
