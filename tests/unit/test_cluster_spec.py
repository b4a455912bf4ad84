"""spec.cluster and spec.runPolicy: defaults that fit spec.resources by construction, and every
rule that says why a written cluster cannot hold the job, at the field to change."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_trainer.spec import SpecError, load_job, parse_job
from finetune_trainer.spec.cluster import DEFAULT_IMAGE, RAY_VERSION, memory_bytes
from tests.tiny_models import minimal_manifest


def job_with(**sections: Any):
    return parse_job(minimal_manifest(**sections))


def problems(**sections: Any) -> list[tuple[str, str]]:
    try:
        parse_job(minimal_manifest(**sections))
    except SpecError as err:
        return err.problems
    return []


def test_defaults_without_a_cluster_section():
    spec = job_with().spec
    cluster = spec.cluster
    assert (cluster.image, cluster.ray_version) == (DEFAULT_IMAGE, RAY_VERSION)
    assert DEFAULT_IMAGE.endswith(":0.1.0")
    assert (cluster.head.cpus, cluster.head.memory, cluster.head.gpus) == (1, "4Gi", 0)
    assert (cluster.workers.replicas, cluster.workers.cpus, cluster.workers.memory) == (None, None, None)
    assert cluster.s3_credentials_secret is None
    policy = spec.run_policy
    assert (policy.suspend, policy.active_deadline_seconds, policy.backoff_limit, policy.ttl_seconds_after_finished) == (
        False, None, 0, 300,
    )


def test_ray_version_default_is_the_trainer_pin():
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"ray[default,train,tune]=={RAY_VERSION}"' in pyproject


@pytest.mark.parametrize(
    ("resources", "replicas", "cpus", "gpus"),
    [({}, 1, 1, 0), ({"workers": 3, "cpusPerWorker": 2}, 3, 2, 0), ({"workers": 2, "cpusPerWorker": 0.5}, 2, 1, 0),
     ({"workers": 4, "gpusPerWorker": 1}, 4, 1, 1)],
)
def test_worker_group_defaults_follow_resources(resources, replicas, cpus, gpus):
    spec = job_with(resources=resources, cluster={}).spec  # a written (empty) section is checked too
    res, group = spec.resources, spec.cluster.workers
    assert group.resolved_replicas(res.workers) == replicas
    assert group.resolved_cpus(res.cpus_per_worker) == cpus
    assert group.resolved_gpus(res.gpus_per_worker) == gpus


def test_every_option_parses():
    spec = job_with(
        cluster={
            "image": "registry.example/trainer:dev", "imagePullPolicy": "Always", "imagePullSecrets": ["regcred"],
            "rayVersion": "2.60.0", "serviceAccountName": "trainer", "gpuResource": "amd.com/gpu",
            "head": {"cpus": 2, "memory": "8Gi", "nodeSelector": {"pool": "cpu"}, "priorityClassName": "high"},
            "workers": {"replicas": 2, "minReplicas": 1, "maxReplicas": 3, "cpus": 4, "memory": "16Gi", "gpus": 1,
                        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]},
            "env": [{"name": "HF_HOME", "value": "/cache"}],
            "s3CredentialsSecret": {"name": "s3", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"},
        },
        runPolicy={"suspend": True, "activeDeadlineSeconds": 3600, "backoffLimit": 2, "ttlSecondsAfterFinished": 60},
    ).spec
    assert spec.cluster.workers.tolerations[0].operator == "Exists"
    assert spec.cluster.s3_credentials_secret.access_key_id_key == "id"
    assert spec.run_policy.backoff_limit == 2


@pytest.mark.parametrize(("quantity", "size"), [("8Gi", 8 * 2**30), ("512Mi", 512 * 2**20), ("2G", 2 * 10**9), ("1000", 1000), ("1.5Gi", 3 * 2**29)])
def test_memory_quantities(quantity, size):
    assert memory_bytes(quantity) == size
    assert job_with(cluster={"workers": {"memory": quantity}}).spec.cluster.workers.memory == quantity


@pytest.mark.parametrize("quantity", ["8GB", "8 Gi", "-1Gi", "Gi", "8gi", ""])
def test_bad_memory_quantity_is_reported_at_its_path(quantity):
    found = problems(cluster={"workers": {"memory": quantity}, "head": {"memory": quantity}})
    assert {p for p, _ in found} == {"spec.cluster.workers.memory", "spec.cluster.head.memory"}
    assert all("8Gi" in m for _, m in found)


@pytest.mark.parametrize(
    ("sections", "path", "words"),
    [
        ({"resources": {"gpusPerWorker": 1}, "cluster": {"workers": {"gpus": 0}}}, "spec.cluster.workers.gpus", ["no GPUs"]),
        ({"resources": {"gpusPerWorker": 1}, "cluster": {"workers": {"replicas": 0}}}, "spec.cluster.workers.replicas", ["no pods"]),
        ({"resources": {"workers": 4}, "cluster": {"workers": {"replicas": 1, "cpus": 2}}}, "spec.cluster.workers",
         ["hold 2 Ray Train worker(s)", "resources.workers is 4"]),
        ({"resources": {"workers": 2, "cpusPerWorker": 2}, "cluster": {"workers": {"replicas": 2, "cpus": 1.5}}}, "spec.cluster.workers",
         ["hold 0"]),
        ({"resources": {"workers": 2, "gpusPerWorker": 1}, "cluster": {"workers": {"replicas": 1, "cpus": 8, "gpus": 1}}},
         "spec.cluster.workers", ["1 GPU(s)", "resources.workers is 2"]),
        ({"cluster": {"workers": {"minReplicas": 3, "maxReplicas": 2}}}, "spec.cluster.workers.minReplicas", ["maxReplicas (2)"]),
        ({"cluster": {"workers": {"replicas": 3, "minReplicas": 1, "maxReplicas": 2}}}, "spec.cluster.workers.replicas", ["between"]),
        ({"deepspeed": {"zeroStage": 3}, "cluster": {}}, "spec.cluster.workers.memory", ["zeroStage: 3", "workers.memory"]),
        ({"deepspeed": {"zeroStage": 2, "offloadOptimizer": True}, "cluster": {}}, "spec.cluster.workers.memory",
         ["offloadOptimizer"]),
        ({"cluster": {"env": [{"name": "FINETUNE_MANIFEST", "value": "x"}]}}, "spec.cluster.env[0].name", ["set by the operator"]),
        ({"cluster": {"env": [{"name": "A"}, {"name": "A"}]}}, "spec.cluster.env[1].name", ["env[0]"]),
        ({"cluster": {"s3CredentialsSecret": {"name": "s3"}, "env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}},
         "spec.cluster.env[0].name", ["s3CredentialsSecret"]),
        ({"cluster": {"env": [{"name": "1BAD"}]}}, "spec.cluster.env[0].name", ["pattern"]),
        ({"cluster": {"workers": {"replicas": -1}}}, "spec.cluster.workers.replicas", ["greater than or equal to 0"]),
        ({"cluster": {"head": {"cpus": 0}}}, "spec.cluster.head.cpus", ["greater than or equal to 1"]),
        ({"cluster": {"workerz": {}}}, "spec.cluster.workerz", ["unknown field"]),
        ({"runPolicy": {"activeDeadlineSeconds": 0}}, "spec.runPolicy.activeDeadlineSeconds", ["greater than or equal to 1"]),
        ({"runPolicy": {"backoffLimit": -1}}, "spec.runPolicy.backoffLimit", ["greater than or equal to 0"]),
        ({"cluster": {"workers": {"tolerations": [{"effect": "Sometimes"}]}}}, "spec.cluster.workers.tolerations[0].effect",
         ["NoSchedule"]),
    ],
)
def test_cluster_rule_is_reported_at_the_field_to_change(sections, path, words):
    found = problems(**sections)
    assert {p for p, _ in found} == {path}, found
    text = " | ".join(m for _, m in found)
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"


@pytest.mark.parametrize(
    "sections",
    [
        {"deepspeed": {"zeroStage": 3, "offloadParams": True}},  # no cluster section: local runs are not judged
        {"deepspeed": {"zeroStage": 3}, "cluster": {"workers": {"memory": "16Gi"}}},
        {"resources": {"workers": 4, "cpusPerWorker": 2}, "cluster": {"workers": {"replicas": 2, "cpus": 4}}},
        {"resources": {"workers": 2, "gpusPerWorker": 1}, "cluster": {"workers": {"replicas": 1, "cpus": 2, "gpus": 2}}},
        {"resources": {"workers": 2, "gpusPerWorker": 1}, "cluster": {}},
        {"cluster": {"workers": {"replicas": 2, "minReplicas": 1, "maxReplicas": 4}}},
        {"cluster": {"s3CredentialsSecret": {"name": "s3"}, "env": [{"name": "AWS_REGION", "value": "eu"}]}},
    ],
)
def test_valid_neighbours_of_the_cluster_rules(sections):
    assert problems(**sections) == []


def test_cluster_overrides_with_set(tmp_path):
    path = tmp_path / "job.yaml"
    import yaml

    path.write_text(yaml.safe_dump(minimal_manifest()))
    job = load_job(path, ["cluster.workers.memory=8Gi", "runPolicy.suspend=true"])
    assert (job.spec.cluster.workers.memory, job.spec.run_policy.suspend) == ("8Gi", True)


def test_manifest_from_an_environment_variable(monkeypatch):
    import json

    monkeypatch.setenv("FT_TEST_MANIFEST", json.dumps(minimal_manifest(training={"maxSteps": 7})))
    job = load_job("env:FT_TEST_MANIFEST", ["training.seed=3"])
    assert (job.spec.training.max_steps, job.spec.training.seed) == (7, 3)


def test_manifest_from_a_missing_environment_variable(monkeypatch):
    monkeypatch.delenv("FT_TEST_MISSING", raising=False)
    with pytest.raises(SpecError) as err:
        load_job("env:FT_TEST_MISSING")
    assert err.value.problems == [("<manifest>", "environment variable FT_TEST_MISSING is not set")]


@pytest.mark.parametrize(("memory", "disk"), [(None, "10Gi"), ("512Mi", "10Gi"), ("4Gi", "10Gi"), ("8Gi", "18Gi"), ("1000M", "10Gi"),
                                              ("32Gi", "66Gi"), ("100G", "189Gi")])
def test_ephemeral_storage_default_is_twice_the_memory_plus_rays_logs(memory, disk):
    from finetune_trainer.spec.cluster import WorkerGroupSpec
    from finetune_trainer.spec.pod_security import default_ephemeral_storage

    assert default_ephemeral_storage(memory_bytes(memory) if memory else None) == disk
    assert WorkerGroupSpec(memory=memory, ephemeralStorage="40Gi").ephemeral_storage == "40Gi"
