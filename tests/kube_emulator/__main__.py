"""Serve the emulator until interrupted, for poking at it by hand.

    .venv/bin/python -m tests.kube_emulator
    export KUBECONFIG=<the printed path>; kubectl get ns
"""

from __future__ import annotations

import contextlib
import threading

from . import running

if __name__ == "__main__":
    with running() as api, contextlib.suppress(KeyboardInterrupt):
        print(f"Kubernetes API emulator at {api.url}\nexport KUBECONFIG={api.kubeconfig_path}", flush=True)
        threading.Event().wait()
