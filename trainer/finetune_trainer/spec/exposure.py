"""Rules for a job that will run on a shared cluster, which a local `finetune run` does not need.

On a laptop, `spec.storage.endpoint: http://127.0.0.1:9000` is the user's own MinIO and is fine.
In a cluster the same manifest is written by one tenant and acted on by components that others
share: the pods' loopback is not that MinIO, and 169.254.169.254 / fd00:ec2::254 are the cloud
metadata services that hand out the node's credentials. The operator itself never calls a job's
endpoint (progress reaches it through a ConfigMap, docs/security.md), so this is not what stops a
confused deputy; it refuses, before any pod starts, a manifest that points the job's own
components at addresses no storage service lives at. DNS names that resolve there are not caught
(no lookups at validation time): the per-job NetworkPolicy's egress rules are the control for those.

`parse_job(..., for_cluster=True)` applies these rules: the operator, `finetune render` and
`finetune validate` use it; the local `finetune run` does not.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

from .storage import StorageSpec

# loopback, "this host", link-local (AWS/GCP/Azure IMDS at 169.254.169.254), AWS's IPv6 IMDS
BLOCKED_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "::1/128", "::/128", "fe80::/10", "fd00:ec2::254/128"))
BLOCKED_NAMES = ("localhost", "metadata", "metadata.google.internal", "instance-data", "instance-data.ec2.internal")


def blocked_address(host: str) -> str | None:
    """Why `host` (a URL's host part) is no place for a job's storage, or None."""
    name = host.strip("[]").rstrip(".").lower()
    if name in BLOCKED_NAMES or name.endswith(".localhost"):
        return f"{host} is this machine or a cloud metadata service"
    address = _address(name)
    if address is None:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for network in BLOCKED_NETWORKS:
        if address.version == network.version and address in network:
            return f"{host} is in {network} (loopback, link-local or a cloud metadata service)"
    return None


def _address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    # the forms inet_aton (and so every HTTP client) also takes: 127.1, 2130706433, 0x7f000001
    if name and all(c in "0123456789abcdefx." for c in name) and any(c.isdigit() for c in name):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            return None
    return None


def cluster_problems(storage: StorageSpec | None) -> Iterator[tuple[str, str]]:
    """(yaml path, message) for what may not run on a shared cluster: today, where spec.storage points."""
    if storage is not None and storage.endpoint:
        host = urlsplit(storage.endpoint).hostname or ""
        if why := blocked_address(host):
            yield "spec.storage.endpoint", (
                f"{why}: on a cluster no S3 service for this job lives there; name the storage service's "
                "address (e.g. http://minio.storage.svc:9000). A local `finetune run` accepts it")
