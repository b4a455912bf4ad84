"""Ray token authentication, as KubeRay's `authOptions: {mode: token}` turns it on in every Ray
container (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN from the Secret it creates): the trainer's own Ray
calls (the driver's ray.init, Ray Train, Tune, and the state API a nested Tune + Train search
uses from inside its workers) work under it, and the Ray the trainer starts really refuses a
request without the token.

Each case is its own process with its own local Ray: the auth variables then never reach this
pytest process, whose session Ray (tests/integration/conftest.py) other tests share.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from . import tiny

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

# init_ray as `finetune run` calls it, then what Ray Train's workers do: a task joins through the
# state API (list_actors: the dashboard's HTTP API, authenticated with the worker's token) and says
# which mode it runs in. The dashboard URL goes to the test, which then probes it from outside.
PROBE = """
import json, os, sys
from finetune_trainer import environment

environment.prepare()  # as `finetune run` does, first
import ray
from finetune_trainer.driver import init_ray

init_ray()

@ray.remote(num_cpus=0)
def inside():
    from ray.util.state import list_actors
    return os.environ.get("RAY_AUTH_MODE"), len(list_actors())

mode, _ = ray.get(inside.remote())
url = ray.init(ignore_reinit_error=True).dashboard_url
print(json.dumps({"dashboard": url, "worker_mode": mode}), flush=True)
sys.stdin.readline()  # the test has probed the dashboard
ray.shutdown()
"""


# The driver of a RayJob: KubeRay's submitter (or the operator, in HTTPMode) hands the entrypoint
# to the head's job API with the token; Ray's job manager starts it with RAY_ADDRESS set and the
# head container's environment, RAY_AUTH_MODE and RAY_AUTH_TOKEN included.
CLUSTER_DRIVER = """
import os
from finetune_trainer import environment

environment.prepare()  # as `python -m finetune_trainer` does, first (RAY_ADDRESS is set: nothing to do)
import ray
from finetune_trainer.driver import init_ray

init_ray()

@ray.remote(num_cpus=0)
def inside():
    from ray.util.state import list_actors
    return os.environ.get("RAY_AUTH_MODE"), len(list_actors())

print("driver joined", os.environ["RAY_ADDRESS"], "worker mode", ray.get(inside.remote())[0], flush=True)
"""


def _env(home: Path, **auth: str) -> dict[str, str]:
    """This process's environment without any Ray auth variable (the session Ray may have set
    RAY_AUTH_MODE here), plus `auth`, a HOME of the test's own (Ray keeps a generated token in
    ~/.ray/auth_token) and no RAY_ADDRESS: a local Ray of its own."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    return env | {"HOME": str(home), "RAY_ADDRESS": "", **auth}


