"""The process environment a driver needs before Ray is first imported: set by the entry points.

`finetune` (cli.main), `python -m finetune_trainer` (the same main) and the test session call
`prepare()` once, first; library modules change no environment at import. Ray reads these
variables when it is imported and when it starts a local instance, and its raylet and workers
inherit them, so they cannot be passed to `ray.init` instead:

- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (no cluster: RAY_ADDRESS unset): the local Ray advertises
  127.0.0.1, not the machine's outward address, so torch.distributed's rendezvous (MASTER_ADDR)
  stays on loopback.
- RAY_GCS_SERVER_PORT, a free port chosen here: Ray's state API inside workers finds "the" local
  cluster by scanning for GCS processes and gives up when there are two (another local Ray on the
  same machine, e.g. a second run); Train's PlacementGroupCleaner then dies and a stopped trial's
  CPUs are never freed. With the port known, `driver.init_ray` tells every worker its cluster's
  address (RAY_ADDRESS in runtime_env). Ray reads it only from the environment (node.py), since
  `ray.init` has no parameter for it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

GCS_PORT = "RAY_GCS_SERVER_PORT"


def prepare(env: MutableMapping[str, str] | None = None) -> None:
    """A joined cluster (RAY_ADDRESS set, as KubeRay sets it) needs neither variable. The port is
    chosen anew by every process that calls this, never inherited: a `finetune run` started by
    another driver (a test session, a script) must not take its parent's Ray's port."""
    env = os.environ if env is None else env
    if env.get("RAY_ADDRESS"):
        return
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env[GCS_PORT] = str(free_port())


def local_gcs_address() -> str | None:
    """The address of the local Ray `prepare` chose a port for (None: not prepared, or a cluster)."""
    port = os.environ.get(GCS_PORT)
    return f"127.0.0.1:{port}" if port and not os.environ.get("RAY_ADDRESS") else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
