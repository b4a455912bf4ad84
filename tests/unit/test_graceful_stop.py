"""SIGTERM on the Ray pods (issue 16, item 2): spec.runPolicy.terminationGracePeriodSeconds becomes
the head and worker pods' terminationGracePeriodSeconds, and Ray's drain timeout on SIGTERM
(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S) leaves Ray's teardown its seconds inside it; KubeRay's
RayJob schema accepts the result."""

from __future__ import annotations

import pytest

from finetune_operator.pods import DRAIN_ENV
from finetune_operator.rayjob import render_rayjob
from finetune_trainer.spec import SpecError, parse_job
from finetune_trainer.spec.cluster import RunPolicySpec
from tests.tiny_models import minimal_manifest
from tests.unit.test_rayjob import kuberay_errors, kuberay_schema


def _templates(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def _drain(template) -> list[str]:
    return [e["value"] for c in template["spec"]["containers"] for e in c.get("env", []) if e["name"] == DRAIN_ENV]


@pytest.mark.parametrize(("grace", "window"), [(None, 20), (120, 110), (15, 10), (1, 1), (0, 0)])
def test_the_grace_period_reaches_every_ray_pod_with_ray_s_drain_inside_it(grace, window):
    policy = {} if grace is None else {"terminationGracePeriodSeconds": grace}
    rayjob = render_rayjob(parse_job(minimal_manifest(runPolicy=policy)))
    for template in _templates(rayjob):
        assert template["spec"]["terminationGracePeriodSeconds"] == (30 if grace is None else grace)
        assert _drain(template) == [str(window)]  # once per container, never duplicated
    assert not kuberay_errors(kuberay_schema(), rayjob)


def test_the_save_window_leaves_teardown_time():
    for grace in range(0, 200):
        window = RunPolicySpec(terminationGracePeriodSeconds=grace).save_window()
        assert 0 <= window <= grace and (grace < 3 or window < grace) and (grace < 30 or grace - window == 10)


@pytest.mark.parametrize("grace", [-1, 86401, "30", True])
def test_a_grace_period_out_of_bounds_is_refused_naming_the_field(grace):
    with pytest.raises(SpecError, match="terminationGracePeriodSeconds"):
        parse_job(minimal_manifest(runPolicy={"terminationGracePeriodSeconds": grace}))
