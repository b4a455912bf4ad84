"""A lost node on a real multi-node Ray: a head and three worker nodes, each a `ray start` in its
own network namespace with its own address (netns_cluster.py), the driver (`finetune run`) on the
head as KubeRay runs it. Two training workers of one CPU each land on two different one-CPU nodes,
so torch.distributed (gloo) talks across node addresses. One of those nodes' raylet is SIGKILLed
after a complete checkpoint: Ray Train restarts the worker group on the two nodes left, from the
latest complete checkpoint, and the model ends as the uninterrupted run of the same job did (the
session's `reference`, conftest.py; test_faults' worker kill checks the same on one node). What
this does and does not show: docs/storage.md, "What a lost node test shows"."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_trainer.storage import LocalStore, list_complete_checkpoints

from . import netns_cluster, tiny
from .fault_kit import ROOT, job_doc, wait_for
from .netns_cluster import NetnsCluster, Node

# deadlines are generous: on a shared 2-core machine under load a run can take 5x its quiet time
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


STEPS, EVERY = 24, 4
TRAIN_WORKER = "RayTrainWorker"  # in the process title of a Ray Train worker (`ray::RayTrainWorker...`)
TRACKER = "ray::ProgressTracker"  # the driver's progress tracker actor (driver.ProgressTracker)
# a lost node is noticed in ~3 s, not Ray's default ~15 s (3 s x 5 missed health checks): the
# GCS's checks of every raylet, set on the head, where the GCS runs
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = netns_cluster.unavailable()
    if why:
        pytest.skip(f"a multi-node Ray on one machine needs network namespaces and veth pairs: {why}")
    with NetnsCluster(tmp_path_factory.mktemp("cluster"), workers_count=3, cpus=1, head_env=FAST_NODE_DEATH) as running:
        yield running


def _doc(tmp: Path, assets, name: str) -> dict:
    """The fault tests' job, two workers of one CPU each: on one-CPU nodes, one worker per node."""
    doc = job_doc(tmp, assets, steps=STEPS, every=EVERY, name=name)
    doc["spec"]["resources"] = {"workers": 2, "cpusPerWorker": 1}
    return doc


def _finish(driver: subprocess.Popen, log: Path, timeout: float, context: str = "") -> str:
    try:
        driver.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.wait(timeout=30)
        raise AssertionError(f"the driver did not finish in {timeout:.0f} s:\n{log.read_text(errors='replace')[-4000:]}") from None
    out = log.read_text(errors="replace")
    assert driver.returncode == 0, f"{context}\n{out[-4000:]}"
    return out


def _results(tmp: Path, name: str) -> dict:
    (found,) = (tmp / "runs" / name).glob("run-*/results.json")
    return json.loads(found.read_text())


def _weights(results: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(results["model"]) / "model.safetensors"))


def _rendezvous(log: Path) -> list[str]:
    """MASTER_ADDR of every start of the worker group, as its rank 0 logged it (recipe.setup)."""
    return re.findall(r"MASTER_ADDR=(\S+)", log.read_text(errors="replace"))


def _hosts(cluster: NetnsCluster) -> dict[str, list[int]]:
    """Worker node name -> the pids of the Ray Train workers living on it."""
    return {node.name: pids for node in cluster.workers if (pids := node.processes(TRAIN_WORKER))}


def _peer_connections(hosts: dict[str, list[int]]) -> list[tuple[str, str]]:
    """TCP connections established between two Ray Train worker processes on different nodes, as
    (local, remote) "ip:port": torch.distributed's store and gloo pairs. Each end is matched to the
    socket a worker process holds (its fds), so Ray's own raylet-to-raylet traffic does not count."""
    ends: dict[str, int] = {}  # "ip:port" of a socket a train worker holds -> its pid
    conns: list[tuple[str, str, int]] = []
    for pids in hosts.values():
        for pid in pids:
            for local, remote in _established(pid):
                ends[local] = pid
                conns.append((local, remote, pid))
    return sorted({(local, remote) for local, remote, pid in conns
                   if remote in ends and ends[remote] != pid and local.split(":")[0] != remote.split(":")[0]})


def _established(pid: int) -> list[tuple[str, str]]:
    """The process's established IPv4 TCP connections, (local, remote) "ip:port" (its namespace's /proc/PID/net/tcp,
    filtered to the socket inodes among its fds)."""
    try:
        inodes = {m.group(1) for fd in Path(f"/proc/{pid}/fd").iterdir()
                  if (m := re.fullmatch(r"socket:\[(\d+)\]", _readlink(fd)))}
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:  # the process is gone
        return []

    def addr(hexed: str) -> str:
        ip, port = hexed.split(":")
        return f"{'.'.join(str(b) for b in reversed(bytes.fromhex(ip)))}:{int(port, 16)}"

    found = []
    for line in lines:
        fields = line.split()
        if fields[3] == "01" and fields[9] in inodes:  # ESTABLISHED
            found.append((addr(fields[1]), addr(fields[2])))
    return found


