"""A `finetune run` driver as its own process that says where its local Ray's dashboard is: what
tests/integration/test_ray_dashboard.py reads the dashboard's API through, and what
docs/dashboard_screenshot.py photographs. One definition for both."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

# the environment's Ray token settings are dropped: each driver's new local Ray makes its own token
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

DRIVER = """
import json, sys, threading, time
from finetune_trainer import environment

environment.prepare()
import ray
from finetune_trainer.run import run
from finetune_trainer.spec import load_job

def tell():  # the dashboard and metrics addresses, once run() has started Ray
    while not ray.is_initialized():
        time.sleep(0.2)
    from ray._private.worker import get_dashboard_url
    print("PROBE", json.dumps({"dashboard": get_dashboard_url(), "metrics_port": ray.nodes()[0]["MetricsExportPort"]}), flush=True)

threading.Thread(target=tell, daemon=True).start()
run(load_job(sys.argv[1]))
print("PROBE", json.dumps({"done": True}), flush=True)
sys.stdin.readline()  # the reader has read what it reads after the run; the dashboard may go
ray.shutdown()
"""


def probe(out: Path, key: str, driver: subprocess.Popen, timeout: float = 180) -> dict[str, Any] | None:
    """The driver's PROBE line carrying `key` (its stdout also carries the run's own lines); None
    once the driver has exited or `timeout` passed without it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out.read_text().splitlines():
            if line.startswith("PROBE ") and key in (found := json.loads(line[6:])):
                return found
        if driver.poll() is not None:
            return None
        time.sleep(0.2)
    return None
