"""Where a run's checkpoints, exported model, results.json and status.json live, for both drivers
(a single run and a search), on S3 (`spec.storage`) or in `output.dir` on this machine.

One code path for both: a `Store` (S3Store or LocalStore) rooted so that the job's folder is
`job_key`, the `storage_path` (+ pyarrow filesystem on S3) that Ray Train and Tune write through,
and the `CheckpointCompletion` callback on every TorchTrainer, so only checkpoints with a
`_COMPLETE.json` count: for export, for "latest"/"best", for resume, and for retention (our
`prune`; Ray's own `num_to_keep` is off, since it knows nothing of markers).

Layout under the job (`<prefix>/<namespace>/<job>/` on S3, `<output.dir>/<job>/` locally):

    status.json                              what the operator mirrors (job_status's shape)
    <run>/checkpoint_<ts>/...                a single run's checkpoints (Ray Train's names)
    <run>/trials/<trial>/<job>-<trial>-start-<time>/checkpoint_<ts>/...  a search trial's checkpoints, one folder per start
                                             (trial.run_name: also its Ray Train run's name in the dashboard)
    <run>/<trial>/, <run>/experiment_state*  Ray Tune's own experiment (what a restore reads)
    <run>/model/, <run>/results.json         the exported best model, then the results naming it

Why the exported model is also staged locally: the test split is scored from it (a Ray task on
this machine), and the CLI prints where it is. On S3 both copies exist; results.json names the
S3 one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .job_status import STATUS_FILE, store_writer
from .spec import FineTuneJob
from .storage import (
    Credentials,
    LocalStore,
    S3Store,
    StorageError,
    Store,
    classify,
    job_location,
    join_key,
    list_complete_checkpoints,
    preflight,
    ray_storage,
    read_json,
    resume_point,
    upload_dir,
    write_json,
)

RESULTS_FILE = "results.json"
MAX_PREEMPTIONS = 100  # node preemptions one run recovers from (Ray Train's max_preemption_failures)
ATTEMPTS_FILE = "attempts.json"  # each start of the run's driver (persist.record_attempt)
MODEL_DIR = "model"  # the exported model beside results.json, and inside each checkpoint (recipe)
TRAINER_STATE_FILE = "trainer_state.json"  # inside each checkpoint: rank 0's loop state (checkpoint_files)
ADAPTER_DIR = "adapter"  # inside MODEL_DIR: a LoRA-family adapter in PEFT's format (freezing.strategy: lora)
TRIALS_DIR = "trials"
TUNE_STATE_PREFIX = "experiment_state"  # Ray Tune's experiment checkpoint in a run's folder

log = logging.getLogger(__name__)


@dataclass
class Persistence:
    store: Store
    job_key: str  # the job's folder inside the store ("" when the store is rooted at it)
    storage_path: str  # RunConfig(storage_path=...) for the job's runs: "bucket/prefix/ns/job" or a folder
    filesystem: Any | None  # pyarrow.fs.S3FileSystem on S3; None for a local folder
    local_dir: Path  # <output.dir>/<job> on this machine: the local copy of the model and results
    remote: bool
    allow_resume_outside_job: bool = False  # spec.storage.allowResumeOutsideJob

    # ------------------------------------------------------------------ paths
    def key(self, *parts: str) -> str:
        return join_key(self.job_key, *parts)

    def path(self, *parts: str) -> str:
        """A storage_path under the job for Ray (no s3:// on S3: the filesystem is passed beside it)."""
        return "/".join([self.storage_path.rstrip("/"), *parts])

    def uri(self, fs_path: str) -> str:
        """Ray's path of a checkpoint -> what people and the operator read (s3://... or a folder)."""
        return self.store.uri(self.store.key_of(fs_path))

    # ------------------------------------------------------------------ Ray
    def run_config_args(self, job: FineTuneJob, *, storage_path: str, tracker: Any = None) -> dict[str, Any]:
        """RunConfig keyword arguments every TorchTrainer of the job gets (single run or trial).
        `tracker` (driver.ProgressTracker) hears of each checkpoint made complete: status.lastCheckpoint."""
        from ray.train import CheckpointConfig, FailureConfig

        from .storage.ray_callback import CheckpointCompletion

        ev = job.spec.evaluation
        restarts = job.spec.run_policy.worker_restarts  # each from the latest complete checkpoint
        completion = CheckpointCompletion(self.store, retention=True, keep_latest=1, keep_best=job.spec.output.keep_checkpoints,
                                          metric=f"eval_{ev.metric}", mode=ev.resolved_mode(), tracker=tracker)
        return {
            "storage_path": storage_path,
            "storage_filesystem": self.filesystem,
            # bounded both ways: a dead worker restarts the group, and so (at most as often) does a
            # failing controller; -1, Ray's controller default, could retry forever on dead storage
            # (a V2 field: a type checker reads ray.train's V1 class, hence the ignore; driver.make_trainer)
            # preemptions (a drained node: sigterm.py, pods.graceful_stop) count apart from restarts, and
            # each resumes from a checkpoint; bounded, since Ray's default (-1) would retry them forever
            "failure_config": FailureConfig(max_failures=restarts, controller_failure_limit=restarts,  # type: ignore[call-arg]
                                            max_preemption_failures=MAX_PREEMPTIONS),
            "checkpoint_config": CheckpointConfig(num_to_keep=None),  # retention is our prune, marker-aware
            "callbacks": [completion],
        }

    def checkpoint(self, key: str):
        """A Ray Checkpoint for a store key (what train_loop_config's resume_from carries)."""
        from ray.train import Checkpoint

        path = f"{self.store.bucket}/{key}" if self.remote else self.store.uri(key)  # type: ignore[attr-defined]
        return Checkpoint(path=path, filesystem=self.filesystem)

    def complete_only(self, checkpoints: list[tuple[str, dict[str, Any]]], run_key: str) -> list[tuple[str, dict[str, Any]]]:
        """Ray's (path, metrics) pairs that are complete and still kept (retention ran meanwhile)."""
        done = {c.key for c in list_complete_checkpoints(self.store, run_key)}
        return [(p, m) for p, m in checkpoints if self.store.key_of(p) in done]

    # ------------------------------------------------------------------ resume
    def resume_from(self, resume: str, *, runs_under: str = ""):
        """`never` | `latest` | a checkpoint URI -> (Ray Checkpoint, step) or (None, None); `latest`
        looks under `runs_under` (one run: `auto`'s new attempt), else under every run of the job.

        A URI outside the job's own folder is refused unless the spec allows it: the spec's
        validation says so first; this check holds for any caller (a library's `run(resume=...)`)."""
        if resume not in {"never", "none", "latest"} and not self.allow_resume_outside_job:
            try:
                key: str | None = self.store.key_of(resume)
            except (ValueError, StorageError):  # a local path outside the store's root, another bucket
                key = None
            inside = key is not None and not key.startswith("..") and (not self.key() or key.startswith(self.key() + "/"))
            if not inside:  # a local store is rooted at the job's folder: its job key is ""
                raise StorageError(f"spec.storage.resume: {resume} is outside this job's folder {self.store.uri(self.key())}/; "
                                   "set spec.storage.allowResumeOutsideJob: true only if you trust whoever can write there")
        found = resume_point(self.store, resume, self.key(runs_under))
        if found is None:
            if resume not in {"never", "none"}:
                log.info("resume: no complete checkpoint under %s; starting fresh", self.store.uri(self.key(runs_under)))
            return None, None
        log.info("resume: from %s (step %s)", found.uri, found.step)
        return self.checkpoint(found.key), found.step

    def history_until(self, checkpoint_path: str, step: int) -> list[dict[str, Any]]:
        """The evaluation rows up to `step` that a resumed run's checkpoint carries (its
        trainer_state.json): the rows of the attempts before it, the baseline's among them, without
        which a resumed run's results would have no baseline and no forgetting figure. Read as JSON
        data only; the workers verified the checkpoint's hashes when they loaded it."""
        raw = self.store.read(f"{self.store.key_of(checkpoint_path)}/{TRAINER_STATE_FILE}")
        history = json.loads(raw).get("history", []) if raw else []
        return [row for row in history if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step]

    def has_search(self, run_id: str) -> bool:
        """Whether the run's folder holds a Tune experiment (an earlier attempt of this search)."""
        return any(k.rpartition("/")[2].startswith(TUNE_STATE_PREFIX) for k in self.store.list(self.key(run_id)))

    def record_attempt(self, run_id: str) -> int:
        """This attempt's number in the run (1 for the first), recorded in `<run>/attempts.json`.

        One driver runs a run at a time (KubeRay starts a retry, or the operator a new RayJob, only
        once the last one is gone), so a read-then-write is enough. Unreadable or missing: 1."""
        key = self.key(run_id, ATTEMPTS_FILE)
        try:
            earlier = read_json(self.store, key) or {}
        except ValueError:  # not JSON: a torn write by hand; the count starts over rather than the run failing
            log.warning("%s is not JSON; counting attempts afresh", self.store.uri(key))
            earlier = {}
        attempts = [a for a in earlier.get("attempts", []) if isinstance(a, dict)] if isinstance(earlier, dict) else []
        number = len(attempts) + 1
        write_json(self.store, key, {"attempts": [*attempts, {"attempt": number, "started": datetime.now(UTC).isoformat()}]})
        return number

    def latest_search(self) -> str | None:
        """The newest run of the job with a Tune experiment in it (its storage path), for `--resume`."""
        runs = sorted({k[len(self.key()) :].strip("/").split("/")[0] for k in self.store.list(self.key())
                       if k.rpartition("/")[2].startswith(TUNE_STATE_PREFIX)
                       and k[len(self.key()) :].strip("/").count("/") == 1})
        return runs[-1] if runs else None

    # ------------------------------------------------------------------ results
    def status_writer(self) -> Callable[[dict[str, Any]], None]:
        return store_writer(self.store, self.key(STATUS_FILE))

    def save_results(self, run_id: str, results: dict[str, Any], model_dir: Path | None) -> dict[str, Any]:
        """Model first, then results.json naming it: a reader that finds results.json finds the model.
        On S3 the local copies stay too (the CLI's summary points at them). An adapter's run names
        the adapter too (`adapter`), and says whether `model` holds it merged into the base."""
        if model_dir is not None and (model_dir / ADAPTER_DIR).is_dir():
            results = {**results, "adapter": f"{self.model_uri(run_id, model_dir)}/{ADAPTER_DIR}",
                       "adapter_merged": (model_dir / "config.json").is_file()}
        if self.remote:
            if model_dir is not None:
                upload_dir(self.store, model_dir, self.key(run_id, MODEL_DIR))
                results = {**results, "model": self.store.uri(self.key(run_id, MODEL_DIR)), "local_model": str(model_dir)}
            write_json(self.store, self.key(run_id, RESULTS_FILE), results)
        write_json(LocalStore(self.local_dir), join_key(run_id, RESULTS_FILE), results)
        return results

    def storage_failure(self, err: BaseException) -> StorageError | None:
        """The StorageError behind a failed fit (Ray wraps pyarrow's OSError from an upload, a few
        levels deep), so the CLI can say "storage stopped answering" rather than a curl code."""
        if not self.remote:
            return None
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        spec = self.store.spec  # type: ignore[attr-defined]
        lines = [line.strip() for line in str(root).splitlines() if line.strip()]
        # Ray's wrapper text comes first; the S3 client's own line says what happened
        detail = next((line for line in lines if "AWS Error" in line or "curl" in line.lower()), None)
        cause = OSError(detail) if detail else root
        verdict = classify(cause, endpoint=spec.endpoint or "", bucket=spec.bucket, doing="training", reached_before=True)
        return verdict if type(verdict) is not StorageError else None

    def model_uri(self, run_id: str, model_dir: Path | None) -> str | None:
        if model_dir is None:
            return None
        return self.store.uri(self.key(run_id, MODEL_DIR)) if self.remote else str(model_dir)


def open_storage(job: FineTuneJob, credentials: Credentials | None = None) -> Persistence:
    """The job's Persistence; with spec.storage, the preflight runs first (a StorageError — endpoint
    unreachable, bucket missing, access denied — before any data is read or Ray starts)."""
    spec = job.spec
    local_dir = Path(spec.output.dir).resolve() / job.name
    if spec.storage is None:
        return Persistence(LocalStore(local_dir), "", str(local_dir), None, local_dir, remote=False)
    # credentials None (the CLI's case): the environment's, read by each process that needs them,
    # so nothing Ray or Tune pickles into the bucket carries a key
    namespace = job.metadata.namespace
    preflight(spec.storage, credentials, namespace=namespace, job=job.name)
    rs = ray_storage(spec.storage, namespace, job.name, credentials)
    return Persistence(S3Store(spec.storage, credentials), job_location(spec.storage, namespace, job.name).key,
                       rs.storage_path, rs.filesystem, local_dir, remote=True,
                       allow_resume_outside_job=spec.storage.allow_resume_outside_job)
