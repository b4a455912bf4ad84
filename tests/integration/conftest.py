"""Integration fixtures: one real local Ray per test session (starting it costs ~10 s), and what
several modules compare against, built once per session rather than once per module: the fault
tests' tiny model and data set, and the uninterrupted run of fault_kit.job_doc's defaults, which
test_faults, test_storage_faults and test_auto_resume each used to repeat."""

from __future__ import annotations

import os

import pytest

from tests.integration import fault_kit, tiny
from tests.integration.s3_fixtures import s3_server, s3_spec  # noqa: F401  (session S3 server: SeaweedFS on loopback)


@pytest.fixture(scope="session")
def local_ray(s3_server):  # noqa: F811  (the fixture imported above)
    """Ray started with the session S3 server's keys in its environment, as a pod gets them from
    the job's Secret: jobs' storage filesystems carry no keys (see storage.pyarrow_filesystem),
    so Ray's workers read them from there."""
    import ray

    from finetune_trainer.driver import init_ray

    os.environ.update(s3_server.env())
    init_ray()
    assert ray.util.get_node_ip_address() == "127.0.0.1", "local Ray must stay on loopback"
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The fault tests' tiny model and data set (model folder, train.jsonl). Only ever read: every
    run writes to a folder of its own, so the modules can share one."""
    tmp = tmp_path_factory.mktemp("faults")
    return tiny.make_model(tmp / "model", "bert", layers=2), tiny.write_jsonl(tmp / "train.jsonl", tiny.sentiment_rows(300))


@pytest.fixture(scope="session")
def reference(local_ray, assets, tmp_path_factory):
    """The uninterrupted run of fault_kit.job_doc's defaults on a local folder (same seed): what
    every faulted run must equal (test_faults, test_storage_faults, test_auto_resume). A module
    whose reference is another configuration defines its own `reference` (test_multinode)."""
    from finetune_trainer.run import run
    from finetune_trainer.spec import parse_job

    return run(parse_job(fault_kit.job_doc(tmp_path_factory.mktemp("reference"), assets, name="ref")))
