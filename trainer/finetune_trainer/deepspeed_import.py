"""`import deepspeed` in a training worker, without the MLflow client DeepSpeed would import too.

DeepSpeed 0.19's autotuner (deepspeed/autotuning/autotuner.py) tries `import mlflow` at import
time, on the path `deepspeed.runtime.config` -> `deepspeed.autotuning`, so every worker of every
start pays for MLflow's client (~0.5 s of CPU on the 2-core dev machine, most of `import deepspeed`;
profiled with `python -X importtime`) when the trainer image has it installed for tracking.
Nothing a worker runs uses it: the autotuner is DeepSpeed's launcher's, and our MLflow rows are
written by the driver (tracking.py). DeepSpeed offers no switch, so the import is made with
`mlflow` marked unimportable (a `None` in sys.modules, Python's documented way to make an import
fail), which its `try/except` takes as not installed; the mark is removed right after, so a later
`import mlflow` in the same process works as before.
"""

from __future__ import annotations

import sys
from types import ModuleType

_SKIPPED = "mlflow"


def import_deepspeed() -> ModuleType:
    """The deepspeed module, imported (the first time) with MLflow marked unimportable."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    mark = _SKIPPED not in sys.modules
    if mark:
        sys.modules[_SKIPPED] = None  # type: ignore[assignment]  # import mlflow raises ModuleNotFoundError
    try:
        import deepspeed
    finally:
        if mark and _SKIPPED in sys.modules and sys.modules[_SKIPPED] is None:  # still our mark
            del sys.modules[_SKIPPED]
    return deepspeed
