"""Integration fixtures: one real local Ray per test session (starting it costs ~10 s)."""

from __future__ import annotations

import pytest

from tests.integration.s3_fixtures import s3_server, s3_spec  # noqa: F401  (session S3 server: SeaweedFS on loopback)


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from finetune_trainer.run import init_ray

    init_ray()
    assert ray.util.get_node_ip_address() == "127.0.0.1", "local Ray must stay on loopback"
    yield ray
    ray.shutdown()
