"""The process environment a driver needs before Ray is first imported: set by the entry points.

`finetune` (cli.main), `python -m finetune_trainer` (the same main) and the test session call
`prepare()` once, first; library modules change no environment at import. Ray reads these
variables when it is imported and when it starts a local instance, and its raylet and workers
inherit them, so they cannot be passed to `ray.init` instead:

- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (no cluster: RAY_ADDRESS unset): the local Ray advertises
  127.0.0.1, not the machine's outward address, so torch.distributed's rendezvous (MASTER_ADDR)
  stays on loopback.
- RAY_GCS_SERVER_PORT, a free port chosen here (below the ephemeral range: `PORT_RANGE`): Ray's state API inside workers finds "the" local
  cluster by scanning for GCS processes and gives up when there are two (another local Ray on the
  same machine, e.g. a second run); Train's PlacementGroupCleaner then dies and a stopped trial's
  CPUs are never freed. With the port known, `driver.init_ray` tells every worker its cluster's
  address (RAY_ADDRESS in runtime_env). Ray reads it only from the environment (node.py), since
  `ray.init` has no parameter for it.
"""

from __future__ import annotations

import os
import random
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


# Where the GCS port is drawn from: below Linux's ephemeral range (32768-60999 by default), so no
# outgoing connection of another process can take it between `prepare` and Ray's start (a test
# session starts its S3 server in between), and above Ray's own worker ports (10002-19999).
PORT_RANGE = (20000, 32767)


def free_port(span: tuple[int, int] = PORT_RANGE, *, attempts: int = 100) -> int:
    """A port of `span` that nothing listens on now. Not port 0 (the kernel's choice): that is an
    ephemeral port, which the kernel also hands to outgoing connections, and the port is chosen
    seconds before Ray binds it."""
    rng = random.SystemRandom()
    for _ in range(attempts):
        port = rng.randint(*span)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {span[0]}-{span[1]} after {attempts} tries")
