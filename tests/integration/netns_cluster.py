"""A real multi-node Ray cluster on one machine: every node a `ray start` in a Linux network
namespace of its own, with its own address on a bridge (veth pairs), as pods are on a cluster.

    with NetnsCluster(tmp_path, workers=3) as cluster:     # a head (0 CPUs) and 3 worker nodes
        cluster.spawn(["python", "-m", "finetune_trainer", "run", ...])  # a driver on the head
        cluster.kill_raylet(cluster.workers[0])              # a node lost

Why namespaces and not `ray.cluster_utils.Cluster` (several raylets on loopback): each node here
sees only its own interface (`eth0`, 10.213.N.x) and its own loopback, so a Ray or torch.distributed
connection between nodes crosses node addresses exactly as between pods, and `GLOO_SOCKET_IFNAME`
is each node's own interface (set in its `ray start` environment, which its workers inherit; the
driver's `init_ray` sets nothing for a joined cluster). The filesystem is shared: checkpoints in a
local folder reach every node, as on a cluster with a shared volume.

Needs root with CAP_NET_ADMIN and the `ip` command; `unavailable()` says what is missing, for a
skip that names it. The root namespace gets only the bridge (no address): nothing of the cluster
is reachable from it, and no other Ray on the machine can collide with its ports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

GCS_PORT = 6379  # every node has its own port space: Ray's defaults collide with nothing
IFNAME = "eth0"  # each node's interface (the veth's end inside its namespace)
# what the test session's environment says about *its* local Ray (tests/conftest.py, environment.py)
# and must not leak into this cluster's processes
_NOT_INHERITED = ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GLOO_SOCKET_IFNAME",
                  "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MASTER_ADDR", "MASTER_PORT")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why this machine cannot host the cluster (None: it can): no `ip`, or creating a network
    namespace or a veth pair is refused (no CAP_NET_ADMIN, a sandbox that forbids it)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"ftprobe{os.getpid() % 100000}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` was refused: {made.stderr.strip()} (needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    try:
        veth = _ip("link", "add", f"{probe}a", "type", "veth", "peer", "name", IFNAME, "netns", probe, check=False)
        if veth.returncode != 0:
            return f"`ip link add ... type veth` was refused: {veth.stderr.strip()}"
    finally:
        _ip("link", "del", f"{probe}a", check=False)
        _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> int:
    """A third octet N such that 10.213.N.0/24 is on no interface of the machine (a cluster left
    behind by a killed session keeps its bridge until reboot)."""
    used = _ip("-4", "-o", "addr").stdout + "".join(
        _ip("-n", ns.split()[0], "-4", "-o", "addr", check=False).stdout for ns in _ip("netns", "list").stdout.splitlines() if ns)
    for n in range(10, 250):
        if f"10.213.{n}." not in used:
            return n
    raise OSError("no free 10.213.N.0/24 subnet")


@dataclass
class Node:
    name: str  # the network namespace
    ip: str
    cpus: int
    proc: subprocess.Popen | None = None  # `ray start --block`, in a session of its own
    gone: bool = False  # lost or stopped on purpose: its `ray start` is expected to have exited

    def pids(self) -> list[int]:
        """Every process living in this node's namespace (Ray's raylet, agents, workers)."""
        found = _ip("netns", "pids", self.name, check=False).stdout.split()
        return [int(p) for p in found]

    def processes(self, title: str) -> list[int]:
        """This node's processes whose command line contains `title` (Ray names its workers'
        processes after what they run: `ray::RayTrainWorker...`)."""
        hits = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                if title in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    hits.append(pid)
        return hits

    def raylet(self) -> int | None:
        for pid in self.pids():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
        return None


@dataclass
class NetnsCluster:
    """A head node (the driver's, like KubeRay's head pod; no CPUs, so every training worker runs on
    a worker node) and `workers` worker nodes of `cpus` CPUs each, on a bridge of their own."""

    root: Path
    workers_count: int = 3
    cpus: int = 1
    head_env: dict[str, str] = field(default_factory=dict)  # e.g. faster node-death detection for a test
    tag: str = field(default_factory=lambda: f"ft{os.getpid() % 10000}{secrets.token_hex(1)}")
    head: Node = field(init=False)
    workers: list[Node] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.bridge = f"{self.tag}br"
        self.subnet = _free_subnet()
        # short (Ray's socket paths), never /tmp/ray, and one folder per node: nodes sharing one race
        # for the same socket names (plasma_store.1)
        self.temp_dir = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")
        self.home = self.root / "home"  # Ray 2.60 may write ~/.ray/auth_token: never the user's
        self.home.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(32)  # token authentication, as KubeRay's authOptions sets it
        self.head = Node(f"{self.tag}-head", f"10.213.{self.subnet}.1", 0)
        self.workers = [Node(f"{self.tag}-w{i}", f"10.213.{self.subnet}.{10 + i}", self.cpus) for i in range(1, self.workers_count + 1)]
        self._veths: list[str] = []  # the bridge's ends of every node's veth pair, removed by close()
        self.logs = self.root / "ray-nodes"
        self.logs.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def nodes(self) -> list[Node]:
        return [self.head, *self.workers]

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> NetnsCluster:
        try:
            self._network()
            self._start(self.head, ["--head", f"--port={GCS_PORT}", "--dashboard-host=0.0.0.0", "--include-dashboard=true"],
                         extra=self.head_env)
            for node in self.workers:
                self._start(node, [f"--address={self.address}"])
            self.wait_for_nodes(len(self.nodes), 120)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for node in self.nodes:
            self._plug(node)

    def _plug(self, node: Node) -> None:
        """The node's namespace, and a veth pair from the bridge to its `eth0` with its address."""
        outside = f"{self.tag}v{node.ip.rpartition('.')[2]}"
        self._veths.append(outside)
        _ip("netns", "add", node.name)
        _ip("link", "add", outside, "type", "veth", "peer", "name", IFNAME, "netns", node.name)
        _ip("link", "set", outside, "master", self.bridge, "up")
        _ip("-n", node.name, "addr", "add", f"{node.ip}/24", "dev", IFNAME)
        _ip("-n", node.name, "link", "set", IFNAME, "up")
        _ip("-n", node.name, "link", "set", "lo", "up")

    def add_worker(self) -> Node:
        """A new worker node joining the running cluster (a replacement pod), returned once it runs
        its `ray start` (Ray counts it alive a few seconds later: `wait_for_nodes`)."""
        number = len(self.workers) + 1
        node = Node(f"{self.tag}-w{number}", f"10.213.{self.subnet}.{10 + number}", self.cpus)
        self.workers.append(node)
        self._plug(node)
        self._start(node, [f"--address={self.address}"])
        return node

    def stop_node(self, node: Node) -> None:
        """Stop a worker node the orderly way (`ray start --block` on SIGINT stops its processes):
        a node scaled down, not lost."""
        assert node.proc is not None
        node.gone = True
        os.killpg(node.proc.pid, signal.SIGINT)
        node.proc.wait(timeout=60)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process of the cluster: the test session's, less what it says
        about its own local Ray, plus this cluster's address and token and a private HOME."""
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        return env | {"HOME": str(self.home), "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                      "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"} | extra

    def _start(self, node: Node, args: list[str], extra: dict[str, str] | None = None) -> None:
        # GLOO_SOCKET_IFNAME: the node's own interface; its workers inherit the raylet's environment
        env = self.env(GLOO_SOCKET_IFNAME=IFNAME, **(extra or {}))
        with (self.logs / f"{node.name}.log").open("wb") as out:
            node.proc = subprocess.Popen(
                ["ip", "netns", "exec", node.name, sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
                 f"--node-ip-address={node.ip}", f"--num-cpus={node.cpus}", "--num-gpus=0", "--disable-usage-stats",
                 f"--temp-dir={self.temp_dir}/{node.name.rpartition('-')[2]}", *args],  # a node's own, as on its machine
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def spawn(self, argv: list[str], *, log: Path, cwd: Path, env: dict[str, str] | None = None, node: Node | None = None) -> subprocess.Popen:
        """A process inside a node's namespace (the head's by default: a driver), output to `log`."""
        with log.open("wb") as out:
            return subprocess.Popen(["ip", "netns", "exec", (node or self.head).name, *argv], env=env or self.env(), cwd=cwd,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def alive_nodes(self) -> list[str]:
        """The node IPs Ray's GCS counts as alive, asked from inside the head's namespace."""
        code = "import ray; ray.init(); print(' '.join(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))"
        done = subprocess.run(["ip", "netns", "exec", self.head.name, sys.executable, "-c", code], env=self.env(),
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return []
        return done.stdout.split()

    def wait_for_nodes(self, count: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if not node.gone and node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"`ray start` of {node.name} exited ({node.proc.returncode}):\n{self.node_log(node)}")
            alive = self.alive_nodes()
            if len(alive) == count:
                return alive
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} of {count} Ray nodes alive after {timeout:.0f} s: {alive}")
            time.sleep(1)

    def node_log(self, node: Node, tail: int = 3000) -> str:
        return (self.logs / f"{node.name}.log").read_text(errors="replace")[-tail:]

    def kill_raylet(self, node: Node) -> int:
        """SIGKILL the node's raylet: Ray's view of a node lost (its `ray start --block` then stops
        what is left of the node, as the kubelet's pod goes)."""
        pid = node.raylet()
        if pid is None:
            raise RuntimeError(f"no raylet in {node.name}")
        node.gone = True
        os.kill(pid, signal.SIGKILL)
        return pid

    def close(self) -> None:
        """Stop every node (SIGINT: `ray start --block` stops its processes at once), SIGKILL what
        is left in the namespaces, then remove namespaces, veths, bridge and temp dir."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 20
        for node in self.nodes:
            if node.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for _ in range(50):  # workers, agents and drivers that outlived their raylet
            left = [pid for node in self.nodes for pid in node.pids()]
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
            if node.proc is not None:
                node.proc.wait(timeout=30)  # reaped: an unwaited Popen is a ResourceWarning, an error in the tests
            _ip("netns", "del", node.name, check=False)
        for outside in self._veths:  # gone with their namespace's end, usually
            _ip("link", "del", outside, check=False)
        _ip("link", "del", self.bridge, check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
