"""deepspeed_import: a worker's `import deepspeed` leaves MLflow's client unimported, and importable."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.unit.test_architecture import TRAINER

PROBE = """
import json, sys
from finetune_trainer.deepspeed_import import import_deepspeed
deepspeed = import_deepspeed()
loaded = "mlflow" in sys.modules
import deepspeed.autotuning.autotuner as autotuner
import mlflow  # still importable afterwards: the mark is gone
print(json.dumps({"loaded_with_deepspeed": loaded, "has_mlflow": autotuner.has_mlflow,
                  "mlflow_after": mlflow.__name__, "same": import_deepspeed() is deepspeed}))
"""


def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(TRAINER.parent), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"loaded_with_deepspeed": False, "has_mlflow": False, "mlflow_after": "mlflow", "same": True}


def test_a_process_that_already_imported_mlflow_keeps_it():
    probe = "import mlflow, sys\nfrom finetune_trainer.deepspeed_import import import_deepspeed\nimport_deepspeed()\nprint(sys.modules['mlflow'] is mlflow)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(TRAINER.parent), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True"
