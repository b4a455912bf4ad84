"""environment.prepare: what the entry points set before Ray is imported."""

from __future__ import annotations

import socket

import pytest

from finetune_trainer import environment


def test_a_local_run_gets_loopback_and_a_gcs_port_outside_the_ephemeral_range():
    env: dict[str, str] = {environment.GCS_PORT: "1"}  # inherited from a parent driver: never reused
    environment.prepare(env)
    low, high = environment.PORT_RANGE
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert low <= int(env[environment.GCS_PORT]) <= high


def test_a_joined_cluster_is_left_alone():
    env = {"RAY_ADDRESS": "10.0.0.1:6379"}
    environment.prepare(env)
    assert env == {"RAY_ADDRESS": "10.0.0.1:6379"}


def test_a_port_something_listens_on_is_never_chosen():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="no free port"):
            environment.free_port((port, port), attempts=5)
