"""What the Ray dashboard calls a job's parts (issue 20 item 5): the Ray job is named after the
FineTuneJob (Ray's `job_name` metadata key, the Jobs view's Name column; rayjob.py's submission
metadata has the same, tests/unit/test_rayjob.py), and a search trial's Ray Train run after the
FineTuneJob and the trial; that name, which Train V2 also makes the run's storage folder under
trials/<trial>/, stays one safe path segment sorting in start order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from finetune_trainer.spec import parse_job
from finetune_trainer.trial import run_name
from tests.tiny_models import minimal_manifest

STARTED = datetime(2026, 12, 3, 2, 40, 23, 565145, tzinfo=UTC)


def test_a_trial_start_is_named_after_its_job_and_trial_and_sorts_by_start() -> None:
    assert run_name("dash-demo", "trial_00", STARTED) == "dash-demo-trial_00-start-20261203-024023-565145"
    later = [run_name("dash-demo", "trial_00", STARTED + timedelta(microseconds=n)) for n in (1, 10**6, 86400 * 10**6)]
    assert sorted(later) == later and run_name("dash-demo", "trial_00", STARTED) < later[0]
    assert run_name("a" * 63, "trial_3f2a1_00012", STARTED).startswith("a" * 63 + "-trial_3f2a1_00012-start-")  # Tune's own trial ids


@pytest.mark.parametrize(("job", "trial"), [("dash-demo", "../../x"), ("dash-demo", "trial/00"), ("..", "trial_00"),
                                            ("dash-demo", "trial_00/../../etc"), ("Dash", "trial_00"), ("dash-demo", "")])
def test_a_name_that_would_be_a_path_is_refused(job: str, trial: str) -> None:
    with pytest.raises(ValueError, match="not one storage path segment"):
        run_name(job, trial, STARTED)


def test_the_ray_job_is_named_after_the_finetunejob() -> None:
    job = parse_job({**minimal_manifest(), "metadata": {"name": "sentiment", "namespace": "team-a"}})
    assert job.ray_job_metadata() == {"job_name": "sentiment", "finetune.dev/job": "sentiment", "finetune.dev/namespace": "team-a"}