def _readlink(path: Path) -> str:
    try:
        return str(path.readlink())
    except OSError:
        return ""


@dataclass
class Loss:
    """A run whose rank 0's node was lost: its driver, log and checkpoint folder, what ran where."""

    driver: subprocess.Popen
    log: Path
    store: LocalStore
    hosts: dict[str, list[int]]  # before the loss: worker node name -> Ray Train worker pids
    lost: Node
    complete_at_kill: int  # the newest complete checkpoint's step when the raylet was killed
    killed_at: float


def _lose_rank_zero_node(cluster: NetnsCluster, tmp: Path, assets, *, env: dict[str, str] | None = None) -> Loss:
    """Start the job and, after its first complete checkpoint, SIGKILL the raylet of the node of its
    rank 0 (torch.distributed's rendezvous host, the harder case), checking first that the workers
    run on two nodes, talk across their addresses, and that the progress tracker is on the head."""
    manifest = tiny.save_manifest(tmp / "job.yaml", _doc(tmp, assets, "t"))
    log = tmp / "driver.log"
    driver = cluster.spawn([sys.executable, "-m", "finetune_trainer", "run", str(manifest), "--no-progress"], log=log, cwd=ROOT,
                           env=cluster.env(**(env or {})))
    store = LocalStore(tmp / "runs" / "t")  # one filesystem: every node writes its checkpoints here
    try:
        first = wait_for("a complete checkpoint", lambda: (list_complete_checkpoints(store, "") or [None])[-1], 400)
        hosts = wait_for("Ray Train workers on two nodes", lambda: (h := _hosts(cluster)) and len(h) == 2 and h, 60)
        crossing = wait_for("torch.distributed connections between the nodes", lambda: _peer_connections(hosts), 30)
        (rendezvous,) = wait_for("rank 0's MASTER_ADDR in the driver's output", lambda: _rendezvous(log), 30)
        assert first.step < STEPS and driver.poll() is None, "the run ended before the kill"
        by_ip = {node.ip: node for node in cluster.workers}
        assert rendezvous in by_ip and by_ip[rendezvous].name in hosts, (rendezvous, hosts)
        _check_tracker_on_the_head(cluster)
        lost = by_ip[rendezvous]
        raylet = cluster.kill_raylet(lost)
        loss = Loss(driver, log, store, hosts, lost, max(c.step for c in list_complete_checkpoints(store, "")), time.monotonic())
    except BaseException:
        _stop(driver)
        raise
    print(f"workers on {sorted(hosts)}, rank 0 on {rendezvous}; torch.distributed connections between them: {crossing}; "
          f"killed the raylet ({raylet}) of {lost.name} ({lost.ip}) at complete checkpoint step {loss.complete_at_kill}")
    return loss


def _check_tracker_on_the_head(cluster: NetnsCluster) -> None:
    """The driver's actors live on the driver's node (Train's controller by Ray's choice, the
    progress tracker by ours): a worker node's loss must not take the run's history with it. Checked
    in every run of the module: unpinned, Ray places a num_cpus=0 actor on any node."""
    trackers = [node.name for node in cluster.nodes if node.processes(TRACKER)]
    assert trackers == [cluster.head.name], f"the progress tracker runs on {trackers}, not on the driver's node"


def _stop(driver: subprocess.Popen) -> None:
    if driver.poll() is None:
        driver.kill()
        driver.wait(timeout=30)