def _get(url: str, headers: dict[str, str]) -> int:
    """The HTTP status of a GET, 0 when nothing listens there yet."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def _files_containing(folder: Path, secret: str) -> list[Path]:
    needle = secret.encode()
    return [p for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.parametrize("source", ["given", "generated", "ray-default"])
def test_the_local_ray_refuses_requests_without_the_token(tmp_path, source):
    """given: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (KubeRay's case); generated: RAY_AUTH_MODE=token
    alone, Ray writes a new token to ~/.ray/auth_token; ray-default: neither set, Ray 2.60 turns
    token mode on for a new local cluster by itself (what docs/security.md says a local run gets)."""
    home = tmp_path / "home"
    home.mkdir()
    token = secrets.token_hex(32) if source == "given" else None
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {"RAY_AUTH_MODE": "token"} if source == "generated" else {}
    probe = subprocess.Popen([sys.executable, "-c", PROBE], env=_env(home, **auth), cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = probe.stdout.readline()
        assert line, f"the probe exited ({probe.wait()}):\n{probe.stderr.read()[-3000:]}"
        started = json.loads(line)
        token_file = home / ".ray" / "auth_token"
        if token is None:  # Ray generated one, in the HOME it was given
            token = token_file.read_text().strip()
        else:
            assert not token_file.exists()  # RAY_AUTH_TOKEN given: nothing written to disk
        assert started["worker_mode"] == "token"  # Ray's workers (Train's, Tune's) run in token mode too
        jobs = f"http://{started['dashboard']}/api/jobs/"
        assert _get(jobs, {}) == 401
        assert _get(jobs, {"Authorization": f"Bearer {secrets.token_hex(32)}"}) == 403
        assert _get(jobs, {"Authorization": f"Bearer {token}"}) == 200
    finally:
        _, err = probe.communicate("\n", timeout=120)
    assert probe.returncode == 0, err[-3000:]
    assert token not in err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def token_head(tmp_path):
    """A Ray head as KubeRay starts it with authOptions mode token (`ray start --head`, the two
    variables in its environment, and RAY_ADDRESS naming its own GCS, as KubeRay sets it: Ray's
    state API inside workers then never has to choose between this and other Rays of the machine), on loopback; yields (dashboard URL, token). Only this head's
    processes are stopped afterwards (`ray stop` would stop every Ray on the machine)."""
    token, port, dashboard, agent = secrets.token_hex(32), _free_port(), _free_port(), _free_port()
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="ray-auth-", dir="/tmp")  # short: Ray's socket paths
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
         f"--dashboard-agent-listen-port={agent}",  # not the default 52365, which another Ray here may hold
         "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) | {"RAY_ADDRESS": f"127.0.0.1:{port}"}, cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 90
    while _get(f"{url}/api/version", {}) == 0:
        assert head.poll() is None and time.monotonic() < deadline, "the token-mode Ray head did not start"
        time.sleep(0.5)
    yield url, token
    os.killpg(head.pid, signal.SIGINT)  # `ray start --block` stops its processes at once on SIGINT, not SIGTERM
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)  # reaped: an unwaited Popen is a ResourceWarning, an error in the tests
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_cluster_driver_joins_a_token_mode_head(token_head):
    """The in-cluster path: the job API refuses a client without the token, and the driver it
    starts (init_ray with RAY_ADDRESS) joins and runs tasks that use the state API."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    url, token = token_head
    assert _get(f"{url}/api/jobs/", {}) == 401
    # refused without this cluster's token: "required" when this process has none, "invalid" when it
    # holds another Ray's (Ray 2.60 writes one to ~/.ray/auth_token when a local ray.init starts a cluster)
    with pytest.raises(AuthenticationError, match=r"Authentication required|Invalid authentication token"):
        JobSubmissionClient(url).submit_job(entrypoint="true")
    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + 180
    while True:
        try:
            job = client.submit_job(entrypoint=f"{sys.executable} -c '{CLUSTER_DRIVER}'")
            break
        except RuntimeError as err:  # the head's job agent registers seconds after the dashboard answers
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "worker mode token" in logs and token not in logs


def _finetune_run(tmp_path: Path, doc: dict, token: str) -> subprocess.CompletedProcess:
    """`finetune run` in its own process under token mode, as a Ray container of KubeRay's has it."""
    manifest = tiny.save_manifest(tmp_path / "job.yaml", doc)
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run([sys.executable, "-m", "finetune_trainer", "run", str(manifest), "--no-progress"],
                          env=_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), cwd=ROOT, capture_output=True,
                          text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _results(tmp_path: Path) -> dict:
    (found,) = (tmp_path / "runs").glob("*/run-*/results.json")
    return json.loads(found.read_text())


def test_a_run_completes_under_token_auth(tmp_path):
    token = secrets.token_hex(32)
    model = tiny.make_model(tmp_path / "model", "bert", layers=2)
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.sentiment_rows(120))
    doc = tiny.manifest(tmp_path, model, data, training={"maxSteps": 8})
    done = _finetune_run(tmp_path, doc, token)
    results = _results(tmp_path)
    assert results["steps"] == 8 and [r["step"] for r in results["history"]] == [0, 4, 8]
    assert results["best"]["checkpoint"] and Path(results["model"]).is_dir()
    status = json.loads((tmp_path / "runs" / "t" / "status.json").read_text())
    assert status["state"] == "finished"
    # the token is never printed, nor written with the results, status, checkpoints or model
    assert token not in done.stdout + done.stderr
    assert _files_containing(tmp_path / "runs", token) == []


def test_a_two_trial_search_completes_under_token_auth(tmp_path):
    """Two trials at once, each a Ray Train run inside a Tune trial: Train's clean-up of a trial's
    workers goes through Ray's state API, which must authenticate from inside the cluster."""
    token = secrets.token_hex(32)
    model = tiny.make_model(tmp_path / "model", "bert", layers=2)
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.sentiment_rows(120))
    doc = tiny.manifest(tmp_path, model, data, training={"maxSteps": 6}, evaluation={"everySteps": 3},
                        resources={"workers": 1, "cpusPerWorker": 1},
                        search={"algorithm": "grid", "maxConcurrentTrials": 2, "scheduler": {"type": "none"},
                                "space": {"training.learningRate": {"choice": [1e-6, 5e-3]}}})
    done = _finetune_run(tmp_path, doc, token)
    results = _results(tmp_path)
    trials = results["trials"]
    assert len(trials) == 2 and all(t["status"] == "finished" and t["steps"] == 6 for t in trials), trials
    assert results["best"]["trial"] in {t["trial"] for t in trials}
    status = json.loads((tmp_path / "runs" / "t" / "status.json").read_text())
    assert status["state"] == "finished" and status["trials"]["completed"] == 2
    assert token not in done.stdout + done.stderr
    assert _files_containing(tmp_path / "runs", token) == []
