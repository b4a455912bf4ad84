"""Screenshots of the Ray dashboard during a real local search, for docs/install.md.

    .venv/bin/python docs/dashboard_screenshot.py          # ~1-2 min on 2 cores; writes docs/images/ray-dashboard-jobs.png

What it does, all of it real: a 2-trial grid search of a tiny BERT (tests/integration/tiny.py: a
model built from a config, sentiment rows) runs as `finetune run` would run it (a driver process
of its own: environment.prepare, then run(), with its own HOME, so its Ray 2.60 generates its own
token into ~/.ray/auth_token there). While a trial's Train run is RUNNING (read from the
dashboard's own API, api/train/v2/runs/v1), a headless Chromium opens the dashboard with that
token as the `ray-authentication-token` cookie (what the dashboard's token prompt sets; Ray's
http_server_head.py), opens the Jobs view, waits until the React app has rendered the job
(its name and RUNNING in the list), and takes a screenshot. Token authentication
stays on. Also written: the Train runs the API listed at that moment (names, status, workers), as
JSON beside the image, since Ray 2.60's open-source dashboard has no page of its own for them (the
Train view is Anyscale's console). Not shot: a local driver's job page (Ray shows a job's metadata
there for submitted jobs only) and the Actors view (a table of Ray's internal actors, dead ones first).

Needs a Chromium (Debian: `apt-get install chromium`; nothing is downloaded by this script).
Chromium is driven through its DevTools protocol (Network.setCookie, Page.navigate,
Page.captureScreenshot) over aiohttp's websocket client, which Ray's dashboard already installs:
`--screenshot` alone cannot send the cookie.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.integration import tiny  # noqa: E402  (after the path: a checkout run as a script)
from tests.integration.ray_driver import AUTH_VARS, DRIVER, probe  # noqa: E402

log = logging.getLogger("dashboard_screenshot")
COOKIE = "ray-authentication-token"  # ray._private.authentication.authentication_constants

def _get(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


class Browser:
    """One headless Chromium page driven through the DevTools protocol."""

    def __init__(self, chromium: str, profile: Path, width: int, height: int):
        self.width, self.height = width, height
        self.process = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"  # Chromium writes its port here (port 0: any free one)
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("Chromium did not start")
            time.sleep(0.2)
        self.port = int(port_file.read_text().split()[0])
        self.ids = itertools.count(1)

    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as response:
            page = next(t for t in await response.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Emulation.setDeviceMetricsOverride",
                        width=self.width, height=self.height, deviceScaleFactor=1, mobile=False)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=60)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def text(self) -> str:
        result = await self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''", returnByValue=True)
        return str(result.get("result", {}).get("value", ""))

    async def shoot(self, url: str, wanted: list[str], path: Path, timeout: float = 40) -> None:
        """Open `url`, wait until the page shows every string in `wanted` (the React app fetches
        and renders after load), give it a moment to settle, and save a PNG."""
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while True:
            text = await self.text()
            if all(w in text for w in wanted):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} never showed {wanted}; it shows: {text[:500]!r}")
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path.write_bytes(base64.b64decode(shot["data"]))
        log.info("wrote %s (%d KB)", path, path.stat().st_size // 1024)

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()
        self.process.terminate()
        self.process.wait(timeout=30)


async def _screenshots(chromium: str, profile: Path, dashboard: str, token: str, name: str, images: Path,
                       width: int, height: int) -> None:
    browser = Browser(chromium, profile, width, height)
    try:
        await browser.open()
        await browser.call("Network.enable")
        await browser.call("Network.setCookie", name=COOKIE, value=token, url=dashboard, httpOnly=True, sameSite="Strict")
        await browser.shoot(f"{dashboard}/#/jobs", [name, "RUNNING"], images / "ray-dashboard-jobs.png")
    finally:
        await browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per trial (long enough to catch it running)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    chromium = shutil.which("chromium") or shutil.which("chromium-headless-shell") or shutil.which("google-chrome")
    if not chromium:
        log.error("no Chromium found: apt-get install chromium")
        return 2
    args.images.mkdir(parents=True, exist_ok=True)
    name = "sentiment-demo"
    with tempfile.TemporaryDirectory(prefix="dashboard-shot-") as tmp_dir:
        tmp = Path(tmp_dir)
        model = tiny.make_model(tmp / "model", "bert", layers=1)
        data = tiny.write_jsonl(tmp / "train.jsonl", tiny.sentiment_rows(160))
        doc = tiny.manifest(tmp, model, data, training={"maxSteps": args.steps}, evaluation={"everySteps": 10, "metric": "loss"},
                            resources={"workers": 1, "cpusPerWorker": 0.5},
                            search={"algorithm": "grid", "maxConcurrentTrials": 2,
                                    "space": {"training.learningRate": {"choice": [1e-3, 5e-3]}}})
        doc["metadata"] = {"name": name, "namespace": "team-a"}
        path = tiny.save_manifest(tmp / "job.yaml", doc)
        home = tmp / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS} | {"HOME": str(home), "RAY_ADDRESS": ""}
        out = tmp / "driver.out"
        with out.open("w") as stdout, (tmp / "driver.err").open("w") as stderr:
            script = tmp / "run_job.py"  # a file, not `-c`: the Jobs view shows the command line as the entrypoint
            script.write_text(DRIVER)
            driver = subprocess.Popen([sys.executable, str(script), str(path)], env=env, cwd=ROOT, text=True,
                                      stdin=subprocess.PIPE, stdout=stdout, stderr=stderr)
        try:
            started = probe(out, "dashboard", driver)
            if not started:
                raise RuntimeError(f"the driver never started Ray: {(tmp / 'driver.err').read_text()[-2000:]}")
            dashboard = f"http://{started['dashboard']}"
            token = (home / ".ray" / "auth_token").read_text().strip()
            runs: list[dict[str, Any]] = []
            deadline = time.monotonic() + 240
            while not any(r.get("status") == "RUNNING" and any(a.get("workers") for a in r.get("attempts", [])) for r in runs):
                if time.monotonic() > deadline or driver.poll() is not None:
                    raise RuntimeError("no Train run was seen running")
                runs = (_get(f"{dashboard}/api/train/v2/runs/v1", token) or {}).get("train_runs", [])
                time.sleep(0.5)
            asyncio.run(_screenshots(chromium, tmp / "chromium", dashboard, token, name, args.images, args.width, args.height))
            listed = [{"name": r["name"], "status": r["status"], "workers": [w.get("world_rank") for a in r.get("attempts", [])
                                                                             for w in a.get("workers", [])]} for r in runs]
            (args.images / "ray-dashboard-train-runs.json").write_text(json.dumps(listed, indent=2) + "\n")
            log.info("Train runs at that moment: %s", listed)
        finally:
            driver.communicate("\n", timeout=600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
