"""Integration fixtures: one real local Ray per test session (starting it costs ~10 s)."""

from __future__ import annotations

import os

import pytest

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
