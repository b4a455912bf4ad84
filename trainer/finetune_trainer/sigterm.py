"""SIGTERM on a local `finetune run`: save if you can, then exit (issue 16, item 2).

A local run's Ray lives under the driver, and a `kill <pid>` reaches only the driver, whose default
(ray.init's handler: sys.exit) takes Ray down with it at whatever step the workers were. Instead
the driver does what `ray start --block` does on a Kubernetes pod's SIGTERM (operator pods.py): it
marks its Ray node as draining for preemption, with a deadline `runPolicy.save_window()` seconds
away. Ray Train hands that deadline to every worker, and they save a checkpoint of the step they
are at if their last evaluation + checkpoint took less than the time left (guards.py); its
`_COMPLETE.json` is written by CheckpointCompletion once every worker has reported it, never
before. The driver waits for such a marker or the deadline, says which in one log line, and
exits 143 (128 + SIGTERM); `finetune run --resume` continues from the latest complete checkpoint.

Where nothing is installed: a joined cluster (RAY_ADDRESS set: the pods' SIGTERM is Ray's own,
as above), and a driver run outside the main thread (Python takes signals there only).
A second SIGTERM while waiting exits at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from .spec import FineTuneJob
from .storage import CompleteCheckpoint, Store, list_complete_checkpoints

log = logging.getLogger(__name__)
EXIT_CODE = 128 + signal.SIGTERM
NOTICE_FILE = "finetune_preemption.json"  # in the local Ray session's folder: {"deadline_ms"}


def notice_path() -> str | None:
    """Where a local driver leaves its SIGTERM notice for the workers of its own (one-node) Ray,
    beside Ray's drain: Ray Train 2.60's PreemptionWatcher did not hand a drain of a local head
    node to the workers here, so locally the workers also look for this file (guards.py)."""
    try:
        import ray

        node = ray._private.worker.global_worker.node
        return os.path.join(node.get_session_dir_path(), NOTICE_FILE) if node is not None else None
    except Exception:  # not connected to Ray
        return None


@contextlib.contextmanager
def save_on_sigterm(job: FineTuneJob, store: Store, prefix: str) -> Iterator[None]:
    """While inside: SIGTERM asks the workers for a checkpoint of their step (under `prefix` in
    `store`), waits for it or the save window, then raises SystemExit(143) in the main thread."""
    if os.environ.get("RAY_ADDRESS") or threading.current_thread() is not threading.main_thread():
        yield
        return
    state: dict[str, bool] = {"asked": False, "done": False, "active": True}
    waiting: list[threading.Thread] = []
    window = job.spec.run_policy.save_window()

    def wait_for_save() -> None:
        started = time.time()
        before = {c.key for c in _complete(store, prefix)}
        drained = _drain_local_nodes(started + window)
        path = notice_path()
        if path is not None:
            with open(path + ".tmp", "w") as out:
                out.write(json.dumps({"deadline_ms": int((started + window) * 1000)}))
            os.replace(path + ".tmp", path)
        saved: CompleteCheckpoint | None = None
        while drained and time.time() < started + window:
            new = [c for c in _complete(store, prefix) if c.key not in before]
            if new:
                saved = max(new, key=lambda c: (c.step or 0, c.completed_at))
                break
            time.sleep(0.5)
        if saved is not None:
            log.warning("SIGTERM: saved a complete checkpoint at step %s (%s) in %.0f s; exiting "
                        "(`finetune run --resume` continues from it)", saved.step, saved.uri, time.time() - started)
        else:
            log.warning("SIGTERM: no checkpoint completed within the %d s save window (runPolicy."
                        "terminationGracePeriodSeconds); exiting with none; the latest complete checkpoint stays "
                        "the resume point", window)
        state["done"] = True
        if state["active"]:
            os.kill(os.getpid(), signal.SIGTERM)  # back to the main thread, which exits

    def handler(signum: int, frame: FrameType | None) -> None:
        if state["done"]:
            raise SystemExit(EXIT_CODE)
        if state["asked"]:
            log.warning("SIGTERM again: exiting without waiting for the checkpoint")
            raise SystemExit(EXIT_CODE)
        state["asked"] = True
        if window <= 0:
            log.warning("SIGTERM: runPolicy.terminationGracePeriodSeconds leaves no time to save; exiting")
            raise SystemExit(EXIT_CODE)
        log.warning("SIGTERM: asking the workers for a checkpoint of their step, within %d s", window)
        waiting.append(threading.Thread(target=wait_for_save, name="sigterm-save", daemon=True))
        waiting[0].start()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        state["active"] = False
        signal.signal(signal.SIGTERM, previous)
        if waiting and not state["done"]:  # the run ended while the save was awaited: still say so, still exit
            waiting[0].join(timeout=window + 5)
        if waiting:  # also replaces the SystemExit(1) that ray.get makes of the handler's SystemExit(143)
            raise SystemExit(EXIT_CODE)


def _complete(store: Store, prefix: str) -> list[CompleteCheckpoint]:
    try:
        return list_complete_checkpoints(store, prefix)
    except Exception as err:  # a storage blip while shutting down: keep waiting until the deadline
        log.debug("listing checkpoints under %s: %s", prefix, err)
        return []


def _drain_local_nodes(deadline: float) -> bool:
    """Mark every node of the local Ray as draining for preemption, with `deadline` (unix time):
    the request `ray start --block` sends on SIGTERM and `ray drain-node` sends by hand (GCS's
    DrainNode; a preemption drain is never refused). False if Ray did not take it."""
    import ray
    from ray.core.generated import autoscaler_pb2

    try:
        # a Cython class and a protobuf enum: names mypy cannot see in Ray's modules
        gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)  # type: ignore[attr-defined]
        reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")  # type: ignore[attr-defined]
        accepted = True
        for node in ray.nodes():
            if node.get("Alive"):
                ok, why = gcs.drain_node(node["NodeID"], reason, "finetune run received SIGTERM", int(deadline * 1000))
                if not ok:
                    log.warning("SIGTERM: Ray refused to drain node %s: %s", node["NodeID"], why)
                accepted = accepted and ok
        return accepted
    except Exception as err:  # Ray already going down: nothing can be saved
        log.warning("SIGTERM: could not tell Ray to drain its node (%s); exiting without a checkpoint", err)
        return False