def _check_resumed_to_the_same_model(cluster: NetnsCluster, loss: Loss, out: str, tmp: Path, reference,
                                     complete_at_restart: int) -> None:
    """From the latest complete checkpoint, with a new rank 0 on another node, to the uninterrupted
    run's model. `reference` is the session's uninterrupted run of the same job (conftest.py), on
    one node: the same seed, data order and two workers with one torch thread each (cpusPerWorker
    0.5 and 1 both give one), so the same model to float noise. (The module used to train its own
    uninterrupted run on the cluster, ~45 s; where the workers ran, and that gloo crossed node
    addresses, every lost-node run checks before its loss.)"""
    moved = _rendezvous(loss.log)
    assert len(moved) == 2 and moved[1] != loss.lost.ip and moved[1] in {n.ip for n in cluster.workers}, moved
    results = _results(tmp, "t")
    rows = [row for row in results["history"] if not row.get("baseline")]
    steps = [row["step"] for row in rows]
    resumed = sorted({row["resumed_from_step"] for row in rows if "resumed_from_step" in row})
    # from the latest complete checkpoint (one the old group had reported but Ray had not yet
    # registered when the node went may complete meanwhile), not from 0
    assert len(resumed) == 1 and loss.complete_at_kill <= resumed[0] <= complete_at_restart, (steps, resumed, out[-3000:])
    after_steps = [row["step"] for row in rows if "resumed_from_step" in row]
    assert after_steps[0] == resumed[0] + EVERY and after_steps[-1] == STEPS
    assert [row["step"] for row in results["history"] if row.get("baseline")] == [0]  # not restarted from 0
    # the same weights and final evaluation as the uninterrupted run: optimizer state, LR schedule
    # and data order all continued on other nodes
    ours, theirs = _weights(results), load_file(str(reference.run_dir / "model" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    print(f"resumed from step {resumed[0]} with rank 0 on {moved[1]}; steps {steps}; largest weight difference from the "
          f"uninterrupted run {worst:.2e}")
    assert worst < 1e-4
    assert results["history"][-1]["eval_loss"] == pytest.approx(reference.results["history"][-1]["eval_loss"], rel=1e-4)
    status = json.loads((tmp / "runs" / "t" / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", STEPS)


def _workers_left(cluster: NetnsCluster) -> list[Node]:
    return [node for node in cluster.workers if not node.gone]


def test_a_lost_node_resumes_on_the_remaining_nodes_to_the_same_model(cluster, reference, assets, tmp_path):
    """Three worker nodes for two workers: the group restarts at once on the two left."""
    while len(_workers_left(cluster)) < 3:  # run after the other test, which leaves two
        cluster.add_worker()
    cluster.wait_for_nodes(4, 120)
    loss = _lose_rank_zero_node(cluster, tmp_path, assets)
    try:
        spare = next(node for node in cluster.workers if node.name not in loss.hosts)
        # the lost node is gone for Ray; the restarted group runs on the two nodes left, the spare one among them
        wait_for("Ray to count the node dead", lambda: loss.lost.ip not in (alive := cluster.alive_nodes()) and len(alive) == 3, 120)
        after = wait_for("the restarted workers on the remaining nodes",
                         lambda: (h := _hosts(cluster)) and len(h) == 2 and spare.name in h and loss.lost.name not in h and h, 300)
        complete_at_restart = max(c.step for c in list_complete_checkpoints(loss.store, ""))
        print(f"node dead and workers restarted on {sorted(after)} in {time.monotonic() - loss.killed_at:.0f} s "
              f"(latest complete checkpoint then: step {complete_at_restart})")
        out = _finish(loss.driver, loss.log, 400)
    finally:
        _stop(loss.driver)
    _check_resumed_to_the_same_model(cluster, loss, out, tmp_path, reference, complete_at_restart)


# Ray Train's wait for a worker group's placement (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by
# default), short here; each wait that times out is a controller failure, retried up to
# FailureConfig.controller_failure_limit (runPolicy.workerRestarts, 3 by default)
START_TIMEOUT_S = "15"


def test_with_no_capacity_left_the_run_waits_for_a_replacement_node(cluster, reference, assets, tmp_path):
    """Two worker nodes for two workers: after the loss the group cannot be placed; Ray Train waits,
    retries when a wait times out, and the run goes on when a replacement node joins, as KubeRay
    replaces a lost worker pod."""
    while len(_workers_left(cluster)) > 2:  # run alone, the module's cluster still has its spare node
        cluster.stop_node(_workers_left(cluster)[-1])
    cluster.wait_for_nodes(3, 120)
    loss = _lose_rank_zero_node(cluster, tmp_path, assets, env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": START_TIMEOUT_S})
    try:
        (survivor,) = _workers_left(cluster)
        # no room for two workers: the restarted group waits for its placement, times out, tries again
        timed_out = wait_for("a worker group start that timed out", lambda: _controller_says(cluster, "worker group startup timed out"),
                             120, every=1)
        assert loss.driver.poll() is None and not survivor.processes(TRAIN_WORKER), "workers ran with one node for two"
        waited = time.monotonic() - loss.killed_at
        replacement = cluster.add_worker()
        after = wait_for("the restarted workers on the survivor and the replacement",
                         lambda: (h := _hosts(cluster)) and sorted(h) == sorted([survivor.name, replacement.name]) and h, 300)
        complete_at_restart = max(c.step for c in list_complete_checkpoints(loss.store, ""))
        print(f"no placement for {waited:.0f} s ({timed_out[0].strip()[:120]}); a replacement node {replacement.ip} joined; "
              f"workers restarted on {sorted(after)} {time.monotonic() - loss.killed_at:.0f} s after the loss")
        out = _finish(loss.driver, loss.log, 400)
    finally:
        _stop(loss.driver)
    _check_resumed_to_the_same_model(cluster, loss, out, tmp_path, reference, complete_at_restart)


def _controller_says(cluster: NetnsCluster, text: str) -> list[str]:
    """Lines of the head's Ray logs (where Train's controller runs and writes) that contain `text`."""
    found = []
    for path in Path(cluster.temp_dir, "head").glob("session_*/logs/**/*"):
        if path.is_file():
            with contextlib.suppress(OSError):
                found += [line for line in path.read_text(errors="replace").splitlines() if text in line]
    return found
