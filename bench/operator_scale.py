"""What watching many running jobs costs the operator, measured on the real operator process.

    .venv/bin/python bench/operator_scale.py                          # 100 and 1,000 jobs, 30 s interval
    .venv/bin/python bench/operator_scale.py --jobs 20 --interval 5 --window 15   # smoke test
    .venv/bin/python bench/operator_scale.py --operator-python /tmp/opvenv/bin/python
        # the operator on a venv built as the Dockerfile builds the image's (its RSS is the image's)

The real parts, as tests/e2e starts them: the Kubernetes API emulator (tests/kube_emulator, in
this process, on loopback), the CRDs applied with the real kubectl, and `finetune operator
--namespace scale` as a subprocess (kopf, the kubernetes client). This script plays KubeRay (the
RayJob's status subresource) and the trainer (each job's progress ConfigMap, as the driver's
ConfigMapWriter patches it), the way the e2e tests do, through the kubernetes client.

One invocation, one operator process, growing through the scales (--jobs, default 100 then
1,000): at each scale all jobs are Running with a progress document, and for --window seconds
(default 120: four intervals) it measures, from /proc/<operator pid>:
- cpu_seconds_per_minute: the operator's user + system CPU over the window, per minute;
  the reference in the same run is the same figure with ONE job running (`reference`), and the
  per-job cost is (scale - reference) / jobs;
- rss_mib (VmRSS at the window's end) and peak_rss_mib (VmHWM): against the chart's limit;
- status lag: at the window's start every job's progress document gets a new total-trials count;
  `status_lag_seconds` is, per job, when its status.trialsDone first showed it (listed every 2 s),
  reported as max and median; the target is at most two intervals;
- phase_change_seconds: five jobs are finished (final report, then KubeRay's SUCCEEDED) while the
  rest run on; the time until each FineTuneJob says Succeeded (median and max), against the same
  figure with one job (`reference`). Target: <= 2 s;
- reconcile_seconds: from the first create to the last job's RayJob existing (100 new jobs in
  <= 10 s is the target).
Targets (issue 19): 1,000 running jobs at the default interval on <= 6 CPU-s per minute, RSS <=
300 MiB and inside the chart's limit, status at most two intervals old, a phase change in <= 2 s.

The emulator and this script share the machine with the operator (on the 2-core dev machine,
with other work): the CPU figure is the operator's own process only; latencies include the
emulator's time to serve the watch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator"), str(REPO / "trainer")]

import kubernetes  # noqa: E402
import yaml  # noqa: E402
from tests import kube_emulator  # noqa: E402
from tests.e2e.operator_harness import KUBECTL, KUBERAY, _free_port, http_ok, manifest, run_id, wait_for  # noqa: E402

from finetune_operator.trainer_access import progress_name  # noqa: E402
from finetune_trainer.job_status import snapshot  # noqa: E402
from finetune_trainer.spec.cluster import PROGRESS_KEY  # noqa: E402

NAMESPACE = "scale"
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
FINISHED_PER_SCALE = 5
log = logging.getLogger("operator_scale")


class Bench:
    def __init__(self, api: kube_emulator.KubeEmulator, interval: float, workdir: pathlib.Path, python: str):
        self.api, self.interval, self.workdir, self.python = api, interval, workdir, python
        self.custom = kubernetes.client.CustomObjectsApi()
        self.core = kubernetes.client.CoreV1Api()
        self.created: list[str] = []
        self.finished: set[str] = set()
        self.round = 1
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ set-up
    def kubectl(self, *args: str, input: str | None = None) -> None:
        subprocess.run([KUBECTL, *args], env={**os.environ, **self.api.env()}, input=input, text=True,
                       check=True, capture_output=True, timeout=60)

    def install(self) -> None:
        crd = subprocess.run([sys.executable, "-m", "finetune_operator.cli", "crd"], capture_output=True, text=True,
                             check=True, env=self.env())
        self.kubectl("apply", "-f", "-", input=crd.stdout)
        for name in ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml"):
            self.kubectl("apply", "--server-side", "-f", str(KUBERAY / name))
        self.kubectl("wait", "--for", "condition=Established", "crd/finetunejobs.finetune.dev", "crd/rayjobs.ray.io")
        self.kubectl("create", "namespace", NAMESPACE)

    def env(self) -> dict[str, str]:
        path = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer"), str(REPO)])
        return {**os.environ, **self.api.env(), "PYTHONPATH": path}

    def start_operator(self) -> None:
        health = _free_port()
        args = [self.python, "-m", "finetune_operator.cli", "operator", "--namespace", NAMESPACE,
                "--health-port", str(health), "--metrics-port", str(_free_port()),
                "--progress-interval", str(self.interval)]
        out = (self.workdir / "operator.log").open("ab")
        self.proc = subprocess.Popen(args, env=self.env(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: http_ok(f"http://127.0.0.1:{health}/healthz"), timeout=120, what="the operator's /healthz")

    # ------------------------------------------------------------------ the operator process
    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def memory_mib(self) -> tuple[float, float]:
        assert self.proc is not None
        values = dict(line.split(":", 1) for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return int(values["VmRSS"].split()[0]) / 1024, int(values["VmHWM"].split()[0]) / 1024

    # ------------------------------------------------------------------ playing the user, KubeRay and the trainer
    def jobs(self) -> dict[str, dict[str, Any]]:
        items = self.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
        return {item["metadata"]["name"]: item for item in items}

    def create(self, count: int) -> float:
        """`count` new jobs; returns seconds until the last one's RayJob exists."""
        start = time.monotonic()
        new = [f"job-{len(self.created) + i:05d}" for i in range(count)]
        for name in new:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, manifest("quickstart.yaml", name=name))
        self.created += new

        def all_there() -> bool:
            names = {r["metadata"]["name"] for r in self.custom.list_namespaced_custom_object(
                "ray.io", "v1", NAMESPACE, "rayjobs")["items"]}
            return {f"{n}-ray" for n in new} <= names

        wait_for(all_there, timeout=60 + count, interval=0.5, what=f"{count} RayJobs")
        return time.monotonic() - start

    def kuberay_says(self, name: str, **status: Any) -> None:
        self.custom.patch_namespaced_custom_object_status("ray.io", "v1", NAMESPACE, "rayjobs", f"{name}-ray", {"status": status})

    def trainer_reports(self, name: str, *, state: str = "running") -> None:
        rayjob = self.custom.get_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayjobs", f"{name}-ray")
        run = run_id(rayjob)
        trials = {run: "completed" if state == "finished" else "running"}
        document = snapshot(name, run, kind="single", state=state, trials=trials, total_trials=self.round)
        self.core.patch_namespaced_config_map(progress_name(name), NAMESPACE, {"data": {PROGRESS_KEY: json.dumps(document.as_dict())}})

    def run_all(self, names: list[str]) -> None:
        for name in names:
            self.kuberay_says(name, jobDeploymentStatus="Running", jobStatus="RUNNING")
            self.trainer_reports(name)
        wait_for(lambda: all(self.jobs().get(n, {}).get("status", {}).get("phase") == "Running" for n in names),
                 timeout=60 + len(names), interval=1, what=f"{len(names)} jobs Running")

    def running(self) -> list[str]:
        return [n for n in self.created if n not in self.finished]

    # ------------------------------------------------------------------ measurements
    def window(self, seconds: float) -> dict[str, Any]:
        """CPU and memory over `seconds`, and how long each running job's status took to show a
        progress document written at the window's start."""
        names = self.running()
        self.round += 1
        marker = f"/{self.round}"
        cpu0, t0 = self.cpu_seconds(), time.monotonic()
        for name in names:
            self.trainer_reports(name)
        written = time.monotonic()
        lag: dict[str, float] = {}
        while time.monotonic() - t0 < seconds:
            now = time.monotonic()
            for name, item in self.jobs().items():
                if name in names and name not in lag and (item.get("status", {}).get("trialsDone") or "").endswith(marker):
                    lag[name] = now - t0
            time.sleep(2)
        cpu = self.cpu_seconds() - cpu0
        elapsed = time.monotonic() - t0
        rss, peak = self.memory_mib()
        missing = [n for n in names if n not in lag]
        return {
            "jobs_running": len(names), "window_seconds": round(elapsed, 1), "write_seconds": round(written - t0, 1),
            "cpu_seconds_per_minute": round(cpu * 60 / elapsed, 2), "rss_mib": round(rss, 1), "peak_rss_mib": round(peak, 1),
            "status_lag_seconds_max": round(max(lag.values()), 1) if lag and not missing else None,
            "status_lag_seconds_median": round(statistics.median(lag.values()), 1) if lag else None,
            "status_not_updated": len(missing),
        }

    def phase_changes(self, count: int) -> dict[str, Any]:
        """Finish `count` running jobs the way a real run ends; seconds until each says Succeeded."""
        names = self.running()[:count]
        started: dict[str, float] = {}
        for name in names:
            self.trainer_reports(name, state="finished")
            started[name] = time.monotonic()
            self.kuberay_says(name, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED",
                              endTime=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), succeeded=1)
        latency: dict[str, float] = {}
        deadline = time.monotonic() + 4 * self.interval + 60
        while len(latency) < len(names) and time.monotonic() < deadline:
            for name in names:
                if name not in latency:
                    item = self.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
                    if item.get("status", {}).get("phase") == "Succeeded":
                        latency[name] = time.monotonic() - started[name]
            time.sleep(0.05)
        self.finished.update(names)
        values = list(latency.values())
        return {"phase_change_seconds_median": round(statistics.median(values), 2) if values else None,
                "phase_change_seconds_max": round(max(values), 2) if len(values) == len(names) else None,
                "phase_changes_missed": len(names) - len(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[100, 1000], help="running jobs at each scale")
    parser.add_argument("--interval", type=float, default=30.0, help="--progress-interval (the operator's default: 30)")
    parser.add_argument("--window", type=float, default=120.0, help="seconds measured at each scale")
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "bench/results")
    parser.add_argument("--operator-python", default=sys.executable,
                        help="the interpreter that runs the operator, e.g. a venv built as the Dockerfile builds the image's")
    parser.add_argument("--label", default="", help="added to the result's file name and record (e.g. before)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # the emulator's line per request
    chart = yaml.safe_load((REPO / "helm/finetune-operator/values.yaml").read_text())["resources"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    record: dict[str, Any] = {"bench": "operator_scale", "commit": commit, "label": args.label, "interval": args.interval,
                              "window": args.window, "operator_python": args.operator_python, "chart_resources": chart, "scales": []}
    with tempfile.TemporaryDirectory() as tmp, kube_emulator.running(pathlib.Path(tmp)) as api:
        os.environ.update(api.env())
        api.configure_kubernetes_client()
        bench = Bench(api, args.interval, pathlib.Path(tmp), args.operator_python)
        bench.install()
        bench.start_operator()
        try:
            bench.create(1)  # the reference: one job running, then ended by the phase check
            bench.run_all(bench.created[-1:])
            log.info("reference: 1 job running")
            reference = {**bench.window(args.window), **bench.phase_changes(1)}
            record["reference"] = reference
            log.info("%s", reference)
            for target in args.jobs:
                add = target + FINISHED_PER_SCALE - len(bench.running())
                reconcile = bench.create(add)
                bench.run_all(bench.created[-add:])
                log.info("%d running; measuring %.0f s", len(bench.running()), args.window)
                scale = {"new_jobs": add, "reconcile_seconds": round(reconcile, 1), **bench.window(args.window),
                         **bench.phase_changes(FINISHED_PER_SCALE)}
                per_job = (scale["cpu_seconds_per_minute"] - reference["cpu_seconds_per_minute"]) / max(scale["jobs_running"], 1)
                scale["cpu_seconds_per_job_minute"] = round(per_job, 4)
                record["scales"].append(scale)
                log.info("%s", scale)
        finally:
            if bench.proc is not None:
                bench.proc.terminate()
                bench.proc.wait(timeout=30)
    args.out.mkdir(parents=True, exist_ok=True)
    label = f"-{args.label}" if args.label else ""
    path = args.out / f"operator_scale{label}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
