"""The driver's status.json, also written into the job's progress ConfigMap on Kubernetes.

The operator creates `<rayjob>-progress` and a Role that lets the job's ServiceAccount `patch`
that one ConfigMap (finetune_operator.trainer_access), mounts the account's token into the head
container only, and names the ConfigMap in FINETUNE_PROGRESS_CONFIGMAP. The operator then reads
progress through the API server and never needs the job's storage credentials (docs/security.md).

Written by hand on the standard library, not with the `kubernetes` client: one merge-patch of one
object does not justify a 125 MB dependency in the trainer image. The token is read at every
write, since the kubelet rotates projected tokens.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec.cluster import PROGRESS_CONFIGMAP_ENV, PROGRESS_KEY

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class ConfigMapWriter:
    """Merge-patches `data[status.json]` of one ConfigMap, as the pod's ServiceAccount."""

    server: str  # https://host:port of the API server
    namespace: str
    name: str
    token_file: Path
    ca_file: Path | None = None  # None: the system's trust store (or plain http, in tests)
    timeout: float = 5.0

    @classmethod
    def from_environment(cls) -> ConfigMapWriter | None:
        """The in-cluster writer, when the operator set this pod up for one; else None (a local run)."""
        name = os.environ.get(PROGRESS_CONFIGMAP_ENV)
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        token = SERVICE_ACCOUNT_DIR / "token"
        if not name or not host or not token.exists():
            return None
        namespace = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
        host = f"[{host}]" if ":" in host else host  # an IPv6 service address
        return cls(server=f"https://{host}:{port}", namespace=namespace, name=name, token_file=token,
                   ca_file=SERVICE_ACCOUNT_DIR / "ca.crt")

    def __call__(self, status: dict[str, Any]) -> None:
        body = json.dumps({"data": {PROGRESS_KEY: json.dumps(status)}}).encode()
        request = urllib.request.Request(
            f"{self.server}/api/v1/namespaces/{self.namespace}/configmaps/{self.name}", data=body, method="PATCH",
            headers={"Authorization": f"Bearer {self.token_file.read_text().strip()}",
                     "Content-Type": "application/merge-patch+json", "Accept": "application/json"})
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None
        with urllib.request.urlopen(request, timeout=self.timeout, context=context) as response:
            response.read()  # urlopen raises HTTPError on 4xx/5xx: StatusPublisher reports it once
