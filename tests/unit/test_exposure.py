"""Hostile input a shared cluster must refuse before any pod starts: storage endpoints on loopback,
link-local or a cloud metadata service, and literal credentials in spec.cluster.env. `finetune
validate` and `finetune render` refuse them as the operator does; a local `finetune run` accepts a
loopback endpoint (the user's own MinIO)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import cli as operator_cli
from finetune_trainer.spec import SpecError, parse_job
from finetune_trainer.spec.exposure import blocked_address
from tests.tiny_models import minimal_manifest

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.1", "2130706433", "0x7f000001", "0.0.0.0", "localhost", "LocalHost.", "api.localhost",
    "169.254.169.254", "169.254.170.2", "[::1]", "[fd00:ec2::254]", "[::ffff:169.254.169.254]", "[fe80::1]",
    "metadata.google.internal", "metadata", "instance-data",
])
def test_loopback_link_local_and_metadata_hosts_are_blocked(host: str) -> None:
    assert blocked_address(host) is not None


@pytest.mark.parametrize("host", ["minio.storage.svc", "s3.amazonaws.com", "10.0.0.12", "192.168.1.5", "[2001:db8::1]", "1.2.3"])
def test_ordinary_storage_hosts_pass(host: str) -> None:
    assert blocked_address(host) is None


def _problems(manifest: dict[str, Any], *, for_cluster: bool = True) -> list[tuple[str, str]]:
    try:
        parse_job(manifest, for_cluster=for_cluster)
    except SpecError as err:
        return err.problems
    return []


def test_a_metadata_endpoint_is_refused_for_the_cluster_naming_the_field() -> None:
    doc = minimal_manifest(storage={"uri": "s3://ckpt/x", "endpoint": "http://169.254.169.254:80"})
    [(path, message)] = _problems(doc)
    assert path == "spec.storage.endpoint" and "metadata" in message and "minio.storage.svc" in message


def test_a_loopback_endpoint_is_fine_for_a_local_run() -> None:
    doc = minimal_manifest(storage={"uri": "s3://ckpt/x", "endpoint": "http://127.0.0.1:9000"})
    assert _problems(doc, for_cluster=False) == []
    assert [p for p, _ in _problems(doc)] == ["spec.storage.endpoint"]


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
                                  "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD", "GITHUB_PAT_SECRET", "my_private_key", "db.password", "AWS_SECURITY_TOKEN"])
def test_a_literal_credential_in_env_is_refused_with_or_without_a_secret(name: str) -> None:
    for cluster in ({}, {"s3CredentialsSecret": {"name": "s3"}}):
        doc = minimal_manifest(cluster={**copy.deepcopy(cluster), "env": [{"name": name, "value": "x"}]})
        found = _problems(doc, for_cluster=False)  # everywhere: the literal would sit in the RayJob and in Git
        # with the Secret, the AWS variables are the operator's to set, and that is the one message
        assert any(p == "spec.cluster.env[0].value" and "valueFrom.secretKeyRef" in m for p, m in found) or (
            cluster and found == [("spec.cluster.env[0].name", f"{name} is set by the operator from s3CredentialsSecret")]), found


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "HF_HOME", "HF_HUB_ENABLE_HF_TRANSFER", "NCCL_SOCKET_IFNAME",
                                  "KEYRING_BACKEND", "SECRETARY"])
def test_ordinary_variables_keep_literal_values(name: str) -> None:
    assert _problems(minimal_manifest(cluster={"env": [{"name": name, "value": "x"}]})) == []


def test_a_credential_from_a_secret_reference_is_accepted_and_rendered_as_one() -> None:
    ref = {"secretKeyRef": {"name": "hf", "key": "token"}}
    job = parse_job(minimal_manifest(cluster={"env": [{"name": "HF_TOKEN", "valueFrom": ref}, {"name": "HF_HOME", "value": "/c"}]}),
                    for_cluster=True)
    assert [e.as_container_env() for e in job.spec.cluster.env] == [
        {"name": "HF_TOKEN", "valueFrom": ref}, {"name": "HF_HOME", "value": "/c"}]
    both = minimal_manifest(cluster={"env": [{"name": "HF_TOKEN", "value": "x", "valueFrom": ref}]})
    assert any("value or valueFrom" in m for _, m in _problems(both))


@pytest.mark.parametrize("name", ["RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "FINETUNE_PROGRESS_CONFIGMAP"])
def test_what_kuberay_and_the_operator_set_cannot_be_overridden(name: str) -> None:
    doc = minimal_manifest(cluster={"env": [{"name": name, "value": "disabled"}]})
    assert ("spec.cluster.env[0].name", f"{name} is set by the operator") in _problems(doc)


@pytest.mark.parametrize("command", ["validate", "render"])
def test_validate_and_render_refuse_what_the_operator_refuses(command: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"]["storage"] = {"uri": "s3://ckpt/x", "endpoint": "http://[fd00:ec2::254]"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    args = [command, str(path)] + (["--static"] if command == "validate" else [])
    assert operator_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "spec.storage.endpoint" in err and "Traceback" not in err
